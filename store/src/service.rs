//! The node gRPC service: openraft's RPCs, forwarded requests and status, served over the node
//! plane (only nodes the flock lists reach it).

use crux_proto::grpc::store::v1::{store_server, RaftMessage, StatusRequest};
use crux_transport::MESSAGE_MAX;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::{de::DeserializeOwned, Serialize};
use tonic::{Request, Response, Status};

use crate::network::CUT_MESSAGE;
use crate::{Store, TypeConfig};

/// The tonic server type [`Store::service`] returns.
pub type StoreServer = store_server::StoreServer<StoreService>;

/// Serves one [`Store`] on the node gRPC port.
#[derive(Clone)]
pub struct StoreService {
    store: Store,
}

impl StoreService {
    pub(crate) fn server(store: Store) -> StoreServer {
        store_server::StoreServer::new(StoreService { store })
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX)
    }
}

impl StoreService {
    /// Admits the caller, and refuses everything while the partition test hook is active (the
    /// request is dropped unread, as a cut network would).
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.store.inner().pool.cut.active() {
            return Err(Status::unavailable(CUT_MESSAGE));
        }
        crux_transport::peer(req).map(|_| ())
    }
}

/// Refuses a Raft RPC from another group than this node's (see `Inner::refuse_group`).
fn same_group(store: &Store, msg: &RaftMessage) -> Result<(), Status> {
    match store.inner().refuse_group(&msg.group) {
        Some(why) => Err(Status::failed_precondition(why)),
        None => Ok(()),
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("bad message: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    let json = serde_json::to_vec(v).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(RaftMessage {
        json,
        data: Vec::new(),
        group: String::new(),
    }))
}

#[tonic::async_trait]
impl store_server::Store for StoreService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&req)?;
        same_group(&self.store, req.get_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req.get_ref().json)?;
        let term = rpc.vote.leader_id().get_term();
        let r = self.store.inner().raft.append_entries(rpc).await;
        self.store.note_leader_contact(term, &r);
        reply(&r)
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.admit(&req)?;
        same_group(&self.store, req.get_ref())?;
        let rpc: VoteRequest<u64> = decode(&req.get_ref().json)?;
        reply(&self.store.inner().raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&req)?;
        same_group(&self.store, req.get_ref())?;
        let msg = req.into_inner();
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(&msg.json)?;
        rpc.data = msg.data;
        reply(&self.store.inner().raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.admit(&req)?;
        let fwd = decode(&req.get_ref().json)?;
        reply(&self.store.serve_forwarded(fwd).await)
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<RaftMessage>, Status> {
        self.admit(&req)?;
        reply(&self.store.status())
    }
}
