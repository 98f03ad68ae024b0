//! The local side of pastiche: the `Cache` service on the agent's socket (put, get, list,
//! remove, pin, unpin, verify), and the loop that keeps the steward's view of what this node
//! holds equal to the store (after evictions and removals).

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::pastiche::v1::{self as pb, cache_server};
use crux_reeve::Reeve;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::import::{obtain, ImportError, Importer, ObtainError, Obtained};
use crate::pull::{PullError, Puller};
use crate::serve::{parse, status};
use crate::store::Store;

/// Bytes per chunk of a `Get` stream.
pub const CHUNK: usize = 1 << 20;

/// The `Cache` service.
#[derive(Clone, Debug)]
pub struct CacheService {
    store: Store,
    puller: Puller,
    importer: Importer,
    reeve: Arc<Reeve>,
}

impl CacheService {
    /// The service over `store`, pulling with `puller`, importing with `importer`, telling
    /// `reeve` what it holds.
    pub fn new(
        store: Store,
        puller: Puller,
        importer: Importer,
        reeve: Arc<Reeve>,
    ) -> CacheService {
        CacheService {
            store,
            puller,
            importer,
            reeve,
        }
    }

    /// The tonic server.
    pub fn into_server(self) -> cache_server::CacheServer<CacheService> {
        cache_server::CacheServer::new(self)
            .max_decoding_message_size(crate::serve::MESSAGE_MAX)
            .max_encoding_message_size(crate::serve::MESSAGE_MAX)
    }
}

/// A pull error as a gRPC status.
pub fn pull_status(e: PullError) -> Status {
    match e {
        PullError::NoHolder(_) | PullError::Tracker { .. } => Status::unavailable(e.to_string()),
        PullError::Store(s) => status(s),
    }
}

/// An import error as a gRPC status.
pub fn import_status(e: ImportError) -> Status {
    match e {
        ImportError::BadUrl { .. } => Status::invalid_argument(e.to_string()),
        ImportError::NotFound { .. } => Status::not_found(e.to_string()),
        ImportError::Denied { .. } => Status::permission_denied(e.to_string()),
        ImportError::Source { .. } => Status::unavailable(e.to_string()),
        ImportError::Mismatch { .. } | ImportError::Length { .. } => {
            Status::data_loss(e.to_string())
        }
        ImportError::Store(s) => status(s),
    }
}

/// Reads what a channel of chunks carries (the bridge from a gRPC stream to the store's
/// synchronous import).
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.buf = b;
                    self.at = 0;
                }
                // The upload broke off: an error, so that nothing is imported.
                Ok(Err(why)) => return Err(std::io::Error::other(why)),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Keeps the steward's view of what this node holds equal to the store and the pulls in
/// progress, every `every`, until `stop`.
pub async fn announce(
    store: Store,
    puller: Puller,
    reeve: Arc<Reeve>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut held: HashSet<String> = store
            .list()
            .into_iter()
            .map(|e| e.digest.to_string())
            .collect();
        held.extend(puller.partial().into_iter().map(|d| d.to_string()));
        reeve.set_holds(&held);
    }
}

#[tonic::async_trait]
impl cache_server::Cache for CacheService {
    type GetStream = ReceiverStream<Result<pb::Chunk, Status>>;

    async fn put(
        &self,
        req: Request<Streaming<pb::Chunk>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let mut incoming = req.into_inner();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>, String>>(8);
        let store = self.store.clone();
        let import = tokio::task::spawn_blocking(move || {
            store.put_reader(ChunkReader {
                rx,
                buf: Vec::new(),
                at: 0,
            })
        });
        let mut failed = None;
        loop {
            match incoming.message().await {
                Ok(Some(c)) => {
                    if c.data.is_empty() {
                        continue;
                    }
                    // A full channel blocks this task briefly: the import is writing to disk.
                    let tx2 = tx.clone();
                    let sent = tokio::task::spawn_blocking(move || tx2.send(Ok(c.data))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break; // the import stopped (an error it reports below)
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            // The client went away mid-upload: the import fails, leaving nothing behind.
            let why = format!("upload interrupted: {e}");
            let _ = tokio::task::spawn_blocking(move || tx.send(Err(why))).await;
            let _ = import.await;
            return Err(Status::cancelled(format!("upload interrupted: {e}")));
        }
        drop(tx);
        let m = import
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        self.reeve.hold(&m.digest.to_string());
        tracing::info!(digest = %m.digest, size = m.size, "blob imported");
        Ok(Response::new(pb::PutResponse {
            digest: m.digest.to_string(),
            size: m.size,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let d = parse(&req.get_ref().digest)?;
        let report = self.puller.fetch(d).await.map_err(pull_status)?;
        let store = self.store.clone();
        let file = tokio::task::spawn_blocking(move || store.open_blob(&d))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        let size = file
            .metadata()
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        let (tx, rx) = mpsc::channel(4);
        let sources: std::collections::HashMap<String, u32> = report.sources.into_iter().collect();
        tx.send(Ok(pb::Chunk {
            data: Vec::new(),
            size,
            digest: d.to_string(),
            sources,
            resumed: report.resumed,
        }))
        .await
        .map_err(|_| Status::cancelled("client gone"))?;
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                        return;
                    }
                };
                buf.truncate(n);
                let chunk = pb::Chunk {
                    data: buf,
                    ..Default::default()
                };
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let entries = self
            .store
            .list()
            .into_iter()
            .map(|e| pb::Entry {
                digest: e.digest.to_string(),
                size: e.size,
                pinned: e.pinned,
                last_used_ms: e
                    .last_used
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::ListResponse {
            entries,
            used_bytes: self.store.used_bytes(),
            max_bytes: self.store.max_bytes(),
        }))
    }

    async fn remove(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let d = parse(&req.get_ref().digest)?;
        let store = self.store.clone();
        let changed = tokio::task::spawn_blocking(move || store.remove(&d))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        if !changed {
            return Err(Status::not_found(format!("unknown digest {d}")));
        }
        self.reeve.unhold(&d.to_string());
        Ok(Response::new(pb::DigestResponse { changed }))
    }

    async fn pin(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let d = parse(&req.get_ref().digest)?;
        self.store.pin(&d).map_err(status)?;
        Ok(Response::new(pb::DigestResponse { changed: true }))
    }

    async fn unpin(
        &self,
        req: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let d = parse(&req.get_ref().digest)?;
        self.store.unpin(&d).map_err(status)?;
        Ok(Response::new(pb::DigestResponse { changed: true }))
    }

    async fn verify(
        &self,
        _: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let store = self.store.clone();
        let r = tokio::task::spawn_blocking(move || store.verify())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(status)?;
        for d in &r.corrupt {
            self.reeve.unhold(&d.to_string());
        }
        Ok(Response::new(pb::VerifyResponse {
            checked: r.checked as u64,
            corrupt: r.corrupt.iter().map(|d| d.to_string()).collect(),
        }))
    }

    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let req = req.into_inner();
        let d = parse(&req.digest)?;
        let url = Some(req.url.as_str()).filter(|u| !u.is_empty());
        let got = obtain(&self.puller, &self.importer, &self.reeve, d, url)
            .await
            .map_err(|e| match e {
                ObtainError::Pull(e) => pull_status(e),
                ObtainError::Import(e) => import_status(e),
            })?;
        let mut r = pb::FetchResponse {
            digest: d.to_string(),
            ..Default::default()
        };
        match got {
            Obtained::Cache { size } => {
                r.size = size;
                r.from = "cache".into();
            }
            Obtained::Peers(p) => {
                r.size = p.manifest.map_or(0, |m| m.size);
                r.from = "peers".into();
                r.sources = p.sources.into_iter().collect();
            }
            Obtained::Source(i) => {
                r.size = i.size;
                r.from = if i.present { "cache" } else { "source" }.into();
                r.downloaded = i.downloaded;
                r.resumed = i.resumed;
            }
        }
        Ok(Response::new(r))
    }
}
