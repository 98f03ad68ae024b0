//! Talking to the agents of a cluster: `crux pastiche put/rm/ls/get` through the CLI, and `Get`
//! through the agent's local `Cache` API, timed to the moment the agent answers (the pull is
//! done: the blob is verified, fsynced and renamed into its store).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use crux_proto::grpc::pastiche::v1::{self as pb, cache_client::CacheClient};
use crux_tests::cluster::{wait_for, Cluster};

use crate::now;

/// A pull as the agent reported it.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// From the `Get` call to its first message (the agent holds the blob then).
    pub took: Duration,
    /// Blob size.
    pub size: u64,
    /// Pieces received, by the index of the node that sent them.
    pub sources: BTreeMap<usize, u32>,
    /// Pieces resumed from an earlier pull.
    pub resumed: u32,
}

/// `crux pastiche put FILE --json` on node k: the digest and the time it took.
pub fn put(c: &Cluster, k: usize, file: &Path) -> anyhow::Result<(String, Duration)> {
    let file = file.to_str().context("a UTF-8 path")?;
    let start = now();
    let out = c.cli(k, &["pastiche", "put", file, "--json"]);
    let took = now().duration_since(start);
    if !out.status.success() {
        bail!(
            "node{k}: pastiche put: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("put --json")?;
    let digest = v["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("put --json has no digest: {v}"))?;
    Ok((digest.to_string(), took))
}

/// `crux pastiche rm DIGEST` on node k.
pub fn rm(c: &Cluster, k: usize, digest: &str) -> anyhow::Result<()> {
    let out = c.cli(k, &["pastiche", "rm", digest, "--json"]);
    if !out.status.success() {
        bail!(
            "node{k}: pastiche rm: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether `crux pastiche ls --json` on node k lists `digest` with `size`.
pub fn holds(c: &Cluster, k: usize, digest: &str, size: u64) -> Result<bool, String> {
    let out = c.cli(k, &["pastiche", "ls", "--json"]);
    if !out.status.success() {
        return Err(format!(
            "node{k}: pastiche ls: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("node{k}: ls --json: {e}"))?;
    Ok(v["blobs"].as_array().is_some_and(|blobs| {
        blobs
            .iter()
            .any(|b| b["digest"] == digest && b["size"].as_u64() == Some(size))
    }))
}

/// `crux pastiche get DIGEST -o OUT --json` on node k: its JSON and the time it took.
pub fn cli_get(
    c: &Cluster,
    k: usize,
    digest: &str,
    out_file: &Path,
) -> anyhow::Result<(serde_json::Value, Duration)> {
    let path = out_file.to_str().context("a UTF-8 path")?;
    let start = now();
    let out = c.cli(k, &["pastiche", "get", digest, "-o", path, "--json"]);
    let took = now().duration_since(start);
    if !out.status.success() {
        bail!(
            "node{k}: pastiche get: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v = serde_json::from_slice(&out.stdout).context("get --json")?;
    Ok((v, took))
}

/// One `Get` through node k's `Cache` API (socket `socket`): waits for the first message, then
/// drops the stream (the bytes stay in the agent's store). `ids` maps node ids to indexes.
pub async fn get(
    socket: &Path,
    digest: &str,
    ids: &BTreeMap<String, usize>,
) -> Result<Pulled, tonic::Status> {
    let ch = crux_reeve::client::socket_channel(socket, Duration::from_secs(5))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let mut client = CacheClient::new(ch)
        .max_decoding_message_size(crux_pastiche::serve::MESSAGE_MAX)
        .max_encoding_message_size(crux_pastiche::serve::MESSAGE_MAX);
    let start = now();
    let mut stream = client
        .get(pb::GetRequest {
            digest: digest.to_string(),
        })
        .await?
        .into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("the agent sent nothing"))?;
    let took = now().duration_since(start);
    let mut sources = BTreeMap::new();
    for (id, n) in first.sources {
        let k = ids.get(&id).copied().unwrap_or(0);
        *sources.entry(k).or_default() += n;
    }
    Ok(Pulled {
        took,
        size: first.size,
        sources,
        resumed: first.resumed,
    })
}

/// [`get`], tried again while the agent answers that no holder is reachable (the steward learns
/// of a put within its reeve's next batch), until `timeout`. Only the successful call is timed.
pub async fn get_when_held(
    socket: &Path,
    digest: &str,
    ids: &BTreeMap<String, usize>,
    timeout: Duration,
) -> anyhow::Result<Pulled> {
    let deadline = now() + timeout;
    loop {
        match get(socket, digest, ids).await {
            Ok(p) => return Ok(p),
            Err(s) if s.code() == tonic::Code::Unavailable && now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => bail!("Get {digest} on {}: {s}", socket.display()),
        }
    }
}

/// Node id → index for every node of `c` (each writes its id at its first start).
pub fn node_ids(c: &Cluster) -> anyhow::Result<BTreeMap<String, usize>> {
    wait_for(Duration::from_secs(30), || {
        (1..=c.agents.len())
            .map(|k| {
                c.node_id(k)
                    .map(|id| (id, k))
                    .ok_or_else(|| format!("node{k} has no id yet"))
            })
            .collect()
    })
    .map_err(|e| anyhow!(e))
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`;
/// `pid` `None`: this process.
pub fn cpu(pid: Option<u32>) -> Duration {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command (which may hold spaces) in parentheses: state is field 3, utime
    // and stime fields 14 and 15, in clock ticks.
    let after = text.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    let ticks: u64 = f.iter().sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|h| *h > 0)
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Total CPU time of the agents `nodes` of `c`.
pub fn cpu_of(c: &Cluster, nodes: impl IntoIterator<Item = usize>) -> Duration {
    nodes.into_iter().map(|k| cpu(c.agent(k).pid())).sum()
}
