//! The agent's side of the steward: runs one while this node leads (a new one for each term it
//! leads), and serves the node gRPC port to holders of a bloc key (the node handshake of
//! [`crux_reeve::nodeauth`]), admitting only live flock members.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crux_flock::driver::DriverHandle;
use crux_flock::MemberState;
use crux_proto::grpc::steward::v1::FlockId;
use crux_reeve::Reeve;
use crux_steward::{Admit, Steward, StewardConfig, StewardService};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Starts a steward when this node becomes the leader and stops it when it no longer is;
/// `current` holds the running one. A new steward starts from this node's replica of the
/// registry, so it answers whole at once; the reeves then send it everything they hold.
pub async fn supervise(
    handle: DriverHandle,
    netid: SocketAddr,
    reeve: Arc<Reeve>,
    config: StewardConfig,
    current: watch::Sender<Option<Arc<Steward>>>,
    stop: CancellationToken,
) {
    let mut flock = handle.watch();
    let mut running: Option<(u64, Arc<Steward>)> = None;
    loop {
        let lead = {
            let snap = flock.borrow_and_update();
            snap.leader
                .filter(|l| l.id == snap.identity.id && !snap.leaving)
                .map(|l| (l.id, l.term))
        };
        match (lead, &running) {
            (Some((_, term)), Some((t, _))) if *t == term => {}
            (Some((me, term)), _) => {
                if let Some((_, old)) = running.take() {
                    old.stop();
                }
                let s = Steward::start(
                    FlockId {
                        leader: me.to_string(),
                        term,
                    },
                    netid.to_string(),
                    &config,
                    reeve.replica(),
                );
                current.send_replace(Some(s.clone()));
                running = Some((term, s));
            }
            (None, Some(_)) => {
                if let Some((_, old)) = running.take() {
                    old.stop();
                }
                current.send_replace(None);
            }
            (None, None) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            r = flock.changed() => if r.is_err() { break },
        }
    }
    if let Some((_, s)) = running {
        s.stop();
    }
    current.send_replace(None);
}

/// The node ids of the live members (alive or suspect) at `ip`.
pub fn members_at(handle: &DriverHandle, ip: IpAddr) -> Vec<String> {
    handle
        .snapshot()
        .members
        .iter()
        .filter(|m| matches!(m.info.state, MemberState::Alive | MemberState::Suspect))
        .filter(|m| m.info.addr.ip() == ip)
        .map(|m| m.info.id.to_string())
        .collect()
}

/// Who may make node calls: the live members, by address.
pub fn admit(handle: DriverHandle) -> Admit {
    Arc::new(move |ip| members_at(&handle, ip))
}

/// Serves the node gRPC port (the steward, pastiche's pieces, the store's Raft, the deans and
/// the proctor) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admit: Admit,
    current: watch::Receiver<Option<Arc<Steward>>>,
    pastiche: crux_pastiche::serve::PeerService,
    store: crux_store::StoreServer,
    placement: crate::proctor::PlacementNode,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (dean, proctor) = placement.servers();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Room for 4 MiB pastiche pieces without flow-control stalls.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(1)))
        // Slack for a steward busy with a burst of registrations (see the reeve's link).
        .http2_keepalive_timeout(Some(crux_reeve::link::KEEPALIVE_TIMEOUT))
        .add_service(StewardService::new(current, admit).into_server())
        .add_service(pastiche.into_server())
        .add_service(store)
        .add_service(dean)
        .add_service(proctor)
        .serve_with_incoming_shutdown(
            accepted(listener, shutdown.clone()),
            shutdown.cancelled_owned(),
        )
        .await
}

/// Node handshakes under way at once, at most: connections beyond wait for none and are closed.
const HANDSHAKES_MAX: usize = 256;

/// The accepted connections of `listener`, with Nagle's algorithm off, each through the node
/// handshake ([`crux_reeve::nodeauth`]) when this process has node keys. A refused connection
/// is closed and counted; nothing else happens. Handshakes run beside the accept loop (at most
/// [`HANDSHAKES_MAX`] at once, each within its timeout), so a slow or hostile peer holds up no
/// one. (The server builder's `tcp_nodelay` applies only to listeners it binds itself; without
/// it, small messages such as registry changes wait up to 40 ms for the peer's delayed ACK.)
fn accepted(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<crux_reeve::nodeauth::Authed<tokio::net::TcpStream>>>
{
    use crux_reeve::nodeauth;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                c = listener.accept() => c,
            };
            let (mut conn, peer) = match conn {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: the server logs it; do not spin.
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            if let Err(e) = conn.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let Some(keys) = nodeauth::keys() else {
                if tx
                    .send(Ok(nodeauth::Authed::new(conn, None)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                nodeauth::count_refused("busy");
                tracing::debug!(%peer, "node connection refused: too many handshakes under way");
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = tokio::time::timeout(
                    nodeauth::HANDSHAKE_TIMEOUT,
                    nodeauth::server(&mut conn, &keys),
                )
                .await;
                drop(slot);
                match r {
                    Ok(Ok(key)) => {
                        let _ = tx.send(Ok(nodeauth::Authed::new(conn, Some(key)))).await;
                    }
                    Ok(Err(e)) => {
                        nodeauth::count_refused(e.reason());
                        tracing::debug!(%peer, error = %e, "node connection refused");
                    }
                    Err(_) => {
                        nodeauth::count_refused("timeout");
                        tracing::debug!(%peer, "node connection refused: handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
