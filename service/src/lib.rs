//! The contract between the agent and the services it starts.
//!
//! A Crux service (the store's voter supervision, the proctor, the dean, …) lives in its own
//! library crate and is started by one function, `start(ctx) -> Service`. The context is plain
//! data and handles the agent made (the store, the transport, a [`FlockWatch`], a stop token);
//! the [`Service`] that comes back is:
//!
//! * **its tasks, not yet spawned**: the futures that make up the service, each with a name. The
//!   agent spawns them into the one `JoinSet` it owns, so no task of a service is ever detached,
//!   one that ends early is reported by name, and shutdown waits for each of them;
//! * **a stop handle** ([`Service::stop`]): cancels the token the service's tasks watch; they
//!   return soon after;
//! * **a readiness signal** ([`ReadyWatch`]): a [`Phase`] (starting, ready, degraded, failed,
//!   stopping, stopped) and since when it holds, which the service sets through its
//!   [`ReadySender`].
//!
//! ```text
//!   agent ──ctx──▶ service::start ──▶ Service { tasks, stop, ready }
//!     │                                 │ tasks ──▶ agent's JoinSet (owned, named)
//!     │ stop()  ───────────────────────▶│ token cancelled → tasks return
//!     │ ready().get() ◀─────────────────│ Readiness { phase, since, detail }
//! ```
//!
//! The flock is seen through a [`FlockView`]: the few facts services need (this node, the
//! leader and its term, the members with their liveness), published by the agent from the flock
//! driver, so that a service crate does not depend on the flock.
//!
//! **Never:** knows the agent (its config, its CLI, its bootstrap table) or any service; spawns
//! a task; reads a clock other than tokio's.

use std::future::Future;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

mod ready;
mod view;

pub use ready::{Phase, Readiness, ReadySender, ReadyWatch};
pub use view::{node_name, FlockView, FlockWatch, Leader, Member};

/// A task of a service, not yet spawned.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// A started service: its tasks (for the agent to spawn and own), a handle to stop it and its
/// readiness.
pub struct Service {
    name: &'static str,
    stop: CancellationToken,
    ready: ReadyWatch,
    tasks: Vec<(&'static str, Task)>,
}

impl Service {
    /// A service named `name` whose tasks return once `stop` is cancelled, and the sender of its
    /// readiness (which starts [`Phase::Starting`]).
    pub fn new(name: &'static str, stop: CancellationToken) -> (Service, ReadySender) {
        let sender = ReadySender::new(Phase::Starting, "");
        let service = Service {
            name,
            stop,
            ready: sender.watch(),
            tasks: Vec::new(),
        };
        (service, sender)
    }

    /// Adds a task named `name` (the agent reports it by `<service>/<name>`).
    pub fn task(
        mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Service {
        self.tasks.push((name, Box::pin(task)));
        self
    }

    /// The service's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Asks every task of the service to return (they watch [`Service::stop_token`]).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The token the service's tasks watch.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The service's readiness.
    pub fn ready(&self) -> ReadyWatch {
        self.ready.clone()
    }

    /// The tasks not yet taken, to be spawned by their owner.
    pub fn take_tasks(&mut self) -> Vec<(&'static str, Task)> {
        std::mem::take(&mut self.tasks)
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field(
                "tasks",
                &self.tasks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .field("ready", &self.ready.get())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_service_hands_over_its_tasks_and_stops_them_through_its_token() {
        let stop = CancellationToken::new();
        let (mut service, ready) = Service::new("s", stop.clone());
        let watched = stop.clone();
        service = service.task("wait", async move { watched.cancelled().await });
        assert_eq!(service.ready().get().phase, Phase::Starting);
        let tasks = service.take_tasks();
        assert_eq!(tasks.iter().map(|(n, _)| *n).collect::<Vec<_>>(), ["wait"]);
        assert!(service.take_tasks().is_empty(), "taken once");
        let mut set = tokio::task::JoinSet::new();
        for (_, t) in tasks {
            set.spawn(t);
        }
        ready.set(Phase::Ready, "up");
        assert!(service.ready().is_ready());
        service.stop();
        assert!(set.join_next().await.unwrap().is_ok());
    }
}
