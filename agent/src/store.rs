//! The durable store in the agent: opened at start, served on the node gRPC port, its voters
//! chosen by the flock leader ([`crate::voters`]), and the local API's muster, document and
//! status calls.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use crux_flock::driver::DriverHandle;
use crux_flock::MemberState;
use crux_proto::grpc::reeve::v1 as pb;
use crux_store::{
    hex, Applied, Command, GroupNodes, GroupSeen, MusterEntry, Query, QueryResult, Store,
    StoreError, StoreStatus,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, error, info, warn};

use crate::voters::{choose, plan_learners, Seen};

/// Most learners the store's group has. Learners hold a copy (local reads) but the Raft leader
/// replicates every entry to each: in a flock of hundreds, the members beyond this many stay plain
/// clients, which forward their requests to the leader (see [`follow_leader`]).
pub const LEARNERS_MAX: usize = 8;

/// A store error as a gRPC status.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::NoQuorum(_)
        | StoreError::NotInitialized
        | StoreError::Raft(_)
        | StoreError::Merged { .. } => Status::unavailable(e.to_string()),
        StoreError::Unconfirmed(_) => Status::deadline_exceeded(e.to_string()),
        StoreError::Invalid(_) => Status::invalid_argument(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// The flock address of node `id`, if the flock knows it.
fn flock_addr_of(handle: &DriverHandle, id: u64) -> Option<SocketAddr> {
    handle
        .snapshot()
        .members
        .iter()
        .find(|m| m.info.id.0 == id)
        .map(|m| m.info.addr)
}

/// The NetID of node `id`: its flock IP and the node gRPC port.
fn netid_of(handle: &DriverHandle, id: u64, grpc_port: u16) -> Option<SocketAddr> {
    flock_addr_of(handle, id).map(|a| SocketAddr::new(a.ip(), grpc_port))
}

/// The store status of the first other live member that is in a Raft group (it knows voters)
/// and that `want` accepts, each asked with `timeout`.
async fn ask_members(
    store: &Store,
    handle: &DriverHandle,
    grpc_port: u16,
    timeout: Duration,
    want: impl Fn(&StoreStatus) -> bool,
) -> Option<StoreStatus> {
    let snap = handle.snapshot();
    for m in snap.members.iter().filter(|m| {
        m.info.id != snap.identity.id
            && matches!(m.info.state, MemberState::Alive | MemberState::Suspect)
    }) {
        let netid = SocketAddr::new(m.info.addr.ip(), grpc_port);
        if let Ok(Ok(s)) = tokio::time::timeout(timeout, store.remote_status(netid)).await {
            if !s.voters.is_empty() && want(&s) {
                return Some(s);
            }
        }
    }
    None
}

/// The voters the group has, as this node knows them, or as a live member that is in the group
/// knows them (a node outside the group sees none). Empty: no group anywhere it could ask.
async fn known_voters(store: &Store, handle: &DriverHandle, grpc_port: u16) -> BTreeSet<u64> {
    let mine: BTreeSet<u64> = store.status().voters.iter().map(|m| m.id).collect();
    if !mine.is_empty() {
        return mine;
    }
    ask_members(store, handle, grpc_port, Duration::from_secs(1), |_| true)
        .await
        .map(|s| s.voters.iter().map(|m| m.id).collect())
        .unwrap_or_default()
}

/// On every node: while this node is outside the Raft group (it knows no voters), learns the
/// leader from the members that are in it, so that its writes and reads are forwarded there.
pub async fn follow_leader(
    handle: DriverHandle,
    store: Store,
    grpc_port: u16,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !store.status().voters.is_empty() {
            store.clear_join_only();
            continue;
        }
        let leader = ask_members(
            &store,
            &handle,
            grpc_port,
            Duration::from_millis(500),
            |s| s.leader.is_some(),
        )
        .await
        .and_then(|s| s.leader);
        store.set_outside_leader(leader);
    }
}

/// On the flock leader: initializes the Raft group, and keeps its voters as
/// [`crate::voters::choose`] says, every `every`, until `stop`.
///
/// A group is initialized only by a leader whose leadership and member count have held for
/// `settle`, and only when no live member knows of a group: at a cold boot every node leads a
/// flock of one for a moment, and each would otherwise make a group of its own.
pub async fn supervise(
    handle: DriverHandle,
    store: Store,
    grpc_port: u16,
    grace: Duration,
    every: Duration,
    settle: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (term, live members) and since when they have held.
    let mut steady: Option<((u64, usize), tokio::time::Instant)> = None;
    // The groups last seen, when there were more than one (to log a split once, loudly).
    let mut split: Vec<u64> = Vec::new();
    let mut surveyed = Survey::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = handle.snapshot();
        let leads = snap.leader.map(|l| l.id) == Some(snap.identity.id);
        if !leads || snap.leaving {
            steady = None;
            continue;
        }
        let shape = (snap.leader.map(|l| l.term).unwrap_or(0), snap.live);
        let settled = match steady {
            Some((s, since)) if s == shape => since.elapsed() >= settle,
            _ => {
                steady = Some((shape, tokio::time::Instant::now()));
                false
            }
        };
        // Look for store groups formed apart, every tick: members not asked yet are asked (a
        // group formed apart comes with members new to this flock); everyone is asked again
        // while a merge is under way, once another group shows, and every full survey period.
        // A merge waits until the flock's shape has held for `settle`, so that the survivor is
        // chosen from the whole merged flock.
        {
            let full = !split.is_empty()
                || surveyed
                    .full_at
                    .is_none_or(|t| t.elapsed() >= full_survey_period(snap.live));
            let mut groups = survey(&store, &handle, grpc_port, &mut surveyed, full).await;
            if groups.len() > 1 && !full {
                groups = survey(&store, &handle, grpc_port, &mut surveyed, true).await;
            }
            if groups.len() > 1 {
                let survivor = if settled {
                    merge_groups(&store, groups, &mut split).await
                } else {
                    debug!(
                        groups = groups.len(),
                        "more than one store group; merging once the flock settles"
                    );
                    None
                };
                // No voter or learner change while the flock holds more than one group, unless
                // this node is in the survivor (a loser that cannot be merged, e.g. without a
                // quorum, must not stop the survivor's voter replacement; nodes of other groups
                // are never added, see `in_other_group`).
                if survivor.is_none() || store.group() != survivor {
                    continue;
                }
            }
            if !split.is_empty() {
                info!("the flock's store is one group again");
                split.clear();
            }
        }
        let nodes: BTreeMap<u64, Seen> = snap
            .members
            .iter()
            .map(|m| {
                let seen = match m.info.state {
                    MemberState::Alive | MemberState::Suspect => Seen::Live,
                    MemberState::Dead | MemberState::Left => {
                        Seen::Gone(snap.now.saturating_sub(m.since))
                    }
                };
                (m.info.id.0, seen)
            })
            .collect();
        let current = known_voters(&store, &handle, grpc_port).await;
        let want = choose(&current, &nodes, grace);
        if want == current {
            if !current.is_empty() {
                add_learners(&store, &handle, grpc_port, &nodes, grace).await;
            }
            continue;
        }
        let Some(addrs) = want
            .iter()
            .map(|id| netid_of(&handle, *id, grpc_port).map(|a| (*id, a)))
            .collect::<Option<BTreeMap<u64, SocketAddr>>>()
        else {
            continue;
        };
        // A node still in another group (formed apart, not merged yet) is never added: it would
        // refuse this group's Raft traffic, and the change would hang until it timed out.
        let mut foreign = None;
        let mine = view_group(&store, &handle, grpc_port).await;
        for (id, netid) in addrs
            .iter()
            .filter(|(id, _)| !current.contains(id) && **id != store.node())
        {
            if in_other_group(&store, *netid, &mine).await {
                foreign = Some(*id);
                break;
            }
        }
        if let Some(id) = foreign {
            debug!(
                node = format!("{id:016x}"),
                "a voter to be is in another store group; waiting for the merge"
            );
            continue;
        }
        let r = if current.is_empty() {
            if !settled {
                continue;
            }
            if store.join_only() {
                debug!(
                    "no store group found yet; this node's store was discarded, so it waits \
                        to join one rather than start one"
                );
                continue;
            }
            info!(voters = ?want, "initializing the store");
            store.initialize(addrs).await
        } else {
            info!(from = ?current, to = ?want, "changing the store's voters");
            store.set_voters(addrs).await
        };
        match r {
            Ok(()) => info!(voters = ?want, "store voters set"),
            Err(e) => warn!(error = %e, "store voters not changed; will retry"),
        }
    }
}

/// Whether the node at `netid` is in a store group other than `mine` (or cannot tell: it did not
/// answer). A node outside any group (an empty store) is not.
async fn in_other_group(store: &Store, netid: SocketAddr, mine: &Option<String>) -> bool {
    match tokio::time::timeout(Duration::from_secs(1), store.remote_status(netid)).await {
        Ok(Ok(s)) => !s.voters.is_empty() && s.group != *mine,
        _ => true,
    }
}

/// The group this node's store uses: its own, or (outside any group) that of a member in one.
async fn view_group(store: &Store, handle: &DriverHandle, grpc_port: u16) -> Option<String> {
    let me = store.status();
    if !me.voters.is_empty() {
        return me.group;
    }
    ask_members(store, handle, grpc_port, Duration::from_secs(1), |_| true)
        .await
        .and_then(|s| s.group)
}

/// What the surveys saw of each live member's store, by (node id, boot): a member is asked
/// when it first shows up (or restarts), and every member again on a full survey.
#[derive(Default)]
struct Survey {
    seen: HashMap<(u64, u64), (SocketAddr, StoreStatus)>,
    /// When the last full survey was.
    full_at: Option<tokio::time::Instant>,
}

/// How often every member is asked again while the flock holds one group: every 30 s, or
/// rarer in a flock of more than 3,000 members, so that it costs at most 100 calls a second.
fn full_survey_period(live: usize) -> Duration {
    let live = u32::try_from(live).unwrap_or(u32::MAX);
    Duration::from_secs(30).max(Duration::from_secs(1) * live / 100)
}

/// The store groups the live members (this node included) report, by id: where their members
/// are (each group's leader first) and what the choice of a survivor needs. Members outside any
/// group, or whose group is not named yet, are left out. Only members not asked yet (new, or
/// restarted) are asked, unless `full`: a group formed apart comes with members the flock did
/// not have, so they are enough to find it, and a full survey then gives fresh figures for the
/// merge.
async fn survey(
    store: &Store,
    handle: &DriverHandle,
    grpc_port: u16,
    cache: &mut Survey,
    full: bool,
) -> BTreeMap<u64, (GroupSeen, Vec<SocketAddr>)> {
    let snap = handle.snapshot();
    let live: Vec<(u64, u64, SocketAddr)> = snap
        .members
        .iter()
        .filter(|m| {
            m.info.id != snap.identity.id
                && matches!(m.info.state, MemberState::Alive | MemberState::Suspect)
        })
        .map(|m| {
            (
                m.info.id.0,
                m.info.boot.0,
                SocketAddr::new(m.info.addr.ip(), grpc_port),
            )
        })
        .collect();
    let keep: HashSet<(u64, u64)> = live.iter().map(|&(id, boot, _)| (id, boot)).collect();
    cache.seen.retain(|k, _| keep.contains(k));
    if full {
        cache.full_at = Some(tokio::time::Instant::now());
    }
    let mut asks = tokio::task::JoinSet::new();
    for (id, boot, netid) in live {
        if !full && cache.seen.contains_key(&(id, boot)) {
            continue;
        }
        let store = store.clone();
        asks.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(1), store.remote_status(netid)).await {
                Ok(Ok(s)) => Some(((id, boot), netid, s)),
                _ => None,
            }
        });
    }
    while let Some(r) = asks.join_next().await {
        if let Ok(Some((key, netid, s))) = r {
            cache.seen.insert(key, (netid, s));
        }
    }
    let mut seen: Vec<(SocketAddr, StoreStatus)> = cache.seen.values().cloned().collect();
    if let Some(me) = netid_of(handle, snap.identity.id.0, grpc_port) {
        seen.push((me, store.status()));
    }
    let mut groups: BTreeMap<u64, (GroupSeen, Vec<SocketAddr>)> = BTreeMap::new();
    for (netid, s) in seen {
        let Some(id) = s
            .group
            .as_deref()
            .and_then(|g| u64::from_str_radix(g, 16).ok())
        else {
            continue;
        };
        if s.voters.is_empty() {
            continue;
        }
        let (g, nodes) = groups.entry(id).or_insert((
            GroupSeen {
                id,
                live: 0,
                applied: 0,
            },
            Vec::new(),
        ));
        g.live += 1;
        g.applied = g.applied.max(s.last_applied.unwrap_or(0));
        if s.role == "leader" {
            nodes.insert(0, netid);
        } else {
            nodes.push(netid);
        }
    }
    groups
}

/// The flock holds more than one store group: merges each into the survivor
/// ([`crux_store::merge::survivor`]) and makes the losers' live members abandon their stores
/// (they then join the survivor through the usual supervision). `split` is the set of groups last
/// logged. Returns the survivor's id.
async fn merge_groups(
    store: &Store,
    groups: BTreeMap<u64, (GroupSeen, Vec<SocketAddr>)>,
    split: &mut Vec<u64>,
) -> Option<u64> {
    let seen: Vec<GroupSeen> = groups.values().map(|(g, _)| *g).collect();
    let win = crux_store::merge::survivor(&seen)?;
    let ids: Vec<u64> = groups.keys().copied().collect();
    if *split != ids {
        error!(
            groups = ?seen
                .iter()
                .map(|g| format!("{} ({} live, applied {})", hex(g.id), g.live, g.applied))
                .collect::<Vec<_>>(),
            survivor = hex(win.id),
            "the flock holds more than one store group (formed apart, e.g. by a cold boot while \
             partitioned): merging every other group into the survivor"
        );
        *split = ids;
    }
    let survivor = GroupNodes {
        id: win.id,
        nodes: groups[&win.id].1.clone(),
    };
    for (id, (_, nodes)) in groups.iter().filter(|(id, _)| **id != win.id) {
        let loser = GroupNodes {
            id: *id,
            nodes: nodes.clone(),
        };
        let done = match store.merged_already(loser.id, &survivor).await {
            Ok(r) => r.is_some(),
            Err(e) => {
                warn!(error = %e, survivor = hex(win.id), "store merge: the survivor did not answer; will retry");
                continue;
            }
        };
        if !done {
            match store.merge(&loser, &survivor).await {
                Ok(r) => warn!(
                    from = hex(loser.id),
                    into = hex(win.id),
                    muster_added = r.muster_added,
                    docs_added = r.docs_added,
                    kept_aside = ?r.kept_aside,
                    "store group merged into the survivor; its members now abandon it"
                ),
                Err(e) => {
                    warn!(error = %e, from = hex(loser.id), into = hex(win.id), "store merge failed; will retry");
                    continue;
                }
            }
        }
        for netid in &loser.nodes {
            match store.abandon_at(*netid, loser.id, win.id).await {
                Ok(()) => {
                    info!(%netid, group = hex(loser.id), "store member abandoned the merged group")
                }
                Err(e) => {
                    warn!(%netid, error = %e, "store member did not abandon the merged group; will retry")
                }
            }
        }
    }
    Some(win.id)
}

/// Makes live members that are not voters learners, up to [`LEARNERS_MAX`] in node id order: they
/// then hold the data (local reads) and know the leader, and a voter that was replaced while it
/// was down learns that it no longer votes instead of calling elections nobody answers. Learners
/// the flock has held gone for longer than `grace` are removed first, making room.
async fn add_learners(
    store: &Store,
    handle: &DriverHandle,
    grpc_port: u16,
    nodes: &BTreeMap<u64, Seen>,
    grace: Duration,
) {
    // The group as its leader knows it.
    let mut view = store.status();
    if let Some(l) = view.leader.filter(|l| l.id != view.node) {
        match tokio::time::timeout(Duration::from_secs(1), store.remote_status(l.netid)).await {
            Ok(Ok(s)) => view = s,
            _ => return,
        }
    }
    if view.voters.is_empty() || view.leader.is_none() {
        return;
    }
    let voters: BTreeSet<u64> = view.voters.iter().map(|m| m.id).collect();
    let learners: BTreeSet<u64> = view.learners.iter().map(|m| m.id).collect();
    let (gone, add) = plan_learners(&voters, &learners, nodes, grace, LEARNERS_MAX);
    if !gone.is_empty() {
        match store.remove_learners(gone.clone()).await {
            Ok(()) => info!(?gone, "store learners gone for good removed"),
            Err(e) => debug!(error = %e, "store learners not removed yet"),
        }
        return;
    }
    for id in &add {
        let Some(netid) = netid_of(handle, *id, grpc_port) else {
            continue;
        };
        if in_other_group(store, netid, &view.group).await {
            debug!(
                node = format!("{id:016x}"),
                "not made a learner: it is in another store group"
            );
            continue;
        }
        match store.add_learner(*id, netid).await {
            Ok(()) => info!(node = format!("{id:016x}"), "store learner added"),
            Err(e) => {
                debug!(node = format!("{id:016x}"), error = %e, "store learner not added yet")
            }
        }
    }
}

fn entry_pb(e: MusterEntry) -> pb::MusterEntry {
    pb::MusterEntry {
        horde: e.horde,
        api: e.api,
        inst: e.inst,
        filename: e.filename,
        function: e.function,
        timestamp_ms: e.timestamp_ms,
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn check(what: &str, v: &str) -> Result<(), Status> {
    crux_steward::select::check_name(what, v).map_err(|e| Status::invalid_argument(e.0))
}

/// `MusterAdd`.
pub async fn muster_add(store: &Store, req: pb::MusterAddRequest) -> Result<(), Status> {
    let e = req
        .entry
        .ok_or_else(|| Status::invalid_argument("entry missing"))?;
    let horde = crux_steward::select::horde_or_default(&e.horde).to_string();
    check("horde", &horde)?;
    check("api", &e.api)?;
    check("inst", &e.inst)?;
    e.filename
        .parse::<crux_pastiche::digest::Digest>()
        .map_err(|err| Status::invalid_argument(format!("file: {err}")))?;
    if e.function.is_empty() || e.function.len() > 256 {
        return Err(Status::invalid_argument("function must be 1-256 bytes"));
    }
    let entry = MusterEntry {
        horde,
        api: e.api,
        inst: e.inst,
        filename: e.filename,
        function: e.function,
        timestamp_ms: crux_store::now_ms(),
    };
    store
        .write(Command::MusterAdd(entry))
        .await
        .map_err(status)?;
    Ok(())
}

/// `MusterSearch` (a consistent read).
pub async fn muster_search(
    store: &Store,
    req: pb::MusterSearchRequest,
) -> Result<Vec<pb::MusterEntry>, Status> {
    let q = Query::MusterSearch {
        horde: opt(&req.horde),
        api: opt(&req.api),
        inst: opt(&req.inst),
    };
    match store.read(q).await.map_err(status)? {
        QueryResult::Muster(v) => Ok(v.into_iter().map(entry_pb).collect()),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `MusterRemove`.
pub async fn muster_remove(store: &Store, req: pb::MusterRemoveRequest) -> Result<bool, Status> {
    let cmd = Command::MusterRemove {
        horde: crux_steward::select::horde_or_default(&req.horde).to_string(),
        api: req.api,
        inst: req.inst,
    };
    match store.write(cmd).await.map_err(status)? {
        Applied::Removed(r) => Ok(r),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `DocGet` (a consistent read).
pub async fn doc_get(store: &Store, req: pb::DocGetRequest) -> Result<pb::DocGetResponse, Status> {
    match store
        .read(Query::DocGet { key: req.key })
        .await
        .map_err(status)?
    {
        QueryResult::Doc(Some((value, generation))) => Ok(pb::DocGetResponse {
            found: true,
            value,
            generation,
        }),
        QueryResult::Doc(None) => Ok(pb::DocGetResponse::default()),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `DocPut` (compare-and-swap unless `unconditional`).
pub async fn doc_put(store: &Store, req: pb::DocPutRequest) -> Result<pb::DocPutResponse, Status> {
    if req.key.is_empty() || req.key.len() > 512 {
        return Err(Status::invalid_argument("key must be 1-512 bytes"));
    }
    if req.key.starts_with("store/") {
        return Err(Status::invalid_argument(format!(
            "key {:?}: documents under store/ are the store's own (its group id, merge records) \
             and cannot be written",
            req.key
        )));
    }
    let cmd = Command::DocPut {
        key: req.key,
        value: req.value,
        if_generation: (!req.unconditional).then_some(req.if_generation),
    };
    match store.write(cmd).await.map_err(status)? {
        Applied::Doc { generation, .. } => Ok(pb::DocPutResponse {
            written: true,
            generation,
        }),
        Applied::Conflict { current, .. } => Ok(pb::DocPutResponse {
            written: false,
            generation: current,
        }),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `StoreStatus`: this node's view, or the Raft leader's when this node is outside the group or
/// knows no leader.
pub async fn store_status(
    store: &Store,
    handle: &DriverHandle,
    grpc_port: u16,
) -> Result<pb::StoreStatusResponse, Status> {
    let me = store.status();
    let voter = me.voters.iter().any(|m| m.id == me.node);
    let mut view: StoreStatus = me;
    // Ask the leader for its view (it alone knows the lag).
    let leader = match view.leader {
        Some(l) => Some(l),
        None => {
            let vs = known_voters(store, handle, grpc_port).await;
            let mut found = None;
            for id in vs {
                if let Some(n) = netid_of(handle, id, grpc_port) {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(1), store.remote_status(n)).await
                    {
                        if let Some(l) = s.leader {
                            found = Some(l);
                            break;
                        }
                    }
                }
            }
            found
        }
    };
    if let Some(l) = leader {
        if l.id != view.node {
            match tokio::time::timeout(Duration::from_secs(2), store.remote_status(l.netid)).await {
                Ok(Ok(s)) => view = s,
                other => debug!(?other, "the store leader did not answer its status"),
            }
        }
    }
    let lag = view.lag.clone().unwrap_or_default();
    let addr = |id: u64| {
        flock_addr_of(handle, id)
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    Ok(pb::StoreStatusResponse {
        leader_addr: view.leader.map(|l| addr(l.id)).unwrap_or_default(),
        leader_id: view
            .leader
            .map(|l| format!("{:016x}", l.id))
            .unwrap_or_default(),
        term: view.term,
        initialized: !view.voters.is_empty(),
        voters: view
            .voters
            .iter()
            .map(|m| pb::StoreVoter {
                id: format!("{:016x}", m.id),
                addr: addr(m.id),
                lag: lag.get(&m.id).copied(),
            })
            .collect(),
        last_applied: view.last_applied.unwrap_or(0),
        last_log: view.last_log_index.unwrap_or(0),
        voter,
        role: view.role,
    })
}

/// The stream `DocWatch` answers with.
pub type DocStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DocEvent, Status>> + Send + 'static>,
>;

fn listing(store: &Store, prefix: &str) -> Vec<pb::DocEvent> {
    let docs = match store.local(Query::DocList {
        prefix: prefix.to_string(),
    }) {
        QueryResult::Docs(d) => d,
        _ => Vec::new(),
    };
    let mut out: Vec<pb::DocEvent> = docs
        .into_iter()
        .map(|(key, value, generation)| pb::DocEvent {
            key,
            value,
            generation,
            ..Default::default()
        })
        .collect();
    match out.first_mut() {
        Some(first) => first.reset = true,
        None => out.push(pb::DocEvent {
            reset: true,
            ..Default::default()
        }),
    }
    out
}

/// `DocWatch`: the documents under `prefix` in this node's copy, then each change.
pub fn doc_watch(store: &Store, req: pb::DocWatchRequest) -> DocStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut changes = store.changes();
    let store = store.clone();
    tokio::spawn(async move {
        let prefix = req.prefix;
        for e in listing(&store, &prefix) {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        loop {
            let c = tokio::select! {
                _ = tx.closed() => return,
                c = changes.recv() => c,
            };
            let events = match c {
                Ok(crux_store::Change::DocPut {
                    key,
                    value,
                    generation,
                }) if key.starts_with(&prefix) => vec![pb::DocEvent {
                    key,
                    value,
                    generation,
                    ..Default::default()
                }],
                Ok(crux_store::Change::DocDeleted { key }) if key.starts_with(&prefix) => {
                    vec![pb::DocEvent {
                        key,
                        deleted: true,
                        ..Default::default()
                    }]
                }
                Ok(crux_store::Change::Reset)
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    listing(&store, &prefix)
                }
                Ok(_) => Vec::new(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_surveys_cost_at_most_a_hundred_calls_a_second() {
        assert_eq!(full_survey_period(1), Duration::from_secs(30));
        assert_eq!(full_survey_period(3_000), Duration::from_secs(30));
        assert_eq!(full_survey_period(10_000), Duration::from_secs(100));
        for live in [5usize, 1_000, 3_001, 7_777, 20_000] {
            let per_sec = live as f64 / full_survey_period(live).as_secs_f64();
            assert!(per_sec <= 100.0 + 1e-9, "{live} members: {per_sec} calls/s");
        }
    }
}
