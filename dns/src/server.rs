//! The sockets, read here so that oversized, rate-limited and malformed packets are dropped and
//! counted before anything else (and nothing logs per packet above debug); both transports are
//! answered by one [`Handler`] on hickory-server's request and response types.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::{DNSClass, Record};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::forward::{self, Forwarder, FORWARDS_MAX};
use crate::limit::{udp_answer_limit, RateLimiter, EDNS_PAYLOAD_MAX};
use crate::{Catalog, DnsConfig, DnsError, DropReason, Reply, Stats, Zone, RATE_SOURCES_MAX};

/// A UDP query longer than this is dropped (a question with EDNS and a cookie is under 100
/// bytes; nothing this server answers needs more).
pub const UDP_QUERY_MAX: usize = 512;

/// A TCP connection that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// TCP connections served at once; past it new ones are closed at once (counted as
/// `rate_limited`).
pub const TCP_CONNECTIONS_MAX: usize = 256;

/// A bound DNS server, ready to run.
pub struct Dns {
    udp: Arc<UdpSocket>,
    tcp: TcpListener,
    handler: Handler,
    limiter: Mutex<RateLimiter>,
}

/// Answers requests, for both transports.
#[derive(Clone)]
pub struct Handler {
    inner: Arc<Inner>,
}

struct Inner {
    zone: Zone,
    catalog: Arc<dyn Catalog>,
    stats: Arc<Stats>,
    /// Upstreams for names outside the zone (None: REFUSED).
    forwarder: Option<Forwarder>,
    /// Forwards in flight, both transports.
    forward_slots: Arc<tokio::sync::Semaphore>,
}

impl Dns {
    /// Binds UDP and TCP on `config.bind` (port 0: one free port for both).
    pub async fn bind(
        config: &DnsConfig,
        catalog: Arc<dyn Catalog>,
        stats: Arc<Stats>,
    ) -> Result<Dns, DnsError> {
        let zone = Zone::new(&config.domain, config.ttl_s).map_err(DnsError::Domain)?;
        let bind_err = |addr, source| DnsError::Bind { addr, source };
        let udp = UdpSocket::bind(config.bind)
            .await
            .map_err(|e| bind_err(config.bind, e))?;
        let at = udp.local_addr().map_err(|e| bind_err(config.bind, e))?;
        let tcp = TcpListener::bind(at).await.map_err(|e| bind_err(at, e))?;
        Ok(Dns {
            udp: Arc::new(udp),
            tcp,
            handler: Handler {
                inner: Arc::new(Inner {
                    zone,
                    catalog,
                    stats,
                    forwarder: (!config.forward.is_empty()).then(|| Forwarder {
                        upstreams: config.forward.clone(),
                        timeout: config.forward_timeout,
                    }),
                    forward_slots: Arc::new(tokio::sync::Semaphore::new(FORWARDS_MAX)),
                }),
            },
            limiter: Mutex::new(RateLimiter::new(
                config.rate_per_s,
                config.burst,
                RATE_SOURCES_MAX,
            )),
        })
    }

    /// The address served (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.tcp
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Dns {
            udp,
            tcp,
            handler,
            limiter,
        } = self;
        let tcp_task = tokio::spawn(serve_tcp(tcp, handler.clone(), stop.clone()));
        let mut buf = vec![0u8; UDP_QUERY_MAX + 1];
        // Forwarded queries waiting for an upstream (aborted with the server).
        let mut forwards = tokio::task::JoinSet::new();
        loop {
            while forwards.try_join_next().is_some() {}
            let (len, src) = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = udp.recv_from(&mut buf) => match r {
                    Ok(got) => got,
                    Err(e) => {
                        debug!(error = %e, "dns: udp receive failed");
                        continue;
                    }
                },
            };
            let stats = &handler.inner.stats;
            if len > UDP_QUERY_MAX {
                stats.dropped(DropReason::Oversized);
                continue;
            }
            let allowed = limiter
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .allow(src.ip(), Instant::now());
            if !allowed {
                stats.dropped(DropReason::RateLimited);
                continue;
            }
            let request = match Request::from_bytes(buf[..len].to_vec(), src, Protocol::Udp) {
                Ok(r) => r,
                Err(e) => {
                    debug!(%src, error = %e, "dns: malformed query dropped");
                    stats.dropped(DropReason::Malformed);
                    continue;
                }
            };
            let limit = udp_answer_limit(len, request.edns.as_ref().map(Edns::max_payload));
            if let Some(fw) = handler.forwards(&request) {
                let Ok(slot) = handler.inner.forward_slots.clone().try_acquire_owned() else {
                    stats.forwarded("busy");
                    continue;
                };
                let query = buf[..len].to_vec();
                let (udp, stats) = (udp.clone(), stats.clone());
                forwards.spawn(async move {
                    let reply = fw.udp(&query).await;
                    stats.forwarded(if reply.is_some() { "ok" } else { "failed" });
                    if let Some(answer) = forward::udp_answer(&query, reply.as_deref(), limit) {
                        let _ = udp.send_to(&answer, src).await;
                    }
                    drop(slot);
                });
                continue;
            }
            let reply = UdpReply {
                socket: udp.clone(),
                dst: src,
                limit,
            };
            handler.respond(&request, reply).await;
        }
        forwards.shutdown().await;
        let _ = tcp_task.await;
    }
}

/// TCP: each connection in its own task (at most [`TCP_CONNECTIONS_MAX`]), one query after the
/// other, closed when idle for [`TCP_IDLE`] or on a malformed query (counted).
async fn serve_tcp(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(TCP_CONNECTIONS_MAX));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, src) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(got) => got,
                Err(e) => {
                    debug!(error = %e, "dns: tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            handler.inner.stats.dropped(DropReason::RateLimited);
            continue;
        };
        let handler = handler.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tcp_connection(stream, src, handler) => {}
            }
            drop(slot);
        });
    }
    conns.shutdown().await;
}

async fn tcp_connection(mut stream: tokio::net::TcpStream, src: SocketAddr, handler: Handler) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut query = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => vec![0u8; usize::from(len)],
            _ => return,
        };
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let raw = handler.inner.forwarder.is_some().then(|| query.clone());
        let request = match Request::from_bytes(query, src, Protocol::Tcp) {
            Ok(r) => r,
            Err(e) => {
                debug!(%src, error = %e, "dns: malformed tcp query, connection closed");
                handler.inner.stats.dropped(DropReason::Malformed);
                return;
            }
        };
        let answer = match (handler.forwards(&request), raw) {
            (Some(fw), Some(raw)) => handler.forward_tcp(&fw, &raw).await,
            _ => {
                let reply = TcpReply::default();
                handler.respond(&request, reply.clone()).await;
                let answer = reply.bytes.lock().unwrap_or_else(|p| p.into_inner()).take();
                answer
            }
        };
        let Some(answer) = answer else { continue };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let sent = async {
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&answer).await
        };
        if !matches!(tokio::time::timeout(TCP_IDLE, sent).await, Ok(Ok(()))) {
            return;
        }
    }
}

/// Holds one encoded TCP answer for its connection to write.
#[derive(Clone, Default)]
struct TcpReply {
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for TcpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_within(response, usize::from(u16::MAX))?;
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(info)
    }
}

fn no_reply(meta: &Metadata) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: Metadata::response_from_request(meta),
        counts: HeaderCounts::default(),
    })
}

impl Handler {
    /// The forwarder, when `request` is one question outside the zone and upstreams are set.
    pub fn forwards(&self, request: &Request) -> Option<Forwarder> {
        let fw = self.inner.forwarder.as_ref()?;
        let meta = &request.metadata;
        if meta.message_type != MessageType::Query
            || meta.op_code != OpCode::Query
            || request.queries.len() != 1
        {
            return None;
        }
        let name = request.queries.queries()[0].original().name();
        (!self.inner.zone.contains(name)).then(|| fw.clone())
    }

    /// A TCP query forwarded: the upstream's reply, or SERVFAIL (also when too many forwards
    /// are in flight).
    async fn forward_tcp(&self, fw: &Forwarder, raw: &[u8]) -> Option<Vec<u8>> {
        let stats = &self.inner.stats;
        let Ok(_slot) = self.inner.forward_slots.clone().try_acquire_owned() else {
            stats.forwarded("busy");
            return forward::minimal_reply(raw, 2, false, None);
        };
        let reply = fw.tcp(raw).await;
        stats.forwarded(if reply.is_some() { "ok" } else { "failed" });
        reply.or_else(|| forward::minimal_reply(raw, 2, false, None))
    }

    /// Answers `request` through `handle`; counts the answer, or the drop.
    pub async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
    ) -> ResponseInfo {
        let inner = &self.inner;
        let meta = &request.metadata;
        if meta.message_type != MessageType::Query {
            inner.stats.dropped(DropReason::NotQuery);
            return no_reply(meta);
        }
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD_MAX);
            e
        });
        let reply = if meta.op_code != OpCode::Query {
            Reply::with(ResponseCode::NotImp)
        } else if request.queries.len() != 1 {
            Reply::with(ResponseCode::FormErr)
        } else {
            let q = &request.queries.queries()[0];
            if matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
                inner
                    .zone
                    .answer(inner.catalog.as_ref(), q.original().name(), q.query_type())
            } else {
                Reply::with(ResponseCode::Refused)
            }
        };
        let mut md = Metadata::response_from_request(meta);
        md.response_code = reply.rcode;
        md.authoritative = !matches!(reply.rcode, ResponseCode::Refused | ResponseCode::NotImp);
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            md,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty::<&Record>(),
            reply.additionals.iter(),
        );
        match handle.send_response(response).await {
            Ok(info) => {
                inner.stats.answered(reply.rcode);
                info
            }
            Err(e) => {
                debug!(src = %request.src(), error = %e, "dns: answer not sent");
                inner.stats.dropped(DropReason::SendFailed);
                no_reply(meta)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.respond(request, response_handle).await
    }
}

/// Sends one UDP answer, cut to `limit` bytes (TC set when records were left out).
#[derive(Clone)]
struct UdpReply {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
    limit: usize,
}

/// Encodes `response` within `limit` bytes: records that do not fit are left out and TC is set.
pub fn encode_within<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    limit: usize,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let mut bytes = Vec::with_capacity(limit.min(1232));
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(u16::try_from(limit).unwrap_or(u16::MAX));
    let info = response
        .destructive_emit(&mut encoder)
        .map_err(|e| NetError::from(e.to_string()))?;
    Ok((info, bytes))
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = encode_within(response, self.limit)?;
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}
