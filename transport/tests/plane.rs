//! The node plane between transports in one process, over loopback TCP: who is accepted, what
//! closes a connection, and what each refusal is counted as.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::NodeId;
use crux_transport::{BlocKeys, NodeIdentity, Reason, Transport, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);

fn keys(list: &[(u32, u8)]) -> Option<BlocKeys> {
    BlocKeys::new(list.iter().map(|(id, b)| (*id, [*b; 32])).collect())
}

fn transport(config: TransportConfig) -> Transport {
    let t = Transport::new(NodeIdentity::generate().unwrap(), config).unwrap();
    t.set_bloc_keys(keys(&[(7, 1)]));
    t
}

/// Two transports that list each other (node ids 1 and 2), holding the same bloc key.
fn pair() -> (Transport, Transport) {
    let (a, b) = (
        transport(TransportConfig::default()),
        transport(TransportConfig::default()),
    );
    let listed = [(NodeId(1), a.public_key()), (NodeId(2), b.public_key())];
    a.set_peers(listed);
    b.set_peers(listed);
    (a, b)
}

/// Serves `t` on a fresh loopback port: every established connection echoes what it reads.
async fn echo_server(t: &Transport, stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Box::pin(t.incoming(listener, stop));
    tokio::spawn(async move {
        while let Some(conn) = incoming.next().await {
            let Ok(mut conn) = conn else { continue };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn listed_nodes_of_one_bloc_connect_and_know_who_they_talk_to() {
    let (a, b) = pair();
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    let mut s = a.connect(addr, None).await.unwrap();
    assert_eq!(s.peer().node, NodeId(2));
    assert_eq!(s.peer().key, b.public_key());
    assert_eq!(s.peer().bloc_key, 7);
    s.write_all(b"hello node").await.unwrap();
    let mut got = [0u8; 10];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello node");
    assert_eq!(a.connections(), 1);
    wait_for("the server's side", || b.connections() == 1).await;
    stop.cancel();
}

#[tokio::test]
async fn a_node_the_flock_does_not_list_is_refused_both_ways() {
    let (a, b) = pair();
    let stranger = transport(TransportConfig::default());
    stranger.set_peers([(NodeId(2), b.public_key())]);
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    let e = stranger.connect(addr, None).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    wait_for("the refusal count", || {
        b.rejected_for(Reason::UnknownPeer) == 1
    })
    .await;
    assert_eq!(b.connections(), 0);
    // And a listed client does not trust a server the flock does not list.
    let stranger_addr = echo_server(&stranger, stop.clone()).await;
    stranger.set_peers([(NodeId(1), a.public_key())]);
    assert!(a.connect(stranger_addr, None).await.is_err());
    stop.cancel();
}

#[tokio::test]
async fn a_node_of_another_bloc_key_is_refused() {
    let (a, b) = pair();
    a.set_bloc_keys(keys(&[(8, 2)]));
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    assert!(a.connect(addr, None).await.is_err());
    wait_for("the refusal count", || b.rejected_for(Reason::Bloc) == 1).await;
    // The same key id with other key bytes is no better.
    a.set_bloc_keys(keys(&[(7, 2)]));
    assert!(a.connect(addr, None).await.is_err());
    wait_for("the refusal count", || b.rejected_for(Reason::Bloc) == 2).await;
    assert_eq!(b.connections(), 0);
    stop.cancel();
}

#[tokio::test]
async fn garbage_plaintext_http2_and_silence_are_closed_and_counted() {
    let b = transport(TransportConfig {
        handshake_timeout: Duration::from_millis(300),
        ..TransportConfig::default()
    });
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    // Garbage.
    let mut g = TcpStream::connect(addr).await.unwrap();
    g.write_all(&[0x5a; 4096]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, g.read_to_end(&mut buf))
        .await
        .unwrap();
    // A plaintext HTTP/2 preface and a gRPC request path: not TLS.
    let mut h = TcpStream::connect(addr).await.unwrap();
    h.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n/crux.store.v1.Store/Write")
        .await
        .unwrap();
    let mut buf2 = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, h.read_to_end(&mut buf2))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&buf2).contains("HTTP"),
        "no HTTP answer to plaintext"
    );
    wait_for("two TLS refusals", || b.rejected_for(Reason::Tls) == 2).await;
    // Silence (a half-open peer): closed at the handshake timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf3 = Vec::new();
    let n = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf3))
        .await
        .unwrap();
    assert!(n.is_ok() || n.is_err());
    wait_for("a timeout refusal", || b.rejected_for(Reason::Timeout) == 1).await;
    assert_eq!(b.connections(), 0);
    stop.cancel();
}

#[tokio::test]
async fn a_peer_the_flock_drops_is_cut_off_at_once() {
    let (a, b) = pair();
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    let mut s = a.connect(addr, None).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    wait_for("the server's side", || b.connections() == 1).await;
    // The flock no longer lists node 1 (revoked, dead or left): b closes its connection.
    b.set_peers([(NodeId(2), b.public_key())]);
    assert_eq!(
        b.connections(),
        1,
        "closed by its owner task, not yet dropped"
    );
    let r = tokio::time::timeout(DEADLINE, s.read(&mut one))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert_eq!(b.rejected_for(Reason::Revoked), 1);
    wait_for("the connection to go", || b.connections() == 0).await;
    // And new connections are refused.
    assert!(a.connect(addr, None).await.is_err());
    stop.cancel();
}

#[tokio::test]
async fn a_removed_bloc_key_closes_the_connections_made_under_it() {
    let (a, b) = pair();
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    let mut s = a.connect(addr, None).await.unwrap();
    wait_for("the server's side", || b.connections() == 1).await;
    // Rotation: install and use key 9 everywhere; connections under 7 stay while 7 is held.
    a.set_bloc_keys(keys(&[(9, 3), (7, 1)]));
    b.set_bloc_keys(keys(&[(9, 3), (7, 1)]));
    s.write_all(b"y").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    let mut s9 = a.connect(addr, None).await.unwrap();
    assert_eq!(s9.peer().bloc_key, 9);
    // Remove 7: the old connection closes on both sides, the new one lives on.
    a.set_bloc_keys(keys(&[(9, 3)]));
    b.set_bloc_keys(keys(&[(9, 3)]));
    let r = tokio::time::timeout(DEADLINE, s.read(&mut one))
        .await
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    s9.write_all(b"z").await.unwrap();
    s9.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"z");
    stop.cancel();
}

/// A TCP relay between a client and `to` that lets `pass` bytes through from the client and then
/// flips one bit of the next byte.
async fn flipping_proxy(to: SocketAddr, pass: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(to).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let mut seen = 0usize;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if seen <= pass && pass < seen + n {
                buf[pass - seen] ^= 0x01;
            }
            seen += n;
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_flipped_byte_after_the_handshake_ends_the_connection() {
    let (a, b) = pair();
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    // The handshake and the bloc proof take under 1 KiB from the client: flip a byte well
    // after them, inside the first application record.
    let proxy = flipping_proxy(addr, 4_000).await;
    let mut s = a.connect(proxy, None).await.unwrap();
    let payload = vec![0x42u8; 16 * 1024];
    let _ = s.write_all(&payload).await;
    let mut buf = vec![0u8; payload.len()];
    let r = tokio::time::timeout(DEADLINE, s.read_exact(&mut buf))
        .await
        .unwrap();
    assert!(r.is_err(), "the tampered stream must not deliver: {r:?}");
    wait_for("a tamper count", || b.rejected_for(Reason::Tampered) == 1).await;
    stop.cancel();
}

/// Bad input: a peer that pours handshake bytes (TLS records that never end a ClientHello, as
/// a peer sending 1 GiB of "headers" would) is cut off after rustls's handshake message limit,
/// long before it has sent much, and counted.
#[tokio::test]
async fn an_endless_handshake_is_cut_off_early() {
    let b = transport(TransportConfig::default());
    let stop = CancellationToken::new();
    let addr = echo_server(&b, stop.clone()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A handshake record header (ClientHello fragment, 16 KiB), then its bytes, over and over.
    let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
    record.extend_from_slice(&[0x01; 16 * 1024]);
    let mut sent = 0usize;
    let limit = 1usize << 30;
    while sent < limit {
        match tokio::time::timeout(DEADLINE, s.write_all(&record)).await {
            Ok(Ok(())) => sent += record.len(),
            Ok(Err(_)) => break,
            Err(_) => panic!("the server neither read nor closed for {DEADLINE:?}"),
        }
    }
    assert!(
        sent < 16 << 20,
        "the server took {sent} bytes of a handshake"
    );
    wait_for("a TLS refusal", || b.rejected_for(Reason::Tls) == 1).await;
    assert_eq!(b.connections(), 0);
    stop.cancel();
}
