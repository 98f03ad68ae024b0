//! The local API: the reeve gRPC service over the agent's Unix socket (mode 0660).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use crux_flock::MemberState;
use crux_proto::grpc::reeve::v1 as pb;
use pb::reeve_server::{Reeve, ReeveServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::keys::KeyEntry;
use crate::state::AgentState;

/// Socket file mode: owner and group (the `crux` group) may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds the socket at `path`: makes its directory, replaces a stale socket file (one nobody
/// answers on), refuses to take over a live one, and sets mode 0660.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another agent is serving the socket {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("setting mode of {}", path.display()))?;
    Ok(listener)
}

/// Serves the reeve API, pastiche's cache API and placement (once step 5 made it) on `listener`
/// until `shutdown` is cancelled.
pub async fn serve(
    listener: UnixListener,
    state: Arc<AgentState>,
    cache: crux_pastiche::cache::CacheService,
    placement: tokio::sync::watch::Receiver<Option<crate::placement::PlacementLocal>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ReeveServer::new(Service { state }))
        .add_service(cache.into_server())
        .add_service(crate::placement::Later::new(placement).into_server())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

struct Service {
    state: Arc<AgentState>,
}

impl Service {
    /// Live members a keyring change was sent to (this node included).
    fn spread(&self) -> u32 {
        self.state.flock.snapshot().live as u32
    }

    /// The answer to a keyring change: the keyring after it, and the members it spreads to.
    fn keyring_changed(
        &self,
        r: anyhow::Result<Vec<KeyEntry>>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        Ok(Response::new(pb::KeyringResponse {
            keys: keys_pb(r.map_err(keyring_status)?),
            nodes: self.spread(),
        }))
    }

    fn check_ready(&self) -> Result<(), Status> {
        if self.state.is_ready() {
            Ok(())
        } else {
            let step = self.state.pending_step().unwrap_or("shutdown");
            Err(Status::unavailable(format!(
                "agent not ready (bootstrap step {step})"
            )))
        }
    }
}

fn state_pb(s: MemberState) -> pb::MemberState {
    match s {
        MemberState::Alive => pb::MemberState::Alive,
        MemberState::Suspect => pb::MemberState::Suspect,
        MemberState::Dead => pb::MemberState::Dead,
        MemberState::Left => pb::MemberState::Left,
    }
}

fn keys_pb(keys: Vec<KeyEntry>) -> Vec<pb::Key> {
    keys.into_iter()
        .map(|k| pb::Key {
            id: k.id,
            primary: k.primary,
        })
        .collect()
}

fn keyring_status(e: anyhow::Error) -> Status {
    Status::failed_precondition(format!("{e:#}"))
}

#[tonic::async_trait]
impl Reeve for Service {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let snap = self.state.flock.snapshot();
        let steps = self
            .state
            .steps()
            .into_iter()
            .map(|s| pb::BootstrapStep {
                name: s.name.to_string(),
                done: s.done,
                elapsed_ms: s.elapsed.as_millis() as u64,
                detail: s.detail,
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            node_id: snap.identity.id.to_string(),
            boot_id: snap.identity.boot.to_string(),
            bloc: self.state.settings.flock.bloc.clone(),
            addr: snap.identity.addr.to_string(),
            ready: self.state.is_ready(),
            steps,
            live_members: snap.live as u64,
            key_epoch: self.state.key_epoch(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.state.uptime().as_millis() as u64,
        }))
    }

    async fn members(
        &self,
        _req: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.check_ready()?;
        let snap = self.state.flock.snapshot();
        let leader = snap.leader.map(|l| l.id);
        let members = snap
            .members
            .iter()
            .map(|m| pb::Member {
                id: m.info.id.to_string(),
                addr: m.info.addr.to_string(),
                state: state_pb(m.info.state) as i32,
                leader: Some(m.info.id) == leader,
                incarnation: m.info.incarnation,
                boot_id: m.info.boot.to_string(),
                self_: m.info.id == snap.identity.id,
                state_age_ms: snap.now.saturating_sub(m.since).as_millis() as u64,
            })
            .collect();
        Ok(Response::new(pb::MembersResponse { members }))
    }

    async fn leader(
        &self,
        _req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.check_ready()?;
        match self.state.flock.snapshot().leader {
            Some(l) => Ok(Response::new(pb::LeaderResponse {
                id: l.id.to_string(),
                addr: l.addr.to_string(),
                term: l.term,
            })),
            None => Err(Status::not_found("no leader known")),
        }
    }

    async fn list_keys(
        &self,
        _req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let keys = keys_pb(self.state.keys.list());
        Ok(Response::new(pb::ListKeysResponse { keys, nodes: 1 }))
    }

    async fn install_key(
        &self,
        req: Request<pb::InstallKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        self.keyring_changed(self.state.keys.install(&req.into_inner().key).await)
    }

    async fn use_key(
        &self,
        req: Request<pb::UseKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        self.keyring_changed(self.state.keys.use_key(&req.into_inner().key).await)
    }

    type HeartbeatStream = crux_reeve::HeartbeatStream;
    type WatchStream = crux_reeve::WatchStream;
    type DocWatchStream = crate::store::DocStream;

    async fn doc_watch(
        &self,
        req: Request<pb::DocWatchRequest>,
    ) -> Result<Response<Self::DocWatchStream>, Status> {
        Ok(Response::new(crate::store::doc_watch(
            &self.state.store,
            req.into_inner(),
        )))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.state
            .reeve
            .register(req.into_inner())
            .map(Response::new)
    }

    async fn heartbeat(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        Ok(self.state.reeve.heartbeat(req.into_inner()))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.state.reeve.deregister(&req.into_inner())?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        self.state
            .reeve
            .lookup(&req.into_inner())
            .map(Response::new)
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.state.reeve.watch(req.into_inner()).map(Response::new)
    }

    async fn services(
        &self,
        req: Request<pb::ServicesRequest>,
    ) -> Result<Response<pb::ServicesResponse>, Status> {
        let req = req.into_inner();
        if req.steward {
            return self
                .state
                .reeve
                .steward_services(&req)
                .await
                .map(Response::new);
        }
        Ok(Response::new(self.state.reeve.services(&req)))
    }

    async fn muster_add(
        &self,
        req: Request<pb::MusterAddRequest>,
    ) -> Result<Response<pb::MusterAddResponse>, Status> {
        crate::store::muster_add(&self.state.store, req.into_inner()).await?;
        Ok(Response::new(pb::MusterAddResponse {}))
    }

    async fn muster_search(
        &self,
        req: Request<pb::MusterSearchRequest>,
    ) -> Result<Response<pb::MusterSearchResponse>, Status> {
        let entries = crate::store::muster_search(&self.state.store, req.into_inner()).await?;
        Ok(Response::new(pb::MusterSearchResponse { entries }))
    }

    async fn muster_remove(
        &self,
        req: Request<pb::MusterRemoveRequest>,
    ) -> Result<Response<pb::MusterRemoveResponse>, Status> {
        let removed = crate::store::muster_remove(&self.state.store, req.into_inner()).await?;
        Ok(Response::new(pb::MusterRemoveResponse { removed }))
    }

    async fn doc_get(
        &self,
        req: Request<pb::DocGetRequest>,
    ) -> Result<Response<pb::DocGetResponse>, Status> {
        crate::store::doc_get(&self.state.store, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn doc_put(
        &self,
        req: Request<pb::DocPutRequest>,
    ) -> Result<Response<pb::DocPutResponse>, Status> {
        crate::store::doc_put(&self.state.store, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn store_status(
        &self,
        _req: Request<pb::StoreStatusRequest>,
    ) -> Result<Response<pb::StoreStatusResponse>, Status> {
        crate::store::store_status(
            &self.state.store,
            &self.state.flock,
            self.state.settings.grpc_port,
        )
        .await
        .map(Response::new)
    }

    async fn remove_key(
        &self,
        req: Request<pb::RemoveKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        self.keyring_changed(self.state.keys.remove(&req.into_inner().key).await)
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let text = req.into_inner().node;
        let id: crux_flock::NodeId = text.trim().parse().map_err(|_| {
            Status::invalid_argument(format!("{text:?} is not a node id (16 hex digits)"))
        })?;
        let snap = self.state.flock.snapshot();
        if id == snap.identity.id {
            return Err(Status::invalid_argument(
                "this node cannot revoke itself: revoke it from another member",
            ));
        }
        let Some(member) = snap.members.iter().find(|m| m.info.id == id) else {
            return Err(Status::not_found(format!("no member {id} is known here")));
        };
        let addr = member.info.addr.to_string();
        self.state
            .flock
            .command(crux_flock::Command::Revoke(id))
            .await
            .map_err(|_| Status::unavailable("the flock is stopping"))?;
        tracing::warn!(node = %id, %addr, "node revoked by an operator");
        Ok(Response::new(pb::RevokeResponse { addr }))
    }
}
