//! The node plane: every connection between two nodes that is not flock gossip — registry links,
//! Raft and forwarded store writes, pastiche pieces, dean and proctor calls — is made and
//! accepted here, encrypted and mutually authenticated from its first byte to its last.
//!
//! ```text
//!  dial ─▶ TCP ─▶ TLS 1.3 (X25519, AES-GCM / ChaCha20-Poly1305) ─▶ bloc proof ─▶ NodeStream ─▶ HTTP/2 (tonic)
//!                 both sides present an Ed25519           HMAC(bloc key, TLS exporter)
//!                 raw public key (RFC 7250) that the       both ways, inside the channel
//!                 flock must list for a live member
//! ```
//!
//! **What a connection proves.** Each node has a static Ed25519 key pair in its data dir
//! ([`NodeIdentity`]); its public half travels in the node's sealed flock membership record. A
//! TLS handshake succeeds only if the peer signs with a key the flock currently lists
//! ([`Transport::set_peers`]), and the peer's node id is the one listed for that key
//! ([`PeerInfo`]). Then, inside the channel, each side proves it holds a secondary key of the
//! bloc, bound to this session by a TLS exporter ([`BlocKeys`], [`EXPORTER_LABEL`]): a node of
//! another bloc on the same network, or anyone replaying a recorded exchange, gets nowhere.
//!
//! **Why TLS 1.3 with rustls rather than Noise.** Both give forward secrecy and mutual
//! authentication. rustls is audited, widely deployed and fast (AES-GCM with AES-NI through
//! `ring`), brings the record framing, key update and alert handling that a Noise transport
//! would have to add by hand over TCP, and services already speak TLS: the same raw-public-key
//! configuration serves the registry's service endpoints (see `crux_reeve::endpoint`). Raw
//! public keys make the flock the only authority: no CA, no certificate parsing, no expiry to
//! manage; an operator revokes by removing a node or rotating the secondary key.
//!
//! **Revocation.** A connection remembers its peer's key and the bloc key id it proved. When the
//! flock stops listing the key (the node is dead, left or revoked) or the keyring drops the bloc
//! key, [`Transport::set_peers`] / [`Transport::set_bloc_keys`] close it at once: its pending
//! reads and writes fail and tonic reconnects — to a peer that is still listed.
//!
//! **Refusals.** A connection that fails anywhere before it is established is closed and counted
//! by reason ([`Transport::rejected`], exported as `crux_node_plane_rejected_total{reason}`),
//! with one log line per reason per second naming the peer address. Nothing is ever written to
//! a service by a connection that did not complete both proofs; a peer learns nothing beyond
//! what TLS itself says (a handshake alert).
//!
//! **Use.** A node makes one [`Transport`] from its [`NodeIdentity`] and hands clones of it to
//! every part that talks to other nodes. A server takes its listener and serves
//! [`Transport::incoming`] (tonic's `serve_with_incoming_shutdown`); a client gets a tonic
//! channel from [`Transport::channel`]. A node service learns who called from
//! [`peer`]`(&req)`: the [`PeerInfo`] (node id, key, bloc key id) its connection proved; a call
//! that did not come over the node plane gets PERMISSION_DENIED. The agent feeds each transport
//! the flock's live members and their keys at every flock snapshot (`follow_peers` in
//! `agent/src/steward.rs`) and the bloc keys of every keyring the flock publishes
//! (`follow_bloc_keys` in `agent/src/keys.rs`).
//!
//! **Never.** This crate reads no config file and holds no process-global state: every key is a
//! handle passed in, so tests and simulations run many nodes in one process. It depends on
//! `crux-proto` alone: it knows node ids and keys, not the flock, the registry or the services
//! it carries.

mod bloc;
pub mod endpoint;
mod identity;
mod stream;
mod tls;

use std::collections::HashMap;
use std::fmt::Display;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use crux_proto::flock::{NodeId, NodeKey};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn};

pub use bloc::{BlocKeys, EXPORTER_LABEL, PROOF_BYTES};
pub use endpoint::{ClientAuth, EndpointAcceptor, EndpointPeer, EndpointStream};
pub use identity::{key_of_spki, spki, IdentityError, NodeIdentity};
pub use stream::{NodeStream, PeerInfo};

/// How long a whole handshake (TLS and bloc proof) may take, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest gRPC message on the node plane (a registry table's worth, Raft batches and
/// snapshots).
pub const MESSAGE_MAX: usize = 16 << 20;
/// Handshakes an accepting node runs at once, at most: further connections are closed unread.
pub const HANDSHAKES_MAX: usize = 256;
/// How long a node channel waits for the answer to an HTTP/2 ping before it gives the connection
/// up. Slack enough for a peer busy with a burst (50k instances registering at once kept the
/// steward's threads busy for over 3 s); a dead peer is still found by TCP, a new leader by the
/// flock.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a connection was refused or ended, as `crux_node_plane_rejected_total` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Reason {
    /// The TCP connection failed or closed during the handshake.
    Io,
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`] (a silent or half-open peer).
    Timeout,
    /// [`HANDSHAKES_MAX`] handshakes were under way.
    Busy,
    /// Not TLS 1.3 as the node plane speaks it (garbage, plaintext HTTP/2, a replayed recording,
    /// a bad signature, an oversized handshake message).
    Tls,
    /// The peer's key is not one the flock lists (unknown node, revoked, another bloc's node).
    UnknownPeer,
    /// The peer did not prove a secondary key of this bloc for this session.
    Bloc,
    /// An established connection closed because its peer or its bloc key was revoked.
    Revoked,
    /// An established connection received a record that did not decrypt or parse.
    Tampered,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 8] = [
        Reason::Io,
        Reason::Timeout,
        Reason::Busy,
        Reason::Tls,
        Reason::UnknownPeer,
        Reason::Bloc,
        Reason::Revoked,
        Reason::Tampered,
    ];

    /// Its metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Io => "io",
            Reason::Timeout => "timeout",
            Reason::Busy => "busy",
            Reason::Tls => "tls",
            Reason::UnknownPeer => "unknown_peer",
            Reason::Bloc => "bloc",
            Reason::Revoked => "revoked",
            Reason::Tampered => "tampered",
        }
    }
}

/// Tunables of a [`Transport`].
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Whole-handshake limit, either side.
    pub handshake_timeout: Duration,
    /// Handshakes an accepting node runs at once.
    pub handshakes_max: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes_max: HANDSHAKES_MAX,
        }
    }
}

/// Why a transport could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// rustls refused the configuration (not expected with an identity this crate made).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// No identity could be made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

struct Conn {
    key: NodeKey,
    bloc_key: u32,
    close: CancellationToken,
}

/// The state shared by a transport's handles, its verifiers and its streams.
pub(crate) struct Inner {
    identity: NodeIdentity,
    peers: Arc<RwLock<tls::Peers>>,
    keys: RwLock<Option<Arc<BlocKeys>>>,
    connector: TlsConnector,
    acceptor: TlsAcceptor,
    config: TransportConfig,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    logged_ms: [AtomicU64; Reason::ALL.len()],
    started: Instant,
}

impl Inner {
    /// Counts a refusal, and logs it unless one of the same reason was logged this second.
    pub(crate) fn reject(&self, why: Reason, peer: SocketAddr, detail: &dyn Display) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64 + 1_000;
        let last = self.logged_ms[why as usize].load(Ordering::Relaxed);
        if now >= last + 1_000
            && self.logged_ms[why as usize]
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(%peer, reason = why.label(), %detail, "node-plane connection refused");
        } else {
            debug!(%peer, reason = why.label(), %detail, "node-plane connection refused");
        }
    }

    pub(crate) fn register(&self, info: &PeerInfo) -> (u64, CancellationToken) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.insert(
            id,
            Conn {
                key: info.key,
                bloc_key: info.bloc_key,
                close: close.clone(),
            },
        );
        // Listed between the handshake and now? Check once more under the lock.
        if !self.allowed(info.key, info.bloc_key) {
            close.cancel();
        }
        (id, close)
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn node_of(&self, key: &NodeKey) -> Option<NodeId> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .get(key)
            .copied()
    }

    fn keys(&self) -> Option<Arc<BlocKeys>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn allowed(&self, key: NodeKey, bloc_key: u32) -> bool {
        let listed = self.node_of(&key).is_some();
        let keyed = match self.keys() {
            Some(keys) => bloc_key != 0 && keys.holds(bloc_key),
            None => bloc_key == 0,
        };
        listed && keyed
    }

    /// Closes every connection that is no longer allowed.
    fn sweep(&self) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0u64;
        for c in conns.values() {
            if !c.close.is_cancelled() && !self.allowed(c.key, c.bloc_key) {
                c.close.cancel();
                closed += 1;
            }
        }
        if closed > 0 {
            self.rejected[Reason::Revoked as usize].fetch_add(closed, Ordering::Relaxed);
            debug!(closed, "node-plane connections revoked");
        }
    }
}

/// One node's end of the node plane: its identity, the peers it accepts, its bloc keys, and
/// every connection it made or accepted. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("identity", &self.inner.identity.public())
            .finish_non_exhaustive()
    }
}

/// A handshake failure, with the reason it is counted under.
struct Refusal(Reason, String);

fn classify_tls(e: &io::Error) -> Reason {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        )) => Reason::UnknownPeer,
        Some(_) => Reason::Tls,
        None if e.kind() == io::ErrorKind::InvalidData => Reason::Tls,
        None => Reason::Io,
    }
}

impl Transport {
    /// A transport for `identity`, accepting no peer until [`Transport::set_peers`] and proving
    /// no bloc key until [`Transport::set_bloc_keys`].
    pub fn new(
        identity: NodeIdentity,
        config: TransportConfig,
    ) -> Result<Transport, TransportError> {
        let peers = Arc::new(RwLock::new(tls::Peers::default()));
        let (client, server) = tls::configs(&identity, peers.clone())?;
        Ok(Transport {
            inner: Arc::new(Inner {
                identity,
                peers,
                keys: RwLock::new(None),
                connector: TlsConnector::from(client),
                acceptor: TlsAcceptor::from(server),
                config,
                conns: Mutex::default(),
                next_conn: AtomicU64::new(0),
                rejected: std::array::from_fn(|_| AtomicU64::new(0)),
                logged_ms: std::array::from_fn(|_| AtomicU64::new(0)),
                started: Instant::now(),
            }),
        })
    }

    /// A transport with a new random identity and default tunables, for a tool or test that
    /// makes one node of its own.
    pub fn generate() -> Result<Transport, TransportError> {
        let identity = NodeIdentity::generate()?;
        Transport::new(identity, TransportConfig::default())
    }

    /// This node's public key (what the flock must carry in its membership record).
    pub fn public_key(&self) -> NodeKey {
        self.inner.identity.public()
    }

    /// The peers this node accepts: the live members of the flock with their keys. Connections
    /// to or from a key no longer among them close at once.
    pub fn set_peers(&self, peers: impl IntoIterator<Item = (NodeId, NodeKey)>) {
        let by_key: HashMap<NodeKey, NodeId> = peers.into_iter().map(|(n, k)| (k, n)).collect();
        {
            let mut p = self.inner.peers.write().unwrap_or_else(|e| e.into_inner());
            if p.by_key == by_key {
                return;
            }
            p.by_key = by_key;
        }
        self.inner.sweep();
    }

    /// The bloc keys this node proves and accepts (None: security off; such a node talks only
    /// to nodes without keys). Connections made under a key no longer among them close at once.
    pub fn set_bloc_keys(&self, keys: Option<BlocKeys>) {
        *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = keys.map(Arc::new);
        self.inner.sweep();
    }

    /// Refusals and closes since this transport was made, per [`Reason`].
    pub fn rejected(&self) -> Vec<(Reason, u64)> {
        Reason::ALL
            .iter()
            .map(|r| (*r, self.inner.rejected[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }

    /// Refusals and closes of one reason.
    pub fn rejected_for(&self, reason: Reason) -> u64 {
        self.inner.rejected[reason as usize].load(Ordering::Relaxed)
    }

    /// Established connections open now (made and accepted).
    pub fn connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Connects to the node at `addr` (from `local_ip` when given), runs both proofs and returns
    /// the established connection. Fails if the node is not listed, does not hold a bloc key of
    /// ours, or does not answer within the handshake timeout.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> io::Result<NodeStream> {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = local_ip.filter(|ip| !ip.is_unspecified()) {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        let tcp = tokio::time::timeout(self.inner.config.handshake_timeout, sock.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} timed out"),
                )
            })??;
        tcp.set_nodelay(true)?;
        match tokio::time::timeout(self.inner.config.handshake_timeout, self.client(tcp)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(Refusal(why, detail))) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "node-plane handshake with {addr} failed ({}): {detail}",
                    why.label()
                ),
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("node-plane handshake with {addr} timed out"),
            )),
        }
    }

    async fn client(&self, tcp: TcpStream) -> Result<NodeStream, Refusal> {
        let ends = ends_of(&tcp)?;
        let mut tls = self
            .inner
            .connector
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| Refusal(classify_tls(&e), e.to_string()))?;
        let (key, exported) = established(tls.get_ref().1)?;
        let keys = self.inner.keys();
        let bloc_key = bloc::client(&mut tls, keys.as_deref(), &exported)
            .await
            .map_err(|e| Refusal(Reason::Bloc, e.to_string()))?;
        self.admit(tokio_rustls::TlsStream::Client(tls), key, ends, bloc_key)
    }

    async fn server(&self, tcp: TcpStream) -> Result<NodeStream, Refusal> {
        let ends = ends_of(&tcp)?;
        let mut tls = self
            .inner
            .acceptor
            .accept(tcp)
            .await
            .map_err(|e| Refusal(classify_tls(&e), e.to_string()))?;
        let (key, exported) = established(tls.get_ref().1)?;
        let keys = self.inner.keys();
        let bloc_key = bloc::server(&mut tls, keys.as_deref(), &exported)
            .await
            .map_err(|e| Refusal(Reason::Bloc, e.to_string()))?;
        self.admit(tokio_rustls::TlsStream::Server(tls), key, ends, bloc_key)
    }

    /// A connection through both proofs, as a [`NodeStream`] of the node the flock lists for
    /// `key` (refused if the list changed meanwhile).
    fn admit(
        &self,
        tls: tokio_rustls::TlsStream<TcpStream>,
        key: NodeKey,
        (remote, local): (SocketAddr, SocketAddr),
        bloc_key: u32,
    ) -> Result<NodeStream, Refusal> {
        let node = self
            .inner
            .node_of(&key)
            .ok_or_else(|| Refusal(Reason::UnknownPeer, "peer no longer listed".into()))?;
        let info = PeerInfo {
            node,
            key,
            remote,
            local,
            bloc_key,
        };
        Ok(NodeStream::new(tls, info, self.inner.clone()))
    }

    /// The established connections of `listener`, until `shutdown`. Each accepted TCP connection
    /// runs its handshake beside the accept loop (at most [`TransportConfig::handshakes_max`] at
    /// once, each within the handshake timeout), so a slow or hostile peer holds up no one; one
    /// that fails is closed and counted, and nothing else happens.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl tokio_stream::Stream<Item = io::Result<NodeStream>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.inner.config.handshakes_max,
        ));
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    c = listener.accept() => c,
                };
                let (tcp, peer) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: the server logs it; do not spin.
                        if tx.send(Err(e)).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    this.inner
                        .reject(Reason::Busy, peer, &"too many handshakes under way");
                    continue;
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    debug!(error = %e, "TCP_NODELAY not set");
                }
                let tx = tx.clone();
                let this = this.clone();
                tokio::spawn(async move {
                    let r =
                        tokio::time::timeout(this.inner.config.handshake_timeout, this.server(tcp))
                            .await;
                    drop(slot);
                    match r {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(Refusal(why, detail))) => this.inner.reject(why, peer, &detail),
                        Err(_) => this
                            .inner
                            .reject(Reason::Timeout, peer, &"handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A gRPC channel to the node at `addr` over this transport (connections made from
    /// `local_ip` when given). tonic reconnects through the transport when a connection ends,
    /// so a revoked peer is refused at the next call.
    pub async fn channel(
        &self,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<Channel, tonic::transport::Error> {
        endpoint(addr, timeout)
            .connect_with_connector(self.connector(addr, local_ip))
            .await
    }

    /// [`Transport::channel`] that connects at its first call rather than now.
    pub fn channel_lazy(
        &self,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
        timeout: Duration,
    ) -> Channel {
        endpoint(addr, timeout).connect_with_connector_lazy(self.connector(addr, local_ip))
    }

    /// What tonic calls for each connection of a channel to `addr`.
    fn connector(
        &self,
        addr: SocketAddr,
        local_ip: Option<IpAddr>,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<NodeStream>,
        Error = io::Error,
        Future = impl std::future::Future<Output = io::Result<TokioIo<NodeStream>>> + Send,
    > + Clone
           + Send
           + 'static {
        let this = self.clone();
        tower::service_fn(move |_: Uri| {
            let this = this.clone();
            async move { this.connect(addr, local_ip).await.map(TokioIo::new) }
        })
    }
}

/// The HTTP/2 settings of every node channel.
fn endpoint(addr: SocketAddr, timeout: Duration) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .connect_timeout(timeout)
        // Pastiche pieces are 4 MiB: HTTP/2's default 64 KiB windows would stall each one on
        // flow-control round trips.
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
}

/// The two ends of a TCP connection.
fn ends_of(tcp: &TcpStream) -> Result<(SocketAddr, SocketAddr), Refusal> {
    let io = |e: io::Error| Refusal(Reason::Io, e.to_string());
    Ok((tcp.peer_addr().map_err(io)?, tcp.local_addr().map_err(io)?))
}

/// The peer's key and the session's exported secret, once TLS is established.
fn established<D>(conn: &rustls::ConnectionCommon<D>) -> Result<(NodeKey, [u8; 32]), Refusal> {
    let key = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| key_of_spki(c.as_ref()))
        .ok_or_else(|| Refusal(Reason::Tls, "no peer key".into()))?;
    let exported = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| Refusal(Reason::Tls, e.to_string()))?;
    Ok((key, exported))
}

/// The peer of a node gRPC call, as its connection proved it; PERMISSION_DENIED for a call that
/// did not come over the node plane (which a node service never serves).
pub fn peer<T>(req: &tonic::Request<T>) -> Result<&PeerInfo, tonic::Status> {
    req.extensions()
        .get::<PeerInfo>()
        .ok_or_else(|| tonic::Status::permission_denied("not a node-plane connection"))
}
