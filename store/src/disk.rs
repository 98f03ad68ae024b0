//! Disk trouble: a full filesystem under the store's directory.
//!
//! * **Classified.** A write the filesystem refuses for lack of room (ENOSPC, or EDQUOT: over a
//!   quota) is told apart from other I/O errors ([`is_full`]) in every redb error it comes
//!   wrapped in ([`Fault`]), counted ([`DiskStats`]) and reported to the caller as
//!   [`StoreError::DiskFull`] (`disk full: <dir>`), a gRPC `RESOURCE_EXHAUSTED`.
//! * **Refused before it breaks anything.** The leader checks the room left ([`Disk::room`])
//!   before it appends a client write: below [`RESERVE_BYTES`] free (or after a write failed for
//!   lack of room and no probe has succeeded since) it refuses with
//!   [`StoreError::DiskFull`] and appends nothing. The reserve keeps room for what Raft must
//!   still write with no client asking (votes; the committed index, which Raft can do without,
//!   is not written at all below the reserve), so a leader on a full disk keeps its followers
//!   and keeps answering consistent reads. If enough of the other voters have room to commit
//!   without it, the refusing leader hands the lead over ([`Store::hand_over`]): one node's full
//!   disk does not stop the group's writes.
//! * **Named when others lack room.** A leader whose write a majority did not confirm asks the
//!   voters ([`Store::voters_out_of_room`], from [`crate::StoreStatus::disk_full`]): when too
//!   many have no room, the write fails with [`StoreError::DiskFull`] naming one of them rather
//!   than a bare "no quorum".
//! * **Recovered without a restart.** A storage error the Raft node cannot avoid (a follower's
//!   append on a full disk, a race with whatever fills the disk) stops that node's Raft core
//!   (openraft treats every storage error as fatal) and poisons the redb handle. [`watch`]
//!   notices, waits until the directory has room again ([`Disk::probe`]: the reserve is free
//!   and a small file can be written and fsynced), and reopens the database and a new Raft node
//!   behind the same [`Store`] handle; the node then catches up from its leader. Nothing
//!   acknowledged is lost: redb's failed commit never became durable, and openraft was told
//!   so before anything depended on it. The in-memory state machine keeps answering local reads
//!   meanwhile.

use std::fmt::Display;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::error::Fatal;
use openraft::AnyError;
use tracing::{info, warn};

use crate::{Slot, Store, StoreError};

/// Free bytes the store keeps under its directory: below this, client writes are refused. A
/// vote or a committed index is a redb commit of a few pages; 1 MiB leaves room for hundreds.
pub const RESERVE_BYTES: u64 = 1 << 20;

/// The size of the probe file written to tell whether room came back (the filesystem may
/// report free blocks that a quota still refuses).
const PROBE_BYTES: usize = 64 << 10;

/// The probe file, in the store's directory (removed right after).
const PROBE_FILE: &str = ".space-probe";

/// How often [`watch`] looks for room while a Raft node is stopped by a storage error, at
/// first; doubled after every failed reopen, up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// A reopened node that runs this long without stopping again is reopened at once the next
/// time (RETRY_MIN after room is back).
const STABLE: Duration = Duration::from_secs(60);

/// Whether `e` says the filesystem has no room for the write: ENOSPC (28) or EDQUOT (122).
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28 | 122))
}

/// `n` bytes, for people: "0 B", "512 KiB", "1 MiB", "2.5 GiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What kind of failure a redb error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The filesystem had no room.
    Full,
    /// An earlier I/O error poisoned the database handle: it must be reopened.
    Poisoned,
    /// Anything else.
    Other,
}

fn kind_of_storage(e: &redb::StorageError) -> Kind {
    match e {
        redb::StorageError::Io(io) if is_full(io) => Kind::Full,
        redb::StorageError::PreviousIo => Kind::Poisoned,
        _ => Kind::Other,
    }
}

/// A redb error, told apart by [`Kind`].
pub(crate) trait Fault: Display {
    /// Its kind.
    fn kind(&self) -> Kind;
}

impl Fault for redb::StorageError {
    fn kind(&self) -> Kind {
        kind_of_storage(self)
    }
}

impl Fault for redb::CommitError {
    fn kind(&self) -> Kind {
        match self {
            redb::CommitError::Storage(e) => kind_of_storage(e),
            _ => Kind::Other,
        }
    }
}

impl Fault for redb::TransactionError {
    fn kind(&self) -> Kind {
        match self {
            redb::TransactionError::Storage(e) => kind_of_storage(e),
            _ => Kind::Other,
        }
    }
}

impl Fault for redb::TableError {
    fn kind(&self) -> Kind {
        match self {
            redb::TableError::Storage(e) => kind_of_storage(e),
            _ => Kind::Other,
        }
    }
}

impl Fault for io::Error {
    fn kind(&self) -> Kind {
        if is_full(self) {
            Kind::Full
        } else {
            Kind::Other
        }
    }
}

/// The store's counters of disk trouble (for `/metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes that failed or were refused for lack of room.
    pub disk_full: u64,
    /// Writes that failed with another I/O error.
    pub io: u64,
    /// Whether the store refuses writes for lack of room now (as of the last write or check).
    pub full: bool,
    /// How many times the Raft node was reopened after a storage error stopped it.
    pub reopened: u64,
}

/// The disk under one store's directory: its room, and what went wrong on it.
#[derive(Debug)]
pub(crate) struct Disk {
    dir: PathBuf,
    /// This node's id, named in the errors (a write forwarded to the leader fails on its disk).
    node: u64,
    reserve: u64,
    /// A write failed for lack of room, and no probe has found room since.
    full: AtomicBool,
    /// The last storage error stopped the Raft node, and was a lack of room.
    stopped_full: AtomicBool,
    disk_full: AtomicU64,
    io: AtomicU64,
    reopened: AtomicU64,
    /// A [`Store::hand_over`] runs.
    handing_over: AtomicBool,
}

impl Disk {
    pub(crate) fn new(dir: &Path, node: u64, reserve: u64) -> Arc<Disk> {
        Arc::new(Disk {
            dir: dir.to_path_buf(),
            node,
            reserve,
            full: AtomicBool::new(false),
            stopped_full: AtomicBool::new(false),
            disk_full: AtomicU64::new(0),
            io: AtomicU64::new(0),
            reopened: AtomicU64::new(0),
            handing_over: AtomicBool::new(false),
        })
    }

    /// Records a failed write (a redb or I/O error) and returns it as openraft's error, saying
    /// `disk full: <dir>` when the filesystem had no room.
    pub(crate) fn write_failed(&self, e: impl Fault) -> AnyError {
        match e.kind() {
            Kind::Full => {
                self.full.store(true, Ordering::SeqCst);
                self.stopped_full.store(true, Ordering::SeqCst);
                self.disk_full.fetch_add(1, Ordering::Relaxed);
                warn!(dir = %self.dir.display(), error = %e, "store write failed: disk full");
                AnyError::error(format!("disk full: {}: {e}", self.dir.display()))
            }
            // The handle is poisoned by an earlier failure, already counted.
            Kind::Poisoned => AnyError::error(e.to_string()),
            Kind::Other => {
                self.stopped_full.store(false, Ordering::SeqCst);
                self.io.fetch_add(1, Ordering::Relaxed);
                warn!(dir = %self.dir.display(), error = %e, "store write failed");
                AnyError::error(e.to_string())
            }
        }
    }

    /// Bytes free for an unprivileged writer under the directory.
    fn free(&self) -> io::Result<u64> {
        let s = rustix::fs::statvfs(&self.dir).map_err(io::Error::from)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Whether the reserve is free (or the room cannot be told).
    pub(crate) fn has_reserve(&self) -> bool {
        self.free().map_or(true, |f| f >= self.reserve)
    }

    /// The error a write refused for lack of room gets.
    fn refused(&self, free: Option<u64>) -> StoreError {
        self.disk_full.fetch_add(1, Ordering::Relaxed);
        self.full.store(true, Ordering::SeqCst);
        let room = match free {
            Some(free) => format!(
                "{} free, {} kept in reserve for Raft's own records",
                bytes(free),
                bytes(self.reserve)
            ),
            None => "the last write found no room".into(),
        };
        StoreError::DiskFull {
            path: self.dir.display().to_string(),
            detail: format!(
                "on node {:016x}, {room}; nothing was written; writes resume by themselves once \
                 space is freed or a voter with room leads",
                self.node
            ),
        }
    }

    /// Whether a client write may be appended: the reserve is free and, after a write failed
    /// for lack of room, a probe succeeded. [`StoreError::DiskFull`] otherwise (counted).
    pub(crate) fn room(&self) -> Result<(), StoreError> {
        match self.free() {
            Ok(free) if free < self.reserve => return Err(self.refused(Some(free))),
            Ok(_) => {}
            // Cannot tell: let the write find out.
            Err(e) => tracing::debug!(dir = %self.dir.display(), error = %e, "statvfs"),
        }
        if self.full.load(Ordering::SeqCst) && !self.probe() {
            return Err(self.refused(None));
        }
        Ok(())
    }

    /// Whether the directory has room again: the reserve is free and a small file can be
    /// written and fsynced there. Clears the "full" state when it does.
    pub(crate) fn probe(&self) -> bool {
        if self.free().is_ok_and(|f| f < self.reserve) {
            return false;
        }
        let path = self.dir.join(PROBE_FILE);
        let written = (|| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&[0u8; PROBE_BYTES])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        match written {
            Ok(()) => {
                if self.full.swap(false, Ordering::SeqCst) {
                    info!(dir = %self.dir.display(), "the store's disk has room again");
                }
                true
            }
            Err(e) => {
                if is_full(&e) {
                    self.full.store(true, Ordering::SeqCst);
                }
                false
            }
        }
    }

    /// The error for a write on a node whose Raft node a storage error stopped.
    pub(crate) fn stopped(&self, fatal: &str) -> StoreError {
        if self.stopped_full.load(Ordering::SeqCst) {
            StoreError::DiskFull {
                path: self.dir.display().to_string(),
                detail: format!(
                    "on node {:016x}, this node's store stopped when a write found no room (an \
                     entry it was appending may still be applied by the other voters: read it \
                     back); it reopens by itself once space is freed",
                    self.node
                ),
            }
        } else {
            StoreError::Raft(fatal.to_string())
        }
    }

    /// The directory, while it has no room: a write found none and no probe has since, or
    /// less than the reserve is free now (a small write may still fit in pages the database
    /// already holds, a large one will not).
    pub(crate) fn trouble(&self) -> Option<String> {
        let full = self.full.load(Ordering::SeqCst) || !self.has_reserve();
        full.then(|| self.dir.display().to_string())
    }

    pub(crate) fn stats(&self) -> DiskStats {
        DiskStats {
            disk_full: self.disk_full.load(Ordering::Relaxed),
            io: self.io.load(Ordering::Relaxed),
            full: self.full.load(Ordering::SeqCst),
            reopened: self.reopened.load(Ordering::Relaxed),
        }
    }
}

/// Why a Raft node stopped, if a storage error stopped it (None: shut down on purpose, or a
/// panic).
pub(crate) fn storage_stopped<NID: openraft::NodeId>(fatal: &Fatal<NID>) -> Option<String> {
    match fatal {
        Fatal::StorageError(_) => Some(fatal.to_string()),
        // A panic is a bug, not the disk: reopening would only hit it again.
        Fatal::Panicked | Fatal::Stopped => None,
    }
}

/// How long the leader waits for each voter's status when a write was not confirmed (within
/// the extra time a forwarding node gives the leader's answer).
const ASK_VOTERS: Duration = Duration::from_millis(250);

/// A leader handing over waits this many of its longest election timeouts for another leader.
const HAND_OVER_ELECTIONS: u32 = 10;

impl Store {
    /// The other voters' store directories with no room, as they answer (a voter that does not
    /// answer is taken to have room); and how many voters there are.
    async fn voters_without_room(&self) -> (Vec<(u64, String)>, usize) {
        let me = self.status();
        let mut asks = tokio::task::JoinSet::new();
        for m in me.voters.iter().filter(|m| m.id != me.node) {
            let (store, netid, id) = (self.clone(), m.netid, m.id);
            asks.spawn(async move {
                let s = tokio::time::timeout(ASK_VOTERS, store.remote_status(netid)).await;
                (id, s.ok().and_then(|s| s.ok()).and_then(|s| s.disk_full))
            });
        }
        let mut full = Vec::new();
        while let Some(r) = asks.join_next().await {
            if let Ok((id, Some(dir))) = r {
                full.push((id, dir));
            }
        }
        full.sort();
        (full, me.voters.len())
    }

    /// On a leader that refused a write for lack of room: if enough of the other voters have
    /// room to commit writes without it, hands leadership over (no more heartbeats, and no
    /// campaign of its own, until another voter leads), so that one node's full disk does not
    /// stop the group's writes. Runs once at a time; ends within a few election timeouts.
    pub(crate) async fn hand_over(&self) {
        let disk = self.slot.disk.clone();
        if disk.handing_over.swap(true, Ordering::SeqCst) {
            return;
        }
        let (full, voters) = self.voters_without_room().await;
        let with_room = voters.saturating_sub(full.len() + 1);
        let raft = self.inner().raft.clone();
        if with_room > voters / 2 {
            info!(
                voters,
                with_room,
                "this leader's disk has no room: handing leadership to a voter with room"
            );
            let rc = raft.runtime_config();
            rc.heartbeat(false);
            rc.elect(false);
            let me = self.node();
            let wait = self.inner().config.election_timeout.1 * HAND_OVER_ELECTIONS;
            let r = raft
                .wait(Some(wait))
                .metrics(
                    |m| m.current_leader.is_some_and(|l| l != me),
                    "another leader",
                )
                .await;
            rc.heartbeat(true);
            rc.elect(true);
            match r {
                Ok(m) => info!(leader = ?m.current_leader, "leadership handed over"),
                Err(e) => warn!(error = %e, "no other voter took the lead; this one leads on"),
            }
        }
        disk.handing_over.store(false, Ordering::SeqCst);
    }

    /// On a leader whose write was not confirmed by a majority: [`StoreError::DiskFull`] if that
    /// is because too many voters have no room under their store directories (their Raft nodes
    /// refuse or stopped on the append), naming one of them; None otherwise (or if they cannot
    /// be asked).
    pub(crate) async fn voters_out_of_room(&self) -> Option<StoreError> {
        let (mut full, voters) = self.voters_without_room().await;
        let me = self.status();
        if let (true, Some(dir)) = (me.voters.iter().any(|m| m.id == me.node), me.disk_full) {
            full.push((me.node, dir));
        }
        if full.is_empty() || voters - full.len() > voters / 2 {
            return None;
        }
        full.sort();
        let n = full.len();
        let (id, dir) = full.swap_remove(0);
        Some(StoreError::DiskFull {
            path: dir,
            detail: format!(
                "on node {id:016x}; {} of {voters} voters have no room under their store \
                 directories, so no write can be committed (this one stays in the leader's log \
                 and is applied only if they get room back before another leader is elected); \
                 writes resume by themselves once space is freed",
                n
            ),
        })
    }
}

/// Watches the store's Raft node for as long as the store lives: when a storage error stops
/// it, waits for room under the directory and reopens it (see the module doc). Ends once every
/// clone of the store is dropped.
pub(crate) async fn watch(slot: Weak<Slot>) {
    // A node that stops again soon after a reopen (a fault that room does not cure) is reopened
    // ever more slowly, up to RETRY_MAX apart.
    let mut last_reopen: Option<tokio::time::Instant> = None;
    let mut first_pause = RETRY_MIN;
    loop {
        let Some(s) = slot.upgrade() else { return };
        let mut metrics = s.current_inner().raft.metrics();
        drop(s);
        // Until this Raft node stops: why, if a storage error stopped it.
        let stopped = loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                break storage_stopped(fatal);
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { break None },
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if slot.strong_count() == 0 { return }
                }
            }
        };
        let Some(why) = stopped else {
            // Shut down on purpose: wait until it is replaced (abandon) or the store dropped.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(s) = slot.upgrade() else { return };
                if !s.current_inner().raft.metrics().same_channel(&metrics) {
                    break;
                }
            }
            continue;
        };
        warn!(error = %why, "a storage error stopped this node's store; it reopens once the disk has room");
        first_pause = match last_reopen {
            Some(t) if t.elapsed() < STABLE => (first_pause * 2).min(RETRY_MAX),
            _ => RETRY_MIN,
        };
        let mut pause = first_pause;
        loop {
            tokio::time::sleep(pause).await;
            let Some(s) = slot.upgrade() else { return };
            let disk = s.disk.clone();
            if !tokio::task::spawn_blocking(move || disk.probe())
                .await
                .unwrap_or(false)
            {
                continue;
            }
            match s.reopen_stopped(&metrics).await {
                Ok(true) => {
                    last_reopen = Some(tokio::time::Instant::now());
                    s.disk.reopened.fetch_add(1, Ordering::Relaxed);
                    s.disk.stopped_full.store(false, Ordering::SeqCst);
                    info!("the store reopened after its storage error");
                    break;
                }
                Ok(false) => break, // replaced meanwhile
                Err(e) => {
                    warn!(error = %e, "reopening the store failed; trying again");
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_full_other_errors_are_not() {
        assert!(is_full(&io::Error::from_raw_os_error(28)));
        assert!(is_full(&io::Error::from_raw_os_error(122)));
        assert!(is_full(&io::Error::from(io::ErrorKind::StorageFull)));
        assert!(is_full(&io::Error::from(io::ErrorKind::QuotaExceeded)));
        assert!(!is_full(&io::Error::from_raw_os_error(5)));
        assert!(!is_full(&io::Error::from(io::ErrorKind::PermissionDenied)));
        assert!(!is_full(&io::Error::other("no space left (just words)")));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(512 << 10), "512 KiB");
        assert_eq!(bytes(RESERVE_BYTES), "1 MiB");
        assert_eq!(bytes(5 << 29), "2.5 GiB");
    }

    #[test]
    fn redb_errors_are_classified_through_their_wrappers() {
        let full = || redb::StorageError::Io(io::Error::from_raw_os_error(28));
        assert_eq!(full().kind(), Kind::Full);
        assert_eq!(redb::CommitError::Storage(full()).kind(), Kind::Full);
        assert_eq!(redb::TransactionError::Storage(full()).kind(), Kind::Full);
        assert_eq!(redb::TableError::Storage(full()).kind(), Kind::Full);
        assert_eq!(
            redb::CommitError::Storage(redb::StorageError::PreviousIo).kind(),
            Kind::Poisoned
        );
        let eio = redb::StorageError::Io(io::Error::from_raw_os_error(5));
        assert_eq!(redb::CommitError::Storage(eio).kind(), Kind::Other);
    }

    #[test]
    fn a_full_write_is_counted_and_named_disk_full() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path(), 1, RESERVE_BYTES);
        let e = disk.write_failed(redb::CommitError::Storage(redb::StorageError::Io(
            io::Error::from_raw_os_error(28),
        )));
        assert!(
            e.to_string()
                .contains(&format!("disk full: {}", dir.path().display())),
            "{e}"
        );
        let _ = disk.write_failed(io::Error::from_raw_os_error(5));
        let s = disk.stats();
        assert_eq!((s.disk_full, s.io, s.full), (1, 1, true));
        // The last storage error was not a lack of room.
        assert!(matches!(disk.stopped("x"), StoreError::Raft(_)));
        // Room is there (a temp dir on the build machine's disk): a probe clears "full".
        assert!(disk.room().is_ok());
        assert!(!disk.stats().full);
    }

    #[test]
    fn below_the_reserve_writes_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A reserve no disk has: every write is refused, with the directory in the message.
        let disk = Disk::new(dir.path(), 1, u64::MAX);
        let e = disk.room().unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("disk full: {}", dir.path().display())),
            "{text}"
        );
        assert!(matches!(e, StoreError::DiskFull { .. }));
        assert_eq!(crate::grpc_status(e).code(), tonic::Code::ResourceExhausted);
        assert!(!disk.probe());
        assert_eq!(disk.stats().disk_full, 1);
    }
}
