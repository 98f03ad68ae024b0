//! Placement on the command line: `crux proctor apply|diff|status` and `crux picket ps`, clients
//! of the local Placement service (`crux_placement::local`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use crux_proto::grpc::proctor::v1 as pb;
use serde_json::json;

use crate::client::{channel, status_error, JsonArg};

pub use crux_placement::local::{BuiltinProc, Later, PlacementLocal};

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
        converge: bool,
        /// How long --converge waits.
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

/// Runs `crux proctor`, once the store and the proctor serve (waiting up to `wait`).
pub async fn proctor(socket: &Path, wait: Duration, cmd: &ProctorCmd) -> anyhow::Result<i32> {
    crate::client::wait_for_steps(socket, &["store", "proctor"], wait).await?;
    let mut c = client(socket).await?;
    match cmd {
        ProctorCmd::Apply {
            file,
            if_generation,
            converge,
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
            if json.json && !converge {
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
            if !converge {
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

/// Runs `crux picket`, once picket and the proctor (whose step serves the local placement API)
/// serve (waiting up to `wait`).
pub async fn picket(socket: &Path, wait: Duration, cmd: &PicketCmd) -> anyhow::Result<i32> {
    crate::client::wait_for_steps(socket, &["picket", "proctor"], wait).await?;
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
