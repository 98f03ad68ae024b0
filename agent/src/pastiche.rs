//! Pastiche in the agent: the built-in registration (`pastiche1`), and the `crux pastiche` CLI.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use crux_proto::grpc::pastiche::v1::{self as pb, cache_client::CacheClient};
use crux_reeve::Reeve;
use tokio_util::sync::CancellationToken;

/// The built-in pastiche1 service, run by picket's built-in supervision (registered as
/// `pastiche1`, inst `pastiche1_<node>`, at the node gRPC NetID, kept alive every `interval` until
/// `stop`): how `crux picket ps` lists it, and its task, for the caller to spawn and own.
pub fn builtin(
    reeve: &Arc<Reeve>,
    netid: SocketAddr,
    interval: Duration,
    stop: CancellationToken,
) -> (
    crate::placement::BuiltinProc,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let inst = format!("pastiche1_{}", reeve.config().node);
    let point = crux_picket::builtin::Fservice {
        api: "pastiche1".into(),
        inst: inst.clone(),
        netid: netid.to_string(),
        healthy: true,
    };
    let task = crux_picket::builtin::builtin_task(
        Box::new(crux_picket::builtin::Static::new(
            "pastiche",
            vec![point],
            interval,
        )),
        reeve.clone(),
        crux_picket::builtin::Network {
            node_ip: netid.ip(),
            node: reeve.config().node.clone(),
        },
        stop,
    );
    let proc = crate::placement::BuiltinProc {
        name: "pastiche".into(),
        api: "pastiche1".into(),
        inst,
        addr: netid.to_string(),
        since_ms: crux_store::now_ms(),
    };
    (proc, task)
}

/// `crux pastiche ...`.
#[derive(Debug, clap::Subcommand)]
pub enum PasticheCmd {
    /// Import FILE; prints its digest and size (JSON: `{"digest", "size"}`).
    Put {
        /// The file.
        file: PathBuf,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
    /// Write a blob to FILE (or stdout), pulling it from peers when this node lacks it.
    Get {
        /// The digest, `sha256:<hex>`.
        digest: String,
        /// Output file (written to a temp file, fsynced, renamed; nothing is left on failure).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
    /// The blobs this node holds.
    Ls(crate::client::JsonArg),
    /// Remove a blob from this node.
    Rm {
        /// The digest.
        digest: String,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
    /// Keep a blob from eviction.
    Pin {
        /// The digest.
        digest: String,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
    /// Let a blob be evicted again.
    Unpin {
        /// The digest.
        digest: String,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
    /// Rehash every blob; evict and report the corrupt ones (exit 1 if any).
    Verify(crate::client::JsonArg),
    /// Bring a blob into this node's cache by digest: from peers that hold it, else imported
    /// from URL (`s3://BUCKET/KEY` or `http(s)://…`), streamed and hashed; it is kept only if
    /// its digest is DIGEST. An interrupted import goes on where it stopped.
    Fetch {
        /// Where to import from when no node of the flock holds it.
        url: String,
        /// The digest it must have, `sha256:<hex>`.
        #[arg(long)]
        digest: String,
        #[command(flatten)]
        json: crate::client::JsonArg,
    },
}

async fn cache(socket: &Path) -> anyhow::Result<CacheClient<tonic::transport::Channel>> {
    // No per-call timeout: a get answers once its pull is done, however long that takes.
    let ch = crate::client::channel(socket, None).await?;
    Ok(CacheClient::new(ch)
        .max_decoding_message_size(crux_pastiche::serve::MESSAGE_MAX)
        .max_encoding_message_size(crux_pastiche::serve::MESSAGE_MAX))
}

fn check_digest(d: &str) -> anyhow::Result<()> {
    d.parse::<crux_pastiche::digest::Digest>()
        .map(|_| ())
        .map_err(|e| anyhow!("{e}"))
}

/// Runs a `crux pastiche` command; returns the exit code.
pub async fn run(socket: &Path, cmd: &PasticheCmd) -> anyhow::Result<i32> {
    match cmd {
        PasticheCmd::Put { file, json } => put(socket, file, json.json).await,
        PasticheCmd::Get {
            digest,
            output,
            json,
        } => get(socket, digest, output.as_deref(), json.json).await,
        PasticheCmd::Ls(json) => {
            let mut c = cache(socket).await?;
            let r = c
                .list(pb::ListRequest {})
                .await
                .map_err(crate::client::status_error)?
                .into_inner();
            if json.json {
                let v: Vec<_> = r
                    .entries
                    .iter()
                    .map(|e| serde_json::json!({"digest": e.digest, "size": e.size, "pinned": e.pinned, "last_used_ms": e.last_used_ms}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"blobs": v, "used_bytes": r.used_bytes, "max_bytes": r.max_bytes})
                );
            } else {
                for e in &r.entries {
                    println!(
                        "{}  {:>14}  {}",
                        e.digest,
                        e.size,
                        if e.pinned { "pinned" } else { "" }
                    );
                }
                println!(
                    "{} blob(s), {} of {} bytes",
                    r.entries.len(),
                    r.used_bytes,
                    r.max_bytes
                );
            }
            Ok(0)
        }
        PasticheCmd::Rm { digest, json }
        | PasticheCmd::Pin { digest, json }
        | PasticheCmd::Unpin { digest, json } => {
            check_digest(digest)?;
            let mut c = cache(socket).await?;
            let req = pb::DigestRequest {
                digest: digest.clone(),
            };
            let (r, what) = match cmd {
                PasticheCmd::Rm { .. } => (c.remove(req).await, "removed"),
                PasticheCmd::Pin { .. } => (c.pin(req).await, "pinned"),
                _ => (c.unpin(req).await, "unpinned"),
            };
            r.map_err(crate::client::status_error)?;
            if json.json {
                println!("{}", serde_json::json!({"digest": digest, what: true}));
            } else {
                println!("{what} {digest}");
            }
            Ok(0)
        }
        PasticheCmd::Fetch { url, digest, json } => {
            check_digest(digest)?;
            crux_pastiche::import::Source::parse(url).map_err(|e| anyhow!("{e}"))?;
            let mut c = cache(socket).await?;
            let r = c
                .fetch(pb::FetchRequest {
                    url: url.clone(),
                    digest: digest.clone(),
                })
                .await
                .map_err(crate::client::status_error)?
                .into_inner();
            if json.json {
                println!(
                    "{}",
                    serde_json::json!({"digest": r.digest, "size": r.size, "from": r.from,
                        "downloaded": r.downloaded, "resumed": r.resumed, "sources": r.sources})
                );
            } else {
                let how = match r.from.as_str() {
                    "source" if r.resumed > 0 => format!(
                        "imported from {url} ({} bytes downloaded, {} resumed)",
                        r.downloaded, r.resumed
                    ),
                    "source" => format!("imported from {url}"),
                    "peers" => format!("pulled from {} peer(s)", r.sources.len()),
                    _ => "already in the cache".to_string(),
                };
                println!("{}  {} bytes  {how}", r.digest, r.size);
            }
            Ok(0)
        }
        PasticheCmd::Verify(json) => {
            let mut c = cache(socket).await?;
            let r = c
                .verify(pb::VerifyRequest {})
                .await
                .map_err(crate::client::status_error)?
                .into_inner();
            if json.json {
                println!(
                    "{}",
                    serde_json::json!({"checked": r.checked, "corrupt": r.corrupt})
                );
            } else {
                println!("{} blob(s) checked, {} corrupt", r.checked, r.corrupt.len());
                for d in &r.corrupt {
                    println!("corrupt, evicted: {d}");
                }
            }
            Ok(if r.corrupt.is_empty() { 0 } else { 1 })
        }
    }
}

async fn put(socket: &Path, file: &Path, json: bool) -> anyhow::Result<i32> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    let mut c = cache(socket).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::Chunk>(4);
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut f = f;
        loop {
            let mut buf = vec![0u8; crux_pastiche::cache::CHUNK];
            let n = f.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            if tx
                .send(pb::Chunk {
                    data: buf,
                    ..Default::default()
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    });
    let r = c.put(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    reader
        .await
        .context("reading the file")?
        .with_context(|| format!("reading {}", file.display()))?;
    let r = r.map_err(crate::client::status_error)?.into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({"digest": r.digest, "size": r.size})
        );
    } else {
        println!("{} {}", r.digest, r.size);
    }
    Ok(0)
}

async fn get(
    socket: &Path,
    digest: &str,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<i32> {
    check_digest(digest)?;
    let mut c = cache(socket).await?;
    let mut stream = c
        .get(pb::GetRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(crate::client::status_error)?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(crate::client::status_error)?
        .ok_or_else(|| anyhow!("the agent sent nothing"))?;
    let size = first.size;
    // To a temp file beside the output, renamed once whole; stdout when no -o.
    let mut tmp = match output {
        Some(o) => {
            let dir = o
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Some(
                tempfile::Builder::new()
                    .prefix(".crux-get-")
                    .tempfile_in(dir)
                    .with_context(|| format!("creating a temp file in {}", dir.display()))?,
            )
        }
        None => None,
    };
    let mut written = 0u64;
    let stdout = std::io::stdout();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(crate::client::status_error)?
    {
        written += chunk.data.len() as u64;
        match &mut tmp {
            Some(t) => t.write_all(&chunk.data).context("writing the output")?,
            None => stdout
                .lock()
                .write_all(&chunk.data)
                .context("writing stdout")?,
        }
    }
    if written != size {
        return Err(anyhow!("the agent sent {written} of {size} bytes"));
    }
    if let (Some(t), Some(o)) = (tmp, output) {
        t.as_file().sync_all().context("fsync of the output")?;
        t.persist(o)
            .with_context(|| format!("renaming into {}", o.display()))?;
    }
    if json {
        let line = serde_json::json!({"digest": digest, "size": size, "path": output, "sources": first.sources, "resumed": first.resumed});
        if output.is_some() {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    } else if let Some(o) = output {
        println!("{digest} {size} bytes -> {}", o.display());
    }
    Ok(0)
}
