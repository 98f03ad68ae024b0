//! Watching resources: the resources a [`Filter`] selects at index N, then every change after N,
//! in log order, without gaps, from this node's copy (every member of the group holds one).
//!
//! ```text
//!  from = None          ──▶ Snapshot{index: applied, compacted: false} ─┐
//!  from = Some(L), L ≥ floor ──▶ the history's batches after L ─────────┼─▶ Changes{index, events} …
//!  from = Some(L), L < floor ──▶ Snapshot{index: applied, compacted: true} ┘
//! ```
//!
//! The listing (or the replay) and the subscription to what the state machine applies next are
//! taken under the state machine's lock, which it holds while it applies and announces, so
//! nothing falls between them and nothing is seen twice. A watcher that falls more than
//! [`FEED_CAPACITY`] batches behind resumes from its last index out of the history; after the
//! state was replaced (a snapshot installed from the leader, the store abandoned for another
//! group) it gets a fresh listing flagged `compacted`.
//!
//! Each [`WatchEvent::Changes`] carries every matching change of one transaction (one log index):
//! a watcher sees a transaction whole or not at all, and resuming from the last index it saw
//! neither repeats nor skips anything.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::{Event, Feed, Resource, ResourceId};
use crate::Store;

/// How many batches the state machine's announcements hold for slow watchers.
pub const FEED_CAPACITY: usize = 4096;

/// How many events a watch queues for its reader before it waits for it.
pub const WATCH_QUEUE: usize = 64;

/// Which resources a watch follows.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The type.
    pub rtype: String,
    /// The horde.
    pub horde: String,
    /// A name, or a name prefix when `prefix`.
    pub name: String,
    /// Whether `name` is a prefix.
    pub prefix: bool,
}

impl Filter {
    /// Whether `id` is followed.
    pub fn matches(&self, id: &ResourceId) -> bool {
        id.rtype == self.rtype
            && id.horde == self.horde
            && if self.prefix {
                id.name.starts_with(&self.name)
            } else {
                id.name == self.name
            }
    }
}

/// What a watch delivers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Every resource selected, as of log index `index`. `compacted`: the watch was asked to
    /// resume from an index whose later changes this node no longer holds (or its state was
    /// replaced): this listing replaces everything the watcher knew.
    Snapshot {
        /// The state's log index.
        index: u64,
        /// See above.
        compacted: bool,
        /// The resources, ordered by name.
        items: Vec<Resource>,
    },
    /// The matching changes of the transaction at log index `index`.
    Changes {
        /// Its log index.
        index: u64,
        /// Its changes, in order.
        events: Vec<Event>,
    },
}

impl WatchEvent {
    /// Its log index: resume from it.
    pub fn index(&self) -> u64 {
        match self {
            WatchEvent::Snapshot { index, .. } | WatchEvent::Changes { index, .. } => *index,
        }
    }
}

/// Takes the listing or replay and a subscription at one point of the log. Returns the
/// subscription, what to send, and the index it brings the watcher to.
fn sync(
    store: &Store,
    filter: &Filter,
    from: Option<u64>,
    force_snapshot: bool,
) -> (broadcast::Receiver<Feed>, Vec<WatchEvent>, u64) {
    let inner = store.inner();
    let st = inner.shared.state.read().expect("state lock");
    let feed = store.slot.resources.subscribe();
    let applied = st.last_applied.map_or(0, |l| l.index);
    let table = &st.data.resources;
    let replay = match from {
        Some(l) if !force_snapshot => table.history().since(l).map(|b| (l, b)),
        _ => None,
    };
    match replay {
        Some((l, batches)) => {
            let out = batches
                .iter()
                .filter_map(|b| {
                    let events: Vec<Event> = b
                        .events
                        .iter()
                        .filter(|e| filter.matches(e.id()))
                        .cloned()
                        .collect();
                    (!events.is_empty()).then_some(WatchEvent::Changes {
                        index: b.index,
                        events,
                    })
                })
                .collect();
            (feed, out, l.max(applied))
        }
        None => {
            let snap = WatchEvent::Snapshot {
                index: applied,
                compacted: from.is_some(),
                items: table.select(filter),
            };
            (feed, vec![snap], applied)
        }
    }
}

async fn run(store: Store, filter: Filter, from: Option<u64>, tx: mpsc::Sender<WatchEvent>) {
    let mut from = from;
    let mut force_snapshot = false;
    loop {
        let (mut feed, out, mut last) = sync(&store, &filter, from, force_snapshot);
        for e in out {
            if tx.send(e).await.is_err() {
                return;
            }
        }
        loop {
            let f = tokio::select! {
                _ = tx.closed() => return,
                f = feed.recv() => f,
            };
            match f {
                Ok(Feed::Batch(b)) => {
                    if b.index <= last {
                        continue;
                    }
                    last = b.index;
                    let events: Vec<Event> = b
                        .events
                        .iter()
                        .filter(|e| filter.matches(e.id()))
                        .cloned()
                        .collect();
                    if !events.is_empty()
                        && tx
                            .send(WatchEvent::Changes {
                                index: b.index,
                                events,
                            })
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                Ok(Feed::Reset) => {
                    // Indexes before and after a replaced state need not be comparable (a new
                    // group): list afresh.
                    (from, force_snapshot) = (Some(last), true);
                    break;
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(missed = n, last, "watch fell behind, resuming from history");
                    (from, force_snapshot) = (Some(last), false);
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

impl Store {
    /// Watches the resources `filter` selects in this node's copy: from `None`, a listing then
    /// every change; from `Some(L)`, every change after log index L (or a fresh listing flagged
    /// `compacted` when this node no longer holds them). Ends when the receiver is dropped.
    pub fn resource_watch(&self, filter: Filter, from: Option<u64>) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        tokio::spawn(run(self.clone(), filter, from, tx));
        rx
    }

    /// Waits up to `wait` until a resource `filter` selects changes after log index `index` (a
    /// blocking read, as Consul's `?index=N&wait=…`); `true` if one did. Index 0 never waits.
    pub async fn resource_wait(&self, filter: Filter, index: u64, wait: Duration) -> bool {
        if index == 0 {
            return true;
        }
        let mut rx = self.resource_watch(filter, Some(index));
        matches!(tokio::time::timeout(wait, rx.recv()).await, Ok(Some(_)))
    }
}
