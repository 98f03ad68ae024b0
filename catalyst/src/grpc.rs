//! The `crux.catalyst.v1.Catalyst` service of the agent's local socket: a thin view over the
//! [`Bus`], served before the bus exists (the local socket opens at step reeve) and answering
//! `UNAVAILABLE` until it does.

use bytes::Bytes;
use crux_proto::grpc::catalyst::v1::{self as pb, catalyst_server};
use futures_util::StreamExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{Bus, Retention, Start, TopicInfo};

/// The service; the bus comes later through the watch.
#[derive(Clone)]
pub struct CatalystService {
    bus: watch::Receiver<Option<Bus>>,
}

impl CatalystService {
    /// The tonic server over the bus `bus` will carry.
    pub fn server(bus: watch::Receiver<Option<Bus>>) -> catalyst_server::CatalystServer<Self> {
        catalyst_server::CatalystServer::new(CatalystService { bus })
    }

    fn bus(&self) -> Result<Bus, Status> {
        self.bus
            .borrow()
            .clone()
            .ok_or_else(|| Status::unavailable("catalyst is not started yet on this agent"))
    }
}

/// The wire form of a topic.
pub fn topic(t: TopicInfo, subscribers: u32) -> pb::Topic {
    pb::Topic {
        name: t.name,
        retention: Some(pb::Retention {
            max_bytes: t.retention.max_bytes,
            max_age_ms: t.retention.max_age.as_millis() as u64,
        }),
        first_offset: t.first_offset,
        next_offset: t.next_offset,
        messages: t.messages,
        bytes: t.bytes,
        groups: t
            .groups
            .into_iter()
            .map(|(name, committed)| pb::Group { name, committed })
            .collect(),
        subscribers,
    }
}

/// The stream of a subscription on the wire.
pub type SubscribeStream =
    futures_util::stream::BoxStream<'static, Result<pb::SubscribeResponse, Status>>;

#[tonic::async_trait]
impl catalyst_server::Catalyst for CatalystService {
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = req.into_inner();
        let r = req.retention.unwrap_or_default();
        let retention = Retention {
            max_bytes: r.max_bytes,
            max_age: std::time::Duration::from_millis(r.max_age_ms),
        };
        let t = self.bus()?.create(&req.topic, retention).await?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(topic(t, 0)),
        }))
    }

    async fn list_topics(
        &self,
        _req: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let bus = self.bus()?;
        let topics = bus
            .list()
            .await?
            .into_iter()
            .map(|t| {
                let n = bus.subscribers(&t.name);
                topic(t, n)
            })
            .collect();
        Ok(Response::new(pb::ListTopicsResponse {
            topics,
            backend: bus.backend(),
        }))
    }

    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        self.bus()?.delete(&req.into_inner().topic).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let req = req.into_inner();
        let messages: Vec<Bytes> = req.messages.into_iter().map(Bytes::from).collect();
        let offsets = self.bus()?.publish(&req.topic, messages).await?;
        Ok(Response::new(pb::PublishResponse { offsets }))
    }

    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        let start = match pb::Start::try_from(req.start) {
            Ok(pb::Start::Earliest) => Start::Earliest,
            Ok(pb::Start::Latest) => Start::Latest,
            Ok(pb::Start::Offset) => Start::Offset(req.offset),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown start {} (0 earliest, 1 latest, 2 offset)",
                    req.start
                )))
            }
        };
        let group = (!req.group.is_empty()).then_some(req.group.as_str());
        let sub = self.bus()?.subscribe(&req.topic, start, group).await?;
        // An error ends the stream.
        let stream = sub
            .scan(false, |failed, item| {
                let out = if *failed {
                    None
                } else {
                    *failed = item.is_err();
                    Some(item)
                };
                std::future::ready(out)
            })
            .map(|item| {
                item.map(|messages| pb::SubscribeResponse {
                    messages: messages
                        .into_iter()
                        .map(|m| pb::Message {
                            offset: m.offset,
                            payload: m.payload.to_vec(),
                            time_ms: m.time_ms,
                        })
                        .collect(),
                })
                .map_err(Status::from)
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let req = req.into_inner();
        self.bus()?
            .commit(&req.topic, &req.group, req.next_offset)
            .await?;
        Ok(Response::new(pb::CommitResponse {}))
    }
}
