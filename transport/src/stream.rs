//! An established node-plane connection: TLS over TCP, whose peer the flock lists, which closes
//! itself when that stops being true.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crux_proto::flock::{NodeId, NodeKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tonic::transport::server::Connected;

use crate::{Inner, Reason};

/// Who is at the other end of a node-plane connection, as proven by its handshake. The node
/// gRPC services find it in each request's extensions ([`crate::peer`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node id, as the flock lists it for [`PeerInfo::key`].
    pub node: NodeId,
    /// The key the peer proved it holds.
    pub key: NodeKey,
    /// The peer's socket address.
    pub remote: SocketAddr,
    /// Ours.
    pub local: SocketAddr,
    /// The id of the bloc key both sides proved (0 without keys).
    pub bloc_key: u32,
}

/// One node-plane connection. Reads and writes fail, and the connection closes, once its peer's
/// key is no longer listed or its bloc key leaves the keyring (see
/// [`crate::Transport::set_peers`]); a record that fails to decrypt (tampering) ends it too.
pub struct NodeStream {
    tls: tokio_rustls::TlsStream<TcpStream>,
    info: PeerInfo,
    closed: Pin<Box<WaitForCancellationFutureOwned>>,
    inner: Arc<Inner>,
    conn: u64,
    failed: bool,
}

impl std::fmt::Debug for NodeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeStream")
            .field("peer", &self.info)
            .finish_non_exhaustive()
    }
}

impl NodeStream {
    pub(crate) fn new(
        tls: tokio_rustls::TlsStream<TcpStream>,
        info: PeerInfo,
        inner: Arc<Inner>,
    ) -> NodeStream {
        let (conn, token) = inner.register(&info);
        NodeStream {
            tls,
            info,
            closed: Box::pin(token.cancelled_owned()),
            inner,
            conn,
            failed: false,
        }
    }

    /// The peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }

    /// Fails once the connection was revoked.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "node-plane connection revoked (peer no longer listed by the flock, or its bloc key removed)",
            ));
        }
        Ok(())
    }

    /// Counts a record that did not decrypt or parse (once per connection).
    fn observe<T>(&mut self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            let tls = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if let Some(tls) = tls {
                if !self.failed && !matches!(tls, rustls::Error::AlertReceived(_)) {
                    self.failed = true;
                    self.inner
                        .reject(Reason::Tampered, self.info.remote, &format_args!("{tls}"));
                }
            }
        }
        r
    }
}

impl Drop for NodeStream {
    fn drop(&mut self) {
        self.inner.unregister(self.conn);
    }
}

impl AsyncRead for NodeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let r = Pin::new(&mut self.tls).poll_read(cx, buf);
        self.observe(r)
    }
}

impl AsyncWrite for NodeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        let r = Pin::new(&mut self.tls).poll_write(cx, buf);
        self.observe(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        let r = Pin::new(&mut self.tls).poll_write_vectored(cx, bufs);
        self.observe(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let r = Pin::new(&mut self.tls).poll_flush(cx);
        self.observe(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

impl Connected for NodeStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}
