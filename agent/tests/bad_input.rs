//! Issue 18, "Bad input": a config with an unknown key, a bloc ID of the wrong shape, two agents
//! on one node dir, a port in use, a data dir the agent may not write — each refused with one
//! line on stderr that says what and where (`file:line` for the config), a non-zero exit, and
//! nothing in the data dir changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use crux_tests::cluster::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);

/// Every file under `dir` (but the agent's log and config, which the harness writes) with its
/// bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name == "agent.log" || name == "crux.toml" {
                continue;
            }
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(p, bytes);
            }
        }
    }
    out
}

/// `crux agent --config <node k's config>`, run to its end.
fn agent(c: &Cluster, k: usize) -> Output {
    c.command()
        .arg("agent")
        .arg("--config")
        .arg(c.agent(k).config())
        .output()
        .expect("run crux agent")
}

/// The run failed with exactly one line on stderr; that line.
fn one_line(out: &Output, case: &str) -> String {
    assert!(!out.status.success(), "{case}: the agent started");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{case}: not one line:\n{err}");
    assert!(err.starts_with("crux agent: "), "{case}: {err}");
    err
}

/// Replaces node k's config line starting with `from` by `to` (which may hold several lines).
fn edit(c: &Cluster, k: usize, from: &str, to: &str) {
    let path = c.agent(k).config();
    let text = std::fs::read_to_string(&path).expect("read config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with(from) {
                format!("{to}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&path, text).expect("write config");
}

fn line_of(c: &Cluster, k: usize, starts: &str) -> usize {
    let text = std::fs::read_to_string(c.agent(k).config()).expect("read config");
    text.lines()
        .position(|l| l.starts_with(starts))
        .expect("the line")
        + 1
}

/// An unknown key (at the top or in a table) and a bloc ID of the wrong shape: `file:line`, the
/// field, exit 2, and the node dir left as it was (nothing is even created).
#[test]
fn a_bad_config_is_refused_with_file_and_line() {
    let c = Cluster::new(BIN, 1, 1, PRESET);
    let config = c.agent(1).config().display().to_string();
    let before = files(&c.agent(1).dir);
    let cases: [(&str, &str, &str, &str, &str); 3] = [
        (
            "preset = ",
            "preset = \"local\"\nbogus_key = 1",
            "bogus_key = ",
            "config field `bogus_key`: unknown field `bogus_key`",
            "unknown key",
        ),
        (
            "log_level = ",
            "log_level = \"info\"\n[timing]\nprobe_intervall = \"1s\"",
            "probe_intervall = ",
            "config field `timing.probe_intervall`: unknown field `probe_intervall`",
            "unknown key in a table",
        ),
        (
            "bloc = ",
            "bloc = \"my bloc/1\"",
            "bloc = ",
            "config field `bloc`: \"my bloc/1\" is not a bloc ID",
            "bloc ID of the wrong shape",
        ),
    ];
    let good = std::fs::read_to_string(c.agent(1).config()).expect("read config");
    for (from, to, at, what, case) in cases {
        std::fs::write(c.agent(1).config(), &good).expect("write config");
        edit(&c, 1, from, to);
        let line = line_of(&c, 1, at);
        let out = agent(&c, 1);
        let err = one_line(&out, case);
        assert_eq!(out.status.code(), Some(2), "{case}: {err}");
        assert!(
            err.starts_with(&format!("crux agent: {config}:{line}: {what}")),
            "{case}: {err}"
        );
        assert_eq!(
            files(&c.agent(1).dir),
            before,
            "{case}: the node dir changed"
        );
    }
}

/// A second agent on the node dir of a running one: refused by the dir's lock, naming the first
/// agent's pid; the first one's files are untouched and it keeps answering.
#[test]
fn two_agents_on_one_node_dir_are_refused() {
    let mut c = Cluster::new(BIN, 2, 1, PRESET);
    c.start(1);
    c.wait_for("the first agent's bootstrap", CONVERGE, || {
        let out = c.cli(1, &["members"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    });
    let pid = c.agent(1).pid().expect("running");
    let dir = &c.agent(1).dir;
    let kept = ["node-id", "boot-id", "node-key", "keyring", "lock"];
    let before: Vec<Vec<u8>> = kept
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("a file of the first agent"))
        .collect();
    let out = agent(&c, 1);
    let err = one_line(&out, "a second agent");
    assert!(
        err.contains(&format!(
            "data dir {} is in use by another agent, pid {pid}",
            dir.display()
        )),
        "{err}"
    );
    assert!(err.contains("nothing was changed"), "{err}");
    let after: Vec<Vec<u8>> = kept
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("still there"))
        .collect();
    assert_eq!(
        before, after,
        "the second agent changed the first one's files"
    );
    assert!(c.agents[0].running(), "the first agent died");
    assert!(c.cli(1, &["status"]).status.success());
}

/// Each port the agent binds, taken by another process: refused naming the port, the address
/// and the config field, and nothing in the node dir (of a node that ran before) changed.
#[test]
fn a_port_in_use_is_refused_and_changes_nothing() {
    let mut c = Cluster::new(BIN, 3, 1, PRESET);
    c.start(1);
    c.wait_for("the agent's bootstrap", CONVERGE, || {
        let out = c.cli(1, &["members"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    });
    assert!(c.sigterm(1, CONVERGE).success());
    let before = files(&c.agent(1).dir);
    let a = c.agent(1);
    let cases = [
        (a.addr, "bind", true),
        (a.grpc, "grpc_port", false),
        (a.http, "http_port", false),
    ];
    for (addr, field, udp) in cases {
        // Held by this test while the agent starts.
        let _udp;
        let _tcp;
        if udp {
            _udp = Some(std::net::UdpSocket::bind(addr).expect("take the UDP port"));
            _tcp = None;
        } else {
            _udp = None;
            _tcp = Some(std::net::TcpListener::bind(addr).expect("take the TCP port"));
        }
        let out = agent(&c, 1);
        let err = one_line(&out, field);
        assert!(
            err.contains(&format!(
                "port {} on {} is in use by another process",
                addr.port(),
                addr.ip()
            )),
            "{field}: {err}"
        );
        assert!(err.contains(&format!("config field `{field}`")), "{err}");
        assert_eq!(
            files(&c.agent(1).dir),
            before,
            "{field}: the node dir changed"
        );
    }
}

/// A data dir the agent may not write (owned by root, the agent running as `nobody`; or, when
/// the test does not run as root, a dir without write permission): refused naming the dir and
/// the field, and nothing in it changed.
#[test]
fn a_data_dir_without_permission_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let c = Cluster::new(BIN, 4, 1, PRESET);
    // A place every user can read: the config, and a data dir only its owner may write.
    let top = c.dir().join("shared");
    std::fs::create_dir(&top).expect("mkdir");
    let data = top.join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("node-id"), "00000000000000aa\n").expect("write");
    let root = nix::unistd::getuid().is_root();
    let mode = if root { 0o755 } else { 0o555 };
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).expect("chmod");
    // The temp dir itself is 0700: let `nobody` through to `shared`.
    for d in [c.dir(), top.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let config = top.join("crux.toml");
    let text = std::fs::read_to_string(c.agent(1).config()).expect("read config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("data_dir = ") {
                format!("data_dir = {:?}\n", data.display().to_string())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&config, text).expect("write config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = files(&data);
    let mut cmd = c.command();
    cmd.arg("agent").arg("--config").arg(&config);
    if root {
        // `nobody`: the agent then meets the permission a non-root service user would.
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().expect("run crux agent");
    let err = one_line(&out, "data dir without permission");
    assert!(
        err.contains(&format!(
            "data dir {}: cannot write in it: ",
            data.display()
        )),
        "{err}"
    );
    assert!(err.contains("config field `data_dir`"), "{err}");
    assert!(err.contains("ermission denied"), "{err}");
    assert_eq!(files(&data), before, "the data dir changed");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
