//! `crux.fuse.v1.Routes` on the local socket: add, list, remove routes over the store's generic
//! resource path (type `route`), and the connected proxies. A route is checked
//! ([`RouteSpec::check`]) and its apis looked up in the registry before anything is written.

use std::sync::Arc;

use crux_proto::grpc::fuse::v1::{self as pb, routes_server};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_store::resource::{registry, Op, Outcome, ResourceId, ResourceQuery, Txn};
use crux_store::{grpc_status, Store};
use tonic::{Request, Response, Status};

use crate::ads::Board;
use crate::route::RouteSpec;
use crate::snapshot::Kind;

/// The horde routes live in when none is named.
pub const DEFAULT_HORDE: &str = "default";

fn horde(h: &str) -> String {
    if h.is_empty() {
        DEFAULT_HORDE.into()
    } else {
        h.into()
    }
}

fn id(horde: &str, name: &str) -> ResourceId {
    ResourceId {
        rtype: registry::ROUTE.name.into(),
        horde: horde.into(),
        name: name.into(),
    }
}

/// The routes service.
#[derive(Clone)]
pub struct RoutesService {
    store: Store,
    reeve: Arc<crux_reeve::Reeve>,
    board: Arc<Board>,
}

impl RoutesService {
    /// The tonic server.
    pub fn server(
        store: Store,
        reeve: Arc<crux_reeve::Reeve>,
        board: Arc<Board>,
    ) -> routes_server::RoutesServer<RoutesService> {
        routes_server::RoutesServer::new(RoutesService {
            store,
            reeve,
            board,
        })
    }

    /// Refuses a route whose api has no instance at all in the registry of `horde`.
    fn check_apis(&self, horde: &str, spec: &RouteSpec) -> Result<(), Status> {
        for t in &spec.to {
            let known = self
                .reeve
                .services(&rpb::ServicesRequest {
                    horde: horde.into(),
                    api: t.api.clone(),
                    ..Default::default()
                })
                .instances;
            if known.is_empty() {
                let all = self.reeve.services(&rpb::ServicesRequest {
                    horde: horde.into(),
                    api: String::new(),
                    ..Default::default()
                });
                let mut apis: Vec<String> = all.instances.into_iter().map(|i| i.api).collect();
                apis.dedup();
                return Err(Status::failed_precondition(format!(
                    "unknown api {:?} in horde {horde}: no instance of it is registered (known: {}); \
                     register one first, nothing was written",
                    t.api,
                    if apis.is_empty() {
                        "none".into()
                    } else {
                        apis.join(", ")
                    }
                )));
            }
            if let crate::route::Select::Inst(i) = &t.select {
                let found = self
                    .reeve
                    .services(&rpb::ServicesRequest {
                        horde: horde.into(),
                        api: t.api.clone(),
                        ..Default::default()
                    })
                    .instances
                    .iter()
                    .any(|x| &x.inst == i);
                if !found {
                    return Err(Status::failed_precondition(format!(
                        "unknown instance {i:?} of api {:?} in horde {horde}; nothing was written",
                        t.api
                    )));
                }
            }
        }
        Ok(())
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Listener => "LDS",
        Kind::Route => "RDS",
        Kind::Cluster => "CDS",
        Kind::Endpoint => "EDS",
    }
}

#[tonic::async_trait]
impl routes_server::Routes for RoutesService {
    async fn add(&self, req: Request<pb::AddRequest>) -> Result<Response<pb::AddResponse>, Status> {
        let req = req.into_inner();
        let h = horde(&req.horde);
        let route = req
            .route
            .ok_or_else(|| Status::invalid_argument("no route given"))?;
        let spec = RouteSpec::from_pb(&route).map_err(|e| Status::invalid_argument(e.0))?;
        self.check_apis(&h, &spec)?;
        let op = Op::Put {
            id: id(&h, &route.name),
            flags: 0,
            spec: spec.encode(),
            if_version: req.cas,
        };
        let out = self
            .store
            .resource_txn(Txn::new(vec![op]), false)
            .await
            .map_err(grpc_status)?;
        Ok(Response::new(match out {
            Outcome::Applied { index, .. } => pb::AddResponse {
                written: true,
                index,
            },
            Outcome::Failed { current, .. } => pb::AddResponse {
                written: false,
                index: current,
            },
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let q = ResourceQuery::List {
            rtype: registry::ROUTE.name.into(),
            horde: horde(&req.horde),
            prefix: req.prefix,
        };
        let r = self
            .store
            .resource_read(q, !req.stale)
            .await
            .map_err(grpc_status)?;
        let mut routes = Vec::with_capacity(r.items.len());
        for item in r.items {
            let spec = RouteSpec::decode(&item.spec)
                .map_err(|e| Status::internal(format!("stored route {:?}: {e}", item.id.name)))?;
            routes.push(spec.to_pb(&item.id.name, item.version));
        }
        Ok(Response::new(pb::ListResponse {
            routes,
            index: r.index,
        }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let req = req.into_inner();
        crate::route::check_name("route name", &req.name)
            .map_err(|e| Status::invalid_argument(e.0))?;
        let op = Op::Delete {
            id: id(&horde(&req.horde), &req.name),
            if_version: None,
        };
        let out = self
            .store
            .resource_txn(Txn::new(vec![op]), false)
            .await
            .map_err(grpc_status)?;
        Ok(Response::new(match out {
            Outcome::Applied { index, results } => pb::RemoveResponse {
                removed: matches!(
                    results.first(),
                    Some(crux_store::resource::OpResult::Deleted(n)) if *n > 0
                ),
                index,
            },
            Outcome::Failed { current, .. } => pb::RemoveResponse {
                removed: false,
                index: current,
            },
        }))
    }

    async fn proxies(
        &self,
        _req: Request<pb::ProxiesRequest>,
    ) -> Result<Response<pb::ProxiesResponse>, Status> {
        let now = tokio::time::Instant::now();
        let proxies = self
            .board
            .proxies()
            .into_iter()
            .map(|p| pb::Proxy {
                node_id: p.node_id,
                peer: p.peer,
                delta: p.delta,
                types: p
                    .types
                    .into_iter()
                    .map(|(k, t)| pb::TypeState {
                        type_url: kind_name(k).into(),
                        sent: t.sent,
                        acked: t.acked,
                        nacks: t.nacks,
                        last_error: t.last_error,
                        subscribed: t.subscribed as u32,
                        wildcard: t.wildcard,
                        unacked_ms: t
                            .waiting_since
                            .map_or(0, |s| now.duration_since(s).as_millis() as u64),
                    })
                    .collect(),
            })
            .collect();
        let snap = self.board.snapshot();
        Ok(Response::new(pb::ProxiesResponse {
            ads_addr: self.board.addr().map(|a| a.to_string()).unwrap_or_default(),
            proxies,
            versions: Kind::ALL
                .into_iter()
                .map(|k| (kind_name(k).to_string(), snap.of(k).version.clone()))
                .collect(),
            problems: snap.problems.clone(),
        }))
    }
}
