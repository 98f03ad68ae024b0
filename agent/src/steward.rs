//! The agent's side of the steward: runs one while this node leads (a new one for each term it
//! leads), and serves the node gRPC port, admitting only live flock members.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crux_flock::driver::DriverHandle;
use crux_flock::MemberState;
use crux_proto::grpc::steward::v1::FlockId;
use crux_reeve::Reeve;
use crux_steward::{Admit, Steward, StewardConfig, StewardService};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
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
        .serve_with_incoming_shutdown(no_delay(listener), shutdown.cancelled_owned())
        .await
}

/// The accepted connections of `listener` with Nagle's algorithm off. (The server builder's
/// `tcp_nodelay` applies only to listeners it binds itself; without this, small messages such as
/// registry changes wait up to 40 ms for the peer's delayed ACK.)
fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        Ok(conn)
    })
}
