//! Placement on the local socket and the command line: `crux proctor apply|diff|status` and
//! `crux picket ps`. Applying an intent validates it (the placement language reports line and
//! column), checks that pastiche holds every artifact somewhere, and writes the intent and the
//! muster entries it names in one compare-and-swap write on the intent's generation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use crux_pastiche::digest::Digest;
use crux_proto::grpc::proctor::v1 as pb;
use crux_store::{Applied, Command, MusterEntry};
use serde_json::json;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::client::{channel, status_error, JsonArg};
use crate::dean::Dean;
use crate::proctor::{local_status, read_intent, INTENT_KEY};
use crate::state::AgentState;

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

/// The local Placement service.
#[derive(Clone)]
pub struct PlacementLocal {
    state: Arc<AgentState>,
    dean: Arc<Dean>,
    status: watch::Receiver<Option<pb::StatusResponse>>,
    builtins: Vec<BuiltinProc>,
}

impl PlacementLocal {
    /// The service over this node's dean and proctor status.
    pub fn new(
        state: Arc<AgentState>,
        dean: Arc<Dean>,
        status: watch::Receiver<Option<pb::StatusResponse>>,
        builtins: Vec<BuiltinProc>,
    ) -> PlacementLocal {
        PlacementLocal {
            state,
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
        let (old, generation) = read_intent(&self.state.store)
            .await
            .map_err(|e| Status::unavailable(format!("{e:#}")))?;
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
                .state
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
        let snap = self.state.flock.snapshot();
        let Some(leader) = snap.leader else {
            return Err(Status::unavailable("no flock leader is known"));
        };
        if leader.id == snap.identity.id {
            return local_status(&self.status);
        }
        let netid = std::net::SocketAddr::new(leader.addr.ip(), self.state.settings.grpc_port);
        let ch = self
            .state
            .transport
            .channel(netid, Some(snap.identity.addr.ip()), Duration::from_secs(2))
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
            .state
            .store
            .write(Command::Batch(cmds))
            .await
            .map_err(crate::store::status)?;
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

/// `crux proctor ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ProctorCmd {
    /// Store an intent file (TOML) as the flock's intent, by compare-and-swap on its
    /// generation, with the muster entries it names; prints what changed.
    Apply {
        /// The intent file.
        file: PathBuf,
        /// Apply only if the stored intent is at this generation (0: only if none is stored).
        #[arg(long)]
        if_generation: Option<u64>,
        /// Wait until every service is converged (exit 1 if one fails or the wait times out).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        json: JsonArg,
    },
    /// What applying the intent file would change.
    Diff {
        /// The intent file.
        file: PathBuf,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Doneness per service: converged, progressing or failed, for the intent's generation.
    Status(JsonArg),
}

/// `crux picket ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PicketCmd {
    /// What this node runs: built-in services and plugin processes.
    Ps(JsonArg),
}

async fn client(
    socket: &Path,
) -> anyhow::Result<pb::placement_client::PlacementClient<tonic::transport::Channel>> {
    Ok(pb::placement_client::PlacementClient::new(
        channel(socket, Some(Duration::from_secs(30))).await?,
    ))
}

fn read_file(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// The status as `crux proctor status --json` prints it.
pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    json!({
        "generation": s.generation,
        "leader": s.leader,
        "term": s.term,
        "services": s.services.iter().map(|v| json!({
            "horde": v.horde, "api": v.api, "inst": v.inst, "state": v.state,
            "desired": v.desired, "running": v.running, "nodes": v.nodes, "message": v.message,
        })).collect::<Vec<_>>(),
    })
}

fn print_status(s: &pb::StatusResponse) {
    println!(
        "intent generation {} (proctor on {}, term {})",
        s.generation, s.leader, s.term
    );
    let mut t = crate::client::table(&[
        "API", "INST", "STATE", "DESIRED", "RUNNING", "NODES", "MESSAGE",
    ]);
    for v in &s.services {
        t.add_row(vec![
            v.api.clone(),
            v.inst.clone(),
            v.state.clone(),
            v.desired.to_string(),
            v.running.to_string(),
            v.nodes.join(","),
            v.message.clone(),
        ]);
    }
    println!("{t}");
}

/// Runs `crux proctor`.
pub async fn proctor(socket: &Path, cmd: &ProctorCmd) -> anyhow::Result<i32> {
    let mut c = client(socket).await?;
    match cmd {
        ProctorCmd::Apply {
            file,
            if_generation,
            wait,
            timeout,
            json,
        } => {
            let toml = read_file(file)?;
            let r = c
                .apply(pb::ApplyRequest {
                    toml,
                    if_generation: *if_generation,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json && !wait {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"generation": r.generation, "changes": r.changes})
                    )?
                );
            } else if !json.json {
                for l in &r.changes {
                    println!("{l}");
                }
                println!("applied: intent generation {}", r.generation);
            }
            if !wait {
                return Ok(0);
            }
            let deadline = tokio::time::Instant::now() + *timeout;
            loop {
                if let Ok(s) = c.status(pb::StatusRequest {}).await {
                    let s = s.into_inner();
                    if s.generation >= r.generation {
                        let failed = s.services.iter().any(|v| v.state == "failed");
                        let done = s.services.iter().all(|v| v.state == "converged");
                        if failed || done {
                            if json.json {
                                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
                            } else {
                                print_status(&s);
                            }
                            return Ok(if failed { 1 } else { 0 });
                        }
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(anyhow!(
                        "not converged after {}: see `crux proctor status`",
                        humantime::format_duration(*timeout)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        ProctorCmd::Diff { file, json } => {
            let toml = read_file(file)?;
            let r = c
                .diff(pb::DiffRequest { toml })
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"generation": r.generation, "changes": r.changes})
                    )?
                );
            } else if r.changes.is_empty() {
                println!("no change (intent generation {})", r.generation);
            } else {
                for l in &r.changes {
                    println!("{l}");
                }
            }
            Ok(0)
        }
        ProctorCmd::Status(json) => {
            let s = c
                .status(pb::StatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                print_status(&s);
            }
            Ok(0)
        }
    }
}

/// Runs `crux picket`.
pub async fn picket(socket: &Path, cmd: &PicketCmd) -> anyhow::Result<i32> {
    let mut c = client(socket).await?;
    match cmd {
        PicketCmd::Ps(json) => {
            let r = c
                .ps(pb::PsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json {
                let v: Vec<_> = r
                    .procs
                    .iter()
                    .map(|p| {
                        json!({"name": p.name, "kind": p.kind, "horde": p.horde, "api": p.api,
                            "inst": p.inst, "artifact": p.artifact, "state": p.state,
                            "pid": p.pid, "restarts": p.restarts, "addr": p.addr,
                            "since_ms": p.since_ms, "detail": p.detail})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let mut t = crate::client::table(&[
                    "NAME", "KIND", "API", "INST", "STATE", "PID", "RESTARTS", "DETAIL",
                ]);
                for p in &r.procs {
                    t.add_row(vec![
                        p.name.clone(),
                        p.kind.clone(),
                        p.api.clone(),
                        p.inst.clone(),
                        p.state.clone(),
                        if p.pid == 0 {
                            "-".into()
                        } else {
                            p.pid.to_string()
                        },
                        p.restarts.to_string(),
                        p.detail.clone(),
                    ]);
                }
                println!("{t}");
            }
            Ok(0)
        }
    }
}
