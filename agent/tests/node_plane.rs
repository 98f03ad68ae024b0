//! The node plane between real `crux agent` processes on loopback (issue 15, items 4 and 5).
//!
//! * **Tampering ends the connection, never a write** (item 4). Each agent gets a node gRPC
//!   port of its own ([`Cluster::own_grpc_ports`]). An agent dials a peer at the peer's flock IP
//!   and its *own* port, so agent j reaches agent k at `ip_k:P_j`, where the test binds a TCP
//!   proxy to `ip_k:P_k` ([`Plane`]): registry links, store status calls, dean syncs and the Raft
//!   traffic of the members the flock leader set up pass through the test, which can record,
//!   flip a bit, inject bytes or cut a connection. (Not everything goes that way: a Raft member's
//!   address is the one the flock leader computed with *its* port, so connections to the flock
//!   leader's store go straight to its port, and pastiche pieces go to the holder's registered
//!   NetID. Each test below picks connections that do pass.) No production hook is used.
//! * **A capture finds nothing** (item 5): a raw `AF_PACKET` capture of the loopback interface
//!   while a 3-node flock registers a service, writes a document and moves a pastiche artifact,
//!   each with a marker; the capture holds node-plane bytes but no marker, no HTTP/2 preface
//!   and no gRPC path in clear. Where packet capture is refused it falls back to the proxies'
//!   recordings, and says so.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crux_proto::grpc::reeve::v1 as pb;
use crux_proto::grpc::store::v1 as store_pb;
use crux_tests::cluster::Cluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

mod common;
use common::{put_doc, reeve, runtime, status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
/// How long a tampered connection may take to close, a counter to move, a write to land.
const PROMPT: Duration = Duration::from_secs(15);
/// The HTTP/2 connection preface, what every cleartext gRPC connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// TLS record content types (RFC 8446 §5.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// A string no earlier run or other test used.
fn marker(what: &str) -> String {
    use rand::RngCore;
    format!("{what}-{:016x}", rand::rngs::OsRng.next_u64())
}

// ---------------------------------------------------------------------------------------------
// The proxies in the middle.

/// Largest recording kept per direction of one proxied connection.
const RECORDING_MAX: usize = 16 << 20;

/// What a proxy does to the client-to-server bytes of one connection, once.
enum Tamper {
    /// Flips bit 0 of the middle byte of the next application-data record whose body is at least
    /// `min_body` bytes, unless a connection armed with the same `once` did so first.
    Flip {
        min_body: usize,
        once: Arc<AtomicBool>,
    },
    /// Writes these bytes to the server at the next record boundary.
    Inject(Vec<u8>),
}

/// One connection through a proxy: who dialled whom, every byte each way, what was done to it.
struct Conn {
    /// The node whose flock IP the connection came from.
    dialer: Option<usize>,
    /// The node it was forwarded to.
    target: usize,
    /// The target's own node port.
    upstream: SocketAddr,
    opened: Instant,
    c2s: Mutex<Vec<u8>>,
    s2c: Mutex<Vec<u8>>,
    c2s_bytes: AtomicU64,
    s2c_bytes: AtomicU64,
    truncated: AtomicBool,
    /// Complete TLS records forwarded client to server.
    records: AtomicUsize,
    tamper: Mutex<Option<Tamper>>,
    wake: tokio::sync::Notify,
    /// What the proxy did, once it did it.
    tampered: Mutex<Option<String>>,
    /// How the connection ended, first.
    end: Mutex<Option<End>>,
    /// The client closed first, and then the server closed by itself (the client's close not
    /// passed on).
    server_closed_after_client: AtomicBool,
    /// Bytes the server had sent when the proxy tampered.
    s2c_at_tamper: AtomicU64,
    ended: CancellationToken,
}

/// What ended a proxied connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    ClientClosed,
    ClientReset,
    ClientWrite,
    ServerClosed,
    ServerReset,
    ServerWrite,
    ServerUnreachable,
    Cut,
}

impl Conn {
    fn end(&self, end: End) {
        self.end.lock().unwrap().get_or_insert(end);
        self.ended.cancel();
    }

    /// The server (the receiving agent) ended the connection: closed it, reset it, or stopped
    /// taking its bytes.
    fn server_ended(&self) -> bool {
        match *self.end.lock().unwrap() {
            Some(End::ServerClosed | End::ServerReset | End::ServerWrite) => true,
            Some(End::ClientClosed | End::ClientReset | End::ClientWrite) => {
                self.server_closed_after_client.load(Ordering::SeqCst)
            }
            _ => false,
        }
    }

    fn record(&self, c2s: bool, bytes: &[u8]) {
        let (rec, total) = if c2s {
            (&self.c2s, &self.c2s_bytes)
        } else {
            (&self.s2c, &self.s2c_bytes)
        };
        total.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        let mut rec = rec.lock().unwrap();
        if rec.len() + bytes.len() > RECORDING_MAX {
            self.truncated.store(true, Ordering::SeqCst);
        } else {
            rec.extend_from_slice(bytes);
        }
    }

    /// Open, past its handshake and bloc proof, and carrying HTTP/2 for a while.
    fn settled(&self) -> bool {
        !self.ended.is_cancelled()
            && self.records.load(Ordering::SeqCst) >= 6
            && self.s2c_bytes.load(Ordering::SeqCst) > 0
            && self.opened.elapsed() >= Duration::from_secs(1)
    }

    fn arm(&self, t: Tamper) {
        *self.tamper.lock().unwrap() = Some(t);
        self.wake.notify_one();
    }

    fn tampered(&self) -> Option<String> {
        self.tampered.lock().unwrap().clone()
    }

    fn describe(&self) -> String {
        format!(
            "node{} -> node{} ({}), {} records / {} bytes out, {} bytes back{}",
            self.dialer.map_or("?".into(), |d| d.to_string()),
            self.target,
            self.upstream,
            self.records.load(Ordering::SeqCst),
            self.c2s_bytes.load(Ordering::SeqCst),
            self.s2c_bytes.load(Ordering::SeqCst),
            match *self.end.lock().unwrap() {
                Some(e) if self.tampered().is_some() => format!(
                    ", ended ({e:?}{}, {} bytes back after the tampering)",
                    if self.server_closed_after_client.load(Ordering::SeqCst) {
                        ", then the server closed too"
                    } else {
                        ""
                    },
                    self.s2c_bytes.load(Ordering::SeqCst)
                        - self.s2c_at_tamper.load(Ordering::SeqCst)
                ),
                Some(e) => format!(", ended ({e:?})"),
                None => String::new(),
            }
        )
    }

    /// Flips a bit of `rec` (the record at `index`) if a flip is armed and the record qualifies.
    fn maybe_flip(&self, index: usize, rec: &mut [u8]) {
        let mut t = self.tamper.lock().unwrap();
        let Some(Tamper::Flip { min_body, once }) = &*t else {
            return;
        };
        let body = rec.len() - 5;
        // Records 0-2 are the ClientHello, the compatibility ChangeCipherSpec and the client's
        // encrypted Finished flight: a flip must come after the handshake.
        if rec[0] != APPLICATION_DATA || index < 3 || body < *min_body {
            return;
        }
        if !once.swap(true, Ordering::SeqCst) {
            rec[5 + body / 2] ^= 0x01;
            self.s2c_at_tamper
                .store(self.s2c_bytes.load(Ordering::SeqCst), Ordering::SeqCst);
            *self.tampered.lock().unwrap() = Some(format!(
                "flipped bit 0 of byte {} of the {body}-byte body of client record {index}",
                body / 2
            ));
        }
        *t = None;
    }
}

/// Client to server: forwarded record by record (TLS record headers are in clear), so a flip
/// lands inside a record's ciphertext and an injection between two records.
async fn client_to_server(conn: &Conn, from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> End {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut raw = false;
    loop {
        if pending.is_empty() {
            let inject = {
                let mut t = conn.tamper.lock().unwrap();
                match t.take() {
                    Some(Tamper::Inject(b)) => Some(b),
                    other => {
                        *t = other;
                        None
                    }
                }
            };
            if let Some(bytes) = inject {
                conn.s2c_at_tamper
                    .store(conn.s2c_bytes.load(Ordering::SeqCst), Ordering::SeqCst);
                *conn.tampered.lock().unwrap() = Some(format!(
                    "injected {} plaintext bytes after client record {}",
                    bytes.len(),
                    conn.records.load(Ordering::SeqCst)
                ));
                if to.write_all(&bytes).await.is_err() {
                    return End::ServerWrite;
                }
            }
        }
        let n = tokio::select! {
            _ = conn.wake.notified() => continue,
            r = from.read(&mut buf) => match r {
                Ok(0) => return End::ClientClosed,
                Err(_) => return End::ClientReset,
                Ok(n) => n,
            },
        };
        conn.record(true, &buf[..n]);
        if raw {
            if to.write_all(&buf[..n]).await.is_err() {
                return End::ServerWrite;
            }
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        while pending.len() >= 5 {
            if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&pending[0]) {
                // Not TLS: pass it on as it is.
                raw = true;
                if to.write_all(&pending).await.is_err() {
                    return End::ServerWrite;
                }
                pending.clear();
                break;
            }
            let len = 5 + u16::from_be_bytes([pending[3], pending[4]]) as usize;
            if pending.len() < len {
                break;
            }
            let mut rec: Vec<u8> = pending.drain(..len).collect();
            let index = conn.records.fetch_add(1, Ordering::SeqCst);
            conn.maybe_flip(index, &mut rec);
            if to.write_all(&rec).await.is_err() {
                return End::ServerWrite;
            }
        }
    }
}

async fn server_to_client(conn: &Conn, from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf) -> End {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => return End::ServerClosed,
            Err(_) => return End::ServerReset,
            Ok(n) => {
                conn.record(false, &buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    return End::ClientWrite;
                }
            }
        }
    }
}

async fn proxy_one(conn: Arc<Conn>, client: TcpStream, from_ip: IpAddr, stop: CancellationToken) {
    let server = async {
        let s = TcpSocket::new_v4()?;
        s.bind(SocketAddr::new(from_ip, 0))?;
        s.connect(conn.upstream).await
    };
    let server = match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.end(End::ServerUnreachable);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let end = tokio::select! {
        _ = stop.cancelled() => End::Cut,
        _ = conn.ended.cancelled() => End::Cut,
        e = client_to_server(&conn, &mut cr, &mut sw) => e,
        e = server_to_client(&conn, &mut sr, &mut cw) => e,
    };
    // The client went first after the proxy tampered (on the server's alert, say): does the
    // server close too, by itself? The client's close is not passed on while it is watched.
    if conn.tampered().is_some()
        && matches!(end, End::ClientClosed | End::ClientReset | End::ClientWrite)
    {
        drop((cr, cw));
        let mut buf = vec![0u8; 64 << 10];
        let closed = async {
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let by_itself = tokio::select! {
            _ = stop.cancelled() => false,
            r = tokio::time::timeout(PROMPT, closed) => r.is_ok(),
        };
        conn.server_closed_after_client
            .store(by_itself, Ordering::SeqCst);
    }
    // Both sockets close here.
    conn.end(end);
}

/// For every ordered pair of agents (j, k), a proxy on `ip_k:P_j` forwarding to `ip_k:P_k`.
struct Plane {
    rt: tokio::runtime::Runtime,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    stop: CancellationToken,
}

impl Plane {
    /// Binds the proxies (before the agents start, so that no dial misses them).
    fn new(c: &Cluster, ports: &[u16]) -> Plane {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let stop = CancellationToken::new();
        let ips: Vec<IpAddr> = c.agents.iter().map(|a| a.addr.ip()).collect();
        for (j, dial_port) in ports.iter().enumerate() {
            for (k, own_port) in ports.iter().enumerate() {
                if j == k {
                    continue;
                }
                let listen = SocketAddr::new(ips[k], *dial_port);
                let upstream = SocketAddr::new(ips[k], *own_port);
                let listener = rt
                    .block_on(TcpListener::bind(listen))
                    .unwrap_or_else(|e| panic!("bind proxy {listen}: {e}"));
                let (ips, conns, stop) = (ips.clone(), conns.clone(), stop.clone());
                rt.spawn(async move {
                    loop {
                        let (client, peer) = tokio::select! {
                            _ = stop.cancelled() => return,
                            r = listener.accept() => match r {
                                Ok(x) => x,
                                Err(_) => continue,
                            },
                        };
                        let conn = Arc::new(Conn {
                            dialer: ips.iter().position(|ip| *ip == peer.ip()).map(|i| i + 1),
                            target: k + 1,
                            upstream,
                            opened: now(),
                            c2s: Mutex::default(),
                            s2c: Mutex::default(),
                            c2s_bytes: AtomicU64::new(0),
                            s2c_bytes: AtomicU64::new(0),
                            truncated: AtomicBool::new(false),
                            records: AtomicUsize::new(0),
                            tamper: Mutex::new(None),
                            wake: tokio::sync::Notify::new(),
                            tampered: Mutex::new(None),
                            end: Mutex::new(None),
                            s2c_at_tamper: AtomicU64::new(0),
                            server_closed_after_client: AtomicBool::new(false),
                            ended: CancellationToken::new(),
                        });
                        conns.lock().unwrap().push(conn.clone());
                        tokio::spawn(proxy_one(conn, client, peer.ip(), stop.clone()));
                    }
                });
            }
        }
        Plane { rt, conns, stop }
    }

    fn conns(&self) -> Vec<Arc<Conn>> {
        self.conns.lock().unwrap().clone()
    }

    fn describe(&self) -> String {
        self.conns()
            .iter()
            .map(|c| format!("  {}\n", c.describe()))
            .collect()
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Sends `bytes` to `to` on a new connection from `from_ip`, and reads until the server closes
/// it. Ok(bytes the server sent) once it closed; Err if it was still open after `PROMPT`.
async fn send_and_wait_close(from_ip: IpAddr, to: SocketAddr, bytes: Vec<u8>) -> io::Result<usize> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from_ip, 0))?;
    let stream = s.connect(to).await?;
    let (mut r, mut w) = stream.into_split();
    // The server may stop reading and close while this is still being written.
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&bytes).await;
        w
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{to} still open after {PROMPT:?} ({got} bytes answered)"),
                ))
            }
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
        }
    }
    drop(writer.await);
    Ok(got)
}

// ---------------------------------------------------------------------------------------------
// What a cleartext gRPC request looks like, recorded from tonic itself.

/// One HTTP/2 frame: type, flags, stream id, payload.
type Frame<'a> = (u8, u8, u32, &'a [u8]);

/// HTTP/2 frames of `bytes`, after the connection preface if it starts with one; None where the
/// frames are cut short.
fn h2_frames(bytes: &[u8]) -> Option<Vec<Frame<'_>>> {
    let mut rest = bytes.strip_prefix(PREFACE).unwrap_or(bytes);
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest.len() < 9 {
            return None;
        }
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            return None;
        }
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
        out.push((rest[3], rest[4], stream, &rest[9..9 + len]));
        rest = &rest[9 + len..];
    }
    Some(out)
}

/// What a cleartext gRPC client (tonic, as the node services use it) writes to call the store's
/// `Forward` with a write of document `key` = `value`: the preface, its SETTINGS, the HEADERS
/// of `/crux.store.v1.Store/Forward` and the DATA of the request, up to the end of its stream.
fn cleartext_store_write(key: &str, value: &str) -> Vec<u8> {
    runtime().block_on(async {
        let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
        let slot = Arc::new(Mutex::new(Some(client_io)));
        let channel = tonic::transport::Endpoint::from_static("http://node.crux")
            .connect_with_connector_lazy(tower::service_fn(move |_: tonic::transport::Uri| {
                let io = slot.lock().unwrap().take();
                async move {
                    io.map(hyper_util::rt::TokioIo::new)
                        .ok_or_else(|| io::Error::other("one connection only"))
                }
            }));
        let json = serde_json::to_vec(&serde_json::json!({
            "Write": crux_store::Command::DocPut {
                key: key.into(),
                value: value.into(),
                if_generation: None,
            }
        }))
        .expect("JSON");
        let call = tokio::spawn(async move {
            let mut client = store_pb::store_client::StoreClient::new(channel);
            let _ = client
                .forward(store_pb::RaftMessage {
                    json,
                    data: Vec::new(),
                    group: String::new(),
                })
                .await;
        });
        // Play the server: an empty SETTINGS, then read until the request's stream ends.
        server_io
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .expect("write SETTINGS");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let complete = |got: &[u8]| {
            h2_frames(got).is_some_and(|f| {
                f.iter()
                    .any(|(t, flags, stream, _)| *t == 0 && flags & 1 == 1 && *stream == 1)
            })
        };
        while !complete(&got) {
            let n = tokio::time::timeout(Duration::from_secs(10), server_io.read(&mut buf))
                .await
                .expect("tonic wrote the request")
                .expect("read");
            assert!(n > 0, "tonic closed before the request was complete");
            got.extend_from_slice(&buf[..n]);
        }
        call.abort();
        got
    })
}

/// The HEADERS and DATA frames of stream 1 of `recorded`, moved to stream 2^31 - 1: what an
/// on-path attacker would slip into an established cleartext HTTP/2 connection (a new stream
/// above any the client opened, its header block self-contained as the first one sent).
fn as_injected_stream(recorded: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, flags, stream, payload) in h2_frames(recorded).expect("whole frames") {
        if stream != 1 || !matches!(t, 0 | 1 | 9) {
            continue;
        }
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(t);
        out.push(flags);
        out.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
        out.extend_from_slice(payload);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// What to look for in clear.

/// HPACK Huffman codes (RFC 7541 appendix B) of the characters of the gRPC package prefixes.
const HUFFMAN: &[(u8, u32, u8)] = &[
    (b'.', 0x17, 6),
    (b'/', 0x18, 6),
    (b'0', 0x0, 5),
    (b'1', 0x1, 5),
    (b'a', 0x3, 5),
    (b'c', 0x4, 5),
    (b'd', 0x24, 6),
    (b'e', 0x5, 5),
    (b'h', 0x27, 6),
    (b'i', 0x6, 5),
    (b'o', 0x7, 5),
    (b'p', 0x2b, 6),
    (b'r', 0x2c, 6),
    (b's', 0x8, 5),
    (b't', 0x9, 5),
    (b'u', 0x2d, 6),
    (b'v', 0x77, 7),
    (b'w', 0x78, 7),
    (b'x', 0x79, 7),
];

/// The whole bytes of `text` Huffman-coded as HPACK codes a header value (h2, hence tonic,
/// always does): a `:path` starting with `text` starts with these bytes.
fn huffman_prefix(text: &str) -> Vec<u8> {
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for ch in text.bytes() {
        let (_, code, len) = HUFFMAN
            .iter()
            .find(|(c, _, _)| *c == ch)
            .unwrap_or_else(|| panic!("no Huffman code for {:?}", ch as char));
        acc = (acc << len) | u64::from(*code);
        bits += u32::from(*len);
        while bits >= 8 {
            out.push((acc >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// The node services' gRPC packages: a path of any node call starts with one of them.
const PACKAGES: &[&str] = &[
    "/crux.store.v1.",
    "/crux.steward.v1.",
    "/crux.pastiche.v1.",
    "/crux.proctor.v1.",
    "/crux.reeve.v1.",
];

/// Signs of cleartext in `bytes`: each marker, the HTTP/2 preface, a gRPC path (as ASCII, or as
/// the Huffman code of one of the node services' packages). Empty: none.
fn cleartext_signs(bytes: &[u8], markers: &[&str]) -> Vec<String> {
    let mut needles: Vec<(String, Vec<u8>)> = markers
        .iter()
        .map(|m| (format!("marker {m:?}"), m.as_bytes().to_vec()))
        .collect();
    needles.push(("the HTTP/2 preface".into(), b"PRI * HTTP/2.0".to_vec()));
    needles.push(("a gRPC path \"/crux.\"".into(), b"/crux.".to_vec()));
    for p in PACKAGES {
        needles.push((format!("a gRPC path {p:?} (HPACK)"), huffman_prefix(p)));
    }
    needles
        .into_iter()
        .filter(|(_, n)| memchr::memmem::find(bytes, n).is_some())
        .map(|(what, _)| what)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The flock under test.

/// Waits until node 1 sees three voters and a Raft leader; its status then, with the leader's
/// node index.
fn three_voters(c: &Cluster) -> (common::Status, usize) {
    c.wait_for("three voters and a leader", CONVERGE, || {
        let s = status(c, 1)?;
        if s.voters.len() != 3 || s.leader_id.is_empty() {
            return Err(format!("{s:?}"));
        }
        let leader = c
            .index_of(&s.leader_id)
            .ok_or_else(|| format!("leader {} is none of the nodes", s.leader_id))?;
        Ok((s, leader))
    })
}

/// Three agents, each with a node port of its own and a proxy on every path between two of
/// them; started, agreed, with a store of three voters. Returns the flock leader's index too.
fn proxied_flock(test_id: u8) -> (Cluster, Plane, usize) {
    let mut c = Cluster::new(BIN, test_id, 3, PRESET);
    let ports = c.own_grpc_ports();
    let plane = Plane::new(&c, &ports);
    c.start_all();
    let leader = c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let leader = c.index_of(&leader.id).expect("a node leads");
    let (_, m) = three_voters(&c);
    eprintln!("flock leader node{leader}, Raft leader node{m}");
    (c, plane, leader)
}

/// Node k's own copy of document `key` (value, generation), read from its replica (a
/// `DocWatch`'s opening listing), not through the Raft leader.
fn local_doc(c: &Cluster, k: usize, key: &str) -> Result<Option<(String, u64)>, String> {
    runtime().block_on(async {
        let mut s = reeve(c, k)
            .await
            .doc_watch(pb::DocWatchRequest { prefix: key.into() })
            .await
            .map_err(|e| format!("node{k}: {}", e.message()))?
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .map_err(|_| format!("node{k}: no listing"))?
            .map_err(|e| format!("node{k}: {}", e.message()))?
            .ok_or_else(|| format!("node{k}: watch ended"))?;
        if !first.reset {
            return Err(format!("node{k}: the watch did not open with a listing"));
        }
        Ok((first.key == key).then_some((first.value, first.generation)))
    })
}

/// Document `key` through node k's store API (a linearizable read at the Raft leader).
fn leader_doc(c: &Cluster, k: usize, key: &str) -> Result<Option<String>, String> {
    runtime().block_on(async {
        let r = reeve(c, k)
            .await
            .doc_get(pb::DocGetRequest { key: key.into() })
            .await
            .map_err(|e| format!("node{k}: {}", e.message()))?
            .into_inner();
        Ok(r.found.then_some(r.value))
    })
}

/// Waits until every node's own copy of `key` has `value`; returns its generation.
fn everywhere(c: &Cluster, key: &str, value: &str) -> u64 {
    c.wait_for(&format!("{key} on every node"), PROMPT, || {
        let mut gens = Vec::new();
        for k in 1..=c.agents.len() {
            match local_doc(c, k, key)? {
                Some((v, g)) if v == value => gens.push(g),
                Some((v, g)) => {
                    return Err(format!(
                        "node{k} holds {key} = {}… (generation {g})",
                        &v[..v.len().min(60)]
                    ))
                }
                None => return Err(format!("node{k} does not hold {key}")),
            }
        }
        if gens.windows(2).all(|w| w[0] == w[1]) {
            Ok(gens[0])
        } else {
            Err(format!("generations differ: {gens:?}"))
        }
    })
}

/// Asserts that no node holds `key`, in its own copy or through the Raft leader.
fn nowhere(c: &Cluster, key: &str) {
    for k in 1..=c.agents.len() {
        let local = c.wait_for(&format!("node{k}'s copy"), PROMPT, || local_doc(c, k, key));
        assert_eq!(local, None, "node{k} holds {key} in its copy");
        let read = c.wait_for(&format!("a read on node{k}"), PROMPT, || {
            leader_doc(c, k, key)
        });
        assert_eq!(read, None, "node{k} reads {key}");
    }
}

/// A write made after the tampering, on node k, lands on every node: the flock still works.
fn still_works(c: &Cluster, k: usize, what: &str) {
    let key = marker(&format!("np-after-{what}"));
    c.wait_for(&format!("a write on node{k}"), PROMPT, || {
        put_doc(c, k, &key, "ok")
    });
    everywhere(c, &key, "ok");
}

/// `crux_node_plane_rejected_total{reason}` of every node, by node index.
fn rejected(c: &Cluster, reason: &str) -> Vec<u64> {
    (1..=c.agents.len())
        .map(|k| {
            c.wait_for(&format!("node{k}'s metrics"), PROMPT, || {
                c.node_plane_rejected(k)
            })
            .get(reason)
            .copied()
            .unwrap_or(0)
        })
        .collect()
}

/// Waits until the `reason` counters are exactly `want` on every node.
fn wait_rejected(c: &Cluster, plane: &Plane, reason: &str, want: &[u64]) {
    c.wait_for(&format!("{reason} refusals {want:?}"), PROMPT, || {
        let got = rejected(c, reason);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{reason} counts {got:?}, want {want:?}; connections:\n{}",
                plane.describe()
            ))
        }
    });
}

/// Waits until a new connection from `dialer` (any node: None) to `target` through the
/// proxies, opened after `after`, has carried requests and answers: the agents reconnected.
fn wait_reconnected(
    c: &Cluster,
    plane: &Plane,
    dialer: Option<usize>,
    target: usize,
    after: Instant,
) {
    let from = dialer.map_or("a node".into(), |d| format!("node{d}"));
    c.wait_for(
        &format!("a new connection {from} -> node{target}"),
        PROMPT,
        || {
            plane
                .conns()
                .iter()
                .find(|x| {
                    dialer.is_none_or(|d| x.dialer == Some(d))
                        && x.target == target
                        && x.opened > after
                        && x.settled()
                })
                .map(|_| ())
                .ok_or_else(|| plane.describe())
        },
    );
}

/// A value of about `len` bytes that carries `marker` at both ends.
fn big_value(marker: &str, len: usize) -> String {
    format!("{marker}:{}:{marker}", "x".repeat(len))
}

// ---------------------------------------------------------------------------------------------
// Item 4.

/// A bit flipped inside a record of an established connection (the record carrying a document
/// the Raft leader replicates to a follower) makes the follower close that connection and count
/// it as `tampered`; no node ever holds an altered document (AES-GCM and ChaCha20 are stream
/// ciphers underneath: without the tag check, the flip would land as a flipped character of the
/// value), and the leader reaches the follower again over a new connection.
#[test]
fn a_flipped_bit_ends_the_connection_and_is_never_written() {
    let (c, plane, _) = proxied_flock(1);
    let (_, m) = three_voters(&c);
    c.wait_for(
        &format!("a connection from the Raft leader node{m} through the proxies"),
        PROMPT,
        || {
            plane
                .conns()
                .iter()
                .any(|x| x.dialer == Some(m) && x.settled())
                .then_some(())
                .ok_or_else(|| plane.describe())
        },
    );
    let before = rejected(&c, "tampered");
    let key = marker("np-flip");
    let value = big_value(&key, 8_000);
    // Every connection the Raft leader dialled through the proxies is armed; the first record
    // of over 6000 bytes it sends after this (the write below, replicated) gets the flip.
    let once = Arc::new(AtomicBool::new(false));
    for x in plane.conns().iter().filter(|x| x.dialer == Some(m)) {
        x.arm(Tamper::Flip {
            min_body: 6_000,
            once: once.clone(),
        });
    }
    let armed = now();
    c.wait_for(&format!("a write on node{m}"), PROMPT, || {
        put_doc(&c, m, &key, &value)
    });
    let victim = c.wait_for("the flip", PROMPT, || {
        plane
            .conns()
            .into_iter()
            .find(|x| x.tampered().is_some())
            .ok_or_else(|| plane.describe())
    });
    let k = victim.target;
    c.wait_for("the receiving node to close the connection", PROMPT, || {
        victim
            .server_ended()
            .then_some(())
            .ok_or_else(|| victim.describe())
    });
    eprintln!(
        "tampered: {} on {}",
        victim.tampered().unwrap(),
        victim.describe()
    );
    let mut want = before.clone();
    want[k - 1] += 1;
    wait_rejected(&c, &plane, "tampered", &want);
    // Every node holds the document exactly as written, the receiving node too (sent again
    // over a new connection); none holds an altered one under this prefix.
    everywhere(&c, &key, &value);
    for n in 1..=3 {
        let (v, _) = local_doc(&c, n, &key).unwrap().expect("held");
        assert_eq!(v, value, "node{n} holds an altered document");
    }
    wait_reconnected(&c, &plane, Some(m), k, armed);
    still_works(&c, k, "flip");
    assert_eq!(
        rejected(&c, "tampered"),
        want,
        "one tampered connection only"
    );
}

/// A well-formed cleartext store write (HTTP/2 HEADERS of `/crux.store.v1.Store/Forward` and
/// its DATA, as tonic writes them) slipped between two records into each established
/// connection of one member to the Raft leader: the leader closes each and counts it as
/// `tampered`. Sent on a connection of its own (preface, SETTINGS, HEADERS, DATA), it is
/// refused as `tls`. The document is never written; the member reconnects and the flock keeps
/// working.
#[test]
fn injected_cleartext_frames_end_the_connection_and_write_nothing() {
    let (c, plane, leader) = proxied_flock(2);
    let (_, m) = three_voters(&c);
    let key = marker("np-inject");
    let recorded = cleartext_store_write(&key, &big_value(&key, 100));
    // The recording is a real cleartext write: what a capture of the old node plane showed.
    assert!(recorded.starts_with(PREFACE));
    let signs = cleartext_signs(&recorded, &[&key]);
    assert!(
        signs.contains(&"the HTTP/2 preface".to_string())
            && signs.contains(&"a gRPC path \"/crux.store.v1.\" (HPACK)".to_string())
            && signs.contains(&format!("marker {key:?}")),
        "{signs:?}"
    );
    let injected = as_injected_stream(&recorded);
    assert_eq!(cleartext_signs(&injected, &[&key]).len(), 2);

    // Into every established connection of one member to the Raft leader (the node that would
    // apply a write); among them its registry link where the Raft leader leads the flock.
    let dialer = c.wait_for(
        &format!("a connection to the Raft leader node{m} through the proxies"),
        PROMPT,
        || {
            plane
                .conns()
                .into_iter()
                .find(|x| x.target == m && x.settled())
                .and_then(|x| x.dialer)
                .ok_or_else(|| plane.describe())
        },
    );
    let victims: Vec<Arc<Conn>> = plane
        .conns()
        .into_iter()
        .filter(|x| x.dialer == Some(dialer) && x.target == m && x.settled())
        .collect();
    let tampered = rejected(&c, "tampered");
    let tls = rejected(&c, "tls");
    let armed = now();
    for v in &victims {
        v.arm(Tamper::Inject(injected.clone()));
    }
    for v in &victims {
        c.wait_for("the Raft leader to close the connection", PROMPT, || {
            (v.tampered().is_some() && v.server_ended())
                .then_some(())
                .ok_or_else(|| v.describe())
        });
        eprintln!("tampered: {} on {}", v.tampered().unwrap(), v.describe());
    }
    let mut want = tampered.clone();
    want[m - 1] += victims.len() as u64;
    wait_rejected(&c, &plane, "tampered", &want);

    // On a connection of its own, from another member's address.
    let from = c.agent(if m == 1 { 2 } else { 1 }).addr.ip();
    let answered = plane
        .rt
        .block_on(send_and_wait_close(from, c.agent(m).grpc, recorded))
        .expect("the cleartext write's connection closes");
    assert!(
        answered <= 7,
        "answered {answered} bytes (at most one alert)"
    );
    let mut want_tls = tls.clone();
    want_tls[m - 1] += 1;
    wait_rejected(&c, &plane, "tls", &want_tls);

    nowhere(&c, &key);
    // The dialler links again: where the Raft leader also leads the flock (the usual case: the
    // flock leader starts the store), its registry link was among the victims, and comes back
    // at once; other links come back when next used, so any new connection to it counts then.
    wait_reconnected(&c, &plane, (m == leader).then_some(dialer), m, armed);
    still_works(&c, dialer, "inject");
    nowhere(&c, &key);
}

/// The client-to-server bytes of whole earlier connections (recorded while a document was
/// written, so among them the Raft leader's replication of it), replayed each on a new
/// connection to the node that accepted them, after the document was changed: each replay is
/// refused in its handshake (`tls`: the server's fresh key share makes the recorded Finished
/// worthless) and the document keeps its new value and generation on every node.
#[test]
fn replayed_sessions_are_refused_and_rewrite_nothing() {
    let (c, plane, _) = proxied_flock(3);
    let (_, m) = three_voters(&c);
    let writer = if m == 1 { 2 } else { 1 };
    let key = marker("np-replay");
    let first = big_value(&key, 4_000);
    let sent_before: Vec<(Arc<Conn>, u64)> = plane
        .conns()
        .into_iter()
        .map(|x| {
            let n = x.c2s_bytes.load(Ordering::SeqCst);
            (x, n)
        })
        .collect();
    c.wait_for(&format!("a write on node{writer}"), PROMPT, || {
        put_doc(&c, writer, &key, &first)
    });
    everywhere(&c, &key, &first);
    // The Raft leader's replication of it went through a proxy (to a follower other than the
    // flock leader): a connection of the Raft leader carried its 4000 bytes meanwhile.
    let carried: Vec<Arc<Conn>> = plane
        .conns()
        .into_iter()
        .filter(|x| x.dialer == Some(m))
        .filter(|x| {
            let before = sent_before
                .iter()
                .find(|(y, _)| Arc::ptr_eq(x, y))
                .map_or(0, |(_, n)| *n);
            x.c2s_bytes.load(Ordering::SeqCst) - before >= 4_000
        })
        .collect();
    assert!(
        !carried.is_empty(),
        "no connection of the Raft leader node{m} through the proxies carried the document:\n{}",
        plane.describe()
    );

    // End every connection open now: their recordings are whole sessions.
    let sessions: Vec<Arc<Conn>> = plane
        .conns()
        .into_iter()
        .filter(|x| !x.ended.is_cancelled() && x.records.load(Ordering::SeqCst) >= 4)
        .collect();
    let cut = now();
    for s in &sessions {
        s.end(End::Cut);
    }
    let sessions: Vec<Arc<Conn>> = sessions
        .into_iter()
        .filter(|s| {
            !s.truncated.load(Ordering::SeqCst) && s.c2s.lock().unwrap().first() == Some(&HANDSHAKE)
        })
        .collect();
    assert!(
        carried
            .iter()
            .all(|x| sessions.iter().any(|s| Arc::ptr_eq(x, s))),
        "a session that carried the document is not among those replayed:\n{}",
        plane.describe()
    );

    let second = big_value(&key, 10);
    c.wait_for(&format!("a second write on node{writer}"), PROMPT, || {
        put_doc(&c, writer, &key, &second)
    });
    let generation = everywhere(&c, &key, &second);
    let before = rejected(&c, "tls");
    let mut want = before.clone();
    for s in &sessions {
        let bytes = s.c2s.lock().unwrap().clone();
        let from = c.agent(s.dialer.expect("a member")).addr.ip();
        plane
            .rt
            .block_on(send_and_wait_close(from, s.upstream, bytes))
            .unwrap_or_else(|e| panic!("replay of {}: {e}", s.describe()));
        want[s.target - 1] += 1;
    }
    eprintln!(
        "replayed {} sessions (tls refusals {before:?} -> {want:?})",
        sessions.len()
    );
    wait_rejected(&c, &plane, "tls", &want);
    for n in 1..=3 {
        assert_eq!(
            local_doc(&c, n, &key).unwrap(),
            Some((second.clone(), generation)),
            "node{n}"
        );
    }
    // The Raft leader reached its followers again after the cut (other links reconnect when
    // next used); the flock keeps working and the document is still unchanged.
    for s in sessions.iter().filter(|s| s.dialer == Some(m)) {
        wait_reconnected(&c, &plane, Some(m), s.target, cut);
    }
    still_works(&c, writer, "replay");
    assert_eq!(everywhere(&c, &key, &second), generation);
}

// ---------------------------------------------------------------------------------------------
// Item 5.

/// A TCP flow's payload, placed by sequence number.
#[derive(Default)]
struct Flow {
    base: Option<u32>,
    data: Vec<u8>,
    bytes: u64,
}

/// Largest stream kept per TCP flow of a capture.
const FLOW_MAX: usize = 64 << 20;

/// What a capture kept: TCP payloads by flow (source, destination), UDP payloads.
#[derive(Default)]
struct Captured {
    tcp: HashMap<(SocketAddr, SocketAddr), Flow>,
    udp: Vec<Vec<u8>>,
    packets: u64,
}

impl Captured {
    /// Takes one IPv4 packet (no link header) if both its addresses are kept.
    fn take(&mut self, p: &[u8], keep: &[Ipv4Addr]) {
        if p.len() < 20 || p[0] >> 4 != 4 {
            return;
        }
        let ihl = usize::from(p[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        if ihl < 20 || total < ihl || !keep.contains(&src) || !keep.contains(&dst) {
            return;
        }
        let l4 = &p[ihl..total];
        self.packets += 1;
        match p[9] {
            6 if l4.len() >= 20 => {
                let sport = u16::from_be_bytes([l4[0], l4[1]]);
                let dport = u16::from_be_bytes([l4[2], l4[3]]);
                let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
                let off = usize::from(l4[12] >> 4) * 4;
                let syn = l4[13] & 0x02 != 0;
                let payload = l4.get(off..).unwrap_or_default();
                let flow = self
                    .tcp
                    .entry((
                        SocketAddr::new(src.into(), sport),
                        SocketAddr::new(dst.into(), dport),
                    ))
                    .or_default();
                if syn {
                    flow.base = Some(seq.wrapping_add(1));
                }
                if payload.is_empty() {
                    return;
                }
                flow.bytes += payload.len() as u64;
                let base = *flow.base.get_or_insert(seq);
                let at = seq.wrapping_sub(base) as usize;
                if at + payload.len() <= FLOW_MAX {
                    if flow.data.len() < at + payload.len() {
                        flow.data.resize(at + payload.len(), 0);
                    }
                    flow.data[at..at + payload.len()].copy_from_slice(payload);
                }
            }
            17 if l4.len() >= 8 => self.udp.push(l4[8..].to_vec()),
            _ => {}
        }
    }
}

/// A packet capture of the loopback interface (`AF_PACKET`, needs root or CAP_NET_RAW) on a
/// thread of its own, keeping the packets between the given addresses.
struct PacketCapture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Captured>>,
}

impl PacketCapture {
    fn start(keep: Vec<Ipv4Addr>) -> Result<PacketCapture, String> {
        use nix::sys::socket::{
            recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
            SockType,
        };
        use std::os::fd::AsRawFd;
        let lo = nix::net::if_::if_nametoindex("lo").map_err(|e| format!("no lo: {e}"))?;
        // Cooked packets (no link header), every protocol.
        let fd = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::empty(),
            SockProtocol::EthAll,
        )
        .map_err(|e| format!("AF_PACKET socket: {e}"))?;
        // A large buffer (over rmem_max, as root) so that a burst is not dropped.
        if setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20)).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &(64 << 20));
        }
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut cap = Captured::default();
            let mut buf = vec![0u8; 1 << 17];
            // After the stop, what the kernel queued before it is still read, until the queue
            // is empty (a read times out) or for 3 s at most.
            let mut stopped_at: Option<Instant> = None;
            loop {
                if stopped_at.is_none() && stopped.load(Ordering::SeqCst) {
                    stopped_at = Some(now());
                }
                if stopped_at.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
                    break;
                }
                let (n, from) = match recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
                    Ok(x) => x,
                    Err(_) if stopped_at.is_some() => break,
                    Err(_) => continue,
                };
                // Loopback shows each packet twice, going out and coming in: keep one.
                const PACKET_OUTGOING: u8 = 4;
                match from {
                    Some(a) if a.ifindex() == lo as usize && a.pkttype() != PACKET_OUTGOING => {
                        cap.take(&buf[..n], &keep)
                    }
                    _ => {}
                }
            }
            cap
        });
        Ok(PacketCapture {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> Captured {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("capture thread")
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A file of `len` pseudo-random bytes with `marker` written every 64 KiB.
fn artifact(path: &Path, len: usize, marker: &str) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = Vec::with_capacity(len + 8);
    while buf.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    buf.truncate(len);
    for at in (0..len - marker.len()).step_by(64 << 10) {
        buf[at..at + marker.len()].copy_from_slice(marker.as_bytes());
    }
    std::fs::write(path, buf).expect("write artifact");
}

fn cli_ok(c: &Cluster, k: usize, args: &[&str]) -> String {
    let out = c.cli(k, args);
    assert!(
        out.status.success(),
        "node{k}: crux {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Sends `canary` in clear over a TCP connection from `from` to a listener on `to`, in two
/// writes (so that it is split across segments), and waits until it arrived.
fn send_canary(from: Ipv4Addr, to: Ipv4Addr, canary: &str) {
    runtime().block_on(async {
        let listener = TcpListener::bind(SocketAddr::new(to.into(), 0))
            .await
            .expect("bind canary listener");
        let s = TcpSocket::new_v4().expect("socket");
        s.bind(SocketAddr::new(from.into(), 0)).expect("bind");
        let mut out = s
            .connect(listener.local_addr().unwrap())
            .await
            .expect("connect");
        let (mut inn, _) = listener.accept().await.expect("accept");
        out.set_nodelay(true).unwrap();
        let (a, b) = canary.as_bytes().split_at(canary.len() / 2);
        out.write_all(a).await.unwrap();
        out.flush().await.unwrap();
        let mut got = vec![0u8; a.len()];
        inn.read_exact(&mut got).await.unwrap();
        out.write_all(b).await.unwrap();
        let mut got = vec![0u8; b.len()];
        inn.read_exact(&mut got).await.unwrap();
    });
}

/// How the test watches the node plane: packets of the loopback interface, or (where packet
/// capture is refused) the recordings of proxies on every path between two agents.
enum Watch {
    Packets(PacketCapture),
    Proxies(Plane),
}

/// A capture of the loopback traffic of a 3-node flock while it registers a service (node 2),
/// writes a document (node 3) and moves a pastiche artifact (put on node 1, got on node 2), each
/// carrying a marker of its own: the capture holds the node-plane bytes of all three (at least
/// the artifact's size from node 1's node port to node 2) and contains no marker, no HTTP/2
/// preface and no gRPC path, neither in ASCII nor HPACK-coded; the markers do arrive where they
/// were sent. The same search finds all of them in a cleartext recording of a node call.
#[test]
fn a_loopback_capture_finds_no_marker_preface_or_grpc_path() {
    const ARTIFACT: usize = 1 << 20;
    let mut c = Cluster::new(BIN, 4, 3, PRESET);
    let ips: Vec<Ipv4Addr> = c
        .agents
        .iter()
        .map(|a| match a.addr.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => unreachable!("loopback v4"),
        })
        .collect();
    let forced = std::env::var("CRUX_TEST_CAPTURE").as_deref() == Ok("proxies");
    let capture = if forced {
        Err("CRUX_TEST_CAPTURE=proxies".to_string())
    } else {
        PacketCapture::start(ips.clone())
    };
    let watch = match capture {
        Ok(cap) => Watch::Packets(cap),
        Err(e) => {
            eprintln!(
                "FALLBACK: no packet capture here ({e}); checking what the in-the-middle \
                 proxies recorded instead. Pastiche pieces go to the holder's own port, past \
                 the proxies: the artifact's marker is NOT covered in this mode."
            );
            let ports = c.own_grpc_ports();
            Watch::Proxies(Plane::new(&c, &ports))
        }
    };
    c.start_all();
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    three_voters(&c);

    let reg = marker("npcapreg");
    let doc = marker("npcapdoc");
    let art = marker("npcapart");
    let meta = marker("npcapmeta");
    let markers = [reg.as_str(), doc.as_str(), art.as_str(), meta.as_str()];

    // A service registered on node 2, looked up on node 3.
    let inst = format!("{reg}_1");
    let note = format!("note={meta}");
    let addr = SocketAddr::new(c.agent(2).addr.ip(), 9);
    let _registration = c.register(2, &reg, &inst, addr, &["--meta", &note]);
    let found = c.wait_for("the service on node 3", CONVERGE, || {
        let out = c.cli(3, &["lookup", &reg, "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains(&inst) {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    assert!(found.contains(&reg), "{found}");

    // A document written on node 3, held by every node.
    let key = format!("{doc}-key");
    let value = big_value(&doc, 200);
    c.wait_for("a write on node 3", PROMPT, || put_doc(&c, 3, &key, &value));
    everywhere(&c, &key, &value);

    // An artifact put on node 1, got on node 2.
    let file = c.dir().join("artifact.bin");
    artifact(&file, ARTIFACT, &art);
    let put: serde_json::Value = serde_json::from_str(&cli_ok(
        &c,
        1,
        &["pastiche", "put", file.to_str().unwrap(), "--json"],
    ))
    .expect("put JSON");
    let digest = put["digest"].as_str().expect("digest").to_string();
    let got = c.dir().join("artifact.got");
    cli_ok(
        &c,
        2,
        &["pastiche", "get", &digest, "-o", got.to_str().unwrap()],
    );
    let got = std::fs::read(&got).expect("read the artifact got");
    assert!(
        got == std::fs::read(&file).unwrap(),
        "node 2 got other bytes"
    );
    assert!(memchr::memmem::find(&got, art.as_bytes()).is_some());

    // The search itself finds every sign in a cleartext node call carrying the markers.
    let clear = cleartext_store_write(&markers.concat(), "v");
    let signs = cleartext_signs(&clear, &markers);
    assert_eq!(signs.len(), markers.len() + 2, "{signs:?}");

    // A canary: a cleartext marker sent between two of the flock's addresses by this test,
    // which the capture must find (so a capture that missed payloads cannot pass).
    let canary = marker("npcapcanary");
    if matches!(watch, Watch::Packets(_)) {
        send_canary(ips[0], ips[2], &canary);
    }

    let node_port = |a: &SocketAddr| c.agents.iter().any(|x| x.grpc == *a);
    let mut found: Vec<String> = Vec::new();
    let (summary, node_plane_bytes) = match watch {
        Watch::Packets(cap) => {
            let cap = cap.stop();
            let mut node_plane = 0u64;
            for ((src, dst), flow) in &cap.tcp {
                if node_port(src) || node_port(dst) {
                    node_plane += flow.bytes;
                }
                for s in cleartext_signs(&flow.data, &markers) {
                    found.push(format!("{s} in TCP {src} -> {dst}"));
                }
            }
            let canaries = cap
                .tcp
                .values()
                .filter(|f| memchr::memmem::find(&f.data, canary.as_bytes()).is_some())
                .count();
            assert_eq!(canaries, 1, "the capture missed the cleartext canary");
            for d in &cap.udp {
                for s in cleartext_signs(d, &markers) {
                    found.push(format!("{s} in a UDP datagram"));
                }
            }
            // The artifact went from node 1's node port to node 2, encrypted.
            let pieces: u64 = cap
                .tcp
                .iter()
                .filter(|((src, dst), _)| *src == c.agent(1).grpc && dst.ip() == ips[1])
                .map(|(_, f)| f.bytes)
                .sum();
            assert!(
                pieces >= ARTIFACT as u64,
                "only {pieces} bytes captured from node 1's node port to node 2"
            );
            let summary = format!(
                "packet capture of lo: {} packets, {} TCP flows, {} datagrams; {node_plane} \
                 node-plane bytes, {pieces} of them from node 1's node port to node 2",
                cap.packets,
                cap.tcp.len(),
                cap.udp.len()
            );
            (summary, node_plane)
        }
        Watch::Proxies(plane) => {
            let mut bytes = 0u64;
            let conns = plane.conns();
            for x in &conns {
                bytes += x.c2s_bytes.load(Ordering::SeqCst) + x.s2c_bytes.load(Ordering::SeqCst);
                for (dir, rec) in [("out", &x.c2s), ("back", &x.s2c)] {
                    for s in cleartext_signs(&rec.lock().unwrap(), &markers) {
                        found.push(format!("{s} in {} ({dir})", x.describe()));
                    }
                }
            }
            let summary = format!(
                "FALLBACK proxies' recordings: {} connections, {bytes} node-plane bytes \
                 (pastiche pieces not among them)",
                conns.len()
            );
            (summary, bytes)
        }
    };
    eprintln!("{summary}");
    assert!(
        node_plane_bytes >= 20_000,
        "too few node-plane bytes seen: {summary}"
    );
    assert!(found.is_empty(), "in clear: {found:#?}\n{summary}");
}
