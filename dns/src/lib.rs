//! Crux DNS: the registry and the flock served as DNS names, over UDP and TCP, on
//! `hickory-server`'s request, handler and response types (no DNS parsing of our own).
//!
//! ```text
//!   UDP datagram ──► size check ─► rate limit (per source) ─► hickory Request::from_bytes ─┐
//!                    (oversized)    (rate_limited)              (malformed: dropped)       │
//!   TCP stream ──► ≤ 256 connections, 10 s idle ─► hickory Request::from_bytes ────────────┤
//!                                                  (malformed: counted, connection closed) │
//!                                                                                          ▼
//!                     Handler: opcode / one question / class IN ─► Zone::answer(Catalog)
//!                                                                                          │
//!   UDP: encoded within min(512 | EDNS ≤ 1232, 10 × query) bytes, TC set when cut ◄────────┤
//!   TCP: whole answer ◄────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Names (domain `crux.` by default; see [`name`]): `API.service[.HORDE]` (A/AAAA of the live
//! instances best first, SRV with their ports, TXT with their metadata), `_API._tcp.service[.HORDE]`
//! (the RFC 2782 spelling of the same), `INST.inst[.HORDE]`, `NODE.node`, `leader`. Unknown names
//! inside the domain get NXDOMAIN with the zone's SOA; names outside it are forwarded to the
//! upstream resolvers configured ([`forward`]), or get REFUSED when there are none. `ANY` gets
//! one HINFO record (RFC 8482).
//!
//! The crate knows nothing of the agent: it reads a [`Catalog`], which the agent implements over
//! its registry replica and its view of the flock, and counts into [`Stats`].

pub mod answer;
pub mod forward;
pub mod limit;
pub mod name;
pub mod server;
pub mod stats;

use std::net::{IpAddr, SocketAddr};

pub use answer::{Reply, Zone};
pub use server::Dns;
pub use stats::{DropReason, Stats};

/// Default address: loopback only, on Consul's DNS port.
pub const DEFAULT_BIND: &str = "127.0.0.1:8600";
/// Default domain.
pub const DEFAULT_DOMAIN: &str = "crux.";
/// Default TTL, in seconds: answers follow the registry within a heartbeat or so.
pub const DEFAULT_TTL_S: u32 = 5;
/// Default rate per source address, in queries a second (a busy host's resolver stays well
/// under; a flood from one source is cut to it).
pub const DEFAULT_RATE_PER_S: u32 = 2_000;
/// Default burst per source address, in queries.
pub const DEFAULT_BURST: u32 = 4_000;
/// How long one upstream resolver is given to answer a forwarded query.
pub const DEFAULT_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Sources tracked by the rate limiter at most.
pub const RATE_SOURCES_MAX: usize = 65_536;

/// One instance as DNS shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Instance name (e.g. `ntp2_10`).
    pub inst: String,
    /// Its IP, when its address is an IP (A/AAAA); None: SRV only.
    pub ip: Option<IpAddr>,
    /// Its port (SRV).
    pub port: u16,
    /// The node it registered on (TXT).
    pub node: String,
    /// Its metadata (TXT), in a stable order.
    pub metadata: Vec<(String, String)>,
}

/// What DNS reads: the agent implements it over the node's registry replica and flock view.
/// Calls are made on the server's tasks for each query: they must be quick and must not block.
pub trait Catalog: Send + Sync + 'static {
    /// The live instances of `api` in `horde` (empty: the default horde), best first.
    fn service(&self, api: &str, horde: &str) -> Vec<Instance>;
    /// Instance `inst` of `horde` (empty: the default horde), if it lives.
    fn instance(&self, inst: &str, horde: &str) -> Option<Instance>;
    /// The address of node `node` (16 hex digits), if the flock knows it.
    fn node(&self, node: &str) -> Option<IpAddr>;
    /// The address of the leader, if one is known.
    fn leader(&self) -> Option<IpAddr>;
}

/// Settings of the DNS server.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// UDP and TCP address.
    pub bind: SocketAddr,
    /// Domain, e.g. `crux.`.
    pub domain: String,
    /// TTL of every answer, in seconds.
    pub ttl_s: u32,
    /// Queries a second per source address over UDP (0: no limit).
    pub rate_per_s: u32,
    /// Burst per source address.
    pub burst: u32,
    /// Upstream resolvers for names outside the domain, tried in order (empty: REFUSED).
    pub forward: Vec<SocketAddr>,
    /// How long each upstream is given.
    pub forward_timeout: std::time::Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            bind: DEFAULT_BIND.parse().expect("a valid default address"),
            domain: DEFAULT_DOMAIN.into(),
            ttl_s: DEFAULT_TTL_S,
            rate_per_s: DEFAULT_RATE_PER_S,
            burst: DEFAULT_BURST,
            forward: Vec::new(),
            forward_timeout: DEFAULT_FORWARD_TIMEOUT,
        }
    }
}

/// Errors of [`Dns::bind`]. None comes from the network after the start; nothing has changed
/// when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The domain is not a valid DNS name.
    #[error("dns.domain {0}")]
    Domain(String),
    /// The address could not be bound (in use, not local).
    #[error("dns.bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}
