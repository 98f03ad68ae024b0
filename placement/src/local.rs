//! Placement on the local socket: `Apply` (parse and check an intent — the placement language
//! reports line and column —, require every artifact in some node's pastiche, and write the
//! intent and the muster entries it names in one compare-and-swap write on the intent's
//! generation), `Diff`, `Status` (this node's proctor, or the leader's over the node plane) and
//! `Ps` (the built-ins and the plugins picket runs).

use std::sync::Arc;
use std::time::Duration;

use crux_pastiche::digest::Digest;
use crux_proto::grpc::proctor::v1 as pb;
use crux_reeve::Reeve;
use crux_service::FlockWatch;
use crux_store::{Applied, Command, MusterEntry, Store};
use crux_transport::Transport;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::dean::Dean;
use crate::node::local_status;
use crate::proctor::{read_intent, INTENT_KEY};

/// A built-in service as `crux picket ps` lists it.
#[derive(Clone, Debug)]
pub struct BuiltinProc {
    /// Its name.
    pub name: String,
    /// The api and instance it registers.
    pub api: String,
    /// Instance.
    pub inst: String,
    /// Where it serves.
    pub addr: String,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
}

/// What the local Placement service reads and calls.
#[derive(Clone)]
pub struct LocalParts {
    /// The durable store (the intent, the muster).
    pub store: Store,
    /// This node's reeve (who holds an artifact).
    pub reeve: Arc<Reeve>,
    /// The flock (where the leader is).
    pub flock: FlockWatch,
    /// This node's end of the node plane (the leader's proctor status).
    pub transport: Transport,
    /// The node gRPC port.
    pub grpc_port: u16,
}

/// The local Placement service.
#[derive(Clone)]
pub struct PlacementLocal {
    parts: LocalParts,
    dean: Arc<Dean>,
    status: watch::Receiver<Option<pb::StatusResponse>>,
    builtins: watch::Receiver<Vec<BuiltinProc>>,
}

impl PlacementLocal {
    /// The service over this node's dean and proctor status; `builtins` are the built-in
    /// services `ps` lists.
    pub fn new(
        parts: LocalParts,
        dean: Arc<Dean>,
        status: watch::Receiver<Option<pb::StatusResponse>>,
        builtins: watch::Receiver<Vec<BuiltinProc>>,
    ) -> PlacementLocal {
        PlacementLocal {
            parts,
            dean,
            status,
            builtins,
        }
    }

    /// Parses and checks an intent; returns it with the stored one, its generation and the diff.
    async fn prepare(
        &self,
        toml: &str,
    ) -> Result<(crux_proctor::Intent, u64, Vec<String>), Status> {
        let intent = crux_proctor::parse_intent(toml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (old, generation) = read_intent(&self.parts.store)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let changes = crux_proctor::diff(&old, &intent);
        Ok((intent, generation, changes))
    }

    /// Every artifact the intent names must be in some node's pastiche.
    async fn check_artifacts(&self, intent: &crux_proctor::Intent) -> Result<(), Status> {
        let pastiche = self.dean.pastiche();
        for s in &intent.services {
            let d: Digest = s
                .artifact
                .parse()
                .map_err(|e| Status::invalid_argument(format!("artifact {}: {e}", s.artifact)))?;
            if pastiche.has(&d) {
                continue;
            }
            let holders = self
                .parts
                .reeve
                .holders(&s.artifact)
                .await
                .unwrap_or_default();
            if holders.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "service {} ({}): artifact {} is in no node's pastiche; put it there first \
                     (crux pastiche put FILE)",
                    s.api, s.inst, s.artifact
                )));
            }
        }
        Ok(())
    }

    /// The proctor's status: this node's, or the leader's.
    async fn status(&self) -> Result<pb::StatusResponse, Status> {
        if let Ok(s) = local_status(&self.status) {
            return Ok(s);
        }
        let snap = self.parts.flock.borrow().clone();
        let Some(leader) = snap.leader else {
            return Err(Status::unavailable("no flock leader is known"));
        };
        if leader.id == snap.me {
            return local_status(&self.status);
        }
        let netid = std::net::SocketAddr::new(leader.addr.ip(), self.parts.grpc_port);
        let ch = self
            .parts
            .transport
            .channel(netid, Some(snap.addr.ip()), Duration::from_secs(2))
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach the leader at {netid}: {e}")))?;
        let mut c = pb::proctor_client::ProctorClient::new(ch);
        let mut r = Request::new(pb::StatusRequest {});
        r.set_timeout(Duration::from_secs(3));
        c.status(r).await.map(Response::into_inner)
    }
}

#[tonic::async_trait]
impl pb::placement_server::Placement for PlacementLocal {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let req = req.into_inner();
        let (intent, generation, changes) = self.prepare(&req.toml).await?;
        if let Some(want) = req.if_generation {
            if want != generation {
                return Err(Status::aborted(format!(
                    "the stored intent is at generation {generation}, not {want}: nothing applied"
                )));
            }
        }
        self.check_artifacts(&intent).await?;
        let now = crux_store::now_ms();
        let mut cmds = vec![Command::DocPut {
            key: INTENT_KEY.into(),
            value: intent.to_json(),
            if_generation: Some(generation),
        }];
        for s in &intent.services {
            cmds.push(Command::MusterAdd(MusterEntry {
                horde: s.horde.clone(),
                api: s.api.clone(),
                inst: s.inst.clone(),
                filename: s.artifact.clone(),
                function: s.function.clone(),
                timestamp_ms: now,
            }));
        }
        let applied = self
            .parts
            .store
            .write(Command::Batch(cmds))
            .await
            .map_err(crux_store::grpc_status)?;
        let generation = match applied {
            Applied::Batch(answers) => match answers.first() {
                Some(Applied::Doc { generation, .. }) => *generation,
                other => {
                    return Err(Status::internal(format!(
                        "unexpected answer to the intent write: {other:?}"
                    )))
                }
            },
            Applied::Conflict { current, .. } => {
                return Err(Status::aborted(format!(
                    "the intent changed meanwhile (now generation {current}): nothing applied; \
                     look at `crux proctor diff` and apply again"
                )))
            }
            other => {
                return Err(Status::internal(format!(
                    "unexpected answer to the intent write: {other:?}"
                )))
            }
        };
        let pastiche = self.dean.pastiche();
        for s in &intent.services {
            if let Ok(d) = s.artifact.parse::<Digest>() {
                if pastiche.has(&d) {
                    let _ = pastiche.pin(&d);
                }
            }
        }
        tracing::info!(generation, changes = changes.len(), "intent applied");
        Ok(Response::new(pb::ApplyResponse {
            generation,
            changes,
        }))
    }

    async fn diff(
        &self,
        req: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        let (_, generation, changes) = self.prepare(&req.into_inner().toml).await?;
        Ok(Response::new(pb::DiffResponse {
            generation,
            changes,
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        PlacementLocal::status(self).await.map(Response::new)
    }

    async fn ps(&self, _req: Request<pb::PsRequest>) -> Result<Response<pb::PsResponse>, Status> {
        let mut procs: Vec<pb::Proc> = self
            .builtins
            .borrow()
            .iter()
            .map(|b| pb::Proc {
                name: b.name.clone(),
                kind: "builtin".into(),
                horde: "default".into(),
                api: b.api.clone(),
                inst: b.inst.clone(),
                state: "running".into(),
                addr: b.addr.clone(),
                since_ms: b.since_ms,
                ..Default::default()
            })
            .collect();
        for u in self.dean.picket().units() {
            procs.push(pb::Proc {
                name: u.spec.key.clone(),
                kind: "plugin".into(),
                horde: u.spec.horde.clone(),
                api: u.spec.api.clone(),
                inst: u.spec.inst.clone(),
                artifact: u.spec.digest.clone(),
                state: u.state.to_string(),
                pid: u.pid.unwrap_or(0),
                restarts: u.restarts,
                addr: u.addr.clone().unwrap_or_default(),
                since_ms: u.since_ms,
                detail: u.detail.clone(),
            });
        }
        Ok(Response::new(pb::PsResponse { procs }))
    }
}

/// The local Placement service before step 5 made it: calls are refused as "not ready" until
/// then.
#[derive(Clone)]
pub struct Later {
    inner: watch::Receiver<Option<PlacementLocal>>,
}

impl Later {
    /// Serves whatever `inner` holds.
    pub fn new(inner: watch::Receiver<Option<PlacementLocal>>) -> Later {
        Later { inner }
    }

    /// As a tonic service.
    pub fn into_server(self) -> pb::placement_server::PlacementServer<Later> {
        pb::placement_server::PlacementServer::new(self)
    }

    fn get(&self) -> Result<PlacementLocal, Status> {
        self.inner.borrow().clone().ok_or_else(|| {
            Status::unavailable("agent not ready (bootstrap step proctor): placement is not up yet")
        })
    }
}

#[tonic::async_trait]
impl pb::placement_server::Placement for Later {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        pb::placement_server::Placement::apply(&self.get()?, req).await
    }

    async fn diff(
        &self,
        req: Request<pb::DiffRequest>,
    ) -> Result<Response<pb::DiffResponse>, Status> {
        pb::placement_server::Placement::diff(&self.get()?, req).await
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        pb::placement_server::Placement::status(&self.get()?, req).await
    }

    async fn ps(&self, req: Request<pb::PsRequest>) -> Result<Response<pb::PsResponse>, Status> {
        pb::placement_server::Placement::ps(&self.get()?, req).await
    }
}
