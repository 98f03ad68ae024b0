//! HTTP endpoints: `GET /ready` (200 once the bootstrap is done, 503 before; `?verbose` adds a
//! line per bootstrap step: its phase, since when, and what it does or waits for), `GET /metrics`
//! (Prometheus text), `GET /` (a plain-text status page) and `GET /v1/kv/…` (K/V reads,
//! `crate::kv`).

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::IntoResponse;
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
    let app = Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/", get(status))
        .route("/v1/kv/", get(crate::kv::http_root))
        .route("/v1/kv/{*key}", get(crate::kv::http_key))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn ready(State(state): State<Arc<AgentState>>, uri: Uri) -> impl IntoResponse {
    let (code, mut body) = if state.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        let step = state.pending_step().unwrap_or("shutdown");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: bootstrap step {step}\n"),
        )
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

async fn status(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
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
    s
}
