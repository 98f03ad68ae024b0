//! What the agent's servers (local socket, HTTP) share: the flock driver's handle, the bootstrap
//! progress and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crux_flock::driver::DriverHandle;

use crate::config::Settings;
use crate::keys::Keys;

/// The bootstrap steps, in DESIGN.md's order.
pub const STEPS: [&str; 5] = ["flock", "reeve", "steward", "picket", "proctor"];

/// One bootstrap step's progress.
#[derive(Clone, Debug)]
pub struct Step {
    /// Step name (one of [`STEPS`]).
    pub name: &'static str,
    /// Finished.
    pub done: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// What it did.
    pub detail: String,
}

/// Shared agent state.
pub struct AgentState {
    /// The flock driver.
    pub flock: DriverHandle,
    /// The checked config.
    pub settings: Settings,
    /// The keyring API.
    pub keys: Keys,
    /// The registry agent of this node.
    pub reeve: Arc<crux_reeve::Reeve>,
    /// The durable store (Raft).
    pub store: crux_store::Store,
    /// This node's end of the node plane.
    pub transport: crux_transport::Transport,
    /// The local socket's listener counters (`crux_local`).
    pub local: crux_local::Stats,
    started: Instant,
    steps: Mutex<Vec<Step>>,
    ready: AtomicBool,
}

impl AgentState {
    /// New state: no step done, not ready.
    pub fn new(
        flock: DriverHandle,
        settings: Settings,
        keys: Keys,
        reeve: Arc<crux_reeve::Reeve>,
        store: crux_store::Store,
        transport: crux_transport::Transport,
        started: Instant,
    ) -> Arc<AgentState> {
        let steps = STEPS
            .iter()
            .map(|name| Step {
                name,
                done: false,
                elapsed: Duration::ZERO,
                detail: String::new(),
            })
            .collect();
        Arc::new(AgentState {
            flock,
            settings,
            keys,
            reeve,
            store,
            transport,
            local: crux_local::Stats::default(),
            started,
            steps: Mutex::new(steps),
            ready: AtomicBool::new(false),
        })
    }

    /// Records a finished step.
    pub fn step_done(&self, name: &str, elapsed: Duration, detail: &str) {
        let mut steps = self.steps.lock().expect("steps lock");
        if let Some(s) = steps.iter_mut().find(|s| s.name == name) {
            s.done = true;
            s.elapsed = elapsed;
            s.detail = detail.to_string();
        }
    }

    /// The steps so far.
    pub fn steps(&self) -> Vec<Step> {
        self.steps.lock().expect("steps lock").clone()
    }

    /// Marks the bootstrap done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Whether the bootstrap is done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The first step not yet done.
    pub fn pending_step(&self) -> Option<&'static str> {
        self.steps
            .lock()
            .expect("steps lock")
            .iter()
            .find(|s| !s.done)
            .map(|s| s.name)
    }

    /// Time since the agent started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Transient key epoch this node seals with (None until it holds one).
    pub fn key_epoch(&self) -> Option<u64> {
        self.flock.snapshot().key_epoch.map(u64::from)
    }
}
