//! Store: durable operator data (muster entries and generic documents with compare-and-swap),
//! replicated by Raft among the voters the flock picks.
//!
//! Consensus is [`openraft`] (the 0.9 line, storage v2). Each node runs one Raft node whose id is
//! its flock node id and whose address is its NetID (`ip:grpc_port`); the Raft RPCs travel in the
//! `crux.store.v1.Store` gRPC service on the node gRPC port ([`Store::service`]), over the node
//! plane (`crux_transport`: only nodes the flock lists get through, and the service reads its
//! caller with `crux_transport::peer`). A write or consistent read made on any node is
//! forwarded to the Raft leader over the same service ([`Store::write`], [`Store::read`]); a
//! node that cannot reach a leader (cut off from a majority of voters) answers
//! [`StoreError::NoQuorum`] within [`StoreConfig::op_timeout`] or so, and never accepts a write
//! silently.
//!
//! # Storage
//!
//! The Raft log, the vote, the committed index and the latest snapshot live in one
//! [`redb`](https://docs.rs/redb) database, `store.redb` in the store's directory. redb is a
//! well-kept, pure-Rust embedded key-value store with ACID transactions, copy-on-write B-trees and
//! checksummed commits: a transaction committed with the default durability is fsynced before
//! `commit()` returns, and a torn write at a crash leaves the previous commit intact. That is
//! exactly what Raft needs (openraft is told a log append is durable, through `LogFlushed`, only
//! after the commit returned; a vote likewise), without writing and testing our own file format,
//! recovery scan and compaction. A hand-rolled append-only file would be smaller but would need its
//! own torn-tail detection, truncation (Raft truncates conflicting suffixes) and purge, each a
//! place for data-losing bugs. The committed index is written without its own fsync (the next log
//! append or vote carries it; losing it only means fewer entries are re-applied at open).
//!
//! The state machine is in memory (operator data is small) and rebuilt on open from the latest
//! snapshot; openraft then re-applies the committed log after it. Snapshots are built every
//! [`StoreConfig::snapshot_every`] log entries and stored durably in the same database before the
//! log before them is purged.
//!
//! # Disk trouble
//!
//! A full filesystem (ENOSPC, EDQUOT) under the store's directory is told apart from other I/O
//! errors and reported as [`StoreError::DiskFull`] (`disk full: <dir>`). The leader refuses
//! client writes while less than [`DISK_RESERVE_BYTES`] are free, before appending anything, so
//! a full disk costs writes only: reads, the leader and the followers stay. A storage error
//! Raft cannot avoid (a follower's append, a race with whatever fills the disk) stops that
//! node's Raft node, as openraft requires; the store reopens it by itself once the disk has
//! room again, behind the same [`Store`] handle, and it catches up. See `disk.rs`.
//!
//! # Documents
//!
//! A document's generation is a store-wide revision: every document write takes the next one, so
//! generations only grow and are never reused (deleting and re-creating a document cannot fool a
//! compare-and-swap). Generation 0 means absent: a compare-and-swap on 0 writes only a document
//! that does not exist yet.
//!
//! # Resources
//!
//! Everything new that is stored is a resource of a registered type ([`resource`]): one generic
//! path — read, list by prefix, transactions with compare-and-swap on the version (the Raft log
//! index of the last write), and gapless, resumable watches — with Blueprint K/V as its first
//! type. Muster entries and documents predate it and keep their own commands.
//!
//! # Groups
//!
//! Each Raft group has an id, a random `u64` that the group's first leader writes as the document
//! [`GROUP_KEY`] (`store/group`, 16 hex digits) by compare-and-swap on its absence, so that the
//! first such write wins and every member, every snapshot and every restart has the same id
//! ([`Store::group`], [`StoreStatus::group`]). Every Raft RPC carries the sender's group id, and a
//! node refuses Raft traffic from another group than its own, or from a group it abandoned: Raft
//! alone would let the leader of any group with a higher term overwrite this node's log (and an
//! empty node would vote for, and then follow, a lone member of the group it just left).
//!
//! Two groups formed apart (a partitioned cold boot) are merged by the flock leader ([`merge`]):
//! the loser is sealed ([`SEALED_KEY`]; from then on its writes fail with
//! [`StoreError::Merged`] and write nothing), its data is copied into the survivor by ordinary
//! writes (conflicting values of the loser kept under `merged/<loser>/…`), and its nodes abandon
//! their stores at runtime ([`Store::abandon`]: the Raft node is shut down, the directory set
//! aside, an empty one opened, all behind the same [`Store`] handle) and join the survivor.
//!
//! # Never
//!
//! A node never accepts a write it cannot commit through a majority of voters (a cut-off
//! minority answers [`StoreError::NoQuorum`]), never takes Raft traffic from another group or
//! one it abandoned, and never picks its own voters: only the flock leader's [`supervise`] does
//! ([`Store::initialize`], [`Store::set_voters`], with [`voters::choose`]). Its peers are reached
//! only through the [`crux_transport::Transport`] handle in its [`StoreConfig`]; nothing here is
//! process-global, so tests run a fleet of stores in one process. It knows the flock only as the
//! [`crux_service::FlockView`] the agent publishes, and never reads the agent's config.
//!
//! # In a flock
//!
//! [`supervise::start`] runs the store's supervision on every node (voters and learners on the
//! flock leader, the Raft leader's address for nodes outside the group) and hands the agent its
//! tasks, a stop handle and its readiness ([`crux_service::Service`]).

mod disk;
pub mod merge;
mod network;
pub mod recover;
pub mod resource;
mod service;
mod storage;
pub mod supervise;
mod types;
pub mod voters;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::store::v1::{store_client::StoreClient, RaftMessage, StatusRequest};
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

pub use disk::{is_full as is_disk_full, DiskStats, RESERVE_BYTES as DISK_RESERVE_BYTES};
pub use merge::{GroupNodes, GroupSeen, MergeReport};
pub use service::{StoreServer, StoreService};
pub use types::{
    hex, Applied, Change, Command, MusterEntry, Query, QueryResult, GROUP_KEY, MERGED_PREFIX,
    SEALED_KEY,
};

/// A store error as a gRPC status.
pub fn grpc_status(e: StoreError) -> tonic::Status {
    match e {
        StoreError::NoQuorum(_)
        | StoreError::NotInitialized
        | StoreError::Raft(_)
        | StoreError::Merged { .. } => tonic::Status::unavailable(e.to_string()),
        StoreError::Unconfirmed(_) => tonic::Status::deadline_exceeded(e.to_string()),
        StoreError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
        StoreError::DiskFull { .. } => tonic::Status::resource_exhausted(e.to_string()),
        other => tonic::Status::internal(other.to_string()),
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the store.
    pub(crate) TypeConfig:
        D = Command,
        R = Applied,
);

/// The most log entries in one AppendEntries. An entry holds up to 512 KiB of resource values
/// ([`resource::registry::TXN_BYTES_MAX`]), about 700 KB as JSON with base64: twenty stay under
/// the node plane's 16 MiB message limit (openraft's default of 300 would not).
const PAYLOAD_ENTRIES_MAX: u64 = 20;

/// How long to wait for a catching-up learner or a membership change.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a store is set up.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Where the database lives (created if missing).
    pub dir: PathBuf,
    /// This node's Raft id: its flock node id.
    pub node: u64,
    /// This node's NetID (`ip:grpc_port`), where the other nodes reach its store service.
    pub netid: SocketAddr,
    /// The address outgoing connections are made from.
    pub local_ip: Option<IpAddr>,
    /// This node's end of the node plane: every Raft RPC and forwarded request goes through it.
    pub transport: crux_transport::Transport,
    /// The leader's heartbeat interval.
    pub heartbeat: Duration,
    /// A follower starts an election after a random time in this range without a heartbeat.
    pub election_timeout: (Duration, Duration),
    /// How long a write or consistent read may take before it fails ([`StoreError::NoQuorum`]).
    pub op_timeout: Duration,
    /// A snapshot is built every this many log entries (and the log before it is purged, keeping
    /// this many entries for followers that are a little behind).
    pub snapshot_every: u64,
    /// Test hook: while this file exists, the store drops every node-to-node call it would send
    /// or receive (Raft RPCs, forwarded requests, status), as if this node's store traffic were
    /// cut off. Never set it in production.
    pub partition_file: Option<PathBuf>,
}

impl StoreConfig {
    /// The defaults: heartbeat 100 ms, elections after 300–600 ms, operations time out after 3 s,
    /// a snapshot every 1000 entries.
    pub fn new(
        dir: PathBuf,
        node: u64,
        netid: SocketAddr,
        transport: crux_transport::Transport,
    ) -> StoreConfig {
        StoreConfig {
            dir,
            node,
            netid,
            local_ip: None,
            transport,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            op_timeout: Duration::from_secs(3),
            snapshot_every: 1000,
            partition_file: None,
        }
    }
}

/// What can go wrong.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No Raft leader with a majority of voters could be reached: the request was refused. One
    /// case is less clear-cut: when this node leads, appended the write and then could not get a
    /// majority to confirm it within the time allowed, the entry stays in its log and is applied
    /// only if this node regains a majority before another leader is elected (a new leader
    /// discards it); the message says so ("not confirmed").
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// A write was sent to the leader but no answer came: it may or may not have been applied
    /// (read it back to know).
    #[error("write not confirmed: {0}")]
    Unconfirmed(String),
    /// The Raft group has no members yet ([`Store::initialize`] was never called anywhere).
    #[error("the store is not initialized")]
    NotInitialized,
    /// A membership change failed.
    #[error("membership change: {0}")]
    Membership(String),
    /// The database could not be opened or written.
    #[error("storage: {0}")]
    Storage(String),
    /// The filesystem under the store directory `path` of the node `detail` names has no room.
    /// Usually the leader refused the write before appending anything (nothing was written);
    /// when a Raft node stopped on the failed append, or a majority of voters has no room for
    /// it, the detail says that the write may yet be applied (read it back). Writes resume by
    /// themselves once space is freed (see the crate doc). Never from bad input; a gRPC
    /// `RESOURCE_EXHAUSTED`.
    #[error("disk full: {path}: {detail}")]
    DiskFull {
        /// The store's directory.
        path: String,
        /// How full, and what happens next.
        detail: String,
    },
    /// Raft stopped (shut down, or a fatal storage error).
    #[error("raft: {0}")]
    Raft(String),
    /// A bad argument (e.g. an empty voter set).
    #[error("{0}")]
    Invalid(String),
    /// Nothing was written: this node's group was merged into another and takes no more writes.
    /// Write again shortly: once this node has joined the surviving group, its writes land there.
    #[error(
        "store group {group} was merged into group {into} and takes no more writes; nothing was \
         written: retry once this node has joined group {into}"
    )]
    Merged {
        /// The sealed group's id.
        group: String,
        /// The surviving group's id.
        into: String,
    },
}

/// A Raft member: flock node id and NetID.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The flock node id.
    pub id: u64,
    /// Where its store service is.
    pub netid: SocketAddr,
}

/// This node's view of the Raft group.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// This node's id.
    pub node: u64,
    /// This node's role: `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// The leader this node knows of.
    pub leader: Option<Member>,
    /// The current term.
    pub term: u64,
    /// The voters (during a joint membership change, those of both configurations).
    pub voters: Vec<Member>,
    /// The learners (replicated to, not voting).
    pub learners: Vec<Member>,
    /// The index of the last entry this node's state machine applied.
    pub last_applied: Option<u64>,
    /// The index of the last entry in this node's log.
    pub last_log_index: Option<u64>,
    /// On the leader only: for each voter and learner, how many entries it lacks
    /// (`last_log_index` minus its matched index).
    pub lag: Option<BTreeMap<u64, u64>>,
    /// On the leader only: milliseconds since a majority last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// The group's id (16 hex digits) as this node's state machine knows it ([`GROUP_KEY`]);
    /// `None` before its first leader named it or on a node outside any group.
    #[serde(default)]
    pub group: Option<String>,
    /// Set once this group was merged into another: that group's id.
    #[serde(default)]
    pub sealed_into: Option<String>,
    /// Whether this node's store takes writes now, as [`Store::serving`] tells ([`Serving::Yes`]).
    /// `false` from an agent too old to say.
    #[serde(default)]
    pub serving: bool,
    /// This node's store directory, while it has no room for writes: a write found none, or
    /// less than [`DISK_RESERVE_BYTES`] are free.
    #[serde(default)]
    pub disk_full: Option<String>,
}

/// Whether a node's store takes writes now, as far as that node can tell from its own Raft state
/// ([`Store::serving`]): the store's readiness.
///
/// "Takes writes" is proved, not assumed: a leader appends an entry of its term when it is
/// elected, and that entry commits only once a majority of the voters has accepted it. So a node
/// that has *applied* an entry of its leader's current term has seen that leader get a write
/// through a majority; a write made now goes the same way. No probe write is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serving {
    /// A leader is known — this node, acknowledged by a majority within the shortest election
    /// timeout, or another, heard from within the longest — and an entry of its term is
    /// committed and applied on this node.
    Yes {
        /// The leader.
        leader: u64,
        /// Its term.
        term: u64,
        /// The last index applied here.
        applied: u64,
    },
    /// This node is outside the group (it knows no voters) and forwards to `leader`, which the
    /// members told it of.
    Forwards {
        /// The leader the members named.
        leader: u64,
    },
    /// No group here and no leader learned from the members: none was started yet, or none is
    /// in reach.
    NoGroup,
    /// Voters are known but no leader, or none heard from lately: an election runs (and can
    /// win only with a majority).
    Electing {
        /// The term this node is at.
        term: u64,
        /// The voters.
        voters: Vec<u64>,
    },
    /// A leader is known, but no entry of its term is committed and applied here yet (or, on
    /// the leader, no majority has acknowledged it yet).
    Committing {
        /// The leader.
        leader: u64,
        /// Its term.
        term: u64,
    },
    /// This node leads but no majority of its voters has acknowledged it for `millis`: it is most
    /// likely cut off, and refuses writes.
    CutOff {
        /// Since the last majority acknowledgement, in milliseconds (`None`: none since it
        /// leads, e.g. a leader restarted alone on its own committed vote).
        millis: Option<u64>,
        /// The voters.
        voters: Vec<u64>,
    },
    /// The Raft node stopped.
    Stopped(String),
}

impl Serving {
    /// Whether writes are taken ([`Serving::Yes`]).
    pub fn is_yes(&self) -> bool {
        matches!(self, Serving::Yes { .. })
    }
}

impl std::fmt::Display for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Serving::Yes {
                leader,
                term,
                applied,
            } => write!(
                f,
                "takes writes: leader {leader:016x}, term {term}, applied index {applied}"
            ),
            Serving::Forwards { leader } => {
                write!(f, "outside the group: forwards to leader {leader:016x}")
            }
            Serving::NoGroup => f.write_str("no store group known yet"),
            Serving::Electing { term, .. } => write!(f, "electing a leader (term {term})"),
            Serving::Committing { leader, term } => write!(
                f,
                "leader {leader:016x} elected in term {term}; its first entry is not committed yet"
            ),
            Serving::CutOff {
                millis: Some(millis),
                ..
            } => write!(
                f,
                "this node leads but no majority of voters has answered for {millis} ms"
            ),
            Serving::CutOff { millis: None, .. } => write!(
                f,
                "this node leads but no majority of voters has answered since it does"
            ),
            Serving::Stopped(why) => write!(f, "stopped: {why}"),
        }
    }
}

/// What [`Store::abandon`] did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Abandoned {
    /// The group abandoned.
    pub group: String,
    /// The group it was merged into.
    pub into: String,
    /// How many muster entries the abandoned store held.
    pub muster: usize,
    /// How many documents it held.
    pub docs: usize,
    /// Where the abandoned store now is.
    pub aside: PathBuf,
}

/// A request a node forwards to the leader.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Forwarded {
    Write(Command),
    Read(Query),
    SetVoters(BTreeMap<u64, SocketAddr>),
    AddLearner(u64, SocketAddr),
    RemoveLearners(BTreeSet<u64>),
    /// Sent to one node, which runs it itself (leader or not): see [`Store::abandon`].
    Abandon {
        group: u64,
        into: u64,
    },
}

#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Answer {
    Applied(Applied),
    Read(QueryResult),
    Done,
}

/// Why one attempt failed.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) enum Fail {
    /// The callee is not the leader; its idea of who is.
    NotLeader(Option<Member>),
    /// The request never reached the callee.
    NotSent(String),
    /// The request may have reached the callee, but no answer came.
    NoAnswer(String),
    /// A definite answer.
    Error(StoreError),
}

struct Inner {
    raft: Raft<TypeConfig>,
    shared: Arc<storage::Shared>,
    config: StoreConfig,
    pool: network::Pool,
    /// For a node outside the group (it knows no voters): the leader as learned from others.
    outside_leader: std::sync::Mutex<Option<Member>>,
    /// When this node last took an append (entries or a heartbeat) from a leader, and that
    /// leader's term: a follower serves only while its leader is heard from.
    leader_contact: std::sync::Mutex<Option<(u64, Instant)>>,
    /// The groups this node abandoned ([`Store::abandon`]), from [`ABANDONED_FILE`]: their Raft
    /// traffic is refused.
    abandoned: BTreeSet<u64>,
}

/// One node's store: its Raft node, state machine and client for forwarding. Cheap to clone.
///
/// The Raft node can be replaced at runtime ([`Store::abandon`]): every clone then uses the new
/// one.
#[derive(Clone)]
pub struct Store {
    slot: Arc<Slot>,
}

struct Slot {
    current: std::sync::RwLock<Arc<Inner>>,
    config: StoreConfig,
    /// Held while the Raft node is being replaced.
    reopen: tokio::sync::Mutex<()>,
    /// What the state machine applies; one channel for every Raft node this store runs, so that
    /// subscribers keep receiving after [`Store::abandon`] (which sends [`Change::Reset`]).
    changes: tokio::sync::broadcast::Sender<Change>,
    /// What the resource path applies, likewise kept across [`Store::abandon`].
    resources: tokio::sync::broadcast::Sender<resource::Feed>,
    /// The disk under the store's directory: its room and its trouble (see [`disk`]).
    disk: Arc<disk::Disk>,
}

impl Slot {
    /// The Raft node in use now.
    fn current_inner(&self) -> Arc<Inner> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the Raft node whose metrics are `stopped`, stopped by a storage error, by a new
    /// one on the reopened database (see [`disk::watch`]). Ok(false), changing nothing, if it
    /// was replaced meanwhile.
    async fn reopen_stopped(
        &self,
        stopped: &tokio::sync::watch::Receiver<RaftMetrics<u64, BasicNode>>,
    ) -> Result<bool, StoreError> {
        let _reopen = self.reopen.lock().await;
        let old = self.current_inner();
        if !old.raft.metrics().same_channel(stopped) {
            return Ok(false);
        }
        if let Err(e) = old.raft.shutdown().await {
            debug!(%e, "raft shutdown");
        }
        old.pool.clear();
        let new = open_inner(
            &self.config,
            self.changes.clone(),
            self.resources.clone(),
            self.disk.clone(),
        )
        .await?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        let _ = self.changes.send(Change::Reset);
        let _ = self.resources.send(resource::Feed::Reset);
        Ok(true)
    }
}

fn members(m: &RaftMetrics<u64, BasicNode>, ids: impl Iterator<Item = u64>) -> Vec<Member> {
    let membership = m.membership_config.membership();
    ids.filter_map(|id| {
        let netid = membership.get_node(&id)?.addr.parse().ok()?;
        Some(Member { id, netid })
    })
    .collect()
}

fn leader_of(m: &RaftMetrics<u64, BasicNode>) -> Option<Member> {
    let id = m.current_leader?;
    let netid = m
        .membership_config
        .membership()
        .get_node(&id)?
        .addr
        .parse()
        .ok()?;
    Some(Member { id, netid })
}

fn node(addr: SocketAddr) -> BasicNode {
    BasicNode {
        addr: addr.to_string(),
    }
}

/// Opens the database in `config.dir` and starts a Raft node on it.
async fn open_inner(
    config: &StoreConfig,
    changes: tokio::sync::broadcast::Sender<Change>,
    resources: tokio::sync::broadcast::Sender<resource::Feed>,
    disk: Arc<disk::Disk>,
) -> Result<Arc<Inner>, StoreError> {
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| StoreError::Storage(format!("{}: {e}", config.dir.display())))?;
    let db = storage::open_db(&config.dir.join(recover::DB_FILE), Duration::from_secs(5))
        .await
        .map_err(StoreError::Storage)?;
    let logs = storage::LogStore::new(db.clone(), disk.clone());
    let sm = storage::SmStore::open_with(db, disk, config.node, changes, resources)
        .map_err(StoreError::Storage)?;
    let shared = sm.shared();
    let ms = |d: Duration| d.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: "crux-store".into(),
        heartbeat_interval: ms(config.heartbeat).max(1),
        election_timeout_min: ms(config.election_timeout.0),
        election_timeout_max: ms(config.election_timeout.1),
        install_snapshot_timeout: ms(config.election_timeout.1).max(1000),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: config.snapshot_every,
        max_payload_entries: PAYLOAD_ENTRIES_MAX,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StoreError::Invalid(format!("raft timing: {e}")))?;
    let pool = network::Pool::new(
        config.transport.clone(),
        config.local_ip,
        network::Cut::new(config.partition_file.clone()),
    );

    let net = network::Net {
        pool: pool.clone(),
        backoff: config.heartbeat * 2,
        shared: shared.clone(),
    };
    let raft = Raft::new(config.node, Arc::new(raft_config), net, logs, sm)
        .await
        .map_err(|e| StoreError::Raft(e.to_string()))?;
    info!(node = format!("{:016x}", config.node), dir = %config.dir.display(), "store opened");
    let inner = Arc::new(Inner {
        raft,
        shared,
        config: config.clone(),
        pool,
        outside_leader: std::sync::Mutex::new(None),
        leader_contact: std::sync::Mutex::new(None),
        abandoned: read_abandoned(&config.dir),
    });
    tokio::spawn(name_group(Arc::downgrade(&inner), inner.raft.metrics()));
    Ok(inner)
}

/// The file in the store directory listing the groups this node abandoned, one id (hex) a line.
pub const ABANDONED_FILE: &str = "abandoned";

fn read_abandoned(dir: &std::path::Path) -> BTreeSet<u64> {
    std::fs::read_to_string(dir.join(ABANDONED_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .collect()
}

/// While this node leads a group that has no id yet, gives it one: a random id written as the
/// [`GROUP_KEY`] document by compare-and-swap on absence (the first such write wins, so every
/// member ends up with the same id). Ends when the Raft node stops or the store is dropped.
async fn name_group(
    inner: std::sync::Weak<Inner>,
    mut metrics: tokio::sync::watch::Receiver<RaftMetrics<u64, BasicNode>>,
) {
    loop {
        let leads = metrics.borrow_and_update().state == ServerState::Leader;
        if leads {
            let Some(inner) = inner.upgrade() else { return };
            if inner.group().is_none() {
                let id = loop {
                    let id: u64 = rand::random();
                    if id != 0 {
                        break id;
                    }
                };
                let cmd = Command::DocPut {
                    key: GROUP_KEY.into(),
                    value: types::hex(id),
                    if_generation: Some(0),
                };
                match tokio::time::timeout(MEMBERSHIP_TIMEOUT, inner.raft.client_write(cmd)).await {
                    Ok(Ok(r)) if matches!(r.data, Applied::Doc { .. }) => {
                        info!(group = types::hex(id), "the store group is named")
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => debug!(error = %e, "naming the store group"),
                    Err(_) => debug!("naming the store group timed out"),
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

impl Inner {
    /// The group's id, as this node's state machine knows it.
    fn group(&self) -> Option<u64> {
        self.shared.group()
    }

    /// The group this one was merged into, if it is sealed.
    fn sealed(&self) -> Option<u64> {
        self.shared.sealed()
    }

    /// Why a Raft RPC from a node of group `from` (hex; empty: not named yet) is refused, if it
    /// is: it comes from another group than this node's, or from one this node abandoned. Raft
    /// alone would let a leader of any group with a higher term overwrite this node's log.
    pub(crate) fn refuse_group(&self, from: &str) -> Option<String> {
        if from.is_empty() {
            return None;
        }
        let Ok(from) = u64::from_str_radix(from, 16) else {
            return Some(format!("bad store group id {from:?}"));
        };
        match self.group() {
            Some(mine) if mine != from => Some(format!(
                "this node is in store group {} and refuses Raft traffic of group {}",
                types::hex(mine),
                types::hex(from)
            )),
            None if self.abandoned.contains(&from) => Some(format!(
                "this node abandoned store group {} (merged into another) and refuses its Raft \
                 traffic",
                types::hex(from)
            )),
            _ => None,
        }
    }
}

impl Store {
    /// Opens the store in `config.dir` (recovering vote, log and the latest snapshot) and starts
    /// its Raft node. It serves nothing until [`Store::service`] is added to the node gRPC server.
    pub async fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let changes = tokio::sync::broadcast::channel(1024).0;
        let resources = tokio::sync::broadcast::channel(resource::watch::FEED_CAPACITY).0;
        let disk = disk::Disk::new(&config.dir, config.node, disk::RESERVE_BYTES);
        let inner = open_inner(&config, changes.clone(), resources.clone(), disk.clone()).await?;
        let slot = Arc::new(Slot {
            current: std::sync::RwLock::new(inner),
            config,
            reopen: tokio::sync::Mutex::new(()),
            changes,
            resources,
            disk,
        });
        tokio::spawn(disk::watch(Arc::downgrade(&slot)));
        Ok(Store { slot })
    }

    /// The Raft node in use now.
    fn inner(&self) -> Arc<Inner> {
        self.slot.current_inner()
    }

    /// This store's disk trouble so far (for `/metrics`).
    pub fn disk_stats(&self) -> DiskStats {
        self.slot.disk.stats()
    }

    /// Abandons this node's store because its group `group` was merged into group `into`: stops
    /// the Raft node, sets the database aside (the directory is renamed to
    /// `<dir>.abandoned-<group>-<unix ms>`, kept for the operator), and starts a new, empty Raft
    /// node in a new directory that holds the [`recover::JOIN_ONLY_FILE`] marker (it joins a
    /// group, never starts one) and lists `group` in [`ABANDONED_FILE`] (its Raft traffic is
    /// refused from now on). Every clone of this store uses the new node at once; no agent restart.
    ///
    /// Refused, changing nothing, unless this node's state machine is in `group`, and, if that
    /// group is sealed, sealed into `into`. The caller (the flock leader, [`Store::merge`]) sends
    /// it only once the survivor holds the merged data.
    pub async fn abandon(&self, group: u64, into: u64) -> Result<Abandoned, StoreError> {
        let _reopen = self.slot.reopen.lock().await;
        let old = self.inner();
        let mine = old.group();
        if mine != Some(group) {
            return Err(StoreError::Invalid(format!(
                "this node's store is in group {}, not {}: nothing abandoned",
                mine.map_or_else(|| "(none)".into(), types::hex),
                types::hex(group)
            )));
        }
        if let Some(sealed) = old.sealed().filter(|s| *s != into) {
            return Err(StoreError::Invalid(format!(
                "group {} was merged into {}, not {}: nothing abandoned",
                types::hex(group),
                types::hex(sealed),
                types::hex(into)
            )));
        }
        let (muster, docs) = match old
            .shared
            .state
            .read()
            .expect("state lock")
            .data
            .query(&Query::Dump)
        {
            QueryResult::Dump { muster, docs } => (muster.len(), docs.len()),
            _ => (0, 0),
        };
        warn!(
            group = types::hex(group),
            into = types::hex(into),
            muster,
            docs,
            "abandoning this node's store: its group was merged into another; it joins that one"
        );
        if let Err(e) = old.raft.shutdown().await {
            debug!(%e, "raft shutdown");
        }
        old.pool.clear();
        let config = &self.slot.config;
        let dir = &config.dir;
        let aside = recover::set_aside(
            dir,
            &format!("abandoned-{}-{}", types::hex(group), now_ms()),
            &format!(
                "this node abandoned store group {} (merged into {}): it joins an existing group \
                 and never starts one\n",
                types::hex(group),
                types::hex(into)
            ),
        )?;
        let io = |what: String| StoreError::Storage(what);
        let mut abandoned = old.abandoned.clone();
        abandoned.insert(group);
        let list: String = abandoned.iter().map(|g| types::hex(*g) + "\n").collect();
        std::fs::write(dir.join(ABANDONED_FILE), list)
            .map_err(|e| io(format!("{}: {e}", dir.join(ABANDONED_FILE).display())))?;
        let new = open_inner(
            config,
            self.slot.changes.clone(),
            self.slot.resources.clone(),
            self.slot.disk.clone(),
        )
        .await?;
        *self.slot.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        let _ = self.slot.changes.send(Change::Reset);
        let _ = self.slot.resources.send(resource::Feed::Reset);
        info!(aside = %aside.display(), "the abandoned store is set aside; a new, empty one is open");
        Ok(Abandoned {
            group: types::hex(group),
            into: types::hex(into),
            muster,
            docs,
            aside,
        })
    }

    /// The gRPC service to add to the node gRPC server: Raft RPCs, forwarded requests and status,
    /// to be served over the node plane (which admits only nodes the flock lists).
    pub fn service(&self) -> StoreServer {
        StoreService::server(self.clone())
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.inner().config.node
    }

    /// Whether this node's store was discarded by [`recover::discard`] and has not joined a group
    /// since: it must not start a group of its own (the recovered one may just not be up yet).
    pub fn join_only(&self) -> bool {
        self.inner()
            .config
            .dir
            .join(recover::JOIN_ONLY_FILE)
            .exists()
    }

    /// Removes the [`Store::join_only`] marker once this node is in a group (it knows voters).
    pub fn clear_join_only(&self) {
        if self.join_only() && !self.knows_no_voters() {
            let path = self.inner().config.dir.join(recover::JOIN_ONLY_FILE);
            match std::fs::remove_file(&path) {
                Ok(()) => info!("joined a store group: the discarded store's marker is removed"),
                Err(e) => debug!(path = %path.display(), error = %e, "join-only marker"),
            }
        }
    }

    /// Starts the Raft group with `voters` (which must include this node). Ok without doing
    /// anything if this node already has Raft state (the group was started before). Refused on a
    /// node whose store was discarded ([`Store::join_only`]).
    pub async fn initialize(&self, voters: BTreeMap<u64, SocketAddr>) -> Result<(), StoreError> {
        if voters.is_empty() {
            return Err(StoreError::Invalid("no voters".into()));
        }
        if self.join_only() {
            return Err(StoreError::Invalid(
                "this node's store was discarded (crux store recover --discard): it joins an \
                 existing group and never starts one"
                    .into(),
            ));
        }
        let nodes: BTreeMap<u64, BasicNode> =
            voters.into_iter().map(|(id, a)| (id, node(a))).collect();
        match self.inner().raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(StoreError::Membership(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(StoreError::Raft(e.to_string())),
        }
    }

    /// Makes exactly `voters` the voters: on the leader (forwarded there otherwise), adds the
    /// missing ones as learners and waits until they caught up, then changes the membership.
    /// Voters dropped are removed from the group (not kept as learners); other learners stay.
    pub async fn set_voters(&self, voters: BTreeMap<u64, SocketAddr>) -> Result<(), StoreError> {
        if voters.is_empty() {
            return Err(StoreError::Invalid("no voters".into()));
        }
        self.call(Forwarded::SetVoters(voters), MEMBERSHIP_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Adds `id` at `netid` as a learner (on the leader, forwarded there otherwise) and waits
    /// until it caught up.
    pub async fn add_learner(&self, id: u64, netid: SocketAddr) -> Result<(), StoreError> {
        self.call(Forwarded::AddLearner(id, netid), MEMBERSHIP_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Removes the learners `ids` from the group (on the leader, forwarded there otherwise). Ids
    /// that are not learners are ignored (a voter is never removed this way).
    pub async fn remove_learners(&self, ids: BTreeSet<u64>) -> Result<(), StoreError> {
        self.call(Forwarded::RemoveLearners(ids), MEMBERSHIP_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Applies `cmd` through the Raft leader (this node or, forwarded, another) and returns its
    /// answer once it is committed and applied on the leader.
    pub async fn write(&self, cmd: Command) -> Result<Applied, StoreError> {
        match self
            .call(Forwarded::Write(cmd), self.inner().config.op_timeout)
            .await?
        {
            Answer::Applied(Applied::Sealed { group, into }) => {
                Err(StoreError::Merged { group, into })
            }
            Answer::Applied(a) => Ok(a),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }

    /// This node's group id, as its state machine knows it (see [`GROUP_KEY`]).
    pub fn group(&self) -> Option<u64> {
        self.inner().group()
    }

    /// A consistent (linearizable) read: answered by the leader after it confirmed with a majority
    /// that it still leads.
    pub async fn read(&self, q: Query) -> Result<QueryResult, StoreError> {
        match self
            .call(Forwarded::Read(q), self.inner().config.op_timeout)
            .await?
        {
            Answer::Read(r) => Ok(r),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }

    /// A read of this node's state machine: immediate, possibly stale.
    pub fn local(&self, q: Query) -> QueryResult {
        self.inner()
            .shared
            .state
            .read()
            .expect("state lock")
            .data
            .query(&q)
    }

    /// What this node's state machine applies from now on. A receiver that lags (more than 1024
    /// changes behind) gets `RecvError::Lagged` and should re-read; [`Change::Reset`] likewise.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner().shared.changes.subscribe()
    }

    /// This node's view of the group.
    pub fn status(&self) -> StoreStatus {
        let inner = self.inner();
        let m = inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower if !voters.contains(&m.id) => "learner",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let last = m.last_log_index.unwrap_or(0);
        let lag = m.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, matched)| (*id, last.saturating_sub(matched.map_or(0, |l| l.index))))
                .collect()
        });
        StoreStatus {
            node: m.id,
            role: role.into(),
            leader: leader_of(&m),
            term: m.current_term,
            voters: members(&m, voters.iter().copied()),
            learners: members(&m, learners.into_iter()),
            last_applied: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            lag,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            group: inner.group().map(types::hex),
            sealed_into: inner.sealed().map(types::hex),
            serving: self.serving().is_yes(),
            disk_full: self.slot.disk.trouble(),
        }
    }

    /// Whether this node's store takes writes now ([`Serving`]), from its own Raft state.
    pub fn serving(&self) -> Serving {
        let inner = self.inner();
        let m = inner.raft.metrics().borrow().clone();
        if m.state == ServerState::Shutdown || m.running_state.is_err() {
            return Serving::Stopped(match m.running_state {
                Err(e) => e.to_string(),
                Ok(()) => "shut down".into(),
            });
        }
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        if voters.is_empty() {
            let outside = *inner
                .outside_leader
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            return match outside {
                Some(l) => Serving::Forwards { leader: l.id },
                None => Serving::NoGroup,
            };
        }
        let Some(leader) = m.current_leader else {
            return Serving::Electing {
                term: m.current_term,
                voters,
            };
        };
        if m.state == ServerState::Leader {
            // None: no majority has acknowledged this leader yet (e.g. one restarted on its
            // own committed vote, alone).
            let stale = inner.config.election_timeout.0.as_millis() as u64;
            match m.millis_since_quorum_ack {
                Some(millis) if millis <= stale => {}
                millis => return Serving::CutOff { millis, voters },
            }
        } else {
            // A follower (or learner) knows its leader from a committed vote, which outlives
            // the leader (a restart keeps it): it serves only while that leader is heard from.
            let fresh = inner.config.election_timeout.1;
            let heard = *inner
                .leader_contact
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let live =
                heard.is_some_and(|(term, at)| term == m.current_term && at.elapsed() <= fresh);
            if !live {
                return Serving::Electing {
                    term: m.current_term,
                    voters,
                };
            }
        }
        match m.last_applied {
            Some(l) if l.leader_id.term >= m.current_term => Serving::Yes {
                leader,
                term: m.current_term,
                applied: l.index,
            },
            _ => Serving::Committing {
                leader,
                term: m.current_term,
            },
        }
    }

    /// Notes an append from the leader of `term` that this node took (`answer`: its answer; one
    /// that names a higher vote was refused, the sender is a stale leader): see
    /// [`Store::serving`].
    pub(crate) fn note_leader_contact<E>(
        &self,
        term: u64,
        answer: &Result<openraft::raft::AppendEntriesResponse<u64>, E>,
    ) {
        if matches!(
            answer,
            Ok(openraft::raft::AppendEntriesResponse::HigherVote(_)) | Err(_)
        ) {
            return;
        }
        *self
            .inner()
            .leader_contact
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((term, Instant::now()));
    }

    /// The shortest election timeout: a leader whose last majority acknowledgement is older is
    /// taken as cut off.
    pub(crate) fn stale_quorum_millis(&self) -> u64 {
        self.inner().config.election_timeout.0.as_millis() as u64
    }

    /// Asks the store at `netid` for its status.
    pub async fn remote_status(&self, netid: SocketAddr) -> Result<StoreStatus, StoreError> {
        let timeout = self.inner().config.op_timeout;
        let mut client = self
            .client(netid, timeout)
            .await
            .map_err(StoreError::NoQuorum)?;
        let r = tokio::time::timeout(timeout, client.status(StatusRequest {}))
            .await
            .map_err(|_| StoreError::NoQuorum(format!("{netid}: no answer within {timeout:?}")))?
            .map_err(|s| StoreError::NoQuorum(format!("{netid}: {}: {}", s.code(), s.message())))?;
        serde_json::from_slice(&r.into_inner().json)
            .map_err(|e| StoreError::Raft(format!("{netid}: bad status: {e}")))
    }

    /// The Raft metrics (for tests and diagnostics).
    pub fn metrics(&self) -> tokio::sync::watch::Receiver<RaftMetrics<u64, BasicNode>> {
        self.inner().raft.metrics()
    }

    /// Waits up to `timeout` until `f` holds for this node's Raft metrics.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&RaftMetrics<u64, BasicNode>) -> bool + Send,
    ) -> Result<RaftMetrics<u64, BasicNode>, StoreError> {
        self.inner()
            .raft
            .wait(Some(timeout))
            .metrics(f, what)
            .await
            .map_err(|e| StoreError::NoQuorum(format!("waiting for {what}: {e}")))
    }

    /// Stops the Raft node. The store answers nothing afterwards; drop every clone (and the
    /// server serving [`Store::service`]) to release the database.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner().raft.shutdown().await {
            debug!(%e, "raft shutdown");
        }
        self.inner().pool.clear();
    }

    async fn client(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<StoreClient<Channel>, String> {
        self.inner().pool.get(addr, timeout).await
    }

    /// Tells a node that is not in the group (it knows no voters) where the leader is, as learned
    /// from the nodes that are: its requests go there. Ignored by members of the group.
    pub fn set_outside_leader(&self, leader: Option<Member>) {
        *self
            .inner()
            .outside_leader
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = leader;
    }

    /// Whether this node knows no voters (it is outside the group, or there is none yet).
    fn knows_no_voters(&self) -> bool {
        self.inner()
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_none()
    }

    /// The outside leader, while this node knows no voters of its own.
    fn outside_leader(&self) -> Option<Member> {
        if !self.knows_no_voters() {
            return None;
        }
        *self
            .inner()
            .outside_leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `req` on the leader, wherever it is, within `budget`.
    async fn call(&self, req: Forwarded, budget: Duration) -> Result<Answer, StoreError> {
        let deadline = Instant::now() + budget;
        {
            let m = self.inner().raft.metrics().borrow().clone();
            if let Err(fatal) = &m.running_state {
                if disk::storage_stopped(fatal).is_some() {
                    // This node's Raft node stopped on a storage error (it reopens once the disk
                    // has room): the leader it knew may still take the request.
                    let elsewhere = leader_of(&m).filter(|l| l.id != m.id);
                    if let Some(l) = elsewhere {
                        match self.forward(l.netid, &req, deadline).await {
                            Ok(a) => return Ok(a),
                            Err(Fail::Error(e)) => return Err(e),
                            Err(other) => debug!(?other, "forwarding past a stopped store"),
                        }
                    }
                }
                return Err(self.fatal_error(fatal));
            }
            if m.state == ServerState::Shutdown {
                return Err(StoreError::Raft("the store is shut down".into()));
            }
        }
        let mut hint: Option<Member> = None;
        let mut why = String::from("no leader known");
        let write = matches!(req, Forwarded::Write(_));
        loop {
            let leader = match hint.take() {
                Some(l) => Some(l),
                None => match self.outside_leader() {
                    Some(l) => Some(l),
                    // Outside the group, a leader is learned from others: look again shortly.
                    None if self.knows_no_voters() => {
                        if Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    None => self.wait_leader(None, deadline).await,
                },
            };
            let Some(leader) = leader else { break };
            let r = if leader.id == self.inner().config.node {
                self.exec(&req, deadline).await
            } else {
                self.forward(leader.netid, &req, deadline).await
            };
            match r {
                Ok(a) => return Ok(a),
                Err(Fail::Error(e)) => return Err(e),
                Err(Fail::NotLeader(h)) => {
                    why = format!("node {:016x} no longer leads", leader.id);
                    hint = h.filter(|h| h.id != leader.id);
                    if hint.is_none() {
                        self.wait_leader(Some(leader.id), deadline).await;
                    }
                }
                Err(Fail::NotSent(e)) => {
                    why = e;
                    self.wait_leader(
                        Some(leader.id),
                        deadline.min(Instant::now() + self.inner().config.election_timeout.1),
                    )
                    .await;
                }
                Err(Fail::NoAnswer(e)) if write => {
                    return Err(StoreError::Unconfirmed(format!(
                        "the leader {:016x} at {} did not answer: {e}",
                        leader.id, leader.netid
                    )))
                }
                Err(Fail::NoAnswer(e)) => why = e,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if self.knows_no_voters() {
            return Err(StoreError::NotInitialized);
        }
        Err(StoreError::NoQuorum(format!(
            "no Raft leader with a majority of voters answered within {budget:?} \
             (last: {why}); this node may be cut off from the voters; nothing was accepted"
        )))
    }

    /// Waits until a leader other than `not` is known, or `deadline`.
    async fn wait_leader(&self, not: Option<u64>, deadline: Instant) -> Option<Member> {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = self
            .inner()
            .raft
            .wait(Some(left))
            .metrics(
                |m| m.current_leader.is_some_and(|l| Some(l) != not) && leader_of(m).is_some(),
                "a leader",
            )
            .await
            .ok()?;
        leader_of(&m)
    }

    async fn forward(
        &self,
        addr: SocketAddr,
        req: &Forwarded,
        deadline: Instant,
    ) -> Result<Answer, Fail> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut client = self
            .client(addr, left.min(Duration::from_secs(1)))
            .await
            .map_err(Fail::NotSent)?;
        let msg = RaftMessage {
            json: serde_json::to_vec(req).expect("requests serialize"),
            data: Vec::new(),
            group: String::new(),
        };
        // The callee has its own deadline (op_timeout); give it a little more.
        let wait = left + Duration::from_millis(500);
        let r = tokio::time::timeout(wait, client.forward(msg)).await;
        let drop_client = || self.inner().pool.forget(addr);
        match r {
            Err(_) => Err(Fail::NoAnswer(format!("{addr}: no answer within {wait:?}"))),
            Ok(Err(s)) => {
                drop_client();
                let text = format!("{addr}: {}: {}", s.code(), s.message());
                if never_sent(&s) {
                    Err(Fail::NotSent(text))
                } else if s.code() == tonic::Code::PermissionDenied {
                    Err(Fail::Error(StoreError::NoQuorum(text)))
                } else {
                    Err(Fail::NoAnswer(text))
                }
            }
            Ok(Ok(reply)) => {
                serde_json::from_slice::<Result<Answer, Fail>>(&reply.into_inner().json)
                    .map_err(|e| Fail::NoAnswer(format!("{addr}: bad answer: {e}")))?
            }
        }
    }

    /// Serves a request forwarded by another node: runs it here if this node leads, never
    /// forwards it further.
    pub(crate) async fn serve_forwarded(&self, req: Forwarded) -> Result<Answer, Fail> {
        if let Forwarded::Abandon { group, into } = req {
            return match self.abandon(group, into).await {
                Ok(_) => Ok(Answer::Done),
                Err(e) => Err(Fail::Error(e)),
            };
        }
        let budget = match req {
            Forwarded::Write(_) | Forwarded::Read(_) => self.inner().config.op_timeout,
            _ => MEMBERSHIP_TIMEOUT,
        };
        self.exec(&req, Instant::now() + budget).await
    }

    /// The error for a request whose Raft node stopped with `fatal`: [`StoreError::DiskFull`]
    /// when a write found no room, [`StoreError::Raft`] otherwise.
    fn fatal_error(&self, fatal: &openraft::error::Fatal<u64>) -> StoreError {
        let why = disk::storage_stopped(fatal).or_else(|| {
            let m = self.inner().raft.metrics().borrow().running_state.clone();
            m.err().and_then(|f| disk::storage_stopped(&f))
        });
        match why {
            Some(why) => self.slot.disk.stopped(&why),
            None => StoreError::Raft(fatal.to_string()),
        }
    }

    fn not_leader(&self) -> Fail {
        Fail::NotLeader(leader_of(&self.inner().raft.metrics().borrow()))
    }

    fn no_quorum(&self, what: &str, deadline: Instant, start: Instant) -> Fail {
        Fail::Error(StoreError::NoQuorum(format!(
            "{what} not confirmed by a majority of voters within {:?}: this node leads but cannot \
             reach them",
            deadline.saturating_duration_since(start)
        )))
    }

    /// Runs `req` on this node, which must be the leader.
    async fn exec(&self, req: &Forwarded, deadline: Instant) -> Result<Answer, Fail> {
        let start = Instant::now();
        let raft = &self.inner().raft;
        {
            let m = raft.metrics().borrow().clone();
            if m.state != ServerState::Leader {
                return Err(self.not_leader());
            }
            // A leader that has not heard from a majority for the shortest election timeout is
            // most likely cut off (its followers may be electing another): refuse at once rather
            // than append what may never commit.
            let stale = self.inner().config.election_timeout.0.as_millis() as u64;
            if m.millis_since_quorum_ack.is_some_and(|t| t > stale) {
                if matches!(req, Forwarded::Write(_)) {
                    if let Some(e) = self.voters_out_of_room().await {
                        return Err(Fail::Error(e));
                    }
                }
                return Err(Fail::Error(StoreError::NoQuorum(format!(
                    "this node leads but has not heard from a majority of voters for {} ms",
                    m.millis_since_quorum_ack.unwrap_or(0)
                ))));
            }
        }
        let left = deadline.saturating_duration_since(start);
        match req {
            Forwarded::Write(cmd) => {
                // Refused before it is appended when the disk has no room: an append that fails
                // would stop this Raft node (and its reads) until the disk has room again.
                let disk = self.slot.disk.clone();
                match tokio::task::spawn_blocking(move || disk.room()).await {
                    Ok(Err(e)) => {
                        let store = self.clone();
                        tokio::spawn(async move { store.hand_over().await });
                        return Err(Fail::Error(e));
                    }
                    Ok(Ok(())) => {}
                    Err(e) => return Err(Fail::Error(StoreError::Storage(e.to_string()))),
                }
                match tokio::time::timeout(left, raft.client_write(cmd.clone())).await {
                    Err(_) => Err(match self.voters_out_of_room().await {
                        Some(e) => Fail::Error(e),
                        None => self.no_quorum(
                            "the write (appended to this leader's log, applied only if it \
                             regains a majority before another leader is elected) was",
                            deadline,
                            start,
                        ),
                    }),
                    Ok(Ok(r)) => Ok(Answer::Applied(r.data)),
                    Ok(Err(RaftError::Fatal(f))) => Err(Fail::Error(self.fatal_error(&f))),
                    Ok(Err(e)) => Err(write_error(e)),
                }
            }
            Forwarded::Read(q) => loop {
                // openraft confirms leadership with one round of heartbeats, each allowed only a
                // heartbeat interval: a slow round is not a lost majority, so try again until the
                // deadline.
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, raft.ensure_linearizable()).await {
                    Err(_) => return Err(self.no_quorum("the read was", deadline, start)),
                    Ok(Ok(_)) => return Ok(Answer::Read(self.local(q.clone()))),
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                        return Err(Fail::NotLeader(forward_hint(f.leader_id, f.leader_node)))
                    }
                    Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                        let pause = self.inner().config.heartbeat;
                        if Instant::now() + pause >= deadline {
                            return Err(Fail::Error(StoreError::NoQuorum(format!(
                                "the read was not confirmed by a majority of voters within \
                                 {:?}: {e}",
                                deadline.saturating_duration_since(start)
                            ))));
                        }
                        debug!(%e, "leadership not confirmed, trying again");
                        tokio::time::sleep(pause).await;
                    }
                    Ok(Err(RaftError::Fatal(e))) => {
                        return Err(Fail::Error(StoreError::Raft(e.to_string())))
                    }
                }
            },
            Forwarded::AddLearner(id, netid) => {
                let r = tokio::time::timeout(left, raft.add_learner(*id, node(*netid), true)).await;
                match r {
                    Err(_) => Err(Fail::Error(StoreError::Membership(format!(
                        "learner {id:016x} at {netid} did not catch up within {left:?}"
                    )))),
                    Ok(Ok(_)) => Ok(Answer::Done),
                    Ok(Err(e)) => Err(write_error(e)),
                }
            }
            Forwarded::RemoveLearners(ids) => {
                let learners: BTreeSet<u64> = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .learner_ids()
                    .filter(|id| ids.contains(id))
                    .collect();
                if learners.is_empty() {
                    return Ok(Answer::Done);
                }
                info!(?learners, "removing learners");
                let r = tokio::time::timeout(
                    left,
                    raft.change_membership(ChangeMembers::RemoveNodes(learners), false),
                )
                .await;
                match r {
                    Err(_) => Err(Fail::Error(StoreError::Membership(format!(
                        "removing learners did not finish within {left:?}"
                    )))),
                    Ok(Ok(_)) => Ok(Answer::Done),
                    Ok(Err(e)) => Err(write_error(e)),
                }
            }
            Forwarded::Abandon { .. } => Err(Fail::Error(StoreError::Invalid(
                "an abandon request is run by the node it is sent to, never by a leader".into(),
            ))),
            Forwarded::SetVoters(voters) => {
                tokio::time::timeout(left, self.set_voters_here(voters))
                    .await
                    .map_err(|_| {
                        Fail::Error(StoreError::Membership(format!(
                            "the voter change did not finish within {left:?}"
                        )))
                    })?
            }
        }
    }

    async fn set_voters_here(&self, voters: &BTreeMap<u64, SocketAddr>) -> Result<Answer, Fail> {
        let raft = &self.inner().raft;
        let membership = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        // Members whose address changed.
        let moved: BTreeMap<u64, BasicNode> = voters
            .iter()
            .filter(|(id, a)| {
                membership
                    .get_node(id)
                    .is_some_and(|n| n.addr != a.to_string())
            })
            .map(|(id, a)| (*id, node(*a)))
            .collect();
        if !moved.is_empty() {
            raft.change_membership(ChangeMembers::SetNodes(moved), true)
                .await
                .map_err(write_error)?;
        }
        for (id, a) in voters {
            if membership.get_node(id).is_none() {
                info!(id = format!("{id:016x}"), netid = %a, "adding a learner");
                raft.add_learner(*id, node(*a), true)
                    .await
                    .map_err(write_error)?;
            }
        }
        let want: BTreeSet<u64> = voters.keys().copied().collect();
        let have: BTreeSet<u64> = membership.voter_ids().collect();
        if want != have || membership.get_joint_config().len() > 1 {
            info!(?want, ?have, "changing the voters");
            raft.change_membership(want, false)
                .await
                .map_err(write_error)?;
        }
        Ok(Answer::Done)
    }
}

/// Whether a failed call certainly never reached the callee (no connection could be made).
fn never_sent(s: &tonic::Status) -> bool {
    if s.code() != tonic::Code::Unavailable {
        return false;
    }
    let mut text = s.message().to_lowercase();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push(' ');
        text.push_str(&e.to_string().to_lowercase());
        source = e.source();
    }
    [
        "refused",
        "tcp connect",
        "trying to connect",
        network::CUT_MESSAGE,
    ]
    .iter()
    .any(|w| text.contains(w))
}

fn forward_hint(id: Option<u64>, node: Option<BasicNode>) -> Option<Member> {
    Some(Member {
        id: id?,
        netid: node?.addr.parse().ok()?,
    })
}

fn write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> Fail {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            Fail::NotLeader(forward_hint(f.leader_id, f.leader_node))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Fail::Error(StoreError::Membership(e.to_string()))
        }
        RaftError::Fatal(e) => Fail::Error(StoreError::Raft(e.to_string())),
    }
}

/// Milliseconds since the Unix epoch (for [`MusterEntry::timestamp_ms`]).
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
