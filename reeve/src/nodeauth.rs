//! Node-to-node authentication: every TCP connection to a node gRPC port opens with a mutual
//! proof that both ends hold a secondary key of the bloc, before any HTTP/2 byte, so that the
//! port's services (the steward, pastiche pieces, the store's Raft and forwarded writes, the
//! deans) answer only key holders, as the flock does. The source-address check of live members
//! stays on top of it.
//!
//! The exchange, with `k` the [`NodeKeys`] key (derived from a secondary key and the bloc, see
//! `crux_flock::crypto::node_auth_key`) and HMAC-SHA-256:
//!
//! 1. server → client: `MAGIC`, a 32-byte random `s`;
//! 2. client → server: `MAGIC`, the key id of its primary key (4 bytes, little endian), a
//!    32-byte random `c`, `HMAC(k, "client" | s | c)`;
//! 3. server → client: `HMAC(k, "server" | s | c)`, with the key the id names (one attempt).
//!
//! A server that does not hold the key, a bad proof, a wrong magic or a handshake that takes
//! longer than [`HANDSHAKE_TIMEOUT`] closes the connection and nothing else happens; a client
//! that gets a bad proof back gives up the connection (the peer does not hold our key). Fresh
//! random values on both sides make a recorded exchange worthless. The exchange authenticates;
//! it does not encrypt what follows (see the README's threat model).
//!
//! The keys are process-wide ([`set_keys`]): the agent sets them from its keyring and on every
//! keyring change, and a connection made under a key that leaves them fails at its next read or
//! write ([`Authed`]). With none set (security off, in-process tests) connections carry no
//! exchange. A caller may also hold other keys than the process's
//! (`crate::link::node_channel_with_keys`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tonic::transport::server::Connected;
use zeroize::Zeroizing;

/// Opens every exchange, and names its version.
pub const MAGIC: &[u8; 8] = b"CRUXNA01";

/// How long a whole exchange may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

const RANDOM: usize = 32;
const PROOF: usize = 32;
const SERVER_HELLO: usize = MAGIC.len() + RANDOM;
const CLIENT_HELLO: usize = MAGIC.len() + 4 + RANDOM + PROOF;

/// The keys that prove membership: the primary (used to connect) and every installed one
/// (accepted), each with its key id. Wiped on drop.
pub struct NodeKeys {
    primary: u32,
    keys: Vec<(u32, Zeroizing<[u8; 32]>)>,
}

impl NodeKeys {
    /// `keys` by key id, the primary one first. None when `keys` is empty.
    pub fn new(keys: Vec<(u32, [u8; 32])>) -> Option<NodeKeys> {
        let primary = keys.first()?.0;
        Some(NodeKeys {
            primary,
            keys: keys
                .into_iter()
                .map(|(id, k)| (id, Zeroizing::new(k)))
                .collect(),
        })
    }

    fn key(&self, id: u32) -> Option<&[u8; 32]> {
        self.keys.iter().find(|(i, _)| *i == id).map(|(_, k)| &**k)
    }
}

impl std::fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKeys")
            .field("primary", &format_args!("{:08x}", self.primary))
            .field("keys", &self.keys.len())
            .finish()
    }
}

static KEYS: RwLock<Option<Arc<NodeKeys>>> = RwLock::new(None);

/// Connections a server refused, by reason: see [`Refused::reason`] and [`REASONS`].
static REFUSED: [AtomicU64; REASONS.len()] = [const { AtomicU64::new(0) }; REASONS.len()];

/// The reasons a server refuses a connection, as metrics label them.
pub const REASONS: [&str; 6] = [
    "io",
    "bad_magic",
    "unknown_key",
    "bad_proof",
    "timeout",
    "busy",
];

/// Counts a refused connection (`reason` one of [`REASONS`]).
pub fn count_refused(reason: &str) {
    if let Some(i) = REASONS.iter().position(|r| *r == reason) {
        REFUSED[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Connections refused since the process started, per reason of [`REASONS`].
pub fn refused() -> [(&'static str, u64); REASONS.len()] {
    std::array::from_fn(|i| (REASONS[i], REFUSED[i].load(Ordering::Relaxed)))
}

/// Bumped by every [`set_keys`], so that an [`Authed`] stream checks its key again.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Sets this process's keys (None: connections carry no exchange). Open connections made under
/// a key that is no longer among them fail at their next read or write.
pub fn set_keys(keys: Option<NodeKeys>) {
    *KEYS.write().unwrap_or_else(|e| e.into_inner()) = keys.map(Arc::new);
    GENERATION.fetch_add(1, Ordering::Release);
}

/// This process's keys, if set.
pub fn keys() -> Option<Arc<NodeKeys>> {
    KEYS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Refused {
    /// Its label among [`REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Io(_) => "io",
            Refused::BadMagic => "bad_magic",
            Refused::UnknownKey(_) => "unknown_key",
            Refused::BadProof => "bad_proof",
        }
    }
}

/// Why a server refused a connection.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The connection failed or closed during the exchange.
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The client does not speak this exchange (or another version of it).
    #[error("not a node handshake (bad magic)")]
    BadMagic,
    /// The client's key is not in our keyring.
    #[error("unknown key id {0:08x}")]
    UnknownKey(u32),
    /// The client's proof does not verify.
    #[error("bad proof")]
    BadProof,
}

fn proof(key: &[u8; 32], role: &[u8], s: &[u8], c: &[u8]) -> [u8; PROOF] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(s);
    mac.update(c);
    mac.finalize().into_bytes().into()
}

/// The client's side, on a connection just made. Fails when the server does not prove it
/// holds our primary key (or does not answer in kind).
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &NodeKeys,
) -> io::Result<u32> {
    let denied = |why: &str| io::Error::new(io::ErrorKind::PermissionDenied, why.to_string());
    let mut hello = [0u8; SERVER_HELLO];
    stream.read_exact(&mut hello).await?;
    let (magic, s) = hello.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(denied("the node does not speak the node handshake"));
    }
    let key = keys
        .key(keys.primary)
        .expect("the primary is among the keys");
    let mut c = [0u8; RANDOM];
    rand::rngs::OsRng.fill_bytes(&mut c);
    let mut out = Vec::with_capacity(CLIENT_HELLO);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&keys.primary.to_le_bytes());
    out.extend_from_slice(&c);
    out.extend_from_slice(&proof(key, b"client", s, &c));
    stream.write_all(&out).await?;
    stream.flush().await?;
    let mut theirs = [0u8; PROOF];
    stream.read_exact(&mut theirs).await?;
    if !bool::from(theirs.ct_eq(&proof(key, b"server", s, &c))) {
        return Err(denied("the node did not prove it holds our key"));
    }
    Ok(keys.primary)
}

/// The server's side, on a connection just accepted: the id of the key the client proved.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    keys: &NodeKeys,
) -> Result<u32, Refused> {
    let mut s = [0u8; RANDOM];
    rand::rngs::OsRng.fill_bytes(&mut s);
    let mut hello = Vec::with_capacity(SERVER_HELLO);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&s);
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut theirs = [0u8; CLIENT_HELLO];
    stream.read_exact(&mut theirs).await?;
    let (magic, rest) = theirs.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(Refused::BadMagic);
    }
    let (id, rest) = rest.split_at(4);
    let id = u32::from_le_bytes(id.try_into().expect("4 bytes"));
    let (c, their_proof) = rest.split_at(RANDOM);
    let key = keys.key(id).ok_or(Refused::UnknownKey(id))?;
    if !bool::from(their_proof.ct_eq(&proof(key, b"client", &s, c))) {
        return Err(Refused::BadProof);
    }
    stream.write_all(&proof(key, b"server", &s, c)).await?;
    stream.flush().await?;
    Ok(id)
}

/// A connection made under a key (or under none, with no keys set): it fails at the first read
/// or write after its key leaves this process's keys, so that removing a key from the keyring
/// cuts the connections it opened, as the flock drops its datagrams at once.
#[derive(Debug)]
pub struct Authed<S> {
    inner: S,
    key: Option<u32>,
    seen: u64,
    revoked: bool,
}

impl<S> Authed<S> {
    /// `inner`, made under key `key` (None: no exchange), checked against this process's keys.
    pub fn new(inner: S, key: Option<u32>) -> Authed<S> {
        Authed {
            inner,
            key,
            seen: GENERATION.load(Ordering::Acquire),
            revoked: false,
        }
    }

    /// `inner`, made under keys other than this process's: never cut by them.
    pub fn fixed(inner: S) -> Authed<S> {
        Authed::new(inner, None)
    }

    fn check(&mut self) -> io::Result<()> {
        if !self.revoked {
            let now = GENERATION.load(Ordering::Acquire);
            if now != self.seen {
                self.seen = now;
                if let (Some(id), Some(keys)) = (self.key, keys()) {
                    self.revoked = keys.key(id).is_none();
                }
            }
        }
        if self.revoked {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the key this connection was made under left the keyring",
            ));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Authed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Authed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for Authed<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[(u32, u8)]) -> NodeKeys {
        NodeKeys::new(list.iter().map(|&(id, b)| (id, [b; 32])).collect()).unwrap()
    }

    /// Runs both sides over an in-memory pipe; then checks that the connection still carries
    /// bytes both ways when both accepted.
    async fn exchange(
        client_keys: NodeKeys,
        server_keys: NodeKeys,
    ) -> (io::Result<u32>, Result<u32, Refused>) {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let r = server(&mut b, &server_keys).await;
            if r.is_ok() {
                b.write_all(b"ping").await.unwrap();
            }
            r
        });
        let c = client(&mut a, &client_keys).await;
        let s = server.await.unwrap();
        if c.is_ok() && s.is_ok() {
            let mut buf = [0u8; 4];
            a.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
        }
        (c, s)
    }

    #[tokio::test]
    async fn holders_of_a_shared_key_connect() {
        let (c, s) = exchange(keys(&[(1, 1)]), keys(&[(1, 1)])).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
        // During a rotation: the client's new primary is installed on the server, not yet used.
        let (c, s) = exchange(keys(&[(2, 2), (1, 1)]), keys(&[(1, 1), (2, 2)])).await;
        assert_eq!(
            (c.unwrap(), s.unwrap()),
            (2, 2),
            "both ends name the key used"
        );
    }

    #[tokio::test]
    async fn a_connection_fails_once_its_key_leaves_the_keyring() {
        // The only test of this binary that sets the process's keys.
        set_keys(Some(keys(&[(1, 1), (2, 2)])));
        let (a, b) = tokio::io::duplex(1024);
        let (mut a, mut b) = (Authed::new(a, Some(1)), Authed::new(b, Some(2)));
        a.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        b.read_exact(&mut buf).await.unwrap();
        // Key 2 becomes primary; key 1 stays installed: both still carry bytes.
        set_keys(Some(keys(&[(2, 2), (1, 1)])));
        a.write_all(b"two").await.unwrap();
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"two");
        // Key 1 is removed: the connection made under it fails both ways; the other carries on.
        set_keys(Some(keys(&[(2, 2)])));
        let e = a.write_all(b"three").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let e = a.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        b.write_all(b"ok").await.unwrap();
        // A connection made with no keys set is never cut by them.
        let (x, _y) = tokio::io::duplex(64);
        let mut x = Authed::new(x, None);
        set_keys(Some(keys(&[(3, 3)])));
        x.write_all(b"fine").await.unwrap();
        set_keys(None);
    }

    #[tokio::test]
    async fn a_key_the_server_does_not_hold_is_refused() {
        let (c, s) = exchange(keys(&[(3, 3)]), keys(&[(1, 1), (2, 2)])).await;
        assert!(matches!(s, Err(Refused::UnknownKey(3))), "{s:?}");
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn a_wrong_key_under_a_known_id_is_refused() {
        let (c, s) = exchange(keys(&[(1, 9)]), keys(&[(1, 1)])).await;
        assert!(matches!(s, Err(Refused::BadProof)), "{s:?}");
        assert!(c.is_err());
    }

    #[tokio::test]
    async fn a_server_without_our_key_is_not_trusted() {
        // An impostor that accepts any client but cannot prove the key.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let impostor = tokio::spawn(async move {
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&[7u8; RANDOM]);
            b.write_all(&hello).await.unwrap();
            let mut theirs = [0u8; CLIENT_HELLO];
            b.read_exact(&mut theirs).await.unwrap();
            b.write_all(&[0u8; PROOF]).await.unwrap();
            b
        });
        let r = client(&mut a, &keys(&[(1, 1)])).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        drop(impostor.await.unwrap());
    }

    #[tokio::test]
    async fn an_http2_client_without_the_exchange_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move { server(&mut b, &keys(&[(1, 1)])).await });
        // What a plain gRPC client sends first: the HTTP/2 preface and a SETTINGS frame.
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend_from_slice(&[0u8; CLIENT_HELLO]);
        a.write_all(&preface).await.unwrap();
        assert!(matches!(server.await.unwrap(), Err(Refused::BadMagic)));
    }

    #[tokio::test]
    async fn a_replayed_client_hello_is_refused() {
        // Record one good exchange's client hello, then play it to a new server: its random
        // differs, so the recorded proof does not verify.
        let (mut a, mut b) = tokio::io::duplex(1024);
        let k = keys(&[(1, 1)]);
        let server_keys = keys(&[(1, 1)]);
        let server1 = tokio::spawn(async move {
            let mut s = [0u8; RANDOM];
            rand::rngs::OsRng.fill_bytes(&mut s);
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&s);
            b.write_all(&hello).await.unwrap();
            let mut theirs = [0u8; CLIENT_HELLO];
            b.read_exact(&mut theirs).await.unwrap();
            theirs
        });
        let client1 = tokio::spawn(async move {
            let _ = client(&mut a, &k).await;
        });
        let recorded = server1.await.unwrap();
        client1.abort();
        let (mut x, mut y) = tokio::io::duplex(1024);
        let server2 = tokio::spawn(async move { server(&mut y, &server_keys).await });
        let mut hello = [0u8; SERVER_HELLO];
        x.read_exact(&mut hello).await.unwrap();
        x.write_all(&recorded).await.unwrap();
        assert!(matches!(server2.await.unwrap(), Err(Refused::BadProof)));
    }
}
