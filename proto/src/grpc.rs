//! gRPC services (feature `grpc`), generated from `proto/crux/**/*.proto` at build time.
//!
//! * [`reeve::v1`]: the local API each agent serves on its Unix socket (members, leader, status,
//!   keyring, and the service registry: register, heartbeat, lookup, watch).
//! * [`steward::v1`]: the node-to-node registry API the leader serves on the node gRPC port.
//! * [`pastiche::v1`]: the content-addressed cache: pieces between nodes, and the local API.
//! * [`store::v1`]: the Raft-replicated store between nodes (Raft RPCs, forwarding, status).
//! * [`plugin::v1`]: what a plugin process serves to picket (Shutdown, next to grpc.health.v1).
//! * [`proctor::v1`]: placement: dean sync, proctor status, and the local placement API.
//! * [`kv::v1`]: Blueprint K/V on the local socket.
//! * [`catalyst::v1`]: Catalyst durable topics on the local socket.
//! * [`fuse::v1`]: Fuse routes on the local socket.
#![cfg(feature = "grpc")]

/// Every file of `proto/crux/**` (and what they import) as an encoded
/// `google.protobuf.FileDescriptorSet`, from the same compile as the code: what gRPC server
/// reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/crux_descriptor.bin"));

/// The reeve API.
pub mod reeve {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.reeve.v1");
    }
}

/// The steward API.
pub mod steward {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.steward.v1");
    }
}

/// The pastiche API.
pub mod pastiche {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.pastiche.v1");
    }
}

/// The store API.
pub mod store {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.store.v1");
    }
}

/// The plugin control API.
pub mod plugin {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.plugin.v1");
    }
}

/// The placement API.
pub mod proctor {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.proctor.v1");
    }
}

/// The K/V API.
pub mod kv {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.kv.v1");
    }
}

/// The Catalyst (durable topics) API.
pub mod catalyst {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.catalyst.v1");
    }
}

/// The Fuse routes API (routes served to proxies as xDS).
pub mod fuse {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("crux.fuse.v1");
    }
}
