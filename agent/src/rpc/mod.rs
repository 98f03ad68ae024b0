//! The local API: the reeve gRPC service over the agent's Unix socket (mode 0660). Each call
//! is handed to the part of the agent it is about: the flock and its keyring ([`flock`]), the
//! registry (the reeve), the durable store (`crate::store`).

mod flock;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use crux_proto::grpc::reeve::v1 as pb;
use pb::reeve_server::{Reeve, ReeveServer};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

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

/// The services of the local socket, as reflection lists them and health answers for them.
pub const SERVICES: [&str; 6] = [
    pb::reeve_server::SERVICE_NAME,
    crux_proto::grpc::kv::v1::kv_server::SERVICE_NAME,
    crux_proto::grpc::fuse::v1::routes_server::SERVICE_NAME,
    crux_proto::grpc::pastiche::v1::cache_server::SERVICE_NAME,
    crux_proto::grpc::proctor::v1::placement_server::SERVICE_NAME,
    crux_proto::grpc::catalyst::v1::catalyst_server::SERVICE_NAME,
];

/// Serves the reeve API, pastiche's cache API and placement (once step 5 made it) on `listener`
/// until `shutdown` is cancelled, with reflection and health beside them. Connections go
/// through `crux_local` so that any stock gRPC client is answered, whatever `:authority` it
/// sends.
pub async fn serve(
    listener: UnixListener,
    state: Arc<AgentState>,
    cache: crux_pastiche::cache::CacheService,
    placement: tokio::sync::watch::Receiver<Option<crate::placement::PlacementLocal>>,
    catalyst: tokio::sync::watch::Receiver<Option<crux_catalyst::Bus>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (v1, v1alpha, health, reporter) = match crux_local::discovery(&SERVICES).await {
        Ok(d) => (
            Some(d.reflection_v1),
            Some(d.reflection_v1alpha),
            Some(d.health),
            Some(d.reporter),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "local API: no reflection or health (descriptors)");
            (None, None, None, None)
        }
    };
    let server = tonic::transport::Server::builder()
        .http2_max_header_list_size(crux_local::HEADER_LIST_MAX as u32)
        .max_concurrent_streams(crux_local::STREAMS_MAX)
        .layer(crux_local::CountLayer(state.local.clone()))
        .add_service(ReeveServer::new(Service {
            state: state.clone(),
        }))
        .add_service(crate::kv::KvService::server(state.store.clone()))
        .add_service(crux_fuse::api::RoutesService::server(
            state.store.clone(),
            state.reeve.clone(),
            state.fuse.clone(),
        ))
        .add_service(cache.into_server())
        .add_service(crate::placement::Later::new(placement.clone()).into_server())
        .add_service(crux_catalyst::grpc::CatalystService::server(catalyst))
        .add_optional_service(v1)
        .add_optional_service(v1alpha)
        .add_optional_service(health)
        .serve_with_incoming_shutdown(
            crux_local::incoming(listener, state.local.clone()),
            shutdown.clone().cancelled_owned(),
        );
    // Health follows placement while the server runs; the server's end (an error included)
    // ends `serve` at once.
    let health = placement_health(reporter, placement, shutdown);
    tokio::pin!(server, health);
    tokio::select! {
        served = &mut server => served,
        () = &mut health => server.await,
    }
}

/// Health says placement is SERVING once step 5 made it, NOT_SERVING before.
async fn placement_health(
    reporter: Option<tonic_health::server::HealthReporter>,
    mut placement: tokio::sync::watch::Receiver<Option<crate::placement::PlacementLocal>>,
    shutdown: CancellationToken,
) {
    let Some(reporter) = reporter else { return };
    let name = crux_proto::grpc::proctor::v1::placement_server::SERVICE_NAME;
    loop {
        let status = if placement.borrow_and_update().is_some() {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter.set_service_status(name, status).await;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            changed = placement.changed() => if changed.is_err() { return },
        }
    }
}

struct Service {
    state: Arc<AgentState>,
}

impl Service {
    fn check_ready(&self) -> Result<(), Status> {
        flock::check_ready(&self.state)
    }
}

#[tonic::async_trait]
impl Reeve for Service {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(flock::status(&self.state)))
    }

    async fn members(
        &self,
        _req: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        self.check_ready()?;
        Ok(Response::new(flock::members(&self.state)))
    }

    async fn leader(
        &self,
        _req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.check_ready()?;
        flock::leader(&self.state).map(Response::new)
    }

    async fn list_keys(
        &self,
        _req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Ok(Response::new(flock::list_keys(&self.state)))
    }

    async fn install_key(
        &self,
        req: Request<pb::InstallKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        flock::keyring_changed(
            &self.state,
            self.state.keys.install(&req.into_inner().key).await,
        )
    }

    async fn use_key(
        &self,
        req: Request<pb::UseKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        flock::keyring_changed(
            &self.state,
            self.state.keys.use_key(&req.into_inner().key).await,
        )
    }

    type HeartbeatStream = crux_reeve::HeartbeatStream;
    type WatchStream = crux_reeve::WatchStream;
    type DocWatchStream = crate::store::DocStream;
    type MonitorStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::LogLine, Status>> + Send + 'static>,
    >;

    async fn monitor(
        &self,
        req: Request<pb::MonitorRequest>,
    ) -> Result<Response<Self::MonitorStream>, Status> {
        use futures_util::StreamExt;
        let level =
            crate::logs::parse_level(&req.into_inner().level).map_err(Status::invalid_argument)?;
        let lines = self
            .state
            .ops
            .logs()
            .watch(level)
            .map_err(Status::resource_exhausted)?;
        Ok(Response::new(Box::pin(lines.map(Ok))))
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelResponse>, Status> {
        let req = req.into_inner();
        let revert = (req.revert_after_ms > 0)
            .then(|| std::time::Duration::from_millis(req.revert_after_ms));
        let logs = self.state.ops.logs();
        let previous = logs
            .set_filter(req.filter.trim(), revert)
            .map_err(Status::invalid_argument)?;
        tracing::info!(filter = %req.filter.trim(), was = %previous,
            revert_after_ms = req.revert_after_ms, "log filter changed");
        Ok(Response::new(pb::SetLogLevelResponse {
            previous,
            filter: logs.filter(),
        }))
    }

    async fn reload(
        &self,
        _req: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.state
            .ops
            .reload()
            .await
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    async fn debug_info(
        &self,
        _req: Request<pb::DebugInfoRequest>,
    ) -> Result<Response<pb::DebugInfoResponse>, Status> {
        let metrics = crate::metrics::render(&self.state);
        Ok(Response::new(self.state.ops.debug_info(metrics)))
    }

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
        flock::keyring_changed(
            &self.state,
            self.state.keys.remove(&req.into_inner().key).await,
        )
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        flock::revoke(&self.state, &req.into_inner().node)
            .await
            .map(Response::new)
    }
}
