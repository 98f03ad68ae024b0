//! The reeve of one node: its local registrations (the heartbeater), its replica of the steward's
//! table, and the answers of the local API's registry calls.
//!
//! * Local instances are authoritative here: a registration enters the replica at once, so the
//!   node sees it even while no steward is reachable, and it is sent to the steward in the next
//!   batch.
//! * The heartbeater decides which local instances are alive: one whose heartbeats stop is
//!   `unknown` once its valid-until time passes, and forgotten after the grace period.
//! * Lookups and watches read the replica only; they never leave the node.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::{
    self as spb, Beat, FlockId, Health, Instance, ReeveBatch, RunState, TableChanges,
};
use crux_steward::select::{check_name, horde_or_default, select, state_name, Selector};
use crux_steward::table::{Change, Table};
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::{Response, Status, Streaming};

/// Tunables of a reeve.
#[derive(Clone, Debug)]
pub struct ReeveConfig {
    /// This node's id (16 hex digits).
    pub node: String,
    /// This node's boot id; instance ids carry it so that they are not reused across restarts.
    pub boot: u64,
    /// Local address outgoing node calls are made from (the flock address's IP).
    pub local_ip: Option<IpAddr>,
    /// This node's end of the node plane, which every call to the steward goes through.
    pub transport: crux_transport::Transport,
    /// The heartbeat interval services are asked to keep, and the interval at which the reeve
    /// forwards validity to the steward.
    pub heartbeat_interval: Duration,
    /// How long a local instance past valid-until is kept (as `unknown`) before it is forgotten.
    pub grace: Duration,
    /// This node's gRPC NetID (where its pastiche serves pieces), told to the steward.
    pub netid: String,
}

impl ReeveConfig {
    /// Validity granted when a request leaves it unset: three heartbeat intervals.
    pub fn default_valid_for(&self) -> Duration {
        self.heartbeat_interval * 3
    }

    /// What the reeve adds to the validity it tells the steward: two heartbeat intervals (the
    /// next batch of beats, and one more for a link held up by a burst). Only a node that stops
    /// talking waits it out: an instance past valid-until here is told at once.
    pub fn validity_slack(&self) -> Duration {
        self.heartbeat_interval * 2
    }
}

/// The steward this node should link to, as the flock says: the leader's id, its term, and the
/// steward's NetID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Leader node id, 16 hex digits.
    pub leader: String,
    /// Election term.
    pub term: u64,
    /// The steward's NetID (the leader's IP and the node gRPC port).
    pub steward: SocketAddr,
}

/// The link as the reeve sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStatus {
    /// The steward's FlockID, while linked.
    pub flock_id: Option<FlockId>,
    /// The steward's NetID, while linked.
    pub steward: String,
}

#[derive(Debug)]
struct Local {
    token: [u8; 32],
    record: Instance,
    deadline: Instant,
    expired: bool,
}

impl Local {
    /// The validity told to the steward: what is left here, plus `slack`
    /// ([`ReeveConfig::validity_slack`]), so that a batch held up briefly on a
    /// loaded link does not expire a live instance at the steward. Zero once it is past
    /// valid-until here: the reeve tells the steward so as soon as it sees it (see
    /// [`Reeve::check_expiry`]), so a dead service is not seen later for the slack.
    fn told_valid_ms(&self, now: Instant, slack: Duration) -> u64 {
        if self.expired {
            return 0;
        }
        (self.deadline.saturating_duration_since(now) + slack).as_millis() as u64
    }
}

#[derive(Debug, Default)]
struct Inner {
    locals: HashMap<String, Local>,
    pending_put: HashSet<String>,
    pending_remove: Vec<String>,
    replica: Table,
    /// The steward table position the replica holds: (FlockID, revision).
    position: Option<(FlockId, u64)>,
    /// Parts of a change that comes in several messages.
    partial: Option<TableChanges>,
    seq: u64,
    /// Pastiche blobs this node holds, and changes not yet told to the steward.
    holds: HashSet<String>,
    pending_holds: Vec<String>,
    pending_unholds: Vec<String>,
}

/// The reeve.
#[derive(Debug)]
pub struct Reeve {
    config: ReeveConfig,
    inner: Mutex<Inner>,
    dirty: Notify,
    status: watch::Sender<LinkStatus>,
    target: watch::Receiver<Option<Target>>,
    next_id: AtomicU64,
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A state a service may report (`unknown` is the registry's verdict, not a service's).
fn service_state(s: i32) -> Result<i32, Status> {
    match RunState::try_from(s) {
        Ok(RunState::Unspecified) => Ok(RunState::Starting as i32),
        Ok(RunState::Unknown) | Err(_) => Err(invalid(format!(
            "state {} cannot be reported by a service",
            state_name(s)
        ))),
        Ok(st) => Ok(st as i32),
    }
}

fn service_health(h: i32) -> Result<i32, Status> {
    match Health::try_from(h) {
        Ok(Health::Unspecified) => Ok(Health::Healthy as i32),
        Ok(h) => Ok(h as i32),
        Err(_) => Err(invalid(format!("health {h} is not known"))),
    }
}

impl Reeve {
    /// A reeve that links to whatever steward `target` names.
    pub fn new(config: ReeveConfig, target: watch::Receiver<Option<Target>>) -> Arc<Reeve> {
        Arc::new(Reeve {
            config,
            inner: Mutex::new(Inner::default()),
            dirty: Notify::new(),
            status: watch::channel(LinkStatus::default()).0,
            target,
            next_id: AtomicU64::new(1),
        })
    }

    /// Its config.
    pub fn config(&self) -> &ReeveConfig {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link status.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// The link status, as it changes.
    pub fn status_watch(&self) -> watch::Receiver<LinkStatus> {
        self.status.subscribe()
    }

    pub(crate) fn target_watch(&self) -> watch::Receiver<Option<Target>> {
        self.target.clone()
    }

    pub(crate) fn set_status(&self, s: LinkStatus) {
        self.status.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    }

    pub(crate) async fn dirtied(&self) {
        self.dirty.notified().await
    }

    /// Every instance of the replica (for a new steward on this node to start from).
    pub fn replica(&self) -> Vec<Instance> {
        self.lock().replica.iter().cloned().collect()
    }

    /// The replica's changes as they are committed (Fuse rebuilds its xDS snapshot on each;
    /// a lagging receiver re-reads [`Reeve::replica`]).
    pub fn replica_changes(&self) -> broadcast::Receiver<Arc<Change>> {
        self.lock().replica.subscribe()
    }

    /// Instances in the replica.
    pub fn replica_len(&self) -> usize {
        self.lock().replica.len()
    }

    /// Local instances.
    pub fn local_len(&self) -> usize {
        self.lock().locals.len()
    }

    // ---- the link's side ------------------------------------------------------------------

    /// The first batch of a link: every local instance (`full`), and where the replica stands.
    pub(crate) fn full_batch(&self) -> ReeveBatch {
        let now = Instant::now();
        let mut g = self.lock();
        g.pending_put.clear();
        g.pending_remove.clear();
        g.seq += 1;
        let slack = self.config.validity_slack();
        let put = g
            .locals
            .values()
            .map(|l| {
                let mut r = l.record.clone();
                r.valid_for_ms = l.told_valid_ms(now, slack);
                r
            })
            .collect();
        let (resume_flock, resume_revision) = match &g.position {
            Some((f, r)) => (Some(f.clone()), *r),
            None => (None, 0),
        };
        g.pending_holds.clear();
        g.pending_unholds.clear();
        ReeveBatch {
            seq: g.seq,
            node: self.config.node.clone(),
            full: true,
            put,
            beats: Vec::new(),
            remove: Vec::new(),
            resume_flock,
            resume_revision,
            netid: self.config.netid.clone(),
            holds: g.holds.iter().cloned().collect(),
            unholds: Vec::new(),
        }
    }

    /// Registrations, changes and removals not yet sent; with `beats`, the validity of every
    /// live local instance as well. None when there is nothing to send.
    pub(crate) fn next_batch(&self, beats: bool) -> Option<ReeveBatch> {
        let now = Instant::now();
        let mut g = self.lock();
        let ids: HashSet<String> = g.pending_put.drain().collect();
        let slack = self.config.validity_slack();
        let put: Vec<Instance> = ids
            .iter()
            .filter_map(|id| g.locals.get(id))
            .map(|l| {
                let mut r = l.record.clone();
                r.valid_for_ms = l.told_valid_ms(now, slack);
                r
            })
            .collect();
        let remove = std::mem::take(&mut g.pending_remove);
        let beats: Vec<Beat> = if beats {
            g.locals
                .iter()
                .filter(|(id, l)| !l.expired && !ids.contains(*id))
                .map(|(id, l)| Beat {
                    id: id.clone(),
                    state: l.record.state,
                    health: l.record.health,
                    valid_for_ms: l.told_valid_ms(now, slack),
                })
                .collect()
        } else {
            Vec::new()
        };
        let holds = std::mem::take(&mut g.pending_holds);
        let unholds = std::mem::take(&mut g.pending_unholds);
        if put.is_empty()
            && remove.is_empty()
            && beats.is_empty()
            && holds.is_empty()
            && unholds.is_empty()
        {
            return None;
        }
        g.seq += 1;
        Some(ReeveBatch {
            seq: g.seq,
            node: self.config.node.clone(),
            full: false,
            put,
            beats,
            remove,
            resume_flock: None,
            resume_revision: 0,
            netid: String::new(),
            holds,
            unholds,
        })
    }

    /// Applies changes from the steward `flock` to the replica. Local instances stay as this
    /// node knows them.
    pub(crate) fn apply_changes(&self, flock: &FlockId, part: TableChanges) {
        let mut g = self.lock();
        let c = match g.partial.take() {
            Some(mut acc) => {
                acc.put.extend(part.put);
                acc.remove.extend(part.remove);
                acc.more = part.more;
                acc.revision = part.revision;
                acc
            }
            None => part,
        };
        if c.more {
            g.partial = Some(c);
            return;
        }
        let revision = c.revision;
        let inner = &mut *g;
        let locals = &inner.locals;
        // What the steward says of a local instance does not override this node's own view,
        // except to add what only the steward can know.
        let own = |i: &Instance| locals.contains_key(&i.id);
        if c.snapshot {
            let mut all: Vec<Instance> = c.put.into_iter().filter(|i| !own(i)).collect();
            all.extend(locals.values().map(|l| l.record.clone()));
            inner.replica.replace_all(all);
        } else {
            let put: Vec<Instance> = c.put.into_iter().filter(|i| !own(i)).collect();
            let remove: Vec<String> = c
                .remove
                .into_iter()
                .filter(|id| !locals.contains_key(id))
                .collect();
            inner.replica.commit(put, &remove);
        }
        inner.position = Some((flock.clone(), revision));
    }

    /// The steward asked for everything again (it lost some of our instances).
    pub(crate) fn mark_all_pending(&self) {
        let mut g = self.lock();
        let ids: Vec<String> = g.locals.keys().cloned().collect();
        g.pending_put.extend(ids);
        drop(g);
        self.dirty.notify_one();
    }

    /// The heartbeater's round: local instances past valid-until turn `unknown`; after the grace
    /// period they are forgotten.
    pub fn check_expiry(&self) {
        let now = Instant::now();
        let mut g = self.lock();
        let mut put = Vec::new();
        let mut gone = Vec::new();
        let mut expired = Vec::new();
        for (id, l) in g.locals.iter_mut() {
            if !l.expired && l.deadline <= now {
                l.expired = true;
                l.record.state = RunState::Unknown as i32;
                put.push(l.record.clone());
                expired.push(id.clone());
            } else if l.expired && now.saturating_duration_since(l.deadline) >= self.config.grace {
                gone.push(id.clone());
            }
        }
        // The steward hears of it in the next batch (a record with no validity left), not
        // only when its own, later, deadline passes.
        g.pending_put.extend(expired);
        for id in &gone {
            g.locals.remove(id);
            g.pending_put.remove(id);
            g.pending_remove.push(id.clone());
        }
        let changed = !put.is_empty() || !gone.is_empty();
        g.replica.commit(put, &gone);
        drop(g);
        if changed {
            self.dirty.notify_one();
        }
    }

    // ---- the pastiche tracker ---------------------------------------------------------------

    /// Tells the steward (in the next batch) that this node holds `digest`, whole or in part.
    pub fn hold(&self, digest: &str) {
        let mut g = self.lock();
        if g.holds.insert(digest.to_string()) {
            g.pending_unholds.retain(|d| d != digest);
            g.pending_holds.push(digest.to_string());
            drop(g);
            self.dirty.notify_one();
        }
    }

    /// Tells the steward that this node no longer holds `digest`.
    pub fn unhold(&self, digest: &str) {
        let mut g = self.lock();
        if g.holds.remove(digest) {
            g.pending_holds.retain(|d| d != digest);
            g.pending_unholds.push(digest.to_string());
            drop(g);
            self.dirty.notify_one();
        }
    }

    /// Makes the set of blobs told to the steward equal to `now` (what the node's cache holds,
    /// after evictions and removals).
    pub fn set_holds(&self, now: &HashSet<String>) {
        let mut g = self.lock();
        let gone: Vec<String> = g.holds.difference(now).cloned().collect();
        let new: Vec<String> = now.difference(&g.holds).cloned().collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        for d in gone {
            g.holds.remove(&d);
            g.pending_holds.retain(|x| *x != d);
            g.pending_unholds.push(d);
        }
        for d in new {
            g.holds.insert(d.clone());
            g.pending_unholds.retain(|x| *x != d);
            g.pending_holds.push(d);
        }
        drop(g);
        self.dirty.notify_one();
    }

    /// Asks the steward which nodes hold `digest`: (node id, node gRPC NetID).
    pub async fn holders(&self, digest: &str) -> Result<Vec<(String, String)>, Status> {
        let mut c = self.steward_client().await?;
        let r = c
            .holders(spb::HoldersRequest {
                digest: digest.to_string(),
            })
            .await?
            .into_inner();
        Ok(r.holders.into_iter().map(|h| (h.node, h.netid)).collect())
    }

    async fn steward_client(
        &self,
    ) -> Result<spb::steward_client::StewardClient<tonic::transport::Channel>, Status> {
        let Some(target) = self.target.borrow().clone() else {
            return Err(Status::unavailable("no leader known, so no steward"));
        };
        let channel = self
            .config
            .transport
            .channel(target.steward, self.config.local_ip, Duration::from_secs(2))
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot reach the steward at {}: {e}",
                    target.steward
                ))
            })?;
        Ok(spb::steward_client::StewardClient::new(channel)
            .max_decoding_message_size(crux_steward::server::MESSAGE_MAX))
    }

    // ---- the local API ----------------------------------------------------------------------

    /// `Register`.
    pub fn register(&self, req: rpb::RegisterRequest) -> Result<rpb::RegisterResponse, Status> {
        check_name("api", &req.api).map_err(invalid)?;
        check_name("inst", &req.inst).map_err(invalid)?;
        let horde = horde_or_default(&req.horde).to_string();
        check_name("horde", &horde).map_err(invalid)?;
        if req.addr.is_empty() || req.addr.len() > 256 {
            return Err(invalid("addr must be host:port, at most 256 bytes"));
        }
        if req.public_key.len() > 1024 {
            return Err(invalid("public_key is longer than 1 KiB"));
        }
        if req.metadata.len() > 64
            || req
                .metadata
                .iter()
                .any(|(k, v)| k.len() > 256 || v.len() > 4096)
        {
            return Err(invalid(
                "metadata: at most 64 entries, keys up to 256 bytes, values up to 4 KiB",
            ));
        }
        let state = service_state(req.state)?;
        let health = service_health(req.health)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{:08x}-{n}", self.config.node, self.config.boot as u32);
        let mut token = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut token);
        let valid = if req.valid_for_ms == 0 {
            self.config.default_valid_for()
        } else {
            Duration::from_millis(req.valid_for_ms).min(crux_steward::registry::VALID_FOR_MAX)
        };
        let record = Instance {
            id: id.clone(),
            api: req.api,
            inst: req.inst,
            addr: req.addr,
            horde,
            node: self.config.node.clone(),
            metadata: req.metadata,
            public_key: req.public_key,
            state,
            health,
            valid_for_ms: 0,
            revision: 0,
        };
        tracing::info!(%id, api = %record.api, inst = %record.inst, addr = %record.addr, horde = %record.horde, "registered");
        let mut g = self.lock();
        g.replica.commit(vec![record.clone()], &[]);
        g.locals.insert(
            id.clone(),
            Local {
                token,
                record,
                deadline: Instant::now() + valid,
                expired: false,
            },
        );
        g.pending_put.insert(id.clone());
        drop(g);
        self.dirty.notify_one();
        Ok(rpb::RegisterResponse {
            id,
            token: token.to_vec(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
        })
    }

    fn check_token(g: &Inner, id: &str, token: &[u8]) -> Result<(), Status> {
        let Some(l) = g.locals.get(id) else {
            return Err(Status::not_found(format!(
                "no instance {id} registered on this node"
            )));
        };
        if token.len() != 32 || !bool::from(l.token.ct_eq(token)) {
            return Err(Status::permission_denied(format!(
                "wrong token for instance {id}"
            )));
        }
        Ok(())
    }

    /// One heartbeat: checks the token, applies state, health and validity.
    pub fn beat(&self, req: &rpb::HeartbeatRequest) -> Result<(), Status> {
        let state = service_state(req.state)?;
        let health = service_health(req.health)?;
        let valid = if req.valid_for_ms == 0 {
            self.config.default_valid_for()
        } else {
            Duration::from_millis(req.valid_for_ms).min(crux_steward::registry::VALID_FOR_MAX)
        };
        let mut g = self.lock();
        Self::check_token(&g, &req.id, &req.token)?;
        let Some(l) = g.locals.get_mut(&req.id) else {
            return Err(Status::not_found("instance gone"));
        };
        l.deadline = Instant::now() + valid;
        let changed = l.expired || l.record.state != state || l.record.health != health;
        l.expired = false;
        l.record.state = state;
        l.record.health = health;
        if changed {
            let r = l.record.clone();
            g.replica.commit(vec![r], &[]);
            g.pending_put.insert(req.id.clone());
            drop(g);
            self.dirty.notify_one();
        }
        Ok(())
    }

    /// The ack of a heartbeat for `id`.
    pub fn ack(&self, id: &str) -> rpb::HeartbeatAck {
        let status = self.status();
        let leader = self
            .target
            .borrow()
            .as_ref()
            .map(|t| t.leader.clone())
            .unwrap_or_default();
        rpb::HeartbeatAck {
            leader,
            flock_id: status.flock_id,
            steward: status.steward,
            instance: self.lock().replica.get(id).cloned(),
        }
    }

    /// `Deregister`.
    pub fn deregister(&self, req: &rpb::DeregisterRequest) -> Result<(), Status> {
        let mut g = self.lock();
        Self::check_token(&g, &req.id, &req.token)?;
        g.locals.remove(&req.id);
        g.pending_put.remove(&req.id);
        g.pending_remove.push(req.id.clone());
        g.replica.commit(Vec::new(), std::slice::from_ref(&req.id));
        drop(g);
        tracing::info!(id = %req.id, "deregistered");
        self.dirty.notify_one();
        Ok(())
    }

    /// `Lookup`.
    pub fn lookup(&self, req: &rpb::LookupRequest) -> Result<rpb::LookupResponse, Status> {
        let sel = Selector::parse(&req.selector).map_err(invalid)?;
        if sel == Selector::All {
            return Err(invalid("selector must not be empty"));
        }
        let g = self.lock();
        let candidates: Vec<&Instance> = g.replica.candidates(&sel, &req.horde).collect();
        let instances = select(candidates.into_iter(), &sel, &req.horde, req.live_only);
        Ok(rpb::LookupResponse {
            instances,
            revision: g.replica.revision(),
            linked: self.status.borrow().flock_id.is_some(),
        })
    }

    /// `Services`.
    pub fn services(&self, req: &rpb::ServicesRequest) -> rpb::ServicesResponse {
        let g = self.lock();
        let mut instances: Vec<Instance> = g
            .replica
            .iter()
            .filter(|i| req.horde.is_empty() || i.horde == req.horde)
            .filter(|i| req.api.is_empty() || i.api == req.api)
            .cloned()
            .collect();
        instances.sort_by(|a, b| {
            a.horde
                .cmp(&b.horde)
                .then_with(|| a.api.cmp(&b.api))
                .then_with(|| crux_steward::select::best_first(a, b))
        });
        rpb::ServicesResponse {
            instances,
            revision: g.replica.revision(),
            linked: self.status.borrow().flock_id.is_some(),
            flock_id: None,
        }
    }

    /// `Services` with `steward`: the steward's own table, asked over the node port.
    pub async fn steward_services(
        &self,
        req: &rpb::ServicesRequest,
    ) -> Result<rpb::ServicesResponse, Status> {
        let mut c = self.steward_client().await?;
        let t = c
            .table(spb::TableRequest {
                horde: req.horde.clone(),
                api: req.api.clone(),
            })
            .await?
            .into_inner();
        Ok(rpb::ServicesResponse {
            instances: t.instances,
            revision: t.revision,
            linked: true,
            flock_id: t.flock_id,
        })
    }

    /// `Watch`: a snapshot (or the changes since `from_revision`), then changes as they come.
    pub fn watch(self: &Arc<Self>, req: rpb::WatchRequest) -> Result<WatchStream, Status> {
        let sel = Selector::parse(&req.selector).map_err(invalid)?;
        let horde = horde_or_default(&req.horde).to_string();
        let filter = Filter { sel, horde };
        let (tx, rx) = mpsc::channel(64);
        let (sub, initial, last) = {
            let g = self.lock();
            let sub = g.replica.subscribe();
            let initial = first_events(&g.replica, &filter, req.from_revision);
            (sub, initial, g.replica.revision())
        };
        tokio::spawn(watch_loop(self.clone(), filter, sub, initial, last, tx));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// `Heartbeat`: serves one stream until the service closes it.
    pub fn heartbeat(
        self: &Arc<Self>,
        mut incoming: Streaming<rpb::HeartbeatRequest>,
    ) -> Response<HeartbeatStream> {
        let (tx, rx) = mpsc::channel(16);
        let reeve = self.clone();
        tokio::spawn(async move {
            let mut id: Option<(String, Vec<u8>)> = None;
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    m = incoming.message() => m,
                };
                let mut req = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(_) => return,
                };
                match (&id, req.id.is_empty()) {
                    (None, true) => {
                        let _ = tx
                            .send(Err(invalid("the first heartbeat must carry id and token")))
                            .await;
                        return;
                    }
                    (None, false) => id = Some((req.id.clone(), req.token.clone())),
                    (Some((first, tok)), true) => {
                        req.id = first.clone();
                        req.token = tok.clone();
                    }
                    (Some((first, _)), false) if *first != req.id => {
                        let _ = tx
                            .send(Err(invalid("one heartbeat stream serves one instance")))
                            .await;
                        return;
                    }
                    (Some(_), false) => {}
                }
                if let Err(e) = reeve.beat(&req) {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if tx.send(Ok(reeve.ack(&req.id))).await.is_err() {
                    return;
                }
            }
        });
        Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// The stream `Heartbeat` answers with.
pub type HeartbeatStream =
    Pin<Box<dyn Stream<Item = Result<rpb::HeartbeatAck, Status>> + Send + 'static>>;
/// The stream `Watch` answers with.
pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<rpb::WatchEvent, Status>> + Send + 'static>>;

struct Filter {
    sel: Selector,
    horde: String,
}

impl Filter {
    fn keep(&self, i: &Instance) -> bool {
        i.horde == self.horde && self.sel.matches(i)
    }

    fn event(&self, c: &Change) -> Option<rpb::WatchEvent> {
        let put: Vec<Instance> = c.put.iter().filter(|i| self.keep(i)).cloned().collect();
        let remove: Vec<Instance> = c.remove.iter().filter(|i| self.keep(i)).cloned().collect();
        if put.is_empty() && remove.is_empty() {
            return None;
        }
        Some(rpb::WatchEvent {
            revision: c.revision,
            snapshot: false,
            put,
            remove,
        })
    }
}

fn first_events(replica: &Table, f: &Filter, from: u64) -> Vec<rpb::WatchEvent> {
    if from > 0 {
        if let Some(changes) = replica.since(from) {
            return changes.iter().filter_map(|c| f.event(c)).collect();
        }
    }
    vec![rpb::WatchEvent {
        revision: replica.revision(),
        snapshot: true,
        put: select(replica.iter(), &f.sel, &f.horde, false),
        remove: Vec::new(),
    }]
}

async fn watch_loop(
    reeve: Arc<Reeve>,
    f: Filter,
    mut sub: broadcast::Receiver<Arc<Change>>,
    initial: Vec<rpb::WatchEvent>,
    mut last: u64,
    tx: mpsc::Sender<Result<rpb::WatchEvent, Status>>,
) {
    for e in initial {
        if tx.send(Ok(e)).await.is_err() {
            return;
        }
    }
    loop {
        let c = tokio::select! {
            _ = tx.closed() => return,
            c = sub.recv() => c,
        };
        match c {
            Ok(c) => {
                if c.revision <= last {
                    continue;
                }
                last = c.revision;
                if let Some(e) = f.event(&c) {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let (fresh, events) = {
                    let g = reeve.lock();
                    let events = first_events(&g.replica, &f, last);
                    last = g.replica.revision();
                    (g.replica.subscribe(), events)
                };
                sub = fresh;
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn reeve() -> Arc<Reeve> {
        let (_tx, rx) = watch::channel(None);
        Reeve::new(
            ReeveConfig {
                node: "00000000000000aa".into(),
                boot: 7,
                local_ip: None,
                transport: crux_transport::Transport::generate().unwrap(),
                heartbeat_interval: Duration::from_secs(1),
                grace: Duration::from_secs(60),
                netid: "127.0.0.1:7701".into(),
            },
            rx,
        )
    }

    fn req(inst: &str) -> rpb::RegisterRequest {
        rpb::RegisterRequest {
            api: "galumph2".into(),
            inst: inst.into(),
            addr: "127.0.0.1:9".into(),
            state: RunState::Running as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_registration_is_seen_locally_at_once_and_needs_its_token() {
        let r = reeve();
        let reg = r.register(req("galumph2_9")).unwrap();
        assert_eq!(reg.token.len(), 32);
        let got = r
            .lookup(&rpb::LookupRequest {
                selector: "galumph2".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.instances.len(), 1);
        assert!(!got.linked, "no steward yet");
        let mut wrong = reg.token.clone();
        wrong[0] ^= 1;
        let e = r
            .deregister(&rpb::DeregisterRequest {
                id: reg.id.clone(),
                token: wrong,
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let e = r
            .beat(&rpb::HeartbeatRequest {
                id: reg.id.clone(),
                token: vec![0; 31],
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A bad name changes nothing.
        let mut bad = req("x y");
        bad.api = "galumph2".into();
        assert_eq!(
            r.register(bad).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        r.deregister(&rpb::DeregisterRequest {
            id: reg.id,
            token: reg.token,
        })
        .unwrap();
        assert_eq!(r.replica_len(), 0);
    }

    #[tokio::test]
    async fn a_watcher_gets_a_snapshot_then_changes_and_resumes_from_its_revision() {
        let r = reeve();
        let a = r.register(req("galumph2_1")).unwrap();
        let mut w = r
            .watch(rpb::WatchRequest {
                selector: "galumph2".into(),
                ..Default::default()
            })
            .unwrap();
        let first = w.next().await.unwrap().unwrap();
        assert!(first.snapshot);
        assert_eq!(first.put.len(), 1);
        r.register(req("galumph2_2")).unwrap();
        let second = w.next().await.unwrap().unwrap();
        assert!(!second.snapshot);
        assert_eq!(second.put[0].inst, "galumph2_2");
        // Gone while nobody watched; a watcher resuming from `second` sees just that.
        drop(w);
        r.deregister(&rpb::DeregisterRequest {
            id: a.id,
            token: a.token,
        })
        .unwrap();
        let mut w = r
            .watch(rpb::WatchRequest {
                selector: "galumph2".into(),
                from_revision: second.revision,
                ..Default::default()
            })
            .unwrap();
        let resumed = w.next().await.unwrap().unwrap();
        assert!(!resumed.snapshot);
        assert!(resumed.put.is_empty());
        assert_eq!(resumed.remove[0].inst, "galumph2_1");
        assert!(resumed.revision > second.revision);
    }

    #[tokio::test(start_paused = true)]
    async fn beats_carry_slack_and_a_local_expiry_is_told_to_the_steward_at_once() {
        let r = reeve();
        let reg = r.register(req("galumph2_1")).unwrap();
        let first = r.next_batch(false).unwrap();
        // Registered with the default 3 s; told with two intervals (2 s) of slack.
        assert_eq!(first.put[0].valid_for_ms, 5000);
        tokio::time::advance(Duration::from_secs(1)).await;
        let beats = r.next_batch(true).unwrap();
        assert_eq!(beats.beats[0].valid_for_ms, 4000);
        // Past valid-until here: the next batch says so (no validity left), without waiting
        // for a beat round or for the steward's own deadline.
        tokio::time::advance(Duration::from_secs(2)).await;
        r.check_expiry();
        let told = r.next_batch(false).expect("the expiry is sent");
        assert_eq!(told.put.len(), 1);
        assert_eq!(told.put[0].id, reg.id);
        assert_eq!(told.put[0].valid_for_ms, 0);
        assert!(
            r.next_batch(true).is_none(),
            "an expired instance gets no beats"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeater_marks_a_silent_instance_unknown_then_forgets_it() {
        let r = reeve();
        let reg = r.register(req("galumph2_1")).unwrap();
        tokio::time::advance(Duration::from_millis(2900)).await;
        r.check_expiry();
        assert_eq!(r.replica()[0].state, RunState::Running as i32);
        tokio::time::advance(Duration::from_millis(200)).await;
        r.check_expiry();
        assert_eq!(r.replica()[0].state, RunState::Unknown as i32);
        // A heartbeat brings it back.
        r.beat(&rpb::HeartbeatRequest {
            id: reg.id.clone(),
            token: reg.token.clone(),
            state: RunState::Running as i32,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.replica()[0].state, RunState::Running as i32);
        tokio::time::advance(Duration::from_secs(3 + 60)).await;
        r.check_expiry();
        assert_eq!(r.replica()[0].state, RunState::Unknown as i32);
        tokio::time::advance(Duration::from_secs(1)).await;
        r.check_expiry();
        assert_eq!(r.replica_len(), 0);
        assert_eq!(r.local_len(), 0);
    }
}
