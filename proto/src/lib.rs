//! Crux wire types: the bottom of the crate graph.
//!
//! * [`flock`]: the datagrams and stream frames of the flock protocol, encoded with bincode 2
//!   (varint integers, little endian) under an explicit decode size limit, and the ids and keys
//!   they carry ([`flock::NodeId`], [`flock::BootId`], [`flock::NodeKey`]).
//! * `grpc` (feature `grpc`): the gRPC services generated at build time from
//!   `proto/crux/**/*.proto` with protox (no system `protoc`): the local API on the agent's Unix
//!   socket, the node-to-node services (steward, store, pastiche, dean and proctor) and the
//!   plugin control API.
//!
//! Decoding is a pure function over a byte slice: it never panics, never allocates more than the
//! limit allows, and reports malformed input as a [`flock::DecodeError`].
//!
//! **Never.** This crate depends on no other Crux crate and holds types and codecs only: no IO,
//! no state, no policy. The flock core builds it without the `grpc` feature, so nothing the
//! flock needs may depend on tonic or prost.

pub mod flock;
pub mod grpc;
