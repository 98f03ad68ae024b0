//! `fuse-bench`: Fuse's ADS server under the load of issue 17, item 4 (README "Routes (xDS)").
//!
//! * 10,000 routes over 1,000 instances (200 apis of 5 instances; every tenth route splits its
//!   traffic over two apis) → [`crux_fuse::snapshot::build`];
//! * the full snapshot to a new state-of-the-world stream, as a proxy asks for it (LDS and CDS
//!   wildcard, then RDS `crux` and EDS for every cluster CDS named), and the same over delta;
//! * 100 connected streams, in a child process (so that the server's memory is measured alone),
//!   each on its own connection and ACKing everything; then one instance leaves the registry:
//!   the time from the registry change (snapshot rebuild included) until all 100 streams have
//!   the new EDS, and the server's resident memory per stream.
//!
//! Run: `cargo run --release -p crux-bench-fuse -- [--streams 100]`.
//!
//! Memory is given two ways: resident (RSS, which keeps what the allocator freed but did not
//! return) and live heap (bytes allocated and not freed, counted by the allocator below).

// The counting allocator wraps the system one; nothing else here is unsafe.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to `System` unchanged; only the byte count is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_add(new, Ordering::Relaxed);
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use crux_fuse::ads::{Ads, AdsConfig, Board};
use crux_fuse::route::{parse_target, RouteSpec};
use crux_fuse::snapshot::{build, endpoints_only, Kind, ROUTE_CONFIG};
use crux_proto::grpc::steward::v1::{Health, Instance, RunState};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DiscoveryRequest,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
struct Args {
    /// Routes.
    #[arg(long, default_value_t = 10_000)]
    routes: usize,
    /// Apis (instances = apis × per_api).
    #[arg(long, default_value_t = 200)]
    apis: usize,
    /// Instances per api.
    #[arg(long, default_value_t = 5)]
    per_api: usize,
    /// Connected streams for the change and memory figures.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// (child) Run the streams against this ADS address and report on stdout.
    #[arg(long, hide = true)]
    clients_of: Option<SocketAddr>,
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn instances(apis: usize, per_api: usize) -> Vec<Instance> {
    let mut v = Vec::with_capacity(apis * per_api);
    for a in 0..apis {
        for i in 0..per_api {
            v.push(Instance {
                api: format!("api{a}"),
                inst: format!("api{a}_{i}"),
                addr: format!("10.{}.{}.{}:8080", a / 250, a % 250, i + 1),
                horde: "default".into(),
                state: RunState::Running as i32,
                health: Health::Healthy as i32,
                ..Default::default()
            });
        }
    }
    v
}

fn routes(n: usize, apis: usize) -> Vec<(String, RouteSpec)> {
    (0..n)
        .map(|i| {
            let mut to = vec![parse_target(&format!("api{}", i % apis), 9).unwrap()];
            if i % 10 == 0 {
                to.push(parse_target(&format!("api{}", (i + 1) % apis), 1).unwrap());
            }
            (
                format!("route{i}"),
                RouteSpec {
                    prefix: format!("/svc{i}.Service/"),
                    host: None,
                    to,
                    timeout_ms: 5_000,
                    retries: 1,
                },
            )
        })
        .collect()
}

fn rss_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn req(kind: Kind, names: Vec<String>, version: &str, nonce: &str, node: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            ..Default::default()
        }),
        type_url: kind.url().into(),
        resource_names: names,
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// One proxy: asks as Envoy does (LDS, CDS wildcard; then RDS and EDS by name), ACKs every
/// response. `synced` gets one message once all four types arrived; `eds` one per later EDS
/// response.
async fn proxy(
    addr: SocketAddr,
    node: String,
    synced: mpsc::UnboundedSender<()>,
    eds: mpsc::UnboundedSender<()>,
) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(req(Kind::Listener, vec![], "", "", &node))?;
    tx.send(req(Kind::Cluster, vec![], "", "", &node))?;
    let mut s = client
        .stream_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut got = BTreeSet::new();
    let mut eds_names: Vec<String> = Vec::new();
    let mut done = false;
    while let Some(r) = s.message().await? {
        let kind = Kind::from_url(&r.type_url).context("type")?;
        let names = match kind {
            Kind::Listener | Kind::Cluster => vec![],
            Kind::Route => vec![ROUTE_CONFIG.to_string()],
            Kind::Endpoint => eds_names.clone(),
        };
        tx.send(req(kind, names, &r.version_info, &r.nonce, &node))?;
        if kind == Kind::Listener && !got.contains(&Kind::Route) {
            tx.send(req(Kind::Route, vec![ROUTE_CONFIG.into()], "", "", &node))?;
        }
        if kind == Kind::Cluster && eds_names.is_empty() {
            for a in &r.resources {
                eds_names.push(Cluster::decode(a.value.as_slice())?.name);
            }
            tx.send(req(Kind::Endpoint, eds_names.clone(), "", "", &node))?;
        }
        got.insert(kind);
        if done && kind == Kind::Endpoint {
            let _ = eds.send(());
        }
        if !done && got.len() == 4 {
            done = true;
            let _ = synced.send(());
        }
    }
    Ok(())
}

/// The same over delta: wildcard LDS and CDS, RDS and EDS by name. Returns when all four came.
async fn delta_proxy(addr: SocketAddr) -> anyhow::Result<(usize, usize)> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(256 << 20);
    let dreq = |kind: Kind, sub: Vec<String>, nonce: &str| DeltaDiscoveryRequest {
        node: Some(Node {
            id: "bench-delta".into(),
            ..Default::default()
        }),
        type_url: kind.url().into(),
        resource_names_subscribe: sub,
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(dreq(Kind::Listener, vec![], ""))?;
    tx.send(dreq(Kind::Cluster, vec![], ""))?;
    tx.send(dreq(Kind::Route, vec![ROUTE_CONFIG.into()], ""))?;
    let mut s = client
        .delta_aggregated_resources(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut got = BTreeSet::new();
    let (mut resources, mut bytes) = (0, 0);
    while let Some(r) = s.message().await? {
        let kind = Kind::from_url(&r.type_url).context("type")?;
        resources += r.resources.len();
        bytes += r.encoded_len();
        tx.send(dreq(kind, vec![], &r.nonce))?;
        if kind == Kind::Cluster {
            let names = r
                .resources
                .iter()
                .map(|x| x.name.clone())
                .collect::<Vec<_>>();
            tx.send(dreq(Kind::Endpoint, names, ""))?;
        }
        got.insert(kind);
        if got.len() == 4 {
            return Ok((resources, bytes));
        }
    }
    bail!("delta stream ended early")
}

/// Child: `streams` proxies; prints "synced" once all have everything, then "eds" each time
/// all of them got one more EDS response.
async fn clients(addr: SocketAddr, streams: usize) -> anyhow::Result<()> {
    let (synced_tx, mut synced) = mpsc::unbounded_channel();
    let (eds_tx, mut eds) = mpsc::unbounded_channel();
    for i in 0..streams {
        tokio::spawn(proxy(
            addr,
            format!("bench-{i}"),
            synced_tx.clone(),
            eds_tx.clone(),
        ));
    }
    for _ in 0..streams {
        synced.recv().await.context("a proxy failed")?;
    }
    println!("synced");
    loop {
        for _ in 0..streams {
            eds.recv().await.context("a proxy failed")?;
        }
        println!("eds");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.clients_of {
        return clients(addr, args.streams).await;
    }
    let mut insts = instances(args.apis, args.per_api);
    let routes = routes(args.routes, args.apis);
    println!(
        "fuse-bench: {} routes over {} instances ({} apis × {}), {} streams",
        routes.len(),
        insts.len(),
        args.apis,
        args.per_api,
        args.streams
    );
    let t = now();
    let snap = build("default", &routes, &insts);
    let build_time = t.elapsed();
    let sizes: Vec<String> = Kind::ALL
        .iter()
        .map(|k| {
            let items = &snap.of(*k).items;
            let bytes: usize = items.values().map(|r| r.any.value.len()).sum();
            format!("{k:?} {} ({} KiB)", items.len(), bytes >> 10)
        })
        .collect();
    println!("snapshot build: {build_time:.1?}; {}", sizes.join(", "));

    let (tx, rx) = watch::channel(Arc::new(snap));
    let board = Arc::new(Board::default());
    let stop = CancellationToken::new();
    let ads = Ads::new(rx, board.clone(), AdsConfig::default(), stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ads.server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                s.cancelled_owned(),
            )
            .await
    });

    // Full snapshot to a new stream (SotW), three times; then delta.
    for round in 1..=3 {
        let (synced_tx, mut synced) = mpsc::unbounded_channel();
        let (eds_tx, _eds) = mpsc::unbounded_channel();
        let t = now();
        let task = tokio::spawn(proxy(addr, format!("first-{round}"), synced_tx, eds_tx));
        synced.recv().await.context("first proxy failed")?;
        println!(
            "full snapshot to a new SotW stream (round {round}): {:.1?}",
            t.elapsed()
        );
        task.abort();
    }
    let t = now();
    let (n, bytes) = delta_proxy(addr).await?;
    println!(
        "full snapshot to a new delta stream: {:.1?} ({n} resources, {} KiB)",
        t.elapsed(),
        bytes >> 10
    );

    // The streams, in a child process.
    let wait_closed = now();
    while !board.proxies().is_empty() && wait_closed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = rss_bytes();
    let live_before = LIVE.load(Ordering::Relaxed);
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--clients-of", &addr.to_string()])
        .args(["--streams", &args.streams.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop_guard()?;
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    let out = child.0.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if line_tx.send(l).is_err() {
                return;
            }
        }
    });
    let t = now();
    let line = lines.recv().await.context("the clients ended")?;
    if line != "synced" {
        bail!("clients: {line}");
    }
    println!(
        "{} streams connected and synced in {:.1?}",
        args.streams,
        t.elapsed()
    );
    let after = rss_bytes();
    let live_after = LIVE.load(Ordering::Relaxed);
    println!(
        "server memory: {} MiB before the streams, {} MiB with them: {} KiB per stream",
        before >> 20,
        after >> 20,
        (after.saturating_sub(before) / args.streams as u64) >> 10
    );
    println!(
        "server live heap: {} MiB before the streams, {} MiB with them: {} KiB per stream",
        live_before >> 20,
        live_after >> 20,
        (live_after.saturating_sub(live_before) / args.streams) >> 10
    );
    let mut removed: Option<Instance> = None;
    let mut worst = Duration::ZERO;
    let mut total = Duration::ZERO;
    for _ in 0..5 {
        // One instance leaves the registry (odd rounds) and comes back (even rounds).
        let t = now();
        match removed.take() {
            None => removed = Some(insts.remove(1)),
            Some(i) => insts.insert(1, i),
        }
        let snap = endpoints_only(&tx.borrow(), "default", &routes, &insts);
        let rebuilt = t.elapsed();
        let _ = tx.send(Arc::new(snap));
        let line = lines.recv().await.context("the clients ended")?;
        if line != "eds" {
            bail!("clients: {line}");
        }
        let took = t.elapsed();
        worst = worst.max(took);
        total += took;
        println!(
            "endpoint change → all {} streams have the new EDS: {took:.1?} (snapshot rebuild {rebuilt:.1?})",
            args.streams
        );
    }
    println!(
        "endpoint change to {} streams: mean {:.1?}, worst {worst:.1?}",
        args.streams,
        total / 5
    );
    stop.cancel();
    std::io::stdout().flush()?;
    Ok(())
}

/// A child killed when the guard drops.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

trait SpawnGuard {
    fn kill_on_drop_guard(&mut self) -> std::io::Result<Guard>;
}

impl SpawnGuard for Command {
    fn kill_on_drop_guard(&mut self) -> std::io::Result<Guard> {
        self.spawn().map(Guard)
    }
}
