//! The node gRPC services of placement: every node's dean (`Dean.Sync`, the proctor's call) and
//! the leader's proctor status (`Proctor.Status`), admitting only node-plane callers.

use std::sync::Arc;

use crux_proto::grpc::proctor::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::dean::Dean;

/// The node gRPC services of placement: every node's dean, and the leader's proctor status.
#[derive(Clone)]
pub struct PlacementNode {
    dean: watch::Receiver<Option<Arc<Dean>>>,
    status: watch::Receiver<Option<pb::StatusResponse>>,
}

impl PlacementNode {
    /// The two services for the node gRPC server.
    pub fn servers(
        self,
    ) -> (
        pb::dean_server::DeanServer<PlacementNode>,
        pb::proctor_server::ProctorServer<PlacementNode>,
    ) {
        (
            pb::dean_server::DeanServer::new(self.clone()),
            pb::proctor_server::ProctorServer::new(self),
        )
    }

    /// Serves the dean (once step 5 made it) and the proctor status in `status`, over the node
    /// plane.
    pub fn new(
        dean: watch::Receiver<Option<Arc<Dean>>>,
        status: watch::Receiver<Option<pb::StatusResponse>>,
    ) -> PlacementNode {
        PlacementNode { dean, status }
    }

    fn admitted<T>(&self, req: &Request<T>) -> Result<(), Status> {
        crux_transport::peer(req).map(|_| ())
    }
}

#[tonic::async_trait]
impl pb::dean_server::Dean for PlacementNode {
    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        self.admitted(&req)?;
        let dean = self.dean.borrow().clone();
        match dean {
            Some(d) => d.sync(req.into_inner()).map(Response::new),
            None => Err(Status::unavailable("this node's dean is not up yet")),
        }
    }
}

#[tonic::async_trait]
impl pb::proctor_server::Proctor for PlacementNode {
    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.admitted(&req)?;
        local_status(&self.status).map(Response::new)
    }
}

/// The status of the proctor running here, if one runs.
pub fn local_status(
    status: &watch::Receiver<Option<pb::StatusResponse>>,
) -> Result<pb::StatusResponse, Status> {
    status.borrow().clone().ok_or_else(|| {
        Status::unavailable("no proctor runs on this node (it is not the flock leader, or the proctor has not finished its first round)")
    })
}
