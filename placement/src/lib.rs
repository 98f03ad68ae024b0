//! Placement at run time: the proctor on the flock leader, the dean on every node, the node
//! gRPC services they talk through, and the local Placement API (`crux proctor …`,
//! `crux picket ps`).
//!
//! The logic is `crux_proctor` (sans-io: intent, the placement language, `reconcile`); this
//! crate drives it:
//!
//! ```text
//!  operator ── Placement.Apply (local API, local.rs) ──▶ store: proctor/intent + muster
//!                                                        │ Store::changes
//!  flock leader: proctor::supervise ── a Term per leadership term ── reconcile ──▶ Plan
//!                │ Dean.Sync {term, generation, assignment} over the node plane (node.rs)
//!  every node:   Dean ── muster check, pastiche fetch + pin, executable copy ──▶ picket
//! ```
//!
//! [`start`] builds this node's dean and hands the agent a [`crux_service::Service`] with two
//! tasks, `dean` (carries out the assignment) and `proctor` (a proctor for each term this node
//! leads), plus the handles the node gRPC server and the local API serve.
//!
//! **Never:** runs a proctor on a node that does not lead (one per term, stopped when the flock
//! moves leadership); lets a dean take an assignment of an older term than one it has seen; starts
//! an executable no muster entry names; reads the agent's config, the command line or the
//! environment (everything comes in [`Placement`]); knows the flock except through the
//! [`crux_service::FlockView`] the agent publishes.

use std::sync::Arc;

use crux_proto::grpc::proctor::v1 as pb;
use crux_service::{FlockWatch, Phase, Service};
use crux_transport::Transport;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub mod dean;
pub mod local;
pub mod node;
pub mod proctor;

pub use dean::{Dean, DeanParts};
pub use local::{BuiltinProc, Later, LocalParts, PlacementLocal};
pub use node::PlacementNode;

/// What placement is started with.
pub struct Placement {
    /// This node's dean.
    pub dean: DeanParts,
    /// The flock as this node sees it (who leads, who lives).
    pub flock: FlockWatch,
    /// This node's end of the node plane (the proctor calls the deans through it).
    pub transport: Transport,
    /// The node gRPC port (the same on every node of a bloc).
    pub grpc_port: u16,
    /// Where the proctor running here publishes its doneness (None while none runs).
    pub status: watch::Sender<Option<pb::StatusResponse>>,
    /// Stops the dean and the proctor.
    pub stop: CancellationToken,
}

/// Placement, started.
pub struct Started {
    /// Its tasks (`dean`, `proctor`), stop handle and readiness.
    pub service: Service,
    /// This node's dean (for `Dean.Sync` on the node gRPC port and the local API).
    pub dean: Arc<Dean>,
}

/// Builds this node's dean (its directory made, its last term read) and the proctor's
/// supervision; ready once they run. Fails only when the dean's directory cannot be made.
pub fn start(p: Placement) -> std::io::Result<Started> {
    let store = p.dean.store.clone();
    let dean = Dean::new(p.dean)?;
    let (service, ready) = Service::new("placement", p.stop.clone());
    let service = service.task("dean", dean.clone().run(p.stop.clone())).task(
        "proctor",
        proctor::supervise(
            p.flock,
            store,
            dean.clone(),
            p.transport,
            p.grpc_port,
            p.status,
            p.stop,
        ),
    );
    ready.set(Phase::Ready, "dean running; the proctor runs on the leader");
    Ok(Started { service, dean })
}
