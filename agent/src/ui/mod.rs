//! The live web page at `/ui`: what this agent knows, on one page that follows it without a
//! reload.
//!
//! ```text
//!  flock driver ── snapshots, events ──▶ follow_flock ────┐
//!  reeve (registry), store, local API                      ├─▶ sections (watch) ─▶ GET /ui/events
//!    (placement, pastiche) ── every second ─▶ follow_services ─┘    one SSE stream per open page
//!  GET /ui: the whole page, every section read at once
//! ```
//!
//! The page is plain HTML rendered here ([`render`]), one `<section>` per part: the agent and
//! its readiness, the nodes (state, leader, this node's key epoch and its age), the registry by
//! api, the store (leader, voters, log index), the proctor's intents (desired, running,
//! doneness), this node's pastiche cache and the recent events ([`journal`]). The script
//! (`ui.js`) only swaps in a section's HTML when the agent sends a new one over server-sent
//! events: each event carries the sections that changed since the last it sent to that page.
//! Everything is in the binary (`include_str!`); the page loads nothing from elsewhere.
//!
//! Placement and the pastiche cache are read through the local API, as `crux proctor status`
//! and `crux pastiche ls` read them: the page needs nothing from the bootstrap steps, and says
//! "not serving yet" where the CLI would. The services are read only while a page is open
//! (the registry also without one, for the events); the flock is followed from the start.

mod journal;
mod render;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use crux_flock::driver::Snapshot;
use crux_proto::grpc::pastiche::v1 as cpb;
use crux_proto::grpc::proctor::v1 as ppb;
use crux_proto::grpc::reeve::v1 as rpb;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::state::AgentState;
use journal::Journal;

/// Where the page is served.
pub const PATH: &str = "/ui";

/// How often the services are read while a page is open.
const SERVICES_EVERY: Duration = Duration::from_secs(1);

/// How long one reading of a service may take before the page says it did not answer (the
/// store's status may ask its leader, 2 s at most).
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A browser asks for HTML first; curl and scripts do not.
pub fn wants_page(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// The page's routes, and the task that follows the agent for them (it ends with `shutdown`,
/// as the open pages' streams do).
pub fn routes(
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) -> (
    Router<Arc<AgentState>>,
    impl Future<Output = ()> + Send + 'static,
) {
    let ui = Arc::new(Ui {
        state,
        journal: Mutex::new(Journal::default()),
        sections: watch::channel(Sections::new()).0,
        shutdown,
    });
    let router = Router::new()
        .route(PATH, get(page))
        .route("/ui/events", get(events))
        .route("/ui/ui.js", get(script))
        .with_state(ui.clone());
    let task = async move {
        tokio::join!(ui.follow_flock(), ui.follow_services());
    };
    (router, task)
}

/// Each section's HTML, by the id of its `<section>`.
type Sections = BTreeMap<&'static str, String>;

struct Ui {
    state: Arc<AgentState>,
    journal: Mutex<Journal>,
    /// The sections as last rendered (rendered only while a page is open).
    sections: watch::Sender<Sections>,
    shutdown: CancellationToken,
}

/// What one reading of the services found.
struct Services {
    registry: rpb::ServicesResponse,
    store: Result<rpb::StoreStatusResponse, String>,
    placement: Result<ppb::StatusResponse, String>,
    pastiche: Result<cpb::ListResponse, String>,
}

impl Ui {
    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("journal lock")
    }

    /// Whether a page is open (its stream follows the sections).
    fn watched(&self) -> bool {
        self.sections.receiver_count() > 0
    }

    /// Hands `parts` to the open pages (those that changed wake them).
    fn publish(&self, parts: Vec<(&'static str, String)>) {
        self.sections.send_if_modified(|s| {
            let mut changed = false;
            for (id, html) in parts {
                if s.get(id) != Some(&html) {
                    s.insert(id, html);
                    changed = true;
                }
            }
            changed
        });
    }

    /// Notes what a flock snapshot says (readiness, key epoch) in the journal; returns how long
    /// ago the key epoch changed.
    fn note_flock(&self, snap: &Snapshot) -> Option<Duration> {
        let now_ms = crux_store::now_ms();
        let mut j = self.journal();
        j.ready(now_ms, self.state.is_ready());
        j.key_epoch(now_ms, snap.key_epoch, snap.now)
    }

    /// The header, the nodes and the events, from a flock snapshot.
    fn flock_sections(
        &self,
        snap: &Snapshot,
        rotated: Option<Duration>,
    ) -> Vec<(&'static str, String)> {
        let header = render::Header {
            version: env!("CARGO_PKG_VERSION"),
            bloc: &self.state.settings.flock.bloc,
            ready: self.state.is_ready(),
            pending: self.state.pending_step(),
            uptime: self.state.uptime(),
        };
        vec![
            ("agent", render::header(&header, snap)),
            ("nodes", render::nodes(snap, rotated)),
            ("events", render::events(self.journal().recent())),
        ]
    }

    /// Follows the flock: every snapshot and event goes to the journal, and, while a page is
    /// open, to the sections.
    async fn follow_flock(&self) {
        let mut snaps = self.state.flock.watch();
        let mut events = self.state.flock.subscribe();
        let mut events_open = true;
        loop {
            let snap = snaps.borrow_and_update().clone();
            let rotated = self.note_flock(&snap);
            if self.watched() {
                self.publish(self.flock_sections(&snap, rotated));
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                r = snaps.changed() => if r.is_err() { return },
                e = events.recv(), if events_open => {
                    let now_ms = crux_store::now_ms();
                    match e {
                        Ok(e) => self.journal().flock_event(now_ms, &e),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            self.journal().missed(now_ms, n)
                        }
                        Err(broadcast::error::RecvError::Closed) => events_open = false,
                    }
                }
            }
        }
    }

    /// Reads the services every second: the registry always (for the events), the rest while
    /// a page is open.
    async fn follow_services(&self) {
        let mut tick = tokio::time::interval(SERVICES_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut local = None;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.watched() {
                let registry = self.state.reeve.services(&rpb::ServicesRequest::default());
                self.journal()
                    .registry(crux_store::now_ms(), &registry.instances);
                continue;
            }
            let read = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return,
                read = self.read_services(&mut local) => read,
            };
            let parts = self.service_sections(&read);
            self.publish(parts);
        }
    }

    /// Reads every service at once, each within [`READ_TIMEOUT`]; `local` keeps a channel to
    /// the local API between readings.
    async fn read_services(&self, local: &mut Option<Channel>) -> Services {
        let registry = self.state.reeve.services(&rpb::ServicesRequest::default());
        let store = bounded(async {
            crate::store::store_status(
                &self.state.store,
                &self.state.flock,
                self.state.settings.grpc_port,
            )
            .await
            .map_err(|s| s.message().to_string())
        });
        let channel = match local.clone() {
            Some(c) => Ok(c),
            None => crux_reeve::client::socket_channel(&self.state.settings.socket, READ_TIMEOUT)
                .await
                .map_err(|e| format!("the local API is not serving yet ({e})")),
        };
        let (store, placement, pastiche) = match &channel {
            Ok(ch) => {
                let placement = bounded(async {
                    ppb::placement_client::PlacementClient::new(ch.clone())
                        .status(ppb::StatusRequest {})
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|s| s.message().to_string())
                });
                let pastiche = bounded(async {
                    cpb::cache_client::CacheClient::new(ch.clone())
                        .list(cpb::ListRequest {})
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|s| s.message().to_string())
                });
                tokio::join!(store, placement, pastiche)
            }
            Err(e) => (store.await, Err(e.clone()), Err(e.clone())),
        };
        *local = channel.ok();
        Services {
            registry,
            store,
            placement,
            pastiche,
        }
    }

    /// The registry, store, placement and pastiche sections, and the events they add.
    fn service_sections(&self, read: &Services) -> Vec<(&'static str, String)> {
        let now_ms = crux_store::now_ms();
        let mut j = self.journal();
        j.registry(now_ms, &read.registry.instances);
        if let Ok(s) = &read.store {
            j.store_leader(now_ms, &s.leader_id);
        }
        vec![
            ("registry", render::registry(&read.registry)),
            ("store", render::store(&read.store)),
            ("placement", render::placement(&read.placement)),
            ("pastiche", render::pastiche(&read.pastiche, now_ms)),
            ("events", render::events(j.recent())),
        ]
    }
}

/// `fut`'s answer, or an error once [`READ_TIMEOUT`] passed.
async fn bounded<T>(fut: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(READ_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {READ_TIMEOUT:?}")))
}

/// The page as a template: each `<!--id-->` is where a section's HTML goes.
const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("ui.js");

/// `GET /ui`: the whole page, every section read now.
async fn page(State(ui): State<Arc<Ui>>) -> impl IntoResponse {
    let snap = ui.state.flock.snapshot();
    let rotated = ui.note_flock(&snap);
    let mut parts = ui.flock_sections(&snap, rotated);
    let read = ui.read_services(&mut None).await;
    parts.extend(ui.service_sections(&read));
    let mut html = PAGE.replace("<!--node-->", &snap.identity.id.to_string());
    for (id, section) in parts {
        html = html.replace(&format!("<!--{id}-->"), &section);
    }
    ([(header::CACHE_CONTROL, "no-store")], Html(html))
}

/// `GET /ui/ui.js`.
async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// `GET /ui/events`: server-sent events, each named `sections` and carrying a JSON object of
/// the sections that changed since the last event of this stream (the first: every section
/// rendered so far). Ends when the agent shuts down; the page then reconnects by itself.
async fn events(State(ui): State<Arc<Ui>>) -> impl IntoResponse {
    struct Follow {
        sections: watch::Receiver<Sections>,
        sent: Sections,
        shutdown: CancellationToken,
        first: bool,
    }
    let follow = Follow {
        sections: ui.sections.subscribe(),
        sent: Sections::new(),
        shutdown: ui.shutdown.clone(),
        first: true,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            let changed: Vec<(&'static str, String)> = {
                let now = f.sections.borrow_and_update();
                now.iter()
                    .filter(|(id, html)| f.sent.get(*id) != Some(*html))
                    .map(|(id, html)| (*id, html.clone()))
                    .collect()
            };
            if !changed.is_empty() || f.first {
                let mut data = serde_json::Map::new();
                for (id, html) in changed {
                    data.insert(id.to_string(), html.clone().into());
                    f.sent.insert(id, html);
                }
                let mut event = SseEvent::default()
                    .event("sections")
                    .data(serde_json::Value::Object(data).to_string());
                if f.first {
                    // A page whose stream broke comes back quickly.
                    event = event.retry(Duration::from_secs(1));
                    f.first = false;
                }
                return Some((Ok::<_, Infallible>(event), f));
            }
            tokio::select! {
                biased;
                _ = f.shutdown.cancelled() => return None,
                r = f.sections.changed() => if r.is_err() { return None },
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
