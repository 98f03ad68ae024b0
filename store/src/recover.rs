//! Offline recovery for when a majority of the voters is gone for good (`crux store recover`).
//!
//! Raft cannot make progress without a majority of its voters, and nothing online can safely
//! decide that the missing ones will never come back. The operator decides, and runs this on one
//! survivor while its agent is stopped:
//!
//! ```text
//!   survivor's store.redb                      rewritten store.redb
//!   ┌──────────────────────────────┐           ┌───────────────────────────────────────┐
//!   │ snapshot (up to S)           │  replay   │ snapshot up to L: the same data,      │
//!   │ log S+1 .. L  (any term)     │ ───────▶  │ membership {this node} as sole voter  │
//!   │ vote (term t), committed C   │           │ log empty (purged up to L)            │
//!   │ membership {a, b, this, …}   │           │ vote (max(t, term of L) + 1), C = L   │
//!   └──────────────────────────────┘           └───────────────────────────────────────┘
//! ```
//!
//! Everything up to the node's **last log entry** is kept, also entries the lost majority may
//! never have committed (a write whose caller got an error or a timeout may so turn out applied;
//! none that was confirmed is lost, since a confirmed write is in the log of every voter of the
//! majority that confirmed it, and so on this survivor if it is the most advanced one). That is
//! why the survivor to recover is the one with the highest `(last log term, last log index)`:
//! `--dry-run` prints them on each without writing anything.
//!
//! The rewrite keeps openraft's invariants: the snapshot's last log id is the last log id, the log
//! is purged up to it (so its last log id is still that one), the committed and applied indexes
//! are that id, and the new membership is stored in the snapshot, tagged with that id. At its next
//! start the node is the only voter, elects itself in a term above any it saw, and its log goes on
//! from there; new members receive the snapshot. Every other node that still holds the old
//! group's data must be wiped ([`discard`]) before it starts again, or it would still count the
//! old voters: it then joins the recovered group as an empty node (a learner, then maybe a voter).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use openraft::{
    BasicNode, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote,
};
use redb::{Database, ReadableTable};
use serde::{Deserialize, Serialize};

use crate::storage::{json, COMMITTED, LOG, META, PURGED, SNAPSHOT_DATA, SNAPSHOT_META, VOTE};
use crate::types::Data;
use crate::{Member, Query, QueryResult, StoreError, TypeConfig};

/// The database file in a store's directory.
pub const DB_FILE: &str = "store.redb";

/// The marker [`discard`] leaves in the new, empty store directory: this node must join an
/// existing group and never start one of its own (see [`crate::Store::initialize`]). Removed once
/// the node is in a group ([`crate::Store::clear_join_only`]).
pub const JOIN_ONLY_FILE: &str = "join-only";

/// What a store holds (what [`recover`] keeps, or what [`discard`] set aside).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The node whose store this is.
    pub node: u64,
    /// The term of its last log entry.
    pub last_log_term: u64,
    /// The index of its last log entry (everything up to it is kept).
    pub last_log_index: u64,
    /// The committed index it had recorded (entries after it are kept too, see the module doc).
    pub committed_index: Option<u64>,
    /// The highest term it had voted in.
    pub vote_term: u64,
    /// How many log entries after the last snapshot were replayed into the new one.
    pub replayed_entries: u64,
    /// How many muster entries the state holds.
    pub muster_entries: usize,
    /// Every document, with its generation.
    pub documents: Vec<(String, u64)>,
    /// The voters of the old group (this node included, if it was one).
    pub old_voters: Vec<Member>,
    /// The learners of the old group.
    pub old_learners: Vec<Member>,
    /// The members dropped: every old voter and learner but this node.
    pub dropped: Vec<Member>,
    /// Where this node is reached in the new group.
    pub netid: SocketAddr,
    /// The term its vote is set to (it elects itself in the next one).
    pub new_term: u64,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// Opens the database of the store in `dir` for this process alone; a clear error when there is
/// none, or when an agent still has it open.
fn open(dir: &Path) -> Result<Database, StoreError> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Err(StoreError::Invalid(format!(
            "{}: no store here (is this the agent's data dir?); nothing was changed",
            path.display()
        )));
    }
    Database::open(&path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Invalid(format!(
            "{}: the store is in use: stop the agent first; nothing was changed",
            path.display()
        )),
        e => StoreError::Storage(format!("{}: {e}", path.display())),
    })
}

fn meta<T: serde::de::DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, StoreError> {
    let tx = db.begin_read().map_err(io)?;
    let t = tx.open_table(META).map_err(io)?;
    match t.get(key).map_err(io)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(io)?)),
        None => Ok(None),
    }
}

fn member(m: &Membership<u64, BasicNode>, id: u64) -> Option<Member> {
    Some(Member {
        id,
        netid: m.get_node(&id)?.addr.parse().ok()?,
    })
}

/// The state rebuilt from a store: data, membership, last log id, what it reports.
struct Read {
    data: Data,
    last: LogId<u64>,
    report: Recovery,
}

fn read(db: &Database, node: u64, netid: Option<SocketAddr>) -> Result<Read, StoreError> {
    let snapshot = {
        let meta: Option<SnapshotMeta<u64, BasicNode>> = meta(db, SNAPSHOT_META)?;
        match meta {
            Some(m) => {
                let tx = db.begin_read().map_err(io)?;
                let t = tx.open_table(META).map_err(io)?;
                let bytes = t
                    .get(SNAPSHOT_DATA)
                    .map_err(io)?
                    .map(|v| v.value().to_vec())
                    .ok_or_else(|| io("snapshot metadata without data"))?;
                Some((m, bytes))
            }
            None => None,
        }
    };
    let (mut data, mut membership, mut last) = match &snapshot {
        Some((m, bytes)) => (
            Data::from_bytes(bytes).map_err(|e| io(format!("snapshot: {e}")))?,
            m.last_membership.membership().clone(),
            m.last_log_id,
        ),
        None => (Data::default(), Membership::default(), None),
    };
    let purged: Option<LogId<u64>> = meta(db, PURGED)?;
    last = last.max(purged);
    let mut replayed = 0u64;
    {
        let tx = db.begin_read().map_err(io)?;
        let t = tx.open_table(LOG).map_err(io)?;
        for row in t.iter().map_err(io)? {
            let (_, v) = row.map_err(io)?;
            let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(io)?;
            if Some(e.log_id) <= last {
                continue;
            }
            if let Some(l) = last {
                if e.log_id.index != l.index + 1 {
                    return Err(io(format!(
                        "the log jumps from index {} to {}: the store is damaged",
                        l.index, e.log_id.index
                    )));
                }
            }
            match &e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(cmd) => {
                    data.apply_at(e.log_id.index, cmd);
                }
                EntryPayload::Membership(m) => membership = m.clone(),
            }
            last = Some(e.log_id);
            replayed += 1;
        }
    }
    let Some(last) = last else {
        return Err(StoreError::Invalid(
            "this store holds nothing (its group was never initialized): nothing to recover; \
             nothing was changed"
                .into(),
        ));
    };
    let vote: Vote<u64> = meta(db, VOTE)?.unwrap_or_default();
    let committed: Option<LogId<u64>> = meta::<Option<LogId<u64>>>(db, COMMITTED)?.flatten();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let old_voters: Vec<Member> = voters
        .iter()
        .filter_map(|id| member(&membership, *id))
        .collect();
    let old_learners: Vec<Member> = learners
        .iter()
        .filter_map(|id| member(&membership, *id))
        .collect();
    let netid = match netid.or_else(|| member(&membership, node).map(|m| m.netid)) {
        Some(a) => a,
        None => {
            return Err(StoreError::Invalid(format!(
                "node {node:016x} is not a member of the group this store knows, so its address \
                 is unknown: give the agent's config (--config); nothing was changed"
            )))
        }
    };
    let muster_entries = match data.query(&Query::MusterSearch {
        horde: None,
        api: None,
        inst: None,
    }) {
        QueryResult::Muster(v) => v.len(),
        _ => 0,
    };
    let documents = match data.query(&Query::DocList {
        prefix: String::new(),
    }) {
        QueryResult::Docs(v) => v.into_iter().map(|(k, _, g)| (k, g)).collect(),
        _ => Vec::new(),
    };
    let dropped = old_voters
        .iter()
        .chain(old_learners.iter())
        .filter(|m| m.id != node)
        .copied()
        .collect();
    let new_term = vote.leader_id.term.max(last.leader_id.term) + 1;
    let report = Recovery {
        node,
        last_log_term: last.leader_id.term,
        last_log_index: last.index,
        committed_index: committed.map(|c| c.index),
        vote_term: vote.leader_id.term,
        replayed_entries: replayed,
        muster_entries,
        documents,
        old_voters,
        old_learners,
        dropped,
        netid,
        new_term,
    };
    Ok(Read { data, last, report })
}

/// What the store in `dir` of node `node` holds, without changing anything (`--dry-run`).
pub fn inspect(dir: &Path, node: u64, netid: Option<SocketAddr>) -> Result<Recovery, StoreError> {
    let db = open(dir)?;
    read(&db, node, netid).map(|r| r.report)
}

/// Rewrites the store in `dir` (its agent stopped) so that node `node`, reached at `netid` (or at
/// the address the old group knew it by), is the only voter of a group that keeps every entry
/// up to its last log entry; see the module doc. One durable transaction: on any error nothing
/// was changed.
pub fn recover(dir: &Path, node: u64, netid: Option<SocketAddr>) -> Result<Recovery, StoreError> {
    let db = open(dir)?;
    let r = read(&db, node, netid)?;
    let me = BasicNode {
        addr: r.report.netid.to_string(),
    };
    let alone = Membership::new(vec![BTreeSet::from([node])], BTreeMap::from([(node, me)]));
    let snap = SnapshotMeta {
        last_log_id: Some(r.last),
        last_membership: StoredMembership::new(Some(r.last), alone),
        snapshot_id: format!(
            "{node:016x}-recovered-{}-{}",
            r.last.leader_id.term, r.last.index
        ),
    };
    let vote = Vote::new(r.report.new_term, node);
    let tx = db.begin_write().map_err(io)?;
    {
        let mut log = tx.open_table(LOG).map_err(io)?;
        log.retain(|_, _| false).map_err(io)?;
        let mut m = tx.open_table(META).map_err(io)?;
        m.insert(SNAPSHOT_META, json(&snap).as_slice())
            .map_err(io)?;
        m.insert(SNAPSHOT_DATA, r.data.to_bytes().as_slice())
            .map_err(io)?;
        m.insert(PURGED, json(&r.last).as_slice()).map_err(io)?;
        m.insert(COMMITTED, json(&Some(r.last)).as_slice())
            .map_err(io)?;
        m.insert(VOTE, json(&vote).as_slice()).map_err(io)?;
    }
    // Durability::Immediate (the default): fsynced when commit returns.
    tx.commit().map_err(io)?;
    Ok(r.report)
}

/// Renames the store in `dir` to `<dir>.<suffix>` (kept for the operator to delete) and makes a
/// new `dir` holding only the [`JOIN_ONLY_FILE`] marker, which says `why`. Where the old store
/// now is.
pub(crate) fn set_aside(dir: &Path, suffix: &str, why: &str) -> Result<PathBuf, StoreError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let aside = dir.with_file_name(format!("{name}.{suffix}"));
    std::fs::rename(dir, &aside).map_err(|e| {
        io(format!(
            "renaming {} to {}: {e}",
            dir.display(),
            aside.display()
        ))
    })?;
    std::fs::create_dir_all(dir).map_err(|e| io(format!("{}: {e}", dir.display())))?;
    std::fs::write(dir.join(JOIN_ONLY_FILE), why)
        .map_err(|e| io(format!("{}: {e}", dir.join(JOIN_ONLY_FILE).display())))?;
    Ok(aside)
}

/// Sets aside the store in `dir` (its agent stopped) so that the node joins the recovered group
/// as an empty node: the directory is renamed to `<dir>.discarded-<unix ms>` (kept for the
/// operator to delete), and a new one holds only the [`JOIN_ONLY_FILE`] marker. Returns what the
/// old store held and where it now is.
pub fn discard(dir: &Path, node: u64) -> Result<(Option<Recovery>, PathBuf), StoreError> {
    let held = {
        let db = open(dir)?;
        // A store whose group never started (or whose address is unknown) is set aside too.
        read(&db, node, Some(SocketAddr::from(([0, 0, 0, 0], 0))))
            .ok()
            .map(|r| r.report)
    };
    let aside = set_aside(
        dir,
        &format!("discarded-{}", crate::now_ms()),
        "this node's store was discarded by `crux store recover --discard`: it joins an existing \
         group and never starts one\n",
    )?;
    Ok((held, aside))
}
