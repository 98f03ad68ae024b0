//! The NATS pass-through: every call goes to a NATS server's JetStream.
//!
//! | Catalyst            | JetStream                                                    |
//! |---------------------|--------------------------------------------------------------|
//! | topic `T`           | stream `CRUX_T`, subject `crux.topic.T`, file storage         |
//! | retention           | the stream's `max_bytes` / `max_age` (discard old)            |
//! | offset `o`          | stream sequence `o + 1` (sequences count from 1, offsets 0)   |
//! | subscription        | an ordered pull consumer from that sequence, made again from   |
//! |                     | the next offset after any error (the server away, …)          |
//! | group `G`'s offset  | the last message on subject `crux.group.T.G` of the stream    |
//! |                     | `CRUX-GROUPS` (one message kept per subject, as JetStream's    |
//! |                     | own key/value buckets; those are not used as such because     |
//! |                     | the client's bucket calls do not parse nats-server 2.9's)     |
//!
//! The client connects in the background and reconnects with back-off
//! ([`RECONNECT_FIRST`] doubling to [`RECONNECT_MAX`]); a publish is acknowledged only once
//! JetStream acknowledged it (stored), and fails with [`CatalystError::Unavailable`] after
//! [`REQUEST_TIMEOUT`] while the server is away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, context::PublishErrorKind, stream};
use bytes::Bytes;
use crux_service::{Phase, ReadySender};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    CatalystError, Message, Retention, Start, Subscription, TopicInfo, BATCH_MESSAGES_MAX,
};

/// The first pause before reconnecting; it doubles up to [`RECONNECT_MAX`].
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between reconnection attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long a JetStream request (a publish's acknowledgement included) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The stream of groups' offsets (one message kept per group).
pub const GROUPS_STREAM: &str = "CRUX-GROUPS";

/// The pause before reconnection attempt `n` (0-based).
pub fn backoff(n: usize) -> Duration {
    let shift = n.min(16) as u32;
    RECONNECT_FIRST
        .saturating_mul(1u32 << shift)
        .min(RECONNECT_MAX)
}

fn stream_name(topic: &str) -> String {
    format!("CRUX_{topic}")
}

fn subject(topic: &str) -> String {
    format!("crux.topic.{topic}")
}

fn group_subject(topic: &str, group: &str) -> String {
    format!("crux.group.{topic}.{group}")
}

fn unavailable(e: impl std::fmt::Display) -> CatalystError {
    CatalystError::Unavailable(e.to_string())
}

struct Inner {
    url: String,
    client: async_nats::Client,
    js: jetstream::Context,
    subscribers: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// The NATS backend.
#[derive(Clone)]
pub struct NatsBus(Arc<Inner>);

struct Counted(Arc<AtomicU32>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl NatsBus {
    /// A client of the NATS server at `url`, connecting (and reconnecting) in the background.
    pub async fn connect(url: &str) -> Result<NatsBus, CatalystError> {
        let client = async_nats::ConnectOptions::new()
            .name("crux-catalyst")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(REQUEST_TIMEOUT)
            .reconnect_delay_callback(backoff)
            .connect(url)
            .await
            .map_err(|e| CatalystError::Unavailable(format!("{url}: {e}")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(REQUEST_TIMEOUT);
        Ok(NatsBus(Arc::new(Inner {
            url: url.to_string(),
            client,
            js,
            subscribers: Mutex::new(HashMap::new()),
        })))
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.0.url
    }

    fn counter(&self, topic: &str) -> Arc<AtomicU32> {
        self.0
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    /// Subscriptions open through this agent.
    pub fn subscribers(&self, topic: &str) -> u32 {
        self.counter(topic).load(Ordering::Relaxed)
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream, CatalystError> {
        match self.0.js.get_stream(stream_name(topic)).await {
            Ok(s) => Ok(s),
            Err(e) => match e.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Err(CatalystError::NoTopic(topic.to_string()))
                }
                _ => Err(unavailable(e)),
            },
        }
    }

    async fn groups(&self) -> Result<stream::Stream, CatalystError> {
        self.0
            .js
            .get_or_create_stream(stream::Config {
                name: GROUPS_STREAM.into(),
                subjects: vec!["crux.group.>".into()],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(unavailable)
    }

    /// Every group of `topic` with its committed offset.
    async fn topic_groups(&self, topic: &str) -> Result<Vec<(String, u64)>, CatalystError> {
        let groups = self.groups().await?;
        let prefix = format!("crux.group.{topic}.");
        let mut subjects = groups
            .info_with_subjects(format!("{prefix}*"))
            .await
            .map_err(unavailable)?;
        let mut names = Vec::new();
        while let Some(s) = subjects.next().await {
            let (subject, _) = s.map_err(unavailable)?;
            if let Some(g) = subject.strip_prefix(&prefix) {
                names.push(g.to_string());
            }
        }
        names.sort();
        let mut out = Vec::new();
        for g in names {
            if let Some(o) = self.committed(topic, &g).await? {
                out.push((g, o));
            }
        }
        Ok(out)
    }

    async fn info(&self, topic: &str, s: &mut stream::Stream) -> Result<TopicInfo, CatalystError> {
        let info = s.info().await.map_err(unavailable)?.clone();
        let groups = self.topic_groups(topic).await?;
        let st = &info.state;
        Ok(TopicInfo {
            name: topic.to_string(),
            retention: Retention {
                max_bytes: info.config.max_bytes.max(0) as u64,
                max_age: info.config.max_age,
            },
            // An empty stream has first = last + 1.
            first_offset: st.first_sequence.saturating_sub(1),
            next_offset: st.last_sequence,
            messages: st.messages,
            bytes: st.bytes,
            groups,
        })
    }

    /// Makes a topic.
    pub async fn create(
        &self,
        topic: &str,
        retention: Retention,
    ) -> Result<TopicInfo, CatalystError> {
        match self.stream(topic).await {
            Ok(_) => return Err(CatalystError::TopicExists(topic.to_string())),
            Err(CatalystError::NoTopic(_)) => {}
            Err(e) => return Err(e),
        }
        let mut s = self
            .0
            .js
            .create_stream(stream::Config {
                name: stream_name(topic),
                subjects: vec![subject(topic)],
                max_bytes: if retention.max_bytes == 0 {
                    -1
                } else {
                    retention.max_bytes as i64
                },
                max_age: retention.max_age,
                storage: stream::StorageType::File,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NAME_EXIST =>
                {
                    CatalystError::TopicExists(topic.to_string())
                }
                _ => unavailable(e),
            })?;
        self.info(topic, &mut s).await
    }

    /// Every topic.
    pub async fn list(&self) -> Result<Vec<TopicInfo>, CatalystError> {
        let mut names = self.0.js.stream_names();
        let mut topics = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(unavailable)?;
            if let Some(t) = n.strip_prefix("CRUX_") {
                if crate::check_name("topic", t).is_ok() {
                    topics.push(t.to_string());
                }
            }
        }
        topics.sort();
        let mut out = Vec::new();
        for t in topics {
            match self.stream(&t).await {
                Ok(mut s) => out.push(self.info(&t, &mut s).await?),
                Err(CatalystError::NoTopic(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes a topic and its groups' offsets.
    pub async fn delete(&self, topic: &str) -> Result<(), CatalystError> {
        self.stream(topic).await?;
        self.0
            .js
            .delete_stream(stream_name(topic))
            .await
            .map_err(unavailable)?;
        self.groups()
            .await?
            .purge()
            .filter(format!("crux.group.{topic}.>"))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Publishes, pipelined: every message is sent, then every acknowledgement awaited.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<Bytes>,
    ) -> Result<Vec<u64>, CatalystError> {
        let subj = subject(topic);
        let mut acks = Vec::with_capacity(messages.len());
        let map = |e: jetstream::context::PublishError| match e.kind() {
            PublishErrorKind::StreamNotFound => CatalystError::NoTopic(topic.to_string()),
            _ => unavailable(e),
        };
        for m in messages {
            acks.push(self.0.js.publish(subj.clone(), m).await.map_err(map)?);
        }
        let mut offsets = Vec::with_capacity(acks.len());
        for a in acks {
            let ack = a.await.map_err(map)?;
            offsets.push(ack.sequence - 1);
        }
        Ok(offsets)
    }

    /// Records a group's offset.
    pub async fn commit(&self, topic: &str, group: &str, next: u64) -> Result<(), CatalystError> {
        let mut s = self.stream(topic).await?;
        let end = s.info().await.map_err(unavailable)?.state.last_sequence;
        if next > end {
            return Err(CatalystError::OffsetPastEnd {
                topic: topic.to_string(),
                offset: next,
                next: end,
            });
        }
        self.groups().await?;
        self.0
            .js
            .publish(group_subject(topic, group), next.to_string().into())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn committed(&self, topic: &str, group: &str) -> Result<Option<u64>, CatalystError> {
        let groups = self.groups().await?;
        match groups
            .get_last_raw_message_by_subject(&group_subject(topic, group))
            .await
        {
            Ok(m) => Ok(std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|v| v.parse().ok())),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A subscription: an ordered consumer from the start offset, made again from the next
    /// offset after an error.
    pub async fn subscribe(
        &self,
        topic: &str,
        start: Start,
        group: Option<&str>,
    ) -> Result<Subscription, CatalystError> {
        let mut s = self.stream(topic).await?;
        let st = s.info().await.map_err(unavailable)?.state.clone();
        let (first, next) = (st.first_sequence.saturating_sub(1), st.last_sequence);
        let start = match group {
            Some(g) => match self.committed(topic, g).await? {
                Some(c) => Start::Offset(c),
                None => start,
            },
            None => start,
        };
        let from = match start {
            Start::Earliest => first,
            Start::Latest => next,
            Start::Offset(o) if o > next => {
                return Err(CatalystError::OffsetPastEnd {
                    topic: topic.to_string(),
                    offset: o,
                    next,
                })
            }
            Start::Offset(o) => o.max(first),
        };
        let counter = self.counter(topic);
        counter.fetch_add(1, Ordering::Relaxed);
        let state = Reader {
            bus: self.clone(),
            topic: topic.to_string(),
            from,
            messages: None,
            failures: 0,
            _counted: Counted(counter),
        };
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            |mut r| async move {
                let batch = r.next_batch().await;
                Some((batch, r))
            },
        )))
    }

    /// Sets `ready` from the connection's state every `every` until `stop`.
    pub async fn watch_connection(
        self,
        ready: ReadySender,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.0.client.connection_state() {
                async_nats::connection::State::Connected => ready.set(
                    Phase::Ready,
                    format!("passing topics through to NATS at {}", self.0.url),
                ),
                s => ready.set(
                    Phase::Degraded,
                    format!(
                        "NATS at {} is {s:?}: reconnecting with back-off",
                        self.0.url
                    ),
                ),
            }
        }
    }
}

struct Reader {
    bus: NatsBus,
    topic: String,
    from: u64,
    messages: Option<pull::Ordered>,
    failures: usize,
    _counted: Counted,
}

impl Reader {
    async fn open(&mut self) -> Result<pull::Ordered, CatalystError> {
        let s = self.bus.stream(&self.topic).await?;
        let consumer = s
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject(&self.topic),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.from + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        consumer.messages().await.map_err(unavailable)
    }

    /// The next batch: what is ready now after the first message, up to a batch's worth.
    /// Errors other than a missing topic are retried (a fresh consumer from the next offset,
    /// after a back-off); a missing topic ends the subscription with that error.
    async fn next_batch(&mut self) -> Result<Vec<Message>, CatalystError> {
        loop {
            if self.messages.is_none() {
                match self.open().await {
                    Ok(m) => self.messages = Some(m),
                    Err(CatalystError::NoTopic(t)) => return Err(CatalystError::NoTopic(t)),
                    Err(e) => {
                        tracing::debug!(topic = %self.topic, error = %e, "catalyst: NATS consumer");
                        self.pause().await;
                        continue;
                    }
                }
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let mut batch = Vec::new();
            let mut failed = false;
            match messages.next().await {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    tracing::debug!(topic = %self.topic, error = %e, "catalyst: NATS subscription");
                    failed = true;
                }
                None => failed = true,
            }
            while !failed && batch.len() < BATCH_MESSAGES_MAX {
                match futures_util::FutureExt::now_or_never(messages.next()) {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(_))) | Some(None) => failed = true,
                    None => break,
                }
            }
            let mut out = Vec::with_capacity(batch.len());
            for m in batch {
                let Ok(info) = m.info() else { continue };
                let offset = info.stream_sequence - 1;
                let time_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                if offset < self.from {
                    continue;
                }
                out.push(Message {
                    offset,
                    payload: m.message.payload.clone(),
                    time_ms,
                });
            }
            if let Some(last) = out.last() {
                self.from = last.offset + 1;
            }
            if failed {
                self.messages = None;
            }
            if !out.is_empty() {
                self.failures = 0;
                return Ok(out);
            }
            if failed {
                self.pause().await;
            }
        }
    }

    async fn pause(&mut self) {
        let d = backoff(self.failures);
        self.failures += 1;
        tokio::time::sleep(d).await;
    }
}
