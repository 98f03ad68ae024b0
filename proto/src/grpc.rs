//! gRPC services (feature `grpc`), generated from `proto/crux/**/*.proto` at build time.
//!
//! * [`reeve::v1`]: the local API each agent serves on its Unix socket (members, leader, status,
//!   keyring; the registry calls join it later).
#![cfg(feature = "grpc")]

/// The reeve API.
pub mod reeve {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.reeve.v1");
    }
}
