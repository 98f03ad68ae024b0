//! Benchmark 1: local `Lookup`s per second and their latency over the agent's Unix socket.
//!
//! One real agent (a flock of one, so its reeve is linked to its own steward); `apis` × `per_api`
//! instances registered through the client library ([`Registration`], which keeps them alive with
//! heartbeats); then C clients, each on its own connection, call `Lookup(api:NAME, live_only)` in
//! a loop for a fixed time. Client and agent share the machine's cores.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_reeve::client::{reeve_client, Registration};
use tokio::time::Instant;

use crate::common::{self, pct, process_cpu, self_cpu, start_flock, wait_until};

/// `registry-bench lookup` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct LookupArgs {
    /// The crux executable (default: `crux` beside this binary).
    #[arg(long)]
    pub crux: Option<PathBuf>,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub clients: Vec<usize>,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Seconds of warm-up per run (not measured).
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Apis registered; each lookup names one of them.
    #[arg(long, default_value_t = 10)]
    pub apis: usize,
    /// Instances per api.
    #[arg(long, default_value_t = 10)]
    pub per_api: usize,
    /// Further instances of 100 other apis (valid for an hour, no heartbeats) that lookups do not
    /// name: how the lookup cost grows with the size of the registry.
    #[arg(long, default_value_t = 0)]
    pub extra: usize,
}

/// One run's figures.
struct Run {
    clients: usize,
    /// Latencies of the calls started in the measured window, in µs.
    lat: Vec<u32>,
    errors: usize,
    secs: f64,
    agent_cpu: Option<f64>,
    client_cpu: f64,
}

/// Runs the benchmark and prints its table.
pub async fn run(args: LookupArgs) -> anyhow::Result<()> {
    let bin = common::crux_bin(args.crux.clone())?;
    let t = Instant::now();
    let cluster = start_flock(&bin, 1, Duration::from_secs(60)).await?;
    let agent = cluster.agent(1);
    let socket = agent.socket.clone();
    let pid = agent.pid().context("the agent is not running")?;
    println!(
        "lookup: 1 agent ({}, pid {pid}) ready and linked in {:.1} s",
        agent.addr,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut regs = Vec::new();
    for a in 0..args.apis {
        for j in 0..args.per_api {
            let req = common::running(
                &format!("lbench{a}"),
                &format!("lbench{a}_{j}"),
                &format!("127.0.0.1:{}", 10000 + a * 100 + j),
                Duration::ZERO,
            );
            regs.push(Registration::start(&socket, req).await?);
        }
    }
    if args.extra > 0 {
        let t = Instant::now();
        let mut c = reeve_client(&socket).await?;
        for j in 0..args.extra {
            let api = format!("other{}", j % 100);
            let req = common::running(
                &api,
                &format!("{api}_{j}"),
                "127.0.0.1:9",
                Duration::from_secs(3600),
            );
            c.register(req).await?;
        }
        println!(
            "lookup: {} more instances of 100 other apis registered in {:.2} s",
            args.extra,
            t.elapsed().as_secs_f64()
        );
    }
    let want = args.per_api;
    let apis = args.apis;
    wait_until(
        "every registered instance to be live in lookups",
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            let mut c = reeve_client(&socket).await.ok()?;
            for a in 0..apis {
                let r = c.lookup(lookup_req(a)).await.ok()?.into_inner();
                if r.instances.len() != want {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;
    println!(
        "lookup: {} instances ({apis} apis × {want}) registered with heartbeats in {:.2} s; \
         each lookup answers {want} instances",
        regs.len(),
        t.elapsed().as_secs_f64()
    );

    // The agent's CPU with no lookups at all, as a baseline.
    let idle = Duration::from_secs(args.secs.min(3));
    let (a0, s0) = (process_cpu(pid), self_cpu());
    tokio::time::sleep(idle).await;
    let (a1, s1) = (process_cpu(pid), self_cpu());
    let mut runs = vec![Run {
        clients: 0,
        lat: Vec::new(),
        errors: 0,
        secs: idle.as_secs_f64(),
        agent_cpu: a0.zip(a1).map(|(a, b)| b - a),
        client_cpu: s1 - s0,
    }];
    for &c in &args.clients {
        runs.push(load(&args, &socket, pid, c).await?);
    }
    println!();
    println!(
        "{:>7} {:>10} {:>11} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11}",
        "clients",
        "lookups",
        "lookups/s",
        "p50 µs",
        "p99 µs",
        "max µs",
        "errors",
        "agent CPU",
        "client CPU"
    );
    for mut r in runs {
        r.lat.sort_unstable();
        let n = r.lat.len();
        let cpu = |c: Option<f64>| match c {
            Some(c) => format!("{:.0}%", 100.0 * c / r.secs),
            None => "?".into(),
        };
        if r.clients == 0 {
            println!(
                "{:>7} {:>10} {:>11} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11}",
                "idle",
                "-",
                "-",
                "-",
                "-",
                "-",
                "-",
                cpu(r.agent_cpu),
                cpu(Some(r.client_cpu)),
            );
            continue;
        }
        println!(
            "{:>7} {:>10} {:>11.0} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11}",
            r.clients,
            n,
            n as f64 / r.secs,
            pct(&r.lat, 50.0),
            pct(&r.lat, 99.0),
            r.lat.last().copied().unwrap_or(0),
            r.errors,
            cpu(r.agent_cpu),
            cpu(Some(r.client_cpu)),
        );
    }
    println!(
        "(registry: {} instances; CPU: % of one core over the measured window; {} instances \
         keep heartbeating)",
        args.apis * args.per_api + args.extra,
        args.apis * args.per_api
    );
    for r in regs {
        r.deregister().await?;
    }
    drop(cluster);
    Ok(())
}

fn lookup_req(a: usize) -> rpb::LookupRequest {
    rpb::LookupRequest {
        selector: format!("api:lbench{a}"),
        horde: String::new(),
        live_only: true,
    }
}

/// `clients` concurrent callers for warm-up + `secs`.
async fn load(
    args: &LookupArgs,
    socket: &std::path::Path,
    pid: u32,
    clients: usize,
) -> anyhow::Result<Run> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(reeve_client(socket).await?);
    }
    let start = Instant::now();
    let from = start + Duration::from_secs(args.warmup);
    let end = from + Duration::from_secs(args.secs);
    let apis = args.apis;
    let mut tasks = Vec::new();
    for (k, mut c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut i = k;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = c.lookup(lookup_req(i % apis)).await.is_ok();
                i += 1;
                if t >= from {
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    errors += usize::from(!ok);
                }
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep_until(from).await;
    let (agent0, self0) = (process_cpu(pid), self_cpu());
    tokio::time::sleep_until(end).await;
    let (agent1, self1) = (process_cpu(pid), self_cpu());
    let mut run = Run {
        clients,
        lat: Vec::new(),
        errors: 0,
        secs: args.secs as f64,
        agent_cpu: agent0.zip(agent1).map(|(a, b)| b - a),
        client_cpu: self1 - self0,
    };
    for t in tasks {
        let (lat, errors) = t.await?;
        run.lat.extend(lat);
        run.errors += errors;
    }
    if run.lat.is_empty() {
        bail!("no lookup completed with {clients} clients");
    }
    println!(
        "lookup: {clients:>2} client(s): {} lookups in {} s",
        run.lat.len(),
        args.secs
    );
    Ok(run)
}
