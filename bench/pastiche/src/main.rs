//! Benchmarks of pastiche (issue 6), on real `crux agent` processes on loopback:
//!
//! 1. `pull`: a 1 GiB pull between two agents, against a plain TCP copy of the same file on the
//!    same machine (read file, send over one loopback connection, write file, fsync). Median of
//!    `--repeats` runs each, interleaved.
//! 2. `swarm`: time for all of N nodes (8) to hold a 256 MiB blob put on node 1 (N-1 concurrent
//!    `Get`s), against one single pull of it; and where each puller got its pieces.
//! 3. `sha`: SHA-256 throughput of `sha2` as pastiche uses it (4 MiB pieces), and whether the CPU
//!    has the SHA extensions.
//!
//! A pull is timed through the agent's local `Cache` API: from the `Get` call to its first
//! message, which the agent sends once the blob is verified (every piece, then the whole digest),
//! fsynced and renamed into its store. `crux pastiche get -o FILE` also copies the blob out of
//! the store into FILE (another read, write and fsync); one such run is reported beside.
//!
//! Everything lives under one temp dir, removed at the end (and on SIGINT/SIGTERM, after killing
//! the agents this program started). Figures only: no assertion on speed.

mod node;
mod sha;
mod tcp;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use crux_tests::cluster::Cluster;
use rand::{RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};

use node::Pulled;

/// The clock, for measurements and deadlines (the flock core may not read it; a bench may).
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

const MIB: u64 = 1 << 20;
const PIECE: u64 = crux_pastiche::PIECE_SIZE;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    /// 1 GiB pull vs a plain TCP copy.
    Pull,
    /// N nodes pulling one blob at once vs one pull.
    Swarm,
    /// SHA-256 throughput.
    Sha,
}

/// Pastiche benchmarks on loopback (issue 6). Prints tables; asserts nothing about speed.
#[derive(Debug, Parser)]
struct Args {
    /// The `crux` binary (default: `crux` beside this executable; build it with --release).
    #[arg(long)]
    crux: Option<PathBuf>,
    /// Parent of the temp dir (default: $TMPDIR or /tmp).
    #[arg(long)]
    tmp: Option<PathBuf>,
    /// Which benchmarks to run.
    #[arg(long, value_delimiter = ',', default_value = "sha,pull,swarm")]
    only: Vec<Bench>,
    /// Blob size of the pull benchmark, MiB.
    #[arg(long, default_value_t = 1024)]
    pull_mib: u64,
    /// Blob size of the swarm benchmark, MiB.
    #[arg(long, default_value_t = 256)]
    swarm_mib: u64,
    /// Nodes of the swarm benchmark (one puts, the others get).
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Runs of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Bytes hashed by the SHA-256 benchmark, MiB.
    #[arg(long, default_value_t = 1024)]
    sha_mib: u64,
    /// Timing preset of the agents.
    #[arg(long, default_value = "local")]
    preset: String,
}

/// The agents this program started, killed by pid on SIGINT/SIGTERM (the cluster's own drop
/// kills them otherwise), and the temp dir to remove then.
#[derive(Clone, Debug)]
struct Guard {
    pids: Arc<Mutex<Vec<i32>>>,
}

impl Guard {
    fn track(&self, c: &Cluster) {
        let mut p = self.pids.lock().unwrap_or_else(|e| e.into_inner());
        p.clear();
        p.extend(c.agents.iter().filter_map(|a| a.pid()).map(|p| p as i32));
    }

    fn untrack(&self) {
        self.pids.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// On SIGINT or SIGTERM: SIGKILL to the tracked agents, remove `root`, exit 130.
    fn on_signal(&self, rt: &tokio::runtime::Runtime, root: PathBuf) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let _enter = rt.enter();
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let pids = self.pids.clone();
        rt.spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            for pid in pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_dir_all(&root);
            eprintln!(
                "interrupted: killed the agents started here, removed {}",
                root.display()
            );
            std::process::exit(130);
        });
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    ensure!(
        (2..=200).contains(&args.nodes),
        "--nodes must be in 2..=200"
    );
    let crux = match &args.crux {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the executable's dir")?
            .join("crux"),
    };
    let runs_agents = args.only.iter().any(|b| *b != Bench::Sha);
    if runs_agents {
        ensure!(
            crux.is_file(),
            "no crux binary at {} (cargo build --release -p crux-agent, or --crux PATH)",
            crux.display()
        );
    }
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("crux-pastiche-bench-");
    let root = match &args.tmp {
        Some(parent) => tmp.tempdir_in(parent)?,
        None => tmp.tempdir()?,
    };
    // The clusters' own temp dirs go inside ours, so that nothing outlives this run (a cluster
    // keeps its dir when a panic unwinds through it; ours is removed all the same).
    tempfile::env::override_temp_dir(root.path())
        .map_err(|p| anyhow::anyhow!("temp dir already set to {}", p.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let guard = Guard {
        pids: Arc::default(),
    };
    guard.on_signal(&rt, root.path().to_path_buf())?;

    machine();
    println!("temp dir: {}", root.path().display());
    if runs_agents {
        println!("crux: {}", crux.display());
    }
    println!();
    if args.only.contains(&Bench::Sha) {
        sha_bench(&args);
    }
    if args.only.contains(&Bench::Pull) {
        pull_bench(&args, &crux, root.path(), &rt, &guard)?;
    }
    if args.only.contains(&Bench::Swarm) {
        swarm_bench(&args, &crux, root.path(), &rt, &guard)?;
    }
    drop(rt);
    let path = root.path().to_path_buf();
    root.close()
        .with_context(|| format!("removing {}", path.display()))?;
    Ok(())
}

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "machine: {model}, {cpus} CPUs, load average {}",
        load.join(" ")
    );
}

/// MB/s (10^6 bytes per second).
fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Refuses to start when the file system of `dir` has less than `need` bytes free (+1 GiB).
fn check_disk(dir: &Path, need: u64) -> anyhow::Result<()> {
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .context("running df")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let free_kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|f| f.parse().ok())
        .with_context(|| format!("cannot read df output: {text}"))?;
    let free = free_kib * 1024;
    if free < need + 1024 * MIB {
        bail!(
            "{} has {} MiB free; this benchmark needs {} MiB (+1 GiB spare)",
            dir.display(),
            free / MIB,
            need / MIB
        );
    }
    Ok(())
}

/// Writes `size` pseudo-random bytes (seeded) to `path`, fsynced.
fn write_random(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// `sha256:<hex>` of a file.
fn file_digest(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cluster of `n` agents, started, agreed on members and leader.
fn cluster(
    args: &Args,
    crux: &Path,
    id: u8,
    n: usize,
    guard: &Guard,
) -> anyhow::Result<(Cluster, BTreeMap<String, usize>)> {
    let mut c = Cluster::new(crux, id, n, &args.preset);
    for k in 1..=n {
        // Quieter logs than the test default (which logs every flock message).
        let config = c.agent(k).config();
        let text = std::fs::read_to_string(&config)?.replace(
            "log_level = \"info,crux_flock=debug\"",
            "log_level = \"info\"",
        );
        std::fs::write(&config, text)?;
    }
    c.start_all();
    guard.track(&c);
    let all: Vec<usize> = (1..=n).collect();
    let start = now();
    c.stable_agreement(&all, Duration::from_secs(1), Duration::from_secs(120));
    let ids = node::node_ids(&c)?;
    println!(
        "{n} agents on {}..{} agreed in {} s",
        c.agent(1).addr,
        c.agent(n).addr,
        secs(now().duration_since(start))
    );
    Ok((c, ids))
}

/// Checks a pull: the whole blob, nothing resumed, and the pieces add up.
fn check_pulled(p: &Pulled, size: u64) -> anyhow::Result<()> {
    ensure!(p.size == size, "pulled {} bytes, want {size}", p.size);
    let pieces: u32 = p.sources.values().sum();
    ensure!(
        pieces as u64 == size.div_ceil(PIECE),
        "pieces received {pieces}, want {} ({:?})",
        size.div_ceil(PIECE),
        p.sources
    );
    ensure!(p.resumed == 0, "resumed {} pieces", p.resumed);
    Ok(())
}

fn sha_bench(args: &Args) {
    let r = sha::run(args.sha_mib * MIB, PIECE as usize);
    println!(
        "## 3. SHA-256 (sha2 0.10, {} MiB in 4 MiB pieces)\n",
        r.bytes / MIB
    );
    let p = mbps(r.bytes, r.pieces);
    let w = mbps(r.bytes, r.whole);
    println!("| hash | seconds | MB/s |");
    println!("|---|---:|---:|");
    println!(
        "| each piece (`crux_pastiche::sha256`) | {} | {p:.0} |",
        secs(r.pieces)
    );
    println!(
        "| whole blob (one `Sha256`, piece by piece) | {} | {w:.0} |",
        secs(r.whole)
    );
    println!(
        "| both (what a pull computes per byte) | {} | {:.0} |",
        secs(r.pieces + r.whole),
        mbps(r.bytes, r.pieces + r.whole)
    );
    println!(
        "\nSHA-NI: /proc/cpuinfo sha_ni = {}, is_x86_feature_detected!(\"sha\") = {} \
         (sha2 0.10 picks its SHA-NI backend at run time when the CPU has it)\n",
        r.cpuinfo_sha_ni, r.detected_sha
    );
}

fn pull_bench(
    args: &Args,
    crux: &Path,
    root: &Path,
    rt: &tokio::runtime::Runtime,
    guard: &Guard,
) -> anyhow::Result<()> {
    let size = args.pull_mib * MIB;
    // The source file and node 1's blob, then node 2's blob and an output file at most.
    check_disk(root, 3 * size)?;
    println!(
        "## 1. {} MiB pull between two agents vs a TCP copy\n",
        args.pull_mib
    );
    let (c, ids) = cluster(args, crux, 1, 2, guard)?;
    let src = root.join("pull-src.bin");
    write_random(&src, size, 1)?;
    let (digest, put_took) = node::put(&c, 1, &src)?;
    std::fs::remove_file(&src)?;
    println!(
        "put on node1: {digest}, {} s ({:.0} MB/s: read, hash, write, fsync)",
        secs(put_took),
        mbps(size, put_took)
    );
    let hex_part = digest.trim_start_matches("sha256:");
    let blob = c
        .agent(1)
        .dir
        .join("pastiche")
        .join("blobs")
        .join("sha256")
        .join(hex_part);
    ensure!(
        std::fs::metadata(&blob).map(|m| m.len()).ok() == Some(size),
        "no blob of {size} bytes at {}",
        blob.display()
    );
    let tcp_out = root.join("tcp-copy.out");
    let mut tcp_runs = Vec::new();
    let mut pull_runs = Vec::new();
    println!(
        "\n| run | TCP copy s | TCP MB/s | TCP CPU s | pastiche pull s | pastiche MB/s | \
         CPU s node1 (serves) | CPU s node2 (pulls) | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in 1..=args.repeats {
        // The baseline copies node 1's blob file itself: the same bytes, from the same disk.
        let cpu0 = node::cpu(None);
        let (t, n) = tcp::copy(&blob, &tcp_out)?;
        let tcp_cpu = node::cpu(None).saturating_sub(cpu0);
        std::fs::remove_file(&tcp_out)?;
        ensure!(n == size, "the TCP copy moved {n} bytes, want {size}");
        let (a0, b0) = (node::cpu_of(&c, [1]), node::cpu_of(&c, [2]));
        let p = rt.block_on(node::get_when_held(
            &c.agent(2).socket,
            &digest,
            &ids,
            Duration::from_secs(30),
        ))?;
        let (a1, b1) = (node::cpu_of(&c, [1]), node::cpu_of(&c, [2]));
        check_pulled(&p, size)?;
        ensure!(
            p.sources.keys().all(|k| *k == 1),
            "node2 pulled from {:?}, not only node1",
            p.sources
        );
        node::rm(&c, 2, &digest)?;
        println!(
            "| {run} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} |",
            secs(t),
            mbps(size, t),
            secs(tcp_cpu),
            secs(p.took),
            mbps(size, p.took),
            secs(a1.saturating_sub(a0)),
            secs(b1.saturating_sub(b0)),
            t.as_secs_f64() / p.took.as_secs_f64()
        );
        tcp_runs.push(t);
        pull_runs.push(p.took);
    }
    let (t, p) = (median(tcp_runs), median(pull_runs));
    println!(
        "| median | {} | {:.0} | | {} | {:.0} | | | **{:.2}** |",
        secs(t),
        mbps(size, t),
        secs(p),
        mbps(size, p),
        t.as_secs_f64() / p.as_secs_f64()
    );
    println!(
        "\nratio = pastiche MB/s / TCP MB/s (goal ≥ 0.8). The pull includes the steward lookup, \
         SHA-256 of every piece and of the whole blob, the pull journal and its fsyncs. \
         CPU s: user + system time of the process(es) during the measurement (TCP: both ends)."
    );

    // The user's view, once: `crux pastiche get -o FILE` (pull, then copy out, fsync, rename).
    let out = root.join("get.out");
    let (json, took) = node::cli_get(&c, 2, &digest, &out)?;
    let same = file_digest(&out)? == digest;
    std::fs::remove_file(&out)?;
    node::rm(&c, 2, &digest)?;
    ensure!(
        same,
        "the bytes of `crux pastiche get -o` do not hash to {digest}"
    );
    println!(
        "\n`crux pastiche get {digest:.20}… -o FILE --json` on node2 (pull + copy out of the store + \
         fsync): {} s, {:.0} MB/s; output hashes to the digest; sources {}\n",
        secs(took),
        mbps(size, took),
        json["sources"]
    );
    guard.untrack();
    drop(c);
    Ok(())
}

/// A puller of a swarm run: its index, its pull, when it was done (since the start of the run).
type Done = (usize, Pulled, Duration);

fn swarm_bench(
    args: &Args,
    crux: &Path,
    root: &Path,
    rt: &tokio::runtime::Runtime,
    guard: &Guard,
) -> anyhow::Result<()> {
    let n = args.nodes;
    let size = args.swarm_mib * MIB;
    let pieces = size.div_ceil(PIECE) as u32;
    check_disk(root, (n as u64 + 1) * size)?;
    println!(
        "## 2. {n} nodes all holding a {} MiB blob put on node1 ({} concurrent gets) vs one pull\n",
        args.swarm_mib,
        n - 1
    );
    let (c, ids) = cluster(args, crux, 2, n, guard)?;
    let src = root.join("swarm-src.bin");
    write_random(&src, size, 2)?;
    let (digest, _) = node::put(&c, 1, &src)?;
    std::fs::remove_file(&src)?;
    println!("put on node1: {digest} ({pieces} pieces)\n");

    let mut singles = Vec::new();
    let mut single_cpu = Vec::new();
    for _ in 0..args.repeats {
        let cpu0 = node::cpu_of(&c, 1..=n);
        let p = rt.block_on(node::get_when_held(
            &c.agent(2).socket,
            &digest,
            &ids,
            Duration::from_secs(30),
        ))?;
        single_cpu.push(node::cpu_of(&c, 1..=n).saturating_sub(cpu0));
        check_pulled(&p, size)?;
        node::rm(&c, 2, &digest)?;
        singles.push(p.took);
    }

    let mut swarms: Vec<(Duration, Vec<Done>)> = Vec::new();
    let mut swarm_cpu = Vec::new();
    for _ in 0..args.repeats {
        let cpu0 = node::cpu_of(&c, 1..=n);
        let start = now();
        let got: Vec<anyhow::Result<Done>> = rt.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for k in 2..=n {
                let socket = c.agent(k).socket.clone();
                let (digest, ids) = (digest.clone(), ids.clone());
                tasks.spawn(async move {
                    let p = node::get_when_held(&socket, &digest, &ids, Duration::from_secs(60))
                        .await?;
                    Ok((k, p, now().duration_since(start)))
                });
            }
            let mut got = Vec::new();
            while let Some(r) = tasks.join_next().await {
                got.push(r.map_err(anyhow::Error::from).and_then(|r| r));
            }
            got
        });
        let mut got = got.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
        let all = now().duration_since(start);
        swarm_cpu.push(node::cpu_of(&c, 1..=n).saturating_sub(cpu0));
        got.sort_by_key(|(k, _, _)| *k);
        for (k, p, _) in &got {
            check_pulled(p, size).with_context(|| format!("node{k}"))?;
            ensure!(
                node::holds(&c, *k, &digest, size).map_err(anyhow::Error::msg)?,
                "node{k} does not list {digest} after its get"
            );
        }
        for k in 2..=n {
            node::rm(&c, k, &digest)?;
        }
        swarms.push((all, got));
    }

    println!(
        "| run | one pull (node2) s | its CPU s (all agents) | all {n} hold s | their CPU s \
         (all agents) | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for (i, (single, (all, _))) in singles.iter().zip(&swarms).enumerate() {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} |",
            i + 1,
            secs(*single),
            secs(single_cpu[i]),
            secs(*all),
            secs(swarm_cpu[i]),
            all.as_secs_f64() / single.as_secs_f64()
        );
    }
    let single = median(singles.clone());
    let all = median(swarms.iter().map(|(a, _)| *a).collect());
    println!(
        "| median | {} ({:.0} MB/s) | | {} | | **{:.2}** |",
        secs(single),
        mbps(size, single),
        secs(all),
        all.as_secs_f64() / single.as_secs_f64()
    );
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let per_cpu = median(swarm_cpu.clone()).as_secs_f64() / cores as f64;
    println!(
        "\nratio = time until all {n} hold it / one pull (goal ≤ 2). CPU s: user + system time \
         of all {n} agents during the measurement; the median swarm's CPU over {cores} cores \
         is {per_cpu:.2} s, a floor for its duration on this machine ({:.2} × one pull).\n",
        per_cpu / single.as_secs_f64()
    );

    // Sources of the median swarm run.
    let mut order: Vec<usize> = (0..swarms.len()).collect();
    order.sort_by_key(|i| swarms[*i].0);
    let (all, got) = &swarms[order[order.len() / 2]];
    println!(
        "Sources of the median run ({} s): pieces each puller received, by sender\n",
        secs(*all)
    );
    println!("| puller | done at s | from node1 (putter) | from other pullers | by sender |");
    println!("|---|---:|---:|---:|---|");
    let mut from_others = 0;
    for (k, p, at) in got {
        let putter = p.sources.get(&1).copied().unwrap_or(0);
        let others: u32 = p
            .sources
            .iter()
            .filter(|(s, _)| **s != 1)
            .map(|(_, n)| n)
            .sum();
        if others > 0 {
            from_others += 1;
        }
        let by: Vec<String> = p
            .sources
            .iter()
            .map(|(s, n)| format!("node{s}: {n}"))
            .collect();
        println!(
            "| node{k} | {} | {putter} | {others} | {} |",
            secs(*at),
            by.join(", ")
        );
    }
    let total: u32 = got
        .iter()
        .map(|(_, p, _)| pieces.min(p.sources.values().sum()))
        .sum();
    let from_putter: u32 = got
        .iter()
        .map(|(_, p, _)| p.sources.get(&1).copied().unwrap_or(0))
        .sum();
    println!(
        "\n{from_others} of {} pullers received pieces from another puller; node1 sent \
         {from_putter} of {total} pieces ({:.0} %).\n",
        n - 1,
        100.0 * from_putter as f64 / total.max(1) as f64
    );
    guard.untrack();
    drop(c);
    Ok(())
}
