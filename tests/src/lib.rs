//! Cross-crate integration tests: the harness that runs clusters of real agent processes on
//! loopback (the flock simulations live in `crux_flock::sim` and `flock/tests/`).
//!
//! [`cluster`] starts real `crux agent` processes on a loopback range of their own, talks to them
//! through the `crux` CLI (as a person or a script would), and kills only the processes it
//! started. The end-to-end tests that use it live beside the binary, in `agent/tests/`, where
//! cargo builds the `crux` executable for them; the store, pastiche, registry and placement
//! benchmarks under `bench/` use it too. [`netns`] puts each agent of a cluster in a network
//! namespace of its own on one bridge ([`cluster::Cluster::in_netns`]), so that a test can cut
//! real links between them: partitions, one-way loss, a host cut off. [`tmpfs`] mounts small
//! filesystems for a node's directories and fills them (disk-full tests).
//!
//! **Never.** The harness signals only the agents it started and the plugins their pickets
//! recorded (pid and start time checked), never a process by name; it binds no fixed port (each
//! cluster takes a loopback range of its own, a port found free on all of it and its own bloc
//! ID; a [`netns`] cluster's agents use fixed ports inside namespaces that only it has); and it
//! never sleeps as synchronisation: it polls a condition up to a deadline
//! ([`cluster::wait_for`]). A failing test keeps its cluster's directory (configs, data, logs)
//! and prints where it is.

pub mod cluster;
pub mod netns;
pub mod tmpfs;
