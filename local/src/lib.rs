//! Crux's local plane: the listener of the agent's Unix socket, made so that every language's
//! stock gRPC client can call it with no client option, and discover it with no `.proto` file.
//!
//! # The `:authority` problem
//!
//! On a Unix socket there is no host name, and clients fill HTTP/2's `:authority` as they see
//! fit: Go and Node send `localhost`; gRPC's C core (Python, C++, Ruby, PHP, C#) sends the
//! percent-encoded socket path (`%2Frun%2Fcrux%2Freeve.sock`, since 1.57); grpc-java the raw
//! path; some send nothing. The `h2` crate under tonic parses `:authority` as a URI authority
//! and resets the stream (PROTOCOL_ERROR) when it is not one — so every call from Python fails
//! with `INTERNAL: Stream removed` (upstream: hyperium/h2 PR 487, still open; grpc/grpc issue
//! 38142; grpc-java issue 12664).
//!
//! # The fix: a connection-level layer, not a patched `h2`
//!
//! [`Normalize`] wraps each accepted connection and rewrites the client's bytes before `h2`
//! reads them ([`Rewriter`], sans-io): it follows the HTTP/2 frames, decodes every header block
//! with the client's HPACK table ([`hpack::Decoder`]), replaces an `:authority` that `h2` would
//! refuse (the same `http::uri::Authority` parser decides) by `localhost`, and re-encodes the
//! block with literals only, so `h2`'s HPACK table stays empty and cannot drift from the
//! client's. Everything else — DATA, SETTINGS, WINDOW_UPDATE, PING, RST_STREAM, GOAWAY, and
//! every byte the server writes — passes as it is. A connection that does not open with the
//! HTTP/2 preface passes untouched, and `h2` closes it as before.
//!
//! Why not `[patch.crates-io] h2` with the upstream change? A patch would (1) apply to every
//! HTTP/2 connection of the process, the node plane and every client included, where the
//! design wants no change; (2) freeze `h2` at the vendored copy: `cargo update` would no longer
//! bring `h2`'s security releases (rapid reset, CONTINUATION flood, …) until someone re-applied
//! the patch to each; (3) carry ~22,000 lines of someone else's code to change five. The layer
//! costs one HPACK decode per request on a local socket (DATA passes straight through), is ~900
//! lines that are ours (HPACK decoder and frame rewriter, docs included), pure and
//! property-tested, works with any `h2`, and goes away the day `h2` accepts these authorities:
//! the agent then serves `UnixListenerStream` instead of [`incoming`].
//!
//! Limits (all from the client's bytes, bounded): a header block is buffered up to
//! [`BLOCK_BYTES_MAX`] (more ends the connection, as `h2` ends one whose over-size block keeps
//! coming); a block that decodes to more than [`HEADER_LIST_MAX`] is handed on cut just past
//! that size, so `h2` refuses that one stream (HTTP 431, a gRPC error status) and the
//! connection serves on. A block that does not decode ends the connection (RFC 9113 §4.3).
//!
//! # Discovery
//!
//! [`Discovery`] is what generic tools (grpcurl, evans, Postman, `grpcio-reflection`) need:
//! gRPC server reflection, v1 and v1alpha, over the descriptors `crux-proto` builds, and
//! `grpc.health.v1`.
//!
//! **Never:** changes a byte the server writes, or anything in a request but `:authority` (and
//! HPACK's encoding of the rest); holds more than [`BLOCK_BYTES_MAX`] of a client's header
//! block; keeps state across connections other than the counters a caller hands in.

pub mod hpack;
mod huffman_table;
mod rewrite;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt};

pub use rewrite::{
    frame_header, header_frames, RewriteError, Rewriter, Seen, BLOCK_BYTES_MAX, FRAME_MAX,
    HEADER_LIST_MAX, LOCALHOST, OPEN_TRACKED_MAX, PREFACE, STREAMS_MAX,
};

/// Counters of the local listener, shared by its connections (one per agent; not global).
#[derive(Clone, Debug, Default)]
pub struct Stats(Arc<Counters>);

/// The counters behind [`Stats`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Header blocks re-encoded.
    pub blocks: AtomicU64,
    /// Requests whose `:authority` became `localhost`.
    pub authority_fixed: AtomicU64,
    /// Requests whose header list was over [`HEADER_LIST_MAX`] (refused by h2 with 431).
    pub header_list_over: AtomicU64,
    /// Connections that did not start with the HTTP/2 preface (HTTP/1.1 and others).
    pub not_http2: AtomicU64,
    /// Connections ended for a header block that did not decode.
    pub hpack_error: AtomicU64,
    /// Connections ended for a header block over [`BLOCK_BYTES_MAX`].
    pub block_too_large: AtomicU64,
    /// Connections ended for header framing that is a connection error.
    pub protocol_error: AtomicU64,
    /// HTTP/2 requests that are not gRPC (no `application/grpc` content type).
    pub not_grpc: AtomicU64,
    /// Calls answered UNIMPLEMENTED: unknown service or method.
    pub unimplemented: AtomicU64,
    /// Connections whose client went away (end of its bytes) with streams it had not ended.
    pub vanished: AtomicU64,
}

impl Stats {
    /// The counters.
    pub fn get(&self) -> &Counters {
        &self.0
    }

    /// Connections refused or ended by the layer, by reason (for a metric with a label).
    pub fn rejected(&self) -> [(&'static str, u64); 8] {
        let c = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("not_http2", l(&c.not_http2)),
            ("hpack", l(&c.hpack_error)),
            ("header_block_too_large", l(&c.block_too_large)),
            ("protocol", l(&c.protocol_error)),
            ("header_list_too_large", l(&c.header_list_over)),
            ("not_grpc", l(&c.not_grpc)),
            ("unimplemented", l(&c.unimplemented)),
            ("vanished", l(&c.vanished)),
        ]
    }
}

/// A server connection whose client bytes go through a [`Rewriter`]. Writes pass through.
#[derive(Debug)]
pub struct Normalize<S> {
    inner: S,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
    reported: Seen,
    stats: Stats,
    eof: bool,
}

impl<S> Normalize<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S, stats: Stats) -> Normalize<S> {
        stats.0.connections.fetch_add(1, Ordering::Relaxed);
        Normalize {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            reported: Seen::default(),
            stats,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn report(&mut self) {
        let now = self.rewriter.seen;
        let c = &self.stats.0;
        let add = |a: &AtomicU64, new: u64, old: u64| {
            if new > old {
                a.fetch_add(new - old, Ordering::Relaxed);
            }
        };
        add(&c.blocks, now.blocks, self.reported.blocks);
        add(
            &c.authority_fixed,
            now.authority_fixed,
            self.reported.authority_fixed,
        );
        add(
            &c.header_list_over,
            now.over_limit,
            self.reported.over_limit,
        );
        if now.not_http2 && !self.reported.not_http2 {
            c.not_http2.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("local API: a connection without the HTTP/2 preface");
        }
        self.reported = now;
    }

    /// The client's bytes ended (end of file, or an error such as the reset a Unix socket gives
    /// when its peer closed with our bytes unread): a client gone with streams it had not ended
    /// is counted once.
    fn end_of_input(&mut self) {
        if !self.eof && self.rewriter.open_streams() > 0 {
            self.stats.0.vanished.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                streams = self.rewriter.open_streams(),
                "local API: client gone mid-stream"
            );
        }
        self.eof = true;
    }

    fn failed(&self, e: RewriteError) -> io::Error {
        let c = &self.stats.0;
        match e {
            RewriteError::Hpack(_) => &c.hpack_error,
            RewriteError::BlockTooLarge => &c.block_too_large,
            RewriteError::Protocol(_) => &c.protocol_error,
        }
        .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "local API: connection ended");
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Normalize<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos >= this.out.len() && this.rewriter.direct() > 0 {
                return this.poll_direct(cx, buf);
            }
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            if let Err(e) = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb)) {
                this.end_of_input();
                return Poll::Ready(Err(e));
            }
            let got = rb.filled();
            if got.is_empty() {
                this.end_of_input();
                return Poll::Ready(Ok(()));
            }
            this.out.clear();
            this.out_pos = 0;
            if let Err(e) = this.rewriter.push(got, &mut this.out) {
                return Poll::Ready(Err(this.failed(e)));
            }
            this.report();
        }
    }
}

impl<S: AsyncRead + Unpin> Normalize<S> {
    /// The fast path for bulk bytes (DATA payloads): read straight into the caller's buffer;
    /// whatever came past the bytes that pass unchanged goes through the rewriter.
    fn poll_direct(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        if let Err(e) = ready!(Pin::new(&mut self.inner).poll_read(cx, buf)) {
            self.end_of_input();
            return Poll::Ready(Err(e));
        }
        let got = buf.filled().len() - before;
        if got == 0 {
            self.end_of_input();
            return Poll::Ready(Ok(()));
        }
        let pass = got.min(self.rewriter.direct());
        self.rewriter.skip(pass);
        if got > pass {
            let extra = buf.filled()[before + pass..].to_vec();
            buf.set_filled(before + pass);
            self.out.clear();
            self.out_pos = 0;
            if let Err(e) = self.rewriter.push(&extra, &mut self.out) {
                return Poll::Ready(Err(self.failed(e)));
            }
            self.report();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Normalize<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Normalize<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections of `listener`, each wrapped in [`Normalize`]: hand it to tonic's
/// `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: UnixListener,
    stats: Stats,
) -> impl Stream<Item = io::Result<Normalize<UnixStream>>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(move |c| c.map(|s| Normalize::new(s, stats.clone())))
}

/// Reflection (v1 and v1alpha) and health for the local socket.
pub struct Discovery<V1, V1a> {
    /// `grpc.reflection.v1.ServerReflection`.
    pub reflection_v1: V1,
    /// `grpc.reflection.v1alpha.ServerReflection` (what grpcurl and older tools ask first).
    pub reflection_v1alpha: V1a,
    /// `grpc.health.v1.Health`.
    pub health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    /// Sets what `health` answers, per service name ("" is the whole server).
    pub reporter: tonic_health::server::HealthReporter,
}

/// Why reflection could not be built: the descriptors do not decode. Not from the network; a
/// build error of `crux-proto`.
pub type DiscoveryError = tonic_reflection::server::Error;

/// Reflection over `crux-proto`'s descriptors and the health service's, listing only
/// `services` (fully qualified, e.g. `crux.reeve.v1.Reeve`) plus health and reflection (as
/// grpcurl's `list` shows a server's own); and a
/// health service that says SERVING for `""` and each of `services`.
pub async fn discovery(
    services: &[&str],
) -> Result<
    Discovery<
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    >,
    DiscoveryError,
> {
    let names: Vec<String> = services
        .iter()
        .map(|s| s.to_string())
        .chain(
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .map(String::from),
        )
        .collect();
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crux_proto::grpc::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for n in &names {
            b = b.with_service_name(n.clone());
        }
        b
    };
    let reflection_v1 = builder().build_v1()?;
    let reflection_v1alpha = builder().build_v1alpha()?;
    let reporter = tonic_health::server::HealthReporter::new();
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
    );
    for s in services {
        reporter
            .set_service_status(*s, tonic_health::ServingStatus::Serving)
            .await;
    }
    Ok(Discovery {
        reflection_v1,
        reflection_v1alpha,
        health,
        reporter,
    })
}

/// A tower layer for the local server that counts, into [`Stats`], requests that are not gRPC
/// and calls answered UNIMPLEMENTED (unknown service or method). It changes nothing.
#[derive(Clone, Debug)]
pub struct CountLayer(pub Stats);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Count<S>;

    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            stats: self.0.clone(),
        }
    }
}

/// The service [`CountLayer`] makes.
#[derive(Clone, Debug)]
pub struct Count<S> {
    inner: S,
    stats: Stats,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Count<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            self.stats.0.not_grpc.fetch_add(1, Ordering::Relaxed);
        }
        let stats = self.stats.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if res.headers().get("grpc-status").is_some_and(|v| v == "12") {
                stats.0.unimplemented.fetch_add(1, Ordering::Relaxed);
            }
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpack::{Encoder, Field};
    use tokio::io::AsyncReadExt;

    /// A reader that hands out its bytes in chunks of the given sizes.
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(c) = this.0.first_mut() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                c.drain(..n);
                if c.is_empty() {
                    this.0.remove(0);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    fn connection() -> Vec<u8> {
        let mut enc = Encoder::indexing();
        let mut b = PREFACE.to_vec();
        frame_header(0, 0x4, 0, 0, &mut b);
        for stream in [1u32, 3, 5] {
            let fields = [
                Field::new(":method", "POST"),
                Field::new(":scheme", "http"),
                Field::new(":path", "/a.B/C"),
                Field::new(":authority", "%2Frun%2Fx.sock"),
            ];
            header_frames(&mut enc, stream, &fields, false, &mut b);
            let body: Vec<u8> = (0..40_000u32).map(|i| (i * stream) as u8).collect();
            for part in body.chunks(FRAME_MAX) {
                frame_header(part.len(), 0x0, 0, stream, &mut b);
                b.extend_from_slice(part);
            }
            frame_header(0, 0x0, 0x1, stream, &mut b);
        }
        b
    }

    /// The fast path for DATA gives the server the same bytes as the rewriter alone, whatever
    /// the chunking of the client's bytes and the reader's buffer size.
    #[test]
    fn direct_reads_give_what_the_rewriter_gives() {
        let input = connection();
        let mut want = Vec::new();
        Rewriter::new().push(&input, &mut want).unwrap();
        assert_ne!(want, input, "the authority was rewritten");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (chunk, read_buf) in [(1, 7), (7, 1), (100, 64), (5000, 16384), (input.len(), 3)] {
            let chunks = input.chunks(chunk).map(|c| c.to_vec()).collect();
            let mut n = Normalize::new(Chunks(chunks), Stats::default());
            let mut got = Vec::new();
            rt.block_on(async {
                let mut b = vec![0u8; read_buf];
                loop {
                    let k = n.read(&mut b).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&b[..k]);
                }
            });
            assert!(got == want, "chunks of {chunk}, reads of {read_buf}");
            assert_eq!(n.stats.get().authority_fixed.load(Ordering::Relaxed), 3);
        }
    }
}
