//! Benchmark of the node plane (issue 15, item 8): what sealing every node-to-node byte costs,
//! against the cleartext path on the same machine.
//!
//! 1. `bulk`: bytes written in 4 MiB pieces (pastiche's piece size) over one connection on
//!    loopback, one client: a plain TCP connection against one `crux_transport` connection
//!    (TLS 1.3 + bloc proof, `NodeStream`). MB/s, and CPU seconds per GB for the sender's
//!    thread, the receiver's thread and the whole process. Each side runs on its own thread
//!    with a current-thread runtime, so neither uses more than one core; a second node-plane
//!    row runs both sides on one thread (one core for the whole pipe).
//! 2. `grpc`: the same pieces as pastiche moves them: a `Pastiche.Pieces` stream of 4 MiB
//!    messages over HTTP/2, cleartext tonic over TCP against `Transport::channel` /
//!    `Transport::incoming`, with the agent's window sizes; and, as experiments, both with the
//!    client accepting 1 MiB HTTP/2 frames (the agent's node server does, its channels do not).
//! 3. `handshake`: time to an established connection, 1000 times one after the other: plain
//!    TCP connect against `Transport::connect` (TCP connect + TLS 1.3 with Ed25519 raw public
//!    keys + bloc proof both ways). min / median / p99 / max, and CPU per handshake each side.
//! 4. `suite`: the cipher suite the node plane negotiates, read from the ServerHello on the
//!    wire through a relay (and, beside it, what a service endpoint negotiates).
//! 5. `aead`: the suites' AEADs alone in `ring` on one core over 16 KiB records: the ceiling.
//!
//! Figures only: nothing is asserted about speed. MB/s and GB are decimal (10^6, 10^9 bytes).

mod bulk;
mod crypto;
mod grpc;
mod handshake;
mod suite;

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use crux_proto::flock::NodeId;
use crux_transport::{BlocKeys, NodeIdentity, Transport, TransportConfig};
use nix::sys::resource::{getrusage, UsageWho};

/// The clock, for measurements (the flock core may not read it; a bench may).
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

fn usage(who: UsageWho) -> Duration {
    match getrusage(who) {
        Ok(u) => {
            let (a, b) = (u.user_time(), u.system_time());
            let us = (a.tv_sec() + b.tv_sec()) * 1_000_000 + a.tv_usec() + b.tv_usec();
            Duration::from_micros(us.max(0) as u64)
        }
        Err(_) => Duration::ZERO,
    }
}

/// CPU time (user + system) of the calling thread.
pub(crate) fn thread_cpu() -> Duration {
    usage(UsageWho::RUSAGE_THREAD)
}

/// CPU time (user + system) of the whole process.
pub(crate) fn process_cpu() -> Duration {
    usage(UsageWho::RUSAGE_SELF)
}

/// Two transports that list each other (node ids 1 and 2) and hold one bloc key: two nodes of
/// one flock.
pub(crate) fn pair() -> anyhow::Result<(Transport, Transport)> {
    let make = || -> anyhow::Result<Transport> {
        let t = Transport::new(NodeIdentity::generate()?, TransportConfig::default())?;
        t.set_bloc_keys(BlocKeys::new(vec![(7, [0x5a; 32])]));
        Ok(t)
    };
    let (a, b) = (make()?, make()?);
    let listed = [(NodeId(1), a.public_key()), (NodeId(2), b.public_key())];
    a.set_peers(listed);
    b.set_peers(listed);
    Ok((a, b))
}

/// Cleartext or sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plane {
    /// Plain TCP.
    Tcp,
    /// Through `crux_transport`.
    Node,
}

/// Runs `f` on a new thread with its own current-thread runtime: at most one core.
pub(crate) fn on_thread<T, F>(
    name: &str,
    f: impl FnOnce() -> F + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>>,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime")?;
            rt.block_on(f())
        })
        .expect("a thread")
}

/// Joins a bench thread.
pub(crate) fn join<T>(h: std::thread::JoinHandle<anyhow::Result<T>>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a bench thread panicked"))?
}

/// Bytes in a buffer that is not all zeros (xorshift), so nothing compresses or short-cuts.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The median of `v` (sorted in place).
pub(crate) fn median<T: Copy + PartialOrd>(v: &mut [T]) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    /// Bytes over one connection, plain TCP vs node plane.
    Bulk,
    /// Pastiche pieces over gRPC, cleartext vs node plane.
    Grpc,
    /// Time to an established connection.
    Handshake,
    /// The negotiated cipher suite.
    Suite,
    /// The AEADs alone (ring, one core): the ceiling.
    Aead,
}

/// Node-plane cost on this machine (issue 15). Prints tables; asserts nothing about speed.
#[derive(Debug, Parser)]
struct Args {
    /// Which benchmarks (comma-separated; default all).
    #[arg(long, value_delimiter = ',', default_values = ["suite", "aead", "bulk", "grpc", "handshake"])]
    only: Vec<Bench>,
    /// MiB sent per bulk run.
    #[arg(long, default_value_t = 2048)]
    bulk_mib: u64,
    /// Piece size in MiB (pastiche's is 4).
    #[arg(long, default_value_t = 4)]
    piece_mib: usize,
    /// Receiver's read buffer in KiB (raw bulk).
    #[arg(long, default_value_t = 4096)]
    read_kib: usize,
    /// Bulk runs per path (the median is printed, and every run).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Handshakes timed per path (after 50 not timed).
    #[arg(long, default_value_t = 1000)]
    handshakes: usize,
}

fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let flags: Vec<&str> = info
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has: Vec<&str> = ["aes", "pclmulqdq", "avx2", "vaes", "vpclmulqdq", "avx512f"]
        .into_iter()
        .filter(|f| flags.contains(f))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores, CPU flags: {}", has.join(" "))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("node plane cost — {}", cpu_line());
    println!(
        "load average before: {} (other work on the machine slows the MB/s and ms columns; \
         the CPU columns are this process's own)",
        loadavg()
    );
    if cfg!(debug_assertions) {
        println!("WARNING: a debug build; run with --release for figures");
    }
    let piece = args.piece_mib << 20;
    let bytes = args.bulk_mib << 20;
    for b in &args.only {
        println!();
        match b {
            Bench::Suite => suite::report()?,
            Bench::Aead => crypto::report(),
            Bench::Bulk => bulk::report(bytes, piece, args.read_kib << 10, args.repeats)?,
            Bench::Grpc => grpc::report(bytes, piece, args.repeats)?,
            Bench::Handshake => handshake::report(args.handshakes, 50)?,
        }
    }
    println!();
    println!("load average after: {}", loadavg());
    Ok(())
}
