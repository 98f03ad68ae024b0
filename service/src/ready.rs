//! Readiness: a phase and since when it holds, set by the service, read by the agent (`/ready`,
//! `crux status`) and by whatever waits for the service.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

/// Where a service is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Started, not serving yet.
    Starting,
    /// Serving.
    Ready,
    /// Was serving, is not now (e.g. a store cut off from its voters); it may come back by
    /// itself. Unlike [`Phase::Starting`], what is missing is an outage, not a start under way.
    Degraded,
    /// Gave up (the detail says why); it does not come back by itself.
    Failed,
    /// Asked to stop, not stopped yet.
    Stopping,
    /// Stopped.
    Stopped,
}

impl Phase {
    /// Lower-case name: `starting`, `ready`, `degraded`, `failed`, `stopping`, `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Degraded => "degraded",
            Phase::Failed => "failed",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A service's readiness at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    /// The phase.
    pub phase: Phase,
    /// Since when the service has been in this phase (tokio's clock).
    pub since: Instant,
    /// What it is doing or waiting for, for people.
    pub detail: String,
}

/// The service's end: sets its readiness. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReadySender(Arc<watch::Sender<Readiness>>);

impl ReadySender {
    /// A readiness starting in `phase`.
    pub fn new(phase: Phase, detail: impl Into<String>) -> ReadySender {
        let (tx, _) = watch::channel(Readiness {
            phase,
            since: Instant::now(),
            detail: detail.into(),
        });
        ReadySender(Arc::new(tx))
    }

    /// Moves to `phase` with `detail`; `since` changes only when the phase does.
    pub fn set(&self, phase: Phase, detail: impl Into<String>) {
        let detail = detail.into();
        self.0.send_if_modified(|r| {
            if r.phase == phase && r.detail == detail {
                return false;
            }
            if r.phase != phase {
                r.phase = phase;
                r.since = Instant::now();
            }
            r.detail = detail;
            true
        });
    }

    /// A reader of this readiness.
    pub fn watch(&self) -> ReadyWatch {
        ReadyWatch(self.0.subscribe())
    }
}

/// The reader's end. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReadyWatch(watch::Receiver<Readiness>);

impl ReadyWatch {
    /// The readiness now.
    pub fn get(&self) -> Readiness {
        self.0.borrow().clone()
    }

    /// Whether the service serves now.
    pub fn is_ready(&self) -> bool {
        self.0.borrow().phase == Phase::Ready
    }

    /// Waits until the service is ready; `Err` with its readiness when it failed or stopped
    /// first (or its sender is gone).
    pub async fn wait_ready(&mut self) -> Result<(), Readiness> {
        let r = self
            .0
            .wait_for(|r| r.phase != Phase::Starting)
            .await
            .map(|r| r.clone());
        match r {
            Ok(r) if r.phase == Phase::Ready => Ok(()),
            Ok(r) => Err(r),
            Err(_) => Err(self.get()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn since_moves_only_when_the_phase_does() {
        let tx = ReadySender::new(Phase::Starting, "waiting");
        let rx = tx.watch();
        let t0 = rx.get().since;
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        tx.set(Phase::Starting, "still waiting");
        assert_eq!(rx.get().since, t0);
        assert_eq!(rx.get().detail, "still waiting");
        tx.set(Phase::Ready, "up");
        assert_eq!(rx.get().since, t0 + std::time::Duration::from_secs(3));
        assert!(rx.is_ready());
    }

    #[tokio::test]
    async fn waiting_ends_ready_or_with_the_failure() {
        let tx = ReadySender::new(Phase::Starting, "");
        let mut rx = tx.watch();
        let waiter = tokio::spawn(async move { rx.wait_ready().await });
        tx.set(Phase::Failed, "no listener");
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(
            (err.phase, err.detail.as_str()),
            (Phase::Failed, "no listener")
        );
        let tx = ReadySender::new(Phase::Starting, "");
        let mut rx = tx.watch();
        tx.set(Phase::Ready, "");
        assert!(rx.wait_ready().await.is_ok());
    }
}
