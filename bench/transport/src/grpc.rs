//! Pastiche pieces as pastiche moves them: a `Pastiche.Pieces` stream of 4 MiB messages over
//! HTTP/2, cleartext tonic over TCP against the node plane (`Transport::channel` to a server on
//! `Transport::incoming`), with the agent's HTTP/2 settings.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use crux_proto::grpc::pastiche::v1::{
    self as pb, pastiche_client::PasticheClient, pastiche_server,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use crate::bulk::per_gb;
use crate::{join, median, now, on_thread, pair, pattern, process_cpu, thread_cpu, Plane as Path};

/// Largest message either side takes (the pastiche service's limit is 16 MiB too).
const MESSAGE_MAX: usize = 16 << 20;
/// Pieces asked for per `Pieces` call.
const PIECES_PER_CALL: u32 = 64;

/// A holder that has every piece: each is the same 4 MiB buffer, copied into its message (as
/// the real one copies it from its file).
struct Holder {
    piece: Vec<u8>,
}

#[tonic::async_trait]
impl pastiche_server::Pastiche for Holder {
    type PiecesStream = ReceiverStream<Result<pb::Piece, Status>>;

    async fn manifest(
        &self,
        _: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }

    async fn have(
        &self,
        _: Request<pb::HaveRequest>,
    ) -> Result<Response<pb::HaveResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }

    async fn pieces(
        &self,
        req: Request<pb::PiecesRequest>,
    ) -> Result<Response<Self::PiecesStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let piece = self.piece.clone();
        tokio::spawn(async move {
            for index in req.into_inner().indexes {
                let msg = pb::Piece {
                    index,
                    data: piece.clone(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The agent's node server settings (agent/src/steward.rs).
fn server() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(1 << 20))
}

fn service(piece: usize) -> pastiche_server::PasticheServer<Holder> {
    pastiche_server::PasticheServer::new(Holder {
        piece: pattern(piece),
    })
    .max_decoding_message_size(MESSAGE_MAX)
    .max_encoding_message_size(MESSAGE_MAX)
}

/// The node channel's HTTP/2 settings (`Transport::channel`), over `path`, with the client's
/// largest accepted frame (the size of the DATA frames pieces come in) raised to `frame` when
/// given: an experiment, `Transport::channel` leaves it at HTTP/2's 16 KiB.
async fn channel(
    path: Path,
    frame: Option<u32>,
    addr: SocketAddr,
    t: &crux_transport::Transport,
) -> anyhow::Result<Channel> {
    if path == Path::Node && frame.is_none() {
        return Ok(t.channel(addr, None, Duration::from_secs(5)).await?);
    }
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(frame);
    Ok(match path {
        Path::Tcp => endpoint.connect().await?,
        Path::Node => {
            let t = t.clone();
            endpoint
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let t = t.clone();
                    async move { t.connect(addr, None).await.map(TokioIo::new) }
                }))
                .await?
        }
    })
}

/// Pulls `bytes` worth of pieces. Returns the bytes received, wall time, client thread CPU.
async fn pull(ch: Channel, bytes: u64, piece: usize) -> anyhow::Result<(u64, Duration, Duration)> {
    let mut client = PasticheClient::new(ch).max_decoding_message_size(MESSAGE_MAX);
    let pieces = bytes.div_ceil(piece as u64) as u32;
    let cpu0 = thread_cpu();
    let t0 = now();
    let mut got = 0u64;
    let mut next = 0u32;
    while next < pieces {
        let n = PIECES_PER_CALL.min(pieces - next);
        let mut s = client
            .pieces(pb::PiecesRequest {
                digest: String::new(),
                indexes: (next..next + n).collect(),
            })
            .await?
            .into_inner();
        while let Some(p) = s.next().await {
            got += p?.data.len() as u64;
        }
        next += n;
    }
    Ok((got, t0.elapsed(), thread_cpu() - cpu0))
}

struct Run {
    bytes: u64,
    wall: Duration,
    client_cpu: Duration,
    server_cpu: Duration,
    process_cpu: Duration,
}

/// A short name for a row (thread names).
fn tag(path: Path, frame: Option<u32>) -> String {
    format!(
        "{}{}",
        if path == Path::Node { "node" } else { "tcp" },
        if frame.is_some() { "-f" } else { "" },
    )
}

fn run(path: Path, frame: Option<u32>, bytes: u64, piece: usize) -> anyhow::Result<Run> {
    let (a, b) = pair()?;
    let stop = CancellationToken::new();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let cpu0 = process_cpu();
    let s = stop.clone();
    let srv = on_thread(
        &format!("holder-{}", tag(path, frame)),
        move || async move {
            let listener = TcpListener::from_std(std_listener)?;
            let cpu0 = thread_cpu();
            let svc = service(piece);
            match path {
                Path::Tcp => {
                    let incoming = TcpListenerStream::new(listener).map(|r| {
                        r.and_then(|s| {
                            s.set_nodelay(true)?;
                            Ok(s)
                        })
                    });
                    server()
                        .add_service(svc)
                        .serve_with_incoming_shutdown(incoming, s.cancelled_owned())
                        .await?
                }
                Path::Node => {
                    server()
                        .add_service(svc)
                        .serve_with_incoming_shutdown(
                            b.incoming(listener, s.clone()),
                            s.cancelled_owned(),
                        )
                        .await?
                }
            }
            Ok(thread_cpu() - cpu0)
        },
    );
    let cli = on_thread(
        &format!("puller-{}", tag(path, frame)),
        move || async move {
            let ch = channel(path, frame, addr, &a).await.context("channel")?;
            pull(ch, bytes, piece).await
        },
    );
    let pulled = join(cli);
    stop.cancel();
    let server_cpu = join(srv)?;
    let (got, wall, client_cpu) = pulled?;
    Ok(Run {
        bytes: got,
        wall,
        client_cpu,
        server_cpu,
        process_cpu: process_cpu() - cpu0,
    })
}

/// Runs and prints the gRPC table.
pub fn report(bytes: u64, piece: usize, repeats: usize) -> anyhow::Result<()> {
    println!(
        "grpc: Pastiche.Pieces, {} MiB per run in {} MiB messages ({PIECES_PER_CALL} per call), \
         one HTTP/2 connection, server and client each on one thread; median of {repeats}",
        bytes >> 20,
        piece >> 20
    );
    println!(
        "  {:<40} {:>7} {:>9} {:>10} {:>10} {:>10}   runs (MB/s)",
        "path", "MB/s", "per core", "server s/GB", "client s/GB", "proc s/GB"
    );
    let mib = Some(1 << 20);
    let rows = [
        ("cleartext HTTP/2 over TCP", Path::Tcp, None),
        ("HTTP/2 over the node plane", Path::Node, None),
        ("exp.: cleartext, client frames 1 MiB", Path::Tcp, mib),
        ("exp.: node plane, client frames 1 MiB", Path::Node, mib),
    ];
    let mut runs: Vec<Vec<Run>> = rows.iter().map(|_| Vec::new()).collect();
    for _ in 0..repeats.max(1) {
        for (i, (_, path, frame)) in rows.iter().enumerate() {
            runs[i].push(run(*path, *frame, bytes, piece)?);
        }
    }
    let mb_s = |r: &Run| r.bytes as f64 / r.wall.as_secs_f64() / 1e6;
    for (i, (name, _, _)) in rows.iter().enumerate() {
        let mut by_speed: Vec<(f64, usize)> = runs[i]
            .iter()
            .enumerate()
            .map(|(k, r)| (mb_s(r), k))
            .collect();
        let m = &runs[i][median(&mut by_speed).1];
        let all: Vec<String> = runs[i].iter().map(|r| format!("{:.0}", mb_s(r))).collect();
        println!(
            "  {:<40} {:>7.0} {:>9.0} {:>10.3} {:>10.3} {:>10.3}   {}",
            name,
            mb_s(m),
            m.bytes as f64 / m.server_cpu.max(m.client_cpu).as_secs_f64() / 1e6,
            per_gb(m.server_cpu, m.bytes),
            per_gb(m.client_cpu, m.bytes),
            per_gb(m.process_cpu, m.bytes),
            all.join(" ")
        );
    }
    Ok(())
}
