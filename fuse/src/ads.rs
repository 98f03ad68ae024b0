//! The Aggregated Discovery Service: one gRPC stream per proxy, state-of-the-world
//! (`StreamAggregatedResources`) or incremental (`DeltaAggregatedResources`), over the latest
//! [`Snapshot`].
//!
//! Each stream is one task that owns its state and `select!`s over the proxy's requests, new
//! snapshots, an ACK deadline and shutdown. Per resource type it keeps what it sent (version or
//! per-resource versions, and the nonce) and follows the xDS rules:
//!
//! * a request whose nonce is not the last one sent for its type is stale and ignored (delta:
//!   its subscription changes still count);
//! * a request with the last nonce and no `error_detail` is an ACK; with one it is a NACK: the
//!   proxy keeps its last good config, the error is logged (`warn`) with the proxy's node id and
//!   message and kept for `crux route proxies`, and the rejected version is not sent again;
//!   the next change of the snapshot is;
//! * one response per type waits for its ACK or NACK at a time: a proxy that never answers gets
//!   nothing more of that type (nothing queues up for it) and is logged once after
//!   [`AdsConfig::ack_timeout`];
//! * a request that does not decode ends that stream with `INVALID_ARGUMENT` (other streams go
//!   on); a type URL that is not LDS, RDS, CDS or EDS is logged and ignored.
//!
//! Versions are the snapshot's content hashes (see [`crate::snapshot`]); nonces count per stream.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::snapshot::{Kind, Snapshot};

/// How long a response may wait for its ACK before the proxy is logged as silent: 30 s.
pub const ACK_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Responses queued per stream at most (the stream's task waits beyond it: a slow proxy slows
/// only its own stream).
pub const STREAM_QUEUE: usize = 8;

/// ADS settings.
#[derive(Clone, Debug)]
pub struct AdsConfig {
    /// See [`ACK_TIMEOUT_DEFAULT`].
    pub ack_timeout: Duration,
}

impl Default for AdsConfig {
    fn default() -> AdsConfig {
        AdsConfig {
            ack_timeout: ACK_TIMEOUT_DEFAULT,
        }
    }
}

/// What one stream knows of one type, for the board.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TypeStatus {
    /// Version (state of the world) or nonce (delta) last sent.
    pub sent: String,
    /// Last version (or nonce) acknowledged.
    pub acked: String,
    /// Responses rejected.
    pub nacks: u64,
    /// The proxy's last error.
    pub last_error: String,
    /// Names subscribed.
    pub subscribed: usize,
    /// Wildcard subscription.
    pub wildcard: bool,
    /// Since when a response waits for its ACK.
    pub waiting_since: Option<Instant>,
}

/// One connected proxy.
#[derive(Clone, Debug, Default)]
pub struct ProxyStatus {
    /// Its node id.
    pub node_id: String,
    /// Its address.
    pub peer: String,
    /// Delta or state of the world.
    pub delta: bool,
    /// Per type.
    pub types: BTreeMap<Kind, TypeStatus>,
}

/// The connected proxies and the ADS address, shared by the server and the routes API.
#[derive(Debug, Default)]
pub struct Board {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
    next: std::sync::atomic::AtomicU64,
    addr: Mutex<Option<SocketAddr>>,
    snap: Mutex<Arc<Snapshot>>,
}

impl Board {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open(&self, peer: String, delta: bool) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(
            id,
            ProxyStatus {
                peer,
                delta,
                ..Default::default()
            },
        );
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.lock().get_mut(&id) {
            f(p);
        }
    }

    fn close(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// The connected proxies.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.lock().values().cloned().collect()
    }

    /// Where ADS is served (None: not served).
    pub fn addr(&self) -> Option<SocketAddr> {
        *self.addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot served now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the snapshot served now.
    pub fn set_snapshot(&self, s: Arc<Snapshot>) {
        *self.snap.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Records where ADS is served.
    pub fn set_addr(&self, a: Option<SocketAddr>) {
        *self.addr.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }
}

/// The ADS gRPC service.
#[derive(Clone)]
pub struct Ads {
    snap: watch::Receiver<Arc<Snapshot>>,
    board: Arc<Board>,
    config: AdsConfig,
    stop: CancellationToken,
}

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Ads {
    /// A service over the snapshots `snap`; its streams end when `stop` is cancelled.
    pub fn new(
        snap: watch::Receiver<Arc<Snapshot>>,
        board: Arc<Board>,
        config: AdsConfig,
        stop: CancellationToken,
    ) -> Ads {
        Ads {
            snap,
            board,
            config,
            stop,
        }
    }

    /// The tonic server.
    pub fn server(self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

fn peer<T>(r: &Request<T>) -> String {
    r.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// The version of a subset of a type's resources (a hash of their names and versions).
fn subset_version(snap: &Snapshot, kind: Kind, names: &[&String]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for n in names {
        n.hash(&mut h);
        if let Some(r) = snap.of(kind).items.get(*n) {
            r.version.hash(&mut h);
        }
    }
    format!("{:016x}", h.finish())
}

/// What a state-of-the-world stream keeps per type.
#[derive(Default)]
struct Sotw {
    requested: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// A request waits for its response.
    pending: bool,
    sent_version: Option<String>,
    sent_names: Option<BTreeSet<String>>,
    nonce: String,
    warned: bool,
    status: TypeStatus,
}

fn decode_error(node: &str, peer: &str, e: &Status) -> Status {
    warn!(node = %node, peer = %peer, error = %e.message(),
        "ADS: a proxy sent a request that does not decode; its stream is closed");
    Status::invalid_argument(format!(
        "Crux ADS: malformed discovery request: {}",
        e.message()
    ))
}

fn earliest(waits: impl Iterator<Item = Option<Instant>>) -> Option<Instant> {
    waits.flatten().min()
}

impl Ads {
    async fn sotw(
        self,
        peer: String,
        mut incoming: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let id = self.board.open(peer.clone(), false);
        let mut snaps = self.snap.clone();
        let mut cur = snaps.borrow_and_update().clone();
        let mut st: [Sotw; 4] = Default::default();
        let mut node = String::new();
        let mut nonce_n = 0u64;
        loop {
            let deadline = earliest(
                st.iter()
                    .filter(|t| !t.warned)
                    .map(|t| t.status.waiting_since.map(|s| s + self.config.ack_timeout)),
            );
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tx.closed() => break,
                m = incoming.message() => match m {
                    Ok(Some(req)) => {
                        if node.is_empty() {
                            if let Some(n) = &req.node {
                                node = n.id.clone();
                                let nid = node.clone();
                                self.board.update(id, |p| p.node_id = nid);
                                info!(node = %node, peer = %peer, "ADS: proxy connected (state of the world)");
                            }
                        }
                        let Some(kind) = Kind::from_url(&req.type_url) else {
                            warn!(node = %node, type_url = %req.type_url,
                                "ADS: a proxy asked for a type Crux does not serve; ignored");
                            continue;
                        };
                        let t = &mut st[kind.index()];
                        if !req.response_nonce.is_empty() && req.response_nonce != t.nonce {
                            debug!(node = %node, ?kind, nonce = %req.response_nonce, "ADS: stale nonce; ignored");
                            continue;
                        }
                        if !req.response_nonce.is_empty() {
                            if let Some(err) = &req.error_detail {
                                t.status.nacks += 1;
                                t.status.last_error = err.message.clone();
                                warn!(node = %node, peer = %peer, ?kind,
                                    version = %t.sent_version.clone().unwrap_or_default(),
                                    error = %err.message,
                                    "ADS: the proxy rejected the config (NACK); it keeps its last good one");
                            } else {
                                t.status.acked = req.version_info.clone();
                            }
                            t.status.waiting_since = None;
                            t.warned = false;
                        }
                        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
                        t.wildcard = names.contains("*") || (names.is_empty() && kind.wildcard_when_empty());
                        t.names = names.into_iter().filter(|n| n != "*").collect();
                        t.requested = true;
                        t.pending = true;
                        t.status.subscribed = t.names.len();
                        t.status.wildcard = t.wildcard;
                        if !self.send_sotw(kind, &mut st, &cur, &mut nonce_n, &tx).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(decode_error(&node, &peer, &e))).await;
                        break;
                    }
                },
                changed = snaps.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    cur = snaps.borrow_and_update().clone();
                    for kind in Kind::ALL {
                        if !self.send_sotw(kind, &mut st, &cur, &mut nonce_n, &tx).await {
                            break;
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    for (kind, t) in Kind::ALL.into_iter().zip(st.iter_mut()) {
                        if t.status.waiting_since.is_some_and(|s| s + self.config.ack_timeout <= Instant::now()) && !t.warned {
                            t.warned = true;
                            warn!(node = %node, peer = %peer, ?kind, version = %t.status.sent,
                                waited_s = self.config.ack_timeout.as_secs(),
                                "ADS: the proxy has not acknowledged a response; nothing more of this type is sent until it does");
                        }
                    }
                }
            }
            let types: BTreeMap<Kind, TypeStatus> = Kind::ALL
                .into_iter()
                .zip(st.iter())
                .filter(|(_, t)| t.requested)
                .map(|(k, t)| (k, t.status.clone()))
                .collect();
            self.board.update(id, |p| p.types = types);
        }
        self.board.close(id);
        debug!(node = %node, peer = %peer, "ADS: stream closed");
    }

    /// Sends the type's resources if a request waits and they differ from what was sent.
    /// False: the stream is gone.
    async fn send_sotw(
        &self,
        kind: Kind,
        st: &mut [Sotw; 4],
        cur: &Snapshot,
        nonce_n: &mut u64,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> bool {
        let t = &mut st[kind.index()];
        if !t.pending {
            return true;
        }
        let items = &cur.of(kind).items;
        let names: Vec<&String> = if t.wildcard {
            items.keys().collect()
        } else {
            t.names.iter().filter(|n| items.contains_key(*n)).collect()
        };
        let version = if t.wildcard {
            cur.of(kind).version.clone()
        } else {
            subset_version(cur, kind, &names)
        };
        let same_names = t.sent_names.as_ref() == Some(&t.names);
        if t.sent_version.as_deref() == Some(version.as_str()) && same_names {
            return true;
        }
        *nonce_n += 1;
        let nonce = nonce_n.to_string();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources: names.iter().map(|n| items[*n].any.clone()).collect(),
            type_url: kind.url().into(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        t.pending = false;
        t.sent_version = Some(version.clone());
        t.sent_names = Some(t.names.clone());
        t.nonce = nonce;
        t.status.sent = version;
        t.status.waiting_since = Some(Instant::now());
        t.warned = false;
        tx.send(Ok(resp)).await.is_ok()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Per name, the version sent (None: removed).
type Sent = Vec<(String, Option<String>)>;

/// What a delta stream keeps per type.
#[derive(Default)]
struct Delta {
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the proxy has: name → version.
    known: HashMap<String, String>,
    /// The response waiting for its ACK: nonce, and per name the version sent (None: removed).
    inflight: Option<(String, Sent)>,
    /// Versions the proxy rejected: not sent again.
    rejected: HashMap<String, String>,
    responded: bool,
    warned: bool,
    status: TypeStatus,
}

impl Ads {
    async fn delta(
        self,
        peer: String,
        mut incoming: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let id = self.board.open(peer.clone(), true);
        let mut snaps = self.snap.clone();
        let mut cur = snaps.borrow_and_update().clone();
        let mut st: [Delta; 4] = Default::default();
        let mut node = String::new();
        let mut nonce_n = 0u64;
        loop {
            let deadline = earliest(
                st.iter()
                    .filter(|t| !t.warned)
                    .map(|t| t.status.waiting_since.map(|s| s + self.config.ack_timeout)),
            );
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                _ = tx.closed() => break,
                m = incoming.message() => match m {
                    Ok(Some(req)) => {
                        if node.is_empty() {
                            if let Some(n) = &req.node {
                                node = n.id.clone();
                                let nid = node.clone();
                                self.board.update(id, |p| p.node_id = nid);
                                info!(node = %node, peer = %peer, "ADS: proxy connected (delta)");
                            }
                        }
                        let Some(kind) = Kind::from_url(&req.type_url) else {
                            warn!(node = %node, type_url = %req.type_url,
                                "ADS: a proxy asked for a type Crux does not serve; ignored");
                            continue;
                        };
                        let t = &mut st[kind.index()];
                        if !t.started {
                            t.started = true;
                            t.known = req.initial_resource_versions.clone();
                            t.wildcard = req.resource_names_subscribe.is_empty() && kind.wildcard_when_empty();
                        }
                        for n in &req.resource_names_subscribe {
                            if n == "*" { t.wildcard = true; } else { t.names.insert(n.clone()); }
                        }
                        for n in &req.resource_names_unsubscribe {
                            if n == "*" { t.wildcard = false; } else { t.names.remove(n); t.known.remove(n); }
                        }
                        if !req.response_nonce.is_empty() {
                            match t.inflight.take() {
                                Some((nonce, sent)) if nonce == req.response_nonce => {
                                    if let Some(err) = &req.error_detail {
                                        t.status.nacks += 1;
                                        t.status.last_error = err.message.clone();
                                        warn!(node = %node, peer = %peer, ?kind, nonce = %nonce, error = %err.message,
                                            "ADS: the proxy rejected the config (NACK); it keeps its last good one");
                                        for (n, v) in sent {
                                            if let Some(v) = v { t.rejected.insert(n, v); }
                                        }
                                    } else {
                                        for (n, v) in sent {
                                            match v {
                                                Some(v) => { t.known.insert(n, v); }
                                                None => { t.known.remove(&n); }
                                            }
                                        }
                                        t.status.acked = nonce;
                                    }
                                    t.status.waiting_since = None;
                                    t.warned = false;
                                }
                                other => {
                                    debug!(node = %node, ?kind, nonce = %req.response_nonce, "ADS: stale nonce");
                                    t.inflight = other;
                                }
                            }
                        }
                        t.status.subscribed = t.names.len();
                        t.status.wildcard = t.wildcard;
                        if !self.send_delta(kind, &mut st, &cur, &mut nonce_n, &tx).await {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(decode_error(&node, &peer, &e))).await;
                        break;
                    }
                },
                changed = snaps.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    cur = snaps.borrow_and_update().clone();
                    for kind in Kind::ALL {
                        if !self.send_delta(kind, &mut st, &cur, &mut nonce_n, &tx).await {
                            break;
                        }
                    }
                }
                () = sleep_until(deadline) => {
                    for (kind, t) in Kind::ALL.into_iter().zip(st.iter_mut()) {
                        if t.status.waiting_since.is_some_and(|s| s + self.config.ack_timeout <= Instant::now()) && !t.warned {
                            t.warned = true;
                            warn!(node = %node, peer = %peer, ?kind, nonce = %t.status.sent,
                                waited_s = self.config.ack_timeout.as_secs(),
                                "ADS: the proxy has not acknowledged a response; nothing more of this type is sent until it does");
                        }
                    }
                }
            }
            let types: BTreeMap<Kind, TypeStatus> = Kind::ALL
                .into_iter()
                .zip(st.iter())
                .filter(|(_, t)| t.started)
                .map(|(k, t)| (k, t.status.clone()))
                .collect();
            self.board.update(id, |p| p.types = types);
        }
        self.board.close(id);
        debug!(node = %node, peer = %peer, "ADS: delta stream closed");
    }

    async fn send_delta(
        &self,
        kind: Kind,
        st: &mut [Delta; 4],
        cur: &Snapshot,
        nonce_n: &mut u64,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> bool {
        let t = &mut st[kind.index()];
        if !t.started || t.inflight.is_some() {
            return true;
        }
        let ts = cur.of(kind);
        let wanted: Vec<&String> = if t.wildcard {
            ts.items.keys().collect()
        } else {
            t.names
                .iter()
                .filter(|n| ts.items.contains_key(*n))
                .collect()
        };
        let mut resources = Vec::new();
        let mut sent = Vec::new();
        for n in wanted {
            let r = &ts.items[n];
            if t.known.get(n) == Some(&r.version) || t.rejected.get(n) == Some(&r.version) {
                continue;
            }
            resources.push(Resource {
                name: n.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            });
            sent.push((n.clone(), Some(r.version.clone())));
        }
        let mut removed = Vec::new();
        for n in t.known.keys() {
            if (t.wildcard || t.names.contains(n)) && !ts.items.contains_key(n) {
                removed.push(n.clone());
                sent.push((n.clone(), None));
            }
        }
        // Subscribed names that do not exist: said once, so that the proxy does not wait.
        for n in &t.names {
            if !ts.items.contains_key(n) && !t.known.contains_key(n) && !t.responded {
                removed.push(n.clone());
            }
        }
        if resources.is_empty() && removed.is_empty() && t.responded {
            return true;
        }
        removed.sort();
        removed.dedup();
        *nonce_n += 1;
        let nonce = nonce_n.to_string();
        t.responded = true;
        t.inflight = Some((nonce.clone(), sent));
        t.status.sent = nonce.clone();
        t.status.waiting_since = Some(Instant::now());
        t.warned = false;
        let resp = DeltaDiscoveryResponse {
            system_version_info: ts.version.clone(),
            resources,
            type_url: kind.url().into(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        tx.send(Ok(resp)).await.is_ok()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = peer(&request);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(self.clone().sotw(peer, request.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = peer(&request);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        tokio::spawn(self.clone().delta(peer, request.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
