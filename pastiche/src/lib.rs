//! Pastiche: the per-node content-addressed cache with verified peer pulls.
//!
//! This crate is the local store: blobs named by their SHA-256 digest, a manifest per blob
//! (size, pieces, one hash per piece), bounded disk use with LRU eviction and pins, and
//! resumable, piece-verified pulls (see [`Store::begin_pull`]). All of it is synchronous
//! `std::fs` code; async callers run it on a blocking thread.

pub mod digest;
pub mod manifest;
pub mod store;

pub use digest::{sha256, Digest, DigestError, PIECE_SIZE};
pub use manifest::{Manifest, MAX_PIECE_SIZE, MIN_PIECE_SIZE};
pub use store::{Entry, Pull, Store, StoreError, VerifyReport};
