//! Helpers the store tests share: the local API of a node, document writes through it,
//! `crux store status`, and muster writes and reads through the CLI.

use std::time::Duration;

use crux_proto::grpc::reeve::v1 as pb;
use crux_tests::cluster::Cluster;
use serde::Deserialize;

/// A runtime for one blocking call.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A client of node k's local API.
#[allow(dead_code)] // not every test binary calls the reeve API directly
pub async fn reeve(
    c: &Cluster,
    k: usize,
) -> pb::reeve_client::ReeveClient<tonic::transport::Channel> {
    let ch = crux_reeve::client::socket_channel(&c.agent(k).socket, Duration::from_secs(5))
        .await
        .expect("socket");
    pb::reeve_client::ReeveClient::new(ch)
}

/// Puts document `key` = `value` (unconditionally) through node k.
#[allow(dead_code)] // not every test binary writes documents
pub fn put_doc(c: &Cluster, k: usize, key: &str, value: &str) -> Result<(), String> {
    runtime().block_on(async {
        let r = reeve(c, k)
            .await
            .doc_put(pb::DocPutRequest {
                key: key.into(),
                value: value.into(),
                if_generation: 0,
                unconditional: true,
            })
            .await
            .map_err(|s| format!("node{k}: {}", s.message()))?
            .into_inner();
        if r.written {
            Ok(())
        } else {
            Err(format!("node{k}: not written: {r:?}"))
        }
    })
}

/// `crux store status --json`, the fields the tests read.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // each test binary reads some of them
pub struct Status {
    pub leader_addr: String,
    pub leader_id: String,
    pub term: u64,
    pub voters: Vec<String>,
    pub voter_ids: Vec<String>,
    pub last_applied: u64,
    pub initialized: bool,
    pub group: Option<String>,
}

/// Node k's store status, through the CLI.
pub fn status(c: &Cluster, k: usize) -> Result<Status, String> {
    let out = c.cli(k, &["store", "status", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "node{k}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: {e}"))
}

/// `crux muster add` on node k: instance `inst` of `api` (a fixed file digest; the function is
/// the instance's name).
#[allow(dead_code)] // not every test binary writes the muster
pub fn muster_add(c: &Cluster, k: usize, api: &str, inst: &str) -> Result<(), String> {
    let file = format!("sha256:{}", "cd".repeat(32));
    let args = [
        "muster",
        "add",
        "--api",
        api,
        "--inst",
        inst,
        "--file",
        &file,
        "--function",
        inst,
    ];
    let out = c.cli(k, &args);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "node{k}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The instances of `api` node k's muster holds (`crux muster search --json`).
#[allow(dead_code)] // not every test binary reads the muster
pub fn muster_search(
    c: &Cluster,
    k: usize,
    api: &str,
) -> Result<std::collections::BTreeSet<String>, String> {
    #[derive(Deserialize)]
    struct Entry {
        inst: String,
    }
    let out = c.cli(k, &["muster", "search", "--api", api, "--json"]);
    if !out.status.success() {
        return Err(format!(
            "node{k}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: Vec<Entry> = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v.into_iter().map(|e| e.inst).collect())
}
