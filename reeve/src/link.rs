//! The reeve's one stream to the steward: connects to whichever steward the flock names, sends
//! every local instance first (so a new steward is rebuilt from the reeves), then batches of
//! registrations, changes and heartbeats; receives acks and every change of the steward's table
//! into the replica. Reconnects with backoff; follows the leader when it moves.

use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::steward::v1::{steward_client::StewardClient, steward_update, ReeveBatch};
use crux_steward::server::MESSAGE_MAX;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace};

use crate::node::{LinkStatus, Reeve, Target};

/// Longest wait between two attempts to reach a steward.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Shortest.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// How long a node channel waits for the answer to an HTTP/2 ping (see
/// [`crux_transport::KEEPALIVE_TIMEOUT`]).
pub const KEEPALIVE_TIMEOUT: Duration = crux_transport::KEEPALIVE_TIMEOUT;

/// Runs the link (and the heartbeater's expiry rounds) until `shutdown`.
pub async fn run(reeve: Arc<Reeve>, shutdown: CancellationToken) {
    let expiry = {
        let reeve = reeve.clone();
        let shutdown = shutdown.clone();
        let tick = (reeve.config().heartbeat_interval / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => reeve.check_expiry(),
                }
            }
        })
    };
    let mut targets = reeve.target_watch();
    let mut backoff = BACKOFF_MIN;
    loop {
        let target = targets.borrow_and_update().clone();
        let Some(target) = target else {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = targets.changed() => if r.is_err() { break } else { continue },
            }
        };
        match link_once(&reeve, &target, &shutdown).await {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(why) => {
                debug!(steward = %target.steward, %why, "no link to the steward");
                reeve.set_status(LinkStatus::default());
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = targets.changed() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        reeve.set_status(LinkStatus::default());
        // The flock's view of the steward is gone (the agent is stopping): do not relink.
        if shutdown.is_cancelled() || targets.has_changed().is_err() {
            break;
        }
    }
    expiry.abort();
}

/// One link, until it fails (Err) or the target changes or a shutdown (Ok).
async fn link_once(
    reeve: &Arc<Reeve>,
    target: &Target,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let mut targets = reeve.target_watch();
    let channel = reeve
        .config()
        .transport
        .channel(
            target.steward,
            reeve.config().local_ip,
            Duration::from_secs(2),
        )
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = StewardClient::new(channel)
        .max_decoding_message_size(MESSAGE_MAX)
        .max_encoding_message_size(MESSAGE_MAX);
    let (tx, rx) = mpsc::channel::<ReeveBatch>(16);
    let first = reeve.full_batch();
    let sent = first.put.len();
    tx.send(first)
        .await
        .map_err(|_| "link closed".to_string())?;
    let mut inbound = client
        .link(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    // Batches go up from a task of their own, so that a large downstream (a snapshot, a burst
    // of changes) being applied here never holds back the beats that keep this node's
    // instances valid at the steward.
    let mut sender = AbortOnDrop(tokio::spawn(send_batches(reeve.clone(), tx)));
    let mut flock = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = targets.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                if targets.borrow().as_ref() != Some(target) {
                    return Ok(());
                }
            }
            _ = &mut sender.0 => return Err("link closed".into()),
            msg = inbound.message() => match msg {
                Ok(Some(update)) => match update.kind {
                    Some(steward_update::Kind::Ack(ack)) => {
                        if flock.is_none() {
                            info!(steward = %ack.steward, term = ack.flock_id.as_ref().map(|f| f.term).unwrap_or(0), instances = sent, "linked to the steward");
                        }
                        flock = ack.flock_id.clone();
                        reeve.set_status(LinkStatus { flock_id: ack.flock_id, steward: ack.steward });
                        if !ack.unknown_ids.is_empty() {
                            reeve.mark_all_pending();
                        }
                    }
                    Some(steward_update::Kind::Changes(c)) => match &flock {
                        Some(f) => {
                            trace!(node = %reeve.config().node, revision = c.revision, snapshot = c.snapshot, more = c.more, put = c.put.len(), "changes from the steward");
                            reeve.apply_changes(f, c)
                        }
                        None => return Err("changes before the first ack".into()),
                    },
                    None => {}
                },
                Ok(None) => return Err("the steward closed the link".into()),
                Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
            },
        }
    }
}

/// The sending half of a link: registrations and removals as they come, and every heartbeat
/// interval the validity of every live local instance. Ends when the link does.
async fn send_batches(reeve: Arc<Reeve>, tx: mpsc::Sender<ReeveBatch>) {
    let mut beat = tokio::time::interval(reeve.config().heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        let beats = tokio::select! {
            _ = tx.closed() => return,
            _ = reeve.dirtied() => false,
            _ = beat.tick() => true,
        };
        if let Some(b) = reeve.next_batch(beats) {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    }
}

/// Aborts a task when dropped (a link's sender ends with the link).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
