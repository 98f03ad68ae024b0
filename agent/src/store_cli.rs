//! `crux muster ...`, `crux store status` and `crux store recover`: the durable store from the
//! command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use crux_proto::grpc::reeve::v1 as pb;

use std::time::Duration;

use crate::client::{connect, status_error, wait_for_steps, JsonArg};

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
    /// Rebuild the store's Raft group from this node's data when a majority of its voters is gone
    /// for good (run with the agent stopped).
    ///
    /// Raft needs a majority of its voters. If most of them are lost for good (disks gone, nodes
    /// never coming back), nothing can be written or read consistently, and the flock will not
    /// replace them by itself. Recover so:
    ///
    ///  1. Stop the agent on every surviving node that held the store (voters and learners).
    ///  2. On each, run `crux store recover --config F --dry-run`: it changes nothing and prints
    ///     the last log entry (term, index). Pick the survivor with the highest (term, index).
    ///  3. On that one: `crux store recover --config F`. It keeps every entry up to its last log
    ///     entry (also any the lost majority may not have committed), makes this node the only
    ///     voter of the group, and prints what it kept and the old members it dropped.
    ///  4. On every other survivor: `crux store recover --config F --discard`. Its store is
    ///     renamed to `store.discarded-<ms>` (delete it when all is well) and it will join the
    ///     recovered group as an empty node, never start a group of its own. A survivor that is
    ///     not discarded still counts the old voters and must not be started.
    ///  5. Start the recovered node first and wait until `crux store status` shows it as the
    ///     leader; then start the others. The flock leader adds them as learners and grows the
    ///     voters back to 3 (5 in flocks of 7 or more) from the live members.
    ///
    /// Nodes whose data is lost need nothing: they start empty and join like any new node.
    #[command(verbatim_doc_comment)]
    Recover(RecoverArgs),
}

/// `crux store recover` arguments.
#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The agent's config file (its data dir and address are read from it).
    #[arg(
        long,
        conflicts_with = "data_dir",
        required_unless_present = "data_dir"
    )]
    pub config: Option<PathBuf>,
    /// The agent's data dir (the one holding `node-id` and `store/`), instead of --config; the
    /// node's address is then the one the old group knew it by.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Only print what the store holds (last log term and index first); change nothing.
    #[arg(long, conflicts_with = "discard")]
    pub dry_run: bool,
    /// Set this node's store aside instead, so that it joins the recovered group as an empty node.
    #[arg(long)]
    pub discard: bool,
    #[command(flatten)]
    pub json: JsonArg,
}

/// A store call's error: the agent's message (e.g. "no quorum: …", "write not confirmed: …")
/// whenever it gave one.
fn store_error(s: tonic::Status) -> anyhow::Error {
    if s.code() == tonic::Code::DeadlineExceeded && !s.message().is_empty() {
        return anyhow!("{}", s.message());
    }
    status_error(s)
}

/// Runs `crux muster`, once the store serves (waiting up to `wait`).
pub async fn muster(socket: &Path, wait: Duration, cmd: &MusterCmd) -> anyhow::Result<i32> {
    wait_for_steps(socket, &["store"], wait).await?;
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
            .map_err(store_error)?;
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
                .map_err(store_error)?
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
                .map_err(store_error)?
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

/// The data dir and, when a config gives it, the node's store address (NetID).
fn recover_target(a: &RecoverArgs) -> anyhow::Result<(PathBuf, Option<SocketAddr>)> {
    if let Some(dir) = &a.data_dir {
        return Ok((dir.clone(), None));
    }
    let path = a
        .config
        .as_ref()
        .ok_or_else(|| anyhow!("--config or --data-dir is required"))?;
    let settings = crate::config::RawConfig::from_file(path)
        .and_then(|raw| raw.validate())
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let ip = settings
        .advertise
        .map(|a| a.ip())
        .or_else(|| (!settings.bind.ip().is_unspecified()).then(|| settings.bind.ip()));
    Ok((
        settings.data_dir,
        ip.map(|ip| SocketAddr::new(ip, settings.grpc_port)),
    ))
}

fn node_id(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(crate::identity::NODE_ID_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "{}: {e} (is {} the agent's data dir?); nothing was changed",
            path.display(),
            data_dir.display()
        )
    })?;
    u64::from_str_radix(text.trim(), 16)
        .map_err(|_| anyhow!("{}: not a node id (16 hex digits)", path.display()))
}

fn member_list(ms: &[crux_store::Member]) -> String {
    if ms.is_empty() {
        return "none".into();
    }
    ms.iter()
        .map(|m| format!("{:016x} ({})", m.id, m.netid))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_held(r: &crux_store::recover::Recovery) {
    println!(
        "last log entry: term {}, index {} (committed index recorded: {})",
        r.last_log_term,
        r.last_log_index,
        r.committed_index
            .map_or_else(|| "none".to_string(), |c| c.to_string())
    );
    println!("muster entries: {}", r.muster_entries);
    println!("documents: {}", r.documents.len());
    for (key, generation) in &r.documents {
        println!("  {key} (generation {generation})");
    }
    println!("old voters: {}", member_list(&r.old_voters));
    println!("old learners: {}", member_list(&r.old_learners));
}

/// Runs `crux store recover` (offline: the agent must be stopped).
fn recover(a: &RecoverArgs) -> anyhow::Result<i32> {
    use crux_store::recover as rec;
    let (data_dir, netid) = recover_target(a)?;
    let node = node_id(&data_dir)?;
    // Where the agent keeps its store (agent.rs opens `<data_dir>/store`).
    let dir = data_dir.join("store");
    if a.discard {
        let (held, aside) = rec::discard(&dir, node)?;
        if a.json.json {
            let v = serde_json::json!({"node": format!("{node:016x}"), "discarded": true,
                "moved_to": aside.display().to_string(), "held": held});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("node {node:016x}: store set aside in {}", aside.display());
            match &held {
                Some(r) => print_held(r),
                None => println!("(it held no group)"),
            }
            println!(
                "at its next start this node joins the recovered group as an empty node; delete \
                 {} once the group is healthy",
                aside.display()
            );
        }
        return Ok(0);
    }
    let r = if a.dry_run {
        rec::inspect(&dir, node, netid)?
    } else {
        rec::recover(&dir, node, netid)?
    };
    if a.json.json {
        let mut v = serde_json::to_value(&r)?;
        v["recovered"] = (!a.dry_run).into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if a.dry_run {
        println!("node {node:016x}: dry run, nothing was changed");
    } else {
        println!(
            "node {node:016x} at {} is now the only voter of the store; kept every entry up to \
             its last ({} replayed after its last snapshot)",
            r.netid, r.replayed_entries
        );
    }
    print_held(&r);
    if a.dry_run {
        println!("would drop: {}", member_list(&r.dropped));
    } else {
        println!("dropped: {}", member_list(&r.dropped));
        println!(
            "next: run `crux store recover --discard` on every other survivor, start this agent, \
             wait until `crux store status` shows it leads (term > {}), then start the others",
            r.vote_term.max(r.last_log_term)
        );
    }
    Ok(0)
}

/// Runs `crux store` (`status` once the agent answers, waiting up to `wait` — not for the store
/// to serve: the status is how one sees why it does not; `recover` offline).
pub async fn store(socket: &Path, wait: Duration, cmd: &StoreCmd) -> anyhow::Result<i32> {
    if let StoreCmd::Recover(a) = cmd {
        return recover(a);
    }
    wait_for_steps(socket, &[], wait).await?;
    let mut c = connect(socket).await?;
    match cmd {
        StoreCmd::Recover(a) => recover(a),
        StoreCmd::Status(json) => {
            let s = c
                .store_status(pb::StoreStatusRequest {})
                .await
                .map_err(store_error)?
                .into_inner();
            // The group's id, read from the group this node uses (through its leader); none while
            // the group is not named or cannot be read.
            let group = match c
                .doc_get(pb::DocGetRequest {
                    key: crux_store::GROUP_KEY.into(),
                })
                .await
            {
                Ok(r) if r.get_ref().found => Some(r.into_inner().value),
                _ => None,
            };
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
                    "initialized": s.initialized, "role": s.role, "group": group,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if !s.initialized {
                    println!("the store is not initialized yet");
                    return Ok(0);
                }
                println!(
                    "group {}, leader {} ({}), term {}, applied {}, log {}",
                    group.as_deref().unwrap_or("(not named yet)"),
                    s.leader_addr,
                    s.leader_id,
                    s.term,
                    s.last_applied,
                    s.last_log
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
