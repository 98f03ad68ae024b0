//! A flock of real `crux agent` processes on loopback, for end-to-end tests.
//!
//! * Addresses: `127.A.B.2 … 127.A.B.(N+1)`, where `A` comes from the test process id and `B`
//!   from a per-test number, so concurrent tests (and concurrent test runs) use separate ranges;
//!   the port is one found free on all of them, and the bloc ID is unique per cluster, so even a
//!   collision could not mix two clusters.
//! * Every agent gets its own dir (config, data, socket, log) under a temp dir that is removed
//!   with the cluster (kept, and its logs printed, when the test fails).
//! * The harness kills only the processes it started: on drop, every child still running gets
//!   SIGKILL and is reaped.
//! * Waiting is by condition with a deadline ([`wait_for`]), never by sleeping a fixed time.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::netns::Netns;

/// A member as `crux members --json` prints it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// Flock address.
    pub addr: String,
    /// alive, suspect, dead or left.
    pub state: String,
    /// Whether it is the leader.
    pub leader: bool,
    /// SWIM incarnation.
    pub incarnation: u64,
}

/// The leader as `crux leader --json` prints it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Leader {
    /// Node id.
    pub id: String,
    /// Flock address.
    pub addr: String,
    /// Term.
    pub term: u64,
}

/// One agent of the cluster.
#[derive(Debug)]
pub struct Agent {
    /// 1-based index.
    pub k: usize,
    /// Flock address.
    pub addr: SocketAddr,
    /// Node dir (config, data, socket, log).
    pub dir: PathBuf,
    /// Local API socket.
    pub socket: PathBuf,
    /// HTTP address (`/ready`, `/metrics`).
    pub http: SocketAddr,
    /// Node gRPC address.
    pub grpc: SocketAddr,
    /// DNS address (UDP and TCP): its own free port on the agent's IP.
    pub dns: SocketAddr,
    /// Fuse's ADS address (gRPC): its own free port on the agent's IP.
    pub ads: SocketAddr,
    child: Option<Child>,
}

impl Agent {
    /// Config file path.
    pub fn config(&self) -> PathBuf {
        self.dir.join("crux.toml")
    }

    /// Whether the agent process is running (started and not exited).
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// N agents on a loopback range of their own.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    /// The agents, `agents[k - 1]` being node k.
    pub agents: Vec<Agent>,
    /// Flock port shared by all agents.
    pub port: u16,
    /// Bloc ID.
    pub bloc: String,
    /// The secondary key every agent starts with (base64).
    pub key: String,
    /// The namespaces the agents run in ([`Cluster::in_netns`]); dropped after the agents.
    netns: Option<Netns>,
}

fn ip(block: (u8, u8), k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, block.0, block.1, (k + 1) as u8))
}

/// A port free for UDP and TCP on every address.
fn free_port(addrs: &[IpAddr]) -> u16 {
    for _ in 0..100 {
        let probe = std::net::UdpSocket::bind(SocketAddr::new(addrs[0], 0)).expect("bind probe");
        let port = probe.local_addr().expect("local addr").port();
        drop(probe);
        let ok = addrs.iter().all(|a| {
            let a = SocketAddr::new(*a, port);
            std::net::UdpSocket::bind(a).is_ok() && std::net::TcpListener::bind(a).is_ok()
        });
        if ok {
            return port;
        }
    }
    panic!("no port free on all of {addrs:?}")
}

fn free_tcp_port(ip: IpAddr) -> u16 {
    let l = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind");
    l.local_addr().expect("local addr").port()
}

impl Cluster {
    /// Writes the configs of `n` agents (nothing runs yet). `test_id` (1-250) must differ between
    /// the tests of one test binary; `preset` is a timing preset name.
    pub fn new(bin: impl Into<PathBuf>, test_id: u8, n: usize, preset: &str) -> Cluster {
        assert!((1..=250).contains(&n));
        let block = (10 + (std::process::id() % 200) as u8, test_id);
        let ips: Vec<IpAddr> = (1..=n).map(|k| ip(block, k)).collect();
        let port = free_port(&ips);
        let http: Vec<u16> = ips.iter().map(|ip| free_tcp_port(*ip)).collect();
        Cluster::build(bin.into(), test_id, &ips, port, &http, preset, None)
    }

    /// N agents, each in a network namespace of its own on one bridge (see [`Netns`]): real
    /// hosts whose links a test can cut ([`Cluster::netns`]). Every agent uses the same ports
    /// (its namespace is its own). An error says why namespaces cannot be made here (not root);
    /// tests skip with it.
    pub fn in_netns(
        bin: impl Into<PathBuf>,
        test_id: u8,
        n: usize,
        preset: &str,
    ) -> Result<Cluster, String> {
        let netns = Netns::create(test_id, n)?;
        let ips: Vec<IpAddr> = (1..=n).map(|k| IpAddr::V4(Netns::ip(k))).collect();
        Ok(Cluster::build(
            bin.into(),
            test_id,
            &ips,
            7700,
            &vec![7702; n],
            preset,
            Some(netns),
        ))
    }

    fn build(
        bin: PathBuf,
        test_id: u8,
        ips: &[IpAddr],
        port: u16,
        http_ports: &[u16],
        preset: &str,
        netns: Option<Netns>,
    ) -> Cluster {
        let n = ips.len();
        let dir = tempfile::Builder::new()
            .prefix("crux-e2e-")
            .tempdir()
            .expect("temp dir");
        let bloc = format!("e2e-{}-{test_id}", std::process::id());
        let space = format!("{}-{}", ips[0], ips[n - 1]);
        let key = keygen(&bin);
        let agents = (1..=n)
            .map(|k| {
                let node_dir = dir.path().join(format!("node{k}"));
                std::fs::create_dir_all(&node_dir).expect("node dir");
                let addr = SocketAddr::new(ips[k - 1], port);
                let http = SocketAddr::new(ips[k - 1], http_ports[k - 1]);
                let socket = node_dir.join("reeve.sock");
                let grpc = SocketAddr::new(
                    ips[k - 1],
                    if port == u16::MAX { port - 1 } else { port + 1 },
                );
                // In a namespace of its own every port is free (and its address is not bound
                // here to probe one).
                let dns_port = if netns.is_some() {
                    8600
                } else {
                    std::iter::repeat_with(|| free_port(&ips[k - 1..k]))
                        .find(|p| ![addr.port(), grpc.port(), http.port()].contains(p))
                        .expect("a free port")
                };
                let dns = SocketAddr::new(ips[k - 1], dns_port);
                let ads_port = if netns.is_some() {
                    7703
                } else {
                    std::iter::repeat_with(|| free_tcp_port(ips[k - 1]))
                        .find(|p| ![addr.port(), grpc.port(), http.port(), dns_port].contains(p))
                        .expect("a free port")
                };
                let ads = SocketAddr::new(ips[k - 1], ads_port);
                let config = format!(
                    "bloc = {bloc:?}\ndata_dir = {data:?}\nbind = \"{addr}\"\nspace = [\"{space}\"]\n\
                     preset = \"{preset}\"\nsocket = {socket:?}\ngrpc_port = {grpc}\n\
                     http_port = {http_port}\ndns.bind = \"{dns}\"\nfuse.ads_bind = \"{ads}\"\n\
                     log_level = \"info,crux_flock=debug\"\n",
                    data = node_dir.display().to_string(),
                    socket = socket.display().to_string(),
                    grpc = grpc.port(),
                    http_port = http.port(),
                );
                std::fs::write(node_dir.join("crux.toml"), config).expect("write config");
                write_keyring(&node_dir.join("keyring"), &key);
                Agent { k, addr, dir: node_dir, socket, http, grpc, dns, ads, child: None }
            })
            .collect();
        Cluster {
            bin,
            dir: Some(dir),
            agents,
            port,
            bloc,
            key,
            netns,
        }
    }

    /// The namespaces of a cluster made with [`Cluster::in_netns`] (None otherwise): cut and
    /// heal links with it.
    pub fn netns(&mut self) -> Option<&mut Netns> {
        self.netns.as_mut()
    }

    /// The node-plane bloc key (key id, derived key) of secondary key `key` (base64, e.g. the
    /// agents' starting key [`Cluster::key`]) in this bloc.
    pub fn bloc_key(&self, key: &str) -> (u32, [u8; 32]) {
        use crux_flock::crypto::{key_id, node_auth_key, Bloc, SecretKey};
        let bloc = Bloc::new(&self.bloc);
        let key = SecretKey::parse(key).expect("a secondary key");
        (key_id(&key, &bloc), *node_auth_key(&key, &bloc).as_bytes())
    }

    /// Node k's node-plane identity (made by its first start, in its data dir).
    pub fn node_identity(&self, k: usize) -> crux_transport::NodeIdentity {
        crux_transport::NodeIdentity::load_or_create(&self.agents[k - 1].dir.join("node-key"))
            .expect("node k started once")
    }

    /// A node-plane transport for this test process: it holds `identity` and the bloc key of
    /// secondary key `key`, and accepts the agents that have started (their keys from their data
    /// dirs, as the flock lists them). A test calls a node gRPC port through it, as a member
    /// (with [`Cluster::node_identity`]) or as a stranger (a new identity).
    pub fn test_transport(
        &self,
        identity: crux_transport::NodeIdentity,
        key: &str,
    ) -> crux_transport::Transport {
        let t = crux_transport::Transport::new(identity, Default::default()).expect("transport");
        let (id, bytes) = self.bloc_key(key);
        t.set_bloc_keys(crux_transport::BlocKeys::new(vec![(id, bytes)]));
        let peers = self.agents.iter().filter_map(|a| {
            let id = std::fs::read_to_string(a.dir.join("node-id")).ok()?;
            let id = crux_proto::flock::NodeId(u64::from_str_radix(id.trim(), 16).ok()?);
            let key = crux_transport::NodeIdentity::load_or_create(&a.dir.join("node-key"))
                .ok()?
                .public();
            Some((id, key))
        });
        t.set_peers(peers.collect::<Vec<_>>());
        t
    }

    /// Appends TOML text to node k's config (e.g. a `[timing]` table).
    pub fn append_config(&self, k: usize, text: &str) {
        let path = self.agents[k - 1].config();
        let mut config = std::fs::read_to_string(&path).expect("read config");
        config.push_str(text);
        std::fs::write(&path, config).expect("write config");
    }

    /// Sets node k's address space (the `space = [...]` line of its config) to the flock
    /// addresses of `nodes`, as one range from the first to the last (they are consecutive): a
    /// node probes only its space, so nodes given disjoint spaces form separate flocks. Takes
    /// effect at node k's next start.
    pub fn set_space(&self, k: usize, nodes: std::ops::RangeInclusive<usize>) {
        let (first, last) = (
            self.agents[*nodes.start() - 1].addr.ip(),
            self.agents[*nodes.end() - 1].addr.ip(),
        );
        let path = self.agents[k - 1].config();
        let config = std::fs::read_to_string(&path).expect("read config");
        let config: String = config
            .lines()
            .map(|l| {
                if l.starts_with("space = ") {
                    format!("space = [\"{first}-{last}\"]\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, config).expect("write config");
    }

    /// The agent of node k (1-based).
    pub fn agent(&self, k: usize) -> &Agent {
        &self.agents[k - 1]
    }

    /// A `crux` command with no `CRUX_*` variables inherited.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        clean_env(&mut cmd);
        cmd
    }

    /// Starts (or restarts) node k.
    pub fn start(&mut self, k: usize) {
        self.start_with_env(k, &[]);
    }

    /// Starts (or restarts) node k with extra environment variables.
    pub fn start_with_env(&mut self, k: usize, env: &[(&str, &std::ffi::OsStr)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agents[k - 1].dir.join("agent.log"))
            .expect("agent log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = ns.wrap(k, &self.bin);
                clean_env(&mut cmd);
                cmd
            }
            None => self.command(),
        };
        cmd.arg("agent")
            .arg("--config")
            .arg(self.agents[k - 1].config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        for (key, value) in env {
            cmd.env(key, value);
        }
        let child = cmd.spawn().expect("start crux agent");
        self.agents[k - 1].child = Some(child);
    }

    /// Starts every node.
    pub fn start_all(&mut self) {
        for k in 1..=self.agents.len() {
            self.start(k);
        }
    }

    /// `kill -9` node k and reaps it.
    pub fn kill9(&mut self, k: usize) {
        if let Some(mut c) = self.agents[k - 1].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `crux lookup SELECTOR --json` on node k: the instances, or none when nothing matches.
    pub fn lookup<T: serde::de::DeserializeOwned>(
        &self,
        k: usize,
        selector: &str,
    ) -> Result<Vec<T>, String> {
        let out = self.cli(k, &["lookup", selector, "--json"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if out.status.code() == Some(1) && err.contains("no instance matches") {
                return Ok(Vec::new());
            }
            return Err(format!("node{k}: lookup failed: {err}"));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: bad JSON: {e}"))
    }

    /// `kill -9` of node k's agent and of the plugin process groups its picket recorded, as when
    /// the machine dies.
    pub fn kill_node(&mut self, k: usize) {
        self.kill9(k);
        kill_plugins(&self.agents[k - 1].dir);
    }

    /// SIGTERM to node k; waits (up to `timeout`) for it to exit and returns its status.
    pub fn sigterm(&mut self, k: usize, timeout: Duration) -> ExitStatus {
        let mut c = self.agents[k - 1].child.take().expect("node is running");
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return status;
            }
            if now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node{k} did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `crux ARGS --socket <node k's socket>`.
    pub fn cli(&self, k: usize, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .arg("--socket")
            .arg(&self.agents[k - 1].socket)
            .output()
            .expect("run crux")
    }

    /// Node k's member list (`crux members --json`).
    pub fn members(&self, k: usize) -> Result<Vec<Member>, String> {
        let out = self.cli(k, &["members", "--json"]);
        if !out.status.success() {
            return Err(format!(
                "node{k}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: bad JSON: {e}"))
    }

    /// Node k's leader (`crux leader --json`); `Ok(None)` when it knows none.
    pub fn leader(&self, k: usize) -> Result<Option<Leader>, String> {
        let out = self.cli(k, &["leader", "--json"]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if err.contains("no leader known") {
                return Ok(None);
            }
            return Err(format!("node{k}: {err}"));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| format!("node{k}: {e}"))
    }

    /// Node k's node id (from `<data dir>/node-id`, written at its first start).
    pub fn node_id(&self, k: usize) -> Option<String> {
        let text = std::fs::read_to_string(self.agents[k - 1].dir.join("node-id")).ok()?;
        Some(text.trim().to_string())
    }

    /// The node ids of `nodes`; an error names the first that has none yet.
    fn node_ids(&self, nodes: &[usize]) -> Result<BTreeSet<String>, String> {
        nodes
            .iter()
            .map(|k| {
                self.node_id(*k)
                    .ok_or_else(|| format!("node{k} has no id yet"))
            })
            .collect()
    }

    /// Checks that every node of `nodes` is ready, sees exactly `nodes` as its live members (all
    /// `alive`), and follows one leader among them. Returns that leader.
    pub fn agreement(&self, nodes: &[usize]) -> Result<Leader, String> {
        let want = self.node_ids(nodes)?;
        let mut leader: Option<Leader> = None;
        for &k in nodes {
            let members = self.members(k)?;
            let alive: BTreeSet<String> = members
                .iter()
                .filter(|m| m.state == "alive")
                .map(|m| m.id.clone())
                .collect();
            if alive != want {
                return Err(format!("node{k} sees alive {alive:?}, want {want:?}"));
            }
            let l = self
                .leader(k)?
                .ok_or_else(|| format!("node{k} knows no leader"))?;
            if !want.contains(&l.id) {
                return Err(format!("node{k} follows {l:?}, not one of the nodes"));
            }
            match &leader {
                None => leader = Some(l),
                Some(first) if first.id == l.id => {}
                Some(first) => {
                    return Err(format!("node{k} follows {}, others {}", l.id, first.id))
                }
            }
        }
        leader.ok_or_else(|| "no nodes".into())
    }

    /// Checks that every node of `nodes` sees every one of them `alive` (leaders aside).
    pub fn all_alive(&self, nodes: &[usize]) -> Result<(), String> {
        let want = self.node_ids(nodes)?;
        for &k in nodes {
            let members = self.members(k)?;
            for id in &want {
                let state = members
                    .iter()
                    .find(|m| &m.id == id)
                    .map(|m| m.state.as_str());
                if state != Some("alive") {
                    return Err(format!("node{k} sees {id} as {state:?}"));
                }
            }
        }
        Ok(())
    }

    /// Waits until [`Cluster::agreement`] has held at every poll for `hold` (a flock that has
    /// settled, not one caught between two merges), and returns the leader.
    pub fn stable_agreement(&self, nodes: &[usize], hold: Duration, timeout: Duration) -> Leader {
        let mut since: Option<(Instant, Leader)> = None;
        self.wait_for(
            "a stable agreement on members and one leader",
            timeout,
            || {
                let l = match self.agreement(nodes) {
                    Ok(l) => l,
                    Err(e) => {
                        since = None;
                        return Err(e);
                    }
                };
                match &since {
                    Some((t, first)) if first == &l => {
                        if now().duration_since(*t) >= hold {
                            return Ok(l);
                        }
                    }
                    _ => since = Some((now(), l)),
                }
                Err("agreement not yet held long enough".into())
            },
        )
    }

    /// Which node index has this node id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        (1..=self.agents.len()).find(|k| self.node_id(*k).as_deref() == Some(id))
    }

    /// The last lines of every agent's log (for failure messages).
    pub fn logs(&self, lines: usize) -> String {
        let mut s = String::new();
        for a in &self.agents {
            let text = std::fs::read_to_string(a.dir.join("agent.log")).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            s.push_str(&format!("---- node{} ({}) ----\n", a.k, a.addr));
            for l in &all[from..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// The cluster's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    /// Waits for `check` to pass; on timeout panics with its last error and the agents' logs.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl FnMut() -> Result<T, String>,
    ) -> T {
        match wait_for(timeout, check) {
            Ok(v) => v,
            Err(e) => {
                let logs = self.logs(40);
                panic!("timed out after {timeout:?} waiting for {what}: {e}\n{logs}")
            }
        }
    }
}

/// Removes the `CRUX_*` and `RUST_LOG` variables the test runs with from `cmd`'s environment.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CRUX_") {
            cmd.env_remove(key);
        }
    }
    cmd.env_remove("RUST_LOG");
}

/// The start time (`/proc/<pid>/stat` field 22) of process `pid`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILL to the process groups of the plugins recorded in `<node_dir>/picket/children.json`
/// that are still the processes the node started (same pid and start time).
fn kill_plugins(node_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(node_dir.join("picket").join("children.json")) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    for child in v["children"].as_array().into_iter().flatten() {
        let (Some(pid), Some(pgid), Some(start)) = (
            child["pid"].as_u64(),
            child["pgid"].as_u64(),
            child["start_time"].as_u64(),
        ) else {
            continue;
        };
        if start_time(pid as u32) == Some(start) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            kill_plugins(&a.dir);
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("agent files kept in {}", dir.keep().display());
            }
        }
    }
}

/// A new secondary key from `crux keygen`.
pub fn keygen(bin: &Path) -> String {
    let out = Command::new(bin)
        .arg("keygen")
        .output()
        .expect("run crux keygen");
    assert!(out.status.success(), "crux keygen failed");
    String::from_utf8(out.stdout)
        .expect("utf-8 key")
        .trim()
        .to_string()
}

/// Writes a keyring file (one base64 key per line, mode 0600) holding `key`.
pub fn write_keyring(path: &Path, key: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create keyring");
    writeln!(f, "{key}").expect("write keyring");
}

/// The clock, for deadlines (test harnesses may read it; the flock core may not).
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// Polls `check` every 100 ms until it returns `Ok` or `timeout` passes (then the last error).
pub fn wait_for<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A minimal HTTP/1.1 GET of an agent's HTTP port (`/ready`, `/metrics`): the whole response,
/// headers included.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl Cluster {
    /// Gives every agent a node gRPC port of its own (call before the agents start): agent k
    /// listens on its own port `P_k`, each free on every agent's address. Returns them, node k's at
    /// index `k - 1`.
    ///
    /// An agent reaches another's node port at the other's flock IP and *its own* configured
    /// `grpc_port`, so with distinct ports agent j dials agent k at `ip_k:P_j`, where nothing
    /// listens unless the test puts something there: a test can bind a proxy on `ip_k:P_j` that
    /// forwards to `ip_k:P_k` and sees every byte of those connections. Not every connection goes
    /// that way: an address one node computes and hands to others (a Raft member's address, set
    /// by the flock leader with its own port; a pastiche holder's registered NetID, its own port)
    /// is dialled as given.
    pub fn own_grpc_ports(&mut self) -> Vec<u16> {
        let ips: Vec<IpAddr> = self.agents.iter().map(|a| a.addr.ip()).collect();
        let mut taken: BTreeSet<u16> = self.agents.iter().map(|a| a.http.port()).collect();
        taken.insert(self.port);
        let mut ports = Vec::with_capacity(self.agents.len());
        while ports.len() < self.agents.len() {
            let p = free_port(&ips);
            if taken.insert(p) {
                ports.push(p);
            }
        }
        for (a, port) in self.agents.iter_mut().zip(&ports) {
            let path = a.config();
            let config = std::fs::read_to_string(&path).expect("read config");
            let config: String = config
                .lines()
                .map(|l| {
                    if l.starts_with("grpc_port = ") {
                        format!("grpc_port = {port}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            std::fs::write(&path, config).expect("write config");
            a.grpc = SocketAddr::new(a.addr.ip(), *port);
        }
        ports
    }

    /// Node k's `crux_node_plane_rejected_total` counts by reason (`io`, `tls`, `tampered`, …),
    /// read from its `/metrics`.
    pub fn node_plane_rejected(
        &self,
        k: usize,
    ) -> Result<std::collections::BTreeMap<String, u64>, String> {
        let metrics = http_get(self.agents[k - 1].http, "/metrics")
            .map_err(|e| format!("node{k}: /metrics: {e}"))?;
        let counts: std::collections::BTreeMap<String, u64> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("crux_node_plane_rejected_total{reason=\""))
            .filter_map(|l| {
                let (reason, rest) = l.split_once("\"} ")?;
                Some((reason.to_string(), rest.trim().parse().ok()?))
            })
            .collect();
        if counts.is_empty() {
            return Err(format!(
                "node{k}: no crux_node_plane_rejected_total in /metrics"
            ));
        }
        Ok(counts)
    }
}

/// A `crux register … -- sleep 600` on one node ([`Cluster::register`]): the instance stays
/// registered while it runs; on drop the registration and its command get SIGKILL (so the
/// heartbeats stop without a deregistration).
#[derive(Debug)]
pub struct Registration {
    child: Option<Child>,
}

impl Cluster {
    /// Registers instance `inst` of `api` at `addr` on node k through `crux register`, with
    /// `extra` arguments (`--meta k=v`, …) before the command.
    pub fn register(
        &self,
        k: usize,
        api: &str,
        inst: &str,
        addr: SocketAddr,
        extra: &[&str],
    ) -> Registration {
        let child = self
            .command()
            .args(["register", "--api", api, "--inst", inst])
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--socket")
            .arg(&self.agents[k - 1].socket)
            .args(extra)
            .args(["--", "sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start crux register");
        Registration { child: Some(child) }
    }
}

impl Registration {
    /// The registered command's pid (the `crux register` process's child), once it runs.
    pub fn command_pid(&self) -> Option<i32> {
        let pid = self.child.as_ref()?.id();
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        text.split_whitespace().next()?.parse().ok()
    }

    /// Waits for `crux register` to exit (it does once its command has) and returns its status.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.child.take() {
            Some(mut ch) => ch.wait(),
            None => Err(std::io::Error::other("crux register was reaped already")),
        }
    }

    /// kill -9 of `crux register` (its heartbeats stop without a deregistration), then of its
    /// command.
    pub fn kill9(&mut self) {
        let cmd = self.command_pid();
        if let Some(mut ch) = self.child.take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        if let Some(p) = cmd {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.kill9();
    }
}
