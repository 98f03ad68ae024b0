//! The cipher suite the node plane negotiates, read off the wire: a relay between two
//! transports copies one connection and keeps the server's first bytes, whose ServerHello
//! (cleartext in TLS 1.3) names the suite. Beside it, what a service endpoint
//! (`crux_transport::endpoint`) negotiates, as its own API reports it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crux_transport::endpoint::{self, ClientAuth, EndpointAcceptor};
use crux_transport::NodeIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::pair;

/// The TLS 1.3 suites by code (RFC 8446 B.4).
fn name(code: u16) -> &'static str {
    match code {
        0x1301 => "TLS13_AES_128_GCM_SHA256",
        0x1302 => "TLS13_AES_256_GCM_SHA384",
        0x1303 => "TLS13_CHACHA20_POLY1305_SHA256",
        0x1304 => "TLS13_AES_128_CCM_SHA256",
        _ => "unknown",
    }
}

/// The cipher suite in a server's first flight: a handshake record holding a ServerHello.
fn server_hello_suite(b: &[u8]) -> anyhow::Result<u16> {
    // record: type(1)=22 version(2) length(2); handshake: type(1)=2 length(3);
    // ServerHello: legacy_version(2) random(32) session_id<0..32> cipher_suite(2) ...
    if b.len() < 44 || b[0] != 22 || b[5] != 2 {
        bail!("not a ServerHello: {:02x?}", &b[..b.len().min(8)]);
    }
    let sid = b[43] as usize;
    let at = 44 + sid;
    let code = b.get(at..at + 2).context("short ServerHello")?;
    Ok(u16::from_be_bytes([code[0], code[1]]))
}

/// Relays one connection from a fresh listener to `to`; returns the listener's address and the
/// server's first bytes once the connection ends.
async fn relay(to: SocketAddr) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<Vec<u8>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut first = Vec::new();
        let Ok((client, _)) = listener.accept().await else {
            return first;
        };
        let Ok(server) = TcpStream::connect(to).await else {
            return first;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if first.len() < 1024 {
                first.extend_from_slice(&buf[..n.min(1024 - first.len())]);
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        up.abort();
        first
    });
    Ok((addr, task))
}

async fn node_plane() -> anyhow::Result<u16> {
    let (a, b) = pair()?;
    let stop = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let mut incoming = Box::pin(b.incoming(listener, stop.clone()));
    let accepted = tokio::spawn(async move { incoming.next().await });
    let (via, sniffed) = relay(server_addr).await?;
    let conn = a.connect(via, None).await?;
    let theirs = tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .context("the server did not accept")??;
    drop(conn);
    drop(theirs);
    stop.cancel();
    let first = tokio::time::timeout(Duration::from_secs(5), sniffed)
        .await
        .context("the relay did not end")??;
    server_hello_suite(&first)
}

async fn service_endpoint() -> anyhow::Result<String> {
    let server = NodeIdentity::generate()?;
    let acceptor = EndpointAcceptor::new(Arc::new(endpoint::server_config(
        &server,
        &ClientAuth::Anonymous,
    )?));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let mut incoming = Box::pin(acceptor.incoming(listener, stop.clone()));
    tokio::spawn(async move { while incoming.next().await.is_some() {} });
    let config = Arc::new(endpoint::client_config(&[server.public()], None)?);
    let s = endpoint::connect(&addr, config, Duration::from_secs(5)).await?;
    stop.cancel();
    Ok(s.cipher_suite()
        .and_then(|c| c.as_str())
        .unwrap_or("unknown")
        .to_string())
}

/// Prints the negotiated suites.
pub fn report() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = rt.block_on(node_plane())?;
    let ep = rt.block_on(service_endpoint())?;
    println!(
        "suite: the node plane negotiated {} (0x{node:04x}, read from the ServerHello on the wire), \
         X25519 key exchange, Ed25519 raw public keys both ways",
        name(node)
    );
    println!("       a service endpoint (crux_transport::endpoint) negotiated {ep}");
    Ok(())
}
