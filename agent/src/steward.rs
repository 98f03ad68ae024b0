//! The agent's side of the steward: runs one while this node leads (a new one for each term it
//! leads), and serves the node gRPC port over the node plane ([`crux_transport`]), whose peers
//! are the live flock members with the keys their membership records carry.

use std::net::SocketAddr;
use std::sync::Arc;

use crux_flock::driver::DriverHandle;
use crux_flock::MemberState;
use crux_proto::grpc::steward::v1::FlockId;
use crux_reeve::Reeve;
use crux_steward::{Steward, StewardConfig, StewardService};
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

/// The node-plane peers a flock snapshot lists: every live member (alive or suspect, this node
/// included) with the key of its membership record.
pub fn peers(
    snap: &crux_flock::driver::Snapshot,
) -> Vec<(crux_flock::NodeId, crux_flock::NodeKey)> {
    snap.members
        .iter()
        .filter(|m| matches!(m.info.state, MemberState::Alive | MemberState::Suspect))
        .filter_map(|m| Some((m.info.id, m.info.key?)))
        .collect()
}

/// Keeps `transport`'s peers those the flock lists, until the driver ends: a member that dies,
/// leaves or is revoked loses its node-plane connections at the snapshot that says so.
pub async fn follow_peers(handle: DriverHandle, transport: crux_transport::Transport) {
    let mut flock = handle.watch();
    loop {
        let listed = peers(&flock.borrow_and_update());
        transport.set_peers(listed);
        if flock.changed().await.is_err() {
            return;
        }
    }
}

/// Serves the node gRPC port (the steward, pastiche's pieces, the store's Raft, the deans and
/// the proctor) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    transport: crux_transport::Transport,
    current: watch::Receiver<Option<Arc<Steward>>>,
    pastiche: crux_pastiche::serve::PeerService,
    store: crux_store::StoreServer,
    placement: crux_placement::PlacementNode,
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
        .add_service(StewardService::new(current).into_server())
        .add_service(pastiche.into_server())
        .add_service(store)
        .add_service(dean)
        .add_service(proctor)
        .serve_with_incoming_shutdown(
            transport.incoming(listener, shutdown.clone()),
            shutdown.cancelled_owned(),
        )
        .await
}
