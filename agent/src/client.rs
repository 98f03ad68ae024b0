//! The CLI's side of the local socket: `crux members`, `crux leader`, `crux keys ...`.
//! Tables for people, `--json` for scripts, a clear message and a non-zero exit on every error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use crux_proto::grpc::reeve::v1 as pb;
use hyper_util::rt::TokioIo;
use pb::reeve_client::ReeveClient;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long the CLI waits for the agent.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the CLI finds its agent.
#[derive(Clone, Debug, clap::Args)]
pub struct SocketArg {
    /// The agent's local socket.
    #[arg(long, global = true, env = "CRUX_SOCKET", default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// How long a command waits for the parts of the agent it needs.
#[derive(Clone, Debug, clap::Args)]
pub struct WaitArg {
    /// How long to wait for the parts of the agent this command needs (its socket, the store,
    /// the proctor, …) to serve, showing what they wait for; then fail naming what is missing.
    /// 0 does not wait.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// How often a waiting command asks the agent again.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// What `crux` calls a bootstrap step in its messages.
fn part_name(step: &str) -> String {
    match step {
        "reeve" => "the registry".into(),
        other => format!("the {other}"),
    }
}

/// Waits until the agent at `socket` answers and each of `steps` (bootstrap steps: `store`,
/// `proctor`, …) serves, for up to `wait`, with a progress line on stderr (`waiting for the
/// store: electing a leader (term 3; 3 of 3 voters reachable)… 1.2 s`; redrawn on a terminal,
/// a line per change otherwise). A step that served once and is degraded now (an outage, not a
/// start under way) is not waited for: the command runs and reports the outage itself. Fails
/// naming what is missing once `wait` has passed, or at once for a step that failed.
pub async fn wait_for_steps(socket: &Path, steps: &[&str], wait: Duration) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    if wait.is_zero() {
        return Ok(());
    }
    let started = tokio::time::Instant::now();
    let deadline = started + wait;
    let tty = std::io::stderr().is_terminal();
    let mut shown = String::new();
    let mut drawn = false;
    let clear = |drawn: bool| {
        if drawn {
            eprint!("\r\x1b[2K");
        }
    };
    loop {
        // What is missing now: (whose, what), or None when every step serves.
        let missing: Option<(String, String)> = match connect(socket).await {
            Err(e) => Some(("the agent".into(), format!("{e:#}"))),
            Ok(mut c) => match c.status(pb::StatusRequest {}).await {
                Err(e) => Some(("the agent".into(), format!("{:#}", status_error(e)))),
                Ok(r) => {
                    let r = r.into_inner();
                    let mut missing = None;
                    for want in steps {
                        let Some(st) = r.steps.iter().find(|st| st.name == *want) else {
                            clear(drawn);
                            anyhow::bail!(
                                "the agent has no bootstrap step {want:?} (older agent?)"
                            );
                        };
                        match st.phase.as_str() {
                            "ready" | "degraded" => {}
                            // An agent too old to report phases: its steps serve once done.
                            "" if st.done => {}
                            "failed" => {
                                clear(drawn);
                                anyhow::bail!("{} failed: {}", part_name(want), st.phase_detail);
                            }
                            "" | "pending" => {
                                missing = Some((
                                    part_name(want),
                                    format!(
                                        "the agent is starting (bootstrap step {want} pending)"
                                    ),
                                ));
                                break;
                            }
                            _ => {
                                missing = Some((part_name(want), st.phase_detail.clone()));
                                break;
                            }
                        }
                    }
                    missing
                }
            },
        };
        let Some((whose, what)) = missing else {
            clear(drawn);
            return Ok(());
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            clear(drawn);
            anyhow::bail!(
                "{whose} is not ready after {}: {what}",
                humantime::format_duration(Duration::from_secs(wait.as_secs().max(1)))
            );
        }
        let line = format!("waiting for {whose}: {what}");
        let waited = now.duration_since(started).as_secs_f64();
        if tty {
            eprint!("\r\x1b[2K{line}… {waited:.1} s");
            let _ = std::io::stderr().flush();
            drawn = true;
        } else if line != shown {
            eprintln!("{line}… {waited:.1} s");
        }
        shown = line;
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
}

/// Output format flag.
#[derive(Clone, Debug, clap::Args)]
pub struct JsonArg {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Connects to the agent's socket, with errors a person can act on.
pub async fn connect(path: &Path) -> anyhow::Result<ReeveClient<Channel>> {
    Ok(ReeveClient::new(channel(path, Some(CALL_TIMEOUT)).await?))
}

/// A channel to the agent's socket, with errors a person can act on. `request_timeout` bounds
/// each call until its answer starts (None for calls that may rightly take long, such as a
/// pastiche get that pulls a large blob first).
pub async fn channel(path: &Path, request_timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!(
            "no agent socket at {} (is `crux agent` running? It opens the socket once it is in \
             a flock. Use --socket or CRUX_SOCKET to name another)",
            path.display()
        ),
        _ => anyhow!("cannot reach agent socket {}: {e}", path.display()),
    })?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(anyhow!("{} is not a socket", path.display()));
    }
    let owned = path.to_path_buf();
    let mut endpoint = Endpoint::from_static("http://crux.local").connect_timeout(CALL_TIMEOUT);
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| {
            let io = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .map(|io| io.kind());
            match io {
                Some(std::io::ErrorKind::PermissionDenied) => anyhow!(
                    "permission denied on {} (join the socket's group, or run as its owner)",
                    path.display()
                ),
                Some(std::io::ErrorKind::ConnectionRefused) => anyhow!(
                    "agent socket {} refuses connections (the agent is not running)",
                    path.display()
                ),
                _ => anyhow!("cannot connect to agent socket {}: {e}", path.display()),
            }
        })
}

/// A gRPC error as a message for people.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable => anyhow!("{}", s.message()),
        tonic::Code::NotFound => anyhow!("{}", s.message()),
        tonic::Code::Unimplemented => {
            anyhow!("the agent does not support this call (older agent?)")
        }
        tonic::Code::DeadlineExceeded => anyhow!("the agent did not answer in time"),
        _ => anyhow!("{}", s.message()),
    }
}

/// One member as `crux members --json` prints it.
#[derive(Debug, Serialize)]
pub struct MemberJson {
    /// Node id (16 hex digits).
    pub id: String,
    /// Flock address, host:port.
    pub addr: String,
    /// alive, suspect, dead or left.
    pub state: String,
    /// Whether it is the leader this agent follows.
    pub leader: bool,
    /// SWIM incarnation.
    pub incarnation: u64,
    /// Boot id.
    pub boot_id: String,
    /// Whether it is the answering agent itself.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// Lower-case state name.
pub fn state_name(s: i32) -> &'static str {
    match pb::MemberState::try_from(s) {
        Ok(pb::MemberState::Alive) => "alive",
        Ok(pb::MemberState::Suspect) => "suspect",
        Ok(pb::MemberState::Dead) => "dead",
        Ok(pb::MemberState::Left) => "left",
        _ => "unknown",
    }
}

/// A table in the CLI's style.
pub(crate) fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_header(header.to_vec());
    t
}

fn fmt_age(ms: u64) -> String {
    let d = Duration::from_secs(ms / 1000);
    if d.is_zero() {
        "<1s".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// `crux members`.
pub async fn members(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let resp = c
        .members(pb::MembersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let members: Vec<MemberJson> = resp
        .members
        .iter()
        .map(|m| MemberJson {
            id: m.id.clone(),
            addr: m.addr.clone(),
            state: state_name(m.state).into(),
            leader: m.leader,
            incarnation: m.incarnation,
            boot_id: m.boot_id.clone(),
            is_self: m.self_,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let mut t = table(&["NODE", "ADDRESS", "STATE", "LEADER", "INCARNATION", "FOR"]);
    for (m, raw) in members.iter().zip(&resp.members) {
        let id = if m.is_self {
            format!("{} (self)", m.id)
        } else {
            m.id.clone()
        };
        let leader = if m.leader { "leader" } else { "" };
        t.add_row(vec![
            id,
            m.addr.clone(),
            m.state.clone(),
            leader.into(),
            m.incarnation.to_string(),
            fmt_age(raw.state_age_ms),
        ]);
    }
    println!("{t}");
    Ok(())
}

/// `crux leader`.
pub async fn leader(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let l = c
        .leader(pb::LeaderRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let v = serde_json::json!({ "id": l.id, "addr": l.addr, "term": l.term });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let mut t = table(&["LEADER", "ADDRESS", "TERM"]);
        t.add_row(vec![l.id, l.addr, l.term.to_string()]);
        println!("{t}");
    }
    Ok(())
}

/// `crux node ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum NodeCmd {
    /// Revoke a member: every member forgets it and keeps it out, its node-plane connections
    /// close, and it shuts down. Rotate the secondary key after it (install, use, remove) so that
    /// the revoked machine, which still holds the old key, cannot come back under a new identity.
    Revoke {
        /// The node id (16 hex digits, as `crux members` shows it).
        id: String,
    },
}

/// `crux node ...`.
pub async fn node(socket: &Path, cmd: &NodeCmd) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    match cmd {
        NodeCmd::Revoke { id } => {
            let r = c
                .revoke(pb::RevokeRequest { node: id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "revoked node {id} ({}): the flock forgets it and keeps it out; its node-plane \
                 connections close.\nTo keep the machine out for good, rotate the secondary key: \
                 crux keys install KEY, crux keys use KEY, crux keys remove OLD.",
                r.addr
            );
            Ok(())
        }
    }
}

/// `crux keys ...` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// List the keyring's keys (ids, never key material).
    List(JsonArg),
    /// Add a key (base64, from `crux keygen`) to the keyring.
    Install {
        /// The key.
        key: String,
    },
    /// Make an installed key the primary.
    Use {
        /// The key or its id.
        key: String,
    },
    /// Remove a key that is not the primary.
    Remove {
        /// The key or its id.
        key: String,
    },
}

fn print_keys(keys: &[pb::Key], nodes: u32, json: bool) -> anyhow::Result<()> {
    if json {
        let v: Vec<_> = keys
            .iter()
            .map(|k| serde_json::json!({ "id": k.id, "primary": k.primary }))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = table(&["KEY ID", "PRIMARY"]);
    for k in keys {
        t.add_row(vec![
            k.id.clone(),
            if k.primary {
                "primary".into()
            } else {
                String::new()
            },
        ]);
    }
    println!("{t}");
    println!("keyring of {nodes} node(s)");
    Ok(())
}

/// `crux keys`.
pub async fn keys(socket: &Path, cmd: &KeysCmd) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    match cmd {
        KeysCmd::List(j) => {
            let r = c
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            print_keys(&r.keys, r.nodes, j.json)
        }
        KeysCmd::Install { key } => {
            let r = c
                .install_key(pb::InstallKeyRequest { key: key.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("installed");
            print_keys(&r.keys, r.nodes, false)
        }
        KeysCmd::Use { key } => {
            let r = c
                .use_key(pb::UseKeyRequest { key: key.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("primary key changed");
            print_keys(&r.keys, r.nodes, false)
        }
        KeysCmd::Remove { key } => {
            let r = c
                .remove_key(pb::RemoveKeyRequest { key: key.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("removed");
            print_keys(&r.keys, r.nodes, false)
        }
    }
}

/// `crux status` (agent identity, whether it is ready and for how long, and each bootstrap step
/// with its phase and for how long).
pub async fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let s = c
        .status(pb::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let steps: Vec<_> = s
            .steps
            .iter()
            .map(|st| {
                serde_json::json!({"name": st.name, "done": st.done,
                    "elapsed_ms": st.elapsed_ms, "detail": st.detail, "phase": st.phase,
                    "phase_for_ms": st.phase_for_ms, "phase_detail": st.phase_detail})
            })
            .collect();
        let v = serde_json::json!({
            "node_id": s.node_id, "boot_id": s.boot_id, "bloc": s.bloc, "addr": s.addr,
            "ready": s.ready, "ready_for_ms": s.ready_for_ms, "not_ready": s.not_ready,
            "bootstrapped": s.bootstrapped, "live_members": s.live_members,
            "key_epoch": s.key_epoch, "version": s.version, "uptime_ms": s.uptime_ms,
            "steps": steps, "log_filter": s.log_filter,
            "log_filter_reverts_in_ms": s.log_filter_reverts_in_ms,
            "log_filter_reverts_to": s.log_filter_reverts_to,
            "node_attributes": s.node_attributes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "node {} (boot {}) at {}, bloc {:?}",
        s.node_id, s.boot_id, s.addr, s.bloc
    );
    println!(
        "crux {}, up {}, {} live member(s)",
        s.version,
        fmt_age(s.uptime_ms),
        s.live_members
    );
    if s.ready {
        println!("ready for {}", fmt_age(s.ready_for_ms));
    } else {
        println!("not ready for {}: {}", fmt_age(s.ready_for_ms), s.not_ready);
    }
    if s.log_filter_reverts_in_ms > 0 {
        println!(
            "log filter {} (reverts to {} in {})",
            s.log_filter,
            s.log_filter_reverts_to,
            fmt_age(s.log_filter_reverts_in_ms)
        );
    } else if !s.log_filter.is_empty() {
        println!("log filter {}", s.log_filter);
    }
    let mut t = table(&["STEP", "DONE", "TOOK", "PHASE", "FOR", "NOW"]);
    for st in &s.steps {
        t.add_row(vec![
            st.name.clone(),
            if st.done { "yes".into() } else { "no".into() },
            format!("{} ms", st.elapsed_ms),
            st.phase.clone(),
            fmt_age(st.phase_for_ms),
            if st.phase_detail.is_empty() {
                st.detail.clone()
            } else {
                st.phase_detail.clone()
            },
        ]);
    }
    println!("{t}");
    Ok(())
}

/// Runs a client future on a small runtime.
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(f)
}

/// One instance as `crux lookup --json` and `crux services --json` print it.
#[derive(Debug, Serialize)]
pub struct InstanceJson {
    /// Instance id.
    pub id: String,
    /// API served.
    pub api: String,
    /// Instance name.
    pub inst: String,
    /// NetID, host:port.
    pub addr: String,
    /// Horde.
    pub horde: String,
    /// Node id it registered on.
    pub node: String,
    /// starting, running, stopping or unknown.
    pub state: String,
    /// healthy, degraded or unhealthy.
    pub health: String,
    /// Running and healthy.
    pub live: bool,
    /// Metadata.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Registry revision of its last change.
    pub revision: u64,
}

fn instance_json(i: &crux_proto::grpc::steward::v1::Instance) -> InstanceJson {
    InstanceJson {
        id: i.id.clone(),
        api: i.api.clone(),
        inst: i.inst.clone(),
        addr: i.addr.clone(),
        horde: i.horde.clone(),
        node: i.node.clone(),
        state: crux_steward::select::state_name(i.state).into(),
        health: crux_steward::select::health_name(i.health).into(),
        live: crux_steward::select::is_live(i),
        metadata: i.metadata.clone().into_iter().collect(),
        revision: i.revision,
    }
}

fn print_instances(
    list: &[crux_proto::grpc::steward::v1::Instance],
    json: bool,
    linked: bool,
) -> anyhow::Result<()> {
    let rows: Vec<InstanceJson> = list.iter().map(instance_json).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut t = table(&[
        "HORDE", "API", "INST", "ADDRESS", "NODE", "STATE", "HEALTH", "ID",
    ]);
    for r in &rows {
        t.add_row(vec![
            r.horde.clone(),
            r.api.clone(),
            r.inst.clone(),
            r.addr.clone(),
            r.node.clone(),
            r.state.clone(),
            r.health.clone(),
            r.id.clone(),
        ]);
    }
    println!("{t}");
    if !linked {
        println!("(no steward reachable right now: this is the node's last copy of the registry)");
    }
    Ok(())
}

/// `crux services`.
pub async fn services(
    socket: &Path,
    horde: &str,
    api: &str,
    steward: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let r = c
        .services(pb::ServicesRequest {
            horde: horde.to_string(),
            api: api.to_string(),
            steward,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if steward && !json {
        if let Some(f) = &r.flock_id {
            println!("steward of leader {} term {}:", f.leader, f.term);
        }
    }
    print_instances(&r.instances, json, r.linked)
}

/// `crux lookup`: exit 1 (an error) when nothing matches.
pub async fn lookup(socket: &Path, selector: &str, horde: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(socket).await?;
    let r = c
        .lookup(pb::LookupRequest {
            selector: selector.to_string(),
            horde: horde.to_string(),
            live_only: false,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if r.instances.is_empty() {
        return Err(anyhow!(
            "no instance matches {selector:?} in horde {:?}",
            crux_steward::select::horde_or_default(horde)
        ));
    }
    print_instances(&r.instances, json, r.linked)
}

/// `crux watch`: prints a snapshot, then each change, one JSON object per line with `--json`;
/// reconnects (resuming from the last revision) if the agent goes away and comes back.
pub async fn watch(socket: &Path, selector: &str, horde: &str, json: bool) -> anyhow::Result<()> {
    let mut from = 0;
    let mut first = true;
    loop {
        let mut c = match connect(socket).await {
            Ok(c) => c,
            Err(e) if first => return Err(e),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let stream = c
            .watch(pb::WatchRequest {
                selector: selector.to_string(),
                horde: horde.to_string(),
                from_revision: from,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(e) if first || e.code() == tonic::Code::InvalidArgument => {
                return Err(status_error(e))
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        first = false;
        while let Ok(Some(ev)) = stream.message().await {
            from = ev.revision;
            print_event(&ev, json)?;
        }
        eprintln!("crux watch: the agent closed the stream; reconnecting");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_event(ev: &pb::WatchEvent, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "revision": ev.revision,
            "snapshot": ev.snapshot,
            "put": ev.put.iter().map(instance_json).collect::<Vec<_>>(),
            "remove": ev.remove.iter().map(instance_json).collect::<Vec<_>>(),
        });
        writeln!(out, "{v}")?;
    } else {
        if ev.snapshot {
            writeln!(
                out,
                "revision {}: snapshot of {} instance(s)",
                ev.revision,
                ev.put.len()
            )?;
        }
        for i in &ev.put {
            writeln!(
                out,
                "revision {}: {} {} {} at {} on {} ({}, {})",
                ev.revision,
                if ev.snapshot { "=" } else { "+" },
                i.horde,
                i.inst,
                i.addr,
                i.node,
                crux_steward::select::state_name(i.state),
                crux_steward::select::health_name(i.health)
            )?;
        }
        for i in &ev.remove {
            writeln!(
                out,
                "revision {}: - {} {} at {} on {}",
                ev.revision, i.horde, i.inst, i.addr, i.node
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Runs a client future that returns an exit code on a small runtime.
pub fn block_on_code<F: std::future::Future<Output = anyhow::Result<i32>>>(
    f: F,
) -> anyhow::Result<i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(f)
}
