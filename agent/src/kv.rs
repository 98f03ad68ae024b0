//! Blueprint K/V on the agent: the `crux.kv.v1.Kv` gRPC service of the local socket and the
//! read-only HTTP view (`GET /v1/kv/KEY`, `?recurse`, `?index=N&wait=30s` blocking as Consul's,
//! `?stale`, `?raw`). Both are thin views over the store's generic resource path
//! (`crux_store::resource`, type `kv`): no store code of their own.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use crux_proto::grpc::kv::v1::{self as pb, kv_server};
use crux_store::resource::{
    registry, Event, Filter, Op, OpResult, Outcome, Resource, ResourceId, ResourceQuery, Txn,
    WatchEvent,
};
use crux_store::{grpc_status, Store, StoreError};
use tonic::{Request, Response as GrpcResponse, Status};

use crate::state::AgentState;

/// The horde keys live in when none is named.
pub const DEFAULT_HORDE: &str = "default";

/// The most bytes of entries in one watch message (a listing is sent in chunks of this size).
pub const WATCH_CHUNK_BYTES: usize = 1 << 20;

/// The longest blocking read (`wait`), as Consul's.
pub const WAIT_MAX: Duration = Duration::from_secs(600);

/// A blocking read without `wait` waits this long, as Consul's default.
pub const WAIT_DEFAULT: Duration = Duration::from_secs(300);

fn horde(h: &str) -> String {
    if h.is_empty() {
        DEFAULT_HORDE.into()
    } else {
        h.into()
    }
}

fn entry(r: Resource) -> pb::Entry {
    pb::Entry {
        key: r.id.name,
        value: r.spec,
        flags: r.flags,
        create_index: r.create_index,
        modify_index: r.version,
    }
}

/// The Raft leader as this node knows it (16 hex digits; empty: none).
fn leader(store: &Store) -> String {
    store
        .status()
        .leader
        .map(|l| format!("{:016x}", l.id))
        .unwrap_or_default()
}

/// The K/V service of the local socket.
#[derive(Clone)]
pub struct KvService {
    store: Store,
}

impl KvService {
    /// The tonic server for `store`.
    pub fn server(store: Store) -> kv_server::KvServer<KvService> {
        kv_server::KvServer::new(KvService { store })
    }

    async fn txn(&self, ops: Vec<Op>, system: bool) -> Result<Outcome, Status> {
        self.store
            .resource_txn(Txn::new(ops), system)
            .await
            .map_err(grpc_status)
    }
}

/// The stream `Watch` answers with.
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Splits a store watch event into the messages of the API (a listing in chunks).
fn messages(e: WatchEvent) -> Vec<pb::WatchEvent> {
    match e {
        WatchEvent::Changes { index, events } => {
            let mut m = pb::WatchEvent {
                index,
                ..Default::default()
            };
            for ev in events {
                match ev {
                    Event::Put(r) => m.entries.push(entry(r)),
                    Event::Deleted(id) => m.deleted.push(id.name),
                }
            }
            vec![m]
        }
        WatchEvent::Snapshot {
            index,
            compacted,
            items,
        } => {
            let mut out = Vec::new();
            let mut cur = Vec::new();
            let mut bytes = 0;
            for r in items {
                bytes += r.id.name.len() + r.spec.len() + 32;
                cur.push(entry(r));
                if bytes >= WATCH_CHUNK_BYTES {
                    out.push(std::mem::take(&mut cur));
                    bytes = 0;
                }
            }
            if !cur.is_empty() || out.is_empty() {
                out.push(cur);
            }
            let n = out.len();
            out.into_iter()
                .enumerate()
                .map(|(i, entries)| pb::WatchEvent {
                    index,
                    snapshot: true,
                    compacted,
                    more: i + 1 < n,
                    entries,
                    deleted: Vec::new(),
                })
                .collect()
        }
    }
}

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn get(
        &self,
        req: Request<pb::GetRequest>,
    ) -> Result<GrpcResponse<pb::GetResponse>, Status> {
        let req = req.into_inner();
        let id = ResourceId::kv(&horde(&req.horde), &req.key);
        let mut r = self
            .store
            .resource_read(ResourceQuery::Get(id), !req.stale)
            .await
            .map_err(grpc_status)?;
        Ok(GrpcResponse::new(pb::GetResponse {
            found: !r.items.is_empty(),
            entry: r.items.pop().map(entry),
            index: r.index,
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<GrpcResponse<pb::ListResponse>, Status> {
        let req = req.into_inner();
        let q = ResourceQuery::List {
            rtype: registry::KV.name.into(),
            horde: horde(&req.horde),
            prefix: req.prefix,
        };
        let r = self
            .store
            .resource_read(q, !req.stale)
            .await
            .map_err(grpc_status)?;
        Ok(GrpcResponse::new(pb::ListResponse {
            entries: r.items.into_iter().map(entry).collect(),
            index: r.index,
        }))
    }

    async fn put(
        &self,
        req: Request<pb::PutRequest>,
    ) -> Result<GrpcResponse<pb::PutResponse>, Status> {
        let req = req.into_inner();
        let op = Op::Put {
            id: ResourceId::kv(&horde(&req.horde), &req.key),
            flags: req.flags,
            spec: req.value,
            if_version: req.cas,
        };
        let (written, index) = match self.txn(vec![op], req.system).await? {
            Outcome::Applied { index, .. } => (true, index),
            Outcome::Failed { current, .. } => (false, current),
        };
        Ok(GrpcResponse::new(pb::PutResponse {
            written,
            index,
            leader: leader(&self.store),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<GrpcResponse<pb::DeleteResponse>, Status> {
        let req = req.into_inner();
        let h = horde(&req.horde);
        let op = if req.prefix {
            if req.cas.is_some() {
                return Err(Status::invalid_argument(
                    "a delete by prefix takes no compare-and-swap index",
                ));
            }
            Op::DeletePrefix {
                rtype: registry::KV.name.into(),
                horde: h,
                prefix: req.key,
                spare: registry::spare_for(registry::KV.name, req.system),
            }
        } else {
            Op::Delete {
                id: ResourceId::kv(&h, &req.key),
                if_version: req.cas,
            }
        };
        let resp = match self.txn(vec![op], req.system).await? {
            Outcome::Applied { index, results } => pb::DeleteResponse {
                done: true,
                deleted: match results.first() {
                    Some(OpResult::Deleted(n)) => *n,
                    _ => 0,
                },
                index,
                leader: leader(&self.store),
            },
            Outcome::Failed { current, .. } => pb::DeleteResponse {
                done: false,
                deleted: 0,
                index: current,
                leader: leader(&self.store),
            },
        };
        Ok(GrpcResponse::new(resp))
    }

    async fn txn(
        &self,
        req: Request<pb::TxnRequest>,
    ) -> Result<GrpcResponse<pb::TxnResponse>, Status> {
        let req = req.into_inner();
        let h = horde(&req.horde);
        let mut ops = Vec::with_capacity(req.ops.len());
        for (n, o) in req.ops.into_iter().enumerate() {
            let id = ResourceId::kv(&h, &o.key);
            let cas = o.cas.then_some(o.index);
            ops.push(match pb::txn_op::Kind::try_from(o.kind) {
                Ok(pb::txn_op::Kind::Check) => Op::Check {
                    id,
                    version: o.index,
                },
                Ok(pb::txn_op::Kind::Put) => Op::Put {
                    id,
                    flags: o.flags,
                    spec: o.value,
                    if_version: cas,
                },
                Ok(pb::txn_op::Kind::Delete) => Op::Delete {
                    id,
                    if_version: cas,
                },
                Ok(pb::txn_op::Kind::DeletePrefix) if !o.cas => Op::DeletePrefix {
                    rtype: registry::KV.name.into(),
                    horde: h.clone(),
                    prefix: o.key,
                    spare: registry::spare_for(registry::KV.name, req.system),
                },
                Ok(pb::txn_op::Kind::DeletePrefix) => {
                    return Err(Status::invalid_argument(format!(
                        "operation {n}: a delete by prefix takes no compare-and-swap index"
                    )))
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "operation {n}: kind {} is not check, put, delete or delete_prefix",
                        o.kind
                    )))
                }
            });
        }
        let resp = match self.txn(ops, req.system).await? {
            Outcome::Applied { index, results } => pb::TxnResponse {
                applied: true,
                index,
                results: results
                    .into_iter()
                    .map(|r| match r {
                        OpResult::Put(r) => pb::TxnResult {
                            entry: Some(entry(r)),
                            deleted: 0,
                        },
                        OpResult::Deleted(n) => pb::TxnResult {
                            entry: None,
                            deleted: n,
                        },
                        OpResult::Checked => pb::TxnResult::default(),
                    })
                    .collect(),
                leader: leader(&self.store),
                ..Default::default()
            },
            Outcome::Failed { op, id, current } => pb::TxnResponse {
                applied: false,
                failed_op: op as u32,
                failed_key: id.name,
                current_index: current,
                leader: leader(&self.store),
                ..Default::default()
            },
        };
        Ok(GrpcResponse::new(resp))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<GrpcResponse<WatchStream>, Status> {
        let req = req.into_inner();
        let filter = kv_filter(&req.horde, &req.key, req.prefix).map_err(grpc_status)?;
        let from = (req.from_index > 0).then_some(req.from_index);
        let mut events = self.store.resource_watch(filter, from);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let e = tokio::select! {
                    _ = tx.closed() => return,
                    e = events.recv() => e,
                };
                let Some(e) = e else {
                    let _ = tx.send(Err(Status::unavailable("the store stopped"))).await;
                    return;
                };
                for m in messages(e) {
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The watch filter for `key` (or the keys under it, when `prefix`), checked.
fn kv_filter(h: &str, key: &str, prefix: bool) -> Result<Filter, StoreError> {
    let h = horde(h);
    let q = if prefix {
        ResourceQuery::List {
            rtype: registry::KV.name.into(),
            horde: h.clone(),
            prefix: key.into(),
        }
    } else {
        ResourceQuery::Get(ResourceId::kv(&h, key))
    };
    registry::check_query(&q)?;
    Ok(Filter {
        rtype: registry::KV.name.into(),
        horde: h,
        name: key.into(),
        prefix,
    })
}

/// The query parameters of an HTTP read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Params {
    recurse: bool,
    stale: bool,
    raw: bool,
    index: u64,
    wait: Option<Duration>,
    horde: String,
}

fn params(uri: &Uri) -> Result<Params, String> {
    let mut p = Params::default();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "recurse" => p.recurse = v != "false",
            "stale" => p.stale = v != "false",
            "raw" => p.raw = v != "false",
            "index" => {
                p.index = v
                    .parse()
                    .map_err(|_| format!("index={v:?}: not a whole number"))?
            }
            "wait" => {
                let d = humantime::parse_duration(v)
                    .map_err(|e| format!("wait={v:?}: {e} (write e.g. 30s or 5m)"))?;
                p.wait = Some(d.min(WAIT_MAX));
            }
            "horde" | "ns" => p.horde = v.to_string(),
            // Consul's `dc`, `consistent` and the like: nothing to do.
            _ => {}
        }
    }
    Ok(p)
}

fn http_error(e: StoreError) -> Response {
    let code = match &e {
        StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
        StoreError::NoQuorum(_) | StoreError::NotInitialized | StoreError::Merged { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        StoreError::Unconfirmed(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, format!("{e}\n")).into_response()
}

/// `GET /v1/kv/` (the whole horde with `?recurse`).
pub async fn http_root(state: State<Arc<AgentState>>, uri: Uri) -> Response {
    http_read(state, uri, String::new()).await
}

/// `GET /v1/kv/KEY`.
pub async fn http_key(
    state: State<Arc<AgentState>>,
    Path(key): Path<String>,
    uri: Uri,
) -> Response {
    http_read(state, uri, key).await
}

async fn http_read(State(state): State<Arc<AgentState>>, uri: Uri, key: String) -> Response {
    let p = match params(&uri) {
        Ok(p) => p,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let store = &state.store;
    let filter = match kv_filter(&p.horde, &key, p.recurse) {
        Ok(f) => f,
        Err(e) => return http_error(e),
    };
    if p.index > 0 {
        let wait = p.wait.unwrap_or(WAIT_DEFAULT);
        store.resource_wait(filter.clone(), p.index, wait).await;
    }
    let q = if p.recurse {
        ResourceQuery::List {
            rtype: filter.rtype,
            horde: filter.horde,
            prefix: filter.name,
        }
    } else {
        ResourceQuery::Get(ResourceId::kv(&filter.horde, &filter.name))
    };
    let r = match store.resource_read(q, !p.stale).await {
        Ok(r) => r,
        Err(e) => return http_error(e),
    };
    let mut headers = HeaderMap::new();
    headers.insert("x-crux-index", HeaderValue::from(r.index));
    if r.items.is_empty() {
        return (StatusCode::NOT_FOUND, headers, "").into_response();
    }
    if p.raw && !p.recurse {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        let value = r
            .items
            .into_iter()
            .next()
            .map(|r| r.spec)
            .unwrap_or_default();
        return (StatusCode::OK, headers, value).into_response();
    }
    let body: Vec<serde_json::Value> = r
        .items
        .into_iter()
        .map(|r| {
            serde_json::json!({
                "Key": r.id.name,
                "Value": base64::engine::general_purpose::STANDARD.encode(&r.spec),
                "Flags": r.flags,
                "CreateIndex": r.create_index,
                "ModifyIndex": r.version,
            })
        })
        .collect();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let text = serde_json::to_string(&body).unwrap_or_default() + "\n";
    (StatusCode::OK, headers, text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_parameters_parse_and_bad_ones_are_refused() {
        let uri: Uri = "/v1/kv/a?recurse&index=42&wait=30s&stale".parse().unwrap();
        assert_eq!(
            params(&uri).unwrap(),
            Params {
                recurse: true,
                stale: true,
                index: 42,
                wait: Some(Duration::from_secs(30)),
                ..Params::default()
            }
        );
        let uri: Uri = "/v1/kv/a?wait=2h".parse().unwrap();
        assert_eq!(params(&uri).unwrap().wait, Some(WAIT_MAX));
        let uri: Uri = "/v1/kv/a?index=x".parse().unwrap();
        assert!(params(&uri).unwrap_err().contains("not a whole number"));
        let uri: Uri = "/v1/kv/a?wait=soon".parse().unwrap();
        assert!(params(&uri).unwrap_err().contains("wait="));
    }

    #[test]
    fn a_listing_is_sent_in_chunks_and_changes_whole() {
        let r = |i: usize| Resource {
            id: ResourceId::kv("default", &format!("k{i}")),
            version: 1,
            create_index: 1,
            flags: 0,
            spec: vec![0; 300 << 10],
            status: Vec::new(),
        };
        let m = messages(WatchEvent::Snapshot {
            index: 9,
            compacted: false,
            items: (0..7).map(r).collect(),
        });
        assert_eq!(m.len(), 2);
        assert!(m[0].more && !m[1].more);
        assert!(m.iter().all(|e| e.snapshot && e.index == 9));
        assert_eq!(m.iter().map(|e| e.entries.len()).sum::<usize>(), 7);
        let m = messages(WatchEvent::Snapshot {
            index: 3,
            compacted: true,
            items: Vec::new(),
        });
        assert_eq!(m.len(), 1);
        assert!(m[0].compacted && !m[0].more && m[0].entries.is_empty());
        let m = messages(WatchEvent::Changes {
            index: 5,
            events: vec![
                Event::Put(r(1)),
                Event::Deleted(ResourceId::kv("default", "k2")),
            ],
        });
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].entries.len(), m[0].deleted.as_slice()),
            (1, &["k2".to_string()][..])
        );
    }
}
