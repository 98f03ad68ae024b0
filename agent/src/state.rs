//! What the agent's servers (local socket, HTTP) share: the flock driver's handle, the bootstrap
//! progress and readiness (per step: phase and since when, from the step's or its service's
//! [`ReadyWatch`]).
//!
//! Two facts are kept apart: the bootstrap is *done* once every step of the table has started
//! its work (the local API then answers `Members`, `Leader`, …), and the agent is *ready* only
//! while every step serves ([`Phase::Ready`]: the store, for one, only once a write through it
//! would be accepted). `/ready`, sd_notify `READY=1`, `crux status` and `crux dev` report the
//! second.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crux_flock::driver::DriverHandle;
use crux_service::{Phase, Readiness, ReadyWatch};

use crate::config::Settings;
use crate::keys::Keys;

/// One bootstrap step's progress.
#[derive(Clone, Debug)]
pub struct Step {
    /// Step name (a row of the bootstrap table).
    pub name: &'static str,
    /// The steps it needs.
    pub after: &'static [&'static str],
    /// Finished.
    pub done: bool,
    /// How long it took.
    pub elapsed: Duration,
    /// What it did.
    pub detail: String,
    /// Its readiness now (None: not started).
    pub readiness: Option<Readiness>,
}

/// A step as kept: its progress and where its readiness is read.
struct Kept {
    step: Step,
    ready: Option<ReadyWatch>,
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
    /// Fuse's ADS address, proxies and snapshot (for `crux route proxies`).
    pub fuse: Arc<crux_fuse::Board>,
    /// This node's pastiche store.
    pub pastiche: crux_pastiche::store::Store,
    /// This node's end of the node plane.
    pub transport: crux_transport::Transport,
    /// The local socket's listener counters (`crux_local`).
    pub local: crux_local::Stats,
    /// The DNS server's counters (`crux_dns_*`).
    pub dns: Arc<crux_dns::Stats>,
    /// Reload, the log controls, debug info (README "Operating a running agent").
    pub ops: Arc<crate::ops::Ops>,
    started: Instant,
    steps: Mutex<Vec<Kept>>,
    bootstrapped: AtomicBool,
    /// Whether the agent was ready when last looked at, and since when (tokio's clock).
    overall: Mutex<(bool, tokio::time::Instant)>,
}

/// The agent's readiness at one moment: every step serving, or the first that does not.
#[derive(Clone, Debug)]
pub struct Overall {
    /// Every step of the table serves.
    pub ready: bool,
    /// How long the agent has been ready (or not ready).
    pub for_: Duration,
    /// When not ready: the first step that does not serve, and what it waits for.
    pub missing: Option<String>,
}

impl AgentState {
    /// New state: the steps of `table` (name, the steps it needs), none done; not ready.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        flock: DriverHandle,
        settings: Settings,
        keys: Keys,
        reeve: Arc<crux_reeve::Reeve>,
        store: crux_store::Store,
        pastiche: crux_pastiche::store::Store,
        transport: crux_transport::Transport,
        ops: Arc<crate::ops::Ops>,
        started: Instant,
        table: &[(&'static str, &'static [&'static str])],
    ) -> Arc<AgentState> {
        let steps = table
            .iter()
            .map(|&(name, after)| Kept {
                step: Step {
                    name,
                    after,
                    done: false,
                    elapsed: Duration::ZERO,
                    detail: String::new(),
                    readiness: None,
                },
                ready: None,
            })
            .collect();
        Arc::new(AgentState {
            flock,
            settings,
            keys,
            reeve,
            store,
            pastiche,
            transport,
            local: crux_local::Stats::default(),
            dns: Arc::default(),
            fuse: Arc::default(),
            ops,
            started,
            steps: Mutex::new(steps),
            bootstrapped: AtomicBool::new(false),
            overall: Mutex::new((false, tokio::time::Instant::now())),
        })
    }

    fn with_step(&self, name: &str, f: impl FnOnce(&mut Kept)) {
        let mut steps = self.steps.lock().expect("steps lock");
        if let Some(k) = steps.iter_mut().find(|k| k.step.name == name) {
            f(k);
        }
    }

    /// From now on, the readiness of step `name` is read from `ready` (the step's own, or the
    /// service's it started).
    pub fn step_readiness(&self, name: &str, ready: ReadyWatch) {
        self.with_step(name, |k| k.ready = Some(ready));
    }

    /// Records a finished step.
    pub fn step_done(&self, name: &str, elapsed: Duration, detail: &str) {
        self.with_step(name, |k| {
            k.step.done = true;
            k.step.elapsed = elapsed;
            k.step.detail = detail.to_string();
        });
    }

    /// The steps so far, each with its readiness now.
    pub fn steps(&self) -> Vec<Step> {
        self.steps
            .lock()
            .expect("steps lock")
            .iter()
            .map(|k| Step {
                readiness: k.ready.as_ref().map(ReadyWatch::get),
                ..k.step.clone()
            })
            .collect()
    }

    /// Marks the bootstrap done (every step started its work).
    pub fn set_bootstrapped(&self) {
        self.bootstrapped.store(true, Ordering::SeqCst);
    }

    /// Whether the bootstrap is done.
    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped.load(Ordering::SeqCst)
    }

    /// Whether the agent is ready: the bootstrap is done and every step serves now.
    pub fn is_ready(&self) -> bool {
        self.overall().ready
    }

    /// The agent's readiness now: every step serving, or the first that does not and why; and
    /// for how long that has held.
    pub fn overall(&self) -> Overall {
        let missing = self.missing();
        let ready = missing.is_none();
        let mut o = self.overall.lock().expect("overall lock");
        if o.0 != ready {
            *o = (ready, tokio::time::Instant::now());
        }
        Overall {
            ready,
            for_: o.1.elapsed(),
            missing,
        }
    }

    /// The first step that does not serve, with its phase and what it waits for; `None` when
    /// every step serves and the bootstrap is done.
    fn missing(&self) -> Option<String> {
        for step in self.steps() {
            match &step.readiness {
                Some(r) if r.phase == Phase::Ready => {}
                Some(r) => return Some(format!("step {} {}: {}", step.name, r.phase, r.detail)),
                None => return Some(format!("step {} pending (bootstrap)", step.name)),
            }
        }
        if self.bootstrapped() {
            None
        } else {
            Some("bootstrap not finished".into())
        }
    }

    /// The first step not yet done.
    pub fn pending_step(&self) -> Option<&'static str> {
        self.steps
            .lock()
            .expect("steps lock")
            .iter()
            .find(|k| !k.step.done)
            .map(|k| k.step.name)
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
