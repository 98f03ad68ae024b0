//! Blueprint K/V for services, through their node's agent (its Unix socket): [`Kv`] reads, writes
//! (with compare-and-swap on the modify index), deletes and transactions, and [`Kv::watch`],
//! a watch that survives a lost connection by resuming from the last index it delivered, so that
//! nothing is lost or repeated (or, when the agent no longer holds those changes, a listing
//! flagged `compacted` says so).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crux_proto::grpc::kv::v1::{self as pb, kv_client::KvClient};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::debug;

use crate::client::{socket_channel, ClientError};

/// The largest answer accepted (a listing of many large values).
pub const ANSWER_BYTES_MAX: usize = 256 << 20;

/// The first pause before a watch reconnects; it doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between reconnections of a watch.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// How a write is made.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    /// Only if the key's modify index is this (0: only if absent).
    pub cas: Option<u64>,
    /// Flags stored with the value.
    pub flags: u64,
    /// Allows keys under `crux/` (the system's).
    pub system: bool,
}

/// A K/V client on the agent's local socket, in one horde.
#[derive(Clone, Debug)]
pub struct Kv {
    client: KvClient<Channel>,
    socket: PathBuf,
    horde: String,
}

impl Kv {
    /// Connects to the agent at `socket`; keys are in horde `default` (see [`Kv::horde`]).
    pub async fn connect(socket: &Path) -> Result<Kv, ClientError> {
        let ch = socket_channel(socket, Duration::from_secs(5)).await?;
        Ok(Kv {
            client: client(ch),
            socket: socket.to_path_buf(),
            horde: String::new(),
        })
    }

    /// A client on `channel`, a connection to the agent at `socket` (where a watch reconnects).
    pub fn new(channel: Channel, socket: &Path) -> Kv {
        Kv {
            client: client(channel),
            socket: socket.to_path_buf(),
            horde: String::new(),
        }
    }

    /// The same client in horde `horde` (empty: `default`).
    pub fn horde(mut self, horde: &str) -> Kv {
        self.horde = horde.to_string();
        self
    }

    /// One key, if it exists, and the index of the last K/V change. `stale`: from the agent's
    /// copy at once instead of a linearizable read.
    pub async fn get(&mut self, key: &str, stale: bool) -> Result<pb::GetResponse, ClientError> {
        let r = self
            .client
            .get(pb::GetRequest {
                key: key.into(),
                horde: self.horde.clone(),
                stale,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// The keys under `prefix`, ordered by key, and the index of the last K/V change.
    pub async fn list(
        &mut self,
        prefix: &str,
        stale: bool,
    ) -> Result<pb::ListResponse, ClientError> {
        let r = self
            .client
            .list(pb::ListRequest {
                prefix: prefix.into(),
                horde: self.horde.clone(),
                stale,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Writes `key`. Not written (`written == false`) only when the compare-and-swap failed;
    /// `index` is then the key's current modify index.
    pub async fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        opts: &WriteOptions,
    ) -> Result<pb::PutResponse, ClientError> {
        let r = self
            .client
            .put(pb::PutRequest {
                key: key.into(),
                value,
                flags: opts.flags,
                cas: opts.cas,
                horde: self.horde.clone(),
                system: opts.system,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Deletes `key` (with `opts.cas`, only at that modify index).
    pub async fn delete(
        &mut self,
        key: &str,
        opts: &WriteOptions,
    ) -> Result<pb::DeleteResponse, ClientError> {
        self.delete_req(pb::DeleteRequest {
            key: key.into(),
            prefix: false,
            cas: opts.cas,
            horde: self.horde.clone(),
            system: opts.system,
        })
        .await
    }

    /// Deletes every key under `prefix` (not empty). Without `system`, keys under `crux/` stay.
    pub async fn delete_prefix(
        &mut self,
        prefix: &str,
        system: bool,
    ) -> Result<pb::DeleteResponse, ClientError> {
        self.delete_req(pb::DeleteRequest {
            key: prefix.into(),
            prefix: true,
            cas: None,
            horde: self.horde.clone(),
            system,
        })
        .await
    }

    async fn delete_req(
        &mut self,
        req: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse, ClientError> {
        Ok(self.client.delete(req).await?.into_inner())
    }

    /// Applies `ops` atomically (at most 64): all, or (a check failed) none.
    pub async fn txn(
        &mut self,
        ops: Vec<pb::TxnOp>,
        system: bool,
    ) -> Result<pb::TxnResponse, ClientError> {
        let r = self
            .client
            .txn(pb::TxnRequest {
                ops,
                horde: self.horde.clone(),
                system,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Watches `key` (or the keys under it, when `prefix`) from `from_index` (0: a listing
    /// first). The first connection's refusal is returned at once; afterwards a lost stream is
    /// reopened (after [`RECONNECT_FIRST`] … [`RECONNECT_MAX`]) from the last index delivered,
    /// each failure reported as an `Err` item before the retry. Ends when the receiver is
    /// dropped.
    pub async fn watch(
        &self,
        key: &str,
        prefix: bool,
        from_index: u64,
    ) -> Result<mpsc::Receiver<Result<pb::WatchEvent, ClientError>>, ClientError> {
        let req = pb::WatchRequest {
            key: key.into(),
            prefix,
            horde: self.horde.clone(),
            from_index,
        };
        let first = self.client.clone().watch(req.clone()).await?.into_inner();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(follow(self.socket.clone(), req, first, tx));
        Ok(rx)
    }
}

fn client(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch).max_decoding_message_size(ANSWER_BYTES_MAX)
}

async fn follow(
    socket: PathBuf,
    mut req: pb::WatchRequest,
    first: tonic::Streaming<pb::WatchEvent>,
    tx: mpsc::Sender<Result<pb::WatchEvent, ClientError>>,
) {
    let mut stream = Some(first);
    let mut pause = RECONNECT_FIRST;
    loop {
        if let Some(mut s) = stream.take() {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    n = s.message() => n,
                };
                match next {
                    Ok(Some(e)) => {
                        pause = RECONNECT_FIRST;
                        // A listing counts once whole: resuming mid-listing lists again.
                        if !e.more {
                            req.from_index = e.index;
                        }
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        if tx
                            .send(Err(ClientError::Status(tonic::Status::unavailable(
                                "the agent ended the watch",
                            ))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        break;
                    }
                    Err(status) => {
                        if tx.send(Err(ClientError::Status(status))).await.is_err() {
                            return;
                        }
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RECONNECT_MAX);
        let opened = match socket_channel(&socket, Duration::from_secs(5)).await {
            Ok(ch) => client(ch)
                .watch(req.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(ClientError::Status),
            Err(e) => Err(e),
        };
        match opened {
            Ok(s) => {
                debug!(from = req.from_index, "watch resumed");
                stream = Some(s);
            }
            Err(e) => {
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
            }
        }
    }
}
