//! Flock configuration: timing presets, the address space to probe, and validation.
//!
//! Nothing here reads files or the environment: the agent builds a [`Config`] from its own config
//! file and passes it in. [`Config::validate`] names the field and the reason of every error.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crux_proto::flock::{DEFAULT_MTU, MAX_DATAGRAM_BYTES, MIN_MTU};
use serde::{Deserialize, Serialize};

/// Named timing presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A datacenter network: sub-millisecond RTTs, rare loss.
    #[default]
    Lan,
    /// Nodes spread over a wide-area network: RTTs up to a few hundred milliseconds.
    Wan,
    /// All nodes on one machine (loopback): `crux dev`, tests.
    Local,
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lan" => Ok(Preset::Lan),
            "wan" => Ok(Preset::Wan),
            "local" => Ok(Preset::Local),
            other => Err(format!(
                "unknown timing preset {other:?} (expected lan, wan or local)"
            )),
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Lan => "lan",
            Preset::Wan => "wan",
            Preset::Local => "local",
        })
    }
}

/// Protocol timings. Units are in the names' types (`Duration`) or stated in the docs.
///
/// Where a value comes from is said on the preset constructors.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Time between two SWIM probe rounds (one member probed per round).
    pub probe_interval: Duration,
    /// How long a direct probe waits for its ack before asking others to probe indirectly.
    pub probe_timeout: Duration,
    /// How many members are asked to probe indirectly (SWIM's k).
    pub indirect_probes: usize,
    /// Lifeguard: minimum suspicion timeout is `suspicion_mult × max(1, log10 N) × probe_interval`.
    pub suspicion_mult: u32,
    /// Lifeguard: the suspicion timeout starts at `suspicion_max_mult ×` the minimum and shrinks
    /// towards the minimum as independent confirmations arrive.
    pub suspicion_max_mult: u32,
    /// Minimum suspicion timeout of the leader, once `leader_confirmations` members suspect it
    /// independently. Every member watches the leader's beats, so confirmations are plentiful and
    /// the log N factor is not needed to keep false positives away.
    pub leader_suspicion_min: Duration,
    /// Independent suspicions of the leader that bring its timeout down to `leader_suspicion_min`.
    pub leader_confirmations: u32,
    /// Lifeguard local-health multiplier cap: probe timeouts stretch up to `(1 + max) ×` when this
    /// node misses nacks or has to refute suspicion of itself.
    pub awareness_max: u32,
    /// Time between gossip rounds.
    pub gossip_interval: Duration,
    /// Members sent a gossip datagram each gossip round.
    pub gossip_fanout: usize,
    /// Each update is retransmitted `retransmit_mult × ceil(log10(N + 1))` times.
    pub retransmit_mult: u32,
    /// Push-pull period of a flock of up to [`PUSH_PULL_SCALE_MEMBERS`] members; larger flocks
    /// stretch it in proportion to their size so that the full-state bytes per node per second
    /// stay flat as the flock grows.
    pub push_pull_interval: Duration,
    /// Push-pull period while an exchange still teaches this node new members (joining, two flocks
    /// merging).
    pub push_pull_fast_interval: Duration,
    /// The leader re-issues its claim with a higher beat this often.
    pub leader_beat_interval: Duration,
    /// A member that has seen no new beat for this long probes the leader itself.
    pub leader_timeout: Duration,
    /// Membership must be quiet this long before a leaderless node claims leadership.
    pub settle: Duration,
    /// Extra wait per rank: the k-th best candidate waits `settle + k × election_rank_step`.
    pub election_rank_step: Duration,
    /// How often one dead member is probed, so that partitions heal.
    pub dead_probe_interval: Duration,
    /// Dead and left members are forgotten after this long.
    pub reap_after: Duration,
    /// Discovery probe period while this node knows no other member.
    pub discovery_interval_alone: Duration,
    /// Discovery probe period once in a flock (finds flocks that formed apart).
    pub discovery_interval: Duration,
    /// How long a graceful leave keeps gossiping its departure before it reports completion.
    pub leave_propagation: Duration,
}

/// Flocks up to this size push-pull every [`Timing::push_pull_interval`] (memberlist's
/// `pushPullScaleThreshold` is also 32).
pub const PUSH_PULL_SCALE_MEMBERS: usize = 32;

impl Timing {
    /// Timings of a preset.
    pub fn preset(preset: Preset) -> Timing {
        match preset {
            Preset::Lan => Timing::lan(),
            Preset::Wan => Timing::wan(),
            Preset::Local => Timing::local(),
        }
    }

    /// Datacenter defaults.
    ///
    /// Starting point: hashicorp/memberlist `DefaultLANConfig` (probe 1 s, timeout 500 ms, k = 3,
    /// suspicion ×4 up to ×6, gossip 200 ms to 3 nodes, retransmit ×4, push-pull 30 s), which Serf
    /// uses. We probe twice as often (500 ms) with a 200 ms timeout — datacenter RTTs are well under
    /// 1 ms — and use a suspicion multiplier of 3, which halves Serf's detection time of a dead
    /// node; Lifeguard's confirmation-driven timeout keeps false positives away (checked in
    /// `crux sim` at 5 % loss). Leader beats every 500 ms and a 2 s beat timeout give a new
    /// leader within a few seconds of a crash.
    pub fn lan() -> Timing {
        Timing {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            indirect_probes: 3,
            suspicion_mult: 3,
            suspicion_max_mult: 6,
            leader_suspicion_min: Duration::from_millis(500),
            leader_confirmations: 3,
            awareness_max: 8,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            retransmit_mult: 3,
            push_pull_interval: Duration::from_secs(30),
            push_pull_fast_interval: Duration::from_millis(500),
            leader_beat_interval: Duration::from_millis(500),
            leader_timeout: Duration::from_millis(2000),
            settle: Duration::from_millis(500),
            election_rank_step: Duration::from_millis(500),
            dead_probe_interval: Duration::from_secs(2),
            reap_after: Duration::from_secs(3600),
            discovery_interval_alone: Duration::from_millis(50),
            discovery_interval: Duration::from_secs(2),
            leave_propagation: Duration::from_millis(600),
        }
    }

    /// Wide-area defaults: memberlist `DefaultWANConfig` (probe 5 s, timeout 3 s, suspicion ×6,
    /// gossip 500 ms to 4 nodes, push-pull 60 s), with beats and election waits scaled to match.
    pub fn wan() -> Timing {
        Timing {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            indirect_probes: 3,
            suspicion_mult: 6,
            suspicion_max_mult: 6,
            leader_suspicion_min: Duration::from_secs(5),
            leader_confirmations: 3,
            awareness_max: 8,
            gossip_interval: Duration::from_millis(500),
            gossip_fanout: 4,
            retransmit_mult: 4,
            push_pull_interval: Duration::from_secs(60),
            push_pull_fast_interval: Duration::from_secs(3),
            leader_beat_interval: Duration::from_secs(2),
            leader_timeout: Duration::from_secs(12),
            settle: Duration::from_secs(5),
            election_rank_step: Duration::from_secs(3),
            dead_probe_interval: Duration::from_secs(10),
            reap_after: Duration::from_secs(6 * 3600),
            discovery_interval_alone: Duration::from_millis(200),
            discovery_interval: Duration::from_secs(10),
            leave_propagation: Duration::from_secs(3),
        }
    }

    /// Loopback defaults: memberlist `DefaultLocalConfig` (probe 1 s, timeout 200 ms, gossip
    /// 100 ms, push-pull 15 s), with our LAN probe period and shorter beats, since a loopback
    /// RTT is tens of microseconds.
    pub fn local() -> Timing {
        Timing {
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(100),
            indirect_probes: 3,
            suspicion_mult: 3,
            suspicion_max_mult: 6,
            leader_suspicion_min: Duration::from_millis(400),
            leader_confirmations: 2,
            awareness_max: 8,
            gossip_interval: Duration::from_millis(100),
            gossip_fanout: 3,
            retransmit_mult: 4,
            push_pull_interval: Duration::from_secs(15),
            push_pull_fast_interval: Duration::from_millis(300),
            leader_beat_interval: Duration::from_millis(200),
            leader_timeout: Duration::from_millis(1000),
            settle: Duration::from_millis(300),
            election_rank_step: Duration::from_millis(300),
            dead_probe_interval: Duration::from_secs(1),
            reap_after: Duration::from_secs(600),
            discovery_interval_alone: Duration::from_millis(20),
            discovery_interval: Duration::from_secs(1),
            leave_propagation: Duration::from_millis(400),
        }
    }
}

/// A contiguous range of IP addresses (both ends included, same family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    /// First address.
    pub first: IpAddr,
    /// Number of addresses (at least 1).
    pub len: u128,
}

impl IpRange {
    /// The `i`-th address of the range (`i < len`).
    pub fn nth(&self, i: u128) -> IpAddr {
        match self.first {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from((u32::from(a) as u128 + i) as u32)),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(i))),
        }
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.first, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let (a, b) = (u32::from(a) as u128, u32::from(b) as u128);
                b >= a && b - a < self.len
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let (a, b) = (u128::from(a), u128::from(b));
                b >= a && b - a < self.len
            }
            _ => false,
        }
    }
}

impl FromStr for IpRange {
    type Err = String;
    /// `10.0.0.0/16` (CIDR), `127.0.0.2-127.0.0.254` (range) or a single address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some((ip, bits)) = s.split_once('/') {
            let ip: IpAddr = ip.parse().map_err(|e| format!("{s:?}: bad address: {e}"))?;
            let bits: u32 = bits
                .parse()
                .map_err(|_| format!("{s:?}: bad prefix length"))?;
            let width = if ip.is_ipv4() { 32 } else { 128 };
            if bits > width {
                return Err(format!("{s:?}: prefix length {bits} is over {width}"));
            }
            let host_bits = width - bits;
            let len: u128 = if host_bits >= 128 {
                u128::MAX
            } else {
                1u128 << host_bits
            };
            let first = match ip {
                IpAddr::V4(a) => {
                    let mask = if host_bits >= 32 {
                        0
                    } else {
                        u32::MAX << host_bits
                    };
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
                }
                IpAddr::V6(a) => {
                    let mask = if host_bits >= 128 {
                        0
                    } else {
                        u128::MAX << host_bits
                    };
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
                }
            };
            return Ok(IpRange { first, len });
        }
        if let Some((a, b)) = s.split_once('-') {
            let a: IpAddr = a
                .trim()
                .parse()
                .map_err(|e| format!("{s:?}: bad address: {e}"))?;
            let b: IpAddr = b
                .trim()
                .parse()
                .map_err(|e| format!("{s:?}: bad address: {e}"))?;
            let (lo, hi) = match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128),
                (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b)),
                _ => return Err(format!("{s:?}: both ends must be of one address family")),
            };
            if hi < lo {
                return Err(format!("{s:?}: range ends before it starts"));
            }
            return Ok(IpRange {
                first: a,
                len: (hi - lo).saturating_add(1),
            });
        }
        let ip: IpAddr = s.parse().map_err(|e| format!("{s:?}: bad address: {e}"))?;
        Ok(IpRange { first: ip, len: 1 })
    }
}

/// A port or an inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;
    /// `7700` or `7700-7710`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: ports are numbers 1-65535"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if first == 0 || last < first {
            return Err(format!("{s:?}: not a port range (1-65535, first <= last)"));
        }
        Ok(PortRange { first, last })
    }
}

/// The address space a node probes to find its flock: IP ranges × ports.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AddressSpace {
    /// IP ranges.
    pub ranges: Vec<IpRange>,
    /// Ports (empty means: the node's own flock port).
    pub ports: Vec<PortRange>,
}

impl AddressSpace {
    /// Builds an address space from range strings and port strings.
    pub fn parse<S: AsRef<str>>(ranges: &[S], ports: &[S]) -> Result<AddressSpace, String> {
        Ok(AddressSpace {
            ranges: ranges
                .iter()
                .map(|r| r.as_ref().parse())
                .collect::<Result<_, _>>()?,
            ports: ports
                .iter()
                .map(|p| p.as_ref().parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Number of IP addresses in all ranges.
    pub fn ip_count(&self) -> u128 {
        self.ranges
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.len))
    }

    fn port_count(&self, own_port: u16) -> u128 {
        if self.ports.is_empty() {
            let _ = own_port;
            1
        } else {
            self.ports
                .iter()
                .map(|p| (p.last - p.first) as u128 + 1)
                .sum()
        }
    }

    /// Number of socket addresses (IP addresses × ports).
    pub fn size(&self, own_port: u16) -> u128 {
        self.ip_count().saturating_mul(self.port_count(own_port))
    }

    /// The `i`-th socket address (`i < size`), IP-major.
    pub fn nth(&self, mut i: u128, own_port: u16) -> Option<SocketAddr> {
        let ports = self.port_count(own_port);
        let mut ip_i = i / ports;
        i %= ports;
        let port = if self.ports.is_empty() {
            own_port
        } else {
            let mut port = None;
            for p in &self.ports {
                let n = (p.last - p.first) as u128 + 1;
                if i < n {
                    port = Some(p.first + i as u16);
                    break;
                }
                i -= n;
            }
            port?
        };
        for r in &self.ranges {
            if ip_i < r.len {
                return Some(SocketAddr::new(r.nth(ip_i), port));
            }
            ip_i -= r.len;
        }
        None
    }

    /// Whether `addr` is in the space.
    pub fn contains(&self, addr: SocketAddr, own_port: u16) -> bool {
        let port_ok = if self.ports.is_empty() {
            addr.port() == own_port
        } else {
            self.ports
                .iter()
                .any(|p| (p.first..=p.last).contains(&addr.port()))
        };
        port_ok && self.ranges.iter().any(|r| r.contains(addr.ip()))
    }
}

/// Everything the flock core needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    /// The bloc ID: only nodes with the same bloc ID flock together.
    pub bloc: String,
    /// Timings.
    pub timing: Timing,
    /// Largest datagram sent, in bytes.
    pub mtu: usize,
    /// Address space to probe.
    pub space: AddressSpace,
    /// Addresses to try first (seeds and addresses seen before).
    pub seeds: Vec<SocketAddr>,
    /// Most members a node keeps (bounds memory against hostile input).
    pub members_max: usize,
}

/// Default bound on the member table.
pub const DEFAULT_MEMBERS_MAX: usize = 65_536;

impl Config {
    /// A config with the preset's timings and everything else at its default.
    pub fn new(bloc: impl Into<String>, preset: Preset) -> Config {
        Config {
            bloc: bloc.into(),
            timing: Timing::preset(preset),
            mtu: DEFAULT_MTU,
            space: AddressSpace::default(),
            seeds: Vec::new(),
            members_max: DEFAULT_MEMBERS_MAX,
        }
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        if self.bloc.is_empty() {
            return err("bloc", "must not be empty".into());
        }
        if self.bloc.len() > 256 {
            return err("bloc", "must be at most 256 bytes".into());
        }
        if !(MIN_MTU..=MAX_DATAGRAM_BYTES).contains(&self.mtu) {
            return err(
                "mtu",
                format!("must be between {MIN_MTU} and {MAX_DATAGRAM_BYTES}"),
            );
        }
        if self.members_max < 2 {
            return err("members_max", "must be at least 2".into());
        }
        let t = &self.timing;
        let positive = [
            ("timing.probe_interval", t.probe_interval),
            ("timing.probe_timeout", t.probe_timeout),
            ("timing.gossip_interval", t.gossip_interval),
            ("timing.push_pull_interval", t.push_pull_interval),
            ("timing.push_pull_fast_interval", t.push_pull_fast_interval),
            ("timing.leader_beat_interval", t.leader_beat_interval),
            ("timing.leader_timeout", t.leader_timeout),
            ("timing.settle", t.settle),
            ("timing.dead_probe_interval", t.dead_probe_interval),
            ("timing.reap_after", t.reap_after),
            (
                "timing.discovery_interval_alone",
                t.discovery_interval_alone,
            ),
            ("timing.discovery_interval", t.discovery_interval),
        ];
        for (field, d) in positive {
            if d.is_zero() {
                return err(field, "must be greater than zero".into());
            }
        }
        if t.probe_timeout >= t.probe_interval {
            return err(
                "timing.probe_timeout",
                "must be shorter than timing.probe_interval".into(),
            );
        }
        if t.leader_timeout <= t.leader_beat_interval {
            return err(
                "timing.leader_timeout",
                "must be longer than timing.leader_beat_interval".into(),
            );
        }
        if t.suspicion_mult == 0 || t.suspicion_max_mult == 0 || t.retransmit_mult == 0 {
            return err("timing", "multipliers must be at least 1".into());
        }
        if t.gossip_fanout == 0 {
            return err("timing.gossip_fanout", "must be at least 1".into());
        }
        if self.space.ranges.iter().any(|r| r.len == 0) {
            return err("space", "an address range is empty".into());
        }
        Ok(())
    }
}

/// A config field that is not acceptable. Never comes from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The field, as named in the config file.
    pub field: &'static str,
    /// Why it is refused.
    pub reason: String,
}

/// Stable 32-bit tag of a bloc ID (FNV-1a), carried in every datagram header so that datagrams of
/// other blocs are dropped before any other work.
pub fn bloc_tag(bloc: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bloc.as_bytes() {
        h ^= *b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidr_range_and_single() {
        let r: IpRange = "10.1.2.3/16".parse().unwrap();
        assert_eq!(r.first, "10.1.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(r.len, 65_536);
        let r: IpRange = "127.0.0.2-127.0.0.254".parse().unwrap();
        assert_eq!(r.len, 253);
        assert!(r.contains("127.0.0.254".parse().unwrap()));
        assert!(!r.contains("127.0.0.255".parse().unwrap()));
        let r: IpRange = "::1".parse().unwrap();
        assert_eq!(r.len, 1);
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("10.0.0.9-10.0.0.1".parse::<IpRange>().is_err());
        assert!("10.0.0.1-::1".parse::<IpRange>().is_err());
    }

    #[test]
    fn address_space_enumerates_ips_times_ports() {
        let s = AddressSpace::parse(&["127.0.0.2-127.0.0.3"], &["7700-7701"]).unwrap();
        assert_eq!(s.size(1), 4);
        let all: Vec<_> = (0..4).map(|i| s.nth(i, 1).unwrap().to_string()).collect();
        assert_eq!(
            all,
            [
                "127.0.0.2:7700",
                "127.0.0.2:7701",
                "127.0.0.3:7700",
                "127.0.0.3:7701"
            ]
        );
        assert_eq!(s.nth(4, 1), None);
        let own = AddressSpace::parse::<&str>(&["127.0.0.2"], &[]).unwrap();
        assert_eq!(own.nth(0, 9000).unwrap().to_string(), "127.0.0.2:9000");
        assert!(own.contains("127.0.0.2:9000".parse().unwrap(), 9000));
        assert!(!own.contains("127.0.0.2:9001".parse().unwrap(), 9000));
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = Config::new("b", Preset::Lan);
        assert!(c.validate().is_ok());
        c.timing.probe_timeout = c.timing.probe_interval;
        assert_eq!(c.validate().unwrap_err().field, "timing.probe_timeout");
        let mut c = Config::new("", Preset::Lan);
        assert_eq!(c.validate().unwrap_err().field, "bloc");
        c.bloc = "x".into();
        c.mtu = 100;
        assert_eq!(c.validate().unwrap_err().field, "mtu");
    }

    #[test]
    fn presets_are_valid() {
        for p in [Preset::Lan, Preset::Wan, Preset::Local] {
            Config::new("b", p).validate().unwrap();
        }
    }
}
