//! Fuse routes for services, through their node's agent (its Unix socket): a service publishes
//! the routes to its api when it registers ([`Routes::add`]), and tools list and remove them.
//! Routes are served to proxies as xDS by every agent (README "Routes (xDS)").

use std::path::Path;
use std::time::Duration;

use crux_proto::grpc::fuse::v1::{self as pb, routes_client::RoutesClient};
use tonic::transport::Channel;

use crate::client::{socket_channel, ClientError};

/// A routes client on the agent's local socket, in one horde.
#[derive(Clone, Debug)]
pub struct Routes {
    client: RoutesClient<Channel>,
    horde: String,
}

impl Routes {
    /// Connects to the agent at `socket`; routes are in horde `default` (see [`Routes::horde`]).
    pub async fn connect(socket: &Path) -> Result<Routes, ClientError> {
        let ch = socket_channel(socket, Duration::from_secs(5)).await?;
        Ok(Routes::new(ch))
    }

    /// A client on `channel`, a connection to the agent.
    pub fn new(channel: Channel) -> Routes {
        Routes {
            client: RoutesClient::new(channel).max_decoding_message_size(64 << 20),
            horde: String::new(),
        }
    }

    /// The same client in horde `horde` (empty: `default`).
    pub fn horde(mut self, horde: &str) -> Routes {
        self.horde = horde.to_string();
        self
    }

    /// Creates or replaces `route` (with `cas`, only if its version is that; 0: only if absent).
    /// A route the agent refuses (bad field, weights summing to zero, an api the registry does
    /// not know) is an error and nothing is written.
    pub async fn add(
        &mut self,
        route: pb::Route,
        cas: Option<u64>,
    ) -> Result<pb::AddResponse, ClientError> {
        let r = self
            .client
            .add(pb::AddRequest {
                horde: self.horde.clone(),
                route: Some(route),
                cas,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The routes whose name starts with `prefix`, ordered by name.
    pub async fn list(
        &mut self,
        prefix: &str,
        stale: bool,
    ) -> Result<pb::ListResponse, ClientError> {
        let r = self
            .client
            .list(pb::ListRequest {
                horde: self.horde.clone(),
                prefix: prefix.into(),
                stale,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Removes route `name` (`removed == false`: there was none).
    pub async fn remove(&mut self, name: &str) -> Result<pb::RemoveResponse, ClientError> {
        let r = self
            .client
            .remove(pb::RemoveRequest {
                horde: self.horde.clone(),
                name: name.into(),
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The proxies connected to this agent's ADS server.
    pub async fn proxies(&mut self) -> Result<pb::ProxiesResponse, ClientError> {
        let r = self.client.proxies(pb::ProxiesRequest {}).await?;
        Ok(r.into_inner())
    }
}
