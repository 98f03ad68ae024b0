//! Resources: the one generic path for durable things (DESIGN.md, "Stored things are
//! resources").
//!
//! A resource is `{type, horde, name, version, create index, flags, spec, status}` in the
//! replicated state machine. Every kind of durable thing (K/V entries first) is a *type* in the
//! [`registry`] — its limits and name rules — over the same operations:
//!
//! * read one, list by name prefix ([`ResourceQuery`]): linearizable through the Raft leader
//!   ([`crate::Store::resource_read`] with `consistent`), or this node's copy;
//! * a transaction ([`Txn`]) of up to [`registry::TXN_OPS_MAX`] operations — check a version, put
//!   (optionally compare-and-swap on the version), delete (likewise), delete by prefix — applied
//!   atomically at one Raft log index: if one check or compare-and-swap fails, nothing is applied
//!   and the answer names the operation, its resource and its current version
//!   ([`Outcome::Failed`]);
//! * a watch ([`watch`]) that gives the resources under a prefix at index N, then every change
//!   after it, in log order, without gaps, resumable from the last index seen.
//!
//! # Versions
//!
//! A resource's `version` is its *modify index*: the Raft log index of the entry that last wrote
//! it; `create_index` is that of the entry that created it. Both only grow (log indexes are never
//! reused), so deleting and re-creating a resource cannot fool a compare-and-swap. Version 0 means
//! absent: a check or compare-and-swap on 0 passes only while the resource does not exist.
//!
//! # History
//!
//! The state machine keeps the recent changes in memory: every batch of changes
//! (one per applied transaction that changed something) with its log index, up to
//! [`HISTORY_BATCHES_MAX`] batches and [`HISTORY_BYTES_MAX`] bytes. A watcher that resumes from
//! index L gets the batches after L from there. Older ones are dropped (the history's *floor*
//! rises), and a node that installs a snapshot or restarts keeps only what it re-applies after
//! its snapshot: a watcher whose L is below the floor gets a fresh listing flagged `compacted`
//! instead, never a silent gap. The history is not part of snapshots (it is the same on no two
//! nodes, and need not be).

pub mod registry;
pub mod watch;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Applied, Command, Query, QueryResult, Store, StoreError};

pub use registry::{TypeSpec, KV};
pub use watch::{Filter, WatchEvent};

/// How many change batches the history keeps at most.
pub const HISTORY_BATCHES_MAX: usize = 16_384;
/// How many bytes (of names and specs) the history keeps at most.
pub const HISTORY_BYTES_MAX: usize = 64 << 20;

/// Bytes as base64 in JSON (log entries and snapshots are JSON; an array of numbers would be
/// three to four times larger).
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// Which resource: its type, horde and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    /// The type (a name in the [`registry`], e.g. `kv`).
    pub rtype: String,
    /// The horde (namespace).
    pub horde: String,
    /// The name, unique within type and horde (for `kv`: the key).
    pub name: String,
}

impl ResourceId {
    /// A K/V key in `horde`.
    pub fn kv(horde: &str, key: &str) -> ResourceId {
        ResourceId {
            rtype: KV.name.into(),
            horde: horde.into(),
            name: key.into(),
        }
    }
}

/// One stored resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Which one.
    #[serde(flatten)]
    pub id: ResourceId,
    /// The modify index: the log index of the entry that last wrote it.
    pub version: u64,
    /// The log index of the entry that created it.
    pub create_index: u64,
    /// Opaque flags for the writer's use (Consul's `flags`).
    pub flags: u64,
    /// What the writer wants (for `kv`: the value).
    #[serde(with = "b64")]
    pub spec: Vec<u8>,
    /// What a controller observed (kept across writes of the spec; empty for `kv`).
    #[serde(with = "b64", default)]
    pub status: Vec<u8>,
}

impl Resource {
    fn bytes(&self) -> usize {
        self.id.name.len() + self.spec.len() + self.status.len() + 64
    }
}

/// One operation of a [`Txn`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Passes only if the resource's version is `version` (0: only if it is absent).
    Check {
        /// Which resource.
        id: ResourceId,
        /// The version it must have.
        version: u64,
    },
    /// Writes the resource (creating it if absent); its status, if any, is kept.
    Put {
        /// Which resource.
        id: ResourceId,
        /// Its flags.
        flags: u64,
        /// Its spec.
        #[serde(with = "b64")]
        spec: Vec<u8>,
        /// `Some(v)`: only if its version is `v` (0: only if absent).
        if_version: Option<u64>,
    },
    /// Deletes the resource (nothing if absent).
    Delete {
        /// Which resource.
        id: ResourceId,
        /// `Some(v)`: only if its version is `v`.
        if_version: Option<u64>,
    },
    /// Deletes every resource of `rtype` in `horde` whose name starts with `prefix`, except those
    /// whose name starts with `spare` (the type's reserved namespace, when the writer may not
    /// touch it).
    DeletePrefix {
        /// The type.
        rtype: String,
        /// The horde.
        horde: String,
        /// The name prefix (never empty: see [`registry::check_txn`]).
        prefix: String,
        /// Names starting with this are kept.
        spare: Option<String>,
    },
}

/// Operations applied together, in order, all or nothing. Later operations see the effect of
/// earlier ones (a put then a check of the same resource passes on the new version).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Txn {
    /// The operations.
    pub ops: Vec<Op>,
    /// Idempotency token (0: none). A transaction whose token the state machine applied among
    /// the last [`TOKENS_MAX`] is not applied again: the first answer is returned. Set by
    /// [`crate::Store::resource_txn`], which may then resend a write whose answer was lost.
    #[serde(default)]
    pub token: u64,
}

impl Txn {
    /// `ops`, without a token (see [`Txn::token`]).
    pub fn new(ops: Vec<Op>) -> Txn {
        Txn { ops, token: 0 }
    }
}

/// How many transaction tokens the state machine remembers (and keeps in snapshots).
pub const TOKENS_MAX: usize = 8192;

/// How many times [`crate::Store::resource_txn`] resends a write whose answer was lost.
pub const RESENDS_MAX: usize = 3;

/// What one operation of an applied [`Txn`] did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// The check passed.
    Checked,
    /// The resource as written.
    Put(Resource),
    /// How many resources were deleted.
    Deleted(u64),
}

/// The answer to a [`Txn`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every operation was applied at log index `index`.
    Applied {
        /// The log index of the transaction.
        index: u64,
        /// One result per operation.
        results: Vec<OpResult>,
    },
    /// Operation `op` (0-based) failed its check or compare-and-swap: `id` is at version
    /// `current` (0: absent). Nothing of the transaction was applied.
    Failed {
        /// Which operation.
        op: usize,
        /// Its resource.
        id: ResourceId,
        /// That resource's version now.
        current: u64,
    },
}

/// A change, as a watcher sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The resource was written; this is its new state.
    Put(Resource),
    /// The resource was deleted.
    Deleted(ResourceId),
}

impl Event {
    /// The resource it is about.
    pub fn id(&self) -> &ResourceId {
        match self {
            Event::Put(r) => &r.id,
            Event::Deleted(id) => id,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Event::Put(r) => r.bytes(),
            Event::Deleted(id) => id.name.len() + 64,
        }
    }
}

/// The changes one transaction made, at its log index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The log index.
    pub index: u64,
    /// The changes, in the order the operations made them.
    pub events: Vec<Event>,
}

/// What the state machine announces to watchers.
#[derive(Clone, Debug)]
pub(crate) enum Feed {
    /// A transaction changed something.
    Batch(Arc<Batch>),
    /// The state was replaced (a snapshot installed, the store abandoned): re-read.
    Reset,
}

/// A read of resources.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ResourceQuery {
    /// One resource.
    Get(ResourceId),
    /// Every resource of `rtype` in `horde` whose name starts with `prefix`, ordered by name.
    List {
        /// The type.
        rtype: String,
        /// The horde.
        horde: String,
        /// The name prefix ("" for all).
        prefix: String,
    },
    /// Every resource of every type and horde (for a merge of groups), ordered by type, horde
    /// and name.
    Every,
}

/// The answer to a [`ResourceQuery`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The log index of the last change to any resource of the type (0: none yet): pass it to a
    /// blocking read or a watch to wait for what changes after this answer.
    pub index: u64,
    /// The resources found, ordered by name.
    pub items: Vec<Resource>,
}

type Key = (String, String, String);

fn key(id: &ResourceId) -> Key {
    (id.rtype.clone(), id.horde.clone(), id.name.clone())
}

/// The recent change batches, oldest first (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct History {
    batches: VecDeque<Arc<Batch>>,
    bytes: usize,
    /// Every change after this index is in `batches`.
    floor: u64,
}

impl History {
    fn push(&mut self, b: Arc<Batch>) {
        self.bytes += b.events.iter().map(Event::bytes).sum::<usize>();
        self.batches.push_back(b);
        while self.batches.len() > HISTORY_BATCHES_MAX || self.bytes > HISTORY_BYTES_MAX {
            let Some(old) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= old.events.iter().map(Event::bytes).sum::<usize>();
            self.floor = old.index;
        }
    }

    /// Every batch after `index`, or `None` if some were dropped.
    pub(crate) fn since(&self, index: u64) -> Option<Vec<Arc<Batch>>> {
        if index < self.floor {
            return None;
        }
        let start = self.batches.partition_point(|b| b.index <= index);
        Some(self.batches.range(start..).cloned().collect())
    }

    /// The index every retained change comes after.
    #[cfg(test)]
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }
}

/// The resources of the state machine.
#[derive(Clone, Debug, Default)]
pub(crate) struct Table {
    items: BTreeMap<Key, Resource>,
    /// Per type, the log index of its last change.
    type_index: BTreeMap<String, u64>,
    /// The answers to the last [`TOKENS_MAX`] transactions with a token, oldest first.
    tokens: VecDeque<(u64, Outcome)>,
    token_index: BTreeMap<u64, Outcome>,
    history: History,
}

impl PartialEq for Table {
    /// The stored resources and tokens; the history is a cache of recent changes, not state.
    fn eq(&self, other: &Table) -> bool {
        self.items == other.items
            && self.type_index == other.type_index
            && self.tokens == other.tokens
    }
}

impl Eq for Table {}

/// How a [`Table`] is written into a snapshot.
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct TableFile {
    items: Vec<Resource>,
    type_index: BTreeMap<String, u64>,
    #[serde(default)]
    tokens: Vec<(u64, Outcome)>,
}

enum Undo {
    Item(Key, Option<Resource>),
}

impl Table {
    pub(crate) fn to_file(&self) -> TableFile {
        TableFile {
            items: self.items.values().cloned().collect(),
            type_index: self.type_index.clone(),
            tokens: self.tokens.iter().cloned().collect(),
        }
    }

    /// Reads the snapshot form; the history starts empty, with its floor at `index` (the
    /// snapshot's last log index).
    pub(crate) fn from_file(file: TableFile, index: u64) -> Table {
        Table {
            items: file.items.into_iter().map(|r| (key(&r.id), r)).collect(),
            type_index: file.type_index,
            token_index: file.tokens.iter().cloned().collect(),
            tokens: file.tokens.into(),
            history: History {
                floor: index,
                ..History::default()
            },
        }
    }

    /// After the state was replaced by a snapshot at `index`: no change at or before it is
    /// known.
    pub(crate) fn reset_history(&mut self, index: u64) {
        self.history = History {
            floor: index,
            ..History::default()
        };
    }

    pub(crate) fn history(&self) -> &History {
        &self.history
    }

    fn version(&self, k: &Key) -> u64 {
        self.items.get(k).map_or(0, |r| r.version)
    }

    /// Applies `txn` at log index `index`: all of it, or (a check or compare-and-swap failed)
    /// none of it. Returns the answer and, when something changed, the batch of changes (also
    /// recorded in the history).
    pub(crate) fn apply(&mut self, index: u64, txn: &Txn) -> (Outcome, Option<Arc<Batch>>) {
        if txn.token != 0 {
            if let Some(first) = self.token_index.get(&txn.token) {
                return (first.clone(), None);
            }
        }
        let (outcome, batch) = self.apply_txn(index, txn);
        if txn.token != 0 {
            self.tokens.push_back((txn.token, outcome.clone()));
            self.token_index.insert(txn.token, outcome.clone());
            while self.tokens.len() > TOKENS_MAX {
                if let Some((t, _)) = self.tokens.pop_front() {
                    self.token_index.remove(&t);
                }
            }
        }
        (outcome, batch)
    }

    fn apply_txn(&mut self, index: u64, txn: &Txn) -> (Outcome, Option<Arc<Batch>>) {
        let mut undo = Vec::new();
        let mut events = Vec::new();
        let mut results = Vec::with_capacity(txn.ops.len());
        for (n, op) in txn.ops.iter().enumerate() {
            match self.apply_op(index, op, &mut undo, &mut events) {
                Ok(r) => results.push(r),
                Err((id, current)) => {
                    for Undo::Item(k, old) in undo.into_iter().rev() {
                        match old {
                            Some(r) => self.items.insert(k, r),
                            None => self.items.remove(&k),
                        };
                    }
                    return (Outcome::Failed { op: n, id, current }, None);
                }
            }
        }
        let batch = if events.is_empty() {
            None
        } else {
            for e in &events {
                self.type_index.insert(e.id().rtype.clone(), index);
            }
            let b = Arc::new(Batch { index, events });
            self.history.push(b.clone());
            Some(b)
        };
        (Outcome::Applied { index, results }, batch)
    }

    fn apply_op(
        &mut self,
        index: u64,
        op: &Op,
        undo: &mut Vec<Undo>,
        events: &mut Vec<Event>,
    ) -> Result<OpResult, (ResourceId, u64)> {
        match op {
            Op::Check { id, version } => {
                let current = self.version(&key(id));
                if current != *version {
                    return Err((id.clone(), current));
                }
                Ok(OpResult::Checked)
            }
            Op::Put {
                id,
                flags,
                spec,
                if_version,
            } => {
                let k = key(id);
                let old = self.items.get(&k);
                let current = old.map_or(0, |r| r.version);
                if if_version.is_some_and(|v| v != current) {
                    return Err((id.clone(), current));
                }
                let r = Resource {
                    id: id.clone(),
                    version: index,
                    create_index: old.map_or(index, |r| r.create_index),
                    flags: *flags,
                    spec: spec.clone(),
                    status: old.map(|r| r.status.clone()).unwrap_or_default(),
                };
                let old = self.items.insert(k.clone(), r.clone());
                undo.push(Undo::Item(k, old));
                events.push(Event::Put(r.clone()));
                Ok(OpResult::Put(r))
            }
            Op::Delete { id, if_version } => {
                let k = key(id);
                let current = self.version(&k);
                if if_version.is_some_and(|v| v != current) {
                    return Err((id.clone(), current));
                }
                match self.items.remove(&k) {
                    Some(old) => {
                        undo.push(Undo::Item(k, Some(old)));
                        events.push(Event::Deleted(id.clone()));
                        Ok(OpResult::Deleted(1))
                    }
                    None => Ok(OpResult::Deleted(0)),
                }
            }
            Op::DeletePrefix {
                rtype,
                horde,
                prefix,
                spare,
            } => {
                let gone: Vec<Key> = self
                    .range(rtype, horde, prefix)
                    .map(|r| key(&r.id))
                    .filter(|k| !spare.as_ref().is_some_and(|s| k.2.starts_with(s.as_str())))
                    .collect();
                for k in &gone {
                    if let Some(old) = self.items.remove(k) {
                        events.push(Event::Deleted(old.id.clone()));
                        undo.push(Undo::Item(k.clone(), Some(old)));
                    }
                }
                Ok(OpResult::Deleted(gone.len() as u64))
            }
        }
    }

    fn range<'a>(
        &'a self,
        rtype: &'a str,
        horde: &'a str,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a Resource> + 'a {
        let start = (rtype.to_string(), horde.to_string(), prefix.to_string());
        self.items
            .range(start..)
            .take_while(move |(k, _)| k.0 == rtype && k.1 == horde && k.2.starts_with(prefix))
            .map(|(_, r)| r)
    }

    /// The index of the last change to a resource of `rtype`.
    pub(crate) fn type_index(&self, rtype: &str) -> u64 {
        self.type_index.get(rtype).copied().unwrap_or(0)
    }

    /// Answers `q`.
    pub(crate) fn query(&self, q: &ResourceQuery) -> ReadResult {
        match q {
            ResourceQuery::Get(id) => ReadResult {
                index: self.type_index(&id.rtype),
                items: self.items.get(&key(id)).cloned().into_iter().collect(),
            },
            ResourceQuery::List {
                rtype,
                horde,
                prefix,
            } => ReadResult {
                index: self.type_index(rtype),
                items: self.range(rtype, horde, prefix).cloned().collect(),
            },
            ResourceQuery::Every => ReadResult {
                index: self.type_index.values().copied().max().unwrap_or(0),
                items: self.items.values().cloned().collect(),
            },
        }
    }

    /// The resources `f` selects.
    pub(crate) fn select(&self, f: &Filter) -> Vec<Resource> {
        if f.prefix {
            self.range(&f.rtype, &f.horde, &f.name).cloned().collect()
        } else {
            let id = ResourceId {
                rtype: f.rtype.clone(),
                horde: f.horde.clone(),
                name: f.name.clone(),
            };
            self.items.get(&key(&id)).cloned().into_iter().collect()
        }
    }
}

impl Store {
    /// Applies `txn` through the Raft leader (this node or, forwarded, another) once the
    /// [`registry`] accepts it: `system` lets it write a type's reserved namespace. A refused
    /// transaction ([`StoreError::Invalid`]) was never sent; a failed check is an
    /// [`Outcome::Failed`], with nothing applied.
    ///
    /// The transaction gets an idempotency token (unless it has one): when the leader's answer is
    /// lost ([`StoreError::Unconfirmed`]), it is sent again, up to [`RESENDS_MAX`] times, and
    /// applied at most once; the answer is then definite. Only if every resend is lost too does
    /// this return [`StoreError::Unconfirmed`].
    pub async fn resource_txn(&self, mut txn: Txn, system: bool) -> Result<Outcome, StoreError> {
        registry::check_txn(&txn, system)?;
        while txn.token == 0 {
            txn.token = rand::random();
        }
        let mut resends = 0;
        loop {
            match self.write(Command::Resource(txn.clone())).await {
                Ok(Applied::Resource(o)) => return Ok(o),
                Ok(other) => return Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
                Err(StoreError::Unconfirmed(why)) if resends < RESENDS_MAX => {
                    resends += 1;
                    tracing::debug!(%why, resends, token = txn.token, "resending a write whose answer was lost");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads resources: `consistent`, linearizable (the Raft leader answers once a majority
    /// confirmed it still leads); otherwise from this node's copy, at once, possibly stale.
    pub async fn resource_read(
        &self,
        q: ResourceQuery,
        consistent: bool,
    ) -> Result<ReadResult, StoreError> {
        registry::check_query(&q)?;
        let q = Query::Resource(q);
        let r = if consistent {
            self.read(q).await?
        } else {
            self.local(q)
        };
        match r {
            QueryResult::Resource(r) => Ok(r),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str, if_version: Option<u64>) -> Op {
        Op::Put {
            id: ResourceId::kv("default", k),
            flags: 0,
            spec: v.as_bytes().to_vec(),
            if_version,
        }
    }

    fn txn(ops: Vec<Op>) -> Txn {
        Txn::new(ops)
    }

    fn get(t: &Table, k: &str) -> Option<Resource> {
        t.query(&ResourceQuery::Get(ResourceId::kv("default", k)))
            .items
            .pop()
    }

    #[test]
    fn versions_are_log_indexes_and_create_index_stays() {
        let mut t = Table::default();
        let (o, b) = t.apply(5, &txn(vec![put("a", "1", Some(0))]));
        assert!(matches!(o, Outcome::Applied { index: 5, .. }));
        assert_eq!(b.unwrap().index, 5);
        t.apply(9, &txn(vec![put("a", "2", Some(5))]));
        let r = get(&t, "a").unwrap();
        assert_eq!(
            (r.version, r.create_index, r.spec.as_slice()),
            (9, 5, &b"2"[..])
        );
        assert_eq!(t.type_index("kv"), 9);
    }

    #[test]
    fn cas_conflict_names_the_current_version_and_changes_nothing() {
        let mut t = Table::default();
        t.apply(3, &txn(vec![put("a", "1", None)]));
        let before = t.clone();
        let (o, b) = t.apply(4, &txn(vec![put("a", "2", Some(2))]));
        assert_eq!(
            o,
            Outcome::Failed {
                op: 0,
                id: ResourceId::kv("default", "a"),
                current: 3
            }
        );
        assert!(b.is_none());
        assert_eq!(t, before);
        assert_eq!(t.history().since(0).unwrap().len(), 1);
        // Absent is version 0; delete and re-create never reuses a version.
        let (o, _) = t.apply(
            6,
            &txn(vec![Op::Delete {
                id: ResourceId::kv("default", "a"),
                if_version: Some(3),
            }]),
        );
        assert!(matches!(o, Outcome::Applied { .. }));
        t.apply(7, &txn(vec![put("a", "3", Some(0))]));
        assert_eq!(get(&t, "a").unwrap().create_index, 7);
    }

    #[test]
    fn txn_is_all_or_nothing_and_sees_its_own_writes() {
        let mut t = Table::default();
        t.apply(1, &txn(vec![put("x", "1", None), put("y", "1", None)]));
        let before = t.clone();
        let (o, b) = t.apply(
            2,
            &txn(vec![
                put("z", "new", Some(0)),
                Op::Delete {
                    id: ResourceId::kv("default", "x"),
                    if_version: None,
                },
                Op::Check {
                    id: ResourceId::kv("default", "y"),
                    version: 99,
                },
            ]),
        );
        assert_eq!(
            o,
            Outcome::Failed {
                op: 2,
                id: ResourceId::kv("default", "y"),
                current: 1
            }
        );
        assert!(b.is_none());
        assert_eq!(t, before);
        assert_eq!(t.type_index("kv"), 1);
        // A put then a check of the new version in the same transaction passes.
        let (o, b) = t.apply(
            3,
            &txn(vec![
                put("z", "new", Some(0)),
                Op::Check {
                    id: ResourceId::kv("default", "z"),
                    version: 3,
                },
            ]),
        );
        assert!(matches!(o, Outcome::Applied { index: 3, .. }), "{o:?}");
        assert_eq!(b.unwrap().events.len(), 1);
    }

    #[test]
    fn delete_prefix_spares_the_reserved_names_and_other_hordes() {
        let mut t = Table::default();
        let mut ops: Vec<Op> = ["app/a", "app/b", "apple", "b", "crux/x"]
            .iter()
            .map(|k| put(k, "v", None))
            .collect();
        ops.push(Op::Put {
            id: ResourceId::kv("other", "app/a"),
            flags: 0,
            spec: vec![],
            if_version: None,
        });
        t.apply(1, &txn(ops));
        let (o, b) = t.apply(
            2,
            &txn(vec![Op::DeletePrefix {
                rtype: "kv".into(),
                horde: "default".into(),
                prefix: "app/".into(),
                spare: Some("crux/".into()),
            }]),
        );
        assert!(
            matches!(&o, Outcome::Applied { results, .. } if results == &[OpResult::Deleted(2)])
        );
        assert_eq!(b.unwrap().events.len(), 2);
        let (_, _) = t.apply(
            3,
            &txn(vec![Op::DeletePrefix {
                rtype: "kv".into(),
                horde: "default".into(),
                prefix: "c".into(),
                spare: Some("crux/".into()),
            }]),
        );
        let names: Vec<String> = t
            .query(&ResourceQuery::List {
                rtype: "kv".into(),
                horde: "default".into(),
                prefix: String::new(),
            })
            .items
            .into_iter()
            .map(|r| r.id.name)
            .collect();
        assert_eq!(names, ["apple", "b", "crux/x"]);
        assert!(get(&t, "crux/x").is_some());
        assert_eq!(
            t.query(&ResourceQuery::List {
                rtype: "kv".into(),
                horde: "other".into(),
                prefix: String::new(),
            })
            .items
            .len(),
            1
        );
    }

    #[test]
    fn history_resumes_after_an_index_and_reports_what_it_dropped() {
        let mut t = Table::default();
        for i in 1..=10 {
            t.apply(i * 2, &txn(vec![put("k", &i.to_string(), None)]));
        }
        let after = |t: &Table, i| {
            t.history()
                .since(i)
                .map(|v| v.iter().map(|b| b.index).collect::<Vec<_>>())
        };
        assert_eq!(after(&t, 0), Some((1..=10).map(|i| i * 2).collect()));
        assert_eq!(after(&t, 15), Some(vec![16, 18, 20]));
        assert_eq!(after(&t, 16), Some(vec![18, 20]));
        assert_eq!(after(&t, 20), Some(vec![]));
        assert_eq!(after(&t, 99), Some(vec![]));
        t.reset_history(12);
        assert_eq!(after(&t, 11), None);
        assert_eq!(after(&t, 12), Some(vec![]));
        // Bounded: the oldest batches go, and the floor rises with them.
        let mut t = Table::default();
        let n = HISTORY_BATCHES_MAX as u64 + 5;
        for i in 1..=n {
            t.apply(i, &txn(vec![put("k", "v", None)]));
        }
        assert_eq!(t.history().floor(), 5);
        assert_eq!(after(&t, 4), None);
        assert_eq!(after(&t, 5).unwrap().len(), HISTORY_BATCHES_MAX);
    }

    #[test]
    fn a_token_is_applied_once_and_remembered_by_snapshots() {
        let mut t = Table::default();
        let mut w = txn(vec![put("a", "1", Some(0))]);
        w.token = 77;
        let (first, b) = t.apply(3, &w);
        assert!(matches!(first, Outcome::Applied { index: 3, .. }));
        assert!(b.is_some());
        // Resent (its answer was lost): the first answer, nothing applied again, though a
        // compare-and-swap on absence would now fail.
        let before = t.clone();
        let (again, b) = t.apply(5, &w);
        assert_eq!(again, first);
        assert!(b.is_none());
        assert_eq!(t, before);
        assert_eq!(get(&t, "a").unwrap().version, 3);
        // Kept by snapshots: a new leader that installed one still knows it.
        let back = Table::from_file(
            serde_json::from_slice(&serde_json::to_vec(&t.to_file()).unwrap()).unwrap(),
            5,
        );
        let mut back = back;
        assert_eq!(back.apply(6, &w).0, first);
        // Another token is another write.
        w.token = 78;
        assert!(matches!(
            t.apply(7, &w).0,
            Outcome::Failed { current: 3, .. }
        ));
        // Bounded.
        for i in 0..TOKENS_MAX as u64 + 1 {
            let mut x = txn(vec![put("b", "v", None)]);
            x.token = 1000 + i;
            t.apply(10 + i, &x);
        }
        assert_eq!(t.tokens.len(), TOKENS_MAX);
        assert_eq!(t.token_index.len(), TOKENS_MAX);
        assert!(!t.token_index.contains_key(&77));
    }

    #[test]
    fn snapshot_form_round_trips_and_keeps_bytes() {
        let mut t = Table::default();
        t.apply(
            4,
            &txn(vec![Op::Put {
                id: ResourceId::kv("default", "bin"),
                flags: 7,
                spec: vec![0, 255, 10, 13],
                if_version: None,
            }]),
        );
        let json = serde_json::to_vec(&t.to_file()).unwrap();
        let back = Table::from_file(serde_json::from_slice(&json).unwrap(), 4);
        assert_eq!(back, t);
        assert_eq!(back.history().floor(), 4);
        assert_eq!(get(&back, "bin").unwrap().spec, vec![0, 255, 10, 13]);
    }
}
