//! HTTP endpoints: `GET /ready` (200 while every bootstrap step serves — the store only once it
//! takes writes —, 503 naming the first that does not; `?verbose` adds a line per bootstrap step:
//! its phase, for how long, and what it does or waits for), `GET /metrics` (Prometheus text),
//! `GET /` (a plain-text status page; browsers are sent to the live page), the live page's
//! routes under `/ui` ([`crate::ui`]) and `GET /v1/kv/…` (K/V reads, [`crate::kv`]).

use std::fmt::Write;
use std::future::IntoFuture;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::AgentState;

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (ui, ui_task) = crate::ui::routes(state.clone(), shutdown.clone());
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/", get(status))
        .merge(ui)
        .route("/v1/kv/", get(crate::kv::http_root))
        .route("/v1/kv/{*key}", get(crate::kv::http_key))
        .with_state(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .into_future();
    // The page's task ends with the shutdown, the server once its connections are done; the
    // server's end (an error included) ends `serve` at once.
    tokio::pin!(served, ui_task);
    tokio::select! {
        served = &mut served => served,
        () = &mut ui_task => served.await,
    }
}

async fn ready(State(state): State<Arc<AgentState>>, uri: Uri) -> impl IntoResponse {
    let overall = state.overall();
    let (code, mut body) = match &overall.missing {
        None => (StatusCode::OK, format!("ready for {:.1?}\n", overall.for_)),
        Some(what) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready for {:.1?}: {what}\n", overall.for_),
        ),
    };
    let verbose = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "verbose" || p.starts_with("verbose="))
    });
    if verbose {
        for step in state.steps() {
            let _ = match &step.readiness {
                Some(r) => writeln!(
                    body,
                    "  {:<8} {:<8} for {:.1?}: {}",
                    step.name,
                    r.phase.as_str(),
                    r.since.elapsed(),
                    r.detail
                ),
                None => writeln!(
                    body,
                    "  {:<8} pending  (after {})",
                    step.name,
                    if step.after.is_empty() {
                        "nothing".to_string()
                    } else {
                        step.after.join(", ")
                    }
                ),
            };
        }
    }
    (code, body)
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state),
    )
}

async fn status(State(state): State<Arc<AgentState>>, headers: HeaderMap) -> Response {
    if crate::ui::wants_page(&headers) {
        return Redirect::to(crate::ui::PATH).into_response();
    }
    let snap = state.flock.snapshot();
    let mut s = String::new();
    let me = snap.identity;
    let _ = writeln!(
        s,
        "crux {} node {} at {}",
        env!("CARGO_PKG_VERSION"),
        me.id,
        me.addr
    );
    let _ = writeln!(s, "bloc {}", state.settings.flock.bloc);
    let _ = writeln!(s, "ready {}", state.is_ready());
    for step in state.steps() {
        let took = if step.done {
            format!("{:?}", step.elapsed)
        } else {
            "-".into()
        };
        let _ = writeln!(s, "  step {:<8} {:<10} {}", step.name, took, step.detail);
    }
    match snap.leader {
        Some(l) => {
            let _ = writeln!(s, "leader {} at {} term {}", l.id, l.addr, l.term);
        }
        None => s.push_str("leader none\n"),
    }
    let _ = writeln!(s, "members ({} live):", snap.live);
    for m in &snap.members {
        let i = m.info;
        let _ = writeln!(
            s,
            "  {} {:<21} {:<7} inc {}",
            i.id,
            i.addr,
            i.state.as_str(),
            i.incarnation
        );
    }
    s.into_response()
}
