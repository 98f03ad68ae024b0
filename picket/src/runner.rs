//! Plugin processes: start, handshake, health, supervision, stop, and re-adoption.
//!
//! * **Start.** The executable runs in its own process group, stdin from `/dev/null`, stdout a
//!   pipe (the handshake), stderr inherited, with `CRUX_PLUGIN_PROTOCOL=1`, a one-time
//!   `CRUX_PLUGIN_TOKEN` (128 random bits, hex, new per start), and the `CRUX_*` variables
//!   [`crate::plugin::PluginEnv`] reads. Its first stdout line must be
//!   `1|<version>|unix|<socket>|grpc` within [`PicketConfig::handshake_timeout`].
//! * **Health.** Every [`HEALTH_INTERVAL`] picket asks `grpc.health.v1.Health/Check` (service
//!   `""`) on that socket: SERVING is healthy, anything else (or no answer) unhealthy.
//! * **Supervision.** An exit (or a failed start) is restarted after a back-off that starts at
//!   [`PicketConfig::backoff_min`] and doubles up to [`PicketConfig::backoff_max`];
//!   [`PicketConfig::crash_loop`] exits in a row, each within [`PicketConfig::stable`] of its
//!   start, make the unit `failed`: it is not restarted until it is stopped and started again.
//!   A run that lasted `stable` resets the count and the back-off.
//! * **Stop.** `crux.plugin.v1.Plugin/Shutdown` with the token in the metadata
//!   `crux-plugin-token`; if the process is still there after a short wait, SIGTERM to its
//!   group; after [`PicketConfig::grace`], SIGKILL to the group.
//! * **Records.** Each running child is written to `<dir>/children.json` (key, spec, pid, process
//!   group, start time from `/proc/<pid>/stat`, socket, token). Children outlive the agent; the
//!   next [`Picket::open`] re-adopts each recorded child whose pid is alive with the same start
//!   time and whose health check answers. An adopted child is not the agent's child, so its exit
//!   is noticed by polling `/proc`; it is restarted as usual.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crux_proto::grpc::plugin::v1::{plugin_client::PluginClient, ShutdownRequest};
use nix::sys::signal::Signal;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tracing::{debug, info, warn};

use crate::plugin as env;
use crate::records::{self, Record};
use crate::spec::UnitSpec;
use crate::{proc, unix_ms, PROTOCOL_VERSION, TOKEN_METADATA};

/// How often a running plugin's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one health check (connect and call) may take.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `stop` waits after `Shutdown` before SIGTERM (at most the grace period).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// How often an adopted child (not ours to `wait` for) is looked up in `/proc`.
pub const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// The longest handshake line read (a longer one is a failed start).
pub const HANDSHAKE_LINE_MAX: usize = 4096;
/// Default grace between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);
/// Default handshake timeout.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first back-off.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Default back-off ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default number of quick exits in a row that make a crash loop.
pub const CRASH_LOOP: u32 = 5;
/// Default run length that counts as stable.
pub const STABLE: Duration = Duration::from_secs(10);

/// How picket runs plugins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PicketConfig {
    /// `<data_dir>/picket`: the records file and the plugin sockets directory (`sock/`).
    pub dir: PathBuf,
    /// The agent's local socket, passed to plugins (`CRUX_REEVE_SOCKET`).
    pub reeve_socket: PathBuf,
    /// The node's IP, passed to plugins (`CRUX_NODE_IP`): they serve their API on it, port 0.
    pub node_ip: IpAddr,
    /// Stop: after SIGTERM, how long before SIGKILL of the process group (default 5 s).
    pub grace: Duration,
    /// How long a plugin may take to print its handshake line (default 10 s).
    pub handshake_timeout: Duration,
    /// First restart back-off (default 500 ms); it doubles on each quick exit.
    pub backoff_min: Duration,
    /// Back-off ceiling (default 30 s).
    pub backoff_max: Duration,
    /// This many exits in a row, each within `stable` of its start, make the unit failed; it is
    /// not restarted any more (default 5).
    pub crash_loop: u32,
    /// A run that lasted this long resets the crash count and the back-off (default 10 s).
    pub stable: Duration,
}

impl PicketConfig {
    /// The defaults for a picket in `dir` whose plugins talk to `reeve_socket` and serve on
    /// `node_ip`.
    pub fn new(dir: impl Into<PathBuf>, reeve_socket: impl Into<PathBuf>, node_ip: IpAddr) -> Self {
        PicketConfig {
            dir: dir.into(),
            reeve_socket: reeve_socket.into(),
            node_ip,
            grace: GRACE,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            backoff_min: BACKOFF_MIN,
            backoff_max: BACKOFF_MAX,
            crash_loop: CRASH_LOOP,
            stable: STABLE,
        }
    }

    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dir.as_os_str().is_empty() {
            return Err(ConfigError("dir must not be empty"));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError("handshake_timeout must be more than 0"));
        }
        if self.backoff_min.is_zero() {
            return Err(ConfigError("backoff_min must be more than 0"));
        }
        if self.backoff_max < self.backoff_min {
            return Err(ConfigError("backoff_max must be at least backoff_min"));
        }
        if self.crash_loop == 0 {
            return Err(ConfigError("crash_loop must be at least 1"));
        }
        Ok(())
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }
}

/// A [`PicketConfig`] value that cannot work (nothing was started).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("picket config: {0}")]
pub struct ConfigError(&'static str);

/// Where a unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnitState {
    /// Spawned; waiting for its handshake or its first health answer.
    Starting,
    /// Its health check answers SERVING.
    Healthy,
    /// Its health check answers something else, or nothing.
    Unhealthy,
    /// It exited; it is restarted after a back-off.
    Backoff,
    /// It crash-looped; it is not restarted until stopped and started again.
    Failed,
    /// It is being stopped.
    Stopping,
}

impl std::fmt::Display for UnitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnitState::Starting => "starting",
            UnitState::Healthy => "healthy",
            UnitState::Unhealthy => "unhealthy",
            UnitState::Backoff => "backoff",
            UnitState::Failed => "failed",
            UnitState::Stopping => "stopping",
        })
    }
}

/// A unit as picket sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitStatus {
    /// What it runs.
    pub spec: UnitSpec,
    /// Its state.
    pub state: UnitState,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// Its control socket (from the handshake), while running.
    pub addr: Option<String>,
    /// How often it was restarted since `start`.
    pub restarts: u32,
    /// When it entered its state, Unix ms.
    pub since_ms: u64,
    /// What happened last (the exit status, the bad handshake line, the health answer, ...).
    pub detail: String,
}

/// How a stop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The plugin exited after `Shutdown`.
    Shutdown,
    /// It exited after SIGTERM.
    Terminated,
    /// Its group was killed after the grace period.
    Killed,
    /// No process was running (back-off, failed).
    NotRunning,
}

struct Unit {
    status: UnitStatus,
    stop: CancellationToken,
    done: watch::Receiver<Option<StopOutcome>>,
}

struct Shared {
    cfg: PicketConfig,
    units: Mutex<HashMap<String, Unit>>,
    records: Mutex<HashMap<String, Record>>,
    changed: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Changes a unit's status; logs and bumps when its state changes.
    fn update(&self, key: &str, f: impl FnOnce(&mut UnitStatus)) {
        let mut units = lock(&self.units);
        let Some(u) = units.get_mut(key) else { return };
        let before = u.status.clone();
        f(&mut u.status);
        if u.status.state != before.state {
            u.status.since_ms = unix_ms();
            info!(unit = %key, from = %before.state, to = %u.status.state, pid = ?u.status.pid, detail = %u.status.detail, "plugin state");
        }
        let changed = u.status != before;
        drop(units);
        if changed {
            self.bump();
        }
    }

    fn save_records(&self, recs: &HashMap<String, Record>) {
        let mut list: Vec<Record> = recs.values().cloned().collect();
        list.sort_by(|a, b| a.key.cmp(&b.key));
        if let Err(e) = records::save(&self.cfg.dir, &list) {
            warn!(dir = %self.cfg.dir.display(), error = %e, "writing the picket records failed");
        }
    }

    fn record(&self, r: Record) {
        let mut recs = lock(&self.records);
        recs.insert(r.key.clone(), r);
        self.save_records(&recs);
    }

    fn unrecord(&self, key: &str) {
        let mut recs = lock(&self.records);
        if recs.remove(key).is_some() {
            self.save_records(&recs);
        }
    }
}

struct Handle {
    sh: Arc<Shared>,
    detach: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The supervisors let go of their children; the children keep running, recorded, for
        // the next `open` to adopt.
        self.detach.cancel();
    }
}

/// The plugin runner. Clones share the runner; when the last clone is dropped the supervisors
/// stop and the children keep running (recorded, for the next [`Picket::open`] to adopt).
#[derive(Clone)]
pub struct Picket {
    h: Arc<Handle>,
}

impl std::fmt::Debug for Picket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Picket")
            .field("dir", &self.h.sh.cfg.dir)
            .field("units", &lock(&self.h.sh.units).len())
            .finish()
    }
}

impl Picket {
    /// Opens picket in `cfg.dir` (created, with `sock/` mode 0700) and re-adopts the recorded
    /// children that still run and answer their health check; other records are dropped.
    pub async fn open(cfg: PicketConfig) -> anyhow::Result<Picket> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", cfg.dir.display()))?;
        let sock = cfg.socket_dir();
        std::fs::create_dir_all(&sock)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| anyhow::anyhow!("setting the mode of {}: {e}", sock.display()))?;
        let recorded = records::load(&cfg.dir)?;
        let mut adopt = Vec::new();
        for r in recorded {
            if !proc::alive(r.pid, r.start_time) {
                info!(unit = %r.key, pid = r.pid, "recorded plugin is gone; record dropped");
                continue;
            }
            let mut chan = None;
            match check(&mut chan, &r.socket).await {
                Ok(_) => adopt.push(r),
                Err(e) => {
                    info!(unit = %r.key, pid = r.pid, error = %e, "recorded plugin does not answer its health check; record dropped")
                }
            }
        }
        let sh = Arc::new(Shared {
            cfg,
            units: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        });
        {
            let mut recs = lock(&sh.records);
            for r in &adopt {
                recs.insert(r.key.clone(), r.clone());
            }
            sh.save_records(&recs);
        }
        let picket = Picket {
            h: Arc::new(Handle {
                sh,
                detach: CancellationToken::new(),
            }),
        };
        for r in adopt {
            info!(unit = %r.key, pid = r.pid, socket = %r.socket.display(), "re-adopting a running plugin");
            let run = Running {
                pid: r.pid,
                pgid: r.pgid,
                start_time: r.start_time,
                child: None,
                socket: r.socket.clone(),
                token: r.token.clone(),
                version: r.version.clone(),
            };
            picket.launch(r.spec, Some(run));
        }
        Ok(picket)
    }

    /// Starts supervising `spec` (a no-op if a unit with its key exists, whatever its state).
    /// Call it inside a tokio runtime.
    pub fn start(&self, spec: UnitSpec) {
        self.launch(spec, None);
    }

    fn launch(&self, spec: UnitSpec, adopted: Option<Running>) {
        let sh = &self.h.sh;
        let key = spec.key.clone();
        let stop = CancellationToken::new();
        let (done_tx, done_rx) = watch::channel(None);
        {
            let mut units = lock(&sh.units);
            if let Some(u) = units.get(&key) {
                if u.status.spec != spec {
                    debug!(unit = %key, "start of a unit that exists with another spec: ignored (stop it first)");
                }
                return;
            }
            units.insert(
                key.clone(),
                Unit {
                    status: UnitStatus {
                        spec: spec.clone(),
                        state: UnitState::Starting,
                        pid: adopted.as_ref().map(|r| r.pid),
                        addr: adopted.as_ref().map(|r| r.socket.display().to_string()),
                        restarts: 0,
                        since_ms: unix_ms(),
                        detail: if adopted.is_some() {
                            "re-adopted".into()
                        } else {
                            String::new()
                        },
                    },
                    stop: stop.clone(),
                    done: done_rx,
                },
            );
        }
        sh.bump();
        info!(unit = %key, exe = %spec.exe.display(), adopted = adopted.is_some(), "plugin unit started");
        tokio::spawn(supervise(
            sh.clone(),
            spec,
            stop,
            self.h.detach.clone(),
            done_tx,
            adopted,
        ));
    }

    /// Stops the unit `key`: the stop sequence; returns when its process is gone.
    pub async fn stop(&self, key: &str) {
        self.stop_outcome(key).await;
    }

    /// [`Picket::stop`], telling how the process ended (None: no such unit).
    pub async fn stop_outcome(&self, key: &str) -> Option<StopOutcome> {
        let (stop, mut done) = {
            let units = lock(&self.h.sh.units);
            let u = units.get(key)?;
            (u.stop.clone(), u.done.clone())
        };
        stop.cancel();
        let r = done.wait_for(|d| d.is_some()).await;
        r.ok().and_then(|d| *d)
    }

    /// Stops every unit (concurrently).
    pub async fn stop_all(&self) {
        let keys: Vec<String> = lock(&self.h.sh.units).keys().cloned().collect();
        let mut set = tokio::task::JoinSet::new();
        for k in keys {
            let p = self.clone();
            set.spawn(async move { p.stop(&k).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// Every unit, by key.
    pub fn units(&self) -> Vec<UnitStatus> {
        let mut v: Vec<UnitStatus> = lock(&self.h.sh.units)
            .values()
            .map(|u| u.status.clone())
            .collect();
        v.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
        v
    }

    /// A counter that goes up on every change of a unit's status.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.h.sh.changed.subscribe()
    }

    /// The config.
    pub fn config(&self) -> &PicketConfig {
        &self.h.sh.cfg
    }
}

/// One running process of a unit.
struct Running {
    pid: u32,
    pgid: u32,
    start_time: u64,
    /// Our child (None: adopted from an earlier agent).
    child: Option<Child>,
    socket: PathBuf,
    token: String,
    version: String,
}

impl Running {
    /// Waits until the process has exited; says how.
    async fn exited(&mut self) -> String {
        match &mut self.child {
            Some(c) => match c.wait().await {
                Ok(s) => describe(s),
                Err(e) => format!("waiting for it failed: {e}"),
            },
            None => {
                let mut tick = tokio::time::interval(ADOPTED_POLL);
                loop {
                    tick.tick().await;
                    if !proc::alive(self.pid, self.start_time) {
                        return "exited (adopted: status unknown)".into();
                    }
                }
            }
        }
    }

    /// Waits at most `d` for the exit; whether it happened.
    async fn exited_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.exited()).await.is_ok()
    }
}

fn describe(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!(
            "killed by signal {}",
            Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| sig.to_string())
        ),
        _ => format!("ended: {s}"),
    }
}

/// How one run ended.
enum RunEnd {
    /// The process exited (or never started properly): restart it.
    Exited(String),
    /// `stop`: done.
    Stopped(StopOutcome),
    /// The last `Picket` was dropped: let go.
    Detached,
}

async fn supervise(
    sh: Arc<Shared>,
    spec: UnitSpec,
    stop: CancellationToken,
    detach: CancellationToken,
    done: watch::Sender<Option<StopOutcome>>,
    mut adopted: Option<Running>,
) {
    let key = spec.key.clone();
    let cfg = sh.cfg.clone();
    let mut quick = 0u32;
    let mut backoff = cfg.backoff_min;
    let mut restarts = 0u32;
    let outcome = loop {
        let started = Instant::now();
        let end = match adopted.take() {
            Some(r) => watch_run(&sh, &key, r, &stop, &detach).await,
            None => run_once(&sh, &spec, &stop, &detach).await,
        };
        let detail = match end {
            RunEnd::Detached => return,
            RunEnd::Stopped(o) => break o,
            RunEnd::Exited(d) => d,
        };
        sh.unrecord(&key);
        if started.elapsed() >= cfg.stable {
            quick = 0;
            backoff = cfg.backoff_min;
        }
        quick += 1;
        if quick >= cfg.crash_loop {
            sh.update(&key, |s| {
                s.state = UnitState::Failed;
                s.pid = None;
                s.addr = None;
                s.detail = format!(
                    "crash loop: {quick} exits in a row, each within {} ms of its start; last: {detail}",
                    cfg.stable.as_millis()
                );
            });
            warn!(unit = %key, restarts, "plugin crash-looped; not restarting it");
            tokio::select! {
                _ = detach.cancelled() => return,
                _ = stop.cancelled() => break StopOutcome::NotRunning,
            }
        }
        sh.update(&key, |s| {
            s.state = UnitState::Backoff;
            s.pid = None;
            s.addr = None;
            s.detail = format!("{detail}; restarting in {} ms", backoff.as_millis());
        });
        tokio::select! {
            _ = detach.cancelled() => return,
            _ = stop.cancelled() => break StopOutcome::NotRunning,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
        restarts += 1;
        sh.update(&key, |s| s.restarts = restarts);
    };
    sh.unrecord(&key);
    lock(&sh.units).remove(&key);
    sh.bump();
    info!(unit = %key, ?outcome, "plugin unit stopped");
    let _ = done.send(Some(outcome));
}

fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Spawns the unit's executable, waits for its handshake, then watches it.
async fn run_once(
    sh: &Arc<Shared>,
    spec: &UnitSpec,
    stop: &CancellationToken,
    detach: &CancellationToken,
) -> RunEnd {
    let key = &spec.key;
    let cfg = &sh.cfg;
    let token = new_token();
    let mut cmd = tokio::process::Command::new(&spec.exe);
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(false)
        .env(env::ENV_PROTOCOL, PROTOCOL_VERSION)
        .env(env::ENV_TOKEN, &token)
        .env(env::ENV_REEVE_SOCKET, &cfg.reeve_socket)
        .env(env::ENV_SOCKET_DIR, cfg.socket_dir())
        .env(env::ENV_NODE_IP, cfg.node_ip.to_string())
        .env(env::ENV_FUNCTION, &spec.function)
        .env(env::ENV_HORDE, &spec.horde)
        .env(env::ENV_API, &spec.api)
        .env(env::ENV_INST, &spec.inst);
    sh.update(key, |s| {
        s.state = UnitState::Starting;
        s.detail = "spawning".into();
    });
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return RunEnd::Exited(format!("cannot run {}: {e}", spec.exe.display())),
    };
    let Some(pid) = child.id() else {
        return RunEnd::Exited("it exited at once".into());
    };
    let start_time = proc::stat(pid).map(|s| s.start_time).unwrap_or(0);
    let stdout = child.stdout.take();
    let mut run = Running {
        pid,
        pgid: pid,
        start_time,
        child: Some(child),
        socket: PathBuf::new(),
        token,
        version: String::new(),
    };
    sh.update(key, |s| {
        s.pid = Some(pid);
        s.detail = "waiting for the handshake".into();
    });
    debug!(unit = %key, pid, "plugin spawned");
    let Some(stdout) = stdout else {
        return RunEnd::Exited("no stdout pipe".into());
    };
    let mut lines = BufReader::new(stdout);
    let hs = tokio::select! {
        _ = detach.cancelled() => return RunEnd::Detached,
        _ = stop.cancelled() => {
            sh.update(key, |s| s.state = UnitState::Stopping);
            return RunEnd::Stopped(stop_sequence(sh, &mut run).await);
        }
        hs = tokio::time::timeout(cfg.handshake_timeout, read_line(&mut lines)) => hs,
    };
    let hs = match hs {
        Err(_) => Err(format!(
            "no handshake line within {} ms",
            cfg.handshake_timeout.as_millis()
        )),
        Ok(Err(e)) => Err(format!("reading the handshake: {e}")),
        Ok(Ok(None)) => Err("stdout closed before the handshake".into()),
        Ok(Ok(Some(line))) => {
            parse_handshake(&line).map_err(|e| format!("bad handshake {line:?}: {e}"))
        }
    };
    let (version, socket) = match hs {
        Ok(v) => v,
        Err(detail) => {
            proc::signal_group(run.pgid, Signal::SIGKILL);
            let how = run.exited().await;
            return RunEnd::Exited(format!("start failed: {detail} ({how})"));
        }
    };
    // Later stdout lines go to the log (a plugin should log to stderr; this keeps the pipe open).
    let k = key.clone();
    tokio::spawn(async move {
        loop {
            match read_line(&mut lines).await {
                Ok(Some(l)) => debug!(unit = %k, line = %l, "plugin stdout"),
                _ => return,
            }
        }
    });
    run.socket = socket;
    run.version = version;
    sh.record(Record {
        key: key.clone(),
        spec: spec.clone(),
        pid,
        pgid: run.pgid,
        start_time,
        socket: run.socket.clone(),
        version: run.version.clone(),
        token: run.token.clone(),
        started_ms: unix_ms(),
    });
    sh.update(key, |s| {
        s.addr = Some(run.socket.display().to_string());
        s.detail = format!("version {}; waiting for health", run.version);
    });
    watch_run(sh, key, run, stop, detach).await
}

/// Reads one line of at most [`HANDSHAKE_LINE_MAX`] bytes (None at end of file).
async fn read_line(r: &mut BufReader<ChildStdout>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok((!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).into_owned()));
        }
        if let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&chunk[..i]);
            r.consume(i + 1);
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        r.consume(n);
        if buf.len() > HANDSHAKE_LINE_MAX {
            return Err(std::io::Error::other(format!(
                "line longer than {HANDSHAKE_LINE_MAX} bytes"
            )));
        }
    }
}

/// Parses `1|<version>|unix|<socket>|grpc` into (version, socket).
pub fn parse_handshake(line: &str) -> Result<(String, PathBuf), String> {
    let f: Vec<&str> = line.trim().split('|').collect();
    if f.len() != 5 {
        return Err(format!(
            "want 5 fields `{PROTOCOL_VERSION}|<version>|unix|<socket>|grpc`, got {}",
            f.len()
        ));
    }
    if f[0] != PROTOCOL_VERSION {
        return Err(format!(
            "protocol {:?}, picket speaks {PROTOCOL_VERSION:?}",
            f[0]
        ));
    }
    if f[1].is_empty() {
        return Err("empty version".into());
    }
    if f[2] != "unix" {
        return Err(format!("network {:?}, want \"unix\"", f[2]));
    }
    let socket = PathBuf::from(f[3]);
    if !socket.is_absolute() {
        return Err(format!("socket {:?} is not an absolute path", f[3]));
    }
    if f[4] != "grpc" {
        return Err(format!("protocol {:?}, want \"grpc\"", f[4]));
    }
    Ok((f[1].to_string(), socket))
}

/// Watches a running (handshaken or adopted) process: health, exit, stop.
async fn watch_run(
    sh: &Arc<Shared>,
    key: &str,
    mut run: Running,
    stop: &CancellationToken,
    detach: &CancellationToken,
) -> RunEnd {
    let (tx, mut health) = mpsc::channel(1);
    let checker = tokio::spawn(health_loop(run.socket.clone(), tx));
    let _abort = AbortOnDrop(checker);
    loop {
        tokio::select! {
            biased;
            _ = detach.cancelled() => return RunEnd::Detached,
            _ = stop.cancelled() => {
                sh.update(key, |s| {
                    s.state = UnitState::Stopping;
                    s.detail = "stopping".into();
                });
                let o = stop_sequence(sh, &mut run).await;
                remove_socket(sh, &run.socket);
                return RunEnd::Stopped(o);
            }
            how = run.exited() => {
                info!(unit = %key, pid = run.pid, how = %how, "plugin exited");
                // Whatever of its group is left goes with it.
                proc::signal_group(run.pgid, Signal::SIGKILL);
                remove_socket(sh, &run.socket);
                return RunEnd::Exited(how);
            }
            Some(h) = health.recv() => {
                let version = run.version.clone();
                sh.update(key, |s| match h {
                    Ok(()) => {
                        s.state = UnitState::Healthy;
                        s.detail = format!("version {version}: serving");
                    }
                    Err(e) => {
                        s.state = UnitState::Unhealthy;
                        s.detail = format!("version {version}: {e}");
                    }
                });
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes a plugin's socket file if it is in picket's socket directory.
fn remove_socket(sh: &Shared, socket: &Path) {
    if socket.starts_with(sh.cfg.socket_dir()) {
        let _ = std::fs::remove_file(socket);
    }
}

async fn health_loop(socket: PathBuf, tx: mpsc::Sender<Result<(), String>>) {
    let mut chan = None;
    loop {
        let r = match check(&mut chan, &socket).await {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(format!("health {}", other.as_str_name())),
            Err(e) => Err(e),
        };
        if tx.send(r).await.is_err() {
            return;
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// One `grpc.health.v1.Health/Check` (service "") on `socket`, reusing `chan`.
async fn check(chan: &mut Option<Channel>, socket: &Path) -> Result<ServingStatus, String> {
    let c = match chan {
        Some(c) => c.clone(),
        None => {
            let c = crux_reeve::client::socket_channel(socket, HEALTH_TIMEOUT)
                .await
                .map_err(|e| format!("health check: {e}"))?;
            *chan = Some(c.clone());
            c
        }
    };
    let mut client = HealthClient::new(c);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(HEALTH_TIMEOUT, call).await {
        Err(_) => Err(format!(
            "health check: no answer within {} ms",
            HEALTH_TIMEOUT.as_millis()
        )),
        Ok(Err(s)) => {
            *chan = None;
            Err(format!("health check: {}", s.message()))
        }
        Ok(Ok(r)) => {
            Ok(ServingStatus::try_from(r.into_inner().status).unwrap_or(ServingStatus::Unknown))
        }
    }
}

/// Shutdown RPC, short wait, SIGTERM to the group, grace, SIGKILL to the group.
async fn stop_sequence(sh: &Shared, run: &mut Running) -> StopOutcome {
    let cfg = &sh.cfg;
    let wait = SHUTDOWN_WAIT.min(cfg.grace);
    if !run.socket.as_os_str().is_empty() {
        match shutdown_rpc(&run.socket, &run.token, cfg.grace, wait).await {
            Ok(()) => {
                if run.exited_within(wait).await {
                    proc::signal_group(run.pgid, Signal::SIGKILL);
                    return StopOutcome::Shutdown;
                }
                debug!(pid = run.pid, "still running after Shutdown; SIGTERM");
            }
            Err(e) => debug!(pid = run.pid, error = %e, "Shutdown failed; SIGTERM"),
        }
    }
    proc::signal_group(run.pgid, Signal::SIGTERM);
    if run.exited_within(cfg.grace).await {
        proc::signal_group(run.pgid, Signal::SIGKILL);
        return StopOutcome::Terminated;
    }
    warn!(
        pid = run.pgid,
        grace_ms = cfg.grace.as_millis() as u64,
        "plugin still running after the grace period; SIGKILL to its group"
    );
    proc::signal_group(run.pgid, Signal::SIGKILL);
    run.exited().await;
    StopOutcome::Killed
}

async fn shutdown_rpc(
    socket: &Path,
    token: &str,
    grace: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let call = async {
        let ch = crux_reeve::client::socket_channel(socket, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(ShutdownRequest {
            grace_ms: grace.as_millis().min(u128::from(u32::MAX)) as u32,
        });
        let v = token
            .parse()
            .map_err(|_| "the token is not valid metadata".to_string())?;
        req.metadata_mut().insert(TOKEN_METADATA, v);
        PluginClient::new(ch)
            .shutdown(req)
            .await
            .map_err(|s| s.message().to_string())?;
        Ok(())
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_lines_are_checked_field_by_field() {
        assert_eq!(
            parse_handshake("1|2.3|unix|/run/p.sock|grpc\n"),
            Ok(("2.3".to_string(), PathBuf::from("/run/p.sock")))
        );
        for bad in [
            "hello",
            "2|2.3|unix|/run/p.sock|grpc",
            "1||unix|/run/p.sock|grpc",
            "1|2.3|tcp|127.0.0.1:5|grpc",
            "1|2.3|unix|p.sock|grpc",
            "1|2.3|unix|/run/p.sock|netrpc",
            "1|2.3|unix|/run/p.sock|grpc|x",
        ] {
            assert!(parse_handshake(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configs_that_cannot_work_are_refused() {
        let ok = PicketConfig::new("/tmp/p", "/tmp/r.sock", "127.0.0.1".parse().unwrap());
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.crash_loop = 0;
        assert!(c.validate().unwrap_err().to_string().contains("crash_loop"));
        let mut c = ok.clone();
        c.backoff_max = Duration::from_millis(1);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("backoff_max"));
        let mut c = ok;
        c.handshake_timeout = Duration::ZERO;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("handshake_timeout"));
    }

    #[test]
    fn states_display_lowercase() {
        assert_eq!(UnitState::Backoff.to_string(), "backoff");
        assert_eq!(UnitState::Failed.to_string(), "failed");
    }

    #[test]
    fn tokens_are_128_bit_hex_and_new_each_time() {
        let a = new_token();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_token());
    }
}
