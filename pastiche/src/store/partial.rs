//! Imports from outside the flock: a blob written in order from a source (an object store, an
//! HTTP server) whose digest is known before the first byte arrives.
//!
//! The bytes go to `imports/<hex>.part` in the store's directory, hashed as they come. That
//! file is kept across a crash (a `kill -9` mid-download): the next [`Store::begin_import`] of
//! the same digest from the same source (same `tag`: URL, size, entity tag) rehashes what is
//! there and goes on from its end. A blob becomes visible under its digest only when every
//! byte is there and the whole digest matches; a mismatch removes the file and says which
//! digest was found. A download that fails for good is [`Import::abandon`]ed: nothing is left.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use super::{hash_prefix, wall_clock, Hasher, Store, StoreError};
use crate::digest::{Digest, PIECE_SIZE};
use crate::manifest::Manifest;

/// How long an import nobody resumes is kept before [`Store::open`] removes it.
pub const IMPORT_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A blob being imported: see the module doc. Dropping it without [`Import::finish`] or
/// [`Import::abandon`] (a cancelled task) keeps the partial file for a later resume and gives
/// back the room it reserved.
pub struct Import {
    store: Store,
    want: Digest,
    size: u64,
    path: PathBuf,
    file: Option<File>,
    hasher: Option<Hasher>,
    written: u64,
    resumed: u64,
    reserved: u64,
    /// Whether this import holds the digest's mark in `importing`.
    marked: bool,
}

impl Store {
    pub(super) fn imports_dir(&self) -> PathBuf {
        self.inner.dir.join("imports")
    }

    fn import_paths(&self, d: &Digest) -> (PathBuf, PathBuf) {
        let dir = self.imports_dir();
        (
            dir.join(format!("{}.part", d.hex())),
            dir.join(format!("{}.tag", d.hex())),
        )
    }

    /// Begins (or resumes) the import of the blob `want` of `size` bytes. `tag` names the
    /// source and version (e.g. URL, size and entity tag): bytes kept from an earlier import
    /// are reused only under the same tag. Reserves `size` bytes of room (evicting as needed).
    ///
    /// Fails with [`StoreError::PullInProgress`] while another import of `want` is live, and
    /// with [`StoreError::TooLarge`]/[`StoreError::Busy`] when the blob cannot fit. If the blob
    /// is already present the import is complete at once ([`Import::is_present`]).
    pub fn begin_import(&self, want: Digest, size: u64, tag: &str) -> Result<Import, StoreError> {
        self.begin_import_inner(want, size, tag)
            .map_err(|e| self.fault(e))
    }

    fn begin_import_inner(&self, want: Digest, size: u64, tag: &str) -> Result<Import, StoreError> {
        let (path, tag_path) = self.import_paths(&want);
        let mut imp = Import {
            store: self.clone(),
            want,
            size,
            path: path.clone(),
            file: None,
            hasher: None,
            written: 0,
            resumed: 0,
            reserved: 0,
            marked: false,
        };
        {
            let mut st = self.lock();
            if st.blobs.contains_key(&want) {
                self.touch(&mut st, &want, None);
                return Ok(imp);
            }
            if !st.importing.insert(want) {
                return Err(StoreError::PullInProgress(want));
            }
            imp.marked = true;
            // From here on, dropping `imp` ends the import's mark and reservation.
            imp.hasher = Some(Hasher::new(PIECE_SIZE));
            self.make_room(&mut st, size, size)?;
            imp.reserved = size;
        }
        fs::create_dir_all(self.imports_dir())?;
        let same_source = fs::read_to_string(&tag_path).is_ok_and(|t| t == tag);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let held = file.metadata()?.len();
        if same_source && held > 0 && held <= size {
            let h = hash_prefix(&file, PIECE_SIZE, held)?;
            imp.written = held;
            imp.resumed = held;
            imp.hasher = Some(h);
        } else {
            file.set_len(0)?;
            file.sync_all()?;
            fs::write(&tag_path, tag)?;
        }
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(imp.written))?;
        imp.file = Some(file);
        Ok(imp)
    }

    /// Removes the import files of blobs now complete and of imports nobody resumed for
    /// [`IMPORT_KEPT`]. Called by `open`.
    pub(super) fn clean_imports(&self, complete: &HashSet<Digest>) {
        let Ok(dir) = fs::read_dir(self.imports_dir()) else {
            return;
        };
        let now = wall_clock();
        for ent in dir.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let digest = name
                .strip_suffix(".part")
                .or_else(|| name.strip_suffix(".tag"))
                .and_then(super::hex_name);
            let old = ent
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > IMPORT_KEPT);
            if digest.is_none_or(|d| complete.contains(&d)) || old {
                let _ = fs::remove_file(ent.path());
            }
        }
    }
}

impl Import {
    /// Whether the blob was already present when the import began (nothing to download).
    pub fn is_present(&self) -> bool {
        self.hasher.is_none()
    }

    /// Bytes held so far: where the download goes on from.
    pub fn offset(&self) -> u64 {
        self.written
    }

    /// Bytes reused from an earlier, interrupted import.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// The size announced at the start.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends the next bytes. More bytes than announced is an error (the import is then
    /// abandoned by the caller).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ImportWriteError> {
        let (Some(f), Some(h)) = (self.file.as_mut(), self.hasher.as_mut()) else {
            return Ok(());
        };
        if self.written + bytes.len() as u64 > self.size {
            return Err(ImportWriteError::Oversize {
                announced: self.size,
            });
        }
        f.write_all(bytes)
            .map_err(|e| ImportWriteError::Store(self.store.fault(e.into())))?;
        h.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Makes the bytes written so far durable (what a resume after a crash starts from).
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if let Some(f) = self.file.as_ref() {
            f.sync_data().map_err(|e| self.store.fault(e.into()))?;
        }
        Ok(())
    }

    /// Checks and installs the blob: every announced byte written and the whole digest the one
    /// wanted. On a mismatch the bytes are removed and [`StoreError::DigestMismatch`] names the
    /// digest found. On a short input ([`StoreError::Incomplete`]) the bytes stay for a resume.
    pub fn finish(mut self) -> Result<Manifest, StoreError> {
        let Some(h) = self.hasher.take() else {
            return self
                .store
                .manifest(&self.want)
                .ok_or(StoreError::NotFound(self.want));
        };
        if self.written < self.size {
            self.hasher = Some(h);
            return Err(StoreError::Incomplete {
                missing: usize::try_from(self.size - self.written).unwrap_or(usize::MAX),
            });
        }
        let m = h.finish();
        if m.digest != self.want {
            self.abandon_files();
            return Err(StoreError::DigestMismatch {
                want: self.want,
                got: m.digest,
            });
        }
        if let Some(f) = self.file.take() {
            f.sync_all().map_err(|e| self.store.fault(e.into()))?;
        }
        let store = self.store.clone();
        let mut st = store.lock();
        let reserved = std::mem::take(&mut self.reserved);
        st.importing.remove(&self.want);
        self.marked = false;
        let res = store.install(&mut st, m, &self.path, reserved);
        drop(st);
        let _ = fs::remove_file(self.import_paths().1);
        res.map(|m| (*m).clone()).map_err(|e| store.fault(e))
    }

    /// Gives up: removes the bytes written so far (a download that failed for good leaves
    /// nothing behind).
    pub fn abandon(mut self) {
        self.abandon_files();
    }

    fn abandon_files(&mut self) {
        self.file = None;
        let (part, tag) = self.import_paths();
        let _ = fs::remove_file(part);
        let _ = fs::remove_file(tag);
    }

    fn import_paths(&self) -> (PathBuf, PathBuf) {
        self.store.import_paths(&self.want)
    }
}

impl Drop for Import {
    fn drop(&mut self) {
        if !self.marked && self.reserved == 0 {
            return;
        }
        let mut st = self.store.lock();
        if std::mem::take(&mut self.marked) {
            st.importing.remove(&self.want);
        }
        self.store.sub_used(std::mem::take(&mut self.reserved));
    }
}

/// Why [`Import::write`] refused bytes.
#[derive(Debug, thiserror::Error)]
pub enum ImportWriteError {
    /// The source sent more bytes than it announced.
    #[error("the source sent more than the {announced} bytes it announced")]
    Oversize {
        /// The size announced.
        announced: u64,
    },
    /// The store could not write them.
    #[error("{0}")]
    Store(StoreError),
}
