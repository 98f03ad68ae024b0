//! Built-in services: code compiled into the agent that runs under picket.
//!
//! A built-in follows the seed's `Galumph2_3(quit, alive, network)`: [`Builtin::run`] runs until
//! `quit` is cancelled and sends the service points it serves on `alive`, at least once every
//! heartbeat interval. [`run_builtin`] is the heartbeater on the sink end of `alive`:
//!
//! * a point that appears for the first time is registered with the reeve (api, inst, NetID);
//! * every message heartbeats the points it names (health from [`Fservice::healthy`]);
//! * a point missing from a message is deregistered, and so is every point when the built-in ends
//!   or `quit` is cancelled;
//! * a built-in whose run fails (an error or a panic) is restarted with back-off, from the fresh
//!   copy [`Builtin::fresh`] makes; one that cannot make a fresh copy stays stopped, logged.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::{Health, RunState};
use crux_reeve::Reeve;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A boxed future, as [`Builtin::run`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One service point a built-in serves: what the seed's `crux.Fservice` heartbeat carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fservice {
    /// The API served, e.g. `pastiche1`.
    pub api: String,
    /// The instance, e.g. `pastiche1_<node>`.
    pub inst: String,
    /// Where it is reached, `host:port`.
    pub netid: String,
    /// Whether it is healthy now.
    pub healthy: bool,
}

/// What a built-in is told about the node (the seed's `network` argument).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// The node's IP: services listen on it (port 0) for their own API.
    pub node_ip: IpAddr,
    /// The node id, 16 hex digits.
    pub node: String,
}

/// A service compiled into the agent.
pub trait Builtin: Send + 'static {
    /// Its name, for logs.
    fn name(&self) -> &str;

    /// Runs until `quit`; sends its service points on `alive` at least every heartbeat interval.
    /// Returning `Ok` ends it for good (its points are deregistered); an error restarts it.
    fn run(
        self: Box<Self>,
        quit: CancellationToken,
        alive: mpsc::Sender<Vec<Fservice>>,
        network: Network,
    ) -> BoxFuture<anyhow::Result<()>>;

    /// A fresh copy to run again after a failure ([`Builtin::run`] consumes the built-in).
    /// `None` (the default): a failed run is not restarted.
    fn fresh(&self) -> Option<Box<dyn Builtin>> {
        None
    }
}

/// Back-off between restarts of a failed built-in: from this, doubling.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Back-off ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the back-off.
pub const STABLE: Duration = Duration::from_secs(10);
/// How long a built-in may take to return after `quit` before it is dropped.
pub const QUIT_WAIT: Duration = Duration::from_secs(5);

/// Runs `b` until `quit` (or until it returns `Ok`), keeping the service points it reports
/// registered with `reeve`. A failed run is logged and restarted with back-off.
pub fn run_builtin(
    b: Box<dyn Builtin>,
    reeve: Arc<Reeve>,
    network: Network,
    quit: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(builtin_task(b, reeve, network, quit))
}

/// What [`run_builtin`] spawns, for an owner that spawns (and owns) the task itself.
pub fn builtin_task(
    b: Box<dyn Builtin>,
    reeve: Arc<Reeve>,
    network: Network,
    quit: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    supervise(b, reeve, network, quit)
}

async fn supervise(
    mut b: Box<dyn Builtin>,
    reeve: Arc<Reeve>,
    network: Network,
    quit: CancellationToken,
) {
    let name = b.name().to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let next = b.fresh();
        let started = Instant::now();
        info!(builtin = %name, "built-in starting");
        let outcome = run_once(b, &reeve, network.clone(), &quit).await;
        match outcome {
            Ok(()) => {
                info!(builtin = %name, "built-in ended");
                return;
            }
            Err(e) if quit.is_cancelled() => {
                warn!(builtin = %name, error = %format!("{e:#}"), "built-in failed while quitting");
                return;
            }
            Err(e) => {
                let Some(n) = next else {
                    warn!(builtin = %name, error = %format!("{e:#}"), "built-in failed; it cannot be restarted");
                    return;
                };
                if started.elapsed() >= STABLE {
                    backoff = BACKOFF_MIN;
                }
                warn!(builtin = %name, error = %format!("{e:#}"), backoff_ms = backoff.as_millis() as u64, "built-in failed; restarting");
                tokio::select! {
                    _ = quit.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                b = n;
            }
        }
    }
}

/// One run of a built-in, with its registrations; every point is deregistered when it ends.
async fn run_once(
    b: Box<dyn Builtin>,
    reeve: &Arc<Reeve>,
    network: Network,
    quit: &CancellationToken,
) -> anyhow::Result<()> {
    let name = b.name().to_string();
    let (tx, mut rx) = mpsc::channel(8);
    let run_quit = quit.child_token();
    let mut task = tokio::spawn(b.run(run_quit.clone(), tx, network));
    let mut points = Points::new(name.clone(), reeve.clone());
    let result = loop {
        tokio::select! {
            r = &mut task => break joined(r),
            msg = rx.recv() => match msg {
                Some(m) => points.alive(&m),
                // The sender is gone: the run is ending; wait for its result.
                None => break joined((&mut task).await),
            },
            _ = quit.cancelled() => {
                run_quit.cancel();
                break match tokio::time::timeout(QUIT_WAIT, &mut task).await {
                    Ok(r) => joined(r),
                    Err(_) => {
                        task.abort();
                        warn!(builtin = %name, "built-in did not return after quit; dropped");
                        Ok(())
                    }
                };
            }
        }
    };
    points.clear();
    result
}

fn joined(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(anyhow::anyhow!("the built-in panicked")),
        Err(e) => Err(anyhow::anyhow!("the built-in's task ended: {e}")),
    }
}

/// A registered point: its reeve id and token, and where it was registered.
struct Registered {
    id: String,
    token: Vec<u8>,
    netid: String,
}

/// The points of one run, keyed by (api, inst).
struct Points {
    name: String,
    reeve: Arc<Reeve>,
    live: HashMap<(String, String), Registered>,
}

fn health(healthy: bool) -> i32 {
    if healthy {
        Health::Healthy as i32
    } else {
        Health::Unhealthy as i32
    }
}

impl Points {
    fn new(name: String, reeve: Arc<Reeve>) -> Points {
        Points {
            name,
            reeve,
            live: HashMap::new(),
        }
    }

    /// One alive message: register new points, heartbeat known ones, drop missing ones.
    fn alive(&mut self, now: &[Fservice]) {
        let keep: std::collections::HashSet<(String, String)> = now
            .iter()
            .map(|p| (p.api.clone(), p.inst.clone()))
            .collect();
        let gone: Vec<(String, String)> = self
            .live
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = self.live.remove(&k) {
                self.deregister(&k, r);
            }
        }
        for p in now {
            let key = (p.api.clone(), p.inst.clone());
            match self.live.get(&key) {
                Some(r) if r.netid == p.netid => {
                    let beat = rpb::HeartbeatRequest {
                        id: r.id.clone(),
                        token: r.token.clone(),
                        state: RunState::Running as i32,
                        health: health(p.healthy),
                        valid_for_ms: 0,
                    };
                    match self.reeve.beat(&beat) {
                        Ok(()) => {}
                        // Forgotten (expired past the grace period): register it again.
                        Err(s) => {
                            debug!(builtin = %self.name, api = %p.api, inst = %p.inst, error = %s.message(), "heartbeat refused; registering again");
                            self.live.remove(&key);
                            self.register(p);
                        }
                    }
                }
                Some(_) => {
                    // It moved: a new registration at the new NetID.
                    if let Some(r) = self.live.remove(&key) {
                        self.deregister(&key, r);
                    }
                    self.register(p);
                }
                None => self.register(p),
            }
        }
    }

    fn register(&mut self, p: &Fservice) {
        let req = rpb::RegisterRequest {
            api: p.api.clone(),
            inst: p.inst.clone(),
            addr: p.netid.clone(),
            state: RunState::Running as i32,
            health: health(p.healthy),
            ..Default::default()
        };
        match self.reeve.register(req) {
            Ok(r) => {
                self.live.insert(
                    (p.api.clone(), p.inst.clone()),
                    Registered {
                        id: r.id,
                        token: r.token,
                        netid: p.netid.clone(),
                    },
                );
            }
            Err(s) => {
                warn!(builtin = %self.name, api = %p.api, inst = %p.inst, netid = %p.netid, error = %s.message(), "registration refused")
            }
        }
    }

    fn deregister(&self, key: &(String, String), r: Registered) {
        let req = rpb::DeregisterRequest {
            id: r.id,
            token: r.token,
        };
        if let Err(s) = self.reeve.deregister(&req) {
            debug!(builtin = %self.name, api = %key.0, inst = %key.1, error = %s.message(), "deregistration refused");
        }
    }

    fn clear(&mut self) {
        for (k, r) in std::mem::take(&mut self.live) {
            self.deregister(&k, r);
        }
    }
}

/// A built-in that keeps a fixed list of service points alive every `interval` until quit (for
/// services the agent serves itself, such as `pastiche1` on the node gRPC port).
#[derive(Clone, Debug)]
pub struct Static {
    name: String,
    points: Vec<Fservice>,
    interval: Duration,
}

impl Static {
    /// `points`, announced at once and then every `interval` (the reeve's heartbeat interval).
    pub fn new(name: impl Into<String>, points: Vec<Fservice>, interval: Duration) -> Static {
        Static {
            name: name.into(),
            points,
            interval: interval.max(Duration::from_millis(10)),
        }
    }
}

impl Builtin for Static {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(
        self: Box<Self>,
        quit: CancellationToken,
        alive: mpsc::Sender<Vec<Fservice>>,
        _network: Network,
    ) -> BoxFuture<anyhow::Result<()>> {
        Box::pin(async move {
            let mut tick = tokio::time::interval(self.interval);
            loop {
                tokio::select! {
                    _ = quit.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                if alive.send(self.points.clone()).await.is_err() {
                    return Ok(());
                }
            }
        })
    }

    fn fresh(&self) -> Option<Box<dyn Builtin>> {
        Some(Box::new(self.clone()))
    }
}

/// The function a [`FnBuiltin`] runs: the seed's `func(quit, alive, network)`.
pub type RunFn = dyn Fn(CancellationToken, mpsc::Sender<Vec<Fservice>>, Network) -> BoxFuture<anyhow::Result<()>>
    + Send
    + Sync
    + 'static;

/// A built-in made from a function, as the seed writes them (`Galumph2_3(quit, alive, network)`);
/// it can always be restarted (the function is called again).
#[derive(Clone)]
pub struct FnBuiltin {
    name: String,
    f: Arc<RunFn>,
}

impl std::fmt::Debug for FnBuiltin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnBuiltin")
            .field("name", &self.name)
            .finish()
    }
}

/// A built-in named `name` that runs `f`.
pub fn from_fn<F>(name: impl Into<String>, f: F) -> FnBuiltin
where
    F: Fn(CancellationToken, mpsc::Sender<Vec<Fservice>>, Network) -> BoxFuture<anyhow::Result<()>>
        + Send
        + Sync
        + 'static,
{
    FnBuiltin {
        name: name.into(),
        f: Arc::new(f),
    }
}

impl Builtin for FnBuiltin {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(
        self: Box<Self>,
        quit: CancellationToken,
        alive: mpsc::Sender<Vec<Fservice>>,
        network: Network,
    ) -> BoxFuture<anyhow::Result<()>> {
        (self.f)(quit, alive, network)
    }

    fn fresh(&self) -> Option<Box<dyn Builtin>> {
        Some(Box::new(self.clone()))
    }
}
