//! Raft's network: openraft's RPCs as JSON inside the `crux.store.v1.Store` gRPC service, over
//! the node plane (`crux_transport`: encrypted, and only between nodes the flock lists).

use std::collections::HashMap;
use std::error::Error;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::grpc::store::v1::{store_client::StoreClient, RaftMessage};
use crux_transport::{Transport, MESSAGE_MAX};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use crate::TypeConfig;

/// A plain error with a message (for openraft's error wrappers).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Fail(pub(crate) String);

/// Connects a store client to `addr` from `local_ip`.
pub(crate) async fn connect(
    transport: &Transport,
    addr: SocketAddr,
    local_ip: Option<IpAddr>,
    timeout: Duration,
) -> Result<StoreClient<Channel>, String> {
    let channel = transport
        .channel(addr, local_ip, timeout)
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    Ok(StoreClient::new(channel)
        .max_decoding_message_size(MESSAGE_MAX)
        .max_encoding_message_size(MESSAGE_MAX))
}

/// The message of every call refused because of [`Cut`] (sent or received).
pub(crate) const CUT_MESSAGE: &str = "store traffic cut for tests (partition file present)";

/// The partition test hook ([`crate::StoreConfig::partition_file`]): while the file exists, this
/// node's store neither sends nor accepts any node-to-node call, as if the network between it and
/// every other node were cut. Without a file it costs nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cut(Option<Arc<PathBuf>>);

impl Cut {
    pub(crate) fn new(file: Option<PathBuf>) -> Cut {
        Cut(file.map(Arc::new))
    }

    /// Whether the traffic is cut now (one `stat` per call while a file is configured).
    pub(crate) fn active(&self) -> bool {
        self.0.as_ref().is_some_and(|p| p.exists())
    }
}

/// Connections to other stores, shared by replication, openraft's leadership checks (which ask
/// for a new client each time and allow it only a heartbeat interval) and forwarding.
#[derive(Clone)]
pub(crate) struct Pool {
    transport: Transport,
    local_ip: Option<IpAddr>,
    clients: Arc<Mutex<HashMap<SocketAddr, StoreClient<Channel>>>>,
    pub(crate) cut: Cut,
}

impl Pool {
    pub(crate) fn new(transport: Transport, local_ip: Option<IpAddr>, cut: Cut) -> Pool {
        Pool {
            transport,
            local_ip,
            clients: Arc::default(),
            cut,
        }
    }

    /// A client for `addr`: the pooled one, or a new connection. Refused while [`Cut`] is active
    /// (every outgoing call asks for its client here first).
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<StoreClient<Channel>, String> {
        if self.cut.active() {
            return Err(format!("{addr}: {CUT_MESSAGE}"));
        }
        if let Some(c) = self.clients.lock().expect("pool lock").get(&addr) {
            return Ok(c.clone());
        }
        let c = connect(&self.transport, addr, self.local_ip, timeout).await?;
        self.clients
            .lock()
            .expect("pool lock")
            .insert(addr, c.clone());
        Ok(c)
    }

    /// Forgets the connection to `addr` (after a failure).
    pub(crate) fn forget(&self, addr: SocketAddr) {
        self.clients.lock().expect("pool lock").remove(&addr);
    }

    /// Forgets every connection.
    pub(crate) fn clear(&self) {
        self.clients.lock().expect("pool lock").clear();
    }
}

/// Makes one [`Peer`] per replication target.
pub(crate) struct Net {
    pub(crate) pool: Pool,
    pub(crate) backoff: Duration,
    /// This node's state machine, for the group id every Raft RPC carries.
    pub(crate) shared: Arc<crate::storage::Shared>,
}

impl RaftNetworkFactory<TypeConfig> for Net {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.parse().ok(),
            raw: node.addr.clone(),
            pool: self.pool.clone(),
            backoff: self.backoff,
            shared: self.shared.clone(),
        }
    }
}

/// The connection to one Raft peer (pooled; made on first use and forgotten on failure).
pub(crate) struct Peer {
    target: u64,
    addr: Option<SocketAddr>,
    raw: String,
    pool: Pool,
    backoff: Duration,
    shared: Arc<crate::storage::Shared>,
}

enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    async fn call<T, E>(
        &mut self,
        kind: Kind,
        mut msg: RaftMessage,
        ttl: Duration,
    ) -> Result<T, RPCError<u64, BasicNode, E>>
    where
        T: DeserializeOwned,
        E: DeserializeOwned + Error,
    {
        let Some(addr) = self.addr else {
            return Err(RPCError::Unreachable(Unreachable::new(&Fail(format!(
                "node {:016x} has no valid address: {:?}",
                self.target, self.raw
            )))));
        };
        msg.group = self.shared.group().map(crate::hex).unwrap_or_default();
        let mut client = self
            .pool
            .get(addr, ttl)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&Fail(e))))?;
        let call = async {
            match kind {
                Kind::Append => client.append_entries(msg).await,
                Kind::Vote => client.vote(msg).await,
                Kind::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let reply = match tokio::time::timeout(ttl, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                self.pool.forget(addr);
                let fail = Fail(format!("{addr}: {}: {}", status.code(), status.message()));
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&fail))
                } else {
                    RPCError::Network(NetworkError::new(&fail))
                });
            }
            Err(_) => {
                return Err(RPCError::Network(NetworkError::new(&Fail(format!(
                    "{addr}: no answer within {ttl:?}"
                )))))
            }
        };
        let r: Result<T, E> = serde_json::from_slice(&reply.json).map_err(|e| {
            RPCError::Network(NetworkError::new(&Fail(format!(
                "{addr}: undecodable answer: {e}"
            ))))
        })?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn message<T: serde::Serialize>(v: &T) -> RaftMessage {
    RaftMessage {
        json: serde_json::to_vec(v).expect("openraft's types serialize"),
        data: Vec::new(),
        group: String::new(),
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Kind::Append, message(&rpc), option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        mut rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        // The chunk travels raw next to the JSON, not as a JSON array of numbers.
        let data = std::mem::take(&mut rpc.data);
        let mut msg = message(&rpc);
        msg.data = data;
        self.call(Kind::Snapshot, msg, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Kind::Vote, message(&rpc), option.hard_ttl())
            .await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
