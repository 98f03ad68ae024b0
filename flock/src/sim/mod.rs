//! Deterministic simulator of many flock nodes on virtual time.
//!
//! [`Sim`] runs N instances of the real [`Flock`] core against a simulated network, on a
//! discrete-event queue ordered by `(virtual time, sequence number)`. It drives each core exactly
//! as the tokio driver does: after every `handle_*` call it drains `poll_transmit` and
//! `poll_event`, and keeps one pending wake-up per node at `poll_timeout()` (a generation counter
//! makes superseded wake-ups stale).
//!
//! ```text
//!   queue (time, seq) ──pop──▶ deliver to node k ──▶ Flock::handle_*  ──▶ poll_transmit ──▶ network
//!        ▲                                                    │                              │
//!        └──────────── wake-up at poll_timeout() ◀────────────┘   latency, loss, dup, partitions
//!        └──────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! **Determinism.** Every random choice — latencies, losses, duplicates, start times, node ids,
//! boot ids, the seed of each core — comes from one ChaCha RNG seeded with
//! [`SimConfig::seed`]. No hash-map iteration order reaches the results. The same seed therefore
//! gives the same run bit for bit; [`Sim::trace_hash`] (a hash of every event and every
//! transmitted byte) and [`Sim::state_hash`] (every node's final member table) let tests check it.
//!
//! **Network model** ([`NetConfig`]): datagrams get a latency with jitter (which reorders them),
//! independent loss and duplication; streams are reliable and take `latency + bytes / bandwidth`.
//! Symmetric partitions put nodes in groups ([`Sim::partition`], [`Sim::set_group`]): nodes of
//! different groups cannot reach each other. One-way blocks ([`Sim::block`]) drop traffic from A
//! to B only. [`Sim::crash`] stops a node: its pending wake-ups and inbound traffic vanish.
//! [`Sim::restart`] brings it back with the same node id, a greater boot id
//! ([`crate::boot_id`] of the virtual time) and a fresh core.
//!
//! Addresses: node slot `i` of the address space is `127.1.0.1 + i` on one shared port
//! ([`SimConfig::port`]). Nothing is ever sent on a real network.
//!
//! The scenarios of `crux sim` (cold boot, kill the leader, partition and heal, churn, key
//! rotation) are in [`scenario`].

mod net;
mod queue;
pub mod scenario;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use self::net::NetConfig;
pub use self::queue::EventQueue;
use self::queue::{Ev, Queue};
pub use self::scenario::{Report, Scenario, ScenarioConfig};
use crate::config::{AddressSpace, Config, ConfigError, IpRange, Preset, Timing};
use crate::{BootId, Event, Flock, Identity, MemberState, NodeId, Transmit, TransmitKind};

/// First address of the simulated address space (slot 0).
pub const SIM_BASE_ADDR: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

/// Wall-clock milliseconds that virtual time 0 stands for when boot ids are made
/// (2026-01-01T00:00:00Z).
pub const SIM_EPOCH_UNIX_MS: u64 = 1_767_225_600_000;

/// Wake-ups a node may ask for at the very instant it was woken before the simulator pushes its
/// next wake-up 1 ms later (a core that keeps asking for "now" would otherwise spin forever).
const SPIN_LIMIT: u32 = 64;

/// The secondary key every simulated node holds.
const SIM_SECONDARY_KEY: [u8; 32] = *b"crux simulator secondary key 32b";

/// Most entries kept in [`Metrics::live_deaths`].
pub const LIVE_DEATHS_MAX: usize = 100_000;

/// What a simulation is made of.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of the run: the same seed gives the same run.
    pub seed: u64,
    /// Number of nodes.
    pub nodes: usize,
    /// Number of addresses in the address space every node probes (at least `nodes`). Nodes take
    /// distinct random slots; the others stay empty.
    pub space_addrs: usize,
    /// The one UDP port all nodes use.
    pub port: u16,
    /// Bloc ID of every node.
    pub bloc: String,
    /// Protocol timings of every node.
    pub timing: Timing,
    /// Network behaviour.
    pub net: NetConfig,
    /// Nodes (by index) whose addresses every node gets as seeds; empty: discovery only.
    pub seed_nodes: Vec<usize>,
    /// Record every core event in [`Sim::event_log`] (small clusters in tests).
    pub log_events: bool,
    /// Security on (sealed datagrams, join handshakes, transient-key rotation) with these
    /// rotation timings and one shared secondary key; `None` (the default): plain datagrams.
    pub security: Option<crate::SecurityTiming>,
    /// A death declared by or about a node that a partition or one-way block cut off from some
    /// node within this long counts as a partition death, not a false one (suspicions started
    /// during the cut and dead-gossip spread at the heal are the partition's doing).
    pub partition_grace: Duration,
}

impl SimConfig {
    /// `nodes` nodes with the preset's timings and network, an address space of about
    /// 1.024 × `nodes` addresses, no seeds, no loss.
    pub fn new(nodes: usize, seed: u64, preset: Preset) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            space_addrs: space_for(nodes),
            port: 7700,
            bloc: "sim".into(),
            timing: Timing::preset(preset),
            net: NetConfig::preset(preset),
            seed_nodes: Vec::new(),
            log_events: false,
            security: Some(crate::SecurityTiming::default()),
            partition_grace: Duration::from_secs(30),
        }
    }
}

/// About 1.024 × `nodes` addresses, and at least one empty one.
pub fn space_for(nodes: usize) -> usize {
    nodes + (nodes * 24).div_ceil(1000).max(1)
}

/// Counters of what happened in a simulation (monotonic).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Events taken off the queue.
    pub events: u64,
    /// Datagrams the cores sent.
    pub datagrams_sent: u64,
    /// Bytes of those datagrams.
    pub datagram_bytes: u64,
    /// Datagrams larger than the configured MTU (a core bug if not zero).
    pub oversized_datagrams: u64,
    /// Datagrams the network lost.
    pub datagrams_lost: u64,
    /// Datagrams the network duplicated.
    pub datagrams_duplicated: u64,
    /// Datagrams sent to an address no running node holds, or across a partition.
    pub datagrams_undeliverable: u64,
    /// Stream requests and replies the cores sent.
    pub streams_sent: u64,
    /// Bytes of those streams.
    pub stream_bytes: u64,
    /// Stream requests that failed.
    pub streams_failed: u64,
    /// `MemberDead` events, all observers together.
    pub deaths_declared: u64,
    /// Nodes that some observer declared dead while they were running, at the boot the
    /// observer named, when neither had been cut off by a partition or one-way block within
    /// [`SimConfig::partition_grace`] (false positives).
    pub false_dead: BTreeSet<NodeId>,
    /// Nodes declared dead while running, by or about a node that a partition or block had cut
    /// off within the grace period.
    pub partition_dead: BTreeSet<NodeId>,
    /// `MemberSuspect` events about a running node at its current boot.
    pub live_suspicions: u64,
    /// `MemberDead` events about a running node at its current boot declared by a node that
    /// reaches it and is reached by it at that instant (no partition or block between them,
    /// whatever happened before), in order: (virtual time, observer index, subject index). At
    /// most [`LIVE_DEATHS_MAX`] are kept; [`Metrics::live_deaths_total`] counts them all.
    pub live_deaths: Vec<(Duration, u32, u32)>,
    /// All the events [`Metrics::live_deaths`] describes, kept or not.
    pub live_deaths_total: u64,
    /// `LeaderChanged` events.
    pub leader_changes: u64,
    /// While terms are watched ([`Sim::watch_terms`]): for each term, the leaders some node other
    /// than the leader itself adopted.
    pub term_leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Times a node asked to be woken at the instant it was just woken.
    pub timer_spins: u64,
}

impl Metrics {
    /// Terms in which more than one leader was followed while terms were watched.
    pub fn term_conflicts(&self) -> usize {
        self.term_leaders.values().filter(|l| l.len() > 1).count()
    }
}

/// One core event, as recorded when [`SimConfig::log_events`] is set.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    /// Virtual time.
    pub at: Duration,
    /// Index of the node that emitted it.
    pub node: usize,
    /// The event.
    pub event: Event,
}

/// Whether and how the running nodes agree (see [`Sim::agreement`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// Every running node sees exactly the running nodes of its partition group as alive or
    /// suspect (at their current boot ids), and all nodes of a group follow the same running
    /// leader of that group. Never true while a start scheduled with [`Sim::start_at`] is
    /// still to come.
    pub agreed: bool,
    /// All running nodes of each group follow one running leader of that group.
    pub leader_agreed: bool,
    /// Distinct leaders followed by running nodes.
    pub leaders: BTreeSet<NodeId>,
}

/// Per-node state the simulator keeps beside the core.
#[derive(Clone, Debug)]
struct Node {
    id: NodeId,
    addr: SocketAddr,
    boot: BootId,
    running: bool,
    /// Bumped at every crash and start: traffic for an earlier life vanishes.
    life: u32,
    wake_gen: u64,
    wake_at: Option<Duration>,
    spins: u32,
    group: u16,
    sent_bytes: u64,
    sent_msgs: u64,
}

/// Everything but the cores (split so that a core and the world can be borrowed together).
struct World {
    now: Duration,
    queue: Queue,
    rng: ChaCha8Rng,
    net: NetConfig,
    mtu: usize,
    nodes: Vec<Node>,
    /// Address-space slot → node index (`u32::MAX`: empty).
    slot_node: Vec<u32>,
    port: u16,
    /// Lookups only; never iterated.
    id_index: HashMap<NodeId, u32>,
    running: usize,
    /// Start events queued and not yet due: no agreement counts before every node started.
    starts_pending: usize,
    group_running: Vec<usize>,
    blocked: BTreeSet<(u32, u32)>,
    /// Whether nodes sit in more than one partition group.
    partitioned: bool,
    /// Per node: the last instant it was cut off from some node (partition or block), if ever.
    last_cut: Vec<Option<Duration>>,
    partition_grace: Duration,
    metrics: Metrics,
    watch_terms: bool,
    trace: u64,
    log: Option<Vec<LoggedEvent>>,
}

/// A simulation of N flock nodes. See the [module docs](self).
pub struct Sim {
    flocks: Vec<Option<Flock>>,
    config: Config,
    security: Option<crate::SecurityTiming>,
    w: World,
}

fn mix(h: u64, x: u64) -> u64 {
    (h.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95)
}

fn hash_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = mix(h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix(mix(h, u64::from_le_bytes(last)), bytes.len() as u64)
}

fn hash_addr(addr: SocketAddr) -> u64 {
    match addr.ip() {
        IpAddr::V4(a) => (u32::from(a) as u64) << 16 | addr.port() as u64,
        IpAddr::V6(a) => {
            let v = u128::from(a);
            (v as u64) ^ ((v >> 64) as u64) ^ addr.port() as u64
        }
    }
}

impl Sim {
    /// Builds the nodes (none runs yet: see [`Sim::start`], [`Sim::start_at`], [`Sim::start_all_within`]).
    pub fn new(cfg: SimConfig) -> Result<Sim, ConfigError> {
        if cfg.space_addrs < cfg.nodes {
            return Err(ConfigError {
                field: "sim.space_addrs",
                reason: format!(
                    "{} addresses cannot hold {} nodes",
                    cfg.space_addrs, cfg.nodes
                ),
            });
        }
        if u32::try_from(cfg.space_addrs).is_err() || cfg.space_addrs >= (1 << 23) {
            return Err(ConfigError {
                field: "sim.space_addrs",
                reason: "at most 8,388,608 addresses".into(),
            });
        }
        if !(0.0..1.0).contains(&cfg.net.loss) || !(0.0..=1.0).contains(&cfg.net.duplicate) {
            return Err(ConfigError {
                field: "sim.net",
                reason: "loss must be in [0, 1) and duplicate in [0, 1]".into(),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut slots: Vec<u32> = (0..cfg.space_addrs as u32).collect();
        slots.shuffle(&mut rng);
        slots.truncate(cfg.nodes);
        let base = u32::from(SIM_BASE_ADDR);
        let addr_of =
            |slot: u32| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(base + slot)), cfg.port);
        let mut slot_node = vec![u32::MAX; cfg.space_addrs];
        let mut id_index = HashMap::with_capacity(cfg.nodes);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        for (i, &slot) in slots.iter().enumerate() {
            let id = loop {
                let id = NodeId(rng.gen());
                if !id_index.contains_key(&id) {
                    break id;
                }
            };
            id_index.insert(id, i as u32);
            slot_node[slot as usize] = i as u32;
            nodes.push(Node {
                id,
                addr: addr_of(slot),
                boot: BootId(0),
                running: false,
                life: 0,
                wake_gen: 0,
                wake_at: None,
                spins: 0,
                group: 0,
                sent_bytes: 0,
                sent_msgs: 0,
            });
        }
        let mut config = Config::new(cfg.bloc.clone(), Preset::Lan);
        config.timing = cfg.timing.clone();
        config.space = AddressSpace {
            ranges: vec![IpRange {
                first: IpAddr::V4(SIM_BASE_ADDR),
                len: cfg.space_addrs as u128,
            }],
            ports: Vec::new(),
        };
        config.seeds = cfg
            .seed_nodes
            .iter()
            .filter_map(|&i| nodes.get(i).map(|n| n.addr))
            .collect();
        config.validate()?;
        let mtu = config.mtu;
        Ok(Sim {
            flocks: (0..cfg.nodes).map(|_| None).collect(),
            config,
            security: cfg.security.clone(),
            w: World {
                now: Duration::ZERO,
                queue: Queue::default(),
                rng,
                net: cfg.net,
                mtu,
                nodes,
                slot_node,
                port: cfg.port,
                id_index,
                running: 0,
                starts_pending: 0,
                group_running: vec![0],
                blocked: BTreeSet::new(),
                partitioned: false,
                last_cut: vec![None; cfg.nodes],
                partition_grace: cfg.partition_grace,
                metrics: Metrics::default(),
                watch_terms: false,
                trace: cfg.seed,
                log: cfg.log_events.then(Vec::new),
            },
        })
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.w.now
    }

    /// Number of nodes (running or not).
    pub fn len(&self) -> usize {
        self.w.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.w.nodes.is_empty()
    }

    /// Number of running nodes.
    pub fn running_count(&self) -> usize {
        self.w.running
    }

    /// Whether node `i` runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.w.nodes[i].running
    }

    /// Node `i`'s id (kept across restarts).
    pub fn node_id(&self, i: usize) -> NodeId {
        self.w.nodes[i].id
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.w.nodes[i].addr
    }

    /// Node `i`'s current (or last) boot id.
    pub fn boot(&self, i: usize) -> BootId {
        self.w.nodes[i].boot
    }

    /// Index of the node with id `id`.
    pub fn index_of(&self, id: NodeId) -> Option<usize> {
        self.w.id_index.get(&id).map(|&i| i as usize)
    }

    /// Node `i`'s core, if it runs.
    pub fn flock(&self, i: usize) -> Option<&Flock> {
        self.flocks[i].as_ref()
    }

    /// The config every node starts with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The network model in force.
    pub fn net_config(&self) -> &NetConfig {
        &self.w.net
    }

    /// The network model (change it at any time: it applies to traffic sent from then on).
    pub fn net_mut(&mut self) -> &mut NetConfig {
        &mut self.w.net
    }

    /// What happened so far.
    pub fn metrics(&self) -> &Metrics {
        &self.w.metrics
    }

    /// Core events recorded so far (empty unless [`SimConfig::log_events`]).
    pub fn event_log(&self) -> &[LoggedEvent] {
        self.w.log.as_deref().unwrap_or(&[])
    }

    /// Bytes and messages (datagrams and stream frames) node `i` sent, all its lives together.
    pub fn sent(&self, i: usize) -> (u64, u64) {
        let n = &self.w.nodes[i];
        (n.sent_bytes, n.sent_msgs)
    }

    /// Events still queued.
    pub fn pending(&self) -> usize {
        self.w.queue.len()
    }

    /// The simulation's RNG, for scenario choices that must follow the seed.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.w.rng
    }

    /// Starts recording, for every term, which leaders nodes follow
    /// ([`Metrics::term_leaders`]); `false` stops it. Watch only while the running nodes form
    /// one connected flock: two flocks formed apart legitimately reuse terms until they merge.
    pub fn watch_terms(&mut self, on: bool) {
        self.w.watch_terms = on;
    }

    /// Hash of everything that happened: every event taken off the queue (time, kind, nodes)
    /// and every transmit (sender, destination, kind, bytes).
    pub fn trace_hash(&self) -> u64 {
        self.w.trace
    }

    /// Hash of every node's state: running, boot, leader, and its member table sorted by id.
    /// O(N²): meant for small and medium runs.
    pub fn state_hash(&self) -> u64 {
        let mut h = mix(0x5eed, self.w.now.as_nanos() as u64);
        for (i, n) in self.w.nodes.iter().enumerate() {
            h = mix(h, n.running as u64);
            h = mix(h, n.boot.0);
            let Some(f) = &self.flocks[i] else { continue };
            if let Some(l) = f.leader() {
                h = mix(mix(h, l.id.0), l.term);
            }
            let mut members: Vec<_> = f
                .members()
                .map(|m| {
                    (
                        m.info.id.0,
                        m.info.boot.0,
                        m.info.incarnation,
                        m.info.state as u64,
                    )
                })
                .collect();
            members.sort_unstable();
            for (id, boot, inc, state) in members {
                h = mix(mix(mix(mix(h, id), boot), inc), state);
            }
        }
        h
    }

    /// Starts node `i` now (nothing if it runs).
    pub fn start(&mut self, i: usize) {
        if !self.w.nodes[i].running {
            self.boot_node(i);
        }
    }

    /// Starts node `i` at virtual time `at` (nothing if it runs then).
    pub fn start_at(&mut self, i: usize, at: Duration) {
        self.w.starts_pending += 1;
        self.w
            .queue
            .push(at.max(self.w.now), Ev::Start { node: i as u32 });
    }

    /// Starts every node at a random instant of `[now, now + within)`.
    pub fn start_all_within(&mut self, within: Duration) {
        let span = within.as_nanos() as u64;
        for i in 0..self.len() {
            let d = if span == 0 {
                0
            } else {
                self.w.rng.gen_range(0..span)
            };
            self.start_at(i, self.w.now + Duration::from_nanos(d));
        }
    }

    /// Crashes node `i`: its core is dropped, its pending wake-ups and inbound traffic vanish.
    pub fn crash(&mut self, i: usize) {
        let n = &mut self.w.nodes[i];
        if !n.running {
            return;
        }
        n.running = false;
        n.life += 1;
        n.wake_gen += 1;
        n.wake_at = None;
        let g = n.group as usize;
        self.w.running -= 1;
        self.w.group_running[g] -= 1;
        self.flocks[i] = None;
        self.w.trace = mix(self.w.trace, 0xc0 << 32 | i as u64);
    }

    /// Restarts node `i` now (crashing it first if it runs): same node id, greater boot id,
    /// fresh core.
    pub fn restart(&mut self, i: usize) {
        self.crash(i);
        self.boot_node(i);
    }

    /// Hands a command to node `i` (ignored if it does not run).
    pub fn command(&mut self, i: usize, cmd: crate::Command) {
        let now = self.w.now;
        if let Some(f) = self.flocks[i].as_mut() {
            f.handle_command(now, cmd);
            self.drain(i, false);
        }
    }

    /// Puts every listed side in its own partition group (1, 2, …); unlisted nodes are in
    /// group 0. Nodes of different groups cannot reach each other.
    pub fn partition(&mut self, sides: &[Vec<usize>]) {
        for n in &mut self.w.nodes {
            n.group = 0;
        }
        for (g, side) in sides.iter().enumerate() {
            for &i in side {
                self.w.nodes[i].group = (g + 1) as u16;
            }
        }
        self.recount_groups();
    }

    /// Moves node `i` to partition group `group`.
    pub fn set_group(&mut self, i: usize, group: u16) {
        self.w.nodes[i].group = group;
        self.recount_groups();
    }

    /// Node `i`'s partition group.
    pub fn group(&self, i: usize) -> u16 {
        self.w.nodes[i].group
    }

    /// Blocks traffic from `from` to `to` (the other way still flows).
    pub fn block(&mut self, from: usize, to: usize) {
        self.w.mark_cut(from);
        self.w.mark_cut(to);
        self.w.blocked.insert((from as u32, to as u32));
    }

    /// Lifts a one-way block.
    pub fn unblock(&mut self, from: usize, to: usize) {
        if self.w.blocked.remove(&(from as u32, to as u32)) {
            self.w.mark_cut(from);
            self.w.mark_cut(to);
        }
    }

    /// Ends every partition and one-way block.
    pub fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.w.blocked) {
            self.w.mark_cut(a as usize);
            self.w.mark_cut(b as usize);
        }
        self.partition(&[]);
    }

    /// Whether traffic from `from` reaches `to` (partitions and blocks; not whether `to` runs).
    pub fn reachable(&self, from: usize, to: usize) -> bool {
        self.w.reachable(from as u32, to as u32)
    }

    fn recount_groups(&mut self) {
        let groups = self
            .w
            .nodes
            .iter()
            .map(|n| n.group as usize + 1)
            .max()
            .unwrap_or(1);
        let mut counts = vec![0; groups];
        for n in self.w.nodes.iter().filter(|n| n.running) {
            counts[n.group as usize] += 1;
        }
        let was = self.w.partitioned;
        self.w.partitioned = self
            .w
            .nodes
            .iter()
            .any(|n| n.group != self.w.nodes[0].group);
        if was || self.w.partitioned {
            let now = self.w.now;
            self.w.last_cut.iter_mut().for_each(|c| *c = Some(now));
        }
        self.w.group_running = counts;
        self.w.trace = mix(self.w.trace, 0x9a << 32 | groups as u64);
    }

    /// Runs the simulation until virtual time `until` (every event due by then is handled).
    pub fn run_until(&mut self, until: Duration) {
        while let Some((at, ev)) = self.w.queue.pop_until(until) {
            self.w.now = at;
            self.w.metrics.events += 1;
            let (tag, who) = ev.tag();
            self.w.trace = mix(mix(mix(self.w.trace, at.as_nanos() as u64), tag), who);
            self.deliver(ev);
        }
        self.w.now = self.w.now.max(until);
    }

    /// Runs until the running nodes fully agree ([`Sim::agreement`] with member tables) or
    /// `deadline` passes, checking every `every` of virtual time (O(N²) per check: meant for
    /// small flocks). Returns when agreement first held.
    pub fn run_until_agreed(&mut self, deadline: Duration, every: Duration) -> Option<Duration> {
        loop {
            if self.agreement(true).agreed {
                return Some(self.now());
            }
            if self.now() >= deadline {
                return None;
            }
            let next = (self.now() + every).min(deadline);
            self.run_until(next);
        }
    }

    /// Runs the simulation for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.w.now + d);
    }

    fn boot_node(&mut self, i: usize) {
        let now = self.w.now;
        let random: u16 = self.w.rng.gen();
        let seed: u64 = self.w.rng.gen();
        let n = &mut self.w.nodes[i];
        let ms = SIM_EPOCH_UNIX_MS + now.as_millis() as u64;
        let mut boot = crate::boot_id(ms, random);
        if boot <= n.boot {
            boot = BootId(n.boot.0 + 1);
        }
        n.boot = boot;
        n.running = true;
        n.life += 1;
        n.wake_gen += 1;
        n.wake_at = None;
        n.spins = 0;
        let identity = Identity {
            id: n.id,
            boot,
            addr: n.addr,
            key: None,
        };
        let g = n.group as usize;
        self.w.running += 1;
        self.w.group_running[g] += 1;
        let flock = match &self.security {
            Some(timing) => {
                let mut rng_seed = [0u8; 32];
                rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
                rng_seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
                let ring = crate::crypto::Keyring::new(crate::crypto::SecretKey::from_bytes(
                    SIM_SECONDARY_KEY,
                ));
                Flock::builder(self.config.clone(), identity)
                    .keys(ring, timing.clone())
                    .rng_seed(rng_seed)
                    .start(now)
            }
            None => Flock::builder(self.config.clone(), identity)
                .sim_seed(seed)
                .start(now),
        }
        .expect("the simulator validated the config");
        self.flocks[i] = Some(flock);
        self.w.trace = mix(mix(self.w.trace, 0xb0 << 32 | i as u64), boot.0);
        self.drain(i, false);
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.w.now;
        match ev {
            Ev::Start { node } => {
                self.w.starts_pending -= 1;
                self.start(node as usize);
            }
            Ev::Wake { node, gen } => {
                let i = node as usize;
                let n = &mut self.w.nodes[i];
                if !n.running || n.wake_gen != gen {
                    return;
                }
                n.wake_at = None;
                if let Some(f) = self.flocks[i].as_mut() {
                    f.handle_timeout(now);
                    self.drain(i, true);
                }
            }
            Ev::Datagram {
                to,
                life,
                from,
                payload,
            } => {
                let i = to as usize;
                if self.w.nodes[i].life != life {
                    return;
                }
                let from_addr = self.w.nodes[from as usize].addr;
                if let Some(f) = self.flocks[i].as_mut() {
                    f.handle_datagram(now, from_addr, &payload);
                    self.drain(i, false);
                }
            }
            Ev::StreamRequest {
                to,
                to_life,
                from,
                from_life,
                payload,
            } => {
                let i = to as usize;
                let to_addr = self.w.nodes[i].addr;
                if self.w.nodes[i].life != to_life || !self.w.nodes[i].running {
                    // The server died with the connection open: the client times out.
                    let at = now + self.w.net.connect_timeout;
                    self.w.queue.push(
                        at,
                        Ev::StreamFailed {
                            node: from,
                            life: from_life,
                            to: to_addr,
                        },
                    );
                    return;
                }
                let from_addr = self.w.nodes[from as usize].addr;
                let Some(f) = self.flocks[i].as_mut() else {
                    return;
                };
                let reply = f.handle_stream(now, from_addr, &payload);
                self.drain(i, false);
                match reply {
                    Some(reply) => {
                        self.w.count_sent(i, reply.len(), TransmitKind::Stream);
                        self.w.trace = hash_bytes(mix(self.w.trace, 0x5e), &reply);
                        if self.w.reachable(to, from) {
                            let at = now + self.w.latency() + self.w.net.transfer_time(reply.len());
                            self.w.queue.push(
                                at,
                                Ev::StreamReply {
                                    to: from,
                                    life: from_life,
                                    from: to,
                                    payload: reply,
                                },
                            );
                        } else {
                            let at = now + self.w.net.connect_timeout;
                            self.w.queue.push(
                                at,
                                Ev::StreamFailed {
                                    node: from,
                                    life: from_life,
                                    to: to_addr,
                                },
                            );
                        }
                    }
                    None => {
                        // The server closed the stream without a reply frame.
                        let at = now + self.w.latency();
                        self.w.queue.push(
                            at,
                            Ev::StreamFailed {
                                node: from,
                                life: from_life,
                                to: to_addr,
                            },
                        );
                    }
                }
            }
            Ev::StreamReply {
                to,
                life,
                from,
                payload,
            } => {
                let i = to as usize;
                if self.w.nodes[i].life != life {
                    return;
                }
                let from_addr = self.w.nodes[from as usize].addr;
                if let Some(f) = self.flocks[i].as_mut() {
                    f.handle_stream_reply(now, from_addr, &payload);
                    self.drain(i, false);
                }
            }
            Ev::StreamFailed { node, life, to } => {
                let i = node as usize;
                if self.w.nodes[i].life != life {
                    return;
                }
                self.w.metrics.streams_failed += 1;
                if let Some(f) = self.flocks[i].as_mut() {
                    f.handle_stream_failed(now, to);
                    self.drain(i, false);
                }
            }
        }
    }

    /// Drains node `i`'s outputs after an input and reschedules its wake-up.
    fn drain(&mut self, i: usize, after_timeout: bool) {
        let Some(f) = self.flocks[i].as_mut() else {
            return;
        };
        while let Some(t) = f.poll_transmit() {
            self.w.route(i as u32, t);
        }
        while let Some(e) = f.poll_event() {
            self.w.observe(i, e);
        }
        let next = f.poll_timeout();
        self.w.schedule_wake(i, next, after_timeout);
    }

    /// Checks agreement of the running nodes (see [`Agreement`]). With `members` false only
    /// the member counts and leaders are compared (O(N)); with `members` true every member
    /// table is checked entry by entry (O(N²)).
    pub fn agreement(&self, members: bool) -> Agreement {
        let w = &self.w;
        let mut group_leader: Vec<Option<NodeId>> = vec![None; w.group_running.len()];
        let mut leaders = BTreeSet::new();
        let mut leader_agreed = w.running > 0 && w.starts_pending == 0;
        let mut agreed = leader_agreed;
        // Most nodes follow the same leader: remember the last one checked.
        let mut last: Option<(NodeId, u16, bool)> = None;
        for (i, n) in w.nodes.iter().enumerate() {
            let Some(f) = self.flocks[i].as_ref() else {
                continue;
            };
            let g = n.group as usize;
            if f.live_count() != w.group_running[g] {
                agreed = false;
            }
            match f.leader() {
                None => leader_agreed = false,
                Some(l) => {
                    leaders.insert(l.id);
                    let ok = match last {
                        Some((id, g, ok)) if id == l.id && g == n.group => ok,
                        _ => {
                            let ok = w.id_index.get(&l.id).is_some_and(|&li| {
                                let ln = &w.nodes[li as usize];
                                ln.running && ln.group == n.group
                            });
                            last = Some((l.id, n.group, ok));
                            ok
                        }
                    };
                    match group_leader[g] {
                        _ if !ok => leader_agreed = false,
                        None => group_leader[g] = Some(l.id),
                        Some(id) if id != l.id => leader_agreed = false,
                        Some(_) => {}
                    }
                }
            }
        }
        agreed &= leader_agreed;
        if agreed && members {
            agreed = self.members_agree();
        }
        Agreement {
            agreed,
            leader_agreed,
            leaders,
        }
    }

    fn members_agree(&self) -> bool {
        let w = &self.w;
        for (i, n) in w.nodes.iter().enumerate() {
            let Some(f) = self.flocks[i].as_ref() else {
                continue;
            };
            let mut live = 0;
            for m in f.members() {
                if !matches!(m.info.state, MemberState::Alive | MemberState::Suspect) {
                    continue;
                }
                let Some(&j) = w.id_index.get(&m.info.id) else {
                    return false;
                };
                let o = &w.nodes[j as usize];
                if !o.running || o.boot != m.info.boot || o.group != n.group {
                    return false;
                }
                live += 1;
            }
            if live != w.group_running[n.group as usize] {
                return false;
            }
        }
        true
    }
}

impl World {
    fn reachable(&self, from: u32, to: u32) -> bool {
        self.nodes[from as usize].group == self.nodes[to as usize].group
            && (self.blocked.is_empty() || !self.blocked.contains(&(from, to)))
    }

    fn mark_cut(&mut self, i: usize) {
        self.last_cut[i] = Some(self.now);
    }

    /// Whether node `i` is cut off from some node now, or was within the grace period.
    fn recently_cut(&self, i: u32) -> bool {
        self.partitioned
            || self.last_cut[i as usize].is_some_and(|t| self.now < t + self.partition_grace)
            || (!self.blocked.is_empty() && self.blocked.iter().any(|&(a, b)| a == i || b == i))
    }

    fn latency(&mut self) -> Duration {
        let jitter = self.net.jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            self.rng.gen_range(0..=jitter)
        };
        self.net.latency + Duration::from_nanos(extra)
    }

    fn node_at(&self, addr: SocketAddr) -> Option<u32> {
        let IpAddr::V4(ip) = addr.ip() else {
            return None;
        };
        if addr.port() != self.port {
            return None;
        }
        let slot = u32::from(ip).checked_sub(u32::from(SIM_BASE_ADDR))? as usize;
        self.slot_node.get(slot).copied().filter(|&n| n != u32::MAX)
    }

    fn count_sent(&mut self, i: usize, len: usize, kind: TransmitKind) {
        let n = &mut self.nodes[i];
        n.sent_bytes += len as u64;
        n.sent_msgs += 1;
        match kind {
            TransmitKind::Datagram => {
                self.metrics.datagrams_sent += 1;
                self.metrics.datagram_bytes += len as u64;
                if len > self.mtu {
                    self.metrics.oversized_datagrams += 1;
                }
            }
            TransmitKind::Stream => {
                self.metrics.streams_sent += 1;
                self.metrics.stream_bytes += len as u64;
            }
        }
    }

    fn route(&mut self, from: u32, t: Transmit) {
        let len = t.payload.len();
        self.count_sent(from as usize, len, t.kind);
        let kind_tag = match t.kind {
            TransmitKind::Datagram => 0xd0,
            TransmitKind::Stream => 0x50,
        };
        self.trace = mix(mix(mix(self.trace, kind_tag), from as u64), hash_addr(t.to));
        self.trace = hash_bytes(self.trace, &t.payload);
        let dest = self
            .node_at(t.to)
            .filter(|&to| self.nodes[to as usize].running && self.reachable(from, to));
        match t.kind {
            TransmitKind::Datagram => {
                let Some(to) = dest else {
                    self.metrics.datagrams_undeliverable += 1;
                    return;
                };
                if self.net.loss > 0.0 && self.rng.gen::<f64>() < self.net.loss {
                    self.metrics.datagrams_lost += 1;
                    return;
                }
                let life = self.nodes[to as usize].life;
                if self.net.duplicate > 0.0 && self.rng.gen::<f64>() < self.net.duplicate {
                    self.metrics.datagrams_duplicated += 1;
                    let at = self.now + self.latency();
                    self.queue.push(
                        at,
                        Ev::Datagram {
                            to,
                            life,
                            from,
                            payload: t.payload.clone(),
                        },
                    );
                }
                let at = self.now + self.latency();
                self.queue.push(
                    at,
                    Ev::Datagram {
                        to,
                        life,
                        from,
                        payload: t.payload,
                    },
                );
            }
            TransmitKind::Stream => {
                let from_life = self.nodes[from as usize].life;
                match dest {
                    None => {
                        let at = self.now + self.net.connect_timeout;
                        self.queue.push(
                            at,
                            Ev::StreamFailed {
                                node: from,
                                life: from_life,
                                to: t.to,
                            },
                        );
                    }
                    Some(to) => {
                        // Connect round trip, then the request one way at the stream's bandwidth.
                        let d = self.latency()
                            + self.latency()
                            + self.latency()
                            + self.net.transfer_time(len);
                        let to_life = self.nodes[to as usize].life;
                        self.queue.push(
                            self.now + d,
                            Ev::StreamRequest {
                                to,
                                to_life,
                                from,
                                from_life,
                                payload: t.payload,
                            },
                        );
                    }
                }
            }
        }
    }

    fn observe(&mut self, i: usize, e: Event) {
        match &e {
            Event::MemberDead(info) => {
                self.metrics.deaths_declared += 1;
                if let Some(&x) = self.id_index.get(&info.id) {
                    let xn = &self.nodes[x as usize];
                    if xn.running && xn.boot == info.boot {
                        if self.reachable(i as u32, x) && self.reachable(x, i as u32) {
                            self.metrics.live_deaths_total += 1;
                            if self.metrics.live_deaths.len() < LIVE_DEATHS_MAX {
                                self.metrics.live_deaths.push((self.now, i as u32, x));
                            }
                        }
                        if self.recently_cut(i as u32) || self.recently_cut(x) {
                            self.metrics.partition_dead.insert(info.id);
                        } else {
                            self.metrics.false_dead.insert(info.id);
                        }
                    }
                }
            }
            Event::MemberSuspect(info) => {
                if let Some(&x) = self.id_index.get(&info.id) {
                    let xn = &self.nodes[x as usize];
                    if xn.running && xn.boot == info.boot {
                        self.metrics.live_suspicions += 1;
                    }
                }
            }
            Event::LeaderChanged(view) => {
                self.metrics.leader_changes += 1;
                if let Some(v) = view {
                    if self.watch_terms && v.id != self.nodes[i].id {
                        self.metrics
                            .term_leaders
                            .entry(v.term)
                            .or_default()
                            .insert(v.id);
                    }
                }
            }
            _ => {}
        }
        if let Some(log) = &mut self.log {
            log.push(LoggedEvent {
                at: self.now,
                node: i,
                event: e,
            });
        }
    }

    fn schedule_wake(&mut self, i: usize, next: Option<Duration>, after_timeout: bool) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(mut at) = next else {
            if n.wake_at.take().is_some() {
                n.wake_gen += 1;
            }
            return;
        };
        if at <= now {
            at = now;
            if after_timeout {
                n.spins += 1;
                self.metrics.timer_spins += 1;
                if n.spins > SPIN_LIMIT {
                    at = now + Duration::from_millis(1);
                    n.spins = 0;
                }
            }
        } else if after_timeout {
            n.spins = 0;
        }
        if n.wake_at == Some(at) {
            return;
        }
        n.wake_gen += 1;
        n.wake_at = Some(at);
        let gen = n.wake_gen;
        self.queue.push(
            at,
            Ev::Wake {
                node: i as u32,
                gen,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(n: usize) -> Sim {
        let mut cfg = SimConfig::new(n, 9, Preset::Lan);
        cfg.net.latency = Duration::from_millis(1);
        cfg.net.jitter = Duration::from_millis(1);
        let mut sim = Sim::new(cfg).expect("valid");
        for i in 0..n {
            sim.start(i);
        }
        sim
    }

    fn datagram(sim: &Sim, to: usize) -> Transmit {
        Transmit {
            to: sim.addr(to),
            kind: TransmitKind::Datagram,
            payload: vec![0; 100],
        }
    }

    /// Pops every queued datagram for `to`, in arrival order; returns due times and payloads.
    fn queued(sim: &mut Sim, to: usize) -> Vec<(Duration, Vec<u8>)> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        while let Some((at, ev)) = sim.w.queue.pop_until(Duration::MAX) {
            match ev {
                Ev::Datagram { to: t, payload, .. } if t as usize == to => out.push((at, payload)),
                ev => keep.push((at, ev)),
            }
        }
        for (at, ev) in keep {
            sim.w.queue.push(at, ev);
        }
        out
    }

    fn queued_datagrams(sim: &mut Sim, to: usize) -> Vec<Duration> {
        queued(sim, to).into_iter().map(|(at, _)| at).collect()
    }

    #[test]
    fn addresses_are_distinct_loopback_slots_of_the_space() {
        let s = sim(50);
        let mut addrs: Vec<_> = (0..50).map(|i| s.addr(i)).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 50);
        for (i, a) in addrs.iter().enumerate() {
            assert!(a.ip().is_loopback(), "{a}");
            assert!(s.config().space.contains(*a, 7700));
            assert_eq!(s.w.node_at(*a).map(|n| s.addr(n as usize)), Some(*a), "{i}");
        }
        assert_eq!(s.config().space.size(7700), space_for(50) as u128);
    }

    #[test]
    fn datagrams_arrive_within_latency_and_jitter_and_out_of_order() {
        let mut s = sim(2);
        let _ = queued(&mut s, 1);
        for i in 0..1000u32 {
            let t = Transmit {
                to: s.addr(1),
                kind: TransmitKind::Datagram,
                payload: i.to_le_bytes().to_vec(),
            };
            s.w.route(0, t);
        }
        let arrivals = queued(&mut s, 1);
        assert_eq!(arrivals.len(), 1000);
        let (lo, hi) = (Duration::from_millis(1), Duration::from_millis(2));
        assert!(arrivals.iter().all(|(t, _)| (lo..=hi).contains(t)));
        let order: Vec<u32> = arrivals
            .iter()
            .map(|(_, p)| u32::from_le_bytes(p[..4].try_into().expect("4 bytes")))
            .collect();
        assert!(
            order.windows(2).any(|w| w[1] < w[0]),
            "jitter reorders datagrams"
        );
    }

    #[test]
    fn loss_and_duplication_follow_their_probabilities() {
        let mut s = sim(2);
        s.net_mut().loss = 0.3;
        s.net_mut().duplicate = 0.1;
        let _ = queued_datagrams(&mut s, 1);
        for _ in 0..10_000 {
            let t = datagram(&s, 1);
            s.w.route(0, t);
        }
        let m = s.metrics().clone();
        assert!(
            (2_700..3_300).contains(&m.datagrams_lost),
            "{}",
            m.datagrams_lost
        );
        assert!(
            (500..900).contains(&m.datagrams_duplicated),
            "{}",
            m.datagrams_duplicated
        );
        let delivered = queued_datagrams(&mut s, 1).len() as u64;
        assert_eq!(
            delivered,
            10_000 - m.datagrams_lost + m.datagrams_duplicated
        );
    }

    #[test]
    fn partitions_and_blocks_stop_datagrams() {
        let mut s = sim(3);
        let _ = queued_datagrams(&mut s, 1);
        s.partition(&[vec![1]]);
        let t = datagram(&s, 1);
        s.w.route(0, t);
        assert!(queued_datagrams(&mut s, 1).is_empty());
        s.heal();
        s.block(0, 1);
        let t = datagram(&s, 1);
        s.w.route(0, t);
        assert!(queued_datagrams(&mut s, 1).is_empty());
        assert!(s.reachable(1, 0) && !s.reachable(0, 1));
        s.heal();
        let t = datagram(&s, 1);
        s.w.route(0, t);
        assert_eq!(queued_datagrams(&mut s, 1).len(), 1);
    }

    #[test]
    fn traffic_to_a_crashed_node_vanishes_even_after_it_restarts() {
        let mut s = sim(2);
        let t = datagram(&s, 1);
        s.w.route(0, t);
        s.crash(0); // nobody else sends anything
        s.restart(1);
        s.run_for(Duration::from_millis(5));
        // The datagram was addressed to node 1's previous life: dropped, never handed to the core.
        let stats = s.flock(1).expect("runs").stats();
        assert_eq!(stats.datagrams_in, 0);
    }

    #[test]
    fn a_stream_to_a_crashed_node_fails_after_the_connect_timeout() {
        let mut s = sim(2);
        s.crash(1);
        let t = Transmit {
            to: s.addr(1),
            kind: TransmitKind::Stream,
            payload: vec![1; 10],
        };
        let now = s.now();
        s.w.route(0, t);
        let mut failed_at = None;
        while let Some((at, ev)) = s.w.queue.pop_until(Duration::MAX) {
            if let Ev::StreamFailed { node: 0, to, .. } = ev {
                assert_eq!(to, s.addr(1));
                failed_at = Some(at);
            }
        }
        assert_eq!(failed_at, Some(now + s.net_config().connect_timeout));
    }

    #[test]
    fn stream_delivery_takes_latency_and_transfer_time() {
        let mut s = sim(2);
        s.net_mut().jitter = Duration::ZERO;
        s.net_mut().bandwidth_bytes_per_s = 1_000_000;
        let t = Transmit {
            to: s.addr(1),
            kind: TransmitKind::Stream,
            payload: vec![1; 10_000],
        };
        let now = s.now();
        s.w.route(0, t);
        let mut arrived = None;
        while let Some((at, ev)) = s.w.queue.pop_until(Duration::MAX) {
            if let Ev::StreamRequest { to: 1, from: 0, .. } = ev {
                arrived = Some(at);
            }
        }
        // Connect round trip, one way, and 10 kB at 1 MB/s.
        assert_eq!(arrived, Some(now + Duration::from_millis(3 + 10)));
    }

    #[test]
    fn restart_keeps_the_id_and_raises_the_boot() {
        let mut s = sim(2);
        let (id, boot) = (s.node_id(0), s.boot(0));
        s.restart(0);
        assert_eq!(s.node_id(0), id);
        assert!(s.boot(0) > boot);
        assert_eq!(s.flock(0).map(|f| f.identity().boot), Some(s.boot(0)));
    }

    #[test]
    fn no_agreement_before_every_scheduled_start() {
        let mut s = Sim::new(SimConfig::new(3, 1, Preset::Lan)).expect("valid");
        s.start(0);
        s.start_at(1, Duration::from_secs(5));
        s.start_at(2, Duration::from_secs(5));
        s.run_until(Duration::from_secs(2));
        assert!(!s.agreement(true).agreed);
    }
}
