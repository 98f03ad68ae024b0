//! Catalyst for applications, through their node's agent (its Unix socket): the same calls as
//! `crux topic` — create, list, delete, publish, subscribe (from an offset, the oldest, the
//! newest, or a group's committed offset), commit — whichever backend the agent uses.

use std::path::Path;
use std::time::Duration;

use crux_proto::grpc::catalyst::v1::{self as pb, catalyst_client::CatalystClient};
use crux_reeve::client::{socket_channel, ClientError};
use tonic::transport::Channel;

use crate::{Retention, Start};

/// A Catalyst client on the agent's local socket.
#[derive(Clone, Debug)]
pub struct Topics {
    client: CatalystClient<Channel>,
}

impl Topics {
    /// Connects to the agent at `socket`.
    pub async fn connect(socket: &Path) -> Result<Topics, ClientError> {
        Ok(Topics::new(
            socket_channel(socket, Duration::from_secs(5)).await?,
        ))
    }

    /// A client on `channel`, a connection to an agent's local socket.
    pub fn new(channel: Channel) -> Topics {
        Topics {
            client: CatalystClient::new(channel),
        }
    }

    /// Makes a topic.
    pub async fn create(
        &mut self,
        topic: &str,
        retention: Retention,
    ) -> Result<pb::Topic, ClientError> {
        let r = self
            .client
            .create_topic(pb::CreateTopicRequest {
                topic: topic.into(),
                retention: Some(pb::Retention {
                    max_bytes: retention.max_bytes,
                    max_age_ms: retention.max_age.as_millis() as u64,
                }),
            })
            .await?;
        Ok(r.into_inner().topic.unwrap_or_default())
    }

    /// Every topic, and the backend ("standalone" or the NATS URL).
    pub async fn list(&mut self) -> Result<pb::ListTopicsResponse, ClientError> {
        Ok(self
            .client
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner())
    }

    /// One topic, if it exists.
    pub async fn get(&mut self, topic: &str) -> Result<Option<pb::Topic>, ClientError> {
        Ok(self
            .list()
            .await?
            .topics
            .into_iter()
            .find(|t| t.name == topic))
    }

    /// Removes a topic.
    pub async fn delete(&mut self, topic: &str) -> Result<(), ClientError> {
        self.client
            .delete_topic(pb::DeleteTopicRequest {
                topic: topic.into(),
            })
            .await?;
        Ok(())
    }

    /// Publishes `messages` (in one call: at most 3 MiB); the offset of each, once stored.
    pub async fn publish(
        &mut self,
        topic: &str,
        messages: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        Ok(self
            .client
            .publish(pb::PublishRequest {
                topic: topic.into(),
                messages,
            })
            .await?
            .into_inner()
            .offsets)
    }

    /// A subscription: batches of messages in offset order. With `group`, it starts at the
    /// group's committed offset if the group has one (see [`Topics::commit`]).
    pub async fn subscribe(
        &mut self,
        topic: &str,
        start: Start,
        group: Option<&str>,
    ) -> Result<tonic::Streaming<pb::SubscribeResponse>, ClientError> {
        let (start, offset) = match start {
            Start::Earliest => (pb::Start::Earliest, 0),
            Start::Latest => (pb::Start::Latest, 0),
            Start::Offset(o) => (pb::Start::Offset, o),
        };
        Ok(self
            .client
            .subscribe(pb::SubscribeRequest {
                topic: topic.into(),
                start: start as i32,
                offset,
                group: group.unwrap_or_default().into(),
            })
            .await?
            .into_inner())
    }

    /// Records that `group` reads `next` next (one past the last message it handled).
    pub async fn commit(&mut self, topic: &str, group: &str, next: u64) -> Result<(), ClientError> {
        self.client
            .commit(pb::CommitRequest {
                topic: topic.into(),
                group: group.into(),
                next_offset: next,
            })
            .await?;
        Ok(())
    }
}
