//! Pastiche: the per-node content-addressed cache with verified peer pulls.
//!
//! * [`store`]: the local store: blobs named by their SHA-256 digest, a manifest per blob
//!   (size, pieces, one hash per piece), bounded disk use with LRU eviction and pins, and
//!   resumable, piece-verified pulls (see [`Store::begin_pull`]). Synchronous `std::fs` code;
//!   async callers run it on a blocking thread.
//! * [`serve`]: the node service other nodes' pullers call (manifest, have, pieces), over the
//!   node plane only.
//! * [`pull`]: the puller: several holders at once, rarest piece first, bad holders dropped.
//!   Holders come from the steward, asked through the node's reeve (the steward is the tracker).
//! * [`cache`]: the local API (`crux pastiche ...`) and the loop that tells the steward what this
//!   node holds.
//!
//! **Disk full.** A write the filesystem refuses for lack of room (ENOSPC, EDQUOT) fails with
//! [`StoreError::NoSpace`] (`disk full: <dir>`, a gRPC `RESOURCE_EXHAUSTED`), counted in
//! [`Store::write_errors`], and leaves nothing behind: a pull allocates its room when it begins
//! (so it fails then, not half way), and one that found no room drops its temp state. The next
//! write after space is freed simply works.
//!
//! **Never.** A partial or corrupt blob is never visible under its digest: every piece is
//! verified, then the whole digest, and only a fully written, fsynced file is renamed into
//! place. A pinned blob is never evicted. The node service answers only callers the node plane
//! proved (`crux_transport::peer`), and peers are dialled only through the node's
//! [`crux_transport::Transport`]; no key or connection is process-global.

pub mod cache;
pub mod digest;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod serve;
pub mod store;

pub use digest::{sha256, Digest, DigestError, PIECE_SIZE};
pub use manifest::{Manifest, MAX_PIECE_SIZE, MIN_PIECE_SIZE};
pub use store::{
    is_full, Entry, Import, ImportWriteError, Pull, Store, StoreError, VerifyReport, WriteErrors,
};
