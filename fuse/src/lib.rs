//! Crux Fuse: routes in the store, endpoints from the registry, served to proxies as xDS.
//!
//! ```text
//!   crux route add/ls/rm ─▶ local API (api::RoutesService) ─▶ store, type `route` (Raft)
//!                                                                 │ resource watch
//!   registry replica (reeve) ── replica_changes ───────────┐      ▼
//!                                                         controller: snapshot::build
//!                                                                 │ watch<Arc<Snapshot>>
//!   envoy / gRPC xDS clients ◀── ADS (SotW + delta) ◀── ads::Ads ◀┘
//! ```
//!
//! Every agent runs Fuse over its own copy of the routes and its own registry replica, so a proxy
//! talks to the agent of its node and keeps its config while the leader moves. The controller is
//! level-triggered: on any change of the routes or the registry (and every
//! [`RESYNC`]) it rebuilds the whole snapshot from what it holds; an unchanged snapshot reaches
//! no stream.
//!
//! **Never:** writes a route that [`route::RouteSpec::check`] refuses or that names an api the
//! registry does not know; sends a proxy a resource version it rejected; lets one slow or silent
//! proxy hold up another.

pub mod ads;
pub mod api;
pub mod route;
pub mod snapshot;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::reeve::v1 as rpb;
use crux_service::{Phase, Service};
use crux_store::resource::{registry, Event, Filter, WatchEvent};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use ads::{Ads, AdsConfig, Board};
pub use snapshot::Snapshot;

/// The controller rebuilds the snapshot at least this often (a missed change costs this much).
pub const RESYNC: Duration = Duration::from_secs(5);

/// Default ADS address: loopback, the port after the agent's HTTP port.
pub const DEFAULT_ADS_BIND: &str = "127.0.0.1:7703";

/// What `start` needs.
pub struct Context {
    /// The store (routes).
    pub store: crux_store::Store,
    /// This node's registry replica (endpoints).
    pub reeve: Arc<crux_reeve::Reeve>,
    /// The horde whose routes this agent serves.
    pub horde: String,
    /// The bound ADS listener (None: ADS not served, the snapshot is still kept).
    pub listener: Option<TcpListener>,
    /// ADS settings.
    pub ads: AdsConfig,
    /// Shared with the routes API.
    pub board: Arc<Board>,
    /// Cancelled to stop.
    pub stop: CancellationToken,
}

/// Starts the controller and (with a listener) the ADS server. Ready once the routes of the
/// store were read once.
pub fn start(ctx: Context) -> Service {
    let (service, ready) = Service::new("fuse", ctx.stop.clone());
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let addr = ctx.listener.as_ref().and_then(|l| l.local_addr().ok());
    ctx.board.set_addr(addr);
    let controller = controller(Controller {
        store: ctx.store.clone(),
        reeve: ctx.reeve.clone(),
        horde: ctx.horde.clone(),
        tx,
        ready,
        addr,
        board: ctx.board.clone(),
        stop: ctx.stop.clone(),
    });
    let mut service = service.task("controller", controller);
    if let Some(listener) = ctx.listener {
        let ads = Ads::new(rx, ctx.board.clone(), ctx.ads.clone(), ctx.stop.clone());
        let stop = ctx.stop.clone();
        service = service.task("ads", async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let served = tonic::transport::Server::builder()
                .add_service(ads.server())
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                warn!(error = %e, "fuse: the ADS server stopped");
            }
        });
    }
    service
}

/// Applies a store watch event to the routes held. Unreadable specs are skipped with a warning
/// (the API never writes one).
fn apply(routes: &mut BTreeMap<String, route::RouteSpec>, e: WatchEvent) {
    let put = |routes: &mut BTreeMap<String, route::RouteSpec>, name: String, spec: &[u8]| {
        match route::RouteSpec::decode(spec) {
            Ok(s) => {
                routes.insert(name, s);
            }
            Err(e) => {
                warn!(route = %name, error = %e, "fuse: stored route unreadable; not served");
                routes.remove(&name);
            }
        }
    };
    match e {
        WatchEvent::Snapshot { items, .. } => {
            routes.clear();
            for r in items {
                put(routes, r.id.name, &r.spec);
            }
        }
        WatchEvent::Changes { events, .. } => {
            for ev in events {
                match ev {
                    Event::Put(r) => put(routes, r.id.name, &r.spec),
                    Event::Deleted(id) => {
                        routes.remove(&id.name);
                    }
                }
            }
        }
    }
}

/// What the controller task owns.
struct Controller {
    store: crux_store::Store,
    reeve: Arc<crux_reeve::Reeve>,
    horde: String,
    tx: watch::Sender<Arc<Snapshot>>,
    ready: crux_service::ReadySender,
    addr: Option<SocketAddr>,
    board: Arc<Board>,
    stop: CancellationToken,
}

async fn controller(c: Controller) {
    let Controller {
        store,
        reeve,
        horde,
        tx,
        ready,
        addr,
        board,
        stop,
    } = c;
    let filter = Filter {
        rtype: registry::ROUTE.name.into(),
        horde: horde.clone(),
        name: String::new(),
        prefix: true,
    };
    let mut watch = store.resource_watch(filter.clone(), None);
    let mut changes = reeve.replica_changes();
    let mut routes: BTreeMap<String, route::RouteSpec> = BTreeMap::new();
    let mut listed = false;
    // The routes changed since the last build (else only the endpoints are built again).
    let mut routes_changed = true;
    let mut announced = false;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            e = watch.recv() => match e {
                Some(e) => {
                    apply(&mut routes, e);
                    while let Ok(e) = watch.try_recv() {
                        apply(&mut routes, e);
                    }
                    listed = true;
                    routes_changed = true;
                }
                None => {
                    warn!("fuse: the store's route watch ended; watching again");
                    watch = store.resource_watch(filter.clone(), None);
                    continue;
                }
            },
            c = changes.recv() => {
                if let Err(broadcast::error::RecvError::Closed) = c {
                    changes = reeve.replica_changes();
                }
                // Coalesce a burst of registry changes into one rebuild.
                while changes.try_recv().is_ok() {}
            }
            _ = resync.tick() => {}
        }
        if !listed {
            continue;
        }
        let instances = reeve.services(&rpb::ServicesRequest::default()).instances;
        let list: Vec<(String, route::RouteSpec)> =
            routes.iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        let snap = if routes_changed {
            snapshot::build(&horde, &list, &instances)
        } else {
            snapshot::endpoints_only(&tx.borrow(), &horde, &list, &instances)
        };
        routes_changed = false;
        let changed = tx.send_if_modified(|old| {
            if **old == snap {
                false
            } else {
                *old = Arc::new(snap);
                true
            }
        });
        if changed {
            board.set_snapshot(tx.borrow().clone());
            let s = tx.borrow();
            debug!(
                routes = list.len(),
                listeners = s.of(snapshot::Kind::Listener).items.len(),
                clusters = s.of(snapshot::Kind::Cluster).items.len(),
                "fuse: new snapshot"
            );
        }
        if !announced {
            announced = true;
            let detail = match addr {
                Some(a) => format!("{} routes; ADS on {a}", list.len()),
                None => format!("{} routes; ADS not served", list.len()),
            };
            info!(%detail, "fuse: serving");
            ready.set(Phase::Ready, detail);
        }
    }
}
