//! Bytes over one connection: plain TCP against one node-plane connection.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use crux_transport::Transport;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{join, median, now, on_thread, pair, pattern, process_cpu, thread_cpu};

/// Which connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A plain TCP connection.
    Tcp,
    /// A `crux_transport` connection (TLS 1.3 + bloc proof).
    Node,
}

impl Path {
    /// A short name (for thread names).
    fn tag(self) -> &'static str {
        match self {
            Path::Tcp => "tcp",
            Path::Node => "node",
        }
    }
}

/// One run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub bytes: u64,
    pub wall: Duration,
    /// CPU of the sending side's thread (None when both sides share one thread).
    pub sender_cpu: Option<Duration>,
    /// CPU of the receiving side's thread (None when both sides share one thread).
    pub receiver_cpu: Option<Duration>,
    /// CPU of the whole process during the run.
    pub process_cpu: Duration,
}

impl Run {
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.wall.as_secs_f64() / 1e6
    }

    /// What one core per side would carry if nothing else ran: bytes per CPU second of the
    /// busier side (of the one thread when both sides share it).
    pub fn per_core_mb_s(&self) -> f64 {
        let busiest = match (self.sender_cpu, self.receiver_cpu) {
            (Some(s), Some(r)) => s.max(r),
            _ => self.process_cpu,
        };
        self.bytes as f64 / busiest.as_secs_f64() / 1e6
    }
}

/// CPU seconds per 10^9 bytes.
pub fn per_gb(cpu: Duration, bytes: u64) -> f64 {
    cpu.as_secs_f64() / (bytes as f64 / 1e9)
}

/// What the two ends need to connect: two nodes of one flock.
#[derive(Clone)]
struct Ends {
    server: Transport,
    client: Transport,
}

impl Ends {
    fn new() -> anyhow::Result<Ends> {
        let (client, server) = pair()?;
        Ok(Ends { server, client })
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn accept(
    path: Path,
    listener: TcpListener,
    ends: Ends,
    stop: CancellationToken,
) -> anyhow::Result<Box<dyn Io>> {
    Ok(match path {
        Path::Tcp => {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Path::Node => {
            let mut incoming = Box::pin(ends.server.incoming(listener, stop));
            Box::new(incoming.next().await.context("no connection")??)
        }
    })
}

async fn dial(path: Path, addr: SocketAddr, ends: Ends) -> anyhow::Result<Box<dyn Io>> {
    Ok(match path {
        Path::Tcp => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Path::Node => Box::new(ends.client.connect(addr, None).await?),
    })
}

/// Reads `bytes`, then acks with one byte. Returns the thread's CPU for it.
async fn receive(mut s: Box<dyn Io>, bytes: u64, read_len: usize) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; read_len];
    let cpu0 = thread_cpu();
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).await?;
        ensure!(n > 0, "closed after {got} of {bytes} bytes");
        got += n as u64;
    }
    s.write_all(b"k").await?;
    s.flush().await?;
    let cpu = thread_cpu() - cpu0;
    // Wait for the sender to close, so the ack is not cut off.
    let _ = s.read(&mut buf[..1]).await;
    Ok(cpu)
}

/// Writes `bytes` in `piece`s, waits for the ack. Returns the wall time and the thread's CPU.
async fn send(mut s: Box<dyn Io>, bytes: u64, data: &[u8]) -> anyhow::Result<(Duration, Duration)> {
    let cpu0 = thread_cpu();
    let t0 = now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (data.len() as u64).min(bytes - sent) as usize;
        s.write_all(&data[..n]).await?;
        sent += n as u64;
    }
    s.flush().await?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    let wall = t0.elapsed();
    let cpu = thread_cpu() - cpu0;
    s.shutdown().await.ok();
    Ok((wall, cpu))
}

/// One run over `path`: sender and receiver each on its own thread, or both on one.
pub fn run(
    path: Path,
    bytes: u64,
    piece: usize,
    read_len: usize,
    one_thread: bool,
) -> anyhow::Result<Run> {
    let a = Ends::new()?;
    let b = a.clone();
    let data = pattern(piece);
    let stop = CancellationToken::new();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let cpu0 = process_cpu();
    let r = if one_thread {
        let s = stop.clone();
        let wall = join(on_thread("both", move || async move {
            let listener = TcpListener::from_std(std_listener)?;
            let (server, client) = tokio::join!(accept(path, listener, b, s), dial(path, addr, a));
            let (server, client) = (server?, client?);
            let (r, w) = tokio::join!(receive(server, bytes, read_len), send(client, bytes, &data));
            r?;
            Ok(w?.0)
        }))?;
        Run {
            bytes,
            wall,
            sender_cpu: None,
            receiver_cpu: None,
            process_cpu: process_cpu() - cpu0,
        }
    } else {
        let s = stop.clone();
        let server = on_thread(&format!("recv-{}", path.tag()), move || async move {
            let listener = TcpListener::from_std(std_listener)?;
            let conn = accept(path, listener, b, s).await?;
            receive(conn, bytes, read_len).await
        });
        let client = on_thread(&format!("send-{}", path.tag()), move || async move {
            let conn = dial(path, addr, a).await?;
            send(conn, bytes, &data).await
        });
        let (wall, sender) = join(client)?;
        let receiver = join(server)?;
        Run {
            bytes,
            wall,
            sender_cpu: Some(sender),
            receiver_cpu: Some(receiver),
            process_cpu: process_cpu() - cpu0,
        }
    };
    stop.cancel();
    Ok(r)
}

fn secs(d: Option<Duration>, bytes: u64) -> String {
    d.map_or("-".into(), |d| format!("{:.3}", per_gb(d, bytes)))
}

/// Runs and prints the bulk table.
pub fn report(bytes: u64, piece: usize, read_len: usize, repeats: usize) -> anyhow::Result<()> {
    println!(
        "bulk: {} MiB per run in {} MiB pieces over one loopback connection, one client, \
         receiver reads {} KiB at a time; median of {repeats} runs (by MB/s)",
        bytes >> 20,
        piece >> 20,
        read_len >> 10
    );
    println!(
        "  {:<40} {:>7} {:>9} {:>10} {:>10} {:>10}   runs (MB/s)",
        "path", "MB/s", "per core", "send s/GB", "recv s/GB", "proc s/GB"
    );
    let rows: [(&str, Path, bool); 3] = [
        ("plain TCP (one thread per side)", Path::Tcp, false),
        ("node plane (one thread per side)", Path::Node, false),
        ("node plane (both sides on one thread)", Path::Node, true),
    ];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); rows.len()];
    // Interleaved, so a noisy moment hits every path alike.
    for _ in 0..repeats.max(1) {
        for (i, (_, path, one)) in rows.iter().enumerate() {
            runs[i].push(run(*path, bytes, piece, read_len, *one)?);
        }
    }
    let mut medians = Vec::new();
    for (i, (name, _, _)) in rows.iter().enumerate() {
        let mut by_speed: Vec<(f64, usize)> = runs[i]
            .iter()
            .enumerate()
            .map(|(k, r)| (r.mb_s(), k))
            .collect();
        let m = runs[i][median(&mut by_speed).1];
        let all: Vec<String> = runs[i].iter().map(|r| format!("{:.0}", r.mb_s())).collect();
        println!(
            "  {:<40} {:>7.0} {:>9.0} {:>10} {:>10} {:>10.3}   {}",
            name,
            m.mb_s(),
            m.per_core_mb_s(),
            secs(m.sender_cpu, m.bytes),
            secs(m.receiver_cpu, m.bytes),
            per_gb(m.process_cpu, m.bytes),
            all.join(" ")
        );
        medians.push(m);
    }
    let (tcp, node) = (medians[0], medians[1]);
    println!(
        "  node plane / plain TCP: {:.2}x the time; {:.2} s more CPU per GB (whole process)",
        node.wall.as_secs_f64() / tcp.wall.as_secs_f64() * (tcp.bytes as f64 / node.bytes as f64),
        per_gb(node.process_cpu, node.bytes) - per_gb(tcp.process_cpu, tcp.bytes)
    );
    println!(
        "  (per core: MB per CPU second of the busier side — what one core per side carries \
         when nothing else runs)"
    );
    Ok(())
}
