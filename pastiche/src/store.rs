//! The on-disk content-addressed store.
//!
//! Layout under the store directory:
//!
//! - `blobs/sha256/<hex>`: the bytes of a complete, verified blob. Only ever created by a rename
//!   of a fully written and fsynced file, so a partial or corrupt file is never visible under its
//!   digest name.
//! - `blobs/sha256/<hex>.manifest`: its manifest (binary, checksummed; see
//!   [`Manifest::to_bytes`]). Renamed into place before the data.
//! - `blobs/sha256/<hex>.pin`: an empty marker: the blob is pinned (never evicted).
//! - `tmp/put-<pid>-<n>.part`: a put in progress. Removed on error and by [`Store::open`].
//! - `tmp/<hex>.manifest`, `tmp/<hex>.part`, `tmp/<hex>.have`: a pull in progress (live, or
//!   interrupted and resumable): the manifest it was begun with, the data file (full size, written
//!   piecewise) and a journal of verified piece indexes (4 bytes each, little endian, appended
//!   after the piece data is fsynced).
//!
//! One process owns a store directory at a time (there is no cross-process lock).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use crate::digest::{sha256, Digest, PIECE_SIZE};
use crate::manifest::Manifest;

mod partial;

pub use partial::{Import, ImportWriteError, IMPORT_KEPT};

/// A pull's verified pieces are recorded durably once this many bytes of them are unrecorded.
const FLUSH_BYTES: u64 = 16 << 20;
/// Read buffer for puts and rehashing.
const IO_BUF: usize = 1 << 20;
/// A blob's mtime (its last use across restarts) is refreshed at most this often.
const PERSIST_USE_EVERY: Duration = Duration::from_secs(60);

#[allow(clippy::disallowed_methods)]
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The blob can never fit: it is larger than the maximum minus the pinned bytes.
    #[error("blob of {size} bytes does not fit in the store (max {max} bytes, pinned {pinned})")]
    TooLarge {
        /// The blob's size.
        size: u64,
        /// The store's maximum size.
        max: u64,
        /// Bytes held by pinned blobs.
        pinned: u64,
    },
    /// The blob would fit, but not now: the room is reserved by pulls and puts in progress.
    #[error(
        "blob of {size} bytes does not fit in the store now: \
         {reserved} bytes are reserved by pulls and puts in progress (max {max} bytes)"
    )]
    Busy {
        /// The blob's size.
        size: u64,
        /// Bytes that cannot be evicted now (pinned blobs, live pulls and puts).
        reserved: u64,
        /// The store's maximum size.
        max: u64,
    },
    /// The filesystem under the store's directory `path` has no room (ENOSPC, or EDQUOT: over
    /// a quota). Nothing is left behind: a put's temp file, and a pull's temp state, are
    /// removed (the room is given back); blobs already there stay.
    #[error("disk full: {}", path.display())]
    NoSpace {
        /// The store's directory.
        path: PathBuf,
    },
    /// No such blob (or no such piece of it).
    #[error("unknown digest {0}")]
    NotFound(Digest),
    /// The bytes hash to another digest than the one expected.
    #[error("digest mismatch: want {want}, got {got}")]
    DigestMismatch {
        /// The expected digest.
        want: Digest,
        /// The digest of the bytes.
        got: Digest,
    },
    /// A piece's length or SHA-256 differs from the manifest's.
    #[error("piece {index} does not match the manifest")]
    PieceMismatch {
        /// The piece index.
        index: u32,
    },
    /// The manifest is not self-consistent.
    #[error("bad manifest: {0}")]
    BadManifest(String),
    /// [`Store::begin_pull`] of a digest whose pull is already under way.
    #[error("a pull of {0} is already in progress")]
    PullInProgress(Digest),
    /// [`Pull::finish`] before every piece was written.
    #[error("pull incomplete: {missing} pieces missing")]
    Incomplete {
        /// How many pieces are missing.
        missing: usize,
    },
    /// Any other I/O error.
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
    /// The reader a put imports from failed (nothing was imported; not a fault of the store).
    #[error("reading the blob to import: {0}")]
    Input(#[source] io::Error),
}

impl From<io::Error> for StoreError {
    /// Tells a full filesystem apart; the store names its directory before
    /// the error leaves it.
    fn from(e: io::Error) -> StoreError {
        if is_full(&e) {
            StoreError::NoSpace {
                path: PathBuf::new(),
            }
        } else {
            StoreError::Io(e)
        }
    }
}

/// Whether `e` says the filesystem has no room for the write: ENOSPC (28) or EDQUOT (122).
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(28 | 122))
}

/// Writes that failed, by reason (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteErrors {
    /// For lack of room ([`StoreError::NoSpace`]).
    pub disk_full: u64,
    /// Another I/O error ([`StoreError::Io`]).
    pub io: u64,
}

/// A complete blob, as listed by [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it is pinned (never evicted).
    pub pinned: bool,
    /// When it was last put, pulled or read.
    pub last_used: SystemTime,
}

/// The outcome of [`Store::verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many complete blobs were rehashed.
    pub checked: usize,
    /// The corrupt ones (now evicted).
    pub corrupt: Vec<Digest>,
}

/// The local content-addressed store. Cheap to clone; safe to use from several threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The most bytes kept; [`Store::set_max_bytes`] changes it while the store runs.
    max: AtomicU64,
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Complete blobs + dormant pulls + reservations of live pulls and puts. Changed only under
    /// the state lock; read without it.
    used: AtomicU64,
    seq: AtomicU64,
    state: Mutex<State>,
    disk_full: AtomicU64,
    io_errors: AtomicU64,
}

struct Blob {
    manifest: Arc<Manifest>,
    pinned: bool,
    /// LRU order: higher is more recent.
    tick: u64,
    last_used: SystemTime,
    persisted_use: SystemTime,
    /// Identifies this installation of the blob (for verify's check-then-evict).
    generation: u64,
}

/// Temp state of an interrupted pull, kept for a resume; counted in `used`, evictable.
struct Dormant {
    size: u64,
    tick: u64,
}

struct LivePull {
    cancelled: Arc<AtomicBool>,
    /// `None` while `begin_pull` is setting up its temp state.
    shared: Option<Arc<PullShared>>,
    reserved: u64,
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Blob>,
    dormant: HashMap<Digest, Dormant>,
    live: HashMap<Digest, LivePull>,
    /// Imports from outside sources under way ([`partial`]).
    importing: HashSet<Digest>,
    tick: u64,
    pinned_bytes: u64,
}

impl State {
    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Allocates the blocks of `f`'s first `len` bytes, so that a pull finds out at its start,
/// not half way, that the disk has no room for it. A filesystem that cannot allocate ahead
/// (EOPNOTSUPP) is left to find out as the pieces are written.
fn allocate(f: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Incremental hashing of a blob: whole digest and per-piece hashes.
struct Hasher {
    whole: Sha256,
    piece: Sha256,
    fill: u64,
    piece_size: u64,
    pieces: Vec<[u8; 32]>,
    size: u64,
}

impl Hasher {
    fn new(piece_size: u64) -> Hasher {
        Hasher {
            whole: Sha256::new(),
            piece: Sha256::new(),
            fill: 0,
            piece_size,
            pieces: Vec::new(),
            size: 0,
        }
    }

    fn update(&mut self, mut buf: &[u8]) {
        self.size += buf.len() as u64;
        self.whole.update(buf);
        while !buf.is_empty() {
            let take = (self.piece_size - self.fill).min(buf.len() as u64) as usize;
            self.piece.update(&buf[..take]);
            self.fill += take as u64;
            if self.fill == self.piece_size {
                self.pieces.push(self.piece.finalize_reset().into());
                self.fill = 0;
            }
            buf = &buf[take..];
        }
    }

    fn finish(mut self) -> Manifest {
        if self.fill > 0 {
            self.pieces.push(self.piece.finalize().into());
        }
        Manifest {
            digest: Digest(self.whole.finalize().into()),
            size: self.size,
            piece_size: self.piece_size,
            pieces: self.pieces,
        }
    }
}

/// Rehashes a whole file (from offset 0 to its end) into a manifest.
fn hash_file(f: &File, piece_size: u64) -> io::Result<Manifest> {
    Ok(hash_prefix(f, piece_size, u64::MAX)?.finish())
}

/// Hashes the first `len` bytes of a file (all of it if shorter).
fn hash_prefix(f: &File, piece_size: u64, len: u64) -> io::Result<Hasher> {
    let mut h = Hasher::new(piece_size);
    let mut buf = vec![0u8; IO_BUF];
    let mut off = 0u64;
    while off < len {
        let want = usize::try_from((len - off).min(IO_BUF as u64)).unwrap_or(IO_BUF);
        let n = match f.read_at(&mut buf[..want], off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h)
}

fn hex_name(name: &str) -> Option<Digest> {
    if name.len() != 64 || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    format!("sha256:{name}").parse().ok()
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, bounded to `max_bytes`.
    ///
    /// Loads the index of complete blobs (a blob whose manifest is missing or stale is rehashed;
    /// one whose bytes do not match its name is removed), keeps the temp state of interrupted
    /// pulls for a resume, and removes every other temp file. If the store holds more than
    /// `max_bytes`, evicts least-recently-used unpinned blobs until it fits.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Store, StoreError> {
        let blobs_dir = dir.join("blobs").join("sha256");
        let tmp_dir = dir.join("tmp");
        let store = Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                max: AtomicU64::new(max_bytes),
                blobs_dir,
                tmp_dir,
                used: AtomicU64::new(0),
                seq: AtomicU64::new(0),
                state: Mutex::new(State::default()),
                disk_full: AtomicU64::new(0),
                io_errors: AtomicU64::new(0),
            }),
        };
        let made = fs::create_dir_all(&store.inner.blobs_dir)
            .and_then(|()| fs::create_dir_all(&store.inner.tmp_dir));
        made.map_err(|e| store.fault(e.into()))?;
        store.load().map_err(|e| store.fault(e))?;
        Ok(store)
    }

    /// A write error as it leaves the store: a full disk named by the store's directory; I/O
    /// errors counted by reason ([`Store::write_errors`]).
    fn fault(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::NoSpace { .. } => {
                self.inner.disk_full.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dir = %self.inner.dir.display(), "pastiche write failed: disk full");
                StoreError::NoSpace {
                    path: self.inner.dir.clone(),
                }
            }
            StoreError::Io(e) => {
                self.inner.io_errors.fetch_add(1, Ordering::Relaxed);
                StoreError::Io(e)
            }
            other => other,
        }
    }

    /// The writes that failed so far, by reason.
    pub fn write_errors(&self) -> WriteErrors {
        WriteErrors {
            disk_full: self.inner.disk_full.load(Ordering::Relaxed),
            io: self.inner.io_errors.load(Ordering::Relaxed),
        }
    }

    fn load(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        let mut data: Vec<(Digest, fs::Metadata)> = Vec::new();
        let mut extras: Vec<(Digest, PathBuf)> = Vec::new();
        let mut pins: HashSet<Digest> = HashSet::new();
        for ent in fs::read_dir(&inner.blobs_dir)? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(d) = hex_name(name) {
                let md = ent.metadata()?;
                if md.is_file() {
                    data.push((d, md));
                }
            } else if let Some(d) = name.strip_suffix(".manifest").and_then(hex_name) {
                extras.push((d, ent.path()));
            } else if let Some(d) = name.strip_suffix(".pin").and_then(hex_name) {
                pins.insert(d);
                extras.push((d, ent.path()));
            }
        }
        // (mtime, digest, manifest, pinned, complete)
        let mut found: Vec<(SystemTime, Digest, Manifest, bool, bool)> = Vec::new();
        for (d, md) in data {
            let m = fs::read(self.blob_manifest_path(&d))
                .ok()
                .and_then(|b| Manifest::from_bytes(&b).ok())
                .filter(|m| m.digest == d && m.size == md.len());
            let m = match m {
                Some(m) => m,
                None => {
                    // Manifest lost or stale: rehash; keep the blob only if its bytes match.
                    let f = File::open(self.blob_path(&d))?;
                    let m = hash_file(&f, PIECE_SIZE)?;
                    if m.digest != d {
                        remove_if_exists(&self.blob_path(&d))?;
                        continue;
                    }
                    self.write_atomic(&self.blob_manifest_path(&d), &m.to_bytes())?;
                    m
                }
            };
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((mtime, d, m, pins.contains(&d), true));
        }
        let complete: HashSet<Digest> = found.iter().map(|f| f.1).collect();
        self.clean_imports(&complete);
        for (d, path) in extras {
            if !complete.contains(&d) {
                remove_if_exists(&path)?;
            }
        }

        // Temp dir: keep the state of resumable pulls, remove everything else.
        let mut keep: HashSet<String> = HashSet::new();
        for ent in fs::read_dir(&inner.tmp_dir)? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(d) = name.strip_suffix(".manifest").and_then(hex_name) else {
                continue;
            };
            if complete.contains(&d) {
                continue;
            }
            let m = fs::read(ent.path())
                .ok()
                .and_then(|b| Manifest::from_bytes(&b).ok())
                .filter(|m| m.digest == d);
            let Some(m) = m else { continue };
            let Ok(md) = fs::metadata(self.part_path(&d)) else {
                continue;
            };
            let hex = d.hex();
            keep.extend([
                format!("{hex}.manifest"),
                format!("{hex}.part"),
                format!("{hex}.have"),
            ]);
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((mtime, d, m, false, false));
        }
        for ent in fs::read_dir(&inner.tmp_dir)? {
            let ent = ent?;
            let keep_it = ent.file_name().to_str().is_some_and(|n| keep.contains(n));
            if !keep_it {
                let _ = fs::remove_file(ent.path());
            }
        }

        found.sort_by_key(|f| f.0);
        let mut st = self.lock();
        let mut used = 0u64;
        for (mtime, d, m, pinned, complete) in found {
            let tick = st.next_tick();
            used += m.size;
            if complete {
                if pinned {
                    st.pinned_bytes += m.size;
                }
                st.blobs.insert(
                    d,
                    Blob {
                        manifest: Arc::new(m),
                        pinned,
                        tick,
                        last_used: mtime,
                        persisted_use: mtime,
                        generation: tick,
                    },
                );
            } else {
                st.dormant.insert(d, Dormant { size: m.size, tick });
            }
        }
        inner.used.store(used, Ordering::Relaxed);
        if used > inner.max.load(Ordering::Relaxed) {
            // The maximum was lowered: evict down to it (pinned blobs stay regardless).
            let _ = self.make_room(&mut st, 0, 0);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.inner.blobs_dir.join(d.hex())
    }

    fn blob_manifest_path(&self, d: &Digest) -> PathBuf {
        self.inner.blobs_dir.join(format!("{}.manifest", d.hex()))
    }

    fn pin_path(&self, d: &Digest) -> PathBuf {
        self.inner.blobs_dir.join(format!("{}.pin", d.hex()))
    }

    fn part_path(&self, d: &Digest) -> PathBuf {
        self.inner.tmp_dir.join(format!("{}.part", d.hex()))
    }

    fn have_path(&self, d: &Digest) -> PathBuf {
        self.inner.tmp_dir.join(format!("{}.have", d.hex()))
    }

    fn pull_manifest_path(&self, d: &Digest) -> PathBuf {
        self.inner.tmp_dir.join(format!("{}.manifest", d.hex()))
    }

    fn tmp_name(&self, what: &str) -> PathBuf {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .tmp_dir
            .join(format!("{what}-{}-{n}.part", std::process::id()))
    }

    /// Writes `bytes` to a temp file, fsyncs it and renames it to `path` (the caller fsyncs the
    /// directory of `path`).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.tmp_name("file");
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    fn remove_pull_files(&self, d: &Digest) {
        for p in [
            self.pull_manifest_path(d),
            self.part_path(d),
            self.have_path(d),
        ] {
            let _ = fs::remove_file(p);
        }
    }

    fn add_used(&self, n: u64) {
        self.inner.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub_used(&self, n: u64) {
        self.inner.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Reserves `inc` more bytes for a blob of (at least) `total` bytes, evicting
    /// least-recently-used unpinned blobs and dormant pulls as needed. Call with the lock held.
    fn make_room(&self, st: &mut State, total: u64, inc: u64) -> Result<(), StoreError> {
        let max = self.inner.max.load(Ordering::Relaxed);
        let pinned = st.pinned_bytes;
        if total > max.saturating_sub(pinned) {
            return Err(StoreError::TooLarge {
                size: total,
                max,
                pinned,
            });
        }
        while self.used_bytes() + inc > max {
            let blob = st
                .blobs
                .iter()
                .filter(|(_, b)| !b.pinned)
                .map(|(d, b)| (b.tick, *d))
                .min();
            let dormant = st.dormant.iter().map(|(d, x)| (x.tick, *d)).min();
            match (blob, dormant) {
                (Some(b), Some(x)) if x < b => self.drop_dormant(st, &x.1),
                (Some(b), _) => {
                    self.drop_blob(st, &b.1, false);
                }
                (None, Some(x)) => self.drop_dormant(st, &x.1),
                (None, None) => {
                    let reserved = self.used_bytes();
                    return Err(StoreError::Busy {
                        size: total,
                        reserved,
                        max,
                    });
                }
            }
        }
        self.add_used(inc);
        Ok(())
    }

    fn drop_dormant(&self, st: &mut State, d: &Digest) {
        if let Some(x) = st.dormant.remove(d) {
            self.remove_pull_files(d);
            self.sub_used(x.size);
        }
    }

    /// Removes a complete blob from the index and the disk. Call with the lock held.
    fn drop_blob(&self, st: &mut State, d: &Digest, sync: bool) -> bool {
        let Some(b) = st.blobs.remove(d) else {
            return false;
        };
        // Data first: a manifest or pin without data is cleaned up by `open`.
        let _ = fs::remove_file(self.blob_path(d));
        let _ = fs::remove_file(self.blob_manifest_path(d));
        let _ = fs::remove_file(self.pin_path(d));
        if sync {
            let _ = sync_dir(&self.inner.blobs_dir);
        }
        self.sub_used(b.manifest.size);
        if b.pinned {
            st.pinned_bytes -= b.manifest.size;
        }
        true
    }

    /// Marks a blob used (LRU), refreshing its mtime now and then so the order survives restarts.
    fn touch(&self, st: &mut State, d: &Digest, file: Option<&File>) {
        let tick = st.next_tick();
        let Some(b) = st.blobs.get_mut(d) else { return };
        let now = wall_clock();
        b.tick = tick;
        b.last_used = now;
        let stale = now
            .duration_since(b.persisted_use)
            .map_or(true, |e| e >= PERSIST_USE_EVERY);
        if stale {
            b.persisted_use = now;
            let opened;
            let f = match file {
                Some(f) => Some(f),
                None => {
                    opened = File::open(self.blob_path(d)).ok();
                    opened.as_ref()
                }
            };
            if let Some(f) = f {
                let _ = f.set_modified(now);
            }
        }
    }

    /// Moves the fsynced file `src` into place as the blob `m`, consuming a reservation of
    /// `reserved` bytes (it becomes the blob's, or is released). If the blob is already present,
    /// `src` is removed and the present blob's manifest returned. Call with the lock held.
    fn install(
        &self,
        st: &mut State,
        m: Manifest,
        src: &Path,
        reserved: u64,
    ) -> Result<Arc<Manifest>, StoreError> {
        let d = m.digest;
        if st.blobs.contains_key(&d) {
            self.sub_used(reserved);
            let _ = fs::remove_file(src);
            self.touch(st, &d, None);
            return Ok(st.blobs[&d].manifest.clone());
        }
        let res = (|| {
            self.write_atomic(&self.blob_manifest_path(&d), &m.to_bytes())?;
            fs::rename(src, self.blob_path(&d))?;
            sync_dir(&self.inner.blobs_dir)
        })();
        if let Err(e) = res {
            self.sub_used(reserved);
            let _ = fs::remove_file(self.blob_path(&d));
            let _ = fs::remove_file(self.blob_manifest_path(&d));
            return Err(e.into());
        }
        // The reservation becomes the blob's.
        if reserved != m.size {
            self.add_used(m.size);
            self.sub_used(reserved);
        }
        let tick = st.next_tick();
        let now = wall_clock();
        let m = Arc::new(m);
        st.blobs.insert(
            d,
            Blob {
                manifest: m.clone(),
                pinned: false,
                tick,
                last_used: now,
                persisted_use: now,
                generation: tick,
            },
        );
        Ok(m)
    }

    /// Imports a blob from a reader. Hashes it (whole and per piece) while writing a temp file,
    /// fsyncs, renames it into place under its digest and fsyncs the directory, evicting
    /// least-recently-used unpinned blobs to make room. A blob already present is deduplicated
    /// (and marked used). On error nothing is left behind: the temp file is removed, and the
    /// only other change is evictions made for room. A blob that does not fit is still read to
    /// its end (without writing) so that it can be deduplicated against a present blob, and so
    /// that [`StoreError::TooLarge`] reports its true size.
    pub fn put_reader(&self, r: impl Read) -> Result<Manifest, StoreError> {
        self.put_inner(r, None).map_err(|e| self.fault(e))
    }

    /// Imports a local file; see [`Store::put_reader`].
    pub fn put_file(&self, path: &Path) -> Result<Manifest, StoreError> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        self.put_inner(f, Some(len)).map_err(|e| self.fault(e))
    }

    fn put_inner(&self, mut r: impl Read, hint: Option<u64>) -> Result<Manifest, StoreError> {
        struct Guard<'a> {
            store: &'a Store,
            path: PathBuf,
            reserved: u64,
        }
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.path);
                self.store.sub_used(self.reserved);
            }
        }
        let path = self.tmp_name("put");
        let mut file = Some(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)?,
        );
        let mut g = Guard {
            store: self,
            path,
            reserved: 0,
        };
        let mut no_room: Option<StoreError> = None;
        let mut reserve = |g: &mut Guard, total: u64| -> Result<bool, StoreError> {
            if total <= g.reserved {
                return Ok(true);
            }
            let mut st = self.lock();
            match self.make_room(&mut st, total, total - g.reserved) {
                Ok(()) => {
                    g.reserved = total;
                    Ok(true)
                }
                Err(e @ (StoreError::TooLarge { .. } | StoreError::Busy { .. })) => {
                    no_room = Some(e);
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        };
        if let Some(len) = hint {
            if !reserve(&mut g, len)? {
                file = None;
            }
        }
        let mut h = Hasher::new(PIECE_SIZE);
        let mut buf = vec![0u8; IO_BUF];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(StoreError::Input(e)),
            };
            h.update(&buf[..n]);
            if let Some(f) = file.as_mut() {
                if reserve(&mut g, h.size)? {
                    f.write_all(&buf[..n])?;
                } else {
                    // No room: stop writing, keep hashing (it may be a duplicate).
                    file = None;
                    let _ = fs::remove_file(&g.path);
                    self.sub_used(std::mem::take(&mut g.reserved));
                }
            }
        }
        let m = h.finish();
        let mut st = self.lock();
        let Some(f) = file else {
            if st.blobs.contains_key(&m.digest) {
                self.touch(&mut st, &m.digest, None);
                return Ok((*st.blobs[&m.digest].manifest).clone());
            }
            let max = self.inner.max.load(Ordering::Relaxed);
            return Err(match no_room {
                Some(StoreError::Busy { reserved, .. }) => StoreError::Busy {
                    size: m.size,
                    reserved,
                    max,
                },
                _ => StoreError::TooLarge {
                    size: m.size,
                    max,
                    pinned: st.pinned_bytes,
                },
            });
        };
        if st.blobs.contains_key(&m.digest) {
            drop(f);
            self.touch(&mut st, &m.digest, None);
            return Ok((*st.blobs[&m.digest].manifest).clone());
        }
        drop(st);
        f.sync_all()?;
        drop(f);
        let mut st = self.lock();
        // Give back any over-reservation (the input was shorter than announced).
        if g.reserved > m.size {
            self.sub_used(g.reserved - m.size);
            g.reserved = m.size;
        }
        let reserved = std::mem::take(&mut g.reserved);
        let m = self.install(&mut st, m, &g.path, reserved)?;
        Ok((*m).clone())
    }

    /// Whether a complete blob is present.
    pub fn has(&self, d: &Digest) -> bool {
        self.lock().blobs.contains_key(d)
    }

    /// The manifest of a complete blob or of a live pull.
    pub fn manifest(&self, d: &Digest) -> Option<Manifest> {
        let st = self.lock();
        if let Some(b) = st.blobs.get(d) {
            return Some((*b.manifest).clone());
        }
        let sh = st.live.get(d)?.shared.as_ref()?;
        Some((*sh.manifest).clone())
    }

    /// Opens a complete blob for reading, marking it used.
    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        let mut st = self.lock();
        if !st.blobs.contains_key(d) {
            return Err(StoreError::NotFound(*d));
        }
        let f = File::open(self.blob_path(d))?;
        self.touch(&mut st, d, Some(&f));
        Ok(f)
    }

    /// Reads piece `index` of a complete blob (marking it used), or a verified piece of a live
    /// pull. [`StoreError::NotFound`] otherwise (also for an index past the end).
    pub fn read_piece(&self, d: &Digest, index: u32) -> Result<Vec<u8>, StoreError> {
        let (file, m) = {
            let mut st = self.lock();
            if let Some(b) = st.blobs.get(d) {
                let m = b.manifest.clone();
                if index >= m.piece_count() {
                    return Err(StoreError::NotFound(*d));
                }
                let f = File::open(self.blob_path(d))?;
                self.touch(&mut st, d, Some(&f));
                (PieceSource::Owned(f), m)
            } else {
                let sh = st.live.get(d).and_then(|l| l.shared.clone());
                match sh {
                    Some(sh) if sh.has_piece(index) => {
                        let m = sh.manifest.clone();
                        (PieceSource::Pull(sh), m)
                    }
                    _ => return Err(StoreError::NotFound(*d)),
                }
            }
        };
        let mut buf = vec![0u8; m.piece_len(index) as usize];
        let f = match &file {
            PieceSource::Owned(f) => f,
            PieceSource::Pull(sh) => &sh.part,
        };
        f.read_exact_at(&mut buf, m.piece_offset(index))?;
        Ok(buf)
    }

    /// Which pieces are here: all of a complete blob, the verified ones of a live pull.
    pub fn have(&self, d: &Digest) -> Option<Vec<bool>> {
        let st = self.lock();
        if let Some(b) = st.blobs.get(d) {
            return Some(vec![true; b.manifest.pieces.len()]);
        }
        let sh = st.live.get(d)?.shared.as_ref()?;
        let have = sh.progress().have.clone();
        Some(have)
    }

    /// The complete blobs, ordered by digest.
    pub fn list(&self) -> Vec<Entry> {
        let st = self.lock();
        let mut out: Vec<Entry> = st
            .blobs
            .iter()
            .map(|(d, b)| Entry {
                digest: *d,
                size: b.manifest.size,
                pinned: b.pinned,
                last_used: b.last_used,
            })
            .collect();
        out.sort_by_key(|e| e.digest);
        out
    }

    /// Removes a blob even if pinned, and any pull state of it (a live [`Pull`] of it is
    /// cancelled: its further calls fail with [`StoreError::NotFound`]). Returns whether there
    /// was anything to remove.
    pub fn remove(&self, d: &Digest) -> Result<bool, StoreError> {
        let mut st = self.lock();
        let mut removed = self.drop_blob(&mut st, d, true);
        if let Some(l) = st.live.remove(d) {
            l.cancelled.store(true, Ordering::SeqCst);
            self.remove_pull_files(d);
            self.sub_used(l.reserved);
            removed = true;
        }
        if st.dormant.contains_key(d) {
            self.drop_dormant(&mut st, d);
            removed = true;
        }
        Ok(removed)
    }

    /// Pins a complete blob: it is never evicted. Persists across [`Store::open`].
    pub fn pin(&self, d: &Digest) -> Result<(), StoreError> {
        self.pin_inner(d).map_err(|e| self.fault(e))
    }

    fn pin_inner(&self, d: &Digest) -> Result<(), StoreError> {
        let mut st = self.lock();
        let b = st.blobs.get(d).ok_or(StoreError::NotFound(*d))?;
        if b.pinned {
            return Ok(());
        }
        File::create(self.pin_path(d))?.sync_all()?;
        sync_dir(&self.inner.blobs_dir)?;
        let b = st.blobs.get_mut(d).expect("checked above");
        b.pinned = true;
        let size = b.manifest.size;
        st.pinned_bytes += size;
        Ok(())
    }

    /// Unpins a complete blob. [`StoreError::NotFound`] if absent.
    pub fn unpin(&self, d: &Digest) -> Result<(), StoreError> {
        self.unpin_inner(d).map_err(|e| self.fault(e))
    }

    fn unpin_inner(&self, d: &Digest) -> Result<(), StoreError> {
        let mut st = self.lock();
        let b = st.blobs.get(d).ok_or(StoreError::NotFound(*d))?;
        if !b.pinned {
            return Ok(());
        }
        remove_if_exists(&self.pin_path(d))?;
        sync_dir(&self.inner.blobs_dir)?;
        let b = st.blobs.get_mut(d).expect("checked above");
        b.pinned = false;
        let size = b.manifest.size;
        st.pinned_bytes -= size;
        Ok(())
    }

    /// Rehashes every complete blob; evicts (even if pinned) those whose bytes do not match
    /// their manifest, or whose file is gone or unreadable (EIO).
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let snapshot: Vec<(Digest, u64, Arc<Manifest>)> = {
            let st = self.lock();
            st.blobs
                .iter()
                .map(|(d, b)| (*d, b.generation, b.manifest.clone()))
                .collect()
        };
        let mut report = VerifyReport::default();
        for (d, generation, m) in snapshot {
            let res = File::open(self.blob_path(&d)).and_then(|f| hash_file(&f, m.piece_size));
            let corrupt = match res {
                Ok(got) => got != *m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) if e.raw_os_error() == Some(5) => true,
                Err(e) => return Err(e.into()),
            };
            report.checked += 1;
            if corrupt {
                let mut st = self.lock();
                if st.blobs.get(&d).is_some_and(|b| b.generation == generation) {
                    self.drop_blob(&mut st, &d, true);
                    report.corrupt.push(d);
                }
            }
        }
        report.corrupt.sort();
        Ok(report)
    }

    /// Bytes in use: complete blobs, interrupted pulls kept for a resume, and the room reserved
    /// by live pulls and puts.
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The configured maximum.
    pub fn max_bytes(&self) -> u64 {
        self.inner.max.load(Ordering::Relaxed)
    }

    /// Changes the maximum while the store runs (a config reload). A lower one evicts least
    /// recently used unpinned blobs down to it at once (pinned blobs stay regardless).
    pub fn set_max_bytes(&self, max_bytes: u64) {
        let mut st = self.lock();
        self.inner.max.store(max_bytes, Ordering::Relaxed);
        if self.used_bytes() > max_bytes {
            let _ = self.make_room(&mut st, 0, 0);
        }
    }

    /// Begins (or resumes) a pull of the blob described by `m`.
    ///
    /// Checks the manifest ([`StoreError::BadManifest`]), fails with [`StoreError::TooLarge`]
    /// if it can never fit (max minus pinned), and evicts least-recently-used unpinned blobs to
    /// reserve room for it. If a previous pull of the same digest left temp state (it was
    /// dropped, or the process was killed), the pieces it recorded are re-verified against `m`
    /// and kept; if its manifest differs from `m` the old state is discarded.
    ///
    /// At most one pull per digest is live at a time: a second `begin_pull` of a digest while
    /// a [`Pull`] of it is alive fails at once with [`StoreError::PullInProgress`] (it does not
    /// wait).
    ///
    /// If the blob is already complete, the returned pull has nothing missing and its
    /// [`Pull::finish`] returns the present blob's manifest.
    pub fn begin_pull(&self, m: Manifest) -> Result<Pull, StoreError> {
        self.begin_pull_inner(m).map_err(|e| self.fault(e))
    }

    fn begin_pull_inner(&self, m: Manifest) -> Result<Pull, StoreError> {
        m.check().map_err(StoreError::BadManifest)?;
        let d = m.digest;
        let cancelled = Arc::new(AtomicBool::new(false));
        {
            let mut st = self.lock();
            if st.blobs.contains_key(&d) {
                self.touch(&mut st, &d, None);
                let present = st.blobs[&d].manifest.clone();
                return Ok(Pull {
                    store: self.clone(),
                    manifest: present,
                    shared: None,
                    done: false,
                });
            }
            if st.live.contains_key(&d) {
                return Err(StoreError::PullInProgress(d));
            }
            if let Some(x) = st.dormant.remove(&d) {
                // Its room is reserved afresh below.
                self.sub_used(x.size);
            }
            if let Err(e) = self.make_room(&mut st, m.size, m.size) {
                self.remove_pull_files(&d);
                return Err(e);
            }
            st.live.insert(
                d,
                LivePull {
                    cancelled: cancelled.clone(),
                    shared: None,
                    reserved: m.size,
                },
            );
        }
        let m = Arc::new(m);
        let res = self.open_pull_state(&m, cancelled.clone());
        let mut st = self.lock();
        if cancelled.load(Ordering::SeqCst) {
            // Removed meanwhile; `remove` released the reservation.
            self.remove_pull_files(&d);
            return Err(StoreError::NotFound(d));
        }
        match res {
            Ok(sh) => {
                let sh = Arc::new(sh);
                st.live.get_mut(&d).expect("live until cancelled").shared = Some(sh.clone());
                Ok(Pull {
                    store: self.clone(),
                    manifest: m,
                    shared: Some(sh),
                    done: false,
                })
            }
            Err(e) => {
                if let Some(l) = st.live.remove(&d) {
                    self.sub_used(l.reserved);
                }
                self.remove_pull_files(&d);
                Err(e)
            }
        }
    }

    /// Sets up (fresh or resumed) the temp state of a pull.
    fn open_pull_state(
        &self,
        m: &Arc<Manifest>,
        cancelled: Arc<AtomicBool>,
    ) -> Result<PullShared, StoreError> {
        let d = m.digest;
        let (part_p, have_p, man_p) = (
            self.part_path(&d),
            self.have_path(&d),
            self.pull_manifest_path(&d),
        );
        let old = match fs::read(&man_p) {
            Ok(b) => Manifest::from_bytes(&b).ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let mut have = vec![false; m.pieces.len()];
        let resumed = if old.as_ref() == Some(&**m) {
            match OpenOptions::new().read(true).write(true).open(&part_p) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let part = match resumed {
            Some(part) => {
                if part.metadata()?.len() != m.size {
                    part.set_len(m.size)?;
                }
                allocate(&part, m.size)?;
                let journal = match fs::read(&have_p) {
                    Ok(b) => b,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e.into()),
                };
                let mut buf = Vec::new();
                for rec in journal.chunks_exact(4) {
                    let i = u32::from_le_bytes(rec.try_into().expect("4 bytes"));
                    if i >= m.piece_count() || have[i as usize] {
                        continue;
                    }
                    buf.resize(m.piece_len(i) as usize, 0);
                    part.read_exact_at(&mut buf, m.piece_offset(i))?;
                    if sha256(&buf) == m.pieces[i as usize] {
                        have[i as usize] = true;
                    }
                }
                // Rewrite the journal with the pieces just re-verified, dropping the others.
                let recs: Vec<u8> = (0..m.piece_count())
                    .filter(|&i| have[i as usize])
                    .flat_map(|i| i.to_le_bytes())
                    .collect();
                self.write_atomic(&have_p, &recs)?;
                sync_dir(&self.inner.tmp_dir)?;
                part
            }
            None => {
                self.remove_pull_files(&d);
                let part = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&part_p)?;
                part.set_len(m.size)?;
                allocate(&part, m.size)?;
                File::create(&have_p)?;
                // The manifest last: its presence makes the state resumable.
                self.write_atomic(&man_p, &m.to_bytes())?;
                sync_dir(&self.inner.tmp_dir)?;
                part
            }
        };
        let journal = OpenOptions::new().append(true).open(&have_p)?;
        let missing = have.iter().filter(|h| !**h).count();
        Ok(PullShared {
            manifest: m.clone(),
            part,
            journal: Mutex::new(journal),
            frontier: Mutex::new(Frontier {
                hasher: Sha256::new(),
                next: 0,
            }),
            progress: Mutex::new(Progress {
                have,
                missing,
                pending: Vec::new(),
                pending_bytes: 0,
            }),
            cancelled,
            no_room: AtomicBool::new(false),
        })
    }
}

enum PieceSource {
    Owned(File),
    Pull(Arc<PullShared>),
}

struct Progress {
    have: Vec<bool>,
    missing: usize,
    /// Verified and written, not yet recorded in the journal.
    pending: Vec<u32>,
    pending_bytes: u64,
}

struct PullShared {
    manifest: Arc<Manifest>,
    part: File,
    journal: Mutex<File>,
    progress: Mutex<Progress>,
    /// The whole-blob hash over the contiguous prefix of written pieces, advanced as pieces
    /// arrive so that `finish` only hashes what is left.
    frontier: Mutex<Frontier>,
    cancelled: Arc<AtomicBool>,
    /// A write found no room: the temp state is discarded when the pull is dropped (it would
    /// only hold room the disk lacks), not kept for a resume.
    no_room: AtomicBool,
}

struct Frontier {
    hasher: Sha256,
    /// The first piece not yet hashed.
    next: u32,
}

impl PullShared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_piece(&self, i: u32) -> bool {
        self.progress()
            .have
            .get(i as usize)
            .copied()
            .unwrap_or(false)
    }

    fn take_pending(&self) -> Vec<u32> {
        let mut p = self.progress();
        p.pending_bytes = 0;
        std::mem::take(&mut p.pending)
    }

    /// Feeds the whole-blob hash with the written pieces from the frontier on. With `wait`
    /// false, returns at once if another thread is advancing it. `fresh` is a piece the caller
    /// just wrote (saves reading it back).
    fn advance(&self, wait: bool, fresh: Option<(u32, &[u8])>) -> io::Result<()> {
        let mut f = if wait {
            self.frontier.lock().unwrap_or_else(|e| e.into_inner())
        } else {
            match self.frontier.try_lock() {
                Ok(f) => f,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            }
        };
        let m = &self.manifest;
        let mut buf = Vec::new();
        while f.next < m.piece_count() && self.has_piece(f.next) {
            let i = f.next;
            match fresh {
                Some((j, bytes)) if j == i => f.hasher.update(bytes),
                _ => {
                    buf.resize(m.piece_len(i) as usize, 0);
                    self.part.read_exact_at(&mut buf, m.piece_offset(i))?;
                    f.hasher.update(&buf);
                }
            }
            f.next += 1;
        }
        Ok(())
    }

    /// Makes the data of `batch` durable, then records it in the journal durably.
    fn record(&self, batch: &[u32]) -> io::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        self.part.sync_data()?;
        let recs: Vec<u8> = batch.iter().flat_map(|i| i.to_le_bytes()).collect();
        j.write_all(&recs)?;
        j.sync_data()
    }
}

/// A pull in progress: pieces are written (from any number of threads) as they arrive, each
/// verified against the manifest first; [`Pull::finish`] verifies the whole and makes the blob
/// visible. Dropping a `Pull` without finishing keeps its temp state for a later resume.
pub struct Pull {
    store: Store,
    manifest: Arc<Manifest>,
    /// `None` when the blob was already complete at `begin_pull`.
    shared: Option<Arc<PullShared>>,
    done: bool,
}

impl Pull {
    /// The manifest being pulled.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The indexes of the pieces not yet written.
    pub fn missing(&self) -> Vec<u32> {
        let Some(sh) = &self.shared else {
            return Vec::new();
        };
        let p = sh.progress();
        (0..p.have.len() as u32)
            .filter(|&i| !p.have[i as usize])
            .collect()
    }

    /// Writes piece `index` after checking its length and SHA-256 against the manifest
    /// ([`StoreError::PieceMismatch`]: nothing written or recorded). Writing a piece already
    /// present is a no-op. The piece is recorded as verified once its data is fsynced; records
    /// are made durable every 16 MiB of pieces (and by [`Pull::flush`], and on drop), so a kill
    /// loses at most the pieces written since the last record.
    pub fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_piece_inner(index, bytes)
            .map_err(|e| self.failed(e))
    }

    /// A failed write of this pull as it leaves the store (see [`Store::fault`]); one for lack
    /// of room marks the temp state for removal once the pull is dropped.
    fn failed(&self, e: StoreError) -> StoreError {
        if let (StoreError::NoSpace { .. }, Some(sh)) = (&e, &self.shared) {
            sh.no_room.store(true, Ordering::SeqCst);
        }
        self.store.fault(e)
    }

    fn write_piece_inner(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        let m = &self.manifest;
        if index >= m.piece_count()
            || bytes.len() as u64 != m.piece_len(index)
            || sha256(bytes) != m.pieces[index as usize]
        {
            return Err(StoreError::PieceMismatch { index });
        }
        let Some(sh) = &self.shared else {
            return Ok(());
        };
        if sh.cancelled.load(Ordering::SeqCst) {
            return Err(StoreError::NotFound(m.digest));
        }
        if sh.has_piece(index) {
            return Ok(());
        }
        sh.part.write_all_at(bytes, m.piece_offset(index))?;
        let batch = {
            let mut p = sh.progress();
            if !p.have[index as usize] {
                p.have[index as usize] = true;
                p.missing -= 1;
                p.pending.push(index);
                p.pending_bytes += bytes.len() as u64;
            }
            if p.pending_bytes >= FLUSH_BYTES {
                p.pending_bytes = 0;
                std::mem::take(&mut p.pending)
            } else {
                Vec::new()
            }
        };
        sh.record(&batch)?;
        sh.advance(false, Some((index, bytes)))?;
        Ok(())
    }

    /// Records every piece written so far durably (fsync of data, then of the journal).
    pub fn flush(&self) -> Result<(), StoreError> {
        if let Some(sh) = &self.shared {
            let batch = sh.take_pending();
            sh.record(&batch).map_err(|e| self.failed(e.into()))?;
        }
        Ok(())
    }

    /// Completes the pull: every piece must be present ([`StoreError::Incomplete`], the state
    /// is kept). Completes the whole-blob hash (kept up to date over the contiguous prefix of
    /// written pieces as they arrive, reading them back from the file): on [`StoreError::DigestMismatch`] the temp state is
    /// discarded. Otherwise fsyncs, renames into place, fsyncs the directory and indexes the
    /// blob. If the blob became complete meanwhile (a put), the temp state is discarded and
    /// the present blob's manifest returned.
    pub fn finish(self) -> Result<Manifest, StoreError> {
        let store = self.store.clone();
        self.finish_inner().map_err(|e| store.fault(e))
    }

    fn finish_inner(mut self) -> Result<Manifest, StoreError> {
        let d = self.manifest.digest;
        let Some(sh) = self.shared.clone() else {
            self.done = true;
            let mut st = self.store.lock();
            if !st.blobs.contains_key(&d) {
                return Err(StoreError::NotFound(d));
            }
            self.store.touch(&mut st, &d, None);
            return Ok((*st.blobs[&d].manifest).clone());
        };
        if sh.cancelled.load(Ordering::SeqCst) {
            self.done = true;
            return Err(StoreError::NotFound(d));
        }
        let missing = sh.progress().missing;
        if missing > 0 {
            return Err(StoreError::Incomplete { missing });
        }
        if let Err(e) = sh.part.sync_data().and_then(|()| sh.advance(true, None)) {
            let e = StoreError::from(e);
            if matches!(e, StoreError::NoSpace { .. }) {
                sh.no_room.store(true, Ordering::SeqCst);
            }
            return Err(e);
        }
        let got = {
            let f = sh.frontier.lock().unwrap_or_else(|e| e.into_inner());
            Digest(f.hasher.clone().finalize().into())
        };
        let store = self.store.clone();
        let mut st = store.lock();
        self.done = true;
        if sh.cancelled.load(Ordering::SeqCst) {
            return Err(StoreError::NotFound(d));
        }
        let live = st
            .live
            .remove(&d)
            .expect("a live pull is in the map until cancelled");
        if got != d {
            store.sub_used(live.reserved);
            store.remove_pull_files(&d);
            return Err(StoreError::DigestMismatch { want: d, got });
        }
        let res = store.install(
            &mut st,
            (*self.manifest).clone(),
            &store.part_path(&d),
            live.reserved,
        );
        store.remove_pull_files(&d);
        let _ = sync_dir(&store.inner.tmp_dir);
        Ok((*res?).clone())
    }
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull")
            .field("digest", &self.manifest.digest)
            .field("size", &self.manifest.size)
            .field("missing", &self.missing().len())
            .finish()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.blobs_dir)
            .field("used", &self.used_bytes())
            .field("max", &self.max_bytes())
            .finish()
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Some(sh) = &self.shared else { return };
        if sh.cancelled.load(Ordering::SeqCst) {
            return;
        }
        let no_room = sh.no_room.load(Ordering::SeqCst);
        if !no_room {
            let batch = sh.take_pending();
            let _ = sh.record(&batch);
        }
        let mut st = self.store.lock();
        if sh.cancelled.load(Ordering::SeqCst) {
            return;
        }
        let d = self.manifest.digest;
        if let Some(l) = st.live.remove(&d) {
            if no_room {
                // Give the room back: nothing of this pull stays on the full disk.
                self.store.sub_used(l.reserved);
                self.store.remove_pull_files(&d);
                let _ = sync_dir(&self.store.inner.tmp_dir);
                return;
            }
            let tick = st.next_tick();
            st.dormant.insert(
                d,
                Dormant {
                    size: l.reserved,
                    tick,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests;
