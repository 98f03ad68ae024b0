//! The segment log of one standalone topic: append-only files of framed records, a sparse
//! in-memory index, retention by size and age that drops whole segments, and the consumer
//! groups' committed offsets.
//!
//! ```text
//!   <dir>/topic.json                      retention
//!   <dir>/groups.json                     {group: next offset}, replaced atomically (rename)
//!   <dir>/00000000000000000000.log        records of offsets 0 …
//!   <dir>/00000000000000052817.log        records of offsets 52817 … (the active segment)
//!
//!   record = len u32 LE | crc32 u32 LE (of time and payload) | time_ms u64 LE | payload
//! ```
//!
//! A record is acknowledged once written to the file (the OS holds it: it survives a crash of
//! the agent); [`TopicLog::sync`] (the service's maintenance tick, every second) makes it
//! durable against a crash of the machine. On open, each segment is read through and a torn or
//! corrupt tail (a write cut short) is cut off: offsets stay dense.
//!
//! Memory per topic is bounded by the number of segments and one index entry per
//! [`INDEX_EVERY`] records; readers read from the files (the OS page cache), so a slow reader
//! costs disk, not memory.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{CatalystError, Message, Retention};

/// Bytes of a record's header (length, CRC, time).
pub const HEADER_BYTES: usize = 16;
/// One index entry per this many records (a read scans at most this many to find its start).
pub const INDEX_EVERY: u64 = 64;
/// A segment is closed (and a new one started) past this size: 64 MiB, as small as retention
/// by size needs it (see [`segment_bytes`]).
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;

/// The size at which a segment of a topic with `retention` rolls over: a quarter of the size
/// limit, so that dropping the oldest segment frees at most a quarter of it, within 1 MiB and
/// [`SEGMENT_BYTES_MAX`].
pub fn segment_bytes(retention: &Retention) -> u64 {
    if retention.max_bytes == 0 {
        SEGMENT_BYTES_MAX
    } else {
        (retention.max_bytes / 4).clamp(1 << 20, SEGMENT_BYTES_MAX)
    }
}

#[derive(Serialize, Deserialize)]
struct Meta {
    max_bytes: u64,
    max_age_ms: u64,
}

struct Segment {
    base: u64,
    count: u64,
    size: u64,
    path: PathBuf,
    file: Arc<File>,
    /// File position of record `base + i * INDEX_EVERY`.
    index: Vec<u64>,
    first_time_ms: u64,
    last_time_ms: u64,
}

impl Segment {
    fn next(&self) -> u64 {
        self.base + self.count
    }
}

struct State {
    segments: Vec<Segment>,
    /// The active segment, opened for appending.
    writer: File,
    dirty: bool,
    groups: BTreeMap<String, u64>,
}

/// One topic's log.
pub struct TopicLog {
    name: String,
    dir: PathBuf,
    retention: Retention,
    segment_bytes: u64,
    state: Mutex<State>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> CatalystError {
    CatalystError::Io(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// Encodes one record into `buf`.
pub fn encode(buf: &mut Vec<u8>, time_ms: u64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&time_ms.to_le_bytes());
    crc.update(payload);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc.finalize().to_le_bytes());
    buf.extend_from_slice(&time_ms.to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Decodes the record at the start of `buf`: `(time_ms, payload range, record length)`, or
/// `None` if `buf` holds no whole, intact record.
pub fn decode(buf: &[u8]) -> Option<(u64, std::ops::Range<usize>, usize)> {
    if buf.len() < HEADER_BYTES {
        return None;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    let time_ms = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let end = HEADER_BYTES.checked_add(len)?;
    if buf.len() < end {
        return None;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[8..16]);
    h.update(&buf[HEADER_BYTES..end]);
    (h.finalize() == crc).then_some((time_ms, HEADER_BYTES..end, end))
}

/// Reads a segment file through: its intact records, cutting off a torn tail.
fn load_segment(path: &Path, base: u64) -> Result<Segment, CatalystError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| io("reading", path, e))?;
    let (mut pos, mut count, mut index) = (0usize, 0u64, Vec::new());
    let (mut first_time_ms, mut last_time_ms) = (0, 0);
    while let Some((t, _, len)) = decode(&data[pos..]) {
        if count.is_multiple_of(INDEX_EVERY) {
            index.push(pos as u64);
        }
        if count == 0 {
            first_time_ms = t;
        }
        last_time_ms = t;
        count += 1;
        pos += len;
    }
    if pos < data.len() {
        tracing::warn!(segment = %path.display(), kept = pos, dropped = data.len() - pos,
            "catalyst: cutting a torn or corrupt tail off a segment");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io("opening", path, e))?;
        f.set_len(pos as u64)
            .and_then(|()| f.sync_all())
            .map_err(|e| io("truncating", path, e))?;
    }
    let file = File::open(path).map_err(|e| io("opening", path, e))?;
    Ok(Segment {
        base,
        count,
        size: pos as u64,
        path: path.to_path_buf(),
        file: Arc::new(file),
        index,
        first_time_ms,
        last_time_ms,
    })
}

fn new_segment(dir: &Path, base: u64) -> Result<(Segment, File), CatalystError> {
    let path = segment_path(dir, base);
    let writer = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    let file = File::open(&path).map_err(|e| io("opening", &path, e))?;
    Ok((
        Segment {
            base,
            count: 0,
            size: 0,
            path,
            file: Arc::new(file),
            index: Vec::new(),
            first_time_ms: 0,
            last_time_ms: 0,
        },
        writer,
    ))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CatalystError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", &tmp, e))
}

/// What [`TopicLog::read`] found.
pub struct Batch {
    /// The messages, in offset order.
    pub messages: Vec<Message>,
    /// The offset to read next.
    pub next: u64,
}

/// Figures of a topic.
#[derive(Clone, Debug)]
pub struct Figures {
    /// Oldest offset kept.
    pub first: u64,
    /// Offset of the next message.
    pub next: u64,
    /// Bytes of its segments.
    pub bytes: u64,
    /// Committed offsets.
    pub groups: BTreeMap<String, u64>,
}

impl TopicLog {
    /// Makes a new topic in `dir` (which must not exist).
    pub fn create(name: &str, dir: &Path, retention: Retention) -> Result<TopicLog, CatalystError> {
        std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let meta = Meta {
            max_bytes: retention.max_bytes,
            max_age_ms: retention.max_age.as_millis() as u64,
        };
        let json =
            serde_json::to_vec_pretty(&meta).map_err(|e| CatalystError::Io(e.to_string()))?;
        write_atomically(&dir.join("topic.json"), &json)?;
        TopicLog::open(name, dir)
    }

    /// Opens the topic in `dir`.
    pub fn open(name: &str, dir: &Path) -> Result<TopicLog, CatalystError> {
        let meta_path = dir.join("topic.json");
        let meta: Meta = std::fs::read(&meta_path)
            .map_err(|e| io("reading", &meta_path, e))
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| CatalystError::Io(format!("{}: {e}", meta_path.display())))
            })?;
        let retention = Retention {
            max_bytes: meta.max_bytes,
            max_age: Duration::from_millis(meta.max_age_ms),
        };
        let mut bases: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io("listing", dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                n.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut segments = Vec::new();
        for base in bases {
            let seg = load_segment(&segment_path(dir, base), base)?;
            // A segment must start where the one before ends; after a torn tail it may not:
            // later segments would leave a hole, so they are dropped (they were never acked
            // past the torn record's ack, which did not happen).
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.next() != base {
                    tracing::warn!(segment = %seg.path.display(), "catalyst: dropping a segment after a gap");
                    let _ = std::fs::remove_file(&seg.path);
                    continue;
                }
            }
            segments.push(seg);
        }
        let writer = match segments.last() {
            Some(s) => OpenOptions::new()
                .append(true)
                .open(&s.path)
                .map_err(|e| io("opening", &s.path, e))?,
            None => {
                let (seg, w) = new_segment(dir, 0)?;
                segments.push(seg);
                w
            }
        };
        let groups_path = dir.join("groups.json");
        let groups = match std::fs::read(&groups_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| CatalystError::Io(format!("{}: {e}", groups_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io("reading", &groups_path, e)),
        };
        Ok(TopicLog {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes(&retention),
            retention,
            state: Mutex::new(State {
                segments,
                writer,
                dirty: false,
                groups,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its retention.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `messages` stored at `time_ms`; the offset of the first. Either all are written
    /// or (an I/O error) none is counted.
    pub fn append(&self, messages: &[Bytes], time_ms: u64) -> Result<u64, CatalystError> {
        let mut st = self.lock();
        let State {
            segments, writer, ..
        } = &mut *st;
        let Some(active) = segments.last() else {
            return Err(CatalystError::Io("topic has no segment".into()));
        };
        if active.size >= self.segment_bytes {
            let (seg, w) = new_segment(&self.dir, active.next())?;
            writer
                .sync_data()
                .map_err(|e| io("syncing", &active.path, e))?;
            segments.push(seg);
            *writer = w;
        }
        let seg = segments.last_mut().expect("a segment");
        let first = seg.next();
        let mut buf = Vec::with_capacity(
            messages
                .iter()
                .map(|m| m.len() + HEADER_BYTES)
                .sum::<usize>(),
        );
        let mut positions = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if (seg.count + i as u64).is_multiple_of(INDEX_EVERY) {
                positions.push(seg.size + buf.len() as u64);
            }
            encode(&mut buf, time_ms, m);
        }
        if let Err(e) = writer.write_all(&buf) {
            // Put the file back as it was, so that the records stay dense.
            let _ = writer.set_len(seg.size);
            return Err(io("appending to", &seg.path, e));
        }
        if seg.count == 0 {
            seg.first_time_ms = time_ms;
        }
        seg.last_time_ms = time_ms;
        seg.index.extend(positions);
        seg.size += buf.len() as u64;
        seg.count += messages.len() as u64;
        st.dirty = true;
        Ok(first)
    }

    /// Up to `max_messages` messages (and about `max_bytes`, at least one) from offset `from`
    /// on, within one segment. `from` before the oldest kept reads from the oldest.
    pub fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Batch, CatalystError> {
        let (file, base, pos, end, path) = {
            let st = self.lock();
            let first = st.segments.first().map(|s| s.base).unwrap_or(0);
            let from = from.max(first);
            let i = st.segments.partition_point(|s| s.next() <= from);
            let Some(seg) = st.segments.get(i) else {
                return Ok(Batch {
                    messages: Vec::new(),
                    next: from,
                });
            };
            let slot = ((from - seg.base) / INDEX_EVERY) as usize;
            let indexed = seg.base + slot as u64 * INDEX_EVERY;
            (
                seg.file.clone(),
                (indexed, from),
                seg.index[slot],
                seg.size,
                seg.path.clone(),
            )
        };
        let (mut offset, from) = base;
        let mut pos = pos;
        let rd = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at)
                .map_err(|e| io("reading", &path, e))
        };
        // Skip (by their headers) the records between the indexed one and `from`.
        let mut header = [0u8; HEADER_BYTES];
        while offset < from {
            rd(&mut header[..4], pos)?;
            pos += (HEADER_BYTES
                + u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize)
                as u64;
            offset += 1;
        }
        rd(&mut header, pos)?;
        let first_len = HEADER_BYTES as u64
            + u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
        let want = first_len.max(max_bytes as u64).min(end - pos);
        let mut buf = vec![0u8; want as usize];
        rd(&mut buf, pos)?;
        let buf = Bytes::from(buf);
        let mut at = 0usize;
        let mut messages = Vec::new();
        let mut bytes = 0usize;
        while messages.len() < max_messages {
            let Some((time_ms, range, len)) = decode(&buf[at..]) else {
                break;
            };
            if !messages.is_empty() && bytes + range.len() > max_bytes {
                break;
            }
            bytes += range.len();
            messages.push(Message {
                offset,
                payload: buf.slice(range.start + at..range.end + at),
                time_ms,
            });
            offset += 1;
            at += len;
        }
        let next = messages.last().map(|m| m.offset + 1).unwrap_or(from);
        Ok(Batch { messages, next })
    }

    /// Oldest offset kept, next offset, bytes and groups.
    pub fn figures(&self) -> Figures {
        let st = self.lock();
        Figures {
            first: st.segments.first().map(|s| s.base).unwrap_or(0),
            next: st.segments.last().map(|s| s.next()).unwrap_or(0),
            bytes: st.segments.iter().map(|s| s.size).sum(),
            groups: st.groups.clone(),
        }
    }

    /// The offset `group` reads next, if it committed one.
    pub fn committed(&self, group: &str) -> Option<u64> {
        self.lock().groups.get(group).copied()
    }

    /// Records that `group` reads `next` next (at most the topic's next offset).
    pub fn commit(&self, group: &str, next: u64) -> Result<(), CatalystError> {
        let mut st = self.lock();
        let end = st.segments.last().map(|s| s.next()).unwrap_or(0);
        if next > end {
            return Err(CatalystError::OffsetPastEnd {
                topic: self.name.clone(),
                offset: next,
                next: end,
            });
        }
        let before = st.groups.insert(group.to_string(), next);
        let json = serde_json::to_vec(&st.groups).map_err(|e| CatalystError::Io(e.to_string()))?;
        if let Err(e) = write_atomically(&self.dir.join("groups.json"), &json) {
            match before {
                Some(b) => st.groups.insert(group.to_string(), b),
                None => st.groups.remove(group),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Makes what was appended durable (fdatasync of the active segment), if anything was.
    pub fn sync(&self) -> Result<(), CatalystError> {
        let mut st = self.lock();
        if st.dirty {
            st.writer
                .sync_data()
                .map_err(|e| CatalystError::Io(format!("syncing {}: {e}", self.dir.display())))?;
            st.dirty = false;
        }
        Ok(())
    }

    /// Drops the oldest segments (never the active one) while the topic is over its size
    /// limit, or while their newest message is older than its age limit at `now_ms`. The number
    /// of segments dropped.
    pub fn enforce_retention(&self, now_ms: u64) -> usize {
        let mut st = self.lock();
        let mut dropped = 0;
        let age_ms = self.retention.max_age.as_millis() as u64;
        // The active segment is rolled once its oldest message is past half the age limit, so
        // that it can be dropped in time.
        if age_ms > 0 {
            if let Some(a) = st.segments.last() {
                if a.count > 0 && now_ms.saturating_sub(a.first_time_ms) > age_ms / 2 {
                    if let Ok((seg, w)) = new_segment(&self.dir, a.next()) {
                        let _ = st.writer.sync_data();
                        st.segments.push(seg);
                        st.writer = w;
                    }
                }
            }
        }
        loop {
            if st.segments.len() < 2 {
                break;
            }
            let total: u64 = st.segments.iter().map(|s| s.size).sum();
            let oldest = &st.segments[0];
            let over_size = self.retention.max_bytes > 0 && total > self.retention.max_bytes;
            let too_old = age_ms > 0 && now_ms.saturating_sub(oldest.last_time_ms) > age_ms;
            if !(over_size || too_old) {
                break;
            }
            let seg = st.segments.remove(0);
            if let Err(e) = std::fs::remove_file(&seg.path) {
                tracing::warn!(segment = %seg.path.display(), error = %e, "catalyst: removing a segment");
            }
            dropped += 1;
        }
        dropped
    }
}
