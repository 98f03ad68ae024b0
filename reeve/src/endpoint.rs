//! Sealed service endpoints: one service reaches another over TLS 1.3, pinned to the public key
//! the other registered — the seed's "reeve distributes the public keys of service endpoints".
//!
//! ```text
//!  server service                                   client service
//!   ServiceEndpoint::load_or_create(key file)        Dialer::new(socket)
//!   .register(socket, {api, inst, addr, ..})         .channel("echo1")
//!      └─ Register{public_key} ─▶ reeve ─▶ registry ─▶ Lookup ─▶ {addr, public_key}
//!   .incoming(listener) ◀══ TLS 1.3, the server must prove public_key ══ TCP to addr
//! ```
//!
//! A service's endpoint identity is an Ed25519 key pair in a file of its own (PKCS#8, mode
//! 0600, made on first start), of the same kind as a node's ([`NodeIdentity`]); its public half
//! goes into the registration as 32 raw bytes. A client looks up a selector through its node's
//! agent (the local socket), takes the best live instance, and connects with a TLS
//! configuration that accepts exactly that instance's key
//! ([`crux_transport::endpoint::client_config`]): an instance that registered no key, a key
//! that is not Ed25519, or a server that proves another key, is refused with an
//! [`EndpointError`] that names the instance and both keys, before a single byte of the call is
//! sent.
//!
//! The registry entry is the root of trust: it reaches the client only through the node plane
//! (sealed, peers pinned by the flock) and the node's local socket.
//!
//! A server may also ask its clients for a key ([`ClientAuth::AnyKey`], or only given keys with
//! [`ClientAuth::Keys`]); a client presents one with [`Dialer::identity`], and the server reads
//! it per call with [`crux_transport::endpoint::peer`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::flock::NodeKey;
use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::Instance;
use crux_transport::endpoint::{self as ep, ConfigError, EndpointAcceptor, ALPN_H2};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn};

use crate::client::{reeve_client, ClientError, Registration};

pub use crux_transport::endpoint::{peer, ClientAuth, EndpointPeer, EndpointStream};
pub use crux_transport::{IdentityError, NodeIdentity};

/// How long a dial (TCP and TLS) may take unless [`Dialer::timeout`] says otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a sealed endpoint could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The agent could not be reached, or refused the lookup or registration. Nothing changed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The registry lists no live instance for the selector. Nothing was dialled.
    #[error("no live instance of {selector:?} in horde {horde:?}")]
    NoInstance {
        /// The selector looked up.
        selector: String,
        /// The horde ("" for the default).
        horde: String,
    },
    /// The chosen instance registered no public key: a sealed channel cannot tell it from an
    /// impostor, so it is not dialled.
    #[error("instance {inst} ({addr}) registered no public key: refusing to connect without one")]
    NoKey {
        /// Instance name.
        inst: String,
        /// Its NetID.
        addr: String,
    },
    /// The chosen instance registered something that is not an Ed25519 public key (32 raw
    /// bytes or its SubjectPublicKeyInfo DER). Not dialled.
    #[error("instance {inst} ({addr}) registered a {len}-byte public key that is not Ed25519 (32 raw bytes or its SPKI DER)")]
    BadKey {
        /// Instance name.
        inst: String,
        /// Its NetID.
        addr: String,
        /// Bytes registered.
        len: usize,
    },
    /// The server at the instance's address proved another key than the registered one (an
    /// impostor, or a stale entry). The handshake was aborted; nothing was sent.
    #[error("instance {inst} at {addr} presented key {presented}, but the registry lists {registered}: refused")]
    KeyMismatch {
        /// Instance name.
        inst: String,
        /// Its NetID.
        addr: String,
        /// The key the server proved it holds.
        presented: NodeKey,
        /// The key the instance registered.
        registered: NodeKey,
    },
    /// The instance could not be reached, or its TLS handshake failed for another reason (the
    /// server refused our key, speaks no TLS, timed out). Nothing was sent.
    #[error("cannot reach instance {inst} at {addr}: {source}")]
    Connect {
        /// Instance name.
        inst: String,
        /// Its NetID.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The endpoint identity file could not be read or made.
    #[error("endpoint identity: {0}")]
    Identity(#[from] IdentityError),
    /// The TLS configuration could not be made.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The gRPC channel over the established connection failed to start.
    #[error("gRPC over the sealed connection to {inst}: {source}")]
    Channel {
        /// Instance name.
        inst: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The key an instance registered, as a sealed client must find it: [`EndpointError::NoKey`]
/// when there is none, [`EndpointError::BadKey`] when it is not Ed25519.
pub fn instance_key(inst: &Instance) -> Result<NodeKey, EndpointError> {
    if inst.public_key.is_empty() {
        return Err(EndpointError::NoKey {
            inst: inst.inst.clone(),
            addr: inst.addr.clone(),
        });
    }
    ep::key_from_bytes(&inst.public_key).ok_or_else(|| EndpointError::BadKey {
        inst: inst.inst.clone(),
        addr: inst.addr.clone(),
        len: inst.public_key.len(),
    })
}

/// A service's sealed endpoint: its identity, and the TLS server that proves it.
#[derive(Clone, Debug)]
pub struct ServiceEndpoint {
    identity: NodeIdentity,
    acceptor: EndpointAcceptor,
}

impl ServiceEndpoint {
    /// The endpoint of the identity kept at `path` (made there on first use, mode 0600),
    /// accepting `clients`.
    pub fn load_or_create(path: &Path, clients: ClientAuth) -> Result<Self, EndpointError> {
        Self::new(NodeIdentity::load_or_create(path)?, clients)
    }

    /// The endpoint of `identity`, accepting `clients`. It offers HTTP/2 by ALPN (gRPC) and
    /// also serves clients that ask for no protocol.
    pub fn new(identity: NodeIdentity, clients: ClientAuth) -> Result<Self, EndpointError> {
        let mut config = ep::server_config(&identity, &clients)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ServiceEndpoint {
            identity,
            acceptor: EndpointAcceptor::new(Arc::new(config)),
        })
    }

    /// The public key clients must find in the registry.
    pub fn public_key(&self) -> NodeKey {
        self.identity.public()
    }

    /// The identity (also usable as a client identity with [`Dialer::identity`]).
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The acceptor, for callers that run their own accept loop.
    pub fn acceptor(&self) -> &EndpointAcceptor {
        &self.acceptor
    }

    /// `req` carrying this endpoint's public key (32 raw bytes).
    pub fn sign(&self, mut req: rpb::RegisterRequest) -> rpb::RegisterRequest {
        req.public_key = self.public_key().0.to_vec();
        req
    }

    /// Registers `req` with this endpoint's public key through the agent at `socket`, and keeps
    /// it alive ([`Registration::start`]).
    pub async fn register(
        &self,
        socket: impl Into<PathBuf>,
        req: rpb::RegisterRequest,
    ) -> Result<Registration, EndpointError> {
        Ok(Registration::start(socket, self.sign(req)).await?)
    }

    /// The sealed connections of `listener` until `shutdown`: pass it to tonic's
    /// `serve_with_incoming` (or read and write each stream). Handshakes that fail are closed
    /// and counted in [`EndpointAcceptor::refused`].
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl tokio_stream::Stream<Item = io::Result<EndpointStream>> + Send + 'static {
        self.acceptor.incoming(listener, shutdown)
    }
}

/// The instance a selector picked, with the key it registered.
#[derive(Clone, Debug)]
pub struct Target {
    /// The registry entry.
    pub instance: Instance,
    /// Its public key: the only key its server may prove.
    pub key: NodeKey,
}

/// Dials sealed endpoints by selector, through the agent's local socket.
#[derive(Clone, Debug)]
pub struct Dialer {
    socket: PathBuf,
    horde: String,
    identity: Option<NodeIdentity>,
    timeout: Duration,
}

impl Dialer {
    /// A dialer that looks selectors up through the agent at `socket`, in the default horde,
    /// presenting no key of its own.
    pub fn new(socket: impl Into<PathBuf>) -> Dialer {
        Dialer {
            socket: socket.into(),
            horde: String::new(),
            identity: None,
            timeout: CONNECT_TIMEOUT,
        }
    }

    /// Looks selectors up in `horde` ("" for the default).
    pub fn horde(mut self, horde: impl Into<String>) -> Dialer {
        self.horde = horde.into();
        self
    }

    /// Presents `identity` to servers that ask for a client key.
    pub fn identity(mut self, identity: NodeIdentity) -> Dialer {
        self.identity = Some(identity);
        self
    }

    /// Limits each dial (TCP and TLS together) to `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Dialer {
        self.timeout = timeout;
        self
    }

    /// The best live instance of `selector`, with its key.
    pub async fn resolve(&self, selector: &str) -> Result<Target, EndpointError> {
        let mut client = reeve_client(&self.socket).await?;
        let found = client
            .lookup(rpb::LookupRequest {
                selector: selector.to_string(),
                horde: self.horde.clone(),
                live_only: true,
            })
            .await
            .map_err(ClientError::from)?
            .into_inner();
        let instance =
            found
                .instances
                .into_iter()
                .next()
                .ok_or_else(|| EndpointError::NoInstance {
                    selector: selector.to_string(),
                    horde: self.horde.clone(),
                })?;
        let key = instance_key(&instance)?;
        Ok(Target { instance, key })
    }

    /// A TLS connection to `target`, whose server must prove `target.key`; `alpn` is offered
    /// when given.
    pub async fn connect_to(
        &self,
        target: &Target,
        alpn: Option<&[u8]>,
    ) -> Result<EndpointStream, EndpointError> {
        let mut config = ep::client_config(&[target.key], self.identity.as_ref())?;
        if let Some(p) = alpn {
            config.alpn_protocols = vec![p.to_vec()];
        }
        let inst = &target.instance;
        ep::connect(&inst.addr, Arc::new(config), self.timeout)
            .await
            .map_err(|e| match ep::key_mismatch(&e) {
                Some(m) => EndpointError::KeyMismatch {
                    inst: inst.inst.clone(),
                    addr: inst.addr.clone(),
                    presented: m.presented,
                    registered: target.key,
                },
                None => EndpointError::Connect {
                    inst: inst.inst.clone(),
                    addr: inst.addr.clone(),
                    source: e,
                },
            })
    }

    /// A TLS stream to the best live instance of `selector` (no ALPN), and that instance.
    pub async fn connect(
        &self,
        selector: &str,
    ) -> Result<(EndpointStream, Instance), EndpointError> {
        let target = self.resolve(selector).await?;
        let s = self.connect_to(&target, None).await?;
        Ok((s, target.instance))
    }

    /// A gRPC channel to the best live instance of `selector`, sealed with its registered key.
    ///
    /// The first connection is made now, so a missing or wrong key fails here with a clear
    /// [`EndpointError`]. When a connection ends, tonic makes the next one at the next call:
    /// that one goes to the best live instance at that moment (looked up again), pinned to its
    /// key; a failure then reaches the call as `UNAVAILABLE` and is logged at warn with the
    /// same message.
    pub async fn channel(&self, selector: &str) -> Result<SealedChannel, EndpointError> {
        let target = self.resolve(selector).await?;
        let first = self.connect_to(&target, Some(ALPN_H2)).await?;
        let (current_tx, current) = watch::channel(Connection::of(&first, &target));
        let current_tx = Arc::new(current_tx);
        let first = Arc::new(Mutex::new(Some(first)));
        let dialer = self.clone();
        let selector = selector.to_string();
        let connector = tower::service_fn(move |_: Uri| {
            let (dialer, selector, first, current_tx) = (
                dialer.clone(),
                selector.clone(),
                first.clone(),
                current_tx.clone(),
            );
            async move {
                let ready = first.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(s) = ready {
                    return Ok::<_, io::Error>(TokioIo::new(s));
                }
                let dial = async {
                    let target = dialer.resolve(&selector).await?;
                    let s = dialer.connect_to(&target, Some(ALPN_H2)).await?;
                    Ok::<_, EndpointError>((s, target))
                };
                match dial.await {
                    Ok((s, target)) => {
                        let inst = &target.instance;
                        debug!(inst = %inst.inst, addr = %inst.addr, "sealed endpoint reconnected");
                        current_tx.send_replace(Connection::of(&s, &target));
                        Ok(TokioIo::new(s))
                    }
                    Err(e) => {
                        warn!(%selector, error = %e, "sealed endpoint connection failed");
                        Err(io::Error::other(e))
                    }
                }
            }
        });
        let channel = Endpoint::from_static("http://endpoint.crux")
            .connect_timeout(self.timeout)
            .connect_with_connector(connector)
            .await
            .map_err(|source| EndpointError::Channel {
                inst: target.instance.inst.clone(),
                source,
            })?;
        Ok(SealedChannel { channel, current })
    }
}

/// Where a sealed connection went, and how it is sealed.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    /// The registry entry of the instance.
    pub instance: Instance,
    /// The key its server proved (the one it registered).
    pub key: NodeKey,
    /// The TLS 1.3 cipher suite the handshake settled on, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: &'static str,
}

impl Connection {
    fn of(stream: &EndpointStream, target: &Target) -> Connection {
        Connection {
            instance: target.instance.clone(),
            key: stream.peer().key.unwrap_or(target.key),
            cipher_suite: stream
                .cipher_suite()
                .and_then(|s| s.as_str())
                .unwrap_or("unknown"),
        }
    }
}

/// A gRPC channel to a sealed endpoint ([`Dialer::channel`]).
#[derive(Clone, Debug)]
pub struct SealedChannel {
    channel: Channel,
    current: watch::Receiver<Connection>,
}

impl SealedChannel {
    /// The channel.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Where the last connection went.
    pub fn connection(&self) -> Connection {
        self.current.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: Vec<u8>) -> Instance {
        Instance {
            inst: "echo1_1".into(),
            addr: "127.0.0.1:9".into(),
            public_key: key,
            ..Instance::default()
        }
    }

    #[test]
    fn an_entry_without_an_ed25519_key_is_refused_by_name() {
        let e = instance_key(&entry(Vec::new())).unwrap_err();
        assert!(matches!(e, EndpointError::NoKey { .. }), "{e}");
        assert!(
            e.to_string().contains("echo1_1") && e.to_string().contains("no public key"),
            "{e}"
        );
        let e = instance_key(&entry(vec![1; 33])).unwrap_err();
        assert!(matches!(e, EndpointError::BadKey { len: 33, .. }), "{e}");
        let k = NodeKey([4; 32]);
        assert_eq!(instance_key(&entry(k.0.to_vec())).unwrap(), k);
        assert_eq!(instance_key(&entry(crux_transport::spki(&k))).unwrap(), k);
    }

    #[test]
    fn a_registration_carries_the_endpoints_raw_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoint.key");
        let a = ServiceEndpoint::load_or_create(&path, ClientAuth::Anonymous).unwrap();
        let b = ServiceEndpoint::load_or_create(&path, ClientAuth::AnyKey).unwrap();
        assert_eq!(
            a.public_key(),
            b.public_key(),
            "the identity survives a restart"
        );
        let req = a.sign(rpb::RegisterRequest::default());
        assert_eq!(req.public_key, a.public_key().0.to_vec());
    }
}
