//! `crux muster ...` and `crux store status`: the durable store from the command line.

use std::path::Path;

use anyhow::anyhow;
use crux_proto::grpc::reeve::v1 as pb;

use crate::client::{connect, status_error, JsonArg};

/// `crux muster ...`.
#[derive(Debug, clap::Subcommand)]
pub enum MusterCmd {
    /// Add (or replace) the runnable function of a horde's api instance.
    Add {
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
        /// The api.
        #[arg(long)]
        api: String,
        /// The instance.
        #[arg(long)]
        inst: String,
        /// The executable: a pastiche digest (`sha256:<hex>`).
        #[arg(long)]
        file: String,
        /// The function (entry point) the runner starts.
        #[arg(long)]
        function: String,
    },
    /// Entries by any of horde, api, inst.
    Search {
        /// Only this horde.
        #[arg(long, default_value = "")]
        horde: String,
        /// Only this api.
        #[arg(long, default_value = "")]
        api: String,
        /// Only this instance.
        #[arg(long, default_value = "")]
        inst: String,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Remove an entry.
    Rm {
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
        /// The api.
        #[arg(long)]
        api: String,
        /// The instance.
        #[arg(long)]
        inst: String,
    },
}

/// `crux store ...`.
#[derive(Debug, clap::Subcommand)]
pub enum StoreCmd {
    /// The Raft group: leader, term, voters, applied index, per-voter lag.
    Status(JsonArg),
}

/// Runs `crux muster`.
pub async fn muster(socket: &Path, cmd: &MusterCmd) -> anyhow::Result<i32> {
    let mut c = connect(socket).await?;
    match cmd {
        MusterCmd::Add {
            horde,
            api,
            inst,
            file,
            function,
        } => {
            c.muster_add(pb::MusterAddRequest {
                entry: Some(pb::MusterEntry {
                    horde: horde.clone(),
                    api: api.clone(),
                    inst: inst.clone(),
                    filename: file.clone(),
                    function: function.clone(),
                    timestamp_ms: 0,
                }),
            })
            .await
            .map_err(status_error)?;
            println!("added");
            Ok(0)
        }
        MusterCmd::Search {
            horde,
            api,
            inst,
            json,
        } => {
            let r = c
                .muster_search(pb::MusterSearchRequest {
                    horde: horde.clone(),
                    api: api.clone(),
                    inst: inst.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json {
                let v: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({"horde": e.horde, "api": e.api, "inst": e.inst,
                            "filename": e.filename, "function": e.function,
                            "timestamp_ms": e.timestamp_ms})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for e in &r.entries {
                    println!(
                        "{} {} {} {} {}",
                        e.horde, e.api, e.inst, e.filename, e.function
                    );
                }
                println!(
                    "{} entr{}",
                    r.entries.len(),
                    if r.entries.len() == 1 { "y" } else { "ies" }
                );
            }
            Ok(0)
        }
        MusterCmd::Rm { horde, api, inst } => {
            let r = c
                .muster_remove(pb::MusterRemoveRequest {
                    horde: horde.clone(),
                    api: api.clone(),
                    inst: inst.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.removed {
                println!("removed");
                Ok(0)
            } else {
                Err(anyhow!("no such muster entry"))
            }
        }
    }
}

/// Runs `crux store`.
pub async fn store(socket: &Path, cmd: &StoreCmd) -> anyhow::Result<i32> {
    let mut c = connect(socket).await?;
    match cmd {
        StoreCmd::Status(json) => {
            let s = c
                .store_status(pb::StoreStatusRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if json.json {
                let voters: Vec<_> = s.voters.iter().map(|v| v.addr.clone()).collect();
                let lag: serde_json::Map<String, serde_json::Value> = s
                    .voters
                    .iter()
                    .filter_map(|v| v.lag.map(|l| (v.addr.clone(), l.into())))
                    .collect();
                let v = serde_json::json!({
                    "leader_addr": s.leader_addr, "leader_id": s.leader_id, "term": s.term,
                    "voters": voters, "voter_ids": s.voters.iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
                    "last_applied": s.last_applied, "last_log": s.last_log, "lag": lag,
                    "initialized": s.initialized, "role": s.role,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if !s.initialized {
                    println!("the store is not initialized yet");
                    return Ok(0);
                }
                println!(
                    "leader {} ({}), term {}, applied {}, log {}",
                    s.leader_addr, s.leader_id, s.term, s.last_applied, s.last_log
                );
                for v in &s.voters {
                    let lag = v.lag.map(|l| format!("lag {l}")).unwrap_or_default();
                    println!("voter {} {} {lag}", v.addr, v.id);
                }
            }
            Ok(0)
        }
    }
}
