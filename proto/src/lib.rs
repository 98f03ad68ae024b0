//! Crux wire types.
//!
//! * [`flock`]: the datagrams and stream frames of the flock protocol, encoded with bincode 2
//!   (varint integers, little endian) under an explicit decode size limit.
//!
//! Decoding is a pure function over a byte slice: it never panics, never allocates more than the
//! limit allows, and reports malformed input as a [`flock::DecodeError`].

pub mod flock;
pub mod grpc;
