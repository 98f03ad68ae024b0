//! The steward as a gRPC service on the node port: one [`Steward`] while this node leads, none
//! otherwise; every call comes over the node plane, from a node the flock lists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::grpc::steward::v1::{
    self as pb, steward_server, Ack, FlockId, ReeveBatch, StewardUpdate, TableChanges,
};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::registry::Registry;
use crate::select::{best_first, horde_or_default};
use crate::table::Change;

/// Instances per message of a snapshot sent in parts.
pub const SNAPSHOT_CHUNK: usize = 2000;
/// Largest message either side accepts (a batch of a reeve with many instances).
pub const MESSAGE_MAX: usize = 16 << 20;

/// Tunables of a steward.
#[derive(Clone, Debug)]
pub struct StewardConfig {
    /// How long an instance past valid-until stays (as `unknown`) before it is removed.
    pub grace: Duration,
    /// How often validity is checked.
    pub expiry_tick: Duration,
    /// How long an instance seeded from the previous steward's table is kept unless its reeve
    /// re-registers it.
    pub seed_valid: Duration,
}

impl Default for StewardConfig {
    fn default() -> Self {
        StewardConfig {
            grace: Duration::from_secs(60),
            expiry_tick: Duration::from_millis(100),
            seed_valid: Duration::from_secs(5),
        }
    }
}

/// A running steward.
#[derive(Debug)]
pub struct Steward {
    registry: Mutex<Registry>,
    /// Per node, the number of its newest link (what a node holds is forgotten when its newest
    /// link closes).
    links: Mutex<HashMap<String, u64>>,
    flock_id: FlockId,
    netid: String,
    stop: CancellationToken,
}

impl Steward {
    /// A steward for the flock `flock_id`, reached at `netid`, seeded with the replica this node
    /// holds. Starts its expiry task; [`Steward::stop`] ends it and every link.
    pub fn start(
        flock_id: FlockId,
        netid: String,
        config: &StewardConfig,
        seed: Vec<pb::Instance>,
    ) -> Arc<Steward> {
        let mut registry = Registry::new(config.grace);
        let seeded = seed.len();
        registry.seed(seed, Instant::now(), config.seed_valid);
        let steward = Arc::new(Steward {
            registry: Mutex::new(registry),
            links: Mutex::new(HashMap::new()),
            flock_id,
            netid,
            stop: CancellationToken::new(),
        });
        info!(
            leader = %steward.flock_id.leader,
            term = steward.flock_id.term,
            seeded,
            "steward started"
        );
        tokio::spawn(steward.clone().expire_loop(config.expiry_tick));
        steward
    }

    /// Stops the steward: its links close, and the reeves look for the next one.
    pub fn stop(&self) {
        if !self.stop.is_cancelled() {
            info!(term = self.flock_id.term, "steward stopped");
        }
        self.stop.cancel();
    }

    /// Its FlockID.
    pub fn flock_id(&self) -> &FlockId {
        &self.flock_id
    }

    /// Instances in the table.
    pub fn len(&self) -> usize {
        self.lock().table().len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn expire_loop(self: Arc<Self>, tick: Duration) {
        let mut every = tokio::time::interval(tick);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = every.tick() => {
                    if let Some(c) = self.lock().expire(Instant::now()) {
                        debug!(revision = c.revision, unknown = c.put.len(), removed = c.remove.len(), "expiry");
                    }
                }
            }
        }
    }

    fn ack(&self, seq: u64, unknown_ids: Vec<String>) -> StewardUpdate {
        StewardUpdate {
            kind: Some(pb::steward_update::Kind::Ack(Ack {
                seq,
                flock_id: Some(self.flock_id.clone()),
                steward: self.netid.clone(),
                unknown_ids,
            })),
        }
    }

    /// Serves one reeve's link, then forgets what its node holds unless a newer link of the same
    /// node has taken over.
    async fn link<S>(
        self: Arc<Self>,
        node: String,
        first: ReeveBatch,
        incoming: S,
        tx: mpsc::Sender<Result<StewardUpdate, Status>>,
    ) where
        S: Stream<Item = Result<ReeveBatch, Status>> + Unpin + Send + 'static,
    {
        let generation = {
            let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            let g = links.entry(node.clone()).or_insert(0);
            *g += 1;
            *g
        };
        self.clone()
            .serve_link(node.clone(), first, incoming, tx)
            .await;
        let newest = {
            let links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            links.get(&node).copied() == Some(generation)
        };
        if newest {
            self.lock().forget_holdings(&node);
        }
    }

    /// Serves one reeve's link until it closes or the steward stops.
    ///
    /// Two tasks: the reader applies the reeve's batches (registrations and the beats that keep
    /// its instances valid) as they come, and this one sends acks and table changes down. A
    /// reeve slow to take the changes (a burst, a large snapshot) therefore never holds back its
    /// own beats: before, one task did both, and a full downstream stopped the beats until the
    /// node's instances expired, which made more changes to send.
    async fn serve_link<S>(
        self: Arc<Self>,
        node: String,
        first: ReeveBatch,
        incoming: S,
        tx: mpsc::Sender<Result<StewardUpdate, Status>>,
    ) where
        S: Stream<Item = Result<ReeveBatch, Status>> + Unpin + Send + 'static,
    {
        let resume = match &first.resume_flock {
            Some(f) if *f == self.flock_id => Some(first.resume_revision),
            _ => None,
        };
        let seq = first.seq;
        // The first batch (the reeve's whole set) goes in before the snapshot is cut, so the
        // reeve never sees its own instances vanish and come back.
        let (applied, mut sub, initial, mut last) = {
            let mut reg = self.lock();
            let applied = reg.apply(Instant::now(), &node, first);
            let sub = reg.table().subscribe();
            let initial = initial_changes(&reg, resume);
            (applied, sub, initial, reg.table().revision())
        };
        if !applied.refused.is_empty() {
            warn!(%node, refused = ?applied.refused, "refused records of a reeve");
        }
        if tx
            .send(Ok(self.ack(seq, applied.unknown_ids)))
            .await
            .is_err()
        {
            return;
        }
        if let Some(c) = initial {
            if !send_change(&tx, &c).await {
                return;
            }
        }
        let upstream = Arc::new(Upstream::default());
        let _reader = AbortOnDrop(tokio::spawn(self.clone().read_link(
            node.clone(),
            incoming,
            upstream.clone(),
        )));
        loop {
            // Acks (and the reader's end) first: they are small and the reeve waits for them.
            let (ack, end) = upstream.take();
            if let Some((seq, unknown_ids)) = ack {
                if tx.send(Ok(self.ack(seq, unknown_ids))).await.is_err() {
                    return;
                }
            }
            if let Some(end) = end {
                if let Some(status) = end {
                    let _ = tx.send(Err(status)).await;
                }
                return;
            }
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("steward stopped: leadership moved"))).await;
                    return;
                }
                _ = tx.closed() => return,
                _ = upstream.notify.notified() => {}
                change = sub.recv() => match change {
                    Ok(c) => {
                        // Everything else already waiting goes down with it, as one change:
                        // an instance that changed twice meanwhile is sent once.
                        let mut pending = vec![c];
                        while let Ok(c) = sub.try_recv() {
                            pending.push(c);
                        }
                        pending.retain(|c| c.revision > last);
                        let Some(c) = merge(&pending) else { continue };
                        debug!(%node, revision = c.revision, changes = pending.len(), put = c.put.len(), remove = c.remove.len(), "changes to a reeve");
                        last = c.revision;
                        if !send_change(&tx, &c).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow for the live feed: catch up from the log, or whole.
                        let (fresh, catch_up) = {
                            let reg = self.lock();
                            (reg.table().subscribe(), initial_changes(&reg, Some(last)))
                        };
                        sub = fresh;
                        if let Some(c) = catch_up {
                            debug!(%node, revision = c.revision, snapshot = c.snapshot, put = c.put.len(), "a reeve lagged: caught up");
                            last = c.revision;
                            if !send_change(&tx, &c).await {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// The reader of a link: applies each batch as it comes and leaves its ack to the writer.
    async fn read_link<S>(self: Arc<Self>, node: String, mut incoming: S, up: Arc<Upstream>)
    where
        S: Stream<Item = Result<ReeveBatch, Status>> + Unpin + Send + 'static,
    {
        let end = loop {
            match incoming.next().await {
                Some(Ok(batch)) => {
                    if batch.node != node {
                        break Some(Status::permission_denied(format!(
                            "batch names node {}, but this link is node {node}'s",
                            batch.node
                        )));
                    }
                    let seq = batch.seq;
                    let applied = self.lock().apply(Instant::now(), &node, batch);
                    if !applied.refused.is_empty() {
                        warn!(%node, refused = ?applied.refused, "refused records of a reeve");
                    }
                    up.ack(seq, applied.unknown_ids);
                }
                None => break None,
                Some(Err(e)) => {
                    debug!(%node, error = %e, "reeve link ended");
                    break None;
                }
            }
        };
        up.end(end);
    }
}

/// What a link's reader hands its writer: the ack owed (the newest batch's seq and every id it
/// did not know since the last ack sent), and whether the reeve's side has ended.
#[derive(Debug, Default)]
struct Upstream {
    state: Mutex<UpstreamState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct UpstreamState {
    ack: Option<(u64, Vec<String>)>,
    /// Some once the reader is done: with the error to send the reeve, if any.
    end: Option<Option<Status>>,
}

type Owed = (Option<(u64, Vec<String>)>, Option<Option<Status>>);

impl Upstream {
    fn lock(&self) -> std::sync::MutexGuard<'_, UpstreamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ack(&self, seq: u64, unknown_ids: Vec<String>) {
        {
            let mut s = self.lock();
            match &mut s.ack {
                Some((s, ids)) => {
                    *s = seq;
                    ids.extend(unknown_ids);
                }
                None => s.ack = Some((seq, unknown_ids)),
            }
        }
        self.notify.notify_one();
    }

    fn end(&self, status: Option<Status>) {
        self.lock().end = Some(status);
        self.notify.notify_one();
    }

    fn take(&self) -> Owed {
        let mut s = self.lock();
        (s.ack.take(), s.end.take())
    }
}

/// Aborts a task when dropped (a link's reader ends with its writer).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Consecutive changes as one: each instance as it is after the last of them. None when there
/// are none. A snapshot among them makes the result a snapshot (of the table at its end).
fn merge(changes: &[Arc<Change>]) -> Option<Arc<Change>> {
    match changes {
        [] => return None,
        [one] => return Some(one.clone()),
        _ => {}
    }
    let from = changes.iter().rposition(|c| c.snapshot).unwrap_or(0);
    let changes = &changes[from..];
    let mut put: HashMap<&str, &pb::Instance> = HashMap::new();
    let mut remove: HashMap<&str, &pb::Instance> = HashMap::new();
    for c in changes {
        for i in &c.put {
            remove.remove(i.id.as_str());
            put.insert(&i.id, i);
        }
        for i in &c.remove {
            put.remove(i.id.as_str());
            remove.insert(&i.id, i);
        }
    }
    let snapshot = changes[0].snapshot;
    Some(Arc::new(Change {
        revision: changes.last().map(|c| c.revision).unwrap_or(0),
        snapshot,
        put: put.into_values().cloned().collect(),
        // After a snapshot, what is gone is simply not in it.
        remove: if snapshot {
            Vec::new()
        } else {
            remove.into_values().cloned().collect()
        },
    }))
}

/// What a new link needs first: the changes since `resume` (merged into one) if the log holds
/// them and they are fewer than the table's instances, else the whole table. None: nothing.
fn initial_changes(reg: &Registry, resume: Option<u64>) -> Option<Arc<Change>> {
    if let Some(changes) = resume.and_then(|r| reg.table().since(r)) {
        let size: usize = changes.iter().map(|c| c.put.len() + c.remove.len()).sum();
        if size <= reg.table().len().max(SNAPSHOT_CHUNK) {
            return merge(&changes);
        }
    }
    Some(Arc::new(reg.table().snapshot()))
}

/// Sends one change (a large snapshot in parts). False when the reeve is gone.
async fn send_change(tx: &mpsc::Sender<Result<StewardUpdate, Status>>, c: &Change) -> bool {
    let remove: Vec<String> = c.remove.iter().map(|i| i.id.clone()).collect();
    let chunks: Vec<&[pb::Instance]> = if c.put.is_empty() {
        vec![&[]]
    } else {
        c.put.chunks(SNAPSHOT_CHUNK).collect()
    };
    let n = chunks.len();
    for (k, chunk) in chunks.into_iter().enumerate() {
        let last = k + 1 == n;
        let msg = TableChanges {
            snapshot: c.snapshot,
            put: chunk.to_vec(),
            remove: if last { remove.clone() } else { Vec::new() },
            revision: c.revision,
            more: !last,
        };
        let update = StewardUpdate {
            kind: Some(pb::steward_update::Kind::Changes(msg)),
        };
        if tx.send(Ok(update)).await.is_err() {
            return false;
        }
    }
    true
}

/// The node id (16 hex digits) a node call comes from, as its node-plane connection proved it
/// (see `crux_transport`): only listed flock members get that far.
pub fn caller<T>(req: &Request<T>) -> Result<String, Status> {
    crux_transport::peer(req).map(|p| p.node.to_string())
}

/// The node gRPC service: the steward when this node runs one.
#[derive(Clone)]
pub struct StewardService {
    current: watch::Receiver<Option<Arc<Steward>>>,
}

impl StewardService {
    /// Serves whatever steward `current` holds, to the node plane's callers.
    pub fn new(current: watch::Receiver<Option<Arc<Steward>>>) -> StewardService {
        StewardService { current }
    }

    /// The tonic server for it.
    pub fn into_server(self) -> steward_server::StewardServer<StewardService> {
        steward_server::StewardServer::new(self)
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX)
    }

    fn steward(&self) -> Result<Arc<Steward>, Status> {
        match &*self.current.borrow() {
            Some(s) if !s.stop.is_cancelled() => Ok(s.clone()),
            _ => Err(Status::failed_precondition(
                "this node is not the steward (it does not lead the flock)",
            )),
        }
    }
}

impl std::fmt::Debug for StewardService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StewardService").finish_non_exhaustive()
    }
}

type LinkStream = ReceiverStream<Result<StewardUpdate, Status>>;

#[tonic::async_trait]
impl steward_server::Steward for StewardService {
    type LinkStream = LinkStream;

    async fn link(
        &self,
        req: Request<Streaming<ReeveBatch>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let node = caller(&req)?;
        let steward = self.steward()?;
        let mut incoming = req.into_inner();
        let first = match incoming.message().await? {
            Some(b) => b,
            None => return Err(Status::invalid_argument("empty link")),
        };
        if first.node != node {
            return Err(Status::permission_denied(format!(
                "node {node} may not link as node {}",
                first.node
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(steward.link(first.node.clone(), first, incoming, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn holders(
        &self,
        req: Request<pb::HoldersRequest>,
    ) -> Result<Response<pb::HoldersResponse>, Status> {
        caller(&req)?;
        let steward = self.steward()?;
        let digest = req.into_inner().digest;
        let holders = steward
            .lock()
            .holders(&digest)
            .into_iter()
            .map(|(node, netid)| pb::Holder { node, netid })
            .collect();
        Ok(Response::new(pb::HoldersResponse { holders }))
    }

    async fn table(
        &self,
        req: Request<pb::TableRequest>,
    ) -> Result<Response<pb::TableResponse>, Status> {
        caller(&req)?;
        let steward = self.steward()?;
        let req = req.into_inner();
        let reg = steward.lock();
        let now = Instant::now();
        let mut instances: Vec<pb::Instance> = reg
            .table()
            .iter()
            .filter(|i| req.horde.is_empty() || i.horde == horde_or_default(&req.horde))
            .filter(|i| req.api.is_empty() || i.api == req.api)
            .cloned()
            .map(|mut i| {
                i.valid_for_ms = reg.valid_for(&i.id, now).as_millis() as u64;
                i
            })
            .collect();
        instances.sort_by(|a, b| {
            a.horde
                .cmp(&b.horde)
                .then_with(|| a.api.cmp(&b.api))
                .then_with(|| best_first(a, b))
        });
        Ok(Response::new(pb::TableResponse {
            instances,
            revision: reg.table().revision(),
            flock_id: Some(steward.flock_id.clone()),
        }))
    }
}

/// The steward's NetID for a leader at `leader_flock_addr`: its IP and the node gRPC port (the
/// same port on every node of a bloc).
pub fn netid(leader_flock_addr: SocketAddr, grpc_port: u16) -> SocketAddr {
    SocketAddr::new(leader_flock_addr.ip(), grpc_port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_proto::grpc::steward::v1::{Beat, Health, Instance, RunState};

    fn rec(id: &str, valid_ms: u64) -> Instance {
        Instance {
            id: id.into(),
            api: "galumph2".into(),
            inst: format!("galumph2_{id}"),
            addr: "127.0.0.1:9".into(),
            state: RunState::Running as i32,
            valid_for_ms: valid_ms,
            ..Default::default()
        }
    }

    fn batch(node: &str, seq: u64, put: Vec<Instance>, beats: Vec<Beat>) -> ReeveBatch {
        ReeveBatch {
            seq,
            node: node.into(),
            full: seq == 1,
            put,
            beats,
            ..Default::default()
        }
    }

    type Up = mpsc::Sender<Result<ReeveBatch, Status>>;
    type Down = mpsc::Receiver<Result<StewardUpdate, Status>>;

    /// A link of `node` as the gRPC service would start it: the test sends its batches, and its
    /// downstream holds `room` updates until the test takes them.
    fn open(steward: &Arc<Steward>, first: ReeveBatch, room: usize) -> (Up, Down) {
        let (up, incoming) = mpsc::channel(16);
        let (tx, down) = mpsc::channel(room);
        tokio::spawn(steward.clone().link(
            first.node.clone(),
            first,
            ReceiverStream::new(incoming),
            tx,
        ));
        (up, down)
    }

    fn state_of(steward: &Steward, id: &str) -> Option<i32> {
        steward.lock().table().get(id).map(|i| i.state)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reeve_slow_to_take_changes_keeps_its_instances_alive_by_its_beats() {
        let steward = Steward::start(
            FlockId {
                leader: "00000000000000ff".into(),
                term: 1,
            },
            "127.0.0.1:7701".into(),
            &StewardConfig::default(),
            Vec::new(),
        );
        // n1 registers one instance valid for 3 s, then takes nothing from its downstream.
        let (n1, mut n1_down) = open(&steward, batch("n1", 1, vec![rec("a", 3000)], vec![]), 4);
        // n2 registers 50 instances one batch at a time: 50 changes for n1's link to send, far
        // more than its downstream holds.
        let (n2, mut n2_down) = open(&steward, batch("n2", 1, vec![], vec![]), 1024);
        tokio::spawn(async move { while n2_down.recv().await.is_some() {} });
        for k in 0..50 {
            let put = vec![rec(&format!("b{k}"), 3_600_000)];
            n2.send(Ok(batch("n2", k + 2, put, vec![]))).await.unwrap();
        }
        // n1's service beats on: once a second for 10 s, each beat valid for 3 s.
        for k in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let beat = Beat {
                id: "a".into(),
                state: RunState::Running as i32,
                health: Health::Healthy as i32,
                valid_for_ms: 3000,
            };
            n1.send(Ok(batch("n1", k + 2, vec![], vec![beat])))
                .await
                .unwrap();
            assert_eq!(
                state_of(&steward, "a"),
                Some(RunState::Running as i32),
                "{} s in, n1's instance must still be running: its beats get through while \
                 its downstream is full",
                k + 1
            );
        }
        assert_eq!(steward.len(), 51);
        assert_eq!(
            n1_down.len(),
            4,
            "n1 has read nothing: its downstream is full"
        );
        // When n1 reads at last, what it gets adds up to the steward's table.
        let mut replica: HashMap<String, Instance> = HashMap::new();
        let mut acks = 0;
        let revision = steward.lock().table().revision();
        let mut at = 0;
        while at < revision {
            let update = n1_down.recv().await.unwrap().unwrap();
            match update.kind.unwrap() {
                pb::steward_update::Kind::Ack(_) => acks += 1,
                pb::steward_update::Kind::Changes(c) => {
                    if c.snapshot {
                        replica.clear();
                    }
                    for i in c.put {
                        replica.insert(i.id.clone(), i);
                    }
                    for id in c.remove {
                        replica.remove(&id);
                    }
                    at = c.revision;
                }
            }
        }
        assert!(acks >= 1);
        assert_eq!(replica.len(), 51);
        assert_eq!(replica["a"].state, RunState::Running as i32);
        steward.stop();
    }

    #[test]
    fn merged_changes_hold_each_instance_as_it_is_after_the_last() {
        let change = |revision, put: &[&str], remove: &[&str]| {
            Arc::new(Change {
                revision,
                snapshot: false,
                put: put.iter().map(|id| rec(id, 0)).collect(),
                remove: remove.iter().map(|id| rec(id, 0)).collect(),
            })
        };
        assert!(merge(&[]).is_none());
        let m = merge(&[
            change(4, &["1", "2"], &[]),
            change(5, &["3"], &["1"]),
            change(6, &["1"], &["2"]),
        ])
        .unwrap();
        let ids = |v: &[Instance]| {
            let mut ids: Vec<String> = v.iter().map(|i| i.id.clone()).collect();
            ids.sort();
            ids
        };
        assert_eq!(m.revision, 6);
        assert!(!m.snapshot);
        assert_eq!(ids(&m.put), ["1", "3"]);
        assert_eq!(ids(&m.remove), ["2"]);
        // From a snapshot on, the result is a snapshot; what went before it does not count.
        let mut snap = (*change(7, &["9"], &[])).clone();
        snap.snapshot = true;
        let m = merge(&[
            change(6, &["1"], &[]),
            Arc::new(snap),
            change(8, &["5"], &["9"]),
        ])
        .unwrap();
        assert!(m.snapshot);
        assert_eq!((m.revision, ids(&m.put)), (8, vec!["5".to_string()]));
        assert!(m.remove.is_empty());
    }
}
