//! The live web page (issue 18, item 2) in a real browser: Debian's `chromium`, headless, driven
//! over the DevTools protocol (CDP) by a small client here, opens one agent's page of a flock of
//! three real agents on loopback, and sees, without a reload, a newly registered service appear
//! and a node killed with kill -9 turn from alive to dead.
//!
//! "Without a reload" is checked, not assumed: a marker is set on the page's `window` once it has
//! loaded, and every later reading of the page returns it; a reload (or a navigation) would lose
//! it and fail the test at once.
//!
//! Skipped, with a message saying so, where no chromium is installed (`dev/setup.sh` installs
//! Debian's). The test owns what it starts: the agents (see `crux_tests::cluster`), the
//! registration, and chromium in a process group of its own, killed with that group on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crux_tests::cluster::{http_get, wait_for, Cluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// What the page keeps on its `window` for as long as it is not reloaded.
const MARKER: &str = "the page loaded once";

/// The system chromium, if there is one on PATH.
fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A headless chromium and one page in it, driven over the DevTools protocol.
struct Browser {
    process: Chromium,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// The DevTools session of the page ([`Browser::open`]).
    session: Option<String>,
}

impl Browser {
    /// Starts chromium (a profile of its own in a temp dir, DevTools on a port it picks) and
    /// connects to it.
    async fn launch(bin: &Path) -> Result<Browser, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("chromium.log")).map_err(|e| e.to_string())?;
        let profile = dir.path().join("profile");
        use std::os::unix::process::CommandExt;
        let child = Command::new(bin)
            .args([
                "--headless",
                // The test may run as root, where chromium's sandbox does not start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let process = Chromium { child, dir };
        // Chromium writes the port it listens on, and the browser's DevTools path, to this file.
        let port_file = profile.join("DevToolsActivePort");
        let endpoint = wait_for(CONVERGE, || {
            let text = std::fs::read_to_string(&port_file).map_err(|e| e.to_string())?;
            let mut lines = text.lines();
            match (lines.next(), lines.next()) {
                (Some(port), Some(path)) => Ok(format!("ws://127.0.0.1:{port}{path}")),
                _ => Err(format!("{} is incomplete", port_file.display())),
            }
        })
        .map_err(|e| format!("chromium shows no DevTools port: {e}\n{}", process.log()))?;
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .map_err(|e| format!("DevTools at {endpoint}: {e}\n{}", process.log()))?;
        Ok(Browser {
            process,
            ws,
            next_id: 0,
            session: None,
        })
    }

    /// Calls DevTools method `method` (in the page's session once there is one); its result.
    /// Events that come meanwhile are passed over.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| format!("{method}: {e}"))?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(m) = self.ws.next().await {
                let m = m.map_err(|e| format!("{method}: {e}"))?;
                let Message::Text(text) = m else { continue };
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if v["id"].as_u64() == Some(id) {
                    return Ok(v);
                }
            }
            Err(format!("{method}: DevTools closed the connection"))
        })
        .await
        .unwrap_or_else(|_| Err(format!("{method}: no answer within {CALL_TIMEOUT:?}")))
        .map_err(|e| format!("{e}\nchromium's log:\n{}", self.process.log()))?;
        match answer.get("error") {
            Some(e) => Err(format!("{method}: {e}")),
            None => Ok(answer["result"].clone()),
        }
    }

    /// Opens `url` in a new page and attaches to it.
    async fn open(&mut self, url: &str) -> Result<(), String> {
        let target = self
            .call("Target.createTarget", json!({ "url": url }))
            .await?;
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await?;
        let session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no session in {attached}"))?;
        self.session = Some(session.to_string());
        Ok(())
    }

    /// The value of the JavaScript `expression` in the page.
    async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }
}

/// Chromium's process group and its temp dir (profile, log); the group is killed on drop.
struct Chromium {
    child: Child,
    dir: tempfile::TempDir,
}

impl Chromium {
    /// What chromium printed, for failures.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The group is chromium's own (process_group(0)): its wrapper script, the browser and
        // every helper process it started.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// The page, read in the browser: `expression`'s value, once the marker shows the page was
/// not reloaded since it was set (a reload fails the test at once).
fn read_page(
    rt: &tokio::runtime::Runtime,
    b: &mut Browser,
    expression: &str,
) -> Result<Value, String> {
    let v = rt.block_on(b.eval(&format!(
        "({{ marker: window.cruxMarker, value: ({expression}) }})"
    )))?;
    assert_eq!(
        v["marker"].as_str(),
        Some(MARKER),
        "the page was reloaded (its marker is gone): {v}"
    );
    Ok(v["value"].clone())
}

/// The state the page shows for node `id` (None: no row for it).
const NODE_STATE: &str =
    "(id) => { const r = document.querySelector(`#nodes tr[data-node=\"${id}\"]`); \
                          return r ? r.dataset.state : null; }";

#[test]
fn the_page_follows_the_flock_live_in_a_real_browser() {
    let Some(chromium) = find_chromium() else {
        eprintln!(
            "SKIPPED the_page_follows_the_flock_live_in_a_real_browser: no chromium on PATH \
             (dev/setup.sh installs Debian's chromium)"
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = Cluster::new(BIN, 1, 3, PRESET);
    c.start_all();
    c.wait_for("three agents in one flock", CONVERGE, || {
        c.agreement(&[1, 2, 3])
    });
    let ids: Vec<String> = (1..=3).map(|k| c.node_id(k).expect("node id")).collect();
    let http = c.agent(1).http;

    // curl and scripts still get the plain-text status at /; a browser is sent to /ui.
    let plain = http_get(http, "/").expect("GET /");
    assert!(
        plain.starts_with("HTTP/1.1 200") && plain.contains("members ("),
        "{plain}"
    );

    let mut b = match rt.block_on(Browser::launch(&chromium)) {
        Ok(b) => b,
        Err(e) => panic!("chromium is installed but does not start: {e}"),
    };
    rt.block_on(b.open(&format!("http://{http}/")))
        .expect("open the page");
    let loaded = c.wait_for("the page to load at /ui", CONVERGE, || {
        let v = rt.block_on(b.eval(
            "location.protocol === 'http:' && document.readyState === 'complete' ? location.pathname + ' ' + document.title : null",
        ))?;
        v.as_str().map(str::to_string).ok_or("loading".to_string())
    });
    assert!(
        loaded.starts_with("/ui crux · node "),
        "the browser was sent to the page: {loaded}"
    );
    rt.block_on(b.eval(&format!("window.cruxMarker = {MARKER:?}")))
        .expect("set the marker");

    // The page as served lists the three nodes alive, and its stream is open.
    c.wait_for("the page to list three alive nodes, live", CONVERGE, || {
        let v = read_page(
            &rt,
            &mut b,
            &format!(
                "[{}].map({NODE_STATE}).concat([document.getElementById('live').className])",
                ids.iter()
                    .map(|id| format!("{id:?}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )?;
        if v == json!(["alive", "alive", "alive", "on"]) {
            Ok(())
        } else {
            Err(format!("nodes and stream: {v}"))
        }
    });

    // A service registered on node 2 appears on node 1's page.
    let addr = SocketAddr::new(c.agent(2).addr.ip(), 40_001);
    let _registration = c.register(2, "uiprobe", "uiprobe_1", addr, &[]);
    let row = c.wait_for("the new service on the page", CONVERGE, || {
        let v = read_page(
            &rt,
            &mut b,
            "(() => { const r = document.querySelector('#registry tr[data-inst=\"uiprobe_1\"]'); \
             return r ? r.dataset.api + ' ' + r.textContent : null; })()",
        )?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| "not listed yet".to_string())
    });
    assert!(
        row.starts_with("uiprobe ") && row.contains(&addr.to_string()),
        "the row names the api and the address: {row}"
    );

    // kill -9 of node 3: its row turns from alive to dead.
    c.kill9(3);
    let dead = &ids[2];
    c.wait_for("node 3 dead on the page", CONVERGE, || {
        let v = read_page(&rt, &mut b, &format!("({NODE_STATE})({dead:?})"))?;
        if v == json!("dead") {
            Ok(())
        } else {
            Err(format!("node 3 is {v}"))
        }
    });
    let events =
        read_page(&rt, &mut b, "document.getElementById('events').textContent").expect("events");
    let events = events.as_str().unwrap_or_default();
    assert!(
        events.contains(&format!("node {dead}")) && events.contains("is dead"),
        "the events say so: {events}"
    );
    assert!(
        events.contains("uiprobe uiprobe_1 registered"),
        "the events list the registration: {events}"
    );
    drop(b);
}
