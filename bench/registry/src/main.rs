//! `registry-bench`: benchmarks of the service registry (reeve / steward).
//!
//! * `lookup`: local `Lookup`s per second and their latency over one agent's Unix socket.
//! * `capacity`: how many heartbeating instances one steward sustains, and the CPU of the
//!   steward and of the reeves (in-process, over gRPC on 127.0.0.1).
//! * `watch`: the time a registration (and a deregistration) takes to reach a `Watch` on every
//!   node of a flock of real agents.
//! * `dns`: DNS queries per second one agent answers (`dnsperf`), latency percentiles under that
//!   load, and the agent's CPU per 10k queries a second (`bench/dns.sh`).
//!
//! Only loopback addresses; only processes this binary starts are stopped (on drop, and on
//! Ctrl-C); waits are for conditions, with deadlines. No figure is asserted: they are printed.

mod capacity;
mod common;
mod dns;
mod lookup;
mod watch;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks of the crux service registry")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Local lookups per second and latency over one agent's Unix socket.
    Lookup(lookup::LookupArgs),
    /// Steward capacity: instances with heartbeats, CPU of the steward and of the reeves.
    Capacity(capacity::CapacityArgs),
    /// Time for a change to reach a Watch on every node of a flock.
    Watch(watch::WatchArgs),
    /// DNS: dnsperf against one agent with registered instances; latency and CPU.
    Dns(dns::DnsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Logs of the registry code itself, on stderr: RUST_LOG=crux_reeve=debug,crux_steward=debug.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        // In-process only: it builds its own runtimes.
        Cmd::Capacity(a) => capacity::run(&a),
        Cmd::Lookup(a) => with_agents(lookup::run(a)),
        Cmd::Watch(a) => with_agents(watch::run(a)),
        Cmd::Dns(a) => with_agents(dns::run(a)),
    }
}

/// Runs a benchmark that starts agents; on Ctrl-C or SIGTERM it is dropped, and with it the
/// cluster, which kills exactly the agents it started.
fn with_agents(bench: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = bench => r,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                _ = term.recv() => anyhow::bail!("terminated"),
            }
        })
}
