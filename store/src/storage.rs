//! The durable part: the Raft log, the vote, the committed index and the latest snapshot in one
//! redb database (`store.redb` in the data dir); the state machine itself in memory, rebuilt on
//! open from the snapshot (openraft then re-applies the committed log after it).

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::broadcast;

use crate::disk::Disk;
use crate::resource::Feed;
use crate::types::{Applied, Change, Data};
use crate::TypeConfig;

type SE = StorageError<u64>;

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(crate) const VOTE: &str = "vote";
pub(crate) const COMMITTED: &str = "committed";
pub(crate) const PURGED: &str = "purged";
pub(crate) const SNAPSHOT_META: &str = "snapshot_meta";
pub(crate) const SNAPSHOT_DATA: &str = "snapshot_data";

fn any(e: impl std::fmt::Display) -> AnyError {
    AnyError::error(e.to_string())
}

/// Opens (or creates) the database, waiting up to `wait` for a previous owner in this process to
/// let go of it (openraft's tasks drop their handles shortly after a shutdown).
pub(crate) async fn open_db(path: &Path, wait: Duration) -> Result<Arc<Database>, String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let p = path.to_path_buf();
        let r = tokio::task::spawn_blocking(move || Database::create(p))
            .await
            .map_err(|e| e.to_string())?;
        match r {
            Ok(db) => {
                // The tables are made by the first open only: an existing store opens without a
                // write, so it opens on a disk with no room left (and serves reads).
                let made = db
                    .begin_read()
                    .is_ok_and(|tx| tx.open_table(LOG).is_ok() && tx.open_table(META).is_ok());
                if !made {
                    let tx = db.begin_write().map_err(|e| e.to_string())?;
                    tx.open_table(LOG).map_err(|e| e.to_string())?;
                    tx.open_table(META).map_err(|e| e.to_string())?;
                    tx.commit().map_err(|e| e.to_string())?;
                }
                return Ok(Arc::new(db));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

fn get_meta<T: DeserializeOwned>(db: &Database, key: &str) -> Result<Option<T>, AnyError> {
    let tx = db.begin_read().map_err(any)?;
    let t = tx.open_table(META).map_err(any)?;
    match t.get(key).map_err(any)? {
        Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(any)?)),
        None => Ok(None),
    }
}

/// Writes `rows` into META in one transaction; `durable`: fsynced before returning.
async fn put_meta(
    db: &Arc<Database>,
    disk: &Arc<Disk>,
    rows: Vec<(&'static str, Vec<u8>)>,
    durable: bool,
) -> Result<(), AnyError> {
    let (db, disk) = (db.clone(), disk.clone());
    tokio::task::spawn_blocking(move || {
        let mut tx = db.begin_write().map_err(|e| disk.write_failed(e))?;
        if !durable {
            tx.set_durability(Durability::None);
        }
        {
            let mut t = tx.open_table(META).map_err(|e| disk.write_failed(e))?;
            for (k, v) in &rows {
                t.insert(*k, v.as_slice())
                    .map_err(|e| disk.write_failed(e))?;
            }
        }
        tx.commit().map_err(|e| disk.write_failed(e))
    })
    .await
    .map_err(any)?
}

pub(crate) fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("openraft's types serialize")
}

/// The Raft log and vote.
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    disk: Arc<Disk>,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>, disk: Arc<Disk>) -> LogStore {
        LogStore { db, disk }
    }

    /// Deletes the entries in `range` and, when given, records `purged`, durably.
    async fn delete(
        &self,
        range: (Bound<u64>, Bound<u64>),
        purged: Option<LogId<u64>>,
    ) -> Result<(), AnyError> {
        let (db, disk) = (self.db.clone(), self.disk.clone());
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(|e| disk.write_failed(e))?;
            {
                let mut t = tx.open_table(LOG).map_err(|e| disk.write_failed(e))?;
                t.retain_in(range, |_, _| false)
                    .map_err(|e| disk.write_failed(e))?;
                if let Some(p) = purged {
                    let mut m = tx.open_table(META).map_err(|e| disk.write_failed(e))?;
                    m.insert(PURGED, json(&p).as_slice())
                        .map_err(|e| disk.write_failed(e))?;
                }
            }
            tx.commit().map_err(|e| disk.write_failed(e))
        })
        .await
        .map_err(any)?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SE> {
        let read = || -> Result<Vec<Entry<TypeConfig>>, AnyError> {
            let tx = self.db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let mut out = Vec::new();
            for row in t.range(range.clone()).map_err(any)? {
                let (_, v) = row.map_err(any)?;
                out.push(serde_json::from_slice(v.value()).map_err(any)?);
            }
            Ok(out)
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let read = || -> Result<LogState<TypeConfig>, AnyError> {
            let purged: Option<LogId<u64>> = get_meta(&self.db, PURGED)?;
            let tx = self.db.begin_read().map_err(any)?;
            let t = tx.open_table(LOG).map_err(any)?;
            let last = match t.last().map_err(any)? {
                Some((_, v)) => {
                    let e: Entry<TypeConfig> = serde_json::from_slice(v.value()).map_err(any)?;
                    Some(e.log_id)
                }
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        };
        read().map_err(|e| StorageIOError::read_logs(e).into())
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), SE> {
        put_meta(&self.db, &self.disk, vec![(VOTE, json(vote))], true)
            .await
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SE> {
        get_meta(&self.db, VOTE).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SE> {
        // Not fsynced on its own: the next durable commit (a log append or a vote) carries it. A
        // committed index lost in a crash only means fewer entries are re-applied at open; the
        // leader tells the rest. For that reason it is not written at all while the disk is
        // below the store's reserve: a write that fails there would stop this Raft node (see
        // `crate::disk`), for a record openraft can do without.
        if !self.disk.has_reserve() {
            return Ok(());
        }
        put_meta(
            &self.db,
            &self.disk,
            vec![(COMMITTED, json(&committed))],
            false,
        )
        .await
        .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SE> {
        Ok(get_meta::<Option<LogId<u64>>>(&self.db, COMMITTED)
            .map_err(StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, json(&e)))
            .collect();
        let (db, disk) = (self.db.clone(), self.disk.clone());
        let r = tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(|e| disk.write_failed(e))?;
            {
                let mut t = tx.open_table(LOG).map_err(|e| disk.write_failed(e))?;
                for (i, v) in &rows {
                    t.insert(*i, v.as_slice())
                        .map_err(|e| disk.write_failed(e))?;
                }
            }
            // Durability::Immediate (the default): fsynced when commit returns.
            tx.commit().map_err(|e| disk.write_failed(e))
        })
        .await
        .map_err(any)
        .and_then(|r| r);
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), SE> {
        self.delete((Bound::Included(log_id.index), Bound::Unbounded), None)
            .await
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), SE> {
        self.delete(
            (Bound::Unbounded, Bound::Included(log_id.index)),
            Some(log_id),
        )
        .await
        .map_err(|e| StorageIOError::write_logs(e).into())
    }
}

/// The in-memory state machine, shared with the [`crate::Store`] for local reads.
pub(crate) struct SmState {
    pub(crate) last_applied: Option<LogId<u64>>,
    pub(crate) membership: StoredMembership<u64, BasicNode>,
    pub(crate) data: Data,
}

/// What the state machine and the store share.
pub(crate) struct Shared {
    pub(crate) state: RwLock<SmState>,
    pub(crate) changes: broadcast::Sender<Change>,
    /// What the resource path applies ([`crate::resource::watch`]).
    pub(crate) resources: broadcast::Sender<Feed>,
}

impl Shared {
    /// The group's id, as this state machine knows it.
    pub(crate) fn group(&self) -> Option<u64> {
        self.state.read().expect("state lock").data.group()
    }

    /// The group this one was merged into, if sealed.
    pub(crate) fn sealed(&self) -> Option<u64> {
        self.state.read().expect("state lock").data.sealed()
    }
}

/// The state machine: in memory, with its snapshots in the database.
#[derive(Clone)]
pub(crate) struct SmStore {
    db: Arc<Database>,
    disk: Arc<Disk>,
    shared: Arc<Shared>,
    node: u64,
    built: Arc<AtomicU64>,
}

impl SmStore {
    /// Loads the latest snapshot, if any, into a new state machine.
    #[cfg(test)]
    pub(crate) fn open(db: Arc<Database>, node: u64) -> Result<SmStore, String> {
        let disk = Disk::new(Path::new("."), 0, 0);
        SmStore::open_with(
            db,
            disk,
            node,
            broadcast::channel(1024).0,
            broadcast::channel(16).0,
        )
    }

    /// As [`SmStore::open`], announcing what it applies on `changes` and `resources` (which
    /// outlive it when the store replaces its Raft node).
    pub(crate) fn open_with(
        db: Arc<Database>,
        disk: Arc<Disk>,
        node: u64,
        changes: broadcast::Sender<Change>,
        resources: broadcast::Sender<Feed>,
    ) -> Result<SmStore, String> {
        let (state, _) = match load_snapshot(&db).map_err(|e| e.to_string())? {
            Some((meta, bytes)) => (
                SmState {
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                    data: {
                        let mut d =
                            Data::from_bytes(&bytes).map_err(|e| format!("snapshot: {e}"))?;
                        d.resources
                            .reset_history(meta.last_log_id.map_or(0, |l| l.index));
                        d
                    },
                },
                Some(meta),
            ),
            None => (
                SmState {
                    last_applied: None,
                    membership: StoredMembership::default(),
                    data: Data::default(),
                },
                None,
            ),
        };
        Ok(SmStore {
            db,
            disk,
            shared: Arc::new(Shared {
                state: RwLock::new(state),
                changes,
                resources,
            }),
            node,
            built: Arc::new(AtomicU64::new(0)),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    async fn save_snapshot(
        &self,
        meta: &SnapshotMeta<u64, BasicNode>,
        bytes: Vec<u8>,
    ) -> Result<(), AnyError> {
        put_meta(
            &self.db,
            &self.disk,
            vec![(SNAPSHOT_META, json(meta)), (SNAPSHOT_DATA, bytes)],
            true,
        )
        .await
    }
}

type SnapMeta = SnapshotMeta<u64, BasicNode>;

fn load_snapshot(db: &Database) -> Result<Option<(SnapMeta, Vec<u8>)>, AnyError> {
    let Some(meta) = get_meta::<SnapMeta>(db, SNAPSHOT_META)? else {
        return Ok(None);
    };
    let tx = db.begin_read().map_err(any)?;
    let t = tx.open_table(META).map_err(any)?;
    let bytes = t
        .get(SNAPSHOT_DATA)
        .map_err(any)?
        .map(|v| v.value().to_vec())
        .ok_or_else(|| AnyError::error("snapshot metadata without data"))?;
    Ok(Some((meta, bytes)))
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SE> {
        let (meta, bytes) = {
            let st = self.shared.state.read().expect("state lock");
            let n = self.built.fetch_add(1, Ordering::Relaxed);
            let id = match st.last_applied {
                Some(l) => format!("{:016x}-{}-{}-{n}", self.node, l.leader_id.term, l.index),
                None => format!("{:016x}-0-0-{n}", self.node),
            };
            (
                SnapshotMeta {
                    last_log_id: st.last_applied,
                    last_membership: st.membership.clone(),
                    snapshot_id: id,
                },
                st.data.to_bytes(),
            )
        };
        self.save_snapshot(&meta, bytes.clone())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = SmStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), SE> {
        let st = self.shared.state.read().expect("state lock");
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, SE>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.shared.state.write().expect("state lock");
        let mut out = Vec::new();
        for e in entries {
            st.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied::Ok),
                EntryPayload::Normal(cmd) => {
                    // Announced while the state lock is held: a watcher lists and subscribes
                    // under the same lock, so it misses nothing and sees nothing twice.
                    let (a, changes, batch) = st.data.apply_at(e.log_id.index, &cmd);
                    for c in changes {
                        let _ = self.shared.changes.send(c);
                    }
                    if let Some(b) = batch {
                        let _ = self.shared.resources.send(Feed::Batch(b));
                    }
                    out.push(a);
                }
                EntryPayload::Membership(m) => {
                    st.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::Ok);
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SmStore {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SE> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SE> {
        let bytes = snapshot.into_inner();
        let data = Data::from_bytes(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), any(e)))?;
        self.save_snapshot(meta, bytes)
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        let mut st = self.shared.state.write().expect("state lock");
        st.last_applied = meta.last_log_id;
        st.membership = meta.last_membership.clone();
        st.data = data;
        st.data
            .resources
            .reset_history(meta.last_log_id.map_or(0, |l| l.index));
        let _ = self.shared.changes.send(Change::Reset);
        let _ = self.shared.resources.send(Feed::Reset);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        let loaded = load_snapshot(&self.db).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(loaded.map(|(meta, bytes)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, SmStore, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, SmStore), SE> {
            let dir = tempfile::tempdir().expect("temp dir");
            let db = open_db(&dir.path().join("store.redb"), Duration::from_secs(1))
                .await
                .expect("db");
            let sm = SmStore::open(db.clone(), 0).expect("state machine");
            Ok((dir, LogStore::new(db, Disk::new(Path::new("."), 0, 0)), sm))
        }
    }

    /// openraft's own conformance suite for log stores and state machines.
    #[test]
    fn openraft_suite() {
        Suite::test_all(Builder).unwrap();
    }

    /// The log, vote, committed index and snapshot survive a reopen.
    #[tokio::test(flavor = "multi_thread")]
    async fn reopen_recovers() {
        use openraft::storage::RaftLogStorageExt;
        use openraft::CommittedLeaderId;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let log_id = |t, i| LogId::new(CommittedLeaderId::new(t, 1), i);
        let entry = |t, i, cmd| Entry::<TypeConfig> {
            log_id: log_id(t, i),
            payload: EntryPayload::Normal(cmd),
        };
        let put = |k: &str| crate::Command::DocPut {
            key: k.into(),
            value: "v".into(),
            if_generation: None,
        };
        {
            let db = open_db(&path, Duration::from_secs(1)).await.unwrap();
            let mut logs = LogStore::new(db.clone(), Disk::new(&path, 1, 0));
            let mut sm = SmStore::open(db, 1).unwrap();
            logs.save_vote(&Vote::new(3, 1)).await.unwrap();
            logs.blocking_append(vec![
                entry(1, 1, put("a")),
                entry(1, 2, put("b")),
                entry(1, 3, put("c")),
            ])
            .await
            .unwrap();
            logs.truncate(log_id(1, 3)).await.unwrap();
            let e12 = logs.try_get_log_entries(1..3).await.unwrap();
            assert_eq!(e12.len(), 2);
            sm.apply(e12).await.unwrap();
            let mut b = sm.get_snapshot_builder().await;
            b.build_snapshot().await.unwrap();
            logs.purge(log_id(1, 1)).await.unwrap();
            logs.save_committed(Some(log_id(1, 2))).await.unwrap();
            // Make the non-durable committed index durable, as the next append would.
            logs.save_vote(&Vote::new(3, 1)).await.unwrap();
        }
        let db = open_db(&path, Duration::from_secs(5)).await.unwrap();
        let mut logs = LogStore::new(db.clone(), Disk::new(&path, 1, 0));
        let mut sm = SmStore::open(db, 1).unwrap();
        assert_eq!(logs.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        assert_eq!(logs.read_committed().await.unwrap(), Some(log_id(1, 2)));
        let st = logs.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id, Some(log_id(1, 1)));
        assert_eq!(st.last_log_id, Some(log_id(1, 2)));
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(1, 2)));
        assert!(sm.get_current_snapshot().await.unwrap().is_some());
        let st = sm.shared.state.read().unwrap();
        assert_eq!(
            st.data.query(&crate::Query::DocList {
                prefix: String::new()
            }),
            crate::QueryResult::Docs(vec![
                ("a".into(), "v".into(), 1),
                ("b".into(), "v".into(), 2)
            ])
        );
    }
}
