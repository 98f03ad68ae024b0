//! The proctor: on the flock leader, turns the intent in the durable store into assignments for
//! every node's dean, level-triggered. Each round it reads the intent (a consistent read: a
//! cut-off leader acts on nothing newer than it may), reconciles it with what the deans last
//! reported ([`crux_proctor::reconcile`]: stable, deterministic, stateless, so a new leader
//! carries on from the same generation with what the deans run), and sends every live node its
//! whole assignment tagged with the leader's term. A round runs at once when the intent changes
//! and otherwise every [`ROUND`]. Nodes that do not answer keep their last report until the
//! flock declares them dead (their units are then placed elsewhere) and are called again with
//! back-off (one round, doubling up to 8 s).
//!
//! A node is called every round while its assignment changes or something on it is in flux
//! (a unit pending or stopping). A quiet node (same assignment, every unit healthy or failed) is
//! called again after [`quiet_period`], which grows with the flock so that quiet nodes cost at
//! most [`QUIET_SYNCS_PER_SEC`] calls a second: every round in a small flock, every 5 s in one of
//! 1,000 nodes. What changes by itself on a quiet node (a crash loop, a health flip) is seen
//! within that period.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crux_proctor::{Intent, Node, Observed, Plan, UnitState};
use crux_proto::grpc::proctor::v1 as pb;
use crux_service::{node_name, FlockWatch};
use crux_store::{Query, QueryResult, Store, StoreError};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response};
use tracing::{debug, info, warn};

use crate::dean::{unit_from_pb, unit_pb, Dean};

/// The store document that holds the intent.
pub const INTENT_KEY: &str = "proctor/intent";

/// How often the proctor reconciles without a change.
pub const ROUND: Duration = Duration::from_millis(500);

/// How long a dean call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The most calls a second the proctor makes to quiet nodes, across the flock.
pub const QUIET_SYNCS_PER_SEC: u32 = 200;

/// How long a quiet node may go without a call, in a flock of `live` nodes: [`ROUND`], or
/// longer once the flock has more than [`QUIET_SYNCS_PER_SEC`] × [`ROUND`] nodes.
pub fn quiet_period(live: usize) -> Duration {
    let live = u32::try_from(live).unwrap_or(u32::MAX);
    ROUND.max(Duration::from_secs(1) * live / QUIET_SYNCS_PER_SEC)
}

/// Whether a node is due a call this round: it has not answered yet, its assignment is not the
/// one it last took, a unit on it is pending or stopping, or it has been quiet for `quiet`.
fn due(
    last: Option<&Synced>,
    report: Option<&pb::SyncResponse>,
    assign: &[pb::Unit],
    now: tokio::time::Instant,
    quiet: Duration,
) -> bool {
    let (Some(last), Some(report)) = (last, report) else {
        return true;
    };
    last.assign != assign
        || report
            .units
            .iter()
            .any(|u| u.state != "healthy" && u.state != "failed")
        || now.duration_since(last.at) >= quiet
}

/// What a node last took from this proctor, and when.
struct Synced {
    assign: Vec<pb::Unit>,
    at: tokio::time::Instant,
}

/// Why the stored intent could not be read. Nothing changed in either case.
#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    /// The store did not answer the consistent read (no quorum, not initialized, …).
    #[error("reading the intent: {0}")]
    Read(#[from] StoreError),
    /// The stored document is not an intent.
    #[error("the stored intent does not parse: {0}")]
    Unparsable(String),
    /// The store answered with something else than a document.
    #[error("unexpected answer to an intent read: {0}")]
    Unexpected(String),
}

/// The intent stored, and its generation (0: none stored).
pub async fn read_intent(store: &Store) -> Result<(Intent, u64), IntentError> {
    match store
        .read(Query::DocGet {
            key: INTENT_KEY.into(),
        })
        .await?
    {
        QueryResult::Doc(Some((json, generation))) => {
            let intent =
                Intent::from_json(&json).map_err(|e| IntentError::Unparsable(e.to_string()))?;
            Ok((intent, generation))
        }
        QueryResult::Doc(None) => Ok((Intent::default(), 0)),
        other => Err(IntentError::Unexpected(format!("{other:?}"))),
    }
}

/// A dean's report as the reconciler reads it.
fn observed(r: &pb::SyncResponse) -> Observed {
    Observed {
        node: r.node.clone(),
        units: r
            .units
            .iter()
            .filter_map(|u| {
                let state = match u.state.as_str() {
                    "healthy" => UnitState::Healthy,
                    "failed" => UnitState::Failed,
                    "stopping" => UnitState::Stopping,
                    _ => UnitState::Pending,
                };
                u.unit.clone().map(|x| (unit_from_pb(x), state))
            })
            .collect(),
    }
}

fn node_of(r: &pb::SyncResponse) -> Node {
    Node {
        id: r.node.clone(),
        attrs: r
            .attributes
            .iter()
            .filter_map(|(k, v)| {
                crux_proctor::Value::from_toml_text(v)
                    .ok()
                    .map(|v| (k.clone(), v))
            })
            .collect(),
    }
}

/// The status the proctor publishes.
fn status_pb(plan: &Plan, generation: u64, leader: &str, term: u64) -> pb::StatusResponse {
    pb::StatusResponse {
        generation,
        services: plan
            .status
            .iter()
            .map(|s| pb::ServiceStatus {
                horde: s.horde.clone(),
                api: s.api.clone(),
                inst: s.inst.clone(),
                state: s.state.to_string(),
                desired: s.desired,
                running: s.running,
                nodes: s.nodes.clone(),
                message: s.message.clone(),
            })
            .collect(),
        leader: leader.to_string(),
        term,
    }
}

/// Runs a proctor whenever this node leads the flock (a new one for each term), until `stop`.
/// `status` carries the running proctor's doneness (None while this node runs none).
pub async fn supervise(
    flock: FlockWatch,
    store: Store,
    dean: Arc<Dean>,
    transport: crux_transport::Transport,
    grpc_port: u16,
    status: watch::Sender<Option<pb::StatusResponse>>,
    stop: CancellationToken,
) {
    let view = flock.clone();
    let mut flock = flock;
    loop {
        let lead = {
            let snap = flock.borrow_and_update();
            snap.leader
                .filter(|l| l.id == snap.me && !snap.leaving)
                .map(|l| (node_name(l.id), l.term))
        };
        if let Some((me, term)) = lead {
            info!(term, "proctor starting");
            let term_over = CancellationToken::new();
            let watcher = {
                let mut flock = view.clone();
                let over = term_over.clone();
                let me = me.clone();
                tokio::spawn(async move {
                    loop {
                        let still = {
                            let snap = flock.borrow_and_update();
                            snap.leader.is_some_and(|l| {
                                node_name(l.id) == me && l.term == term && !snap.leaving
                            })
                        };
                        if !still {
                            over.cancel();
                            return;
                        }
                        if flock.changed().await.is_err() {
                            over.cancel();
                            return;
                        }
                    }
                })
            };
            let run = Term {
                flock: view.clone(),
                store: store.clone(),
                dean: dean.clone(),
                transport: transport.clone(),
                grpc_port,
                me,
                term,
                status: status.clone(),
                channels: HashMap::new(),
                backoff: HashMap::new(),
                reports: BTreeMap::new(),
                synced: HashMap::new(),
                reports_changed: false,
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = run.run(term_over.clone()) => {}
            }
            term_over.cancel();
            watcher.abort();
            status.send_replace(None);
            info!(term, "proctor stopped");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = flock.changed() => if r.is_err() { return },
        }
    }
}

/// One term's proctor.
struct Term {
    flock: FlockWatch,
    store: Store,
    dean: Arc<Dean>,
    transport: crux_transport::Transport,
    grpc_port: u16,
    me: String,
    term: u64,
    status: watch::Sender<Option<pb::StatusResponse>>,
    channels: HashMap<SocketAddr, Channel>,
    /// Nodes whose calls failed: how many times in a row, and when to call them again.
    backoff: HashMap<SocketAddr, (u32, tokio::time::Instant)>,
    /// The last report of each node, by node id.
    reports: BTreeMap<String, pb::SyncResponse>,
    /// The last assignment each node took, by node id.
    synced: HashMap<String, Synced>,
    /// Whether a report changed since this was last cleared.
    reports_changed: bool,
}

impl Term {
    async fn run(mut self, over: CancellationToken) {
        let mut changes = self.store.changes();
        let mut first = true;
        let mut refused = false;
        while !over.is_cancelled() && !refused {
            let live = self.live();
            self.reports
                .retain(|id, _| live.iter().any(|(n, _)| n == id));
            self.synced
                .retain(|id, _| live.iter().any(|(n, _)| n == id));
            self.backoff
                .retain(|netid, _| live.iter().any(|(_, a)| a == netid));
            let intent = match read_intent(&self.store).await {
                Ok(i) => Some(i),
                Err(e) => {
                    debug!(error = %e, "proctor: intent unreadable this round");
                    None
                }
            };
            if first || intent.is_none() {
                // A new proctor learns what the deans run before it assigns anything.
                refused |= self.round(&live, None, 0).await;
                first = intent.is_none();
            }
            if let Some((intent, generation)) = intent {
                let plan = self.reconcile(&intent);
                self.reports_changed = false;
                refused |= self.round(&live, Some(&plan), generation).await;
                // The status from the reports this round brought back (the same as the plan's
                // when none changed, as in a quiet flock).
                let after = if self.reports_changed {
                    self.reconcile(&intent)
                } else {
                    plan
                };
                self.status
                    .send_replace(Some(status_pb(&after, generation, &self.me, self.term)));
            }
            tokio::select! {
                _ = over.cancelled() => {}
                _ = tokio::time::sleep(ROUND) => {}
                c = changes.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = c {
                        tokio::time::sleep(ROUND).await;
                    }
                }
            }
        }
        if refused {
            warn!(
                term = self.term,
                "a dean has seen a newer term: this proctor stops"
            );
        }
    }

    /// The plan for `intent` from the deans' last reports.
    fn reconcile(&self, intent: &Intent) -> Plan {
        let nodes: Vec<Node> = self.reports.values().map(node_of).collect();
        let obs: Vec<Observed> = self.reports.values().map(observed).collect();
        crux_proctor::reconcile(intent, &nodes, &obs)
    }

    /// A call to `netid` failed: the next waits a round, then doubling rounds, up to 8 s.
    fn failed(&mut self, netid: SocketAddr) {
        let fails = self.backoff.get(&netid).map_or(0, |(n, _)| *n) + 1;
        let wait = (ROUND * 2u32.pow(fails.min(5) - 1)).min(Duration::from_secs(8));
        self.backoff
            .insert(netid, (fails, tokio::time::Instant::now() + wait));
    }

    /// Live members: node id and node gRPC NetID.
    fn live(&self) -> Vec<(String, SocketAddr)> {
        let snap = self.flock.borrow().clone();
        snap.live_members()
            .map(|m| {
                (
                    node_name(m.id),
                    SocketAddr::new(m.addr.ip(), self.grpc_port),
                )
            })
            .collect()
    }

    /// Syncs the live nodes that are due (every one when `plan` is None: observe only);
    /// records their reports. True when a dean refused the term.
    async fn round(
        &mut self,
        live: &[(String, SocketAddr)],
        plan: Option<&Plan>,
        generation: u64,
    ) -> bool {
        let local_ip: IpAddr = self.flock.borrow().addr.ip();
        let now = tokio::time::Instant::now();
        let quiet = quiet_period(live.len());
        let mut calls = JoinSet::new();
        for (id, netid) in live {
            let assign: Vec<pb::Unit> = plan
                .and_then(|p| p.assign.get(id))
                .map(|s| s.iter().map(unit_pb).collect())
                .unwrap_or_default();
            if plan.is_some()
                && !due(
                    self.synced.get(id),
                    self.reports.get(id),
                    &assign,
                    now,
                    quiet,
                )
            {
                continue;
            }
            let taken = plan.map(|_| assign.clone());
            let req = pb::SyncRequest {
                leader: self.me.clone(),
                term: self.term,
                generation,
                observe_only: plan.is_none(),
                assign,
            };
            if *id == self.me {
                let r = self.dean.sync(req);
                calls.spawn(async move { (None, taken, r) });
                continue;
            }
            if self.backoff.get(netid).is_some_and(|(_, next)| *next > now) {
                continue;
            }
            let channel = match self.channels.get(netid) {
                Some(c) => c.clone(),
                None => {
                    match self
                        .transport
                        .channel(*netid, Some(local_ip), CALL_TIMEOUT)
                        .await
                    {
                        Ok(c) => {
                            self.channels.insert(*netid, c.clone());
                            c
                        }
                        Err(e) => {
                            debug!(node = %id, %netid, error = %e, "dean unreachable");
                            self.failed(*netid);
                            continue;
                        }
                    }
                }
            };
            let netid = *netid;
            calls.spawn(async move {
                let mut c = pb::dean_client::DeanClient::new(channel);
                let mut r = Request::new(req);
                r.set_timeout(CALL_TIMEOUT);
                (
                    Some(netid),
                    taken,
                    c.sync(r).await.map(Response::into_inner),
                )
            });
        }
        let mut refused = false;
        while let Some(r) = calls.join_next().await {
            match r {
                Ok((netid, taken, Ok(report))) => {
                    if let Some(n) = netid {
                        self.backoff.remove(&n);
                    }
                    match taken {
                        Some(assign) => {
                            let at = tokio::time::Instant::now();
                            self.synced
                                .insert(report.node.clone(), Synced { assign, at });
                        }
                        // An observing call took no assignment: the next round calls it.
                        None => {
                            self.synced.remove(&report.node);
                        }
                    }
                    if self.reports.get(&report.node) != Some(&report) {
                        self.reports_changed = true;
                        self.reports.insert(report.node.clone(), report);
                    }
                }
                Ok((_, _, Err(s))) if s.code() == tonic::Code::FailedPrecondition => {
                    warn!(error = %s.message(), "dean refused the assignment");
                    refused = true;
                }
                Ok((netid, _, Err(s))) => {
                    debug!(error = %s, "dean call failed");
                    if let Some(n) = netid {
                        self.failed(n);
                    }
                }
                Err(e) => debug!(error = %e, "dean call task failed"),
            }
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(inst: &str) -> pb::Unit {
        pb::Unit {
            horde: String::new(),
            api: "a".into(),
            inst: inst.into(),
            artifact: "sha256:00".into(),
            function: "f".into(),
        }
    }

    fn report(states: &[(&str, &str)]) -> pb::SyncResponse {
        pb::SyncResponse {
            node: "n1".into(),
            units: states
                .iter()
                .map(|(inst, state)| pb::UnitReport {
                    unit: Some(unit(inst)),
                    state: (*state).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn quiet_nodes_cost_a_bounded_number_of_calls_a_second() {
        assert_eq!(quiet_period(1), ROUND);
        assert_eq!(quiet_period(5), ROUND);
        assert_eq!(quiet_period(100), ROUND);
        assert_eq!(quiet_period(1_000), Duration::from_secs(5));
        assert_eq!(quiet_period(5_000), Duration::from_secs(25));
        for live in [1usize, 10, 100, 150, 1_000, 4_321, 10_000] {
            let per_sec = live as f64 / quiet_period(live).as_secs_f64();
            assert!(
                per_sec <= f64::from(QUIET_SYNCS_PER_SEC) + 1e-6 || quiet_period(live) == ROUND,
                "{live} nodes: {per_sec} calls/s"
            );
        }
    }

    #[test]
    fn a_node_is_due_while_its_assignment_or_its_units_change_and_else_after_the_quiet_period() {
        let t0 = tokio::time::Instant::now();
        let quiet = Duration::from_secs(5);
        let assign = vec![unit("a_1")];
        let last = Synced {
            assign: assign.clone(),
            at: t0,
        };
        let settled = report(&[("a_1", "healthy"), ("a_0", "failed")]);
        // Never answered, or no assignment taken yet.
        assert!(due(None, None, &assign, t0, quiet));
        assert!(due(None, Some(&settled), &assign, t0, quiet));
        assert!(due(Some(&last), None, &assign, t0, quiet));
        // Quiet: same assignment, every unit healthy or failed.
        assert!(!due(Some(&last), Some(&settled), &assign, t0, quiet));
        assert!(!due(
            Some(&last),
            Some(&settled),
            &assign,
            t0 + Duration::from_secs(4),
            quiet
        ));
        assert!(due(Some(&last), Some(&settled), &assign, t0 + quiet, quiet));
        // A new assignment, or a unit in flux.
        assert!(due(Some(&last), Some(&settled), &[unit("a_2")], t0, quiet));
        assert!(due(Some(&last), Some(&settled), &[], t0, quiet));
        for state in ["pending", "stopping"] {
            let busy = report(&[("a_1", "healthy"), ("a_2", state)]);
            assert!(due(Some(&last), Some(&busy), &assign, t0, quiet), "{state}");
        }
    }
}
