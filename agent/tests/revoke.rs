//! Revocation on the node plane with real agents (issue 15, item 3): `crux node revoke ID`
//! removes a node from the flock, closes its node-plane connections and refuses new ones; a
//! secondary key rotation closes the connections made under the removed key.

use std::time::Duration;

use crux_tests::cluster::{http_get, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);
/// "Within one gossip period": the local preset gossips every 100 ms or so; the bound leaves
/// room for a loaded 2-core machine and for the watch that feeds the transport.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn rejected(c: &Cluster, k: usize, reason: &str) -> u64 {
    let metrics = http_get(c.agent(k).http, "/metrics").unwrap_or_default();
    let prefix = format!("crux_node_plane_rejected_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Opens HTTP/2 on a node-plane connection as a gRPC client would (the preface and an empty
/// SETTINGS frame), so that the node's server holds it open and idle.
fn speak_http2(rt: &tokio::runtime::Runtime, stream: &mut crux_transport::NodeStream) {
    rt.block_on(async {
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("HTTP/2 preface")
    });
}

/// Whether the node closes `stream` (EOF or an error) within `within`; what it sends meanwhile
/// (its SETTINGS, keepalive pings) is read and dropped.
fn closed_within(
    rt: &tokio::runtime::Runtime,
    stream: &mut crux_transport::NodeStream,
    within: Duration,
) -> bool {
    rt.block_on(async {
        let mut buf = [0u8; 4096];
        let read_until_closed = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read_until_closed)
            .await
            .is_ok()
    })
}

#[test]
fn a_revoked_node_loses_its_connections_and_is_refused() {
    let mut c = Cluster::new(BIN, 1, 3, PRESET);
    c.start_all();
    c.stable_agreement(&[1, 2, 3], Duration::from_secs(1), CONVERGE);
    let target = c.node_id(3).expect("node 3's id");
    let rt = runtime();
    // The test holds a node-plane connection to node 1 as node 3 (its key, the bloc's key).
    let as_three = c.test_transport(c.node_identity(3), &c.key);
    let mut held = rt
        .block_on(as_three.connect(c.agent(1).grpc, None))
        .expect("node 3 connects while listed");
    speak_http2(&rt, &mut held);
    assert!(!closed_within(&rt, &mut held, Duration::from_millis(300)));
    let revoked_before = rejected(&c, 1, "revoked");

    let out = c.cli(1, &["node", "revoke", &target]);
    assert!(
        out.status.success(),
        "crux node revoke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("rotate the secondary key"), "{said}");

    // The held connection closes within a bounded time, and node 1 counts it.
    assert!(
        closed_within(&rt, &mut held, CLOSE_WITHIN),
        "node 3's connection to node 1 stayed open after the revocation"
    );
    c.wait_for("node 1 to count revoked connections", CONVERGE, || {
        let n = rejected(&c, 1, "revoked");
        if n > revoked_before {
            Ok(())
        } else {
            Err(format!("revoked {n}"))
        }
    });
    // Nodes 1 and 2 no longer list node 3, and agree on each other.
    c.wait_for("nodes 1 and 2 to forget node 3", CONVERGE, || {
        for k in [1, 2] {
            let members = c.members(k)?;
            if members.iter().any(|m| m.id == target) {
                return Err(format!("node{k} still lists {target}"));
            }
        }
        c.agreement(&[1, 2]).map(drop)
    });
    // A new connection as node 3 is refused (its key is no longer listed)...
    let unknown_before = rejected(&c, 1, "unknown_peer");
    let err = rt
        .block_on(as_three.connect(c.agent(1).grpc, None))
        .expect_err("a revoked node connected");
    assert!(err.to_string().contains("handshake"), "{err}");
    c.wait_for("node 1 to count the refusal", CONVERGE, || {
        let n = rejected(&c, 1, "unknown_peer");
        if n > unknown_before {
            Ok(())
        } else {
            Err(format!("unknown_peer {n}"))
        }
    });
    // ...and node 3 itself, told it is revoked, shut down.
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while c.agents[2].running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 3 still runs after its revocation\n{}",
            c.logs(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The rest keeps working: a store write on node 2 (forwarded to the Raft leader over the
    // node plane) is read on node 1.
    let digest = format!("sha256:{}", "cd".repeat(32));
    c.wait_for("a muster entry added on node 2", CONVERGE, || {
        let out = c.cli(
            2,
            &[
                "muster",
                "add",
                "--api",
                "rev1",
                "--inst",
                "rev1_1",
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
        let out = c.cli(1, &["muster", "search", "--api", "rev1", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.contains("rev1_1") {
            Ok(())
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
}

#[test]
fn removing_the_secondary_key_closes_the_connections_made_under_it() {
    let mut c = Cluster::new(BIN, 2, 2, PRESET);
    c.start_all();
    c.stable_agreement(&[1, 2], Duration::from_secs(1), CONVERGE);
    let rt = runtime();
    let old = c.key.clone();
    let mut held = rt
        .block_on(
            c.test_transport(c.node_identity(2), &old)
                .connect(c.agent(1).grpc, None),
        )
        .expect("connects under the current key");
    speak_http2(&rt, &mut held);
    let new = crux_tests::cluster::keygen(BIN.as_ref());
    // Node 2's keyring as (id, primary) pairs.
    let keys_of = |c: &Cluster| -> Result<Vec<(String, bool)>, String> {
        let out = c.cli(2, &["keys", "list", "--json"]);
        let keys: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        Ok(keys
            .iter()
            .map(|k| {
                (
                    k["id"].as_str().unwrap_or("").to_string(),
                    k["primary"] == true,
                )
            })
            .collect())
    };
    let old_id = keys_of(&c).unwrap()[0].0.clone();
    for args in [
        vec!["keys", "install", new.as_str()],
        vec!["keys", "use", new.as_str()],
    ] {
        let out = c.cli(1, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_for(&format!("crux {args:?} on node 2"), CONVERGE, || {
            let keys = keys_of(&c)?;
            let done = match args[1] {
                "install" => keys.len() == 2,
                _ => keys.len() == 2 && keys[0].0 != old_id && keys[0].1,
            };
            if done {
                Ok(())
            } else {
                Err(format!("{keys:?}"))
            }
        });
    }
    // Still installed: the connection made under the old key lives on.
    assert!(!closed_within(&rt, &mut held, Duration::from_millis(300)));
    let out = c.cli(1, &["keys", "remove", old.as_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        closed_within(&rt, &mut held, CLOSE_WITHIN),
        "a connection made under the removed key stayed open"
    );
    // A new one under the new key is accepted.
    rt.block_on(
        c.test_transport(c.node_identity(2), &new)
            .connect(c.agent(1).grpc, None),
    )
    .expect("connects under the new key");
}
