//! The puller: fetches a blob this node lacks from the nodes that hold it (whole or in part),
//! several at once, rarest piece first, verifying every piece and then the whole digest.
//!
//! * Holders come from the steward (pastiche's tracker). A puller announces itself as a holder as
//!   soon as it starts, so nodes pulling the same blob take pieces from each other.
//! * Each round asks every holder which pieces it has, orders the missing pieces by how few
//!   holders have them (ties in random order), and gives each to the holder with the fewest of our
//!   requests in flight, partial holders before whole ones.
//! * A holder that sends a piece that does not match the manifest is dropped for the rest of the
//!   pull; the piece is taken from another. One that fails to answer is skipped for the round.
//! * Verified pieces are kept in the store's temp state, so a pull that is interrupted (even by
//!   kill -9) resumes from them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::grpc::pastiche::v1::{self as pb, pastiche_client::PasticheClient};
use crux_reeve::Reeve;
use rand::seq::SliceRandom;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::digest::Digest;
use crate::manifest::Manifest;
use crate::serve::{manifest_of, MESSAGE_MAX};
use crate::store::{Pull, Store, StoreError};

/// Requests in flight at once, over all holders.
pub const PARALLEL: usize = 8;
/// Requests in flight at once to one holder.
pub const PER_HOLDER: usize = 2;
/// Pieces started per round: after that many, the holders and what they have are asked again
/// (other pullers of the same blob gain pieces all the time).
pub const ROUND_PIECES: usize = PARALLEL;

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// No node holds it, or none that could be reached.
    #[error("no holder of {0} is reachable")]
    NoHolder(Digest),
    /// The store refused (too large, disk full, ...).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The steward could not be asked.
    #[error("cannot ask the steward who holds {digest}: {why}")]
    Tracker {
        /// The blob.
        digest: Digest,
        /// Why.
        why: String,
    },
}

/// Why one piece failed.
enum PieceFailed {
    /// The holder did not give it (or gave bad bytes): another holder may.
    Holder(String),
    /// This node's store could not write it (disk full, I/O error): the pull stops.
    Local(StoreError),
}

/// What a pull did.
#[derive(Clone, Debug, Default)]
pub struct PullReport {
    /// The blob's manifest.
    pub manifest: Option<Manifest>,
    /// Pieces received, by the node id that sent them.
    pub sources: BTreeMap<String, u32>,
    /// Pieces already verified before this pull (a resumed pull).
    pub resumed: u32,
}

/// The pulls of one node: at most one per digest at a time (a second `get` waits for the first).
#[derive(Clone)]
pub struct Puller {
    store: Store,
    reeve: Arc<Reeve>,
    active: Arc<Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>,
    partial: Arc<Mutex<HashSet<Digest>>>,
}

impl std::fmt::Debug for Puller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Puller").finish_non_exhaustive()
    }
}

struct Holder {
    node: String,
    client: PasticheClient<Channel>,
    have: Vec<bool>,
    whole: bool,
    in_flight: usize,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io(std::io::Error::other(e.to_string()))),
    }
}

fn bits(bitmap: &[u8], n: u32) -> Vec<bool> {
    (0..n as usize)
        .map(|i| bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

impl Puller {
    /// Pulls into `store`, asking `reeve`'s steward for holders.
    pub fn new(store: Store, reeve: Arc<Reeve>) -> Puller {
        Puller {
            store,
            reeve,
            active: Arc::default(),
            partial: Arc::default(),
        }
    }

    /// Blobs being pulled now (this node holds part of them).
    pub fn partial(&self) -> HashSet<Digest> {
        self.partial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes sure the store holds `digest`: at once if it does, else pulled from its holders.
    pub async fn fetch(&self, digest: Digest) -> Result<PullReport, PullError> {
        let gate = {
            let mut a = self.active.lock().unwrap_or_else(|p| p.into_inner());
            a.entry(digest).or_default().clone()
        };
        let _one = gate.lock().await;
        if let Some(m) = self
            .store
            .manifest(&digest)
            .filter(|_| self.store.has(&digest))
        {
            return Ok(PullReport {
                manifest: Some(m),
                ..PullReport::default()
            });
        }
        self.partial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest);
        let r = self.pull(digest).await;
        self.partial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest);
        match &r {
            Ok(_) => self.reeve.hold(&digest.to_string()),
            Err(_) if !self.store.has(&digest) && self.store.manifest(&digest).is_none() => {
                self.reeve.unhold(&digest.to_string())
            }
            Err(_) => {}
        }
        r
    }

    async fn connect(&self, netid: &str) -> Option<PasticheClient<Channel>> {
        let addr: SocketAddr = netid.parse().ok()?;
        let config = self.reeve.config();
        let ch = config
            .transport
            .channel(addr, config.local_ip, Duration::from_secs(2))
            .await
            .ok()?;
        Some(
            PasticheClient::new(ch)
                .max_decoding_message_size(MESSAGE_MAX)
                .max_encoding_message_size(MESSAGE_MAX),
        )
    }

    /// The holders the steward names (not this node, not dropped ones), connected.
    async fn holders(
        &self,
        digest: Digest,
        known: &mut HashMap<String, PasticheClient<Channel>>,
        dropped: &HashSet<String>,
    ) -> Result<Vec<(String, PasticheClient<Channel>)>, PullError> {
        let me = &self.reeve.config().node;
        let list =
            self.reeve
                .holders(&digest.to_string())
                .await
                .map_err(|s| PullError::Tracker {
                    digest,
                    why: s.message().to_string(),
                })?;
        let mut out = Vec::new();
        for (node, netid) in list {
            if &node == me || dropped.contains(&node) {
                continue;
            }
            if !known.contains_key(&node) {
                if let Some(c) = self.connect(&netid).await {
                    known.insert(node.clone(), c);
                } else {
                    continue;
                }
            }
            out.push((node.clone(), known[&node].clone()));
        }
        Ok(out)
    }

    async fn pull(&self, digest: Digest) -> Result<PullReport, PullError> {
        let mut known = HashMap::new();
        let mut dropped: HashSet<String> = HashSet::new();
        let mut report = PullReport::default();
        // The manifest: from the first holder that gives one that checks. A blob put a moment
        // ago elsewhere may not have reached the tracker yet: ask again for a little while.
        let mut holders = self.holders(digest, &mut known, &dropped).await?;
        for _ in 0..10 {
            if !holders.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            holders = self.holders(digest, &mut known, &dropped).await?;
        }
        let mut manifest = None;
        for (node, client) in &holders {
            let mut c = client.clone();
            let r = c
                .manifest(pb::ManifestRequest {
                    digest: digest.to_string(),
                })
                .await;
            match r.map(|r| r.into_inner().manifest) {
                Ok(Some(m)) => match manifest_of(m) {
                    Ok(m) if m.digest == digest => {
                        manifest = Some((node.clone(), m));
                        break;
                    }
                    Ok(_) | Err(_) => {
                        warn!(%node, %digest, "holder sent a bad manifest; dropped");
                        dropped.insert(node.clone());
                    }
                },
                Ok(None) | Err(_) => continue,
            }
        }
        let Some((manifest_from, manifest)) = manifest else {
            return Err(PullError::NoHolder(digest));
        };
        let store = self.store.clone();
        let m = manifest.clone();
        let pull = Arc::new(blocking(move || store.begin_pull(m)).await?);
        self.reeve.hold(&digest.to_string());
        let n = manifest.piece_count();
        report.resumed = n - pull.missing().len() as u32;
        info!(%digest, size = manifest.size, pieces = n, resumed = report.resumed, "pull started");
        self.transfer(digest, &pull, &mut known, &mut dropped, &mut report)
            .await?;
        let pull = Arc::try_unwrap(pull).map_err(|_| {
            StoreError::Io(std::io::Error::other("a piece writer outlived its round"))
        })?;
        match blocking(move || pull.finish()).await {
            Ok(m) => {
                report.manifest = Some(m);
                info!(%digest, sources = ?report.sources, "pull done");
                Ok(report)
            }
            Err(e @ StoreError::DigestMismatch { .. }) => {
                warn!(%digest, from = %manifest_from, "the manifest did not describe the blob; pulled bytes discarded");
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Fetches every missing piece. Up to [`PARALLEL`] requests stay in flight all the time;
    /// after every [`ROUND_PIECES`] pieces done, the holders and what they have are asked again
    /// (the pipeline keeps running meanwhile), and the pieces still to start are ordered again,
    /// rarest first.
    async fn transfer(
        &self,
        digest: Digest,
        pull: &Arc<Pull>,
        known: &mut HashMap<String, PasticheClient<Channel>>,
        dropped: &mut HashSet<String>,
        report: &mut PullReport,
    ) -> Result<(), PullError> {
        // (holder, piece, what went wrong, whether the holder sent bad bytes); a failure of
        // this node's own store ends the pull (another holder would not help).
        type Done = (String, u32, Result<(), PieceFailed>, bool);
        let n = pull.manifest().piece_count();
        let mut tasks: JoinSet<Done> = JoinSet::new();
        let mut in_flight: HashSet<u32> = HashSet::new();
        let mut per_holder: HashMap<String, usize> = HashMap::new();
        // Pieces that failed from a holder: not asked of it again during this pull.
        let mut failed_from: HashSet<(String, u32)> = HashSet::new();
        let mut idle = 0u64;
        loop {
            // Refresh: who holds what.
            let mut holders: Vec<Holder> = Vec::new();
            for (node, client) in self.holders(digest, known, dropped).await? {
                let mut c = client.clone();
                let have = c
                    .have(pb::HaveRequest {
                        digest: digest.to_string(),
                    })
                    .await;
                if let Ok(h) = have {
                    let h = h.into_inner();
                    if h.pieces == n {
                        holders.push(Holder {
                            in_flight: per_holder.get(&node).copied().unwrap_or(0),
                            node,
                            client,
                            have: bits(&h.bitmap, n),
                            whole: h.whole,
                        });
                    }
                }
            }
            let missing: Vec<u32> = pull
                .missing()
                .into_iter()
                .filter(|i| !in_flight.contains(i))
                .collect();
            if missing.is_empty() && tasks.is_empty() {
                return Ok(());
            }
            // Rarest first; ties in random order so that pullers spread out.
            let mut order: Vec<(usize, u32)> = missing
                .iter()
                .map(|&i| {
                    let count = holders
                        .iter()
                        .filter(|h| {
                            h.have[i as usize] && !failed_from.contains(&(h.node.clone(), i))
                        })
                        .count();
                    (count, i)
                })
                .filter(|(count, _)| *count > 0)
                .collect();
            order.shuffle(&mut rand::rngs::OsRng);
            order.sort_by_key(|(count, _)| *count);
            let mut queue: std::collections::VecDeque<u32> =
                order.into_iter().map(|(_, i)| i).collect();
            if queue.is_empty() && tasks.is_empty() {
                // Nothing can be fetched now: wait for holders, a bounded number of times.
                idle += 1;
                if idle > 20 {
                    return Err(PullError::NoHolder(digest));
                }
                failed_from.clear();
                tokio::time::sleep(Duration::from_millis(100 * idle)).await;
                continue;
            }
            idle = 0;
            // A holder may take more requests when there are few holders.
            let cap = (PARALLEL / holders.len().max(1)).max(PER_HOLDER);
            let mut done_this_round = 0;
            loop {
                // Fill the pipeline.
                let mut deferred = Vec::new();
                while tasks.len() < PARALLEL {
                    let Some(i) = queue.pop_front() else { break };
                    let pick = holders
                        .iter()
                        .enumerate()
                        .filter(|(_, h)| {
                            h.have[i as usize]
                                && h.in_flight < cap
                                && !dropped.contains(&h.node)
                                && !failed_from.contains(&(h.node.clone(), i))
                        })
                        .min_by_key(|(_, h)| (h.in_flight, h.whole));
                    let Some((k, _)) = pick else {
                        deferred.push(i);
                        continue;
                    };
                    holders[k].in_flight += 1;
                    let node = holders[k].node.clone();
                    *per_holder.entry(node.clone()).or_default() += 1;
                    in_flight.insert(i);
                    let mut client = holders[k].client.clone();
                    let pull = pull.clone();
                    tasks.spawn(async move {
                        let r = client
                            .pieces(pb::PiecesRequest {
                                digest: digest.to_string(),
                                indexes: vec![i],
                            })
                            .await;
                        let holder = |why: String| Err(PieceFailed::Holder(why));
                        let data = match r {
                            Ok(s) => {
                                let mut s = s.into_inner();
                                match s.message().await {
                                    Ok(Some(p)) if p.index == i => p.data,
                                    Ok(_) => return (node, i, holder("no piece".into()), false),
                                    Err(e) => {
                                        return (node, i, holder(e.message().to_string()), false)
                                    }
                                }
                            }
                            Err(e) => return (node, i, holder(e.message().to_string()), false),
                        };
                        let w =
                            tokio::task::spawn_blocking(move || pull.write_piece(i, &data)).await;
                        match w {
                            Ok(Ok(())) => (node, i, Ok(()), false),
                            Ok(Err(StoreError::PieceMismatch { .. })) => (
                                node,
                                i,
                                holder("piece does not match the manifest".into()),
                                true,
                            ),
                            Ok(Err(e)) => (node, i, Err(PieceFailed::Local(e)), false),
                            Err(e) => (node, i, holder(e.to_string()), false),
                        }
                    });
                }
                for i in deferred.into_iter().rev() {
                    queue.push_front(i);
                }
                if done_this_round >= ROUND_PIECES && !queue.is_empty() {
                    break; // refresh with the pipeline still full
                }
                let Some(done) = tasks.join_next().await else {
                    break;
                };
                let (node, i, result, bad) = match done {
                    Ok(d) => d,
                    Err(e) => {
                        return Err(StoreError::Io(std::io::Error::other(e.to_string())).into());
                    }
                };
                done_this_round += 1;
                in_flight.remove(&i);
                if let Some(c) = per_holder.get_mut(&node) {
                    *c = c.saturating_sub(1);
                }
                if let Some(h) = holders.iter_mut().find(|h| h.node == node) {
                    h.in_flight = h.in_flight.saturating_sub(1);
                }
                match result {
                    Ok(()) => {
                        *report.sources.entry(node).or_default() += 1;
                    }
                    Err(PieceFailed::Local(e)) => {
                        warn!(%digest, piece = i, error = %e, "this node's store failed; pull stopped");
                        return Err(e.into());
                    }
                    Err(PieceFailed::Holder(why)) => {
                        debug!(%digest, piece = i, holder = %node, %why, "piece failed");
                        if bad {
                            warn!(%digest, piece = i, holder = %node, "holder sent bad bytes; dropped");
                            dropped.insert(node.clone());
                        }
                        failed_from.insert((node, i));
                        let again = holders.iter().any(|h| {
                            h.have[i as usize]
                                && !dropped.contains(&h.node)
                                && !failed_from.contains(&(h.node.clone(), i))
                        });
                        if again {
                            queue.push_back(i);
                        }
                    }
                }
                if queue.is_empty() && tasks.is_empty() {
                    break;
                }
            }
        }
    }
}
