//! The flock as the services see it: a [`crux_service::FlockView`] made from each snapshot of
//! the flock driver, so that the service crates read the flock without depending on it.

use std::sync::Arc;

use crux_flock::driver::{DriverHandle, Snapshot};
use crux_flock::MemberState;
use crux_service::{FlockView, FlockWatch, Leader, Member};
use tokio_util::sync::CancellationToken;

/// The view of one snapshot.
pub fn of(snap: &Snapshot) -> FlockView {
    FlockView {
        me: snap.identity.id.0,
        addr: snap.identity.addr,
        leader: snap.leader.map(|l| Leader {
            id: l.id.0,
            addr: l.addr,
            term: l.term,
        }),
        leaving: snap.leaving,
        live: snap.live,
        members: snap
            .members
            .iter()
            .map(|m| {
                let live = matches!(m.info.state, MemberState::Alive | MemberState::Suspect);
                Member {
                    id: m.info.id.0,
                    boot: m.info.boot.0,
                    addr: m.info.addr,
                    live,
                    gone_for: if live {
                        std::time::Duration::ZERO
                    } else {
                        snap.now.saturating_sub(m.since)
                    },
                }
            })
            .collect(),
    }
}

/// A watch of the views of the driver's snapshots, and the task that keeps it (until `stop`, or
/// the driver ends).
pub fn follow(
    handle: &DriverHandle,
    stop: CancellationToken,
) -> (
    FlockWatch,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut snaps = handle.watch();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(of(&snaps.borrow_and_update())));
    let task = async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = snaps.changed() => if r.is_err() { return },
            }
            let view = Arc::new(of(&snaps.borrow_and_update()));
            tx.send_replace(view);
        }
    };
    (rx, task)
}

/// A watch that holds the view of the driver's snapshot now (for a one-off call).
pub fn now(handle: &DriverHandle) -> FlockWatch {
    tokio::sync::watch::channel(Arc::new(of(&handle.snapshot()))).1
}
