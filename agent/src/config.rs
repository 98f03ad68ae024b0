//! Agent configuration: a TOML file, overridden by `CRUX_*` environment variables, overridden by
//! command-line flags. Every source fills the same [`RawConfig`]; [`RawConfig::validate`] turns it
//! into [`Settings`] or a [`ConfigError`] naming the field and the reason.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crux_flock::{AddressSpace, Config as FlockConfig, Preset, Timing};
use serde::{Deserialize, Serialize};

/// Flock UDP port (and TCP for push-pull streams), as DESIGN.md "Operating it".
pub const DEFAULT_FLOCK_PORT: u16 = 7700;
/// Node-to-node gRPC port (TCP).
pub const DEFAULT_GRPC_PORT: u16 = 7701;
/// HTTP port: `/metrics`, `/ready`, status page.
pub const DEFAULT_HTTP_PORT: u16 = 7702;
/// Local API socket.
pub const DEFAULT_SOCKET: &str = "/run/crux/reeve.sock";
/// Data dir: node identity, keyring.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/crux";
/// A graceful leave is gossiped for the preset's `leave_propagation`; this bounds the wait.
pub const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A config value that is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field as named in the config file, with its table (`timing.probe_interval`), and, for
    /// env/flags, where the value came from.
    pub field: String,
    /// Why it is refused.
    pub reason: String,
    /// Where the value is written, when it came from a file: `path:line` (or `path` alone, or
    /// `line N` for text without a file).
    pub at: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.at {
            write!(f, "{at}: ")?;
        }
        write!(f, "config field `{}`: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error of `field`, not (yet) located in a file.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
            at: None,
        }
    }
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::new(field, reason))
}

/// Longest bloc ID.
pub const BLOC_MAX: usize = 64;

/// Whether `bloc` has the shape of a bloc ID: 1 to [`BLOC_MAX`] ASCII letters, digits, `.`, `_`
/// or `-`, starting with a letter or a digit (it names the flock in files, logs and metrics, so
/// no spaces, slashes or control characters).
pub fn bloc_shape_ok(bloc: &str) -> bool {
    !bloc.is_empty()
        && bloc.len() <= BLOC_MAX
        && bloc.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bloc
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The 1-based line of `text` where `field` (`key`, or `table.key`) is set, if it is.
pub fn line_of(text: &str, field: &str) -> Option<usize> {
    let (table, key) = match field.rsplit_once('.') {
        Some((t, k)) => (t, k),
        None => ("", field),
    };
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            continue;
        }
        if current != table {
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if k.trim().trim_matches('"') == key {
            return Some(n + 1);
        }
    }
    None
}

/// The table (`timing`, `store`, …) in force at byte `at` of `text` ("" at the top level).
fn table_at(text: &str, at: usize) -> String {
    let mut current = String::new();
    for line in text[..at.min(text.len())].lines() {
        if let Some(h) = line.trim().strip_prefix('[') {
            current = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
        }
    }
    current
}

/// Optional per-field overrides of the preset's timings (`[timing]` table; durations are
/// humantime strings such as `"500ms"` or `"2s"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct TimingOverrides {
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub probe_interval: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub probe_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub indirect_probes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspicion_mult: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspicion_max_mult: Option<u32>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub gossip_interval: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gossip_fanout: Option<usize>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub push_pull_interval: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub leader_beat_interval: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub leader_timeout: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub settle: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub reap_after: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub discovery_interval_alone: Option<Duration>,
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub discovery_interval: Option<Duration>,
}

impl TimingOverrides {
    fn apply(&self, t: &mut Timing) {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { t.$f = v; } )* };
        }
        set!(
            probe_interval,
            probe_timeout,
            indirect_probes,
            suspicion_mult,
            suspicion_max_mult,
            gossip_interval,
            gossip_fanout,
            push_pull_interval,
            leader_beat_interval,
            leader_timeout,
            settle,
            reap_after,
            discovery_interval_alone,
            discovery_interval
        );
    }
}

/// The registry's tunables (`[registry]` table; durations are humantime strings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The heartbeat interval services are asked to keep, and at which each reeve forwards the
    /// validity of its instances to the steward.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How long an instance past its valid-until time stays listed (as `unknown`) before it is
    /// removed. At least 1 minute in production; shorter values are for tests.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat_interval: Duration::from_secs(1),
            grace: Duration::from_secs(60),
        }
    }
}

/// Pastiche, the node's content-addressed cache (`[pastiche]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasticheConfig {
    /// Where blobs are kept. Default: `<data_dir>/pastiche`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Most bytes of blobs kept (least recently used evicted first; pinned never): a number of
    /// bytes, or with a unit: `512MiB`, `10GiB`, `1TB`.
    pub max_size: String,
    /// Test hook: every piece this node serves to others has a byte flipped. Never set it in
    /// production.
    pub corrupt_serving_for_tests: bool,
    /// The S3 endpoint artifacts are imported from (`crux pastiche fetch s3://…`), e.g.
    /// `http://10.0.0.5:9000` for a local S3-compatible server. Default: the agent's
    /// `AWS_ENDPOINT_URL`, else AWS itself. Credentials come from the agent's environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<String>,
    /// The S3 region. Default: the agent's `AWS_REGION`/`AWS_DEFAULT_REGION`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_region: Option<String>,
    /// Bytes per second one import from outside the flock may take: `0` (no limit) or a size,
    /// e.g. `50MiB` (so that importing does not fill the node's link).
    pub import_rate: String,
}

impl Default for PasticheConfig {
    fn default() -> Self {
        PasticheConfig {
            dir: None,
            max_size: "10GiB".into(),
            corrupt_serving_for_tests: false,
            s3_endpoint: None,
            s3_region: None,
            import_rate: "0".into(),
        }
    }
}

/// Parses a size: bytes, or a number with `KB`/`MB`/`GB`/`TB` (powers of 1000) or
/// `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "{text:?}: unknown unit {u:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 512MiB or 10GiB"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("{text:?} is not a size"));
    }
    Ok((n * mult as f64) as u64)
}

/// The durable store (`[store]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// How long the flock must hold a voter dead before another member replaces it.
    #[serde(with = "humantime_serde")]
    pub voter_grace: Duration,
    /// Test hook: while this file exists, the node's store drops all its node-to-node traffic
    /// (Raft and forwarded requests, sent and received), as if cut off. Never set it in
    /// production.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition_file_for_tests: Option<PathBuf>,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            voter_grace: Duration::from_secs(60),
            partition_file_for_tests: None,
        }
    }
}

/// This node (`[node]` table).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Attributes placement expressions test (`[node.attributes]`: `rack = "r7"`, `ssd = true`,
    /// `mem_gb = 64`): strings, numbers and booleans. They add to (and may replace) the built-ins
    /// `host` (this node's flock IP), `os`, `arch`, `cpus` and `mem_gb`.
    pub attributes: std::collections::BTreeMap<String, toml::Value>,
}

/// Picket, the service runner (`[picket]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PicketSection {
    /// How long a plugin has to exit after its Shutdown call and SIGTERM before its process group
    /// gets SIGKILL.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Consecutive quick exits after which a plugin is reported failed and not restarted.
    pub crash_loop: u32,
    /// Shortest restart back-off (it doubles up to 30 s).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// How long a node leaves a unit that failed there before trying it again (doubling on each
    /// new failure, up to 10 minutes); placement prefers other nodes meanwhile.
    #[serde(with = "humantime_serde")]
    pub failed_hold: Duration,
    /// Stop the plugins when the agent stops. Off by default: plugins keep serving across an
    /// agent restart, which re-adopts them.
    pub stop_children_on_exit: bool,
}

impl Default for PicketSection {
    fn default() -> Self {
        PicketSection {
            stop_grace: Duration::from_secs(5),
            crash_loop: 5,
            backoff: Duration::from_millis(500),
            failed_hold: Duration::from_secs(60),
            stop_children_on_exit: false,
        }
    }
}

/// DNS over the registry and the flock (`[dns]` table): see README "DNS".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsSection {
    /// Serve DNS.
    pub enabled: bool,
    /// UDP and TCP address, `ip:port`.
    pub bind: String,
    /// The domain answered (`crux.`); names outside it are refused.
    pub domain: String,
    /// TTL of every answer: whole seconds, at most 1 hour.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Upstream resolvers (`ip` or `ip:port`, port 53 by default) that names outside the domain
    /// are forwarded to, tried in order. Empty: such names are REFUSED.
    pub forward: Vec<String>,
    /// How long each upstream is given to answer a forwarded query.
    #[serde(with = "humantime_serde")]
    pub forward_timeout: Duration,
    /// UDP queries a second answered per source address (a flood from one source is cut to
    /// it); 0: no limit (a local caching resolver in front, a benchmark).
    pub rate_per_s: u32,
    /// Queries a source may send at once above its rate.
    pub burst: u32,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            enabled: true,
            bind: crux_dns::DEFAULT_BIND.into(),
            domain: crux_dns::DEFAULT_DOMAIN.into(),
            ttl: Duration::from_secs(crux_dns::DEFAULT_TTL_S.into()),
            forward: Vec::new(),
            forward_timeout: crux_dns::DEFAULT_FORWARD_TIMEOUT,
            rate_per_s: crux_dns::DEFAULT_RATE_PER_S,
            burst: crux_dns::DEFAULT_BURST,
        }
    }
}

impl DnsSection {
    /// The server's settings (None: off), or the field at fault.
    pub fn check(&self) -> Result<Option<crux_dns::DnsConfig>, ConfigError> {
        if !self.enabled {
            return Ok(None);
        }
        let bind: SocketAddr = self.bind.parse().or_else(|e| {
            err(
                "dns.bind",
                format!("{:?} is not an ip:port address: {e}", self.bind),
            )
        })?;
        if self.ttl.subsec_nanos() != 0 || self.ttl > Duration::from_secs(3600) {
            return err("dns.ttl", "must be whole seconds between 0s and 1h");
        }
        let ttl_s = self.ttl.as_secs() as u32;
        crux_dns::Zone::new(&self.domain, ttl_s).or_else(|e| err("dns.domain", e))?;
        let mut forward = Vec::with_capacity(self.forward.len());
        for f in &self.forward {
            let up: SocketAddr = match f.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, 53),
                Err(_) => f.parse().or_else(|_| {
                    err(
                        "dns.forward",
                        format!("{f:?} is not an ip or an ip:port of a resolver"),
                    )
                })?,
            };
            if up == bind || (up.port() == bind.port() && up.ip().is_unspecified()) {
                return err(
                    "dns.forward",
                    format!("{f:?} is this server itself (dns.bind): queries would loop"),
                );
            }
            forward.push(up);
        }
        if self.forward_timeout < Duration::from_millis(10)
            || self.forward_timeout > Duration::from_secs(30)
        {
            return err("dns.forward_timeout", "must be between 10ms and 30s");
        }
        if self.rate_per_s > 0 && self.burst == 0 {
            return err(
                "dns.burst",
                "must be at least 1 while dns.rate_per_s limits",
            );
        }
        Ok(Some(crux_dns::DnsConfig {
            bind,
            domain: self.domain.clone(),
            ttl_s,
            forward,
            forward_timeout: self.forward_timeout,
            rate_per_s: self.rate_per_s,
            burst: self.burst,
        }))
    }
}

/// The config as written: every source (file, environment, flags) fills this, unchecked.
/// Field docs are the config reference (README.md "Config reference" mirrors them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Bloc ID: only nodes with the same bloc ID flock together. Required.
    pub bloc: String,
    /// Directory for the node identity, boot id and keyring.
    pub data_dir: PathBuf,
    /// Keyring file (secondary keys). Default: `<data_dir>/keyring`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// Flock address to bind, `ip:port` (UDP, and TCP for push-pull streams).
    pub bind: String,
    /// Flock address other nodes reach this one at. Default: `bind`, or when `bind` is a wildcard
    /// address, the local address the kernel would use towards the first seed or the address space.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Address space to probe: CIDRs (`10.0.0.0/24`), ranges (`10.0.1.5-10.0.1.40`), addresses.
    pub space: Vec<String>,
    /// Ports of the address space: `7700` or `7700-7710`. Empty: the node's own flock port.
    pub ports: Vec<String>,
    /// Addresses (`ip:port`) to try first.
    pub seeds: Vec<String>,
    /// Timing preset: `lan`, `wan` or `local`.
    pub preset: String,
    /// Per-field timing overrides.
    pub timing: TimingOverrides,
    /// Largest datagram sent, in bytes.
    pub mtu: usize,
    /// Most members kept.
    pub members_max: usize,
    /// Local API socket (gRPC over a Unix socket, mode 0660).
    pub socket: PathBuf,
    /// Node-to-node gRPC port (TCP, on the flock address's IP). Served from the registry work on.
    pub grpc_port: u16,
    /// HTTP port for `/metrics`, `/ready` and the status page. 0 turns HTTP off.
    pub http_port: u16,
    /// IP the HTTP server binds. Default: the IP of `bind`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Log filter: a level (`info`, `debug`) or a `tracing` filter (`info,crux_flock=debug`).
    /// `RUST_LOG`, when set, wins.
    pub log_level: String,
    /// How long a shutdown waits for the leave to be gossiped.
    #[serde(with = "humantime_serde")]
    pub leave_timeout: Duration,
    /// Service registry tunables.
    pub registry: RegistryConfig,
    /// Pastiche (content-addressed cache).
    pub pastiche: PasticheConfig,
    /// The durable store.
    pub store: StoreSection,
    /// This node's attributes.
    pub node: NodeSection,
    /// The service runner.
    pub picket: PicketSection,
    /// DNS.
    pub dns: DnsSection,
    /// Catalyst (durable topics).
    pub catalyst: crate::catalyst::CatalystSection,
    /// Fuse: routes served as xDS.
    pub fuse: crate::fuse::FuseSection,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            bloc: String::new(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            keyring: None,
            bind: format!("0.0.0.0:{DEFAULT_FLOCK_PORT}"),
            advertise: None,
            space: Vec::new(),
            ports: Vec::new(),
            seeds: Vec::new(),
            preset: Preset::Lan.to_string(),
            timing: TimingOverrides::default(),
            mtu: crux_proto::flock::DEFAULT_MTU,
            members_max: crux_flock::config::DEFAULT_MEMBERS_MAX,
            socket: PathBuf::from(DEFAULT_SOCKET),
            grpc_port: DEFAULT_GRPC_PORT,
            http_port: DEFAULT_HTTP_PORT,
            http_addr: None,
            log_level: "info".into(),
            leave_timeout: DEFAULT_LEAVE_TIMEOUT,
            registry: RegistryConfig::default(),
            pastiche: PasticheConfig::default(),
            store: StoreSection::default(),
            node: NodeSection::default(),
            picket: PicketSection::default(),
            dns: DnsSection::default(),
            catalyst: Default::default(),
            fuse: crate::fuse::FuseSection::default(),
        }
    }
}

/// Command-line overrides (`crux agent --bloc ...`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentFlags {
    /// Config file (TOML). Env: CRUX_CONFIG.
    #[arg(long, short = 'c', env = "CRUX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bloc ID.
    #[arg(long)]
    pub bloc: Option<String>,
    /// Data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Keyring file.
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Flock bind address, ip:port.
    #[arg(long)]
    pub bind: Option<String>,
    /// Flock address others reach this node at, ip:port.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Address space to probe (comma-separated CIDRs, ranges, addresses).
    #[arg(long, value_delimiter = ',')]
    pub space: Option<Vec<String>>,
    /// Ports of the address space (comma-separated ports or ranges).
    #[arg(long, value_delimiter = ',')]
    pub ports: Option<Vec<String>>,
    /// Seeds (comma-separated ip:port).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Timing preset: lan, wan or local.
    #[arg(long)]
    pub preset: Option<String>,
    /// Local API socket path.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Node-to-node gRPC port.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// HTTP port (0: off).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Log level or tracing filter.
    #[arg(long)]
    pub log_level: Option<String>,
}

impl AgentFlags {
    /// Whether a flag sets the top-level config field `field`.
    pub fn sets(&self, field: &str) -> bool {
        match field {
            "bloc" => self.bloc.is_some(),
            "data_dir" => self.data_dir.is_some(),
            "keyring" => self.keyring.is_some(),
            "bind" => self.bind.is_some(),
            "advertise" => self.advertise.is_some(),
            "space" => self.space.is_some(),
            "ports" => self.ports.is_some(),
            "seeds" => self.seeds.is_some(),
            "preset" => self.preset.is_some(),
            "socket" => self.socket.is_some(),
            "grpc_port" => self.grpc_port.is_some(),
            "http_port" => self.http_port.is_some(),
            "log_level" => self.log_level.is_some(),
            _ => false,
        }
    }
}

/// A checked config, ready to run an agent.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Keyring file.
    pub keyring: PathBuf,
    /// Flock bind address.
    pub bind: SocketAddr,
    /// Flock address others reach this node at (None: to be chosen at start, see
    /// [`RawConfig::advertise`]).
    pub advertise: Option<SocketAddr>,
    /// Flock core config.
    pub flock: FlockConfig,
    /// Timing preset named in the config.
    pub preset: Preset,
    /// Local API socket.
    pub socket: PathBuf,
    /// Node-to-node gRPC address.
    pub grpc_port: u16,
    /// HTTP address (None: off).
    pub http: Option<SocketAddr>,
    /// Log filter.
    pub log_level: String,
    /// Leave wait bound.
    pub leave_timeout: Duration,
    /// Registry tunables.
    pub registry: RegistryConfig,
    /// Pastiche dir.
    pub pastiche_dir: PathBuf,
    /// Pastiche size bound, bytes.
    pub pastiche_max: u64,
    /// Pastiche test hook (see [`PasticheConfig::corrupt_serving_for_tests`]).
    pub pastiche_corrupt: bool,
    /// Where `s3://` imports go (see [`PasticheConfig::s3_endpoint`]).
    pub pastiche_s3: crux_pastiche::import::S3Settings,
    /// Bytes per second of one import (0: no limit).
    pub pastiche_import_rate: u64,
    /// Store voter grace.
    pub store_voter_grace: Duration,
    /// Node attributes from the config (the built-ins are added at start).
    pub node_attributes: std::collections::BTreeMap<String, toml::Value>,
    /// Service runner tunables.
    pub picket: PicketSection,
    /// Store test hook (see [`StoreSection::partition_file_for_tests`]).
    pub store_partition_file: Option<PathBuf>,
    /// DNS server settings (None: off).
    pub dns: Option<crux_dns::DnsConfig>,
    /// Catalyst's backend.
    pub catalyst: crux_catalyst::Backend,
    /// Fuse settings.
    pub fuse: crate::fuse::FuseSettings,
}

impl RawConfig {
    /// Reads a TOML config file over the defaults. An error says `path:line`.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "config".into(),
            reason: format!("cannot read {}: {e}", path.display()),
            at: None,
        })?;
        RawConfig::from_toml(&text).map_err(|mut e| {
            e.at = Some(
                match e.at.as_deref().and_then(|a| a.strip_prefix("line ")) {
                    Some(line) => format!("{}:{line}", path.display()),
                    None => path.display().to_string(),
                },
            );
            e
        })
    }

    /// Parses TOML text over the defaults. An error says `line N` and names the key with its
    /// table (`timing.probe_intervall`).
    pub fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // toml names unknown and mistyped keys in its message; pull the key out for `field`.
            let msg = e.message().trim().replace('\n', " ");
            let span = e.span();
            let key = toml_key_of(text, span.clone());
            let line = span
                .as_ref()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let field = match (key, &span) {
                (Some(k), Some(s)) => {
                    let table = table_at(text, s.start);
                    if table.is_empty() {
                        k
                    } else {
                        format!("{table}.{k}")
                    }
                }
                (Some(k), None) => k,
                (None, _) => "config".into(),
            };
            ConfigError {
                field,
                reason: msg,
                at: line.map(|l| format!("line {l}")),
            }
        })
    }

    /// `e` (from [`RawConfig::validate`] of the config loaded with `flags`) located in the config
    /// file at `path:line`, when the field's value came from the file (not from a `CRUX_*`
    /// variable in `env` or a flag).
    pub fn locate(mut e: ConfigError, flags: &AgentFlags, env: &[(String, String)]) -> ConfigError {
        let Some(path) = &flags.config else {
            return e;
        };
        if e.at.is_some() || e.field.contains(" (from ") {
            return e;
        }
        let top = e.field.split('.').next().unwrap_or("");
        let var = format!("CRUX_{}", top.to_uppercase());
        if env.iter().any(|(k, _)| *k == var) || flags.sets(top) {
            return e;
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        e.at = Some(match line_of(&text, &e.field) {
            Some(line) => format!("{}:{line}", path.display()),
            None => path.display().to_string(),
        });
        e
    }

    /// Applies `CRUX_*` variables from `vars` (pass `std::env::vars()`).
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (k, v) in vars {
            let Some(name) = k.strip_prefix("CRUX_") else {
                continue;
            };
            let field = |f: &str| format!("{f} (from {k})");
            let list = |v: &str| -> Vec<String> {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            match name {
                "BLOC" => self.bloc = v,
                "DATA_DIR" => self.data_dir = v.into(),
                "KEYRING" => self.keyring = Some(v.into()),
                "BIND" => self.bind = v,
                "ADVERTISE" => self.advertise = Some(v),
                "SPACE" => self.space = list(&v),
                "PORTS" => self.ports = list(&v),
                "SEEDS" => self.seeds = list(&v),
                "PRESET" => self.preset = v,
                "SOCKET" => self.socket = v.into(),
                "LOG_LEVEL" => self.log_level = v,
                "HTTP_ADDR" => self.http_addr = Some(v),
                "MTU" => self.mtu = parse_num(&v).or_else(|r| err(field("mtu"), r))?,
                "MEMBERS_MAX" => {
                    self.members_max = parse_num(&v).or_else(|r| err(field("members_max"), r))?
                }
                "GRPC_PORT" => {
                    self.grpc_port = parse_num(&v).or_else(|r| err(field("grpc_port"), r))?
                }
                "HTTP_PORT" => {
                    self.http_port = parse_num(&v).or_else(|r| err(field("http_port"), r))?
                }
                "LEAVE_TIMEOUT" => {
                    self.leave_timeout = humantime::parse_duration(&v)
                        .or_else(|e| err(field("leave_timeout"), e.to_string()))?
                }
                // CRUX_CONFIG is read by the flag parser; others are not ours.
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies command-line flags.
    pub fn apply_flags(&mut self, f: &AgentFlags) {
        macro_rules! set {
            ($($name:ident),*) => { $( if let Some(v) = &f.$name { self.$name = v.clone(); } )* };
        }
        set!(bloc, data_dir, bind, space, ports, seeds, preset, socket, log_level);
        if let Some(v) = &f.keyring {
            self.keyring = Some(v.clone());
        }
        if let Some(v) = &f.advertise {
            self.advertise = Some(v.clone());
        }
        if let Some(v) = f.grpc_port {
            self.grpc_port = v;
        }
        if let Some(v) = f.http_port {
            self.http_port = v;
        }
    }

    /// File, then environment, then flags.
    pub fn load(
        flags: &AgentFlags,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawConfig, ConfigError> {
        let mut raw = match &flags.config {
            Some(path) => RawConfig::from_file(path)?,
            None => RawConfig::default(),
        };
        raw.apply_env(env)?;
        raw.apply_flags(flags);
        Ok(raw)
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        if self.bloc.trim().is_empty() {
            return err(
                "bloc",
                "must be set (the bloc ID shared by every node of the flock)",
            );
        }
        if !bloc_shape_ok(&self.bloc) {
            return err(
                "bloc",
                format!(
                    "{:?} is not a bloc ID: use 1 to {BLOC_MAX} letters, digits, `.`, `_` or \
                     `-`, starting with a letter or a digit",
                    self.bloc
                ),
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return err("data_dir", "must not be empty");
        }
        let bind: SocketAddr = self.bind.parse().or_else(|e| {
            err(
                "bind",
                format!("{:?} is not an ip:port address: {e}", self.bind),
            )
        })?;
        if bind.port() == 0 {
            return err(
                "bind",
                "the flock port must not be 0 (others must know where to look)",
            );
        }
        let advertise = match &self.advertise {
            Some(a) => {
                let a: SocketAddr = a
                    .parse()
                    .or_else(|e| err("advertise", format!("{a:?} is not an ip:port: {e}")))?;
                if a.ip().is_unspecified() || a.port() == 0 {
                    return err("advertise", "must be a concrete ip:port others can reach");
                }
                Some(a)
            }
            None if bind.ip().is_unspecified() => None,
            None => Some(bind),
        };
        let preset: Preset = self.preset.parse().or_else(|e| err("preset", e))?;
        let space =
            AddressSpace::parse(&self.space, &[] as &[String]).or_else(|e| err("space", e))?;
        let ports =
            AddressSpace::parse(&[] as &[String], &self.ports).or_else(|e| err("ports", e))?;
        let space = AddressSpace {
            ranges: space.ranges,
            ports: ports.ports,
        };
        if self.ports.iter().any(|p| p.trim().is_empty()) {
            return err("ports", "an entry is empty");
        }
        let mut seeds = Vec::with_capacity(self.seeds.len());
        for s in &self.seeds {
            let a: SocketAddr = s
                .parse()
                .or_else(|e| err("seeds", format!("{s:?} is not an ip:port: {e}")))?;
            seeds.push(a);
        }
        let mut timing = Timing::preset(preset);
        self.timing.apply(&mut timing);
        let flock = FlockConfig {
            bloc: self.bloc.clone(),
            timing,
            mtu: self.mtu,
            space,
            seeds,
            members_max: self.members_max,
        };
        flock.validate().or_else(|e| err(e.field, e.reason))?;
        if self.socket.as_os_str().is_empty() {
            return err("socket", "must not be empty");
        }
        if self.grpc_port == 0 {
            return err("grpc_port", "must not be 0");
        }
        if self.grpc_port == bind.port() {
            return err(
                "grpc_port",
                "must differ from the flock port (TCP there carries streams)",
            );
        }
        let http = if self.http_port == 0 {
            None
        } else {
            let ip: IpAddr = match &self.http_addr {
                Some(a) => a
                    .parse()
                    .or_else(|e| err("http_addr", format!("{a:?}: {e}")))?,
                None => bind.ip(),
            };
            if self.http_port == bind.port() || self.http_port == self.grpc_port {
                return err("http_port", "must differ from the flock and gRPC ports");
            }
            Some(SocketAddr::new(ip, self.http_port))
        };
        if self.log_level.trim().is_empty() {
            return err("log_level", "must not be empty");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return err(
                "log_level",
                format!("{:?} is not a log filter: {e}", self.log_level),
            );
        }
        if self.leave_timeout.is_zero() {
            return err("leave_timeout", "must be greater than zero");
        }
        let hb = self.registry.heartbeat_interval;
        if hb < Duration::from_millis(10) || hb > Duration::from_secs(60) {
            return err(
                "registry.heartbeat_interval",
                "must be between 10ms and 60s",
            );
        }
        if self.registry.grace.is_zero() {
            return err("registry.grace", "must be greater than zero");
        }
        let pastiche_max =
            parse_size(&self.pastiche.max_size).or_else(|e| err("pastiche.max_size", e))?;
        if pastiche_max == 0 {
            return err("pastiche.max_size", "must be greater than zero");
        }
        let pastiche_import_rate =
            parse_size(&self.pastiche.import_rate).or_else(|e| err("pastiche.import_rate", e))?;
        if let Some(e) = &self.pastiche.s3_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return err(
                    "pastiche.s3_endpoint",
                    format!("{e:?} is not an http:// or https:// URL"),
                );
            }
        }
        for (k, v) in &self.node.attributes {
            let field = format!("node.attributes.{k}");
            if k.is_empty()
                || !k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            {
                return err(
                    field,
                    "an attribute name starts with a letter or `_` and has only letters, digits, `_`, `.` and `-`",
                );
            }
            match v {
                toml::Value::String(_)
                | toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_) => {}
                other => {
                    return err(
                        field,
                        format!(
                            "must be a string, a number or a boolean, not a {}",
                            other.type_str()
                        ),
                    )
                }
            }
        }
        if self.picket.crash_loop == 0 {
            return err("picket.crash_loop", "must be at least 1");
        }
        if self.picket.backoff.is_zero() {
            return err("picket.backoff", "must be greater than zero");
        }
        if self.picket.stop_grace.is_zero() {
            return err("picket.stop_grace", "must be greater than zero");
        }
        Ok(Settings {
            keyring: self
                .keyring
                .clone()
                .unwrap_or_else(|| self.data_dir.join("keyring")),
            data_dir: self.data_dir.clone(),
            bind,
            advertise,
            flock,
            preset,
            socket: self.socket.clone(),
            grpc_port: self.grpc_port,
            http,
            log_level: self.log_level.clone(),
            leave_timeout: self.leave_timeout,
            registry: self.registry.clone(),
            pastiche_dir: self
                .pastiche
                .dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("pastiche")),
            pastiche_max,
            pastiche_corrupt: self.pastiche.corrupt_serving_for_tests,
            pastiche_s3: crux_pastiche::import::S3Settings {
                endpoint: self.pastiche.s3_endpoint.clone(),
                region: self.pastiche.s3_region.clone(),
            },
            pastiche_import_rate,
            store_voter_grace: self.store.voter_grace,
            node_attributes: self.node.attributes.clone(),
            picket: self.picket.clone(),
            store_partition_file: self.store.partition_file_for_tests.clone(),
            dns: self.dns.check()?,
            catalyst: self.catalyst.check(&self.data_dir)?,
            fuse: self.fuse.check()?,
        })
    }

    /// The config as TOML text (what `crux dev` writes).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serializes")
    }
}

fn parse_num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a number in range"))
}

/// The key on the line of a TOML error span (`key = value`), for the error's `field`.
fn toml_key_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let span = span?;
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    valid.then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_follow_the_design() {
        let mut raw = RawConfig {
            bloc: "b".into(),
            ..RawConfig::default()
        };
        raw.advertise = Some("10.0.0.1:7700".into());
        let s = raw.validate().unwrap();
        assert_eq!(s.bind.port(), 7700);
        assert_eq!(s.grpc_port, 7701);
        assert_eq!(s.http.unwrap().port(), 7702);
        assert_eq!(s.socket, PathBuf::from("/run/crux/reeve.sock"));
        assert_eq!(s.keyring, PathBuf::from("/var/lib/crux/keyring"));
        assert_eq!(s.preset, Preset::Lan);
    }

    #[test]
    fn file_then_env_then_flags() {
        let mut raw = RawConfig::from_toml(
            "bloc = \"file\"\nbind = \"127.0.0.2:9000\"\nhttp_port = 9100\npreset = \"wan\"\n",
        )
        .unwrap();
        raw.apply_env(vars(&[
            ("CRUX_BLOC", "env"),
            ("CRUX_HTTP_PORT", "9200"),
            ("CRUX_SEEDS", "127.0.0.3:9000, 127.0.0.4:9000"),
            ("HOME", "/root"),
        ]))
        .unwrap();
        raw.apply_flags(&AgentFlags {
            bloc: Some("flag".into()),
            ..AgentFlags::default()
        });
        let s = raw.validate().unwrap();
        assert_eq!(s.flock.bloc, "flag");
        assert_eq!(s.http.unwrap(), "127.0.0.2:9200".parse().unwrap());
        assert_eq!(s.flock.seeds.len(), 2);
        assert_eq!(s.preset, Preset::Wan);
        assert_eq!(s.advertise, Some("127.0.0.2:9000".parse().unwrap()));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10 GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").unwrap_err().contains("unit"));
    }

    #[test]
    fn errors_name_the_field() {
        let field = |toml: &str| {
            let raw = RawConfig::from_toml(toml);
            match raw {
                Err(e) => e.field,
                Ok(raw) => raw.validate().unwrap_err().field,
            }
        };
        assert_eq!(field(""), "bloc");
        assert_eq!(field("bloc = \"b\"\npreset = \"fast\""), "preset");
        assert_eq!(field("bloc = \"b\"\nbind = \"nowhere\""), "bind");
        assert_eq!(field("bloc = \"b\"\nspace = [\"10.0.0.0/40\"]"), "space");
        assert_eq!(field("bloc = \"b\"\nports = [\"0\"]"), "ports");
        assert_eq!(field("bloc = \"b\"\nseeds = [\"10.0.0.1\"]"), "seeds");
        assert_eq!(field("bloc = \"b\"\nhttp_port = \"x\""), "http_port");
        assert_eq!(field("bloc = \"b\"\nmtu = 10"), "mtu");
        assert_eq!(field("bloc = \"b\"\nlog_level = \"=,=\""), "log_level");
        assert_eq!(field("bloc = \"b\"\nbogus = 1"), "bogus");
        assert_eq!(
            field("bloc = \"b\"\n[timing]\nprobe_interval = \"100ms\"\nprobe_timeout = \"1s\""),
            "timing.probe_timeout"
        );
        let mut raw = RawConfig {
            bloc: "b".into(),
            ..RawConfig::default()
        };
        let e = raw
            .apply_env(vars(&[("CRUX_HTTP_PORT", "seventy")]))
            .unwrap_err();
        assert_eq!(e.field, "http_port (from CRUX_HTTP_PORT)");
        assert!(e.to_string().contains("http_port"));
    }

    #[test]
    fn a_bloc_id_has_a_shape() {
        for ok in [
            "b",
            "prod-eu1",
            "Prod-eu1.rack_7",
            "7",
            &"x".repeat(BLOC_MAX),
        ] {
            assert!(bloc_shape_ok(ok), "{ok:?}");
        }
        for bad in [
            "",
            "my bloc",
            "a/b",
            "-lead",
            ".hidden",
            "tab\t",
            "é",
            &"x".repeat(BLOC_MAX + 1),
        ] {
            assert!(!bloc_shape_ok(bad), "{bad:?}");
            let raw = RawConfig {
                bloc: bad.to_string(),
                ..RawConfig::default()
            };
            assert_eq!(raw.validate().unwrap_err().field, "bloc", "{bad:?}");
        }
    }

    #[test]
    fn errors_say_the_line_and_the_table() {
        let e = RawConfig::from_toml("bloc = \"b\"\n\n[timing]\nprobe_intervall = \"1s\"\n")
            .unwrap_err();
        assert_eq!(e.field, "timing.probe_intervall");
        assert_eq!(e.at.as_deref(), Some("line 4"));
        assert!(e
            .to_string()
            .starts_with("line 4: config field `timing.probe_intervall`: "));
        let text = "bloc = \"b\"\npreset = \"fast\"\n[store]\nvoter_grace = \"1s\"\n";
        assert_eq!(line_of(text, "preset"), Some(2));
        assert_eq!(line_of(text, "store.voter_grace"), Some(4));
        assert_eq!(line_of(text, "voter_grace"), None);
        assert_eq!(line_of(text, "timing.settle"), None);
    }

    #[test]
    fn example_config_is_valid() {
        let raw = RawConfig::from_toml(include_str!("../../examples/crux.toml")).unwrap();
        let s = raw.validate().unwrap();
        assert_eq!(s.flock.bloc, "prod-eu1");
        assert_eq!(s.flock.seeds.len(), 2);
        assert_eq!(s.flock.space.ranges.len(), 2);
    }

    #[test]
    fn written_config_reads_back() {
        let raw = RawConfig {
            bloc: "dev".into(),
            bind: "127.0.0.2:7800".into(),
            space: vec!["127.0.0.2-127.0.0.6".into()],
            ..RawConfig::default()
        };
        assert_eq!(RawConfig::from_toml(&raw.to_toml()).unwrap(), raw);
    }

    #[test]
    fn node_attributes_are_checked() {
        let ok = "bloc = \"b\"\n[node.attributes]\nrack = \"r7\"\nssd = true\nmem_gb = 64\n";
        let s = RawConfig::from_toml(ok).unwrap().validate().unwrap();
        assert_eq!(s.node_attributes.len(), 3);
        let bad = "bloc = \"b\"\n[node.attributes]\nzones = [\"a\"]\n";
        let e = RawConfig::from_toml(bad).unwrap().validate().unwrap_err();
        assert_eq!(e.field, "node.attributes.zones");
        assert!(e.reason.contains("array"), "{e}");
        let bad = "bloc = \"b\"\n[node.attributes]\n\"9lives\" = 1\n";
        let e = RawConfig::from_toml(bad).unwrap().validate().unwrap_err();
        assert_eq!(e.field, "node.attributes.9lives");
        let bad = "bloc = \"b\"\n[picket]\ncrash_loop = 0\n";
        let e = RawConfig::from_toml(bad).unwrap().validate().unwrap_err();
        assert_eq!(e.field, "picket.crash_loop");
    }
}
