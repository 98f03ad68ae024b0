//! The bootstrap table: the steps that bring a node up, in the seed's order, each with the steps
//! it needs and what "ready" means for it, run one after the other into one owned set of tasks.
//!
//! | # | step     | after           | ready when                                            |
//! |---|----------|-----------------|-------------------------------------------------------|
//! | 1 | flock    | —               | a leader is known (this node's own, if alone)         |
//! | 2 | reeve    | flock           | the local socket serves; the steward link runs        |
//! | 3 | steward  | reeve           | the node gRPC port serves; the steward on the leader  |
//! | 4 | store    | steward         | it takes writes: a Raft leader's first entry committed |
//! | 5 | picket   | reeve           | the plugins a previous agent left are re-adopted      |
//! | 6 | proctor  | store, picket   | the dean runs; the proctor runs on the leader         |
//! | 7 | pastiche | steward, picket | holdings announced; the built-in pastiche1 runs       |
//! | 8 | catalyst | reeve           | topics open (standalone) or NATS connected             |
//! | 9 | fuse     | store           | the routes are read; ADS serves on `fuse.ads_bind`    |
//!
//! The order is the seed's (`002_…`, "Bootstrapping"): flocking, the heartbeater and the reeve
//! (with the steward), picket, then the proctor, through which the built-ins such as pastiche
//! come. The store comes between the steward and the proctor because placement keeps its intent
//! there; picket before the proctor because the dean drives picket.
//!
//! Every task a step starts goes into one [`Tasks`] set under the step's name: none is detached,
//! one that ends while the agent runs is reported as `step/task`, and at shutdown the steps are
//! stopped in reverse order, each waited for (within one overall bound) before the one before it.
//! A step that fails is reported by name, and what the steps before it started is stopped the
//! same way. Each step's readiness (phase, since when, detail) is in [`AgentState::steps`], for
//! `/ready?verbose` and `crux status`.
//!
//! A step is *done* once its work is started; it *serves* once its readiness says
//! [`Phase::Ready`]. The table runs on as each step is done (the proctor needs the store's handle,
//! not a store that takes writes already), while the agent reports ready only once every step
//! serves: the store's supervision starts in step 4, and its readiness turns ready when a Raft
//! leader has committed an entry of its term that this node applied, i.e. when a write through
//! this node would be accepted ("no quorum possible: 1 of 3 voters reachable" says why not).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use crux_flock::driver::DriverHandle;
use crux_placement::{BuiltinProc, PlacementLocal};
use crux_proto::grpc::proctor::v1 as ppb;
use crux_service::{FlockWatch, Phase, ReadySender, Service};
use crux_steward::StewardConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::state::AgentState;

/// One row of the bootstrap table.
#[derive(Clone, Copy, Debug)]
pub struct StepDef {
    /// The step's name (`/ready`, `crux status`, logs, task names).
    pub name: &'static str,
    /// The steps that must be done before this one starts.
    pub after: &'static [&'static str],
    /// What the step's readiness means.
    pub ready_when: &'static str,
    run: StepFn,
}

/// A step: runs on what earlier steps made, starts its tasks, and returns what it did once it
/// is ready (`None`: a shutdown came first).
type StepFn = for<'a> fn(&'a mut Boot) -> StepFuture<'a>;
type StepFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Option<String>>> + Send + 'a>>;

/// How many steps the table has.
const STEP_COUNT: usize = 9;

/// The table, in the order the steps run.
pub const TABLE: [StepDef; STEP_COUNT] = [
    StepDef {
        name: "flock",
        after: &[],
        ready_when: "a leader is known (this node's own, if alone)",
        run: |b| Box::pin(flock(b)),
    },
    StepDef {
        name: "reeve",
        after: &["flock"],
        ready_when: "the local socket serves and the link to the steward runs",
        run: |b| Box::pin(reeve(b)),
    },
    StepDef {
        name: "steward",
        after: &["reeve"],
        ready_when: "the node gRPC port serves; the steward runs on the leader",
        run: |b| Box::pin(steward(b)),
    },
    StepDef {
        name: "store",
        after: &["steward"],
        ready_when:
            "the store takes writes: a Raft leader's first entry is committed and applied here",
        run: |b| Box::pin(store(b)),
    },
    StepDef {
        name: "picket",
        after: &["reeve"],
        ready_when: "the plugins a previous agent left running are re-adopted",
        run: |b| Box::pin(picket(b)),
    },
    StepDef {
        name: "proctor",
        after: &["store", "picket"],
        ready_when: "the dean runs; the proctor runs on the leader",
        run: |b| Box::pin(proctor(b)),
    },
    StepDef {
        name: "pastiche",
        after: &["steward", "picket"],
        ready_when: "this node's holdings are announced and the built-in pastiche1 runs",
        run: |b| Box::pin(pastiche(b)),
    },
    StepDef {
        name: "catalyst",
        after: &["reeve"],
        ready_when: "its topics are open (standalone) or its NATS server is connected",
        run: |b| Box::pin(crate::catalyst::step(b, "catalyst")),
    },
    StepDef {
        name: "fuse",
        after: &["store"],
        ready_when: "the routes are read from the store; ADS serves (when fuse.enabled)",
        run: |b| Box::pin(crate::fuse::step(b)),
    },
];

/// Each step's name and the steps it needs, in order.
pub fn rows() -> Vec<(&'static str, &'static [&'static str])> {
    TABLE.iter().map(|d| (d.name, d.after)).collect()
}

/// What the steps run on and hand to each other.
pub struct Boot {
    /// What the servers share (flock handle, settings, reeve, store, transport, step progress).
    pub state: Arc<AgentState>,
    /// The flock driver.
    pub handle: DriverHandle,
    /// The checked config.
    pub settings: Settings,
    /// Cancelled by a signal (or a revocation): the bootstrap gives up waiting.
    pub stop: CancellationToken,
    /// Every task started so far.
    pub tasks: Tasks,
    /// The flock as the services see it.
    pub view: FlockWatch,
    /// The node gRPC listener, bound before the node joined (served from step steward).
    pub grpc: Option<TcpListener>,
    /// This node's pastiche store, opened before the node joined.
    pub pastiche: crux_pastiche::store::Store,
    /// The runner of plugins, once step picket opened it.
    pub picket: Option<crux_picket::runner::Picket>,
    /// The bus the local API serves, once step catalyst made it.
    pub catalyst: watch::Sender<Option<crux_catalyst::Bus>>,
    /// SIGHUP, caught since the start; step reeve starts reloading on it.
    pub hup: Option<tokio::signal::unix::Signal>,
    made: Made,
}

type StatusTx = watch::Sender<Option<ppb::StatusResponse>>;
type StatusRx = watch::Receiver<Option<ppb::StatusResponse>>;

/// Handles one step makes for a later one.
#[derive(Default)]
struct Made {
    netid: Option<SocketAddr>,
    puller: Option<crux_pastiche::pull::Puller>,
    importer: Option<crux_pastiche::import::Importer>,
    placement: Option<watch::Sender<Option<PlacementLocal>>>,
    dean: Option<watch::Sender<Option<Arc<crux_placement::Dean>>>>,
    status: Option<(StatusTx, StatusRx)>,
    builtins: Option<watch::Sender<Vec<BuiltinProc>>>,
}

impl Boot {
    /// Ready to run the table.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<AgentState>,
        handle: DriverHandle,
        settings: Settings,
        stop: CancellationToken,
        tasks: Tasks,
        view: FlockWatch,
        grpc: TcpListener,
        pastiche: crux_pastiche::store::Store,
    ) -> Boot {
        Boot {
            state,
            handle,
            settings,
            stop,
            tasks,
            view,
            grpc: Some(grpc),
            pastiche,
            picket: None,
            catalyst: watch::Sender::new(None),
            hup: None,
            made: Made::default(),
        }
    }

    /// The token a task of `step` watches: cancelled when shutdown reaches that step.
    pub(crate) fn token(&mut self, step: &'static str) -> CancellationToken {
        self.tasks.token(step)
    }

    /// Spawns a started service's tasks under `step`; the step's readiness is the service's.
    pub fn adopt(&mut self, step: &'static str, mut service: Service) {
        for (name, task) in service.take_tasks() {
            self.tasks.spawn(step, name, task);
        }
        self.state.step_readiness(step, service.ready());
    }
}

/// Runs the table. `Ok(true)`: every step is done; `Ok(false)`: a shutdown came first;
/// `Err`: the step named in the error failed.
/// `first_began`: when the work of the first step began (the flock's, before the table runs).
pub async fn run(b: &mut Boot, first_began: Instant) -> anyhow::Result<bool> {
    for (i, def) in TABLE.iter().enumerate() {
        let n = i + 1;
        if b.stop.is_cancelled() {
            return Ok(false);
        }
        let began = if i == 0 { first_began } else { Instant::now() };
        let ready = ReadySender::new(Phase::Starting, def.ready_when);
        b.state.step_readiness(def.name, ready.watch());
        match (def.run)(b).await {
            Ok(Some(detail)) => {
                ready.set(Phase::Ready, detail.clone());
                let elapsed = began.elapsed();
                b.state.step_done(def.name, elapsed, &detail);
                info!(
                    step = n,
                    name = def.name,
                    elapsed_ms = elapsed.as_millis() as u64,
                    since_start_ms = b.state.uptime().as_millis() as u64,
                    "bootstrap step {n}/{} {} done in {elapsed:.1?}: {detail}",
                    TABLE.len(),
                    def.name,
                );
            }
            Ok(None) => return Ok(false),
            Err(e) => {
                ready.set(Phase::Failed, format!("{e:#}"));
                b.state.step_readiness(def.name, ready.watch());
                error!(step = n, name = def.name, error = %format!("{e:#}"),
                    "bootstrap step {n}/{} {} failed", TABLE.len(), def.name);
                return Err(e.context(format!("bootstrap step {} failed", def.name)));
            }
        }
    }
    Ok(true)
}

/// Step 1, flock: the driver runs (started before the table); done once a leader is known.
async fn flock(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let mut watch = b.handle.watch();
    let mut waited = Duration::ZERO;
    loop {
        let snap = watch.borrow_and_update().clone();
        if let Some(l) = snap.leader {
            return Ok(Some(format!(
                "node {} at {}, {} live member(s), leader {} term {}",
                snap.identity.id, snap.identity.addr, snap.live, l.id, l.term
            )));
        }
        tokio::select! {
            biased;
            _ = b.stop.cancelled() => return Ok(None),
            r = watch.changed() => if r.is_err() {
                // The driver ends only after a shutdown (which may have won the race to here).
                if b.stop.is_cancelled() {
                    return Ok(None);
                }
                bail!("flock driver stopped during bootstrap")
            },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                waited += Duration::from_secs(5);
                info!(
                    waited = ?waited,
                    live = snap.live,
                    "bootstrap step 1/{STEP_COUNT} flock: waiting for a leader"
                );
            }
        }
    }
}

/// Step 2, reeve: the heartbeater and the registry replica, linked to the steward; the local
/// socket.
async fn reeve(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let stop = b.token("reeve");
    let reeve = b.state.reeve.clone();
    b.tasks.spawn(
        "reeve",
        "steward link",
        crux_reeve::link::run(reeve.clone(), stop.clone()),
    );
    let puller = crux_pastiche::pull::Puller::new(b.pastiche.clone(), reeve.clone());
    let importer = crux_pastiche::import::Importer::new(
        b.pastiche.clone(),
        b.settings.pastiche_s3.clone(),
        b.settings.pastiche_import_rate,
    );
    let cache = crux_pastiche::cache::CacheService::new(
        b.pastiche.clone(),
        puller.clone(),
        importer.clone(),
        reeve.clone(),
    );
    let listener = crate::rpc::bind(&b.settings.socket).await?;
    let (placement_tx, placement_rx) = watch::channel(None);
    let catalyst = b.catalyst.subscribe();
    let local = crate::rpc::serve(
        listener,
        b.state.clone(),
        cache,
        placement_rx,
        catalyst,
        stop.clone(),
    );
    b.tasks.spawn("reeve", "local API", async move {
        if let Err(e) = local.await {
            warn!(error = %e, "local API server ended");
        }
    });
    b.made.puller = Some(puller);
    b.made.importer = Some(importer);
    b.made.placement = Some(placement_tx);
    let (dns, supervisor) = crate::dns::start(
        b.state.reeve.clone(),
        b.view.clone(),
        b.state.dns.clone(),
        b.settings.dns.clone(),
        b.tasks.token("reeve"),
    )
    .await;
    b.state.ops.set_dns(dns);
    b.tasks.spawn("reeve", "dns", supervisor);
    b.tasks.spawn(
        "reeve",
        "log filter reverts",
        b.state.ops.logs().clone().run_reverts(stop.clone()),
    );
    if let Some(hup) = b.hup.take() {
        b.tasks.spawn(
            "reeve",
            "reload on SIGHUP",
            crate::ops::on_sighup(hup, b.state.ops.clone(), stop.clone()),
        );
    }
    Ok(Some(format!(
        "local API on {} (mode 0660); registry replica and steward link running, heartbeat \
         interval {:?}",
        b.settings.socket.display(),
        b.settings.registry.heartbeat_interval
    )))
}

/// Step 3, steward: the node gRPC port, and the steward while this node leads.
async fn steward(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let stop = b.token("steward");
    let settings = &b.settings;
    let (current_tx, current_rx) = watch::channel(None);
    let snap = b.handle.snapshot();
    let netid = SocketAddr::new(snap.identity.addr.ip(), settings.grpc_port);
    b.tasks.spawn(
        "steward",
        "steward",
        crate::steward::supervise(
            b.handle.clone(),
            netid,
            b.state.reeve.clone(),
            StewardConfig {
                grace: settings.registry.grace,
                seed_valid: settings.registry.heartbeat_interval * 5,
                ..StewardConfig::default()
            },
            current_tx,
            stop.clone(),
        ),
    );
    let peer =
        crux_pastiche::serve::PeerService::new(b.pastiche.clone(), settings.pastiche_corrupt);
    if settings.pastiche_corrupt {
        warn!(
            "pastiche.corrupt_serving_for_tests is set: every piece this node serves is corrupted"
        );
    }
    let (dean_tx, dean_rx) = watch::channel(None);
    let (status_tx, status_rx) = watch::channel(None);
    let listener = b
        .grpc
        .take()
        .context("the node gRPC listener was taken already")?;
    let node_server = crate::steward::serve(
        listener,
        b.state.transport.clone(),
        current_rx,
        peer,
        b.state.store.service(),
        crux_placement::PlacementNode::new(dean_rx, status_rx.clone()),
        stop,
    );
    b.tasks.spawn("steward", "node gRPC", async move {
        if let Err(e) = node_server.await {
            warn!(error = %e, "node gRPC server ended");
        }
    });
    b.made.netid = Some(netid);
    b.made.dean = Some(dean_tx);
    b.made.status = Some((status_tx, status_rx));
    let leads = snap.leader.map(|l| l.id) == Some(snap.identity.id);
    Ok(Some(format!(
        "node gRPC on {netid}; the steward runs on the leader ({})",
        if leads {
            "this node, now"
        } else {
            "another node, now"
        }
    )))
}

/// Step 4, store: its voters and learners kept by the flock leader; a node outside the group
/// learns its leader. Done once that runs; it serves once the store takes writes.
async fn store(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let stop = b.token("store");
    let service = crux_store::supervise::start(crux_store::supervise::Supervision {
        store: b.state.store.clone(),
        flock: b.view.clone(),
        grpc_port: b.settings.grpc_port,
        grace: b.settings.store_voter_grace,
        every: Duration::from_secs(1),
        settle: Duration::from_secs(5),
        stop,
    });
    let now = service.ready().get().detail;
    b.adopt("store", service);
    Ok(Some(format!(
        "supervision running (voters kept by the flock leader, grace {:?}); serves once it takes \
         writes (now: {now})",
        b.settings.store_voter_grace
    )))
}

/// Step 5, picket: re-adopts the plugins a previous agent left running.
async fn picket(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let settings = &b.settings;
    let netid = b.made.netid.context("step steward made no NetID")?;
    let dir = settings.data_dir.join("picket");
    let picket = crux_picket::runner::Picket::open(crux_picket::runner::PicketConfig {
        dir: dir.clone(),
        reeve_socket: settings.socket.clone(),
        node_ip: netid.ip(),
        grace: settings.picket.stop_grace,
        handshake_timeout: Duration::from_secs(10),
        backoff_min: settings.picket.backoff,
        backoff_max: Duration::from_secs(30),
        crash_loop: settings.picket.crash_loop,
        stable: Duration::from_secs(10),
    })
    .await
    .with_context(|| format!("opening picket in {}", dir.display()))?;
    let adopted = picket.units().len();
    b.picket = Some(picket);
    Ok(Some(format!("{adopted} plugin(s) re-adopted")))
}

/// Step 6, proctor: the dean here, the proctor while this node leads, the local placement API.
async fn proctor(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let stop = b.token("proctor");
    let settings = &b.settings;
    let netid = b.made.netid.context("step steward made no NetID")?;
    let picket = b.picket.clone().context("step picket made no picket")?;
    let puller = b.made.puller.clone().context("step reeve made no puller")?;
    let (status_tx, status_rx) = b
        .made
        .status
        .take()
        .context("step steward made no status")?;
    let dir = settings.data_dir.join("picket");
    let started = crux_placement::start(crux_placement::Placement {
        dean: crux_placement::DeanParts {
            node: b.handle.snapshot().identity.id.to_string(),
            attributes: crux_placement::dean::attributes(
                netid.ip(),
                &b.state.ops.config_attributes(),
            ),
            picket,
            pastiche: b.pastiche.clone(),
            puller,
            store: b.state.store.clone(),
            dir: dir.clone(),
            failed_hold: settings.picket.failed_hold,
        },
        flock: b.view.clone(),
        transport: b.state.transport.clone(),
        grpc_port: settings.grpc_port,
        status: status_tx,
        stop,
    })
    .with_context(|| format!("making the dean's directory in {}", dir.display()))?;
    let (builtins_tx, builtins_rx) = watch::channel(Vec::new());
    let local = PlacementLocal::new(
        crux_placement::LocalParts {
            store: b.state.store.clone(),
            reeve: b.state.reeve.clone(),
            flock: b.view.clone(),
            transport: b.state.transport.clone(),
            grpc_port: settings.grpc_port,
        },
        started.dean.clone(),
        status_rx,
        builtins_rx,
    );
    b.state.ops.set_dean(started.dean.clone());
    if let Some(d) = &b.made.dean {
        d.send_replace(Some(started.dean));
    }
    if let Some(p) = &b.made.placement {
        p.send_replace(Some(local));
    }
    b.made.builtins = Some(builtins_tx);
    let detail = started.service.ready().get().detail;
    b.adopt("proctor", started.service);
    Ok(Some(detail))
}

/// Step 7, pastiche: keeps the steward told what this node holds; the built-in pastiche1, run
/// by picket's built-in supervision.
async fn pastiche(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let stop = b.token("pastiche");
    let netid = b.made.netid.context("step steward made no NetID")?;
    let puller = b.made.puller.clone().context("step reeve made no puller")?;
    b.tasks.spawn(
        "pastiche",
        "announce",
        crux_pastiche::cache::announce(
            b.pastiche.clone(),
            puller,
            b.state.reeve.clone(),
            Duration::from_secs(1),
            stop.clone(),
        ),
    );
    let (proc, task) = crate::pastiche::builtin(
        &b.state.reeve,
        netid,
        b.settings.registry.heartbeat_interval,
        stop,
    );
    b.tasks.spawn("pastiche", "pastiche1", task);
    if let Some(tx) = &b.made.builtins {
        tx.send_replace(vec![proc]);
    }
    Ok(Some(format!(
        "built-in pastiche1 running ({} of {} bytes used in {})",
        b.pastiche.used_bytes(),
        b.pastiche.max_bytes(),
        b.settings.pastiche_dir.display()
    )))
}

/// Every task the agent starts, owned by step and name: none is dropped, one that ends while the
/// agent runs is reported by name, and shutdown stops the steps in reverse order and waits for
/// each (bounded).
#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, (&'static str, &'static str)>,
    handles: HashMap<Id, AbortHandle>,
    /// Each step's token, in the order the steps first asked for one.
    steps: Vec<(&'static str, CancellationToken)>,
}

/// How a task ended: step, task name, and the join result.
pub type Ended = (&'static str, &'static str, Result<(), JoinError>);

impl Tasks {
    /// The token the tasks of `step` watch (made on first use).
    pub fn token(&mut self, step: &'static str) -> CancellationToken {
        if let Some((_, t)) = self.steps.iter().find(|(s, _)| *s == step) {
            return t.clone();
        }
        let t = CancellationToken::new();
        self.steps.push((step, t.clone()));
        t
    }

    /// Spawns `task` as `step/name`.
    pub fn spawn(
        &mut self,
        step: &'static str,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        if !self.steps.iter().any(|(s, _)| *s == step) {
            self.token(step);
        }
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), (step, name));
        self.handles.insert(handle.id(), handle);
    }

    /// The next task to end, with how it ended (pending forever when none runs).
    pub async fn next_ended(&mut self) -> Ended {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => {
                self.handles.remove(&id);
                let (step, name) = self.names.remove(&id).unwrap_or(("?", "?"));
                (step, name, Ok(()))
            }
            Some(Err(e)) => {
                self.handles.remove(&e.id());
                let (step, name) = self.names.remove(&e.id()).unwrap_or(("?", "?"));
                (step, name, Err(e))
            }
            None => std::future::pending().await,
        }
    }

    /// The steps with tasks or a token, last started first.
    #[cfg(test)]
    fn steps_reversed(&self) -> Vec<&'static str> {
        self.steps.iter().rev().map(|(s, _)| *s).collect()
    }

    /// Stops `step`: cancels its token and waits until its tasks have ended, or `deadline`
    /// (then they are aborted). Tasks of other steps that end meanwhile are logged.
    pub async fn stop_step(&mut self, step: &'static str, deadline: Instant) {
        if let Some((_, t)) = self.steps.iter().find(|(s, _)| *s == step) {
            t.cancel();
        }
        while self.names.values().any(|(s, _)| *s == step) {
            match tokio::time::timeout_at(deadline, self.next_ended()).await {
                Ok((s, name, Err(e))) if e.is_panic() => {
                    warn!(step = s, task = name, "task panicked")
                }
                Ok(_) => {}
                Err(_) => {
                    let left: Vec<String> = self
                        .names
                        .values()
                        .filter(|(s, _)| *s == step)
                        .map(|(s, n)| format!("{s}/{n}"))
                        .collect();
                    warn!(tasks = ?left, "tasks still running at shutdown: aborted");
                    let ids: Vec<Id> = self
                        .names
                        .iter()
                        .filter(|(_, (s, _))| *s == step)
                        .map(|(id, _)| *id)
                        .collect();
                    self.abort(&ids).await;
                    return;
                }
            }
        }
    }

    /// Aborts the tasks `ids` and waits for them to end.
    async fn abort(&mut self, ids: &[Id]) {
        for id in ids {
            if let Some(h) = self.handles.get(id) {
                h.abort();
            }
        }
        while ids.iter().any(|id| self.names.contains_key(id)) {
            let _ = self.next_ended().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_comes_after_the_steps_it_needs() {
        for (i, def) in TABLE.iter().enumerate() {
            for dep in def.after {
                let at = TABLE.iter().position(|d| d.name == *dep);
                assert!(
                    at.is_some_and(|at| at < i),
                    "step {} needs {dep}, which does not run before it",
                    def.name
                );
            }
        }
        let names: Vec<_> = TABLE.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "flock", "reeve", "steward", "store", "picket", "proctor", "pastiche", "catalyst",
                "fuse"
            ]
        );
    }

    #[tokio::test]
    async fn shutdown_stops_the_steps_in_reverse_order_and_owns_every_task() {
        let mut tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for step in ["a", "b", "c"] {
            let t = tasks.token(step);
            let tx = tx.clone();
            tasks.spawn(step, "wait", async move {
                t.cancelled().await;
                let _ = tx.send(step);
            });
        }
        drop(tx);
        assert_eq!(tasks.steps_reversed(), ["c", "b", "a"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        for step in tasks.steps_reversed() {
            tasks.stop_step(step, deadline).await;
        }
        let mut order = Vec::new();
        while let Some(s) = rx.recv().await {
            order.push(s);
        }
        assert_eq!(order, ["c", "b", "a"]);
        assert!(tasks.names.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_does_not_stop_is_aborted_at_the_deadline() {
        let mut tasks = Tasks::default();
        tasks.spawn("a", "stuck", std::future::pending());
        let t = tasks.token("b");
        tasks.spawn("b", "polite", async move { t.cancelled().await });
        let deadline = Instant::now() + Duration::from_secs(2);
        tasks.stop_step("a", deadline).await;
        tasks.stop_step("b", deadline).await;
        assert!(tasks.names.is_empty());
    }
}
