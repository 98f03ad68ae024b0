//! `crux dev --nodes N`: a local flock of N real agent processes on 127.0.0.2 … 127.0.0.(N+1),
//! one port, each with its own generated config and data dir, and a live table until Ctrl-C or
//! SIGTERM. It stops only the agents it started and never restarts one that dies, so people can
//! kill one and watch the flock react.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use crux_proto::grpc::reeve::v1 as pb;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pb::reeve_client::ReeveClient;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::config::RawConfig;

/// Longest Unix socket path (sun_path is 108 bytes with the terminating NUL).
const SOCKET_PATH_MAX: usize = 107;

/// `crux dev` arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct DevArgs {
    /// Number of agents (1-253), on 127.0.0.2 … 127.0.0.(N+1).
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Directory for every node's config, data, socket, pid file and log (DIR/nodeK/).
    /// Default: a fresh temp dir, printed and kept.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Flock port shared by all nodes. Default: one free on every node address.
    #[arg(long)]
    pub port: Option<u16>,
    /// Timing preset of the generated configs: lan, wan or local.
    #[arg(long, default_value = "local")]
    pub preset: String,
    /// Give every node the first node as a seed (default: discovery only).
    #[arg(long)]
    pub seeds: bool,
    /// Print the table as lines, once per change, instead of redrawing the screen (the default
    /// when stdout is not a terminal).
    #[arg(long)]
    pub plain: bool,
    /// Log filter of the agents.
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

/// One node of the local flock.
struct Node {
    k: usize,
    addr: SocketAddr,
    dir: PathBuf,
    socket: PathBuf,
    child: Child,
    pid: u32,
    exit: Option<String>,
    client: Option<ReeveClient<Channel>>,
}

/// What a poll learned of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct View {
    agent: String,
    node_id: String,
    live: Option<u64>,
    members: BTreeSet<(String, String)>,
    leader: Option<String>,
    term: Option<u64>,
    key_epoch: Option<u64>,
}

/// Entry point: returns the process exit code.
pub fn main(args: &DevArgs) -> anyhow::Result<i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

fn node_ip(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (k + 1) as u8))
}

/// A port free for UDP and TCP on every node address.
fn free_port(n: usize) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let probe = std::net::UdpSocket::bind(SocketAddr::new(node_ip(1), 0))?;
        let port = probe.local_addr()?.port();
        drop(probe);
        let ok = (1..=n).all(|k| {
            let a = SocketAddr::new(node_ip(k), port);
            std::net::UdpSocket::bind(a).is_ok() && std::net::TcpListener::bind(a).is_ok()
        });
        if ok {
            return Ok(port);
        }
    }
    bail!(
        "found no port free on all of 127.0.0.2-127.0.0.{}; pass --port",
        n + 1
    )
}

/// A TCP port free on `ip` (for a node's HTTP server).
fn free_tcp_port(ip: IpAddr, avoid: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0))?;
        let port = l.local_addr()?.port();
        if !avoid.contains(&port) {
            return Ok(port);
        }
    }
    bail!("found no free TCP port on {ip}")
}

/// The config of node `k` (1-based).
pub fn node_config(
    dir: &Path,
    k: usize,
    n: usize,
    port: u16,
    http_port: u16,
    bloc: &str,
    args: &DevArgs,
) -> RawConfig {
    let node_dir = dir.join(format!("node{k}"));
    let last = node_ip(n);
    RawConfig {
        bloc: bloc.into(),
        data_dir: node_dir.clone(),
        keyring: Some(node_dir.join("keyring")),
        bind: SocketAddr::new(node_ip(k), port).to_string(),
        space: vec![format!("{}-{}", node_ip(1), last)],
        seeds: if args.seeds && k != 1 {
            vec![SocketAddr::new(node_ip(1), port).to_string()]
        } else {
            Vec::new()
        },
        preset: args.preset.clone(),
        socket: node_dir.join("reeve.sock"),
        grpc_port: if port == u16::MAX { port - 1 } else { port + 1 },
        http_port,
        log_level: args.log_level.clone(),
        // A dev flock leaves nothing running behind its Ctrl-C.
        picket: crate::config::PicketSection {
            stop_children_on_exit: true,
            ..Default::default()
        },
        // DNS on the node's own IP, at the usual port.
        dns: crate::config::DnsSection {
            bind: SocketAddr::new(node_ip(k), 8600).to_string(),
            ..Default::default()
        },
        // ADS on the node's own IP, at the usual port.
        fuse: crate::fuse::FuseSection {
            ads_bind: SocketAddr::new(node_ip(k), 7703).to_string(),
            ..Default::default()
        },
        ..RawConfig::default()
    }
}

async fn run(args: &DevArgs) -> anyhow::Result<i32> {
    let n = args.nodes;
    if !(1..=253).contains(&n) {
        bail!("--nodes must be between 1 and 253 (addresses 127.0.0.2-127.0.0.254), not {n}");
    }
    let preset_ok = args.preset.parse::<crux_flock::Preset>();
    if let Err(e) = preset_ok {
        bail!("--preset: {e}");
    }
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            std::path::absolute(d)?
        }
        None => tempfile::Builder::new()
            .prefix("crux-dev-")
            .tempdir()?
            .keep(),
    };
    let longest = dir.join(format!("node{n}")).join("reeve.sock");
    if longest.as_os_str().len() > SOCKET_PATH_MAX {
        bail!(
            "--dir {} is too long: socket paths such as {} must fit in {SOCKET_PATH_MAX} bytes",
            dir.display(),
            longest.display()
        );
    }
    let port = match args.port {
        Some(p) => p,
        None => free_port(n)?,
    };
    let exe = std::env::current_exe().context("locating the crux executable")?;
    let bloc = format!("dev-{}", std::process::id());

    // One secondary key for the whole local flock, in every node's keyring file.
    let key = crate::keys::generate();
    // Generate every config first: a bad one stops us before anything runs.
    let mut configs = Vec::with_capacity(n);
    let mut page = None;
    for k in 1..=n {
        let http = free_tcp_port(node_ip(k), &[port, port.saturating_add(1)])?;
        page = page.or(Some(SocketAddr::new(node_ip(k), http)));
        let raw = node_config(&dir, k, n, port, http, &bloc, args);
        raw.validate()
            .map_err(|e| anyhow::anyhow!("generated config of node{k}: {e}"))?;
        let node_dir = dir.join(format!("node{k}"));
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        let path = node_dir.join("crux.toml");
        let text = format!(
            "# Generated by `crux dev` for node{k} of {n}.\n{}",
            raw.to_toml()
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let keyring = node_dir.join("keyring");
        if !keyring.exists() {
            crate::keys::write_new(&keyring, &key)?;
        }
        configs.push((k, path, raw));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let mut nodes = Vec::with_capacity(n);
    for (k, path, raw) in configs {
        let node_dir = raw.data_dir.clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("agent.log"))
            .context("opening agent.log")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("agent").arg("--config").arg(&path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CRUX_") {
                cmd.env_remove(key);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C reaches only `crux dev`, which then
            // stops the agents in order.
            .process_group(0);
        let child = cmd.spawn().with_context(|| format!("starting node{k}"))?;
        let pid = child.id().unwrap_or(0);
        std::fs::write(node_dir.join("agent.pid"), format!("{pid}\n"))?;
        nodes.push(Node {
            k,
            addr: raw.bind.parse()?,
            dir: node_dir,
            socket: raw.socket.clone(),
            child,
            pid,
            exit: None,
            client: None,
        });
    }

    let tty = std::io::stdout().is_terminal() && !args.plain;
    println!(
        "crux dev: {n} agent(s) on {}-{} port {port}, bloc {bloc}, preset {}",
        node_ip(1),
        node_ip(n),
        args.preset
    );
    println!(
        "files: {}/nodeK/ (crux.toml, agent.log, agent.pid, reeve.sock)",
        dir.display()
    );
    println!("try:   crux members --socket {}", nodes[0].socket.display());
    if let Some(page) = page {
        println!("page:  http://{page}/ui (node1's live page)");
    }
    println!("stop:  Ctrl-C (kill an agent's pid to watch the flock react)");
    let _ = std::io::stdout().flush();

    let started = tokio::time::Instant::now();
    let mut last_plain = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let signal = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = tick.tick() => {}
        }
        let views = poll(&mut nodes).await;
        let (table, summary) = render(&nodes, &views);
        if tty {
            print!("\x1b[H\x1b[2J");
            println!(
                "crux dev: {n} agent(s), files in {}   (Ctrl-C stops them)",
                dir.display()
            );
            println!("try: crux members --socket {}", nodes[0].socket.display());
            println!("{table}\n{summary}");
        } else {
            let text = format!("{table}\n{summary}");
            if text != last_plain {
                println!("t={:.1}s\n{text}", started.elapsed().as_secs_f64());
                last_plain = text;
            }
        }
        let _ = std::io::stdout().flush();
    };

    println!(
        "crux dev: {signal}: stopping {} agent(s)",
        nodes.iter().filter(|x| x.exit.is_none()).count()
    );
    stop_all(&mut nodes).await;
    for node in &nodes {
        let _ = std::fs::remove_file(node.dir.join("agent.pid"));
    }
    println!("crux dev: stopped; files kept in {}", dir.display());
    Ok(0)
}

/// SIGTERM to every agent still running, a grace period for the leave, then SIGKILL.
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if node.exit.is_none() && node.child.try_wait().ok().flatten().is_none() && node.pid != 0 {
            let _ = kill(Pid::from_raw(node.pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for node in nodes.iter_mut() {
        match tokio::time::timeout_at(deadline, node.child.wait()).await {
            Ok(Ok(status)) => node.exit = Some(exit_text(status)),
            _ => {
                let _ = node.child.kill().await;
                node.exit = Some("killed".into());
            }
        }
    }
}

fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited ({c})"),
        (None, Some(s)) => {
            let name = Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
            format!("killed ({name})")
        }
        _ => "exited".into(),
    }
}

async fn poll(nodes: &mut [Node]) -> Vec<View> {
    let mut views = Vec::with_capacity(nodes.len());
    for node in nodes.iter_mut() {
        if node.exit.is_none() {
            if let Ok(Some(status)) = node.child.try_wait() {
                node.exit = Some(exit_text(status));
                node.client = None;
            }
        }
        if let Some(e) = &node.exit {
            views.push(View {
                agent: e.clone(),
                ..View::default()
            });
            continue;
        }
        let view = tokio::time::timeout(Duration::from_millis(400), query(node))
            .await
            .unwrap_or_else(|_| View {
                agent: "not answering".into(),
                ..View::default()
            });
        views.push(view);
    }
    views
}

async fn query(node: &mut Node) -> View {
    if node.client.is_none() {
        if !node.socket.exists() {
            return View {
                agent: "starting".into(),
                ..View::default()
            };
        }
        node.client = crate::client::connect(&node.socket).await.ok();
    }
    let Some(c) = node.client.as_mut() else {
        return View {
            agent: "starting".into(),
            ..View::default()
        };
    };
    let status = match c.status(pb::StatusRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(_) => {
            node.client = None;
            return View {
                agent: "not answering".into(),
                ..View::default()
            };
        }
    };
    let mut v = View {
        agent: if status.ready {
            "ready".into()
        } else {
            "starting".into()
        },
        node_id: status.node_id,
        live: Some(status.live_members),
        key_epoch: status.key_epoch,
        ..View::default()
    };
    if !status.ready {
        return v;
    }
    if let Ok(m) = c.members(pb::MembersRequest {}).await {
        v.members = m
            .into_inner()
            .members
            .into_iter()
            .map(|m| (m.id, crate::client::state_name(m.state).to_string()))
            .collect();
    }
    if let Ok(l) = c.leader(pb::LeaderRequest {}).await {
        let l = l.into_inner();
        v.leader = Some(l.id);
        v.term = Some(l.term);
    }
    v
}

fn render(nodes: &[Node], views: &[View]) -> (Table, String) {
    let names: BTreeMap<&str, String> = nodes
        .iter()
        .zip(views)
        .filter(|(_, v)| !v.node_id.is_empty())
        .map(|(n, v)| (v.node_id.as_str(), format!("node{}", n.k)))
        .collect();
    let name = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "NODE",
        "ADDRESS",
        "PID",
        "AGENT",
        "LIVE",
        "LEADER",
        "TERM",
        "KEY EPOCH",
    ]);
    for (node, v) in nodes.iter().zip(views) {
        let dash = || "-".to_string();
        t.add_row(vec![
            format!("node{}", node.k),
            node.addr.to_string(),
            node.pid.to_string(),
            v.agent.clone(),
            v.live.map_or_else(dash, |l| l.to_string()),
            v.leader.as_deref().map_or_else(dash, name),
            v.term.map_or_else(dash, |t| t.to_string()),
            v.key_epoch.map_or_else(dash, |e| e.to_string()),
        ]);
    }
    // Agreement: every ready agent sees the same live members and the same leader.
    let ready: Vec<&View> = views.iter().filter(|v| v.agent == "ready").collect();
    let live_set = |v: &View| -> BTreeSet<String> {
        v.members
            .iter()
            .filter(|(_, s)| s == "alive" || s == "suspect")
            .map(|(id, _)| id.clone())
            .collect()
    };
    let summary = match ready.first() {
        None => "agreement: no agent ready yet".to_string(),
        Some(first) => {
            let same = ready
                .iter()
                .all(|v| live_set(v) == live_set(first) && v.leader == first.leader);
            let ids: BTreeSet<String> = ready.iter().map(|v| v.node_id.clone()).collect();
            let complete = live_set(first) == ids;
            match (&first.leader, same && complete) {
                (Some(l), true) => format!(
                    "agreement: {} ready agent(s) agree on {} live member(s) and leader {} (term {})",
                    ready.len(),
                    ids.len(),
                    name(l),
                    first.term.unwrap_or(0)
                ),
                _ => format!("agreement: not yet ({} ready agent(s) converging)", ready.len()),
            }
        }
    };
    (t, summary)
}
