//! Pastiche: the per-node content-addressed cache with verified peer pulls.
//!
//! * [`store`]: the local store: blobs named by their SHA-256 digest, a manifest per blob
//!   (size, pieces, one hash per piece), bounded disk use with LRU eviction and pins, and
//!   resumable, piece-verified pulls (see [`Store::begin_pull`]). Synchronous `std::fs` code;
//!   async callers run it on a blocking thread.
//! * [`serve`]: the node service other nodes' pullers call (manifest, have, pieces).
//! * [`pull`]: the puller: several holders at once, rarest piece first, bad holders dropped.
//! * [`cache`]: the local API (`crux pastiche ...`) and the loop that tells the steward what this
//!   node holds.

pub mod cache;
pub mod digest;
pub mod manifest;
pub mod pull;
pub mod serve;
pub mod store;

pub use digest::{sha256, Digest, DigestError, PIECE_SIZE};
pub use manifest::{Manifest, MAX_PIECE_SIZE, MIN_PIECE_SIZE};
pub use store::{Entry, Pull, Store, StoreError, VerifyReport};
