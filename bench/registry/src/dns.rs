//! DNS benchmark: queries per second one agent answers, latency under that load, and the
//! agent's CPU per 10k queries a second.
//!
//! One real agent (a flock of one) with `apis` × `per_api` instances registered (valid for an
//! hour, so nothing changes during the runs) and its per-source rate limit off
//! (`dns.rate_per_s = 0`: dnsperf sends from one address). Each run: `dnsperf` (Debian) sends
//! `A` and `SRV` questions of the registered apis for `secs` seconds, either as fast as it can
//! with `outstanding` queries in flight, or at a fixed rate; meanwhile a prober in this process
//! sends one `A` question at a time and records each round trip (dnsperf 2.10 prints only the
//! mean and the deviation), and the agent's CPU is read from `/proc`. dnsperf, the prober and the
//! agent share the machine's cores.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_reeve::client::reeve_client;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::common::{self, pct, process_cpu, start_flock_with, wait_until};

/// `registry-bench dns` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DnsArgs {
    /// The crux executable (default: `crux` beside this binary).
    #[arg(long)]
    pub crux: Option<PathBuf>,
    /// The dnsperf executable.
    #[arg(long, default_value = "dnsperf")]
    pub dnsperf: PathBuf,
    /// Apis registered.
    #[arg(long, default_value_t = 100)]
    pub apis: usize,
    /// Instances per api (an A answer holds them all).
    #[arg(long, default_value_t = 10)]
    pub per_api: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Fixed rates to run at (queries a second) after the run at full speed.
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    pub rates: Vec<u32>,
    /// Queries dnsperf keeps in flight.
    #[arg(long, default_value_t = 100)]
    pub outstanding: u32,
}

/// What one run measured.
struct Run {
    name: String,
    qps: f64,
    avg_us: f64,
    lost: u64,
    probe: Vec<u32>,
    agent_cpu: Option<f64>,
    secs: f64,
}

/// Runs the benchmark and prints its table.
pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    let bin = common::crux_bin(args.crux.clone())?;
    let have = std::process::Command::new(&args.dnsperf).arg("-h").output();
    if have.is_err() {
        bail!(
            "no {} (Debian package dnsperf: run dev/setup.sh as root)",
            args.dnsperf.display()
        );
    }
    let t = Instant::now();
    let cluster =
        start_flock_with(&bin, 1, Duration::from_secs(60), "dns.rate_per_s = 0\n").await?;
    let agent = cluster.agent(1);
    let (socket, dns) = (agent.socket.clone(), agent.dns);
    let pid = agent.pid().context("the agent is not running")?;
    println!(
        "dns: 1 agent ({}, pid {pid}, DNS on {dns}) ready in {:.1} s",
        agent.addr,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut c = reeve_client(&socket).await?;
    for a in 0..args.apis {
        for j in 0..args.per_api {
            let addr = format!("10.{}.{}.{}:8080", 1 + a / 250, a % 250, 1 + j);
            let req = common::running(
                &format!("svc{a}"),
                &format!("svc{a}_{j}"),
                &addr,
                Duration::from_secs(3600),
            );
            c.register(req).await?;
        }
    }
    let (apis, want) = (args.apis, args.per_api);
    wait_until(
        "every instance to be live in lookups",
        Duration::from_secs(30),
        Duration::from_millis(50),
        async || {
            let mut c = reeve_client(&socket).await.ok()?;
            for a in 0..apis {
                let r = c
                    .lookup(rpb::LookupRequest {
                        selector: format!("api:svc{a}"),
                        horde: String::new(),
                        live_only: true,
                    })
                    .await
                    .ok()?
                    .into_inner();
                if r.instances.len() != want {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;
    println!(
        "dns: {} instances ({apis} apis × {want}) registered in {:.2} s; an A answer holds {want} \
         addresses, an SRV answer {want} targets with their addresses",
        apis * want,
        t.elapsed().as_secs_f64()
    );
    let queries = cluster.dir().join("dnsperf-queries.txt");
    let text: String = (0..apis)
        .flat_map(|a| {
            [
                format!("svc{a}.service.crux A\n"),
                format!("svc{a}.service.crux SRV\n"),
            ]
        })
        .collect();
    std::fs::write(&queries, text).context("writing the query file")?;

    let mut runs = Vec::new();
    let mut plan: Vec<Option<u32>> = vec![None];
    plan.extend(args.rates.iter().map(|r| Some(*r)));
    for rate in plan {
        runs.push(one_run(&args, dns, pid, &queries, rate, apis).await?);
    }
    println!();
    println!(
        "{:>12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>6} {:>10} {:>16}",
        "run",
        "queries/s",
        "avg µs",
        "p50 µs",
        "p99 µs",
        "probes",
        "lost",
        "agent CPU",
        "CPU per 10k q/s"
    );
    for mut r in runs {
        r.probe.sort_unstable();
        let cpu = r.agent_cpu.map(|c| c / r.secs);
        println!(
            "{:>12} {:>10.0} {:>9.0} {:>9} {:>9} {:>9} {:>6} {:>10} {:>16}",
            r.name,
            r.qps,
            r.avg_us,
            pct(&r.probe, 50.0),
            pct(&r.probe, 99.0),
            r.probe.len(),
            r.lost,
            cpu.map_or("?".into(), |c| format!("{:.0}%", 100.0 * c)),
            cpu.map_or("?".into(), |c| format!(
                "{:.1}% of a core",
                100.0 * c / (r.qps / 10_000.0).max(1e-9)
            )),
        );
    }
    println!(
        "(queries/s, avg: dnsperf; p50/p99: the prober's round trips under that load; CPU: % of \
         one core, of the agent process alone; {} cores here)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    drop(cluster);
    Ok(())
}

async fn one_run(
    args: &DnsArgs,
    dns: SocketAddr,
    pid: u32,
    queries: &std::path::Path,
    rate: Option<u32>,
    apis: usize,
) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new(&args.dnsperf);
    cmd.arg("-s")
        .arg(dns.ip().to_string())
        .arg("-p")
        .arg(dns.port().to_string())
        .arg("-d")
        .arg(queries)
        .arg("-l")
        .arg(args.secs.to_string())
        .arg("-q")
        .arg(args.outstanding.to_string())
        .arg("-t")
        .arg("1")
        .kill_on_drop(true);
    if let Some(r) = rate {
        cmd.arg("-Q").arg(r.to_string());
    }
    let cpu0 = process_cpu(pid);
    let started = Instant::now();
    let perf = cmd.output();
    let until = started + Duration::from_secs(args.secs);
    let probe = probe(dns, apis, until);
    let (out, probe) = tokio::join!(perf, probe);
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = process_cpu(pid);
    let out = out.context("running dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let qps = field("Queries per second").context("dnsperf printed no queries per second")?;
    let avg = field("Average Latency (s)").unwrap_or(0.0);
    let lost = field("Queries lost").unwrap_or(0.0);
    Ok(Run {
        name: match rate {
            None => "full speed".into(),
            Some(r) => format!("{}k q/s", r / 1000),
        },
        qps,
        avg_us: avg * 1e6,
        lost: lost as u64,
        probe: probe?,
        agent_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
        secs,
    })
}

/// One `A` question for `name` with id `id` (no recursion asked).
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Round trips (µs) of one question at a time until `until`, after a second of warm-up.
async fn probe(dns: SocketAddr, apis: usize, until: Instant) -> anyhow::Result<Vec<u32>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(dns).await?;
    let from = Instant::now() + Duration::from_secs(1);
    let mut lat = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut id: u16 = 0;
    while Instant::now() < until {
        id = id.wrapping_add(1);
        let q = a_query(id, &format!("svc{}.service.crux", usize::from(id) % apis));
        let t = Instant::now();
        sock.send(&q).await?;
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let n = sock.recv(&mut buf).await?;
                if n >= 2 && buf[..2] == id.to_be_bytes() {
                    return Ok::<_, std::io::Error>(());
                }
            }
        })
        .await;
        if matches!(got, Ok(Ok(()))) && t >= from {
            lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(lat)
}
