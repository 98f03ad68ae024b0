//! End-to-end tests with real `crux agent` processes on loopback (issue 4, item 7).
//!
//! Each test has its own `127.A.B.x` range (B = the test's id below), its own port and bloc, and
//! kills only the processes it started (see `crux_tests::cluster`). They use the `local` preset.

use std::time::Duration;

use crux_tests::cluster::{http_get, Cluster};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);

/// Every node of `nodes` agrees on the members and one leader, and that has held for a second.
fn converged(c: &Cluster, nodes: &[usize]) -> crux_tests::cluster::Leader {
    c.stable_agreement(nodes, Duration::from_secs(1), CONVERGE)
}

/// Five agents started together find each other by probing the address space (no seeds) and agree
/// on the member list and one leader (DESIGN.md "Flock protocol": discovery, leader election).
#[test]
fn five_agents_converge_on_one_leader() {
    let mut c = Cluster::new(BIN, 1, 5, PRESET);
    c.start_all();
    let leader = converged(&c, &[1, 2, 3, 4, 5]);
    assert!(leader.term >= 1);
    // The HTTP side agrees: /ready turns 200 on every node (once the store, too, takes writes).
    for a in &c.agents {
        c.wait_for("/ready 200", CONVERGE, || {
            let body = http_get(a.http, "/ready").map_err(|e| e.to_string())?;
            if body.starts_with("HTTP/1.1 200") {
                Ok(())
            } else {
                Err(body)
            }
        });
    }
    let metrics = http_get(c.agent(1).http, "/metrics").expect("GET /metrics");
    assert!(
        metrics.contains("crux_members{state=\"alive\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains("crux_leader_known 1"), "{metrics}");
}

/// kill -9 of the leader: the other four agree on a new leader. The old leader, restarted with
/// its data dir (same node id, new boot id), is a member again and does not displace the new
/// leader (sticky leadership).
#[test]
fn leader_crash_elects_a_new_leader_and_the_restarted_node_rejoins_as_follower() {
    let mut c = Cluster::new(BIN, 2, 5, PRESET);
    c.start_all();
    let old = converged(&c, &[1, 2, 3, 4, 5]);
    let dead = c.index_of(&old.id).expect("leader is one of ours");
    c.kill9(dead);
    let rest: Vec<usize> = (1..=5).filter(|k| *k != dead).collect();
    let new = c.wait_for("a new leader among the other four", CONVERGE, || {
        let l = c.agreement(&rest)?;
        if l.id == old.id {
            return Err("still following the dead leader".into());
        }
        Ok(l)
    });
    assert!(
        new.term > old.term,
        "new term {} after {}",
        new.term,
        old.term
    );

    c.start(dead);
    let after = converged(&c, &[1, 2, 3, 4, 5]);
    assert_eq!(after.id, new.id, "the restarted node displaced the leader");
    assert_eq!(
        c.node_id(dead).as_deref(),
        Some(old.id.as_str()),
        "node id kept"
    );
}

/// SIGTERM: the agent leaves gracefully and exits 0; the others show it `left`.
#[test]
fn sigterm_leaves_gracefully_and_others_show_left() {
    let mut c = Cluster::new(BIN, 3, 5, PRESET);
    c.start_all();
    let leader = converged(&c, &[1, 2, 3, 4, 5]);
    let leaver = (1..=5)
        .find(|k| c.node_id(*k).as_deref() != Some(leader.id.as_str()))
        .unwrap();
    let id = c.node_id(leaver).unwrap();
    let status = c.sigterm(leaver, Duration::from_secs(15));
    assert!(status.success(), "agent exit status {status:?}");
    assert!(!c.agent(leaver).socket.exists(), "socket removed on exit");
    let rest: Vec<usize> = (1..=5).filter(|k| *k != leaver).collect();
    c.wait_for("the others to show the leaver as left", CONVERGE, || {
        for &k in &rest {
            let m = c.members(k)?;
            let state = m.iter().find(|m| m.id == id).map(|m| m.state.clone());
            if state.as_deref() != Some("left") {
                return Err(format!("node{k} shows it as {state:?}"));
            }
        }
        Ok(())
    });
    c.agreement(&rest).expect("the others still agree");
}

/// A bad config: the agent exits non-zero before doing anything, naming the field and reason.
#[test]
fn bad_config_exits_non_zero_naming_the_field() {
    let c = Cluster::new(BIN, 4, 1, PRESET);
    let path = c.agent(1).config();
    let good = std::fs::read_to_string(&path).unwrap();
    let cases = [
        ("preset = \"local\"", "preset = \"fast\"", "preset"),
        ("bind = ", "bind = \"nowhere\"\n#", "bind"),
        ("grpc_port = ", "grpc_port = \"x\"\n#", "grpc_port"),
    ];
    for (from, to, field) in cases {
        let (head, tail) = good.split_once(from).expect("config line");
        std::fs::write(&path, format!("{head}{to}{tail}")).unwrap();
        let out = c
            .command()
            .arg("agent")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{field}: agent accepted a bad config"
        );
        assert!(
            err.contains(&format!("`{field}`")),
            "{field}: message {err:?}"
        );
    }
    // An environment variable that does not parse is named too.
    std::fs::write(&path, &good).unwrap();
    let out = c
        .command()
        .arg("agent")
        .arg("--config")
        .arg(&path)
        .env("CRUX_HTTP_PORT", "seventy")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CRUX_HTTP_PORT"));
}

/// The CLI fails with a clear message and a non-zero exit when there is no agent.
#[test]
fn cli_without_an_agent_fails_clearly() {
    let c = Cluster::new(BIN, 5, 1, PRESET);
    for args in [
        &["members"][..],
        &["leader", "--json"],
        &["keys", "list"],
        &["status"],
    ] {
        let out = c.cli(1, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without an agent");
        assert!(err.contains("no agent socket"), "{args:?}: {err:?}");
    }
}

/// A key as `crux keys list --json` shows it: id, primary.
type Key = (String, bool);

/// Serf-style rotation of the secondary key through the CLI, each step on a different node: install
/// the new key, use it, remove the old one. Each change spreads to every member's keyring (and
/// keyring file), and every member stays alive in every view throughout (checked at every poll).
#[test]
fn keyring_rotation_through_the_cli_keeps_every_member_alive() {
    let mut c = Cluster::new(BIN, 6, 5, PRESET);
    let all = [1, 2, 3, 4, 5];
    c.start_all();
    converged(&c, &all);
    let keys_of = |k: usize| -> Result<Vec<Key>, String> {
        let out = c.cli(k, &["keys", "list", "--json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        let v: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(v.iter()
            .map(|k| {
                (
                    k["id"].as_str().unwrap_or("").to_string(),
                    k["primary"] == true,
                )
            })
            .collect())
    };
    let old_id = keys_of(1).unwrap()[0].0.clone();
    let old_key = c.key.clone();
    let new = crux_tests::cluster::keygen(BIN.as_ref());
    // Runs `crux ARGS` on node k, then waits until every node's keyring is `want`, checking at
    // every poll that all five are alive everywhere.
    let step = |k: usize, args: &[&str], want: &dyn Fn(&[Key]) -> bool| {
        let out = c.cli(k, args);
        assert!(
            out.status.success(),
            "node{k}: crux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_for(
            &format!("crux {:?} to reach every node", args[1]),
            CONVERGE,
            || {
                c.all_alive(&all)
                    .unwrap_or_else(|e| panic!("after crux {args:?}: {e}"));
                for n in all {
                    let keys = keys_of(n)?;
                    if !want(&keys) {
                        return Err(format!("node{n} has {keys:?}"));
                    }
                }
                Ok(())
            },
        );
    };
    step(1, &["keys", "install", &new], &|keys| keys.len() == 2);
    let new_id = keys_of(1)
        .unwrap()
        .into_iter()
        .find(|k| k.0 != old_id)
        .unwrap()
        .0;
    step(2, &["keys", "use", &new_id], &|keys| {
        keys[0] == (new_id.clone(), true)
    });
    step(3, &["keys", "remove", &old_id], &|keys| {
        keys == [(new_id.clone(), true)]
    });
    // The keyring files follow (saved by each agent after the change): one key, the new one.
    c.wait_for("keyring files to hold only the new key", CONVERGE, || {
        for a in &c.agents {
            let text = std::fs::read_to_string(a.dir.join("keyring")).map_err(|e| e.to_string())?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
            if lines != [new.as_str()] {
                return Err(format!(
                    "node{} keyring file has {} key(s)",
                    a.k,
                    lines.len()
                ));
            }
        }
        Ok(())
    });
    // Node gRPC connections follow the keyring: a caller with only the removed key gets no
    // connection to any node; one with the new key does.
    for k in all {
        let err = node_connect(&c, k, &old_key).expect_err("the removed key was accepted");
        assert!(err.contains("connect"), "node{k}: {err}");
        node_connect(&c, k, &new).unwrap_or_else(|e| panic!("node{k}: {e}"));
    }
    // And the agents' own node calls carry on under the new key: a muster entry added on node 5
    // (forwarded to the store's Raft leader) is found on node 1.
    let digest = format!("sha256:{}", "ab".repeat(32));
    c.wait_for("a store write through node 5", CONVERGE, || {
        let out = c.cli(
            5,
            &[
                "muster",
                "add",
                "--api",
                "rot1",
                "--inst",
                "rot1_1",
                "--file",
                &digest,
                "--function",
                "f",
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    });
    c.wait_for("the entry on node 1", CONVERGE, || {
        let out = c.cli(1, &["muster", "search", "--api", "rot1", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains("rot1_1") {
            Ok(())
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    // Removing the primary is refused with a message, and a non-zero exit.
    let out = c.cli(4, &["keys", "remove", &new]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("primary"));
    converged(&c, &all);
}

/// Opens a node-plane connection from this test process to node k's gRPC port, as a listed
/// member (node k's own identity) holding only secondary key `key`: Err with "connect" in it
/// when refused.
fn node_connect(c: &Cluster, k: usize, key: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let a = c.agent(k);
    rt.block_on(async {
        let t = c.test_transport(c.node_identity(k), key);
        t.connect(a.grpc, Some(a.addr.ip())).await.map(drop)
    })
    .map_err(|e| format!("connect: {e}"))
}

/// Under systemd (`Type=notify`) the agent says READY=1 once its bootstrap is done, and
/// STOPPING=1 when a SIGTERM starts its shutdown.
#[test]
fn sd_notify_ready_then_stopping() {
    use std::os::unix::net::UnixDatagram;
    let mut c = Cluster::new(BIN, 7, 1, PRESET);
    let path = c.dir().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    c.start_with_env(1, &[("NOTIFY_SOCKET", path.as_os_str())]);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification within 15 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg:?}");
    // Ready means /ready is 200 and the local API answers.
    let body = http_get(c.agent(1).http, "/ready").unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    // Per step: every row of the bootstrap table serves.
    let verbose = http_get(c.agent(1).http, "/ready?verbose").unwrap();
    for step in [
        "flock", "reeve", "steward", "store", "picket", "proctor", "pastiche", "catalyst", "fuse",
    ] {
        assert!(
            verbose.contains(&format!("  {step:<8} ready    for ")),
            "{step}: {verbose}"
        );
    }
    assert!(c.members(1).is_ok());
    let status = c.sigterm(1, Duration::from_secs(15));
    assert!(status.success());
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

/// `crux dev --nodes 3`: three agent processes with generated configs agree (as its table says);
/// SIGTERM stops exactly those agents, and `crux dev` exits 0.
#[test]
#[allow(clippy::disallowed_methods)] // the test's deadline reads the clock
fn crux_dev_runs_a_local_flock_and_stops_what_it_started() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    /// Stops `crux dev` (and, should it have died, its agents by pid file) whatever happens.
    struct Dev {
        child: std::process::Child,
        dir: tempfile::TempDir,
    }
    impl Dev {
        fn agent_pids(&self) -> Vec<i32> {
            (1..=3)
                .filter_map(|k| {
                    let p = self.dir.path().join(format!("node{k}/agent.pid"));
                    std::fs::read_to_string(p).ok()?.trim().parse().ok()
                })
                .collect()
        }
    }
    impl Drop for Dev {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                for pid in self.agent_pids() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
    use nix::sys::signal::{kill as nix_kill, Signal};
    fn kill(pid: i32, sig: Signal) -> nix::Result<()> {
        nix_kill(nix::unistd::Pid::from_raw(pid), sig)
    }

    let dir = tempfile::Builder::new()
        .prefix("crux-e2e-dev-")
        .tempdir()
        .unwrap();
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CRUX_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["dev", "--nodes", "3", "--plain", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut dev = Dev { child, dir };
    let stdout = dev.child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with("agreement: 3 ready agent(s) agree");
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(_) => panic!("crux dev did not show agreement:\n{}", seen.join("\n")),
        }
    }
    // Issue 18: at the agree line every agent is ready, the store included: `proctor apply` at
    // once, told not to wait, succeeds on each.
    let intent = dev.dir.path().join("empty-intent.toml");
    std::fs::write(&intent, "").unwrap();
    for k in 1..=3 {
        let socket = dev.dir.path().join(format!("node{k}/reeve.sock"));
        let out = Command::new(BIN)
            .args(["proctor", "apply", "--wait", "0s", "--socket"])
            .arg(&socket)
            .arg(&intent)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node{k}: proctor apply at the agree line: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pids = dev.agent_pids();
    assert_eq!(pids.len(), 3);
    for k in 1..=3 {
        let node = dev.dir.path().join(format!("node{k}"));
        assert!(node.join("crux.toml").exists() && node.join("keyring").exists());
    }
    kill(dev.child.id() as i32, Signal::SIGTERM).unwrap();
    let status = crux_tests::cluster::wait_for(Duration::from_secs(20), || {
        dev.child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "crux dev still running".to_string())
    })
    .expect("crux dev exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(
            kill(pid, Signal::SIGCONT).is_err(),
            "agent {pid} still running"
        );
    }
    assert!(dev.agent_pids().is_empty(), "pid files removed");
}

/// Readiness waits for the bootstrap: an agent that cannot finish step 1 (alone, with a settle
/// period of an hour it never claims leadership) answers 503 on /ready naming the step, reports
/// `crux_ready 0`, and the CLI fails with a non-zero exit.
#[test]
fn not_ready_until_the_bootstrap_is_done() {
    let mut c = Cluster::new(BIN, 8, 1, PRESET);
    c.append_config(1, "[timing]\nsettle = \"1h\"\n");
    c.start(1);
    let http = c.agent(1).http;
    let body = c.wait_for("HTTP to answer", CONVERGE, || {
        http_get(http, "/ready").map_err(|e| e.to_string())
    });
    assert!(body.starts_with("HTTP/1.1 503"), "{body}");
    assert!(body.contains("not ready for "), "{body}");
    assert!(body.contains("step flock starting: "), "{body}");
    // Per step: the flock's is starting (since when, waiting for what), the others wait their
    // turn after the steps they need.
    let verbose = http_get(http, "/ready?verbose").unwrap();
    assert!(verbose.contains("  flock    starting for "), "{verbose}");
    assert!(
        verbose.contains("  proctor  pending  (after store, picket)"),
        "{verbose}"
    );
    let metrics = http_get(http, "/metrics").unwrap();
    assert!(metrics.contains("crux_ready 0"), "{metrics}");
    let out = c.cli(1, &["members"]);
    assert!(!out.status.success());
    assert!(!out.stderr.is_empty());
    // It still shuts down cleanly.
    assert!(c.sigterm(1, Duration::from_secs(15)).success());
}

/// The node gRPC port under hostile connections: idle ones that hold the handshake slots, ones
/// that send garbage or a plain HTTP/2 preface, one with a key the bloc does not hold. Each is
/// closed and counted by reason; the agents stay in their flock and their node calls carry on;
/// once the flood is gone, a caller with the bloc's key connects again.
#[test]
fn the_node_port_closes_hostile_connections_and_keeps_serving() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let mut c = Cluster::new(BIN, 9, 2, PRESET);
    let both = [1, 2];
    c.start_all();
    converged(&c, &both);
    let target = c.agent(1).grpc;
    let counts = |c: &Cluster| -> std::collections::BTreeMap<String, u64> {
        let metrics = http_get(c.agent(1).http, "/metrics").unwrap_or_default();
        metrics
            .lines()
            .filter_map(|l| l.strip_prefix("crux_node_plane_rejected_total{reason=\""))
            .filter_map(|l| {
                let (reason, rest) = l.split_once("\"} ")?;
                Some((reason.to_string(), rest.trim().parse().ok()?))
            })
            .collect()
    };
    // More idle connections than there are handshake slots (256): the rest are refused busy.
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect"))
        .collect();
    // Garbage, and what a plain gRPC client sends first, once the slots are free again.
    c.wait_for(
        "idle connections timed out and busy ones refused",
        CONVERGE,
        || {
            let n = counts(&c);
            match (n.get("timeout"), n.get("busy")) {
                (Some(&t), Some(&b)) if t >= 1 && b >= 1 && t + b >= 300 => Ok(()),
                _ => Err(format!("{n:?}")),
            }
        },
    );
    drop(idle);
    let refused_at_once = |payload: &[u8]| {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(payload).expect("write");
        // The server closes the connection with at most a TLS alert (one 7-byte record):
        // nothing that names a version or a service.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.len() <= 7, "answered {} bytes: {rest:?}", rest.len());
        assert!(!String::from_utf8_lossy(&rest).contains("HTTP"));
    };
    refused_at_once(&[0xffu8; 76]);
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.resize(76, 0);
    refused_at_once(&preface);
    let err = node_connect(&c, 1, &crux_tests::cluster::keygen(BIN.as_ref()))
        .expect_err("a key the bloc does not hold was accepted");
    assert!(err.contains("connect"), "{err}");
    // A stranger (a key the flock does not list) holding the bloc's key is refused too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stranger = c.test_transport(crux_transport::NodeIdentity::generate().unwrap(), &c.key);
    let err = rt
        .block_on(stranger.connect(target, None))
        .expect_err("a node the flock does not list was accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    c.wait_for(
        "garbage, a wrong bloc key and a stranger counted",
        CONVERGE,
        || {
            let n = counts(&c);
            if n.get("unknown_peer").copied().unwrap_or(0) < 1 {
                return Err(format!("{n:?}"));
            }
            match (n.get("tls"), n.get("bloc")) {
                (Some(&m), Some(&u)) if m >= 2 && u >= 1 => Ok(()),
                _ => Err(format!("{n:?}")),
            }
        },
    );
    // The agents are still one flock, and a caller with the key connects to either.
    converged(&c, &both);
    for k in both {
        c.wait_for(&format!("node{k} accepts the bloc's key"), CONVERGE, || {
            node_connect(&c, k, &c.key)
        });
    }
}
