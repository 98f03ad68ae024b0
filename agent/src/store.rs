//! The durable store on the local API: its muster, document and status calls. The store's
//! runtime (voters, learners, the leader of a node outside the group) is
//! `crux_store::supervise`.

use std::time::Duration;

use crux_flock::driver::DriverHandle;
use crux_proto::grpc::reeve::v1 as pb;
use crux_store::grpc_status as status;
use crux_store::supervise::{known_voters, netid_of};
use crux_store::{Applied, Command, MusterEntry, Query, QueryResult, Store, StoreStatus};
use tonic::Status;
use tracing::debug;

fn entry_pb(e: MusterEntry) -> pb::MusterEntry {
    pb::MusterEntry {
        horde: e.horde,
        api: e.api,
        inst: e.inst,
        filename: e.filename,
        function: e.function,
        timestamp_ms: e.timestamp_ms,
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn check(what: &str, v: &str) -> Result<(), Status> {
    crux_steward::select::check_name(what, v).map_err(|e| Status::invalid_argument(e.0))
}

/// `MusterAdd`.
pub async fn muster_add(store: &Store, req: pb::MusterAddRequest) -> Result<(), Status> {
    let e = req
        .entry
        .ok_or_else(|| Status::invalid_argument("entry missing"))?;
    let horde = crux_steward::select::horde_or_default(&e.horde).to_string();
    check("horde", &horde)?;
    check("api", &e.api)?;
    check("inst", &e.inst)?;
    e.filename
        .parse::<crux_pastiche::digest::Digest>()
        .map_err(|err| Status::invalid_argument(format!("file: {err}")))?;
    if e.function.is_empty() || e.function.len() > 256 {
        return Err(Status::invalid_argument("function must be 1-256 bytes"));
    }
    let entry = MusterEntry {
        horde,
        api: e.api,
        inst: e.inst,
        filename: e.filename,
        function: e.function,
        timestamp_ms: crux_store::now_ms(),
    };
    store
        .write(Command::MusterAdd(entry))
        .await
        .map_err(status)?;
    Ok(())
}

/// `MusterSearch` (a consistent read).
pub async fn muster_search(
    store: &Store,
    req: pb::MusterSearchRequest,
) -> Result<Vec<pb::MusterEntry>, Status> {
    let q = Query::MusterSearch {
        horde: opt(&req.horde),
        api: opt(&req.api),
        inst: opt(&req.inst),
    };
    match store.read(q).await.map_err(status)? {
        QueryResult::Muster(v) => Ok(v.into_iter().map(entry_pb).collect()),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `MusterRemove`.
pub async fn muster_remove(store: &Store, req: pb::MusterRemoveRequest) -> Result<bool, Status> {
    let cmd = Command::MusterRemove {
        horde: crux_steward::select::horde_or_default(&req.horde).to_string(),
        api: req.api,
        inst: req.inst,
    };
    match store.write(cmd).await.map_err(status)? {
        Applied::Removed(r) => Ok(r),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `DocGet` (a consistent read).
pub async fn doc_get(store: &Store, req: pb::DocGetRequest) -> Result<pb::DocGetResponse, Status> {
    match store
        .read(Query::DocGet { key: req.key })
        .await
        .map_err(status)?
    {
        QueryResult::Doc(Some((value, generation))) => Ok(pb::DocGetResponse {
            found: true,
            value,
            generation,
        }),
        QueryResult::Doc(None) => Ok(pb::DocGetResponse::default()),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `DocPut` (compare-and-swap unless `unconditional`).
pub async fn doc_put(store: &Store, req: pb::DocPutRequest) -> Result<pb::DocPutResponse, Status> {
    if req.key.is_empty() || req.key.len() > 512 {
        return Err(Status::invalid_argument("key must be 1-512 bytes"));
    }
    if req.key.starts_with("store/") {
        return Err(Status::invalid_argument(format!(
            "key {:?}: documents under store/ are the store's own (its group id, merge records) \
             and cannot be written",
            req.key
        )));
    }
    let cmd = Command::DocPut {
        key: req.key,
        value: req.value,
        if_generation: (!req.unconditional).then_some(req.if_generation),
    };
    match store.write(cmd).await.map_err(status)? {
        Applied::Doc { generation, .. } => Ok(pb::DocPutResponse {
            written: true,
            generation,
        }),
        Applied::Conflict { current, .. } => Ok(pb::DocPutResponse {
            written: false,
            generation: current,
        }),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// `StoreStatus`: this node's view, or the Raft leader's when this node is outside the group or
/// knows no leader.
pub async fn store_status(
    store: &Store,
    handle: &DriverHandle,
    grpc_port: u16,
) -> Result<pb::StoreStatusResponse, Status> {
    let flock = &crate::view::now(handle);
    let me = store.status();
    let voter = me.voters.iter().any(|m| m.id == me.node);
    let mut view: StoreStatus = me;
    // Ask the leader for its view (it alone knows the lag).
    let leader = match view.leader {
        Some(l) => Some(l),
        None => {
            let vs = known_voters(store, flock, grpc_port).await;
            let mut found = None;
            for id in vs {
                if let Some(n) = netid_of(flock, id, grpc_port) {
                    if let Ok(Ok(s)) =
                        tokio::time::timeout(Duration::from_secs(1), store.remote_status(n)).await
                    {
                        if let Some(l) = s.leader {
                            found = Some(l);
                            break;
                        }
                    }
                }
            }
            found
        }
    };
    if let Some(l) = leader {
        if l.id != view.node {
            match tokio::time::timeout(Duration::from_secs(2), store.remote_status(l.netid)).await {
                Ok(Ok(s)) => view = s,
                other => debug!(?other, "the store leader did not answer its status"),
            }
        }
    }
    let lag = view.lag.clone().unwrap_or_default();
    let addr = |id: u64| {
        flock
            .borrow()
            .member(id)
            .map(|m| m.addr.to_string())
            .unwrap_or_default()
    };
    Ok(pb::StoreStatusResponse {
        leader_addr: view.leader.map(|l| addr(l.id)).unwrap_or_default(),
        leader_id: view
            .leader
            .map(|l| format!("{:016x}", l.id))
            .unwrap_or_default(),
        term: view.term,
        initialized: !view.voters.is_empty(),
        voters: view
            .voters
            .iter()
            .map(|m| pb::StoreVoter {
                id: format!("{:016x}", m.id),
                addr: addr(m.id),
                lag: lag.get(&m.id).copied(),
            })
            .collect(),
        last_applied: view.last_applied.unwrap_or(0),
        last_log: view.last_log_index.unwrap_or(0),
        voter,
        role: view.role,
    })
}

/// The stream `DocWatch` answers with.
pub type DocStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DocEvent, Status>> + Send + 'static>,
>;

fn listing(store: &Store, prefix: &str) -> Vec<pb::DocEvent> {
    let docs = match store.local(Query::DocList {
        prefix: prefix.to_string(),
    }) {
        QueryResult::Docs(d) => d,
        _ => Vec::new(),
    };
    let mut out: Vec<pb::DocEvent> = docs
        .into_iter()
        .map(|(key, value, generation)| pb::DocEvent {
            key,
            value,
            generation,
            ..Default::default()
        })
        .collect();
    match out.first_mut() {
        Some(first) => first.reset = true,
        None => out.push(pb::DocEvent {
            reset: true,
            ..Default::default()
        }),
    }
    out
}

/// `DocWatch`: the documents under `prefix` in this node's copy, then each change.
pub fn doc_watch(store: &Store, req: pb::DocWatchRequest) -> DocStream {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut changes = store.changes();
    let store = store.clone();
    tokio::spawn(async move {
        let prefix = req.prefix;
        for e in listing(&store, &prefix) {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        loop {
            let c = tokio::select! {
                _ = tx.closed() => return,
                c = changes.recv() => c,
            };
            let events = match c {
                Ok(crux_store::Change::DocPut {
                    key,
                    value,
                    generation,
                }) if key.starts_with(&prefix) => vec![pb::DocEvent {
                    key,
                    value,
                    generation,
                    ..Default::default()
                }],
                Ok(crux_store::Change::DocDeleted { key }) if key.starts_with(&prefix) => {
                    vec![pb::DocEvent {
                        key,
                        deleted: true,
                        ..Default::default()
                    }]
                }
                Ok(crux_store::Change::Reset)
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    listing(&store, &prefix)
                }
                Ok(_) => Vec::new(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
