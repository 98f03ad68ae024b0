//! Benchmark 2: how many heartbeating instances one steward sustains, and at what CPU cost.
//!
//! Everything runs in this process, over real gRPC on 127.0.0.1: a [`Steward`] and its
//! [`StewardService`] on a runtime of their own (threads `bench-steward`), and R [`Reeve`]s with
//! their links on another (threads `bench-reeves`), so `/proc/self/task/*/stat` tells the two
//! sides' CPU apart. Each reeve registers I = N / R instances (running, valid for 3 heartbeat
//! intervals by default) and beats every one of them once per interval through [`Reeve::beat`], as the
//! `Heartbeat` call of the local API does; the reeve forwards their validity to the steward in
//! one batch per interval. One more reeve without instances watches the whole table to tell
//! whether any instance turns `unknown`.
//!
//! Per size: the time until all N instances are in every replica, then a steady window with the
//! CPU per second of wall time of each side, `unknown` transitions, and probes: once a second an
//! instance registered on one reeve, the time until every reeve's watch has seen it, and the same
//! for its deregistration.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use crux_proto::flock::NodeId;
use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::{FlockId, Health, RunState};
use crux_reeve::{Reeve, ReeveConfig, Target};
use crux_steward::{Steward, StewardConfig, StewardService};
use crux_transport::Transport;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::common::{self, rss_mib, self_cpu, summary_ms, thread_cpu, wait_until};

const STEWARD_THREADS: &str = "bench-steward";
const REEVE_THREADS: &str = "bench-reeves";
const LEADER: &str = "00000000000000ff";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `registry-bench capacity` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct CapacityArgs {
    /// Total instances, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000,100000")]
    pub sizes: Vec<usize>,
    /// Reeves per run (one value for all, or one per size). Default by size: 10 up to 2k, 20 up
    /// to 20k, 50 up to 60k, 25 above (each holds a full replica in this process).
    #[arg(long, value_delimiter = ',')]
    pub reeves: Vec<usize>,
    /// Seconds of the steady window measured per run.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Heartbeat interval, ms (services beat at it; reeves forward validity at it).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Validity each beat grants, in heartbeat intervals (the client library's default is 3).
    #[arg(long, default_value_t = 3)]
    pub valid_intervals: u32,
    /// Worker threads of each side's runtime.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Register one reeve's instances after another (each once the previous ones are in every
    /// replica) instead of all at once.
    #[arg(long)]
    pub ramp: bool,
    /// The steward server's HTTP/2 keepalive timeout, seconds (the agent's: 20, the reeve's
    /// `KEEPALIVE_TIMEOUT`; 0: no server pings at all). The reeve's own pings (1 s, timeout
    /// 20 s) are not changed.
    #[arg(long, default_value_t = crux_reeve::link::KEEPALIVE_TIMEOUT.as_secs())]
    pub server_keepalive_timeout: u64,
    /// The steward server with hyper's default HTTP/2 windows and frame size instead of the
    /// agent's (8 MiB stream and 32 MiB connection windows, 1 MiB frames).
    #[arg(long)]
    pub server_default_windows: bool,
    /// Longest wait for all instances to reach every replica, seconds.
    #[arg(long, default_value_t = 45)]
    pub register_timeout: u64,
}

/// One run's figures.
struct Row {
    n: usize,
    r: usize,
    reg_secs: Option<f64>,
    steward_cpu: f64,
    reeves_cpu: f64,
    other_cpu: f64,
    total_cpu: f64,
    unknown_reg: u64,
    unknown_steady: u64,
    not_running_end: usize,
    table: usize,
    probe_put: Vec<Duration>,
    probe_del: Vec<Duration>,
    probe_fail: usize,
    rss: f64,
}

/// Runs every size and prints the table.
pub fn run(args: &CapacityArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (k, &n) in args.sizes.iter().enumerate() {
        let r = match args.reeves.len() {
            0 => default_reeves(n),
            1 => args.reeves[0],
            _ => *args
                .reeves
                .get(k)
                .context("--reeves: give one value, or one per size")?,
        };
        if r == 0 || n < r {
            bail!("{n} instances on {r} reeves: need at least one instance per reeve");
        }
        let row = run_one(args, n, r)?;
        print_row(&row, rows.is_empty());
        rows.push(row);
    }
    println!(
        "(CPU: % of one core over the {} s steady window; reg: s until all N instances, \
         registered {}, were in every replica; unknown: instances seen turning unknown during registration / the steady \
         window; probe: ms from Register (Deregister) on one reeve until every reeve's Watch had \
         it, p50 / p99 / max)",
        args.secs,
        if args.ramp {
            "one reeve after another"
        } else {
            "all at once"
        }
    );
    Ok(())
}

/// Reeves for `n` instances when none are given. Every in-process reeve holds a full replica
/// (R × N records in this one process), so the largest sizes get fewer.
fn default_reeves(n: usize) -> usize {
    match n {
        0..=2_000 => 10,
        2_001..=20_000 => 20,
        20_001..=60_000 => 50,
        _ => 25,
    }
}

fn print_row(row: &Row, header: bool) {
    if header {
        println!();
        println!(
            "{:>7} {:>4} {:>6} {:>7} {:>8} {:>7} {:>6} {:>6} {:>8} {:>8} {:>7} {:>27} {:>27} {:>7}",
            "N",
            "R",
            "I/R",
            "reg s",
            "steward",
            "reeves",
            "other",
            "total",
            "unknown",
            "!run@end",
            "table",
            "probe register ms",
            "probe deregister ms",
            "RSS MiB"
        );
    }
    let pctc = |c: f64| format!("{:.1}%", c);
    let mut put = row.probe_put.clone();
    let mut del = row.probe_del.clone();
    println!(
        "{:>7} {:>4} {:>6} {:>7} {:>8} {:>7} {:>6} {:>6} {:>8} {:>8} {:>7} {:>27} {:>27} {:>7.0}{}",
        row.n,
        row.r,
        row.n / row.r,
        row.reg_secs
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "timeout".into()),
        pctc(row.steward_cpu),
        pctc(row.reeves_cpu),
        pctc(row.other_cpu),
        pctc(row.total_cpu),
        format!("{}/{}", row.unknown_reg, row.unknown_steady),
        row.not_running_end,
        row.table,
        summary_ms(&mut put),
        summary_ms(&mut del),
        row.rss,
        if row.probe_fail > 0 {
            format!("  ({} probes timed out)", row.probe_fail)
        } else {
            String::new()
        }
    );
}

fn runtime(name: &str, threads: usize) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .context("starting a runtime")
}

/// The steward side: its runtime, the steward and the server's stop.
struct StewardSide {
    rt: Runtime,
    steward: Arc<Steward>,
    addr: SocketAddr,
    stop: CancellationToken,
    _current: watch::Sender<Option<Arc<Steward>>>,
}

/// The node plane of the bench: the steward's transport lists every reeve, each reeve's lists
/// the steward (as the flock would list them all), all over loopback TLS as in the agent.
struct Plane {
    steward: Transport,
    reeves: Vec<Transport>,
}

impl Plane {
    fn new(nodes: &[String]) -> anyhow::Result<Plane> {
        let steward = Transport::generate()?;
        let reeves = nodes
            .iter()
            .map(|_| Transport::generate())
            .collect::<Result<Vec<_>, _>>()?;
        let leader = NodeId(u64::from_str_radix(LEADER, 16)?);
        let mut listed = vec![(leader, steward.public_key())];
        for (id, t) in nodes.iter().zip(&reeves) {
            listed.push((NodeId(u64::from_str_radix(id, 16)?), t.public_key()));
        }
        steward.set_peers(listed.iter().copied());
        for t in &reeves {
            t.set_peers(listed.iter().copied());
        }
        Ok(Plane { steward, reeves })
    }
}

fn start_steward(args: &CapacityArgs, plane: &Plane) -> anyhow::Result<StewardSide> {
    let rt = runtime(STEWARD_THREADS, args.threads)?;
    let stop = CancellationToken::new();
    let transport = plane.steward.clone();
    let keepalive = args.server_keepalive_timeout;
    let default_windows = args.server_default_windows;
    let (steward, addr, current) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(LOOPBACK, 0)).await?;
        let addr = listener.local_addr()?;
        let config = StewardConfig {
            grace: Duration::from_secs(60),
            ..StewardConfig::default()
        };
        let steward = Steward::start(
            FlockId {
                leader: LEADER.into(),
                term: 1,
            },
            addr.to_string(),
            &config,
            Vec::new(),
        );
        let (current, rx) = watch::channel(Some(steward.clone()));
        // As the agent's node gRPC server (agent/src/steward.rs), unless asked for hyper's
        // defaults (64 KiB windows and frames of 16 KiB).
        let (stream_window, conn_window, frame) = if default_windows {
            (None, None, None)
        } else {
            (Some(8 << 20), Some(32 << 20), Some(1 << 20))
        };
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(stream_window)
            .initial_connection_window_size(conn_window)
            .max_frame_size(frame)
            .http2_keepalive_interval((keepalive > 0).then_some(Duration::from_secs(1)))
            .http2_keepalive_timeout(Some(Duration::from_secs(keepalive.max(1))))
            .add_service(StewardService::new(rx).into_server())
            .serve_with_incoming_shutdown(
                transport.incoming(listener, stop.clone()),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(server);
        Ok::<_, anyhow::Error>((steward, addr, current))
    })?;
    Ok(StewardSide {
        rt,
        steward,
        addr,
        stop,
        _current: current,
    })
}

/// What the observing reeve's whole-table watch has seen.
#[derive(Debug, Default)]
struct Observed {
    state: HashMap<String, i32>,
    not_running: usize,
    /// Transitions into `unknown`.
    went_unknown: u64,
}

impl Observed {
    fn apply(&mut self, ev: rpb::WatchEvent) {
        let running = RunState::Running as i32;
        if ev.snapshot {
            self.state.clear();
            self.not_running = 0;
        }
        for i in ev.remove {
            if let Some(s) = self.state.remove(&i.id) {
                self.not_running -= usize::from(s != running);
            }
        }
        for i in ev.put {
            let old = self.state.insert(i.id.clone(), i.state);
            if old.is_some_and(|s| s != running) {
                self.not_running -= 1;
            }
            if i.state != running {
                self.not_running += 1;
            }
            if i.state == RunState::Unknown as i32 && old != Some(i.state) {
                self.went_unknown += 1;
            }
        }
    }
}

/// A probe's arrival in one reeve's watch.
struct Seen {
    reeve: usize,
    id: String,
    put: bool,
    at: Instant,
}

fn run_one(args: &CapacityArgs, n: usize, r: usize) -> anyhow::Result<Row> {
    let node = |k: usize| format!("{:016x}", k + 1);
    // Reeves 0..r hold instances; reeve r observes.
    let nodes: Vec<String> = (0..=r).map(node).collect();
    let plane = Plane::new(&nodes)?;
    let steward = start_steward(args, &plane)?;
    let reeves_rt = runtime(REEVE_THREADS, args.threads)?;
    let shutdown = CancellationToken::new();
    let result = reeves_rt.block_on(scenario(
        args,
        n,
        r,
        &nodes,
        &plane,
        &steward,
        shutdown.clone(),
    ));
    shutdown.cancel();
    steward.steward.stop();
    steward.stop.cancel();
    reeves_rt.shutdown_timeout(Duration::from_secs(5));
    steward.rt.shutdown_timeout(Duration::from_secs(5));
    result
}

async fn scenario(
    args: &CapacityArgs,
    n: usize,
    r: usize,
    nodes: &[String],
    plane: &Plane,
    steward: &StewardSide,
    shutdown: CancellationToken,
) -> anyhow::Result<Row> {
    let hb = Duration::from_millis(args.heartbeat_ms);
    let valid = hb * args.valid_intervals.max(1);
    let target = Target {
        leader: LEADER.into(),
        term: 1,
        steward: steward.addr,
    };
    let mut targets = Vec::new();
    // Declared after `targets`, so dropped before them: links stop before their targets go.
    let _stop_links = shutdown.clone().drop_guard();
    let mut reeves = Vec::new();
    for (k, id) in nodes.iter().enumerate() {
        let (tx, rx) = watch::channel(Some(target.clone()));
        let reeve = Reeve::new(
            ReeveConfig {
                node: id.clone(),
                boot: k as u64 + 1,
                local_ip: Some(LOOPBACK),
                transport: plane.reeves[k].clone(),
                heartbeat_interval: hb,
                grace: Duration::from_secs(60),
                netid: SocketAddr::new(LOOPBACK, 0).to_string(),
            },
            rx,
        );
        tokio::spawn(crux_reeve::link::run(reeve.clone(), shutdown.clone()));
        targets.push(tx);
        reeves.push(reeve);
    }
    let all = reeves.clone();
    wait_until(
        "every reeve linked to the steward",
        Duration::from_secs(30),
        Duration::from_millis(10),
        async || {
            all.iter()
                .all(|r| r.status().flock_id.is_some())
                .then_some(())
        },
    )
    .await?;

    // The observer: a whole-table watch on the reeve without instances.
    let observed = Arc::new(Mutex::new(Observed::default()));
    {
        let mut events = reeves[r]
            .watch(rpb::WatchRequest::default())
            .map_err(|s| anyhow!("watch: {}", s.message()))?;
        let observed = observed.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                observed.lock().unwrap_or_else(|p| p.into_inner()).apply(ev);
            }
        });
    }
    // The probes' watches, one per instance-holding reeve.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    for (k, reeve) in reeves.iter().take(r).enumerate() {
        let mut events = reeve
            .watch(rpb::WatchRequest {
                selector: "api:probe".into(),
                ..Default::default()
            })
            .map_err(|s| anyhow!("watch: {}", s.message()))?;
        let tx = seen_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                let at = Instant::now();
                for (put, list) in [(true, ev.put), (false, ev.remove)] {
                    for i in list {
                        let _ = tx.send(Seen {
                            reeve: k,
                            id: i.id,
                            put,
                            at,
                        });
                    }
                }
            }
        });
    }
    drop(seen_tx);

    // Registration, then one beat per instance per interval, spread over the interval.
    let t_reg = Instant::now();
    let per = n / r;
    let mut go = Vec::new();
    for (k, reeve) in reeves.iter().take(r).enumerate() {
        let count = per + usize::from(k < n % r);
        let reeve = reeve.clone();
        let stop = shutdown.clone();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        go.push((count, go_tx));
        tokio::spawn(async move {
            if go_rx.await.is_err() {
                return;
            }
            let mut beats = Vec::with_capacity(count);
            for j in 0..count {
                let api = format!("svc{}", j % 100);
                let req = common::running(
                    &api,
                    &format!("{api}_{k}_{j}"),
                    &format!("127.0.0.1:{}", 1024 + j),
                    valid,
                );
                match reeve.register(req) {
                    Ok(resp) => beats.push(rpb::HeartbeatRequest {
                        id: resp.id,
                        token: resp.token,
                        state: RunState::Running as i32,
                        health: Health::Healthy as i32,
                        valid_for_ms: valid.as_millis() as u64,
                    }),
                    Err(e) => eprintln!("capacity: register failed: {}", e.message()),
                }
            }
            let phase = hb.mul_f64(k as f64 / r as f64);
            let mut every = tokio::time::interval_at(Instant::now() + phase, hb);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {
                        for b in &beats {
                            let _ = reeve.beat(b);
                        }
                    }
                }
            }
        });
    }
    let progress = {
        let all = reeves.clone();
        let obs = observed.clone();
        let steward = steward.steward.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let prefixes = [STEWARD_THREADS, REEVE_THREADS];
            let cpu0 = thread_cpu(&prefixes);
            let mut every = tokio::time::interval_at(
                Instant::now() + Duration::from_secs(5),
                Duration::from_secs(5),
            );
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                let (seen, not_running, unknown) = {
                    let o = obs.lock().unwrap_or_else(|p| p.into_inner());
                    (o.state.len(), o.not_running, o.went_unknown)
                };
                let min = all.iter().map(|r| r.replica_len()).min().unwrap_or(0);
                let cpu = thread_cpu(&prefixes);
                eprintln!(
                    "capacity: N={n} +{:.0}s: steward table {}, observer {seen} ({not_running} \
                     not running, {unknown} went unknown), smallest replica {min}, CPU s \
                     steward {:.1} reeves {:.1}, RSS {:.0} MiB",
                    t_reg.elapsed().as_secs_f64(),
                    steward.len(),
                    cpu[0] - cpu0[0],
                    cpu[1] - cpu0[1],
                    rss_mib()
                );
            }
        })
    };
    // Burst: every reeve registers at once (as after a steward failover, when every reeve sends
    // all it holds). Ramp: one reeve after another, each once the previous one's instances are
    // in every replica.
    let mut ramp_failed = None;
    let mut total = 0;
    for (count, go_tx) in go {
        let _ = go_tx.send(());
        if !args.ramp {
            continue;
        }
        total += count;
        let all = reeves.clone();
        let obs = observed.clone();
        let reached = wait_until(
            "a reeve's instances in every replica",
            Duration::from_secs(args.register_timeout),
            Duration::from_millis(5),
            async || {
                let o = obs.lock().unwrap_or_else(|p| p.into_inner());
                (o.state.len() >= total && all.iter().all(|r| r.replica_len() >= total))
                    .then_some(())
            },
        )
        .await;
        if let Err(e) = reached {
            ramp_failed = Some(e);
            break;
        }
    }
    let all = reeves.clone();
    let obs = observed.clone();
    let reg_secs = match ramp_failed {
        Some(e) => Err(anyhow!("ramp stopped at {total} instances: {e}")),
        None => {
            wait_until(
                "every instance in every replica",
                Duration::from_secs(args.register_timeout),
                Duration::from_millis(10),
                async || {
                    let o = obs.lock().unwrap_or_else(|p| p.into_inner());
                    (o.state.len() >= n
                        && o.not_running == 0
                        && all.iter().all(|r| r.replica_len() >= n))
                    .then(|| t_reg.elapsed().as_secs_f64())
                },
            )
            .await
        }
    };
    progress.abort();
    let reg_secs = match reg_secs {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("capacity: N={n}: {e}");
            diagnose(&reeves, &plane.reeves[r], steward.addr).await;
            None
        }
    };
    let unknown_reg = observed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .went_unknown;

    // The steady window.
    let prefixes = [STEWARD_THREADS, REEVE_THREADS];
    let (threads0, total0) = (thread_cpu(&prefixes), self_cpu());
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(args.secs);
    let mut probe_put = Vec::new();
    let mut probe_del = Vec::new();
    let mut probe_fail = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut i = 0;
    loop {
        tick.tick().await;
        if Instant::now() + Duration::from_millis(500) >= end {
            break;
        }
        let reeve = &reeves[i % r];
        let t = Instant::now();
        let resp = reeve
            .register(common::running(
                "probe",
                &format!("probe_{i}"),
                "127.0.0.1:9",
                Duration::from_secs(60),
            ))
            .map_err(|s| anyhow!("probe register: {}", s.message()))?;
        match all_seen(&mut seen_rx, &resp.id, true, r, t).await {
            Some(d) => probe_put.push(d),
            None => probe_fail += 1,
        }
        let t = Instant::now();
        reeve
            .deregister(&rpb::DeregisterRequest {
                id: resp.id.clone(),
                token: resp.token,
            })
            .map_err(|s| anyhow!("probe deregister: {}", s.message()))?;
        match all_seen(&mut seen_rx, &resp.id, false, r, t).await {
            Some(d) => probe_del.push(d),
            None => probe_fail += 1,
        }
        i += 1;
    }
    tokio::time::sleep_until(end).await;
    let (threads1, total1) = (thread_cpu(&prefixes), self_cpu());
    let wall = t0.elapsed().as_secs_f64();
    let share = |k: usize| 100.0 * (threads1[k] - threads0[k]) / wall;
    let o = observed.lock().unwrap_or_else(|p| p.into_inner());
    let row = Row {
        n,
        r,
        reg_secs,
        steward_cpu: share(0),
        reeves_cpu: share(1),
        other_cpu: share(2),
        total_cpu: 100.0 * (total1 - total0) / wall,
        unknown_reg,
        unknown_steady: o.went_unknown - unknown_reg,
        not_running_end: o.not_running,
        table: steward.steward.len(),
        probe_put,
        probe_del,
        probe_fail,
        rss: rss_mib(),
    };
    drop(o);
    Ok(row)
}

/// The time from `t0` until all `r` reeves' watches have seen `id` put (or removed); None after
/// 10 s. Probes go one at a time, so other events are stale and dropped.
async fn all_seen(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    id: &str,
    put: bool,
    r: usize,
    t0: Instant,
) -> Option<Duration> {
    let deadline = t0 + Duration::from_secs(10);
    let mut got = vec![false; r];
    let mut left = r;
    let mut last = Duration::ZERO;
    while left > 0 {
        let s = tokio::time::timeout_at(deadline, rx.recv()).await.ok()??;
        if s.id == id && s.put == put && !got[s.reeve] {
            got[s.reeve] = true;
            left -= 1;
            last = last.max(s.at.saturating_duration_since(t0));
        }
    }
    Some(last)
}

/// After a timeout: what each reeve holds, and what the steward's table says of each node.
async fn diagnose(reeves: &[Arc<Reeve>], transport: &Transport, steward: SocketAddr) {
    let table = async {
        let channel = transport
            .channel(steward, Some(LOOPBACK), Duration::from_secs(5))
            .await?;
        let mut client = crux_proto::grpc::steward::v1::steward_client::StewardClient::new(channel)
            .max_decoding_message_size(crux_steward::server::MESSAGE_MAX);
        let t = client
            .table(crux_proto::grpc::steward::v1::TableRequest::default())
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(t.instances)
    };
    let mut by_node: HashMap<String, (usize, usize)> = HashMap::new();
    match tokio::time::timeout(Duration::from_secs(20), table).await {
        Ok(Ok(instances)) => {
            for i in instances {
                let e = by_node.entry(i.node).or_default();
                e.0 += 1;
                e.1 += usize::from(i.state != RunState::Running as i32);
            }
        }
        Ok(Err(e)) => eprintln!("capacity: steward table: {e}"),
        Err(_) => eprintln!("capacity: steward table: no answer within 20 s"),
    }
    for r in reeves {
        let node = &r.config().node;
        let (held, not_running) = by_node.get(node).copied().unwrap_or_default();
        eprintln!(
            "capacity:   reeve {node}: linked {}, local {}, replica {}; steward holds {held} of it, \
             {not_running} not running",
            r.status().flock_id.is_some(),
            r.local_len(),
            r.replica_len(),
        );
    }
}
