//! The dean: this node's side of placement. The leader's proctor tells it, level-triggered, the
//! whole set of units this node should run (tagged with the leader's term: an older term is
//! refused); the dean makes picket run exactly those. For each unit it checks that a muster entry
//! names the artifact and function (nothing else may name an executable), fetches the artifact
//! through pastiche (pinned while assigned), copies it to an executable file and starts it; it
//! stops what is no longer assigned. A unit that crash-loops is reported `failed` and held for
//! `failed_hold` (doubling on each new failure) before this node tries it again, so that the
//! proctor places it elsewhere meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_pastiche::digest::Digest;
use crux_pastiche::pull::Puller;
use crux_picket::runner::{Picket, UnitState as PicketState, UnitStatus};
use crux_picket::UnitSpec;
use crux_proctor::Unit;
use crux_proto::grpc::proctor::v1 as pb;
use crux_store::{MusterEntry, Query, QueryResult};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

/// A job a round of the dean starts (preparing or stopping a unit), run by [`Dean::run`].
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// Longest hold of a unit that failed on this node.
const FAILED_HOLD_MAX: Duration = Duration::from_secs(600);

/// This node's dean.
pub struct Dean {
    node: String,
    /// Changed by a config reload ([`Dean::set_attributes`]); reported on every sync.
    attributes: Mutex<BTreeMap<String, String>>,
    picket: Picket,
    pastiche: crux_pastiche::store::Store,
    puller: Puller,
    store: crux_store::Store,
    bin_dir: PathBuf,
    term_file: PathBuf,
    failed_hold: Duration,
    state: Mutex<State>,
    wake: Notify,
}

/// A unit that failed here, held off for a while.
struct Held {
    until: Instant,
    detail: String,
}

#[derive(Default)]
struct State {
    /// The newest term accepted.
    term: u64,
    /// The generation of the newest assignment.
    generation: u64,
    /// What the proctor assigned; `None` until its first assignment since the agent started
    /// (meanwhile re-adopted plugins keep running).
    assigned: Option<BTreeSet<Unit>>,
    /// Units that failed here, until when they are held.
    held: BTreeMap<Unit, Held>,
    /// How long the next hold of a unit is.
    next_hold: HashMap<Unit, Duration>,
    /// Units being prepared (muster check, fetch, copy), with what is happening.
    preparing: BTreeMap<Unit, String>,
    /// Picket keys being stopped.
    stopping: HashSet<String>,
    /// Artifacts this dean pinned in pastiche.
    pinned: BTreeSet<String>,
}

/// The picket key of a unit: unique per (horde, api, inst, artifact, function).
pub fn unit_key(u: &Unit) -> String {
    let hex = u.artifact.strip_prefix("sha256:").unwrap_or(&u.artifact);
    format!(
        "{}.{}.{}.{}.{}",
        u.horde,
        u.api,
        u.inst,
        &hex[..hex.len().min(16)],
        u.function
    )
}

/// The unit a picket unit runs.
pub fn unit_of(spec: &UnitSpec) -> Unit {
    Unit {
        horde: spec.horde.clone(),
        api: spec.api.clone(),
        inst: spec.inst.clone(),
        artifact: spec.digest.clone(),
        function: spec.function.clone(),
    }
}

/// A unit as the wire carries it.
pub fn unit_pb(u: &Unit) -> pb::Unit {
    pb::Unit {
        horde: u.horde.clone(),
        api: u.api.clone(),
        inst: u.inst.clone(),
        artifact: u.artifact.clone(),
        function: u.function.clone(),
    }
}

/// A unit from the wire.
pub fn unit_from_pb(u: pb::Unit) -> Unit {
    Unit {
        horde: u.horde,
        api: u.api,
        inst: u.inst,
        artifact: u.artifact,
        function: u.function,
    }
}

/// How picket's state reads in a report: `pending`, `healthy`, `failed` or `stopping`.
fn report_state(s: &PicketState) -> &'static str {
    match s {
        PicketState::Healthy => "healthy",
        PicketState::Failed => "failed",
        PicketState::Stopping => "stopping",
        PicketState::Starting | PicketState::Unhealthy | PicketState::Backoff => "pending",
    }
}

/// The node's attributes: the built-ins (`host`: the flock IP, `os`, `arch`, `cpus`, `mem_gb`)
/// overlaid with the config's `[node.attributes]`, each as TOML text.
pub fn attributes(
    host: std::net::IpAddr,
    config: &BTreeMap<String, toml::Value>,
) -> BTreeMap<String, String> {
    let mut a = BTreeMap::new();
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    a.insert("host".to_string(), quote(&host.to_string()));
    a.insert("os".to_string(), quote(std::env::consts::OS));
    a.insert("arch".to_string(), quote(std::env::consts::ARCH));
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    a.insert("cpus".to_string(), cpus.to_string());
    if let Some(kib) = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    }) {
        a.insert("mem_gb".to_string(), (kib >> 20).to_string());
    }
    for (k, v) in config {
        a.insert(k.clone(), v.to_string());
    }
    a
}

/// What the dean is built from.
pub struct DeanParts {
    /// This node's id.
    pub node: String,
    /// Its attributes (see [`attributes`]).
    pub attributes: BTreeMap<String, String>,
    /// The service runner.
    pub picket: Picket,
    /// The node's pastiche store and puller.
    pub pastiche: crux_pastiche::store::Store,
    /// Pulls artifacts from peers.
    pub puller: Puller,
    /// The durable store (muster entries).
    pub store: crux_store::Store,
    /// Where executables and the dean's term are kept (`<data_dir>/picket`).
    pub dir: PathBuf,
    /// How long a failed unit is held off on this node at first.
    pub failed_hold: Duration,
}

impl Dean {
    /// A dean; it acts once [`Dean::run`] runs.
    pub fn new(p: DeanParts) -> std::io::Result<Arc<Dean>> {
        let bin_dir = p.dir.join("bin");
        std::fs::create_dir_all(&bin_dir)?;
        let term_file = p.dir.join("dean-term");
        let term = std::fs::read_to_string(&term_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        Ok(Arc::new(Dean {
            node: p.node,
            attributes: Mutex::new(p.attributes),
            picket: p.picket,
            pastiche: p.pastiche,
            puller: p.puller,
            store: p.store,
            bin_dir,
            term_file,
            failed_hold: p.failed_hold,
            state: Mutex::new(State {
                term,
                ..State::default()
            }),
            wake: Notify::new(),
        }))
    }

    /// This node's attributes as the proctor sees them (see [`attributes`]).
    pub fn attributes(&self) -> BTreeMap<String, String> {
        self.attributes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces this node's attributes (a config reload); the proctor gets them at its next
    /// sync and places by them from then on.
    pub fn set_attributes(&self, attributes: BTreeMap<String, String>) {
        *self.attributes.lock().unwrap_or_else(|e| e.into_inner()) = attributes;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The service runner.
    pub fn picket(&self) -> &Picket {
        &self.picket
    }

    /// The node's pastiche store.
    pub fn pastiche(&self) -> &crux_pastiche::store::Store {
        &self.pastiche
    }

    /// The proctor's call: takes the assignment (unless `observe_only`) and reports.
    pub fn sync(&self, req: pb::SyncRequest) -> Result<pb::SyncResponse, Status> {
        {
            let mut st = self.lock();
            if req.term < st.term {
                return Err(Status::failed_precondition(format!(
                    "assignment of term {} from {} refused: this dean has seen term {}",
                    req.term, req.leader, st.term
                )));
            }
            if req.term > st.term {
                st.term = req.term;
                if let Err(e) = write_atomic(&self.term_file, req.term.to_string().as_bytes()) {
                    warn!(error = %e, "cannot record the dean's term");
                }
            }
            if !req.observe_only {
                let new: BTreeSet<Unit> = req.assign.into_iter().map(unit_from_pb).collect();
                if st.assigned.as_ref() != Some(&new) {
                    info!(
                        term = req.term,
                        generation = req.generation,
                        units = new.len(),
                        "new assignment"
                    );
                    st.assigned = Some(new);
                    st.generation = req.generation;
                    self.wake.notify_one();
                }
            }
        }
        Ok(self.report())
    }

    /// What this node runs and holds, for the proctor.
    pub fn report(&self) -> pb::SyncResponse {
        let units = self.picket.units();
        let st = self.lock();
        let mut out: BTreeMap<Unit, pb::UnitReport> = BTreeMap::new();
        for u in &units {
            let unit = unit_of(&u.spec);
            let assigned = st.assigned.as_ref().is_none_or(|a| a.contains(&unit));
            let state = if assigned {
                report_state(&u.state)
            } else {
                "stopping"
            };
            out.insert(
                unit.clone(),
                pb::UnitReport {
                    unit: Some(unit_pb(&unit)),
                    state: state.into(),
                    detail: u.detail.clone(),
                    restarts: u.restarts,
                    pid: u.pid.unwrap_or(0),
                },
            );
        }
        for (unit, detail) in &st.preparing {
            out.entry(unit.clone()).or_insert_with(|| pb::UnitReport {
                unit: Some(unit_pb(unit)),
                state: "pending".into(),
                detail: detail.clone(),
                restarts: 0,
                pid: 0,
            });
        }
        for (unit, h) in &st.held {
            out.insert(
                unit.clone(),
                pb::UnitReport {
                    unit: Some(unit_pb(unit)),
                    state: "failed".into(),
                    detail: h.detail.clone(),
                    restarts: 0,
                    pid: 0,
                },
            );
        }
        if let Some(a) = &st.assigned {
            for unit in a {
                out.entry(unit.clone()).or_insert_with(|| pb::UnitReport {
                    unit: Some(unit_pb(unit)),
                    state: "pending".into(),
                    detail: "waiting to start".into(),
                    restarts: 0,
                    pid: 0,
                });
            }
        }
        pb::SyncResponse {
            node: self.node.clone(),
            units: out.into_values().collect(),
            attributes: self.attributes().into_iter().collect(),
            term: st.term,
        }
    }

    /// Carries out the assignment until `stop`: on every new assignment, picket change, and
    /// every second. The jobs a round starts (preparing a unit, stopping one) are this task's
    /// own: reaped as they end, and aborted when it returns.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changed = self.picket.changed();
        let mut jobs: JoinSet<()> = JoinSet::new();
        loop {
            for job in self.step() {
                jobs.spawn(job);
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.wake.notified() => {}
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    Some(_) = jobs.join_next() => continue,
                }
                break;
            }
        }
    }

    /// One round: holds expire, failed units are held and stopped, what is not assigned stops,
    /// what is assigned and not running is prepared and started.
    fn step(self: &Arc<Self>) -> Vec<Job> {
        let mut jobs = Vec::new();
        let now = Instant::now();
        let units = self.picket.units();
        let mut st = self.lock();
        st.held.retain(|_, h| h.until > now);
        // Crash loops: hold the unit off this node and stop what is left of it.
        for u in units.iter().filter(|u| u.state == PicketState::Failed) {
            let unit = unit_of(&u.spec);
            if st.held.contains_key(&unit) {
                continue;
            }
            let hold = st.next_hold.get(&unit).copied().unwrap_or(self.failed_hold);
            st.next_hold
                .insert(unit.clone(), (hold * 2).min(FAILED_HOLD_MAX));
            warn!(unit = %u.spec.key, restarts = u.restarts, ?hold, detail = %u.detail,
                "unit failed on this node: held off");
            st.held.insert(
                unit,
                Held {
                    until: now + hold,
                    detail: format!("failed after {} restarts: {}", u.restarts, u.detail),
                },
            );
            jobs.extend(self.stop_unit(&mut st, &u.spec.key));
        }
        let Some(assigned) = st.assigned.clone() else {
            return jobs;
        };
        let wanted: BTreeSet<&Unit> = assigned
            .iter()
            .filter(|u| !st.held.contains_key(*u))
            .collect();
        let running: HashMap<Unit, &UnitStatus> =
            units.iter().map(|u| (unit_of(&u.spec), u)).collect();
        for (unit, u) in &running {
            if !wanted.contains(unit) && u.state != PicketState::Failed {
                jobs.extend(self.stop_unit(&mut st, &u.spec.key));
            }
        }
        for unit in wanted {
            if running.contains_key(unit) || st.preparing.contains_key(unit) {
                continue;
            }
            st.preparing
                .insert(unit.clone(), "checking the muster entry".into());
            let me = self.clone();
            let unit = unit.clone();
            jobs.push(Box::pin(async move {
                let r = me.prepare(&unit).await;
                let failed = {
                    let mut st = me.lock();
                    match r {
                        Ok(exe) => {
                            st.preparing.remove(&unit);
                            let still = st.assigned.as_ref().is_some_and(|a| a.contains(&unit));
                            if still && !st.held.contains_key(&unit) {
                                me.picket.start(UnitSpec {
                                    key: unit_key(&unit),
                                    horde: unit.horde.clone(),
                                    api: unit.api.clone(),
                                    inst: unit.inst.clone(),
                                    function: unit.function.clone(),
                                    digest: unit.artifact.clone(),
                                    exe,
                                });
                            }
                            false
                        }
                        Err(e) => {
                            warn!(unit = %unit_key(&unit), error = %e, "cannot start unit");
                            st.preparing.insert(unit.clone(), e);
                            true
                        }
                    }
                };
                if failed {
                    // Tried again on a later round.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    me.lock().preparing.remove(&unit);
                    me.wake.notify_one();
                }
            }));
        }
        // Pins follow the assignment.
        let want_pins: BTreeSet<String> = assigned.iter().map(|u| u.artifact.clone()).collect();
        let old: Vec<String> = st.pinned.difference(&want_pins).cloned().collect();
        for a in old {
            if let Ok(d) = a.parse::<Digest>() {
                let _ = self.pastiche.unpin(&d);
            }
            st.pinned.remove(&a);
        }
        jobs
    }

    /// The job that stops picket unit `key`, unless one is under way.
    fn stop_unit(self: &Arc<Self>, st: &mut State, key: &str) -> Option<Job> {
        if !st.stopping.insert(key.to_string()) {
            return None;
        }
        let me = self.clone();
        let key = key.to_string();
        Some(Box::pin(async move {
            me.picket.stop(&key).await;
            me.lock().stopping.remove(&key);
            me.wake.notify_one();
        }))
    }

    /// Checks the muster entry, fetches and pins the artifact, and returns an executable copy.
    async fn prepare(&self, unit: &Unit) -> Result<PathBuf, String> {
        self.check_muster(unit).await?;
        let digest: Digest = unit
            .artifact
            .parse()
            .map_err(|e| format!("artifact {}: {e}", unit.artifact))?;
        self.lock()
            .preparing
            .insert(unit.clone(), format!("fetching {}", unit.artifact));
        self.puller
            .fetch(digest)
            .await
            .map_err(|e| format!("fetching {}: {e}", unit.artifact))?;
        if self.pastiche.pin(&digest).is_ok() {
            self.lock().pinned.insert(unit.artifact.clone());
        }
        let exe = self.bin_dir.join(digest.hex());
        if !exe.exists() {
            let pastiche = self.pastiche.clone();
            let path = exe.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                let mut src = pastiche.open_blob(&digest).map_err(|e| e.to_string())?;
                let mut copy = |path: &std::path::Path| -> std::io::Result<()> {
                    let tmp = path.with_extension("tmp");
                    let mut f = std::fs::File::create(&tmp)?;
                    std::io::copy(&mut src, &mut f)?;
                    f.flush()?;
                    f.sync_all()?;
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
                    std::fs::rename(&tmp, path)
                };
                copy(&path).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())??;
        }
        Ok(exe)
    }

    /// Only a muster entry can name an executable: `(horde, api, inst)` must name this artifact
    /// and function.
    async fn check_muster(&self, unit: &Unit) -> Result<(), String> {
        let q = Query::MusterSearch {
            horde: Some(unit.horde.clone()),
            api: Some(unit.api.clone()),
            inst: Some(unit.inst.clone()),
        };
        let names = |e: &MusterEntry| e.filename == unit.artifact && e.function == unit.function;
        if let QueryResult::Muster(es) = self.store.local(q.clone()) {
            if es.iter().any(names) {
                return Ok(());
            }
        }
        match self.store.read(q).await {
            Ok(QueryResult::Muster(es)) if es.iter().any(names) => Ok(()),
            Ok(_) => Err(format!(
                "no muster entry names {} function {} for {}/{}/{}",
                unit.artifact, unit.function, unit.horde, unit.api, unit.inst
            )),
            Err(e) => Err(format!("reading the muster: {e}")),
        }
    }
}

/// Writes `bytes` to `path` by a fsynced temp file and a rename.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_text_reads_back() {
        let value_of = |t: &str| crux_proctor::Value::from_toml_text(t).ok();
        let mut cfg = BTreeMap::new();
        cfg.insert("rack".to_string(), toml::Value::String("r7".into()));
        cfg.insert("ssd".to_string(), toml::Value::Boolean(true));
        let a = attributes("127.0.0.3".parse().unwrap(), &cfg);
        assert_eq!(
            value_of(&a["host"]),
            Some(crux_proctor::Value::Str("127.0.0.3".into()))
        );
        assert_eq!(
            value_of(&a["rack"]),
            Some(crux_proctor::Value::Str("r7".into()))
        );
        assert_eq!(value_of(&a["ssd"]), Some(crux_proctor::Value::Bool(true)));
        assert!(matches!(
            value_of(&a["cpus"]),
            Some(crux_proctor::Value::Num(n)) if n >= 1.0
        ));
        assert_eq!(value_of("[1, 2]"), None);
    }

    #[test]
    fn unit_keys_differ_by_artifact_and_function() {
        let u = |art: &str, f: &str| Unit {
            horde: "default".into(),
            api: "galumph2".into(),
            inst: "galumph2_3".into(),
            artifact: art.into(),
            function: f.into(),
        };
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        assert_ne!(unit_key(&u(&a, "f")), unit_key(&u(&b, "f")));
        assert_ne!(unit_key(&u(&a, "f")), unit_key(&u(&a, "g")));
        assert_eq!(unit_key(&u(&a, "f")), unit_key(&u(&a, "f")));
    }
}
