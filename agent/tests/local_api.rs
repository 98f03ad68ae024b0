//! The local API answers any stock gRPC client (issue 24), checked from the wire up against a
//! real agent: raw HTTP/2 requests with every `:authority` form clients send on a Unix socket
//! (`localhost` from Go and Node, the percent-encoded path from gRPC's C core since 1.57, the raw
//! path from grpc-java, empty, absent), HPACK-coded both plainly and as the C core does (indexed,
//! Huffman), and the bad input of the issue: each gets a gRPC status or a closed connection, is
//! counted, and the agent keeps serving everyone else.
//!
//! The real Python (`grpcio`) and Node (`@grpc/grpc-js`) clients are run by
//! `stock_clients_run_the_full_flow`, through `examples/*/conformance.*`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crux_local::hpack::{Decoder, Encoder, Field};
use crux_local::{frame_header, header_frames, PREFACE};
use crux_tests::cluster::{http_get, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const WAIT: Duration = Duration::from_secs(30);

/// What came back on one stream.
#[derive(Debug, Default)]
struct Resp {
    headers: Vec<(String, String)>,
    data: Vec<u8>,
    rst: Option<u32>,
    /// GOAWAY or end of connection before the stream ended.
    closed: bool,
}

impl Resp {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A hand-made HTTP/2 client on the socket: it writes exactly the frames a test wants.
struct Raw {
    s: UnixStream,
    enc: Encoder,
    dec: Decoder,
    inbuf: Vec<u8>,
}

impl Raw {
    fn connect(path: &Path, enc: Encoder) -> Raw {
        let mut s = UnixStream::connect(path).expect("connect to the local socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut out = PREFACE.to_vec();
        frame_header(0, 0x4, 0, 0, &mut out); // SETTINGS, defaults
        s.write_all(&out).expect("preface");
        Raw {
            s,
            enc,
            dec: Decoder::default(),
            inbuf: Vec::new(),
        }
    }

    /// A unary gRPC call: HEADERS with `fields`, one DATA frame with `message` (framed).
    fn call(&mut self, stream: u32, fields: &[Field], message: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::new();
        header_frames(&mut self.enc, stream, fields, false, &mut out);
        let mut body = vec![0u8];
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(message);
        frame_header(body.len(), 0x0, 0x1, stream, &mut out);
        out.extend_from_slice(&body);
        self.s.write_all(&out)
    }

    fn frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.inbuf.len() >= 9 {
                let len =
                    u32::from_be_bytes([0, self.inbuf[0], self.inbuf[1], self.inbuf[2]]) as usize;
                if self.inbuf.len() >= 9 + len {
                    let f: Vec<u8> = self.inbuf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut b = [0u8; 16384];
            match self.s.read(&mut b) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.inbuf.extend_from_slice(&b[..n]),
            }
        }
    }

    /// Reads until `stream` ends (or the connection does): its headers, data and reset code.
    fn response(&mut self, stream: u32) -> Resp {
        let mut r = Resp::default();
        let mut block = Vec::new();
        let mut block_stream = 0;
        let mut block_end = false;
        loop {
            let Some((kind, flags, id, payload)) = self.frame() else {
                r.closed = true;
                return r;
            };
            match kind {
                0x4 if flags & 0x1 == 0 => {
                    let mut ack = Vec::new();
                    frame_header(0, 0x4, 0x1, 0, &mut ack);
                    let _ = self.s.write_all(&ack);
                }
                0x1 | 0x9 => {
                    let mut p = &payload[..];
                    if kind == 0x1 {
                        block_stream = id;
                        block_end = flags & 0x1 != 0;
                        if flags & 0x8 != 0 {
                            let pad = p[0] as usize;
                            p = &p[1..p.len() - pad];
                        }
                        if flags & 0x20 != 0 {
                            p = &p[5..];
                        }
                    }
                    block.extend_from_slice(p);
                    if flags & 0x4 != 0 {
                        let fields = self.dec.decode(&block, usize::MAX).expect("server HPACK");
                        block.clear();
                        if block_stream == stream {
                            r.headers.extend(fields.fields.into_iter().map(|f| {
                                (
                                    String::from_utf8_lossy(&f.name).into_owned(),
                                    String::from_utf8_lossy(&f.value).into_owned(),
                                )
                            }));
                            if block_end {
                                return r;
                            }
                        }
                    }
                }
                0x0 if id == stream => {
                    r.data.extend_from_slice(&payload);
                    if flags & 0x1 != 0 {
                        return r;
                    }
                }
                0x3 if id == stream => {
                    r.rst = Some(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                    return r;
                }
                0x7 => {
                    r.closed = true;
                    return r;
                }
                _ => {}
            }
        }
    }
}

fn grpc_request(path: &str, authority: Option<&[u8]>) -> Vec<Field> {
    let mut f = vec![
        Field::new(":method", "POST"),
        Field::new(":scheme", "http"),
        Field::new(":path", path),
    ];
    if let Some(a) = authority {
        f.push(Field::new(":authority", a));
    }
    f.push(Field::new("content-type", "application/grpc"));
    f.push(Field::new("te", "trailers"));
    f.push(Field::new("user-agent", "grpc-raw-test/1.0"));
    f
}

const STATUS: &str = "/crux.reeve.v1.Reeve/Status";

fn start(test_id: u8) -> Cluster {
    let mut c = Cluster::new(BIN, test_id, 1, "local");
    c.start_all();
    c.stable_agreement(&[1], Duration::from_millis(300), WAIT);
    c
}

/// A plain `Status` call through a fresh connection answers with grpc-status 0.
fn still_serves(path: &Path) {
    let mut raw = Raw::connect(path, Encoder::plain());
    raw.call(1, &grpc_request(STATUS, Some(b"localhost")), &[])
        .expect("send");
    let r = raw.response(1);
    assert_eq!(r.get("grpc-status"), Some("0"), "agent still serves: {r:?}");
}

fn metric(c: &Cluster, name: &str) -> u64 {
    let body = http_get(c.agent(1).http, "/metrics").expect("metrics");
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Issue 24 item 1: `localhost`, empty, the raw socket path (grpc-java), its percent-encoded
/// form (C core), and no `:authority` at all are each answered, three calls per connection so
/// the C-core-like encoder's dynamic table is exercised.
#[test]
fn every_authority_form_is_answered() {
    let c = start(1);
    let sock = c.agent(1).socket.clone();
    let raw_path = sock.display().to_string();
    let encoded: String = raw_path.replace('/', "%2F");
    let forms: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("localhost (Go, Node)", Some(b"localhost".to_vec())),
        ("percent-encoded path (C core)", Some(encoded.into_bytes())),
        ("raw path (grpc-java)", Some(raw_path.clone().into_bytes())),
        ("empty", Some(Vec::new())),
        ("absent", None),
    ];
    let fixed_before = metric(&c, "crux_local_api_authority_fixed_total");
    for (what, authority) in &forms {
        for (coding, enc) in [
            ("plain", Encoder::plain as fn() -> Encoder),
            ("indexed+huffman", Encoder::indexing),
        ] {
            let mut raw = Raw::connect(&sock, enc());
            for stream in [1, 3, 5] {
                raw.call(stream, &grpc_request(STATUS, authority.as_deref()), &[])
                    .expect("send");
                let r = raw.response(stream);
                assert_eq!(r.get(":status"), Some("200"), "{what}, {coding}: {r:?}");
                assert_eq!(r.get("grpc-status"), Some("0"), "{what}, {coding}: {r:?}");
                assert!(r.data.len() > 5, "{what}, {coding}: a StatusResponse");
            }
        }
    }
    // Three forms are fixed, twice (two codings), three calls each.
    let fixed = metric(&c, "crux_local_api_authority_fixed_total") - fixed_before;
    assert_eq!(
        fixed,
        3 * 2 * 3,
        "requests whose authority became localhost"
    );
}

/// Issue 24, "Bad input": each gets a gRPC status or a closed connection, and a counter; the
/// agent serves every other client throughout.
#[test]
fn bad_input_gets_a_status_or_a_closed_connection_and_the_agent_serves_on() {
    let c = start(2);
    let sock = c.agent(1).socket.clone();

    // A long-lived, well-behaved client, checked between the bad ones.
    let mut good = Raw::connect(&sock, Encoder::indexing());
    let mut good_stream = 1;
    let mut check_good = |good: &mut Raw| {
        good.call(good_stream, &grpc_request(STATUS, Some(b"%2Fx.sock")), &[])
            .expect("good client sends");
        let r = good.response(good_stream);
        assert_eq!(r.get("grpc-status"), Some("0"), "the good client: {r:?}");
        good_stream += 2;
    };
    check_good(&mut good);

    // HTTP/1.1: the connection is closed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("200 OK"),
        "HTTP/1.1 is not served"
    );
    check_good(&mut good);

    // A non-gRPC HTTP/2 request, an unknown service, an unknown method: statuses.
    let not_grpc = metric(&c, "crux_local_api_rejected_total{reason=\"not_grpc\"}");
    let unimplemented = metric(
        &c,
        "crux_local_api_rejected_total{reason=\"unimplemented\"}",
    );
    let mut raw = Raw::connect(&sock, Encoder::indexing());
    let get = vec![
        Field::new(":method", "GET"),
        Field::new(":scheme", "http"),
        Field::new(":path", "/"),
        Field::new(":authority", "localhost"),
    ];
    raw.call(1, &get, &[]).unwrap();
    let r = raw.response(1);
    assert!(
        r.get(":status").is_some() || r.rst.is_some(),
        "a plain GET gets an answer: {r:?}"
    );
    for (stream, path) in [
        (3, "/no.such.Service/Call"),
        (5, "/crux.reeve.v1.Reeve/NoSuchMethod"),
    ] {
        raw.call(stream, &grpc_request(path, Some(b"")), &[])
            .unwrap();
        let r = raw.response(stream);
        assert_eq!(
            r.get("grpc-status"),
            Some("12"),
            "{path} is UNIMPLEMENTED: {r:?}"
        );
    }
    assert_eq!(
        metric(&c, "crux_local_api_rejected_total{reason=\"not_grpc\"}"),
        not_grpc + 1,
        "the GET is counted"
    );
    assert!(
        metric(
            &c,
            "crux_local_api_rejected_total{reason=\"unimplemented\"}"
        ) >= unimplemented + 2,
        "unknown service and method are counted"
    );

    // Metadata over the header list limit (20 KiB): that stream is refused (431), the
    // connection serves on.
    let over = metric(
        &c,
        "crux_local_api_rejected_total{reason=\"header_list_too_large\"}",
    );
    let mut fields = grpc_request(STATUS, Some(b"/x.sock"));
    fields.push(Field::new("x-big", "v".repeat(20 * 1024)));
    raw.call(7, &fields, &[]).unwrap();
    let r = raw.response(7);
    assert!(
        r.get(":status") == Some("431") || r.rst.is_some(),
        "over-limit metadata refused: {r:?}"
    );
    assert!(!r.closed, "the connection lives: {r:?}");
    raw.call(9, &grpc_request(STATUS, Some(b"/x.sock")), &[])
        .unwrap();
    assert_eq!(raw.response(9).get("grpc-status"), Some("0"));
    assert_eq!(
        metric(
            &c,
            "crux_local_api_rejected_total{reason=\"header_list_too_large\"}"
        ),
        over + 1
    );

    // A 1 MiB metadata block: the connection is closed, and counted.
    let mut raw = Raw::connect(&sock, Encoder::plain());
    let mut fields = grpc_request(STATUS, Some(b"localhost"));
    fields.push(Field::new("x-huge", "v".repeat(1 << 20)));
    let _ = raw.call(1, &fields, &[]);
    let r = raw.response(1);
    assert!(r.closed, "1 MiB of metadata closes the connection: {r:?}");
    check_good(&mut good);
    assert!(
        metric(
            &c,
            "crux_local_api_rejected_total{reason=\"header_block_too_large\"}"
        ) >= 1
    );

    // A client that opens 10,000 streams and never reads: past STREAMS_MAX open at once, h2
    // refuses streams (REFUSED_STREAM), and others are served meanwhile.
    let mut flood = Raw::connect(&sock, Encoder::indexing());
    // The agent stops reading a client that does not read its answers: writes then block.
    flood
        .s
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let watch = grpc_request("/crux.reeve.v1.Reeve/Watch", Some(b"localhost"));
    let mut sent = 0u32;
    for i in 0..10_000u32 {
        if flood.call(2 * i + 1, &watch, &[]).is_err() {
            break;
        }
        sent += 1;
    }
    eprintln!("flood: {sent} streams sent before the agent stopped reading");
    check_good(&mut good);
    if sent > crux_local::STREAMS_MAX {
        // Somewhere in what the flood did not read: resets of the streams past the limit.
        let mut refused = 0;
        while let Some((kind, _, _, payload)) = flood.frame() {
            if kind == 0x3 && payload == [0, 0, 0, 7] {
                refused += 1;
                break;
            }
        }
        assert_eq!(
            refused,
            1,
            "streams past {} are refused",
            crux_local::STREAMS_MAX
        );
    }
    drop(flood);
    still_serves(&sock);

    // A client that vanishes mid-stream (a heartbeat stream, half sent).
    let mut gone = Raw::connect(&sock, Encoder::indexing());
    let mut out = Vec::new();
    header_frames(
        &mut Encoder::indexing(),
        1,
        &grpc_request("/crux.reeve.v1.Reeve/Heartbeat", Some(b"localhost")),
        false,
        &mut out,
    );
    frame_header(3, 0x0, 0, 1, &mut out);
    out.extend_from_slice(&[0, 0, 0]);
    let vanished = metric(&c, "crux_local_api_rejected_total{reason=\"vanished\"}");
    gone.s.write_all(&out).unwrap();
    drop(gone);
    check_good(&mut good);
    still_serves(&sock);
    c.wait_for("the vanished client counted", WAIT, || {
        let now = metric(&c, "crux_local_api_rejected_total{reason=\"vanished\"}");
        if now > vanished {
            Ok(())
        } else {
            Err(format!("vanished {now}"))
        }
    });
    assert!(metric(&c, "crux_local_api_rejected_total{reason=\"not_http2\"}") >= 1);
}

/// Where the test set-up (`dev/setup.sh`) put the Python and Node clients.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Issue 24 item 4: stock Python `grpcio` (no channel option) and Node `@grpc/grpc-js` each run
/// the whole flow against a live two-node flock — register on node 1, heartbeat, look it up on
/// node 2, watch on node 2 (snapshot, then a change), deregister — and Python lists the
/// services through reflection. Where a client is not installed, this says so and skips it.
#[test]
fn stock_clients_run_the_full_flow() {
    let mut c = Cluster::new(BIN, 3, 2, "local");
    c.append_config(1, "[registry]\nheartbeat_interval = \"200ms\"\n");
    c.append_config(2, "[registry]\nheartbeat_interval = \"200ms\"\n");
    c.start_all();
    c.stable_agreement(&[1, 2], Duration::from_millis(300), WAIT);
    let (s1, s2) = (c.agent(1).socket.clone(), c.agent(2).socket.clone());
    let proto = repo().join("proto/proto");

    let python = repo().join(".dev/venv/bin/python");
    let py_ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import grpc, grpc_tools, grpc_reflection"])
            .status()
            .is_ok_and(|s| s.success());
    if py_ok {
        run_client(
            &c,
            "python",
            Command::new(&python)
                .arg(repo().join("examples/python/conformance.py"))
                .args([&s1, &s2, &proto]),
        );
    } else {
        skipped(&format!(
            "the Python client part (no {} with grpcio, grpcio-tools, \
             grpcio-reflection: run dev/setup.sh)",
            python.display()
        ));
    }

    let node_dir = repo().join("examples/node");
    let node_ok = node_dir.join("node_modules/@grpc/grpc-js").exists()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if node_ok {
        run_client(
            &c,
            "node",
            Command::new("node")
                .current_dir(&node_dir)
                .arg("conformance.js")
                .args([&s1, &s2, &proto]),
        );
    } else {
        skipped(&format!(
            "the Node client part (no node, or no {}/node_modules/@grpc/grpc-js: \
             run dev/setup.sh)",
            node_dir.display()
        ));
    }
}

/// Says a part was skipped on the real stderr, which the test harness does not capture, so it
/// shows in `cargo test`'s output even when the test passes.
fn skipped(what: &str) {
    let _ = writeln!(std::io::stderr(), "local_api: SKIPPED {what}");
}

/// Kills the client process it holds when dropped, if still running (a failed assertion or a
/// timeout leaves nothing behind).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs a client script to its end (at most `CLIENT_WAIT`), prints its output, and checks it
/// finished with "conformance: ok".
fn run_client(c: &Cluster, what: &str, cmd: &mut Command) {
    const CLIENT_WAIT: Duration = Duration::from_secs(180);
    let out_path = c.dir().join(format!("{what}-client.out"));
    let out_file = std::fs::File::create(&out_path).expect("client output file");
    let mut child = KillOnDrop(
        cmd.stdin(std::process::Stdio::null())
            .stdout(out_file.try_clone().expect("fd"))
            .stderr(out_file)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}")),
    );
    let status = crux_tests::cluster::wait_for(CLIENT_WAIT, || match child.0.try_wait() {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err("still running".to_string()),
        Err(e) => Err(e.to_string()),
    });
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!("--- {what} client ---\n{output}");
    let status = status.unwrap_or_else(|e| {
        panic!("{what} client did not finish in {CLIENT_WAIT:?} ({e}):\n{output}")
    });
    assert!(
        status.success(),
        "{what} client failed ({status}):\n{output}\n{}",
        c.logs(30)
    );
    assert!(output.contains("conformance: ok"), "{what}: {output}");
}
