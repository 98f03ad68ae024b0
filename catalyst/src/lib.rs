//! Catalyst: durable topics with offsets and consumer groups (issue 16, items 7–8), the event
//! interface of the draft seeds ("a standalone message bus … or a pass-through interface for
//! other message systems like … NATS").
//!
//! One interface, [`Bus`], two backends:
//!
//! * **standalone** ([`standalone`]): each agent keeps its topics in `<data>/catalyst/`, one
//!   segment log per topic ([`log`]): offsets are dense from 0, retention by size and age drops
//!   whole segments, a consumer group's committed offset is a small file replaced atomically;
//! * **NATS** ([`nats`]): `[catalyst] backend = "nats://…"` passes every call to a NATS server's
//!   JetStream: a topic is the stream `CRUX_<topic>` on subject `crux.topic.<topic>`, an offset is
//!   the stream sequence minus one (so both backends count from 0), a group's offset is the last
//!   message on subject `crux.group.<topic>.<group>` of the stream `CRUX-GROUPS` (one kept per
//!   subject, as a key/value bucket does it). The client reconnects by itself
//!   with back-off; a publish made while the server is away fails (not acknowledged).
//!
//! ```text
//!   crux topic … / client ──unix socket──▶ grpc::CatalystService ──▶ Bus ─┬─ Standalone: logs
//!                                                                        └─ Nats: JetStream
//! ```
//!
//! **Contract**, the same in both modes (one conformance suite, `agent/tests/catalyst.rs`,
//! checks it on real agents): a publish is answered with each message's offset once the
//! message is stored, and an error means it may not be (at-least-once: resend); a subscription
//! delivers messages in offset order from where it starts (an offset, the oldest, the newest, or
//! a group's committed offset) and then every new one; a group's commit is what a later
//! subscription of the group starts from. A subscriber is fed at its own pace: the next batch is
//! read only when the previous one was taken, so a slow subscriber lags on disk (standalone) or
//! in the server (NATS), never in the agent's memory; one that goes away just ends its stream.
//!
//! **Why not the Raft store** (DESIGN.md, "Stored things are resources")? Topics' *messages*
//! are not operator data: one Raft entry, fsynced, per message (about 250 writes/s here today)
//! is two orders of magnitude below the 50,000 messages/s a bus needs, and the log would fill
//! the store's snapshots. A standalone topic lives on the agent that holds it, like a
//! single-replica Kafka partition; a deployment that needs replicated topics points Catalyst at
//! a NATS cluster, which is what the pass-through is for.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use crux_service::{Phase, Service};
use tokio_util::sync::CancellationToken;

pub mod client;
pub mod grpc;
pub mod log;
pub mod nats;
pub mod standalone;

/// The largest message: 1 MiB, NATS's default `max_payload`.
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;
/// The most payload bytes in one publish call (under gRPC's 4 MiB message limit).
pub const PUBLISH_BYTES_MAX: usize = 3 << 20;
/// The longest topic or group name.
pub const NAME_BYTES_MAX: usize = 128;
/// The most messages a subscription sends in one gRPC message.
pub const BATCH_MESSAGES_MAX: usize = 1024;
/// The most payload bytes a subscription sends in one gRPC message.
pub const BATCH_BYTES_MAX: usize = 256 << 10;

/// Errors of Catalyst. None changed anything, except as said.
#[derive(Debug, thiserror::Error)]
pub enum CatalystError {
    /// A topic or group name that is not allowed.
    #[error("{what} name {name:?}: {why}")]
    BadName {
        /// "topic" or "group".
        what: &'static str,
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No such topic.
    #[error("no topic {0:?} (make it with `crux topic create {0}`)")]
    NoTopic(String),
    /// The topic exists already.
    #[error("topic {0:?} exists already")]
    TopicExists(String),
    /// A message over [`MESSAGE_BYTES_MAX`].
    #[error("message {index} is {size} bytes: at most {max} (1 MiB) are allowed")]
    MessageTooLarge {
        /// Its place in the call.
        index: usize,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A publish over [`PUBLISH_BYTES_MAX`] in all, or with no message.
    #[error("{0}")]
    BadBatch(String),
    /// An offset past the topic's end.
    #[error("offset {offset} is past the end of topic {topic:?} (its next offset is {next})")]
    OffsetPastEnd {
        /// The topic.
        topic: String,
        /// The offset asked for.
        offset: u64,
        /// The topic's next offset.
        next: u64,
    },
    /// The backend cannot be reached (NATS away): nothing was acknowledged.
    #[error("the NATS backend is unavailable: {0}")]
    Unavailable(String),
    /// A disk error (standalone).
    #[error("catalyst storage: {0}")]
    Io(String),
}

impl From<CatalystError> for tonic::Status {
    fn from(e: CatalystError) -> tonic::Status {
        use CatalystError as E;
        let msg = e.to_string();
        match e {
            E::BadName { .. } | E::BadBatch(_) => tonic::Status::invalid_argument(msg),
            E::MessageTooLarge { .. } => tonic::Status::invalid_argument(msg),
            E::NoTopic(_) => tonic::Status::not_found(msg),
            E::TopicExists(_) => tonic::Status::already_exists(msg),
            E::OffsetPastEnd { .. } => tonic::Status::out_of_range(msg),
            E::Unavailable(_) => tonic::Status::unavailable(msg),
            E::Io(_) => tonic::Status::internal(msg),
        }
    }
}

/// How long a topic keeps messages (0 / zero: no limit of that kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Oldest segments are dropped while the topic holds more bytes than this.
    pub max_bytes: u64,
    /// Messages older than this are dropped (by whole segments).
    pub max_age: Duration,
}

/// One message read from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its offset.
    pub offset: u64,
    /// Its bytes.
    pub payload: Bytes,
    /// When it was stored (ms since the Unix epoch).
    pub time_ms: u64,
}

/// A topic and its figures.
#[derive(Clone, Debug)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Retention.
    pub retention: Retention,
    /// Oldest offset kept.
    pub first_offset: u64,
    /// Offset of the next message.
    pub next_offset: u64,
    /// Messages kept.
    pub messages: u64,
    /// Bytes kept.
    pub bytes: u64,
    /// Consumer groups and the offsets they read next.
    pub groups: Vec<(String, u64)>,
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The oldest message kept.
    Earliest,
    /// Messages published from now on.
    Latest,
    /// This offset (the oldest kept if it is gone).
    Offset(u64),
}

/// A subscription: batches of messages in offset order, ending only on an error.
pub type Subscription =
    futures_util::stream::BoxStream<'static, Result<Vec<Message>, CatalystError>>;

/// Checks a topic or group name: 1–128 of `A-Z a-z 0-9 _ -` (what NATS stream names and
/// subjects, and file names, all take).
pub fn check_name(what: &'static str, name: &str) -> Result<(), CatalystError> {
    let bad = |why| CatalystError::BadName {
        what,
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(bad("longer than 128 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(bad("only letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

/// Checks a publish: at least one message, none over [`MESSAGE_BYTES_MAX`], at most
/// [`PUBLISH_BYTES_MAX`] in all.
pub fn check_batch(messages: &[Bytes]) -> Result<(), CatalystError> {
    if messages.is_empty() {
        return Err(CatalystError::BadBatch(
            "a publish needs at least one message".into(),
        ));
    }
    let mut total = 0;
    for (index, m) in messages.iter().enumerate() {
        if m.len() > MESSAGE_BYTES_MAX {
            return Err(CatalystError::MessageTooLarge {
                index,
                size: m.len(),
                max: MESSAGE_BYTES_MAX,
            });
        }
        total += m.len();
    }
    if total > PUBLISH_BYTES_MAX {
        return Err(CatalystError::BadBatch(format!(
            "a publish of {total} bytes: at most {PUBLISH_BYTES_MAX} (3 MiB) in one call"
        )));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch (the time stamped on a message: the wall clock).
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The bus an agent serves: one of the two backends.
#[derive(Clone)]
pub enum Bus {
    /// Topics kept by this agent.
    Standalone(standalone::Standalone),
    /// Topics passed through to NATS JetStream.
    Nats(nats::NatsBus),
}

impl Bus {
    /// "standalone" or the NATS URL.
    pub fn backend(&self) -> String {
        match self {
            Bus::Standalone(_) => "standalone".into(),
            Bus::Nats(n) => n.url().to_string(),
        }
    }

    /// Makes a topic.
    pub async fn create(
        &self,
        name: &str,
        retention: Retention,
    ) -> Result<TopicInfo, CatalystError> {
        check_name("topic", name)?;
        match self {
            Bus::Standalone(s) => s.create(name, retention),
            Bus::Nats(n) => n.create(name, retention).await,
        }
    }

    /// Every topic, by name.
    pub async fn list(&self) -> Result<Vec<TopicInfo>, CatalystError> {
        match self {
            Bus::Standalone(s) => Ok(s.list()),
            Bus::Nats(n) => n.list().await,
        }
    }

    /// Removes a topic with its messages and groups.
    pub async fn delete(&self, name: &str) -> Result<(), CatalystError> {
        check_name("topic", name)?;
        match self {
            Bus::Standalone(s) => s.delete(name),
            Bus::Nats(n) => n.delete(name).await,
        }
    }

    /// Appends `messages` to `topic`: the offset of each.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<Bytes>,
    ) -> Result<Vec<u64>, CatalystError> {
        check_name("topic", topic)?;
        check_batch(&messages)?;
        match self {
            Bus::Standalone(s) => s.publish(topic, &messages),
            Bus::Nats(n) => n.publish(topic, messages).await,
        }
    }

    /// Subscribes to `topic` from `start`, or from `group`'s committed offset if it has one.
    pub async fn subscribe(
        &self,
        topic: &str,
        start: Start,
        group: Option<&str>,
    ) -> Result<Subscription, CatalystError> {
        check_name("topic", topic)?;
        if let Some(g) = group {
            check_name("group", g)?;
        }
        match self {
            Bus::Standalone(s) => s.subscribe(topic, start, group),
            Bus::Nats(n) => n.subscribe(topic, start, group).await,
        }
    }

    /// Records that `group` reads `next` next on `topic`.
    pub async fn commit(&self, topic: &str, group: &str, next: u64) -> Result<(), CatalystError> {
        check_name("topic", topic)?;
        check_name("group", group)?;
        match self {
            Bus::Standalone(s) => s.commit(topic, group, next),
            Bus::Nats(n) => n.commit(topic, group, next).await,
        }
    }

    /// Subscriptions open on this agent, per topic.
    pub fn subscribers(&self, topic: &str) -> u32 {
        match self {
            Bus::Standalone(s) => s.subscribers(topic),
            Bus::Nats(n) => n.subscribers(topic),
        }
    }
}

/// Where Catalyst keeps or sends topics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Segment logs under this directory.
    Standalone(PathBuf),
    /// A NATS server (JetStream enabled), `nats://host:port`.
    Nats(String),
}

/// What [`start`] needs.
pub struct Catalyst {
    /// The backend.
    pub backend: Backend,
    /// How often logs are synced to disk and retention enforced (standalone), or the NATS
    /// connection looked at (its readiness).
    pub every: Duration,
    /// Cancelled at shutdown.
    pub stop: CancellationToken,
}

/// Starts Catalyst: opens the standalone topics (or the NATS client, which connects and
/// reconnects by itself) and returns the service (its maintenance task and readiness) and the
/// bus the local API serves.
pub async fn start(c: Catalyst) -> Result<(Service, Bus), CatalystError> {
    let (service, ready) = Service::new("catalyst", c.stop.clone());
    match c.backend {
        Backend::Standalone(dir) => {
            let s = standalone::Standalone::open(&dir)?;
            ready.set(
                Phase::Ready,
                format!(
                    "standalone: {} topic(s) in {}",
                    s.list().len(),
                    dir.display()
                ),
            );
            let task = s.clone().maintain(c.every, c.stop);
            Ok((service.task("maintenance", task), Bus::Standalone(s)))
        }
        Backend::Nats(url) => {
            let n = nats::NatsBus::connect(&url).await?;
            ready.set(Phase::Starting, format!("connecting to NATS at {url}"));
            let task = n.clone().watch_connection(ready, c.every, c.stop);
            Ok((service.task("nats connection", task), Bus::Nats(n)))
        }
    }
}
