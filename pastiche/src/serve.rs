//! The node side of pastiche: answers other nodes' pullers (manifest, which pieces, pieces) on
//! the node gRPC port, over the node plane (only nodes the flock lists reach it).

use crux_proto::grpc::pastiche::v1::{self as pb, pastiche_server};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::digest::Digest;
use crate::store::{Store, StoreError};

/// Largest gRPC message of pastiche (a 4 MiB piece and its framing).
pub const MESSAGE_MAX: usize = 5 << 20;

/// A store error as a gRPC status.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(d) => Status::not_found(format!("unknown digest {d}")),
        StoreError::TooLarge { .. } | StoreError::NoSpace { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::BadManifest(m) => Status::invalid_argument(m),
        other => Status::internal(other.to_string()),
    }
}

/// Parses a digest of a request.
pub fn parse(d: &str) -> Result<Digest, Status> {
    d.parse()
        .map_err(|e: crate::digest::DigestError| Status::invalid_argument(e.to_string()))
}

/// Manifest to and from the wire.
pub fn manifest_pb(m: &crate::manifest::Manifest) -> pb::Manifest {
    pb::Manifest {
        digest: m.digest.to_string(),
        size: m.size,
        piece_size: m.piece_size,
        pieces: m.pieces.iter().map(|p| p.to_vec()).collect(),
    }
}

/// A manifest from the wire, checked.
pub fn manifest_of(m: pb::Manifest) -> Result<crate::manifest::Manifest, String> {
    let digest: Digest = m.digest.parse().map_err(|e| format!("{e}"))?;
    let mut pieces = Vec::with_capacity(m.pieces.len());
    for p in m.pieces {
        let arr: [u8; 32] = p
            .try_into()
            .map_err(|_| "a piece hash is not 32 bytes".to_string())?;
        pieces.push(arr);
    }
    let m = crate::manifest::Manifest {
        digest,
        size: m.size,
        piece_size: m.piece_size,
        pieces,
    };
    m.check()?;
    Ok(m)
}

/// The `Pastiche` node service.
#[derive(Clone)]
pub struct PeerService {
    store: Store,
    corrupt: bool,
}

impl std::fmt::Debug for PeerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerService")
            .field("corrupt", &self.corrupt)
            .finish_non_exhaustive()
    }
}

impl PeerService {
    /// Serves `store` to the node plane's callers. `corrupt` is a test hook: every piece served
    /// has one byte flipped.
    pub fn new(store: Store, corrupt: bool) -> PeerService {
        PeerService { store, corrupt }
    }

    /// The tonic server.
    pub fn into_server(self) -> pastiche_server::PasticheServer<PeerService> {
        pastiche_server::PasticheServer::new(self)
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("store task: {e}")))?
        .map_err(status)
}

#[tonic::async_trait]
impl pastiche_server::Pastiche for PeerService {
    type PiecesStream = ReceiverStream<Result<pb::Piece, Status>>;

    async fn manifest(
        &self,
        req: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestResponse>, Status> {
        crux_transport::peer(&req)?;
        let d = parse(&req.get_ref().digest)?;
        match self.store.manifest(&d) {
            Some(m) => Ok(Response::new(pb::ManifestResponse {
                manifest: Some(manifest_pb(&m)),
            })),
            None => Err(Status::not_found(format!("unknown digest {d}"))),
        }
    }

    async fn have(
        &self,
        req: Request<pb::HaveRequest>,
    ) -> Result<Response<pb::HaveResponse>, Status> {
        crux_transport::peer(&req)?;
        let d = parse(&req.get_ref().digest)?;
        let Some(have) = self.store.have(&d) else {
            return Err(Status::not_found(format!("unknown digest {d}")));
        };
        let whole = have.iter().all(|h| *h);
        let mut bitmap = vec![0u8; have.len().div_ceil(8)];
        for (i, h) in have.iter().enumerate() {
            if *h {
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        Ok(Response::new(pb::HaveResponse {
            bitmap,
            pieces: have.len() as u32,
            whole,
        }))
    }

    async fn pieces(
        &self,
        req: Request<pb::PiecesRequest>,
    ) -> Result<Response<Self::PiecesStream>, Status> {
        crux_transport::peer(&req)?;
        let req = req.into_inner();
        let d = parse(&req.digest)?;
        if req.indexes.len() > 4096 {
            return Err(Status::invalid_argument("at most 4096 pieces per call"));
        }
        let (tx, rx) = mpsc::channel(2);
        let store = self.store.clone();
        let corrupt = self.corrupt;
        tokio::spawn(async move {
            for index in req.indexes {
                let s = store.clone();
                let piece = blocking(move || s.read_piece(&d, index)).await;
                let msg = piece.map(|mut data| {
                    if corrupt && !data.is_empty() {
                        data[0] ^= 0xff;
                    }
                    pb::Piece { index, data }
                });
                let stop = msg.is_err();
                if tx.send(msg).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
