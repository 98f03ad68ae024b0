//! Picket's plugin runner against real processes: the galumph plugin and small shell scripts.
//! Reference: DESIGN.md "Picket" (handshake, Shutdown/SIGTERM/grace/SIGKILL, back-off, crash
//! loop, re-adoption) and the seed's Galumph example (`002_12627cdec8b3ad31.txt`).

mod common;

use std::time::Duration;

use common::{config, galumph, gone, recorded, reeve, script, spec, wait_for, Reaper};
use crux_picket::{Picket, StopOutcome, UnitState, UnitStatus};
use galumph::pb::{galumph_client::GalumphClient, GalumphInstance, TableReq};

const LONG: Duration = Duration::from_secs(30);

fn state_of(u: &[crux_picket::UnitStatus], key: &str) -> Option<UnitState> {
    u.iter().find(|s| s.spec.key == key).map(|s| s.state)
}

#[tokio::test]
async fn galumph_handshakes_turns_healthy_registers_and_stops_on_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let r = reeve(tmp.path()).await;
    let p = Picket::open(config(&dir, &r.socket)).await.unwrap();
    let u = start_galumph(&p).await;
    let pid = u[0].pid.expect("a pid while healthy");
    let addr = u[0].addr.clone().expect("the socket from the handshake");
    assert!(
        addr.starts_with(&dir.join("sock").display().to_string()),
        "{addr}"
    );
    assert!(u[0].detail.contains("version 2.3"), "{}", u[0].detail);
    assert_eq!(u[0].restarts, 0);
    assert_eq!(recorded(&dir), vec![("g".to_string(), pid)]);

    // Registered with the reeve, reachable over TCP on the node IP.
    let live = r.live("galumph2");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].inst, "galumph2_3");
    assert!(live[0].addr.starts_with("127.0.0.1:"), "{}", live[0].addr);
    let mut c = GalumphClient::connect(format!("http://{}", live[0].addr))
        .await
        .unwrap();
    c.register(GalumphInstance {
        name: "snark".into(),
        value: "boojum".into(),
    })
    .await
    .unwrap();
    let t = c.table(TableReq {}).await.unwrap().into_inner();
    assert_eq!(
        (t.inst.as_str(), t.version.as_str(), t.node.as_str()),
        ("galumph2_3", "2.3", "127.0.0.1")
    );
    assert_eq!(t.instances.len(), 1);

    // The client mode finds it through the reeve socket.
    let out = tokio::process::Command::new(galumph())
        .args(["call", "--socket"])
        .arg(&r.socket)
        .args(["register", "jubjub", "bird"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new(galumph())
        .args(["call", "--socket"])
        .arg(&r.socket)
        .arg("table")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("galumph2_3 (version 2.3) on 127.0.0.1"),
        "{text}"
    );
    assert!(
        text.contains("jubjub\tbird") && text.contains("snark\tboojum"),
        "{text}"
    );

    assert_eq!(p.stop_outcome("g").await, Some(StopOutcome::Shutdown));
    assert!(gone(pid), "pid {pid} still runs after stop");
    assert!(p.units().is_empty());
    assert!(recorded(&dir).is_empty());
    assert!(
        r.live("galumph2").is_empty(),
        "galumph deregistered on Shutdown"
    );
    assert!(
        !std::path::Path::new(&addr).exists(),
        "the socket file is removed"
    );
}

#[tokio::test]
async fn a_plugin_that_exits_is_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let r = reeve(tmp.path()).await;
    let p = Picket::open(config(&dir, &r.socket)).await.unwrap();
    let u = start_galumph(&p).await;
    let first = u[0].pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let u = wait_for(&p, "healthy again with a new pid", LONG, |u| {
        u[0].state == UnitState::Healthy && u[0].pid.is_some_and(|p| p != first)
    })
    .await;
    assert_eq!(u[0].restarts, 1);
    let second = u[0].pid.unwrap();
    assert_eq!(recorded(&dir), vec![("g".to_string(), second)]);
    p.stop_all().await;
    assert!(gone(second));
    assert!(p.units().is_empty());
}

#[tokio::test]
async fn a_crash_loop_is_failed_and_not_restarted_until_started_again() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let r = reeve(tmp.path()).await;
    let mut cfg = config(&dir, &r.socket);
    cfg.crash_loop = 3;
    let p = Picket::open(cfg).await.unwrap();
    p.start(spec("c", "crash", &galumph()));
    let u = wait_for(&p, "failed", LONG, |u| {
        state_of(u, "c") == Some(UnitState::Failed)
    })
    .await;
    assert_eq!(u[0].restarts, 2, "3 runs: the first and 2 restarts");
    assert_eq!(u[0].pid, None);
    assert!(u[0].detail.contains("crash loop"), "{}", u[0].detail);
    assert!(
        u[0].detail.contains("exited with status 3"),
        "{}",
        u[0].detail
    );
    // No further restarts: nothing changes over many back-off periods.
    let mut changed = p.changed();
    changed.borrow_and_update();
    let quiet = tokio::time::timeout(Duration::from_millis(800), changed.changed()).await;
    assert!(quiet.is_err(), "a failed unit changed: {:?}", p.units());
    assert_eq!(p.units(), u);

    assert_eq!(p.stop_outcome("c").await, Some(StopOutcome::NotRunning));
    assert!(p.units().is_empty());
    // Started again: it runs again (and fails again, counted afresh).
    p.start(spec("c", "crash", &galumph()));
    let u = wait_for(&p, "failed again", LONG, |u| {
        state_of(u, "c") == Some(UnitState::Failed)
    })
    .await;
    assert_eq!(u[0].restarts, 2);
    p.stop_all().await;
}

#[tokio::test]
async fn a_bad_handshake_line_fails_the_start_and_is_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let mut cfg = config(&dir, std::path::Path::new(""));
    cfg.crash_loop = 1;
    cfg.handshake_timeout = Duration::from_millis(300);
    let p = Picket::open(cfg).await.unwrap();
    let hello = script(tmp.path(), "hello.sh", "echo 'hello there'\nexec sleep 30");
    let mute = script(tmp.path(), "mute.sh", "exec sleep 30");
    p.start(spec("hello", "x", &hello));
    p.start(spec("mute", "x", &mute));
    p.start(spec("missing", "x", &tmp.path().join("no-such-exe")));
    let u = wait_for(&p, "all failed", LONG, |u| {
        u.len() == 3 && u.iter().all(|s| s.state == UnitState::Failed)
    })
    .await;
    let detail = |k: &str| u.iter().find(|s| s.spec.key == k).unwrap().detail.clone();
    assert!(
        detail("hello").contains("bad handshake \"hello there\""),
        "{}",
        detail("hello")
    );
    assert!(
        detail("mute").contains("no handshake line within 300 ms"),
        "{}",
        detail("mute")
    );
    assert!(
        detail("missing").contains("cannot run"),
        "{}",
        detail("missing")
    );
    // The processes that failed their handshake were killed.
    assert!(
        _reaper.pids().is_empty(),
        "left running: {:?}",
        _reaper.pids()
    );
    p.stop_all().await;
    assert!(p.units().is_empty());
}

/// Starts galumph as unit `g` (galumph2_3) and waits until it is healthy; the units then.
async fn start_galumph(p: &Picket) -> Vec<UnitStatus> {
    p.start(spec("g", "galumph2_3", &galumph()));
    wait_for(p, "galumph healthy", LONG, |u| {
        state_of(u, "g") == Some(UnitState::Healthy)
    })
    .await
}

/// Starts, as unit `key`, a script that runs `trap` and then makes a valid handshake but serves
/// no control socket (its health check fails, Shutdown cannot be called); waits until it is
/// unhealthy. Its pid and detail.
async fn start_without_control(
    p: &Picket,
    dir: &std::path::Path,
    key: &str,
    trap: &str,
) -> (u32, String) {
    let body = format!(
        "{trap}\necho \"1|0.1|unix|$CRUX_PLUGIN_SOCKET_DIR/none.sock|grpc\"\nwhile :; do sleep 1; done"
    );
    let exe = script(dir, &format!("{key}.sh"), &body);
    p.start(spec(key, "x", &exe));
    let u = wait_for(p, "unhealthy", LONG, |u| {
        state_of(u, key) == Some(UnitState::Unhealthy)
    })
    .await;
    let u = u.iter().find(|u| u.spec.key == key).unwrap();
    (u.pid.unwrap(), u.detail.clone())
}

#[tokio::test]
async fn a_plugin_that_ignores_shutdown_and_sigterm_is_killed_after_the_grace() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let p = Picket::open(config(&dir, std::path::Path::new("")))
        .await
        .unwrap();
    let (pid, detail) = start_without_control(&p, tmp.path(), "s", "trap '' TERM").await;
    assert!(detail.contains("health check"), "{detail}");
    assert_eq!(p.stop_outcome("s").await, Some(StopOutcome::Killed));
    assert!(gone(pid));
    assert!(
        _reaper.pids().is_empty(),
        "its group was killed: {:?}",
        _reaper.pids()
    );
}

#[tokio::test]
async fn a_plugin_without_a_control_api_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let p = Picket::open(config(&dir, std::path::Path::new("")))
        .await
        .unwrap();
    let (pid, _) = start_without_control(&p, tmp.path(), "t", "trap 'exit 0' TERM").await;
    assert_eq!(p.stop_outcome("t").await, Some(StopOutcome::Terminated));
    assert!(gone(pid));
}

#[tokio::test]
async fn a_new_picket_readopts_the_running_child_and_supervises_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    let _reaper = Reaper::new(&dir);
    let r = reeve(tmp.path()).await;
    let first = Picket::open(config(&dir, &r.socket)).await.unwrap();
    let u = start_galumph(&first).await;
    let pid = u[0].pid.unwrap();
    // The agent goes away without stopping its children.
    drop(first);
    assert!(!gone(pid));
    assert_eq!(recorded(&dir), vec![("g".to_string(), pid)]);

    let second = Picket::open(config(&dir, &r.socket)).await.unwrap();
    let u = second.units();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].pid, Some(pid), "adopted, not started anew");
    let u = wait_for(&second, "adopted and healthy", LONG, |u| {
        u[0].state == UnitState::Healthy
    })
    .await;
    assert_eq!((u[0].pid, u[0].restarts), (Some(pid), 0));
    assert_eq!(r.live("galumph2").len(), 1);

    // Its exit is noticed (by /proc, it is not the new picket's child) and it is restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let u = wait_for(
        &second,
        "restarted after the adopted child died",
        LONG,
        |u| u[0].state == UnitState::Healthy && u[0].pid.is_some_and(|p| p != pid),
    )
    .await;
    assert_eq!(u[0].restarts, 1);
    let again = u[0].pid.unwrap();
    drop(second);

    // Adopted once more, then stopped.
    let third = Picket::open(config(&dir, &r.socket)).await.unwrap();
    assert_eq!(third.units()[0].pid, Some(again));
    assert_eq!(third.stop_outcome("g").await, Some(StopOutcome::Shutdown));
    assert!(gone(again));
    assert!(recorded(&dir).is_empty());
}

#[tokio::test]
async fn records_of_processes_that_are_gone_or_not_ours_are_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("picket");
    std::fs::create_dir_all(&dir).unwrap();
    let me = std::process::id();
    // This test process: alive, but its start time differs (a reused pid), and it has no socket.
    let rec = |key: &str, pid: u32, start: u64| {
        serde_json::json!({
            "key": key,
            "spec": {"key": key, "horde": "", "api": "galumph2", "inst": "galumph2_3",
                     "function": "galumph2_3", "digest": "", "exe": "/bin/false"},
            "pid": pid, "pgid": pid, "start_time": start,
            "socket": dir.join("sock/none.sock"), "token": "00"
        })
    };
    let file =
        serde_json::json!({"children": [rec("reused", me, 1), rec("dead", u32::MAX - 1, 1)]});
    std::fs::write(dir.join("children.json"), file.to_string()).unwrap();
    let p = Picket::open(config(&dir, std::path::Path::new("")))
        .await
        .unwrap();
    assert!(p.units().is_empty());
    assert!(recorded(&dir).is_empty());

    std::fs::write(dir.join("children.json"), "{not json").unwrap();
    let e = Picket::open(config(&dir, std::path::Path::new("")))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("children.json is not a picket records file"),
        "{e}"
    );
}
