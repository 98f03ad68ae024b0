//! Service endpoints: TLS 1.3 between two services, each end an Ed25519 raw public key
//! (RFC 7250) that the registry distributes — the `public_key` an instance registers — with no
//! CA and no certificate to manage.
//!
//! ```text
//!  client service                                     server service (identity: Ed25519 key pair)
//!   │ registry entry { addr, public_key }                  │ registered with its public key
//!   ├─ TCP ─▶ TLS 1.3 (X25519, AES-GCM / ChaCha20-Poly1305) ─▶ EndpointStream ─▶ HTTP/2 or bytes
//!   │         the server's key must be one of client_config(keys)
//!   │         the client's key (if the server asks) one of ClientAuth::Keys, or any (AnyKey)
//! ```
//!
//! This is the node plane's TLS (same suites, same X25519 key exchange, same refusal of
//! resumption, tickets and 0-RTT, so every connection has fresh ephemeral keys) pinned to the
//! keys given here instead of to the flock, and without the bloc proof: an endpoint's trust
//! comes from the registry entry, which itself only ever travels over the node plane and the
//! node's local socket. `crux_reeve::endpoint` builds on this: a service serves with its
//! identity, registers its public key, and a client dials the instance a selector picks,
//! refusing any server whose key is not the one registered.
//!
//! * [`server_config`] / [`EndpointAcceptor`]: serve with an identity; accept any client
//!   ([`ClientAuth::Anonymous`]), any client that proves some key ([`ClientAuth::AnyKey`]), or
//!   only given keys ([`ClientAuth::Keys`]).
//! * [`client_config`] / [`connect`]: dial, accepting exactly the given server key(s); optionally
//!   present our own identity. A server with another key fails the handshake with a
//!   [`KeyMismatch`] ([`key_mismatch`] finds it in the error).
//!
//! A public key is 32 raw bytes ([`NodeKey`]); [`key_from_bytes`] also takes its
//! SubjectPublicKeyInfo DER (what other TLS stacks print), so either may be registered.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crux_proto::flock::NodeKey;
use rustls::client::{AlwaysResolvesClientRawPublicKeys, Resumption};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::ServerName;
use rustls::server::{AlwaysResolvesServerRawPublicKeys, NoServerSessionStorage};
use rustls::{CertificateError, ClientConfig, Error, OtherError, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::identity::{key_of_spki, NodeIdentity};
use crate::tls::RawKeyVerifier;
use crate::{HANDSHAKES_MAX, HANDSHAKE_TIMEOUT};

/// The ALPN protocol id of HTTP/2 over TLS (RFC 7540 §3.3), which gRPC clients expect.
pub const ALPN_H2: &[u8] = b"h2";

/// The name a client puts in its handshake (SNI is off): endpoints are told apart by key.
const SERVER_NAME: &str = "endpoint.crux";

/// Which clients a service endpoint accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Any client; none is asked for a key (the channel is still encrypted and the server still
    /// authenticated).
    Anonymous,
    /// Any client that proves it holds some Ed25519 key; the key is in [`EndpointPeer::key`] for
    /// the service to decide on.
    AnyKey,
    /// Only clients holding one of these keys.
    Keys(Vec<NodeKey>),
}

/// Why a configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// rustls refused the configuration (not expected with an identity this crate made).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A client configuration must pin at least one server key ([`ClientAuth::Keys`] at least
    /// one client key): an empty list would accept nobody.
    #[error("no public key to pin: an empty list accepts nobody")]
    NoKeys,
}

/// A peer presented a key other than the one(s) pinned. Found in a handshake's error by
/// [`key_mismatch`]; the peer learns only that its certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the peer presented key {presented}, not {}", list(.expected))]
pub struct KeyMismatch {
    /// The key the peer proved it holds.
    pub presented: NodeKey,
    /// The keys that would have been accepted.
    pub expected: Vec<NodeKey>,
}

fn list(keys: &[NodeKey]) -> String {
    let all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    all.join(" or ")
}

/// The [`KeyMismatch`] a failed handshake carries, if that is why it failed.
pub fn key_mismatch(e: &io::Error) -> Option<KeyMismatch> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<KeyMismatch>().cloned()
        }
        _ => None,
    }
}

/// The key in `bytes`: 32 raw Ed25519 bytes, or their SubjectPublicKeyInfo DER (RFC 8410).
pub fn key_from_bytes(bytes: &[u8]) -> Option<NodeKey> {
    match <[u8; 32]>::try_from(bytes) {
        Ok(raw) => Some(NodeKey(raw)),
        Err(_) => key_of_spki(bytes),
    }
}

/// The key the peer of an established TLS connection presented.
pub fn peer_key(conn: &rustls::CommonState) -> Option<NodeKey> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| key_of_spki(c.as_ref()))
}

/// The keys a service endpoint accepts: a fixed set, or any Ed25519 key (None). The handshake
/// itself is verified as on the node plane ([`crate::tls::RawKeyVerifier`]).
#[derive(Debug)]
struct KeyPin(Option<Vec<NodeKey>>);

impl crate::tls::Accept for KeyPin {
    fn accept(&self, key: NodeKey) -> Result<(), Error> {
        match &self.0 {
            None => Ok(()),
            Some(keys) if keys.contains(&key) => Ok(()),
            Some(keys) => Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(KeyMismatch {
                    presented: key,
                    expected: keys.clone(),
                })),
            ))),
        }
    }
}

/// A verifier accepting `keys` (None: any Ed25519 key).
fn pin(
    keys: Option<Vec<NodeKey>>,
    algorithms: WebPkiSupportedAlgorithms,
) -> Arc<RawKeyVerifier<KeyPin>> {
    Arc::new(RawKeyVerifier {
        accept: KeyPin(keys),
        algorithms,
    })
}

/// The server configuration of a service endpoint with `identity`, accepting `clients`: TLS 1.3
/// only, the node plane's suites, no tickets, resumption or 0-RTT. No ALPN is set; set
/// `alpn_protocols` to `[ALPN_H2]` to serve gRPC to clients that ask for it.
pub fn server_config(
    identity: &NodeIdentity,
    clients: &ClientAuth,
) -> Result<ServerConfig, ConfigError> {
    let provider = Arc::new(crate::tls::provider());
    let key = identity.certified_key(&provider)?;
    let algorithms = provider.signature_verification_algorithms;
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let pin = |keys| pin(keys, algorithms);
    let builder = match clients {
        ClientAuth::Anonymous => builder.with_no_client_auth(),
        ClientAuth::AnyKey => builder.with_client_cert_verifier(pin(None)),
        ClientAuth::Keys(keys) if keys.is_empty() => return Err(ConfigError::NoKeys),
        ClientAuth::Keys(keys) => builder.with_client_cert_verifier(pin(Some(keys.clone()))),
    };
    let mut server =
        builder.with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(key)));
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.max_early_data_size = 0;
    Ok(server)
}

/// The client configuration that accepts exactly the servers holding one of `server_keys`,
/// presenting `identity` to servers that ask for a client key (none: it presents nothing, and a
/// server that requires a key refuses it). TLS 1.3 only, no resumption; no ALPN is set (set
/// `alpn_protocols` to `[ALPN_H2]` for gRPC).
pub fn client_config(
    server_keys: &[NodeKey],
    identity: Option<&NodeIdentity>,
) -> Result<ClientConfig, ConfigError> {
    if server_keys.is_empty() {
        return Err(ConfigError::NoKeys);
    }
    let provider = Arc::new(crate::tls::provider());
    let pin = pin(
        Some(server_keys.to_vec()),
        provider.signature_verification_algorithms,
    );
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(pin);
    let mut client = match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(
            AlwaysResolvesClientRawPublicKeys::new(id.certified_key(&provider)?),
        )),
        None => builder.with_no_client_auth(),
    };
    client.resumption = Resumption::disabled();
    client.enable_sni = false;
    Ok(client)
}

/// Who is at the other end of an endpoint connection, as its handshake proved it. A tonic
/// service served from [`EndpointAcceptor::incoming`] finds it in each request's extensions
/// ([`peer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointPeer {
    /// The key the peer proved it holds (None: an anonymous client).
    pub key: Option<NodeKey>,
    /// The peer's socket address.
    pub remote: SocketAddr,
    /// Ours.
    pub local: SocketAddr,
}

/// The peer of a gRPC call served over an [`EndpointStream`]; None for a call that did not come
/// over one.
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&EndpointPeer> {
    req.extensions().get::<EndpointPeer>()
}

/// An established endpoint connection (TLS 1.3 over TCP).
pub struct EndpointStream {
    tls: tokio_rustls::TlsStream<TcpStream>,
    peer: EndpointPeer,
}

impl std::fmt::Debug for EndpointStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointStream")
            .field("peer", &self.peer)
            .field("suite", &self.cipher_suite())
            .finish_non_exhaustive()
    }
}

impl EndpointStream {
    fn new(tls: tokio_rustls::TlsStream<TcpStream>) -> io::Result<EndpointStream> {
        let (tcp, conn) = tls.get_ref();
        let peer = EndpointPeer {
            key: peer_key(conn),
            remote: tcp.peer_addr()?,
            local: tcp.local_addr()?,
        };
        Ok(EndpointStream { tls, peer })
    }

    /// The peer.
    pub fn peer(&self) -> &EndpointPeer {
        &self.peer
    }

    /// The cipher suite the handshake settled on.
    pub fn cipher_suite(&self) -> Option<rustls::CipherSuite> {
        let (_, conn) = self.tls.get_ref();
        conn.negotiated_cipher_suite().map(|s| s.suite())
    }

    /// The application protocol agreed by ALPN, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tls.get_ref().1.alpn_protocol()
    }
}

impl AsyncRead for EndpointStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for EndpointStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl Connected for EndpointStream {
    type ConnectInfo = EndpointPeer;

    fn connect_info(&self) -> EndpointPeer {
        self.peer.clone()
    }
}

/// Connects to the endpoint at `addr` (`host:port`; a name is resolved) with `config`, within
/// `timeout` for TCP and TLS together. A server whose key `config` does not pin fails with an
/// error [`key_mismatch`] recognises.
pub async fn connect(
    addr: &str,
    config: Arc<ClientConfig>,
    timeout: Duration,
) -> io::Result<EndpointStream> {
    let dial = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        EndpointStream::new(tokio_rustls::TlsStream::Client(tls))
    };
    tokio::time::timeout(timeout, dial).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to endpoint {addr} timed out after {timeout:?}"),
        )
    })?
}

/// Accepts endpoint connections with a server configuration: each handshake within a time
/// limit, a bounded number at once, failures closed and counted. Cheap to clone.
#[derive(Clone)]
pub struct EndpointAcceptor {
    tls: TlsAcceptor,
    handshake_timeout: Duration,
    handshakes_max: usize,
    refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for EndpointAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshakes_max", &self.handshakes_max)
            .field("refused", &self.refused())
            .finish()
    }
}

impl EndpointAcceptor {
    /// An acceptor for `config`, with the node plane's limits ([`HANDSHAKE_TIMEOUT`],
    /// [`HANDSHAKES_MAX`]).
    pub fn new(config: Arc<ServerConfig>) -> EndpointAcceptor {
        EndpointAcceptor {
            tls: TlsAcceptor::from(config),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshakes_max: HANDSHAKES_MAX,
            refused: Arc::default(),
        }
    }

    /// The same with other limits: whole-handshake time and handshakes under way at once.
    pub fn with_limits(mut self, handshake_timeout: Duration, handshakes_max: usize) -> Self {
        self.handshake_timeout = handshake_timeout;
        self.handshakes_max = handshakes_max.max(1);
        self
    }

    /// Handshakes refused or timed out (and connections turned away for being over the limit)
    /// since this acceptor was made.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Runs the server's handshake on `tcp`, within the handshake timeout.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<EndpointStream> {
        let _ = tcp.set_nodelay(true);
        let r = tokio::time::timeout(self.handshake_timeout, self.tls.accept(tcp)).await;
        let r = match r {
            Ok(Ok(tls)) => EndpointStream::new(tokio_rustls::TlsStream::Server(tls)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "endpoint handshake timed out",
            )),
        };
        if r.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// The established connections of `listener` until `shutdown`, for tonic's
    /// `serve_with_incoming`. Each handshake runs beside the accept loop, so a slow or hostile
    /// peer holds up no one; one that fails is closed, counted ([`EndpointAcceptor::refused`])
    /// and logged at debug, and nothing else happens.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl tokio_stream::Stream<Item = io::Result<EndpointStream>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(self.handshakes_max));
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
                        debug!(error = %e, "endpoint accept failed");
                        // Out of descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    this.refused.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "endpoint connection refused: too many handshakes under way");
                    continue;
                };
                let tx = tx.clone();
                let this = this.clone();
                tokio::spawn(async move {
                    let r = this.accept(tcp).await;
                    drop(slot);
                    match r {
                        Ok(s) => {
                            let _ = tx.send(Ok(s)).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "endpoint handshake refused"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    fn id() -> NodeIdentity {
        NodeIdentity::generate().unwrap()
    }

    /// Serves `server` with `clients` on a fresh loopback port; each connection answers what it
    /// reads with the client's key (hex) or "anonymous".
    async fn serve(
        server: &NodeIdentity,
        clients: ClientAuth,
        stop: CancellationToken,
    ) -> (String, EndpointAcceptor) {
        let acceptor = EndpointAcceptor::new(Arc::new(server_config(server, &clients).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut incoming = Box::pin(acceptor.incoming(listener, stop));
        tokio::spawn(async move {
            while let Some(Ok(mut s)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).await.is_ok() {
                        let who = match s.peer().key {
                            Some(k) => k.to_string(),
                            None => "anonymous".into(),
                        };
                        let _ = s.write_all(who.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        (addr, acceptor)
    }

    async fn ask(addr: &str, config: ClientConfig) -> io::Result<(String, EndpointStream)> {
        let mut s = connect(addr, Arc::new(config), Duration::from_secs(5)).await?;
        s.write_all(b"who?").await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok((out, s))
    }

    #[tokio::test]
    async fn a_client_reaches_the_server_holding_the_pinned_key_over_tls13() {
        let server = id();
        let stop = CancellationToken::new();
        let (addr, _) = serve(&server, ClientAuth::Anonymous, stop.clone()).await;
        let (who, s) = ask(&addr, client_config(&[server.public()], None).unwrap())
            .await
            .unwrap();
        assert_eq!(who, "anonymous");
        assert_eq!(s.peer().key, Some(server.public()));
        let suite = s.cipher_suite().unwrap();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_server_with_another_key_fails_the_handshake_with_both_keys_named() {
        let (server, registered) = (id(), id());
        let stop = CancellationToken::new();
        let (addr, acceptor) = serve(&server, ClientAuth::Anonymous, stop.clone()).await;
        let e = ask(&addr, client_config(&[registered.public()], None).unwrap())
            .await
            .unwrap_err();
        let m = key_mismatch(&e).unwrap_or_else(|| panic!("not a key mismatch: {e}"));
        assert_eq!(m.presented, server.public());
        assert_eq!(m.expected, vec![registered.public()]);
        // The server saw the client's alert: counted as a refused handshake.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while acceptor.refused() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no refusal counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_server_asking_for_given_client_keys_refuses_others_and_anonymous_clients() {
        let (server, friend, stranger) = (id(), id(), id());
        let stop = CancellationToken::new();
        let (addr, _) = serve(
            &server,
            ClientAuth::Keys(vec![friend.public()]),
            stop.clone(),
        )
        .await;
        let pinned = [server.public()];
        let (who, _) = ask(&addr, client_config(&pinned, Some(&friend)).unwrap())
            .await
            .unwrap();
        assert_eq!(who, friend.public().to_string());
        // TLS 1.3 clients finish before the server checks them: the refusal shows at the
        // first read.
        assert!(ask(&addr, client_config(&pinned, Some(&stranger)).unwrap())
            .await
            .is_err());
        assert!(ask(&addr, client_config(&pinned, None).unwrap())
            .await
            .is_err());
        stop.cancel();
    }

    #[tokio::test]
    async fn a_server_asking_for_any_key_learns_the_clients_key() {
        let (server, client) = (id(), id());
        let stop = CancellationToken::new();
        let (addr, _) = serve(&server, ClientAuth::AnyKey, stop.clone()).await;
        let (who, _) = ask(
            &addr,
            client_config(&[server.public()], Some(&client)).unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(who, client.public().to_string());
        stop.cancel();
    }

    #[test]
    fn empty_key_lists_are_refused_and_keys_parse_raw_or_as_spki() {
        assert!(matches!(client_config(&[], None), Err(ConfigError::NoKeys)));
        assert!(matches!(
            server_config(&id(), &ClientAuth::Keys(vec![])),
            Err(ConfigError::NoKeys)
        ));
        let k = NodeKey([9; 32]);
        assert_eq!(key_from_bytes(&k.0), Some(k));
        assert_eq!(key_from_bytes(&crate::spki(&k)), Some(k));
        assert_eq!(key_from_bytes(&[9; 31]), None);
        assert_eq!(key_from_bytes(&[]), None);
    }
}
