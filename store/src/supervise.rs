//! The store's runtime in a flock: which nodes are its Raft voters and learners, and how a node
//! outside the group finds the leader. [`start`] runs two loops on every node:
//!
//! * [`supervise`]: on the flock leader only, initializes the Raft group once the flock has
//!   settled and no member knows of one, keeps its voters as [`crate::voters::choose`] says (1, 3
//!   or 5, a dead voter replaced after the grace period), adds learners up to [`LEARNERS_MAX`],
//!   and merges store groups formed apart ([`crate::merge`]).
//! * [`follow_leader`]: while this node is outside the group, learns the Raft leader from the
//!   members that are in it, so that its writes and reads are forwarded there.
//!
//! The flock is read through a [`FlockWatch`] the agent publishes; the other nodes' stores are
//! reached at their flock IP and the node gRPC port, over the store's transport.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crux_service::{FlockView, FlockWatch, Phase, ReadySender, Service};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::voters::{choose, plan_learners, with_initializer, Seen};
use crate::{hex, GroupNodes, GroupSeen, Serving, Store, StoreStatus};

/// What the store's supervision runs on.
pub struct Supervision {
    /// This node's store.
    pub store: Store,
    /// The flock as this node sees it.
    pub flock: FlockWatch,
    /// The node gRPC port (the same on every node of a bloc).
    pub grpc_port: u16,
    /// How long a voter or learner may be gone before it is replaced.
    pub grace: Duration,
    /// How often the loops look.
    pub every: Duration,
    /// How long the flock's leadership and size must hold before a group is initialized or
    /// merged.
    pub settle: Duration,
    /// Stops both loops.
    pub stop: CancellationToken,
}

/// Starts the store's supervision: its tasks `voters` ([`supervise`]), `leader follower`
/// ([`follow_leader`]) and `readiness` ([`readiness`]). Ready only while the store takes writes
/// ([`crate::Serving::Yes`]: a leader is known and an entry of its term committed through a
/// majority is applied here), so that a node reports ready only once a write made through it
/// would be accepted; otherwise the readiness says what is missing ("electing a leader", "no
/// quorum possible: 1 of 3 voters reachable", …). Once ready, a store that stops taking writes is
/// [`Phase::Degraded`] until it does again.
pub fn start(s: Supervision) -> Service {
    let (service, ready) = Service::new("store", s.stop.clone());
    ready.set(Phase::Starting, "looking for the store group");
    let outside = Arc::new(AtomicBool::new(false));
    service
        .task(
            "voters",
            supervise(
                s.flock.clone(),
                s.store.clone(),
                s.grpc_port,
                s.grace,
                s.every,
                s.settle,
                s.stop.clone(),
            ),
        )
        .task(
            "leader follower",
            follow_leader_marking(
                s.flock.clone(),
                s.store.clone(),
                s.grpc_port,
                s.every,
                outside.clone(),
                s.stop.clone(),
            ),
        )
        .task(
            "readiness",
            readiness(s.store, s.flock, s.settle, outside, ready, s.stop),
        )
}

/// How often the store's readiness is looked at: often enough that a command waiting for it
/// starts within a tenth of a second of the store taking writes.
const READINESS_EVERY: Duration = Duration::from_millis(100);

/// Keeps `ready` set to whether the store takes writes ([`crate::Store::serving`]), with what is
/// missing when it does not. `outside`: whether the member a node outside the group learned its
/// leader from said that leader takes writes ([`follow_leader`]).
pub async fn readiness(
    store: Store,
    flock: FlockWatch,
    settle: Duration,
    outside: Arc<AtomicBool>,
    ready: ReadySender,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(READINESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ready = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                ready.set(Phase::Stopped, "stopped");
                return;
            }
            _ = tick.tick() => {}
        }
        let serving = store.serving();
        let view = flock.borrow().clone();
        let (phase, detail) =
            readiness_of(&serving, &view, outside.load(Ordering::Relaxed), settle);
        let phase = match phase {
            Phase::Starting if was_ready => Phase::Degraded,
            p => p,
        };
        if phase == Phase::Ready && !was_ready {
            info!(%serving, "the store takes writes");
            was_ready = true;
        }
        ready.set(phase, detail);
    }
}

/// The store's readiness phase and detail for `serving`, as a node seeing the flock as `view`
/// tells it. `outside_serving`: for a node outside the group, whether the leader it forwards to
/// takes writes.
pub fn readiness_of(
    serving: &Serving,
    view: &FlockView,
    outside_serving: bool,
    settle: Duration,
) -> (Phase, String) {
    let reach = |voters: &[u64]| {
        let live = voters
            .iter()
            .filter(|id| view.member(**id).is_some_and(|m| m.live))
            .count();
        (live, voters.len())
    };
    match serving {
        Serving::Yes { .. } => (Phase::Ready, serving.to_string()),
        Serving::Forwards { .. } if outside_serving => (Phase::Ready, serving.to_string()),
        Serving::Forwards { leader } => (
            Phase::Starting,
            format!(
                "outside the group: its leader {leader:016x} has not committed an entry of its \
                 term yet"
            ),
        ),
        Serving::NoGroup if view.leads() => (
            Phase::Starting,
            format!(
                "no store group yet: this node (the flock leader) starts one once the flock has \
                 held still for {settle:?}"
            ),
        ),
        Serving::NoGroup => (
            Phase::Starting,
            "no store group known yet: waiting for the flock leader to start one, or to learn \
             the leader from the members"
                .into(),
        ),
        Serving::Electing { term, voters } => {
            let (live, all) = reach(voters);
            if live * 2 <= all {
                (
                    Phase::Starting,
                    format!(
                        "no quorum possible: {live} of {all} voters reachable (the flock holds \
                         the others dead); no leader can be elected"
                    ),
                )
            } else {
                (
                    Phase::Starting,
                    format!("electing a leader (term {term}; {live} of {all} voters reachable)"),
                )
            }
        }
        Serving::Committing { .. } => (Phase::Starting, serving.to_string()),
        Serving::CutOff { millis, voters } => {
            let (live, all) = reach(voters);
            let what = if live * 2 <= all {
                "no quorum possible"
            } else {
                "no quorum"
            };
            let since = match millis {
                Some(ms) => format!("for {ms} ms"),
                None => "since it does".into(),
            };
            (
                Phase::Starting,
                format!(
                    "{what}: {live} of {all} voters reachable (this node leads but no majority of \
                     voters has answered {since})"
                ),
            )
        }
        Serving::Stopped(_) => (Phase::Failed, serving.to_string()),
    }
}

/// How long voter changes are held back for want of a store leader with a majority before the
/// supervision says so (an election at a start or after a leader's loss is shorter).
const HELD_BACK_SAID_AFTER: Duration = Duration::from_secs(3);

/// Most learners the store's group has. Learners hold a copy (local reads) but the Raft leader
/// replicates every entry to each: in a flock of hundreds, the members beyond this many stay plain
/// clients, which forward their requests to the leader (see [`follow_leader`]).
pub const LEARNERS_MAX: usize = 8;

/// The NetID of node `id`: its flock IP and the node gRPC port.
pub fn netid_of(flock: &FlockWatch, id: u64, grpc_port: u16) -> Option<SocketAddr> {
    flock.borrow().netid_of(id, grpc_port)
}

/// The store status of the first other live member that is in a Raft group (it knows voters)
/// and that `want` accepts, each asked with `timeout`.
async fn ask_members(
    store: &Store,
    flock: &FlockWatch,
    grpc_port: u16,
    timeout: Duration,
    want: impl Fn(&StoreStatus) -> bool,
) -> Option<StoreStatus> {
    let snap = flock.borrow().clone();
    for m in snap.members.iter().filter(|m| m.id != snap.me && m.live) {
        let netid = SocketAddr::new(m.addr.ip(), grpc_port);
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
pub async fn known_voters(store: &Store, flock: &FlockWatch, grpc_port: u16) -> BTreeSet<u64> {
    let mine: BTreeSet<u64> = store.status().voters.iter().map(|m| m.id).collect();
    if !mine.is_empty() {
        return mine;
    }
    ask_members(store, flock, grpc_port, Duration::from_secs(1), |_| true)
        .await
        .map(|s| s.voters.iter().map(|m| m.id).collect())
        .unwrap_or_default()
}

/// On every node: while this node is outside the Raft group (it knows no voters), learns the
/// leader from the members that are in it, so that its writes and reads are forwarded there.
pub async fn follow_leader(
    flock: FlockWatch,
    store: Store,
    grpc_port: u16,
    every: Duration,
    stop: CancellationToken,
) {
    let outside = Arc::new(AtomicBool::new(false));
    follow_leader_marking(flock, store, grpc_port, every, outside, stop).await
}

/// [`follow_leader`], marking in `serving` whether the member it learned the leader from said
/// that leader takes writes.
async fn follow_leader_marking(
    flock: FlockWatch,
    store: Store,
    grpc_port: u16,
    every: Duration,
    serving: Arc<AtomicBool>,
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
        let answer = ask_members(&store, &flock, grpc_port, Duration::from_millis(500), |s| {
            s.leader.is_some()
        })
        .await;
        serving.store(
            answer.as_ref().is_some_and(|s| s.serving),
            Ordering::Relaxed,
        );
        store.set_outside_leader(answer.and_then(|s| s.leader));
    }
}

/// On the flock leader: initializes the Raft group, and keeps its voters as
/// [`crate::voters::choose`] says, every `every`, until `stop`.
///
/// A group is initialized only by a leader whose leadership and member count have held for
/// `settle`, and only when no live member knows of a group: at a cold boot every node leads a
/// flock of one for a moment, and each would otherwise make a group of its own.
pub async fn supervise(
    flock: FlockWatch,
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
    // Since when voter changes are held back for want of a store leader with a majority, and
    // whether that was logged (once, not every tick).
    let mut held_back: Option<tokio::time::Instant> = None;
    let mut held_back_said = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = flock.borrow().clone();
        let leads = snap.leads();
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
            let mut groups = survey(&store, &flock, grpc_port, &mut surveyed, full).await;
            if groups.len() > 1 && !full {
                groups = survey(&store, &flock, grpc_port, &mut surveyed, true).await;
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
                let seen = if m.live {
                    Seen::Live
                } else {
                    Seen::Gone(m.gone_for)
                };
                (m.id, seen)
            })
            .collect();
        let known = known_voters(&store, &flock, grpc_port).await;
        // Voters and learners are changed only through a Raft leader that holds a majority of
        // the voters now, and from its view of the group: a flock leader cut off from them (a
        // minority after a split, a lone node whose flock view is stale) could not get a change
        // committed, and its idea of who lives is not the majority's.
        let (current, group) = if known.is_empty() {
            (known, None)
        } else {
            match group_view(&store, &flock, grpc_port).await {
                Some(g) => (g.voters.iter().map(|m| m.id).collect(), Some(g)),
                None => {
                    // An election takes well under a second: say it only when it lasts.
                    let since = *held_back.get_or_insert_with(tokio::time::Instant::now);
                    if !held_back_said && since.elapsed() >= HELD_BACK_SAID_AFTER {
                        info!(
                            voters = ?known,
                            "no store leader with a majority of its voters is in reach: the \
                             store's voters and learners are left as they are"
                        );
                        held_back_said = true;
                    }
                    continue;
                }
            }
        };
        if held_back.take().is_some() && std::mem::take(&mut held_back_said) {
            info!("a store leader with a majority is in reach again: voters are kept");
        }
        let mut want = choose(&current, &nodes, grace);
        if current.is_empty() {
            want = with_initializer(want, store.node());
        }
        if want == current {
            if let Some(g) = &group {
                add_learners(&store, &flock, grpc_port, g, &nodes, grace).await;
            }
            continue;
        }
        let Some(addrs) = want
            .iter()
            .map(|id| netid_of(&flock, *id, grpc_port).map(|a| (*id, a)))
            .collect::<Option<BTreeMap<u64, SocketAddr>>>()
        else {
            continue;
        };
        // A node still in another group (formed apart, not merged yet) is never added: it would
        // refuse this group's Raft traffic, and the change would hang until it timed out.
        let mut foreign = None;
        let mine = view_group(&store, &flock, grpc_port).await;
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
async fn view_group(store: &Store, flock: &FlockWatch, grpc_port: u16) -> Option<String> {
    let me = store.status();
    if !me.voters.is_empty() {
        return me.group;
    }
    ask_members(store, flock, grpc_port, Duration::from_secs(1), |_| true)
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
    flock: &FlockWatch,
    grpc_port: u16,
    cache: &mut Survey,
    full: bool,
) -> BTreeMap<u64, (GroupSeen, Vec<SocketAddr>)> {
    let snap = flock.borrow().clone();
    let live: Vec<(u64, u64, SocketAddr)> = snap
        .members
        .iter()
        .filter(|m| m.id != snap.me && m.live)
        .map(|m| (m.id, m.boot, SocketAddr::new(m.addr.ip(), grpc_port)))
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
    if let Some(me) = netid_of(flock, snap.me, grpc_port) {
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
/// ([`crate::merge::survivor`]) and makes the losers' live members abandon their stores
/// (they then join the survivor through the usual supervision). `split` is the set of groups last
/// logged. Returns the survivor's id.
async fn merge_groups(
    store: &Store,
    groups: BTreeMap<u64, (GroupSeen, Vec<SocketAddr>)>,
    split: &mut Vec<u64>,
) -> Option<u64> {
    let seen: Vec<GroupSeen> = groups.values().map(|(g, _)| *g).collect();
    let win = crate::merge::survivor(&seen)?;
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
///
/// `view`: the group as its leader knows it ([`group_view`]).
async fn add_learners(
    store: &Store,
    flock: &FlockWatch,
    grpc_port: u16,
    view: &StoreStatus,
    nodes: &BTreeMap<u64, Seen>,
    grace: Duration,
) {
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
        let Some(netid) = netid_of(flock, *id, grpc_port) else {
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

/// The group as its Raft leader knows it, when that leader holds a majority of its voters now
/// (one acknowledged it within the shortest election timeout; a leader no majority has
/// acknowledged since it leads does not): this node's own status when it
/// leads, else the leader's, found through this node's Raft state or the members'. `None` when no
/// such leader is in reach.
async fn group_view(store: &Store, flock: &FlockWatch, grpc_port: u16) -> Option<StoreStatus> {
    let stale = store.stale_quorum_millis();
    let holds = |s: &StoreStatus| {
        s.role == "leader"
            && !s.voters.is_empty()
            && s.millis_since_quorum_ack.is_some_and(|t| t <= stale)
    };
    let me = store.status();
    if holds(&me) {
        return Some(me);
    }
    let leader = match me.leader.filter(|l| l.id != me.node) {
        Some(l) => l,
        None => {
            ask_members(store, flock, grpc_port, Duration::from_secs(1), |s| {
                s.leader.is_some_and(|l| l.id != me.node)
            })
            .await?
            .leader?
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(1), store.remote_status(leader.netid))
        .await
        .ok()?
        .ok()?;
    holds(&s).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(me: u64, live: &[u64], dead: &[u64], leader: u64) -> FlockView {
        let addr: SocketAddr = "127.0.0.2:7700".parse().unwrap();
        let mut v = FlockView::alone(me, addr);
        v.leader = Some(crux_service::Leader {
            id: leader,
            addr,
            term: 1,
        });
        v.members = live
            .iter()
            .map(|id| (*id, true))
            .chain(dead.iter().map(|id| (*id, false)))
            .map(|(id, live)| crux_service::Member {
                id,
                boot: 1,
                addr,
                live,
                gone_for: Duration::ZERO,
            })
            .collect();
        v.members.sort_by_key(|m| m.id);
        v.live = live.len();
        v
    }

    #[test]
    fn readiness_says_what_is_missing() {
        let settle = Duration::from_secs(5);
        let all = view(1, &[1, 2, 3], &[], 2);
        let alone = view(1, &[1], &[2, 3], 1);
        let yes = Serving::Yes {
            leader: 2,
            term: 4,
            applied: 9,
        };
        assert_eq!(
            readiness_of(&yes, &all, false, settle),
            (
                Phase::Ready,
                "takes writes: leader 0000000000000002, term 4, applied index 9".into()
            )
        );
        let electing = Serving::Electing {
            term: 5,
            voters: vec![1, 2, 3],
        };
        assert_eq!(
            readiness_of(&electing, &all, false, settle),
            (
                Phase::Starting,
                "electing a leader (term 5; 3 of 3 voters reachable)".into()
            )
        );
        let (phase, detail) = readiness_of(&electing, &alone, false, settle);
        assert_eq!(phase, Phase::Starting);
        assert!(
            detail.starts_with("no quorum possible: 1 of 3 voters reachable"),
            "{detail}"
        );
        let cut = Serving::CutOff {
            millis: Some(900),
            voters: vec![1, 2, 3],
        };
        let (_, detail) = readiness_of(&cut, &alone, false, settle);
        assert!(
            detail.starts_with("no quorum possible: 1 of 3 voters reachable (this node leads"),
            "{detail}"
        );
        // Outside the group: ready only when the member it asked says its leader takes writes.
        let fwd = Serving::Forwards { leader: 2 };
        assert_eq!(readiness_of(&fwd, &all, true, settle).0, Phase::Ready);
        assert_eq!(readiness_of(&fwd, &all, false, settle).0, Phase::Starting);
        let (_, detail) = readiness_of(&Serving::NoGroup, &alone, false, settle);
        assert!(
            detail.contains("this node (the flock leader) starts one"),
            "{detail}"
        );
        assert_eq!(
            readiness_of(&Serving::Stopped("x".into()), &all, false, settle).0,
            Phase::Failed
        );
    }

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
