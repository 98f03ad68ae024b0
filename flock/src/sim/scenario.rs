//! The scenarios of `crux sim`: whole-flock runs that measure how fast N nodes agree.
//!
//! Every scenario starts the nodes at random instants of the first second
//! ([`ScenarioConfig::start_within`]) in an address space of about 1.024 × N addresses (so some
//! addresses are empty), without seeds: the nodes find each other by probing the space. Loss
//! applies throughout.
//!
//! * [`Scenario::ColdBoot`]: the trigger is virtual time 0.
//! * [`Scenario::KillLeader`]: once the flock agrees (and after [`ScenarioConfig::settle`]), the
//!   leader crashes; the trigger is the crash.
//! * [`Scenario::PartitionHeal`]: the nodes start split in two random halves that cannot reach
//!   each other; once each half agrees on itself (two leaders), the partition heals; the trigger
//!   is the heal.
//! * [`Scenario::Churn`]: once the flock agrees, every [`ScenarioConfig::churn_every`] for
//!   [`ScenarioConfig::churn_rounds`] rounds, the nodes crashed in the previous round come back,
//!   then [`ScenarioConfig::churn_fraction`] of the running nodes are picked: each crashes (and
//!   stays down for a round) or restarts at once, with even odds. The trigger is the return of
//!   the last crashed nodes.
//! * [`Scenario::Rotation`]: security on, with the short rotation period of
//!   [`ROTATION_SCENARIO_TIMING`] (a new transient key every 6–12 s instead of 30–60 s, so that
//!   a partition of 5 rotation periods fits in the 5 simulated minutes). Once the flock agrees
//!   and a warm-up ([`ScenarioConfig::warmup`], 10 s: joins and the first leader hand-over of
//!   the cold boot settle) has passed (time T), the run goes on for
//!   [`ScenarioConfig::rotation_run`] (5 min) of automatic rotations, with:
//!   - a secondary-keyring rotation, one step every [`ScenarioConfig::keyring_step`] (20 s): at
//!     T + 20 s a new key is `install`ed on one random node, at T + 40 s it is `use`d on another,
//!     at T + 60 s the old key is `remove`d on a third (each spreads through the flock);
//!   - at T + 80 s one random node that does not lead is partitioned away for
//!     [`ScenarioConfig::partition_periods`] (5) × `rotation_max` (12 s), i.e. 60 s, then healed
//!     (the trigger). With longer rotation periods the run is stretched to end at least one
//!     `keyring_step` after the heal.
//!
//!   It reports:
//!   - `rotations`: transient-key epochs that, at some check (every [`ScenarioConfig::cadence`]),
//!     every running node sealed with ([`crate::Flock::key_epoch`]) — the partitioned node left
//!     out from the partition until the agreement after the heal — the epoch at T not counted.
//!     That is rotations *completed*, adopted by the whole flock.
//!     `rotations_made` is the other count: [`crate::Stats::rotations`] summed over the nodes,
//!     from T to the end (it includes the keys the partitioned node makes as its own leader).
//!   - `membership_losses` = `membership_loss_deaths` + `membership_loss_views`, from T on:
//!     * `membership_loss_deaths`: `MemberDead` events (one per observer and declaration, see
//!       [`super::Metrics::live_deaths`]) about a running node at its current boot, declared by
//!       a node that reached it both ways at that instant, except those by or about the
//!       partitioned node from the partition until the later of the agreement after the heal
//!       and the heal plus the longest Lifeguard suspicion timeout (the partition's doing);
//!     * `membership_loss_views`: episodes in which a running node's live view
//!       ([`crate::Flock::live_count`]: alive and suspect members, itself included) stayed below
//!       the number of running nodes of its partition group for longer than the shortest
//!       Lifeguard suspicion timeout, `probe_interval × suspicion_mult × max(1, log10 N)` (4.5 s
//!       at 1,000 nodes, `lan`), checked every `cadence`; from the partition until the agreement
//!       after the heal the partitioned node is not counted, neither as a viewer nor in the
//!       others' expected count.
//!
//!     A death may show under both; the target is 0 for each.
//!   - `rejoin_after_heal_s`: simulated seconds from the heal to the first check at which every
//!     other running node holds the partitioned node as `Alive` at its current boot, and it
//!     follows the leader every running node follows and seals with that leader's epoch
//!     ([`crate::Flock::key_epoch`] equal on both). `agreement_s` (full agreement) and
//!     `leader_agreement_s` are also measured from the heal.
//!   - `keyring_rotated`: at the end every running node's keyring has the new key as primary
//!     and no longer holds the old one.
//!
//!   Traffic (`bytes_per_node_per_s`, …) is measured over the whole 5 minutes from T, key
//!   management and the partition included; `flaps` counts the losses of the O(N)
//!   agreement outside the partition (from the partition to the agreement after the heal).
//!
//! **Agreement** ([`Sim::agreement`]) holds when every running node sees exactly the running
//! nodes (of its partition side) as alive or suspect, at their current boot ids, and all follow
//! the same running leader. It is checked every [`ScenarioConfig::cadence`] of virtual time:
//! first an O(N) check of member counts and leaders, then, when that passes, the full O(N²)
//! comparison of member tables (retried with back-off in large flocks when it fails).
//!
//! After the trigger's agreement (or the phase deadline), the run goes on for a warm-up
//! ([`ScenarioConfig::warmup`]: the push-pull exchanges of freshly joined members die down) and
//! then a steady-state window ([`ScenarioConfig::window`], or up to [`ScenarioConfig::duration`]
//! when that is set): `bytes_per_node_per_s` and `msgs_per_node_per_s` are measured over that
//! window — everything the nodes sent (datagrams and stream frames, requests and replies)
//! divided by the running nodes and the window's length. `boot_bytes_per_node_per_s` covers the start up to the first
//! agreement. `flaps` counts the times the O(N) agreement check failed during the window after
//! having held, and `converged` is the full check at the very end.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;

use super::{NetConfig, Sim, SimConfig};
use crate::config::{Preset, Timing};

/// What `crux sim` simulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// All nodes start within a second and must find each other.
    ColdBoot,
    /// The leader of a converged flock crashes.
    KillLeader,
    /// Two halves converge apart, then the partition heals.
    PartitionHeal,
    /// 1 % of the nodes crash or restart every 10 s for 2 minutes.
    Churn,
    /// 5 minutes of transient-key rotations, a secondary-keyring rotation and a node partitioned
    /// for 5 rotation periods.
    Rotation,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 5] = [
        Scenario::ColdBoot,
        Scenario::KillLeader,
        Scenario::PartitionHeal,
        Scenario::Churn,
        Scenario::Rotation,
    ];

    /// The name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::ColdBoot => "cold-boot",
            Scenario::KillLeader => "kill-leader",
            Scenario::PartitionHeal => "partition-heal",
            Scenario::Churn => "churn",
            Scenario::Rotation => "rotation",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL.into_iter().find(|x| x.as_str() == s).ok_or_else(|| {
            format!("unknown scenario {s:?} (expected cold-boot, kill-leader, partition-heal, churn or rotation)")
        })
    }
}

/// Rotation timings of [`Scenario::Rotation`]: a new transient key every 6–12 s (the agent's
/// default is 30–60 s), so that a partition of 5 rotation periods fits in 5 simulated minutes.
pub const ROTATION_SCENARIO_TIMING: crate::SecurityTiming = crate::SecurityTiming {
    rotation_min: Duration::from_secs(6),
    rotation_max: Duration::from_secs(12),
};

/// Parameters of a scenario run.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    /// Which scenario.
    pub scenario: Scenario,
    /// Number of nodes.
    pub nodes: usize,
    /// Seed: the same seed gives the same run.
    pub seed: u64,
    /// Timing preset of the nodes (and of the network, unless `net` is set).
    pub preset: Preset,
    /// Datagram loss probability, applied throughout.
    pub loss: f64,
    /// Datagram duplication probability.
    pub duplicate: f64,
    /// Network model; `None`: [`NetConfig::preset`] of `preset` with `loss` and `duplicate`.
    pub net: Option<NetConfig>,
    /// Timings; `None`: [`Timing::preset`] of `preset`.
    pub timing: Option<Timing>,
    /// Run the nodes with security (sealed datagrams, join handshakes, key rotation) with these
    /// rotation timings; `None`: plain datagrams.
    pub security: Option<crate::SecurityTiming>,
    /// Nodes start at random instants of `[0, start_within)`.
    pub start_within: Duration,
    /// Longest wait for each agreement (initial, after the trigger).
    pub phase_deadline: Duration,
    /// Time after the final agreement before the steady-state window starts.
    pub warmup: Duration,
    /// Steady-state window after the warm-up, over which traffic is measured.
    pub window: Duration,
    /// Virtual time between two agreement checks.
    pub cadence: Duration,
    /// Time between the initial agreement and the trigger (kill-leader, partition-heal).
    pub settle: Duration,
    /// If set, the run lasts exactly this long: phases are cut at this instant and the
    /// steady-state window is whatever remains after the last agreement.
    pub duration: Option<Duration>,
    /// Churn rounds.
    pub churn_rounds: u32,
    /// Time between churn rounds.
    pub churn_every: Duration,
    /// Fraction of the nodes hit each churn round (at least one node).
    pub churn_fraction: f64,
    /// Compute [`Report::state_hash`] (O(N² log N); off by default above 2,000 nodes).
    pub state_hash: bool,
    /// Rotation: how long the run goes on after the initial agreement.
    pub rotation_run: Duration,
    /// Rotation: time between the initial agreement and the keyring `install`, between the
    /// keyring steps, and between the `remove` and the partition.
    pub keyring_step: Duration,
    /// Rotation: the partition lasts this many times `rotation_max`.
    pub partition_periods: u32,
}

impl ScenarioConfig {
    /// A scenario with the parameters: `lan` preset, security on (as the agent runs), no
    /// loss, nodes started within 1 s, 120 s per phase, a 10 s warm-up and a 10 s window, checks
    /// every 100 ms, 12 churn rounds of 1 % every 10 s. [`Scenario::Rotation`] runs with the
    /// rotation timings of [`ROTATION_SCENARIO_TIMING`], for 5 minutes, keyring steps 20 s apart
    /// and a partition of 5 rotation periods.
    pub fn new(scenario: Scenario, nodes: usize, seed: u64) -> ScenarioConfig {
        ScenarioConfig {
            scenario,
            nodes,
            seed,
            preset: Preset::Lan,
            loss: 0.0,
            duplicate: 0.0,
            net: None,
            timing: None,
            security: Some(if scenario == Scenario::Rotation {
                ROTATION_SCENARIO_TIMING
            } else {
                crate::SecurityTiming::default()
            }),
            start_within: Duration::from_secs(1),
            phase_deadline: Duration::from_secs(120),
            warmup: Duration::from_secs(10),
            window: Duration::from_secs(10),
            cadence: Duration::from_millis(100),
            settle: Duration::from_secs(2),
            duration: None,
            churn_rounds: 12,
            churn_every: Duration::from_secs(10),
            churn_fraction: 0.01,
            state_hash: nodes <= 2000,
            rotation_run: Duration::from_secs(300),
            keyring_step: Duration::from_secs(20),
            partition_periods: 5,
        }
    }

    /// The simulator config this scenario runs on.
    pub fn sim_config(&self) -> SimConfig {
        let mut c = SimConfig::new(self.nodes, self.seed, self.preset);
        if let Some(t) = &self.timing {
            c.timing = t.clone();
        }
        c.security = self.security.clone();
        c.net = match &self.net {
            Some(n) => n.clone(),
            None => NetConfig {
                loss: self.loss,
                duplicate: self.duplicate,
                ..c.net
            },
        };
        c
    }
}

/// What a scenario run measured. `crux sim --json` prints it as one JSON object.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Number of nodes.
    pub nodes: usize,
    /// Seed of the run.
    pub seed: u64,
    /// Scenario name.
    pub scenario: Scenario,
    /// Timing preset.
    pub preset: Preset,
    /// Datagram loss probability.
    pub loss: f64,
    /// Datagram duplication probability.
    pub duplicate: f64,
    /// Whether the nodes ran with security (sealed datagrams, handshakes, key rotation).
    pub secure: bool,
    /// At the end, every running node agrees on one leader and on the full live membership.
    pub converged: bool,
    /// Distinct leaders followed by running nodes at the end.
    pub leaders: usize,
    /// The leader at the end (hex node id), if all running nodes follow one.
    pub leader: Option<String>,
    /// Its term.
    pub term: Option<u64>,
    /// Simulated seconds from the trigger (start, crash, heal, end of churn) to the first full
    /// agreement.
    pub agreement_s: Option<f64>,
    /// Simulated seconds from the trigger until every running node first follows one running
    /// leader (membership may still differ).
    pub leader_agreement_s: Option<f64>,
    /// Kill-leader, partition-heal and churn: simulated seconds from the start to the agreement
    /// before the trigger (for partition-heal: of both halves).
    pub initial_agreement_s: Option<f64>,
    /// Partition-heal: distinct leaders just before the heal.
    pub leaders_before_heal: Option<usize>,
    /// Bytes sent per running node per second over the steady-state window.
    pub bytes_per_node_per_s: f64,
    /// Messages (datagrams and stream frames) sent per running node per second over the window.
    pub msgs_per_node_per_s: f64,
    /// The part of `bytes_per_node_per_s` that went over streams (push-pull of large states).
    pub stream_bytes_per_node_per_s: f64,
    /// Bytes per second of the node that sent most over the window (the leader's load shows here).
    pub max_bytes_per_node_per_s: f64,
    /// Length of the steady-state window, in simulated seconds.
    pub window_s: f64,
    /// Simulated seconds between the final agreement and the window.
    pub warmup_s: f64,
    /// Bytes sent per node per second from the start to the first agreement (the boot storm).
    pub boot_bytes_per_node_per_s: f64,
    /// Messages sent per node per second over the same span.
    pub boot_msgs_per_node_per_s: f64,
    /// Distinct running nodes that some node declared dead (at their current boot) although no
    /// partition had cut either of the two off within the last 30 s (false positives).
    pub false_positive_deaths: usize,
    /// Distinct running nodes declared dead by or about a node a partition had cut off (the
    /// partition's doing; see [`super::SimConfig::partition_grace`]).
    pub partition_deaths: usize,
    /// Suspicions (events) of running nodes at their current boot.
    pub live_suspicions: u64,
    /// Terms in which, while the flock was one (after agreement), nodes followed more than one
    /// leader.
    pub term_conflicts: usize,
    /// Times agreement was lost during the steady-state window.
    pub flaps: u64,
    /// Churn: crashes and restarts made.
    pub faults: u64,
    /// Running nodes at the end.
    pub live_nodes: usize,
    /// Datagrams larger than the MTU (a core bug if not zero).
    pub oversized_datagrams: u64,
    /// Simulated seconds in all.
    pub sim_s: f64,
    /// Events the simulator handled.
    pub events: u64,
    /// The phase that did not reach agreement before its deadline (or `duration`), if any:
    /// `boot` (initial agreement), `split` (partition-heal: the halves apart), `settle` (no
    /// single leader to kill, or no time left before the trigger), `after-crash`, `after-heal`
    /// or `after-churn`.
    pub failed_phase: Option<String>,
    /// Hash of the whole run (events and transmitted bytes), hex.
    pub trace_hash: String,
    /// Hash of every node's final state, hex (when computed).
    pub state_hash: Option<String>,
    /// Rotation: transient keys adopted by every running node (see the [module docs](self)).
    pub rotations: Option<u64>,
    /// Rotation: transient keys made, [`crate::Stats::rotations`] summed over the nodes.
    pub rotations_made: Option<u64>,
    /// Rotation: `membership_loss_deaths` + `membership_loss_views` (0 is the target).
    pub membership_losses: Option<u64>,
    /// Rotation: deaths declared about running nodes that the observer could reach.
    pub membership_loss_deaths: Option<u64>,
    /// Rotation: times a running node's live view stayed short for longer than a suspicion
    /// timeout.
    pub membership_loss_views: Option<u64>,
    /// Rotation: how long the one node was partitioned away, in simulated seconds.
    pub partition_s: Option<f64>,
    /// Rotation: simulated seconds from the heal until the partitioned node was back in the
    /// flock (seen alive by all, following the leader, holding its key epoch); None: never.
    pub rejoin_after_heal_s: Option<f64>,
    /// Rotation: every running node ends with the new secondary key as primary and without the
    /// old one.
    pub keyring_rotated: Option<bool>,
    /// Rotation: running nodes whose primary secondary key is not the new key at the end.
    pub keyring_old_primary: Option<usize>,
    /// Rotation: running nodes that still hold the old secondary key at the end.
    pub keyring_old_held: Option<usize>,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Peak resident memory of the process at the end of the run, in MiB (Linux; None
    /// elsewhere). The simulator holds every node's member table at once.
    pub peak_rss_mb: Option<f64>,
}

impl Report {
    /// A short human-readable table.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.2} s"));
        let mut rows: Vec<(&str, String)> = vec![
            (
                "scenario",
                format!(
                    "{} ({} preset{})",
                    self.scenario,
                    self.preset,
                    if self.secure { ", secure" } else { "" }
                ),
            ),
            (
                "nodes",
                format!("{} ({} running at the end)", self.nodes, self.live_nodes),
            ),
            ("seed", self.seed.to_string()),
            ("loss", format!("{:.1} %", self.loss * 100.0)),
            (
                "converged",
                if self.converged {
                    "yes".into()
                } else {
                    "NO".into()
                },
            ),
            ("leaders at end", self.leaders.to_string()),
            ("agreement", opt(self.agreement_s)),
            ("leader agreement", opt(self.leader_agreement_s)),
        ];
        if self.initial_agreement_s.is_some() {
            rows.push(("initial agreement", opt(self.initial_agreement_s)));
        }
        if let Some(l) = self.leaders_before_heal {
            rows.push(("leaders before heal", l.to_string()));
        }
        rows.extend([
            (
                "traffic (steady)",
                format!(
                    "{:.0} B/node/s ({:.0} on streams), {:.1} msg/node/s, max {:.0} B/s \
                     ({:.1} s after {:.1} s)",
                    self.bytes_per_node_per_s,
                    self.stream_bytes_per_node_per_s,
                    self.msgs_per_node_per_s,
                    self.max_bytes_per_node_per_s,
                    self.window_s,
                    self.warmup_s
                ),
            ),
            (
                "traffic (boot)",
                format!(
                    "{:.0} B/node/s, {:.1} msg/node/s",
                    self.boot_bytes_per_node_per_s, self.boot_msgs_per_node_per_s
                ),
            ),
            ("false deaths", self.false_positive_deaths.to_string()),
            ("term conflicts", self.term_conflicts.to_string()),
            ("flaps", self.flaps.to_string()),
        ]);
        if let Some(rot) = self.rotations {
            rows.push((
                "rotations",
                format!(
                    "{rot} adopted by all ({} made)",
                    self.rotations_made.unwrap_or(0)
                ),
            ));
        }
        if let Some(l) = self.membership_losses {
            rows.push((
                "membership losses",
                format!(
                    "{l} ({} deaths, {} short views)",
                    self.membership_loss_deaths.unwrap_or(0),
                    self.membership_loss_views.unwrap_or(0)
                ),
            ));
        }
        if let Some(p) = self.partition_s {
            rows.push((
                "rejoin after heal",
                format!("{} (partitioned {p:.0} s)", opt(self.rejoin_after_heal_s)),
            ));
        }
        if let Some(k) = self.keyring_rotated {
            rows.push((
                "keyring rotated",
                if k {
                    "yes".into()
                } else {
                    format!(
                        "NO ({} nodes with the old primary, {} holding the old key)",
                        self.keyring_old_primary.unwrap_or(0),
                        self.keyring_old_held.unwrap_or(0)
                    )
                },
            ));
        }
        if let Some(p) = &self.failed_phase {
            rows.push(("failed phase", p.clone()));
        }
        rows.push((
            "simulated",
            format!(
                "{:.1} s, {} events, {:.2} s wall, peak memory {}",
                self.sim_s,
                self.events,
                self.wall_s,
                self.peak_rss_mb
                    .map_or_else(|| "-".to_string(), |m| format!("{m:.0} MiB"))
            ),
        ));
        rows.iter().map(|(k, v)| format!("{k:<20} {v}\n")).collect()
    }
}

/// Traffic over a span.
#[derive(Default)]
struct Traffic {
    bytes_per_node_per_s: f64,
    stream_bytes_per_node_per_s: f64,
    msgs_per_node_per_s: f64,
    max_bytes_per_node_per_s: f64,
    secs: f64,
}

/// Where a running scenario is, reported about once per simulated second to
/// [`run_with_progress`]'s callback.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Phase: `boot`, `split`, `settle`, `after-crash`, `after-heal`, `churn`, `after-churn`,
    /// `rotation`, `partitioned`, `warm-up` or `window`.
    pub phase: &'static str,
    /// Simulated seconds so far.
    pub sim_s: f64,
    /// Running nodes.
    pub running: usize,
    /// Events handled so far.
    pub events: u64,
}

struct Run<'a> {
    cfg: &'a ScenarioConfig,
    sim: Sim,
    progress: &'a mut dyn FnMut(&Progress),
    phase: &'static str,
    next_progress: Duration,
    end_at: Option<Duration>,
    /// Full (O(N²)) checks are always made in flocks up to this size.
    full_always: bool,
    next_full: Duration,
    full_backoff: Duration,
    flaps: u64,
    faults: u64,
}

impl Run<'_> {
    fn now(&self) -> Duration {
        self.sim.now()
    }

    fn cut(&self, at: Duration) -> Duration {
        self.end_at.map_or(at, |e| at.min(e))
    }

    fn out_of_time(&self) -> bool {
        self.end_at.is_some_and(|e| self.now() >= e)
    }

    fn run_for(&mut self, d: Duration) {
        let at = self.cut(self.now() + d);
        while self.now() < at {
            let step = (self.now() + Duration::from_secs(1)).min(at);
            self.sim.run_until(step);
            self.tick();
        }
    }

    /// Reports progress if a simulated second has passed since the last report.
    fn tick(&mut self) {
        if self.now() < self.next_progress {
            return;
        }
        self.next_progress = self.now() + Duration::from_secs(1);
        let p = Progress {
            phase: self.phase,
            sim_s: secs(self.now()),
            running: self.sim.running_count(),
            events: self.sim.metrics().events,
        };
        (self.progress)(&p);
    }

    /// Whether the running nodes agree (O(N) check, then the full one).
    fn check(&mut self) -> (bool, bool) {
        let a = self.sim.agreement(false);
        if !a.agreed {
            return (false, a.leader_agreed);
        }
        let now = self.now();
        if !self.full_always && now < self.next_full {
            return (false, a.leader_agreed);
        }
        let full = self.sim.agreement(true);
        if !full.agreed {
            self.next_full = now + self.full_backoff;
            self.full_backoff = (self.full_backoff * 2).min(Duration::from_secs(10));
        }
        (full.agreed, a.leader_agreed)
    }

    /// Runs until the running nodes agree or `deadline`; returns when agreement and leader
    /// agreement first held.
    fn until_agreed(&mut self, deadline: Duration) -> (Option<Duration>, Option<Duration>) {
        let deadline = self.cut(deadline);
        self.full_backoff = Duration::from_millis(500);
        self.next_full = Duration::ZERO;
        let mut leader_at = None;
        loop {
            let (agreed, leader_agreed) = self.check();
            if leader_agreed && leader_at.is_none() {
                leader_at = Some(self.now());
            }
            if agreed {
                return (Some(self.now()), leader_at);
            }
            if self.now() >= deadline {
                return (None, leader_at);
            }
            let next = (self.now() + self.cfg.cadence).min(deadline);
            self.sim.run_until(next);
            self.tick();
        }
    }

    fn sent(&self) -> Vec<(u64, u64)> {
        (0..self.sim.len()).map(|i| self.sim.sent(i)).collect()
    }

    fn traffic(&self, before: &[(u64, u64)], secs: f64, nodes: usize) -> Traffic {
        if secs <= 0.0 || nodes == 0 {
            return Traffic::default();
        }
        let (mut bytes, mut msgs, mut max) = (0u64, 0u64, 0u64);
        for (i, (b0, m0)) in before.iter().enumerate() {
            let (b1, m1) = self.sim.sent(i);
            bytes += b1 - b0;
            msgs += m1 - m0;
            max = max.max(b1 - b0);
        }
        Traffic {
            bytes_per_node_per_s: bytes as f64 / nodes as f64 / secs,
            msgs_per_node_per_s: msgs as f64 / nodes as f64 / secs,
            stream_bytes_per_node_per_s: 0.0,
            max_bytes_per_node_per_s: max as f64 / secs,
            secs,
        }
    }

    /// Runs until `end`, counting flaps.
    fn watch(&mut self, end: Duration, agreed: &mut bool) {
        while self.now() < end {
            let next = (self.now() + self.cfg.cadence).min(end);
            self.sim.run_until(next);
            self.tick();
            let now_agreed = self.sim.agreement(false).agreed;
            if *agreed && !now_agreed {
                self.flaps += 1;
            }
            *agreed = now_agreed;
        }
    }

    /// The warm-up and the steady-state window: runs them, counting flaps, and measures the
    /// window's traffic.
    fn window(&mut self) -> (Duration, Traffic) {
        let mut agreed = self.sim.agreement(false).agreed;
        self.phase = "warm-up";
        let warm_start = self.now();
        let warm_end = self.cut(warm_start + self.cfg.warmup);
        self.watch(warm_end, &mut agreed);
        let warmup = self.now() - warm_start;
        let len = match self.end_at {
            Some(e) => e.saturating_sub(self.now()),
            None => self.cfg.window,
        };
        self.phase = "window";
        let before = self.sent();
        let stream_before = self.sim.metrics().stream_bytes;
        let start = self.now();
        self.watch(start + len, &mut agreed);
        let secs = (self.now() - start).as_secs_f64();
        let nodes = self.sim.running_count();
        let mut t = self.traffic(&before, secs, nodes);
        if secs > 0.0 && nodes > 0 {
            let stream = self.sim.metrics().stream_bytes - stream_before;
            t.stream_bytes_per_node_per_s = stream as f64 / nodes as f64 / secs;
        }
        (warmup, t)
    }

    fn churn(&mut self) {
        let n = self.sim.len();
        let per_round = ((n as f64 * self.cfg.churn_fraction).round() as usize).max(1);
        let mut down: Vec<usize> = Vec::new();
        for _ in 0..self.cfg.churn_rounds {
            if self.out_of_time() {
                break;
            }
            for i in down.drain(..) {
                self.sim.start(i);
            }
            let running: Vec<usize> = (0..n).filter(|&i| self.sim.is_running(i)).collect();
            let picked: Vec<usize> = running
                .choose_multiple(self.sim.rng(), per_round.min(running.len()))
                .copied()
                .collect();
            for i in picked {
                self.faults += 1;
                if self.sim.rng().gen_bool(0.5) {
                    self.sim.crash(i);
                    down.push(i);
                } else {
                    self.sim.restart(i);
                }
            }
            self.run_for(self.cfg.churn_every);
        }
        for i in down {
            self.sim.start(i);
        }
    }
}

/// What [`Run::rotation`] measured.
#[derive(Default)]
struct RotationOutcome {
    rotations: u64,
    rotations_made: u64,
    loss_deaths: u64,
    loss_views: u64,
    partition: Duration,
    heal: Option<Duration>,
    rejoin: Option<Duration>,
    agreement: (Option<Duration>, Option<Duration>),
    keyring_rotated: bool,
    keyring_old_primary: usize,
    keyring_old_held: usize,
    traffic: Traffic,
}

/// A step of the rotation scenario.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Install,
    Use,
    Remove,
    Partition,
    Heal,
}

impl Run<'_> {
    /// Index of the leader every running node follows, if one.
    fn common_leader(&self) -> Option<usize> {
        let a = self.sim.agreement(false);
        if !a.leader_agreed || a.leaders.len() != 1 {
            return None;
        }
        a.leaders
            .iter()
            .next()
            .and_then(|&id| self.sim.index_of(id))
    }

    /// Whether the partitioned node `v` is back: every other running node holds it `Alive` at
    /// its current boot, and it follows the common leader and seals with the leader's epoch.
    fn rejoined(&self, v: usize) -> bool {
        let Some(l) = self.common_leader() else {
            return false;
        };
        let (Some(fv), Some(fl)) = (self.sim.flock(v), self.sim.flock(l)) else {
            return false;
        };
        if fl.key_epoch().is_none() || fv.key_epoch() != fl.key_epoch() {
            return false;
        }
        let (id, boot) = (self.sim.node_id(v), self.sim.boot(v));
        (0..self.sim.len()).filter(|&j| j != v).all(|j| {
            self.sim.flock(j).is_none_or(|f| {
                f.member(id).is_some_and(|m| {
                    m.info.boot == boot && m.info.state == crate::MemberState::Alive
                })
            })
        })
    }

    /// The epoch every running node but `left_out` seals with, if they share one.
    fn common_epoch(&self, left_out: Option<usize>) -> Option<u32> {
        let mut common = None;
        for i in (0..self.sim.len()).filter(|&i| Some(i) != left_out) {
            let Some(f) = self.sim.flock(i) else { continue };
            let e = f.key_epoch()?;
            match common {
                None => common = Some(e),
                Some(c) if c != e => return None,
                Some(_) => {}
            }
        }
        common
    }

    /// Counts the running nodes (but `left_out`) whose live view has been below the running
    /// nodes of their group (`left_out` not counted) for longer than `limit`, once per episode.
    fn short_views(
        &self,
        left_out: Option<usize>,
        limit: Duration,
        below_since: &mut [Option<Duration>],
        counted: &mut [bool],
    ) -> u64 {
        let n = self.sim.len();
        let mut per_group: std::collections::BTreeMap<u16, usize> = Default::default();
        for i in (0..n).filter(|&i| self.sim.is_running(i) && Some(i) != left_out) {
            *per_group.entry(self.sim.group(i)).or_default() += 1;
        }
        let now = self.now();
        let mut episodes = 0;
        for i in 0..n {
            let short = Some(i) != left_out
                && self.sim.flock(i).is_some_and(|f| {
                    f.live_count() < per_group.get(&self.sim.group(i)).copied().unwrap_or(0)
                });
            if !short {
                below_since[i] = None;
                counted[i] = false;
                continue;
            }
            let since = *below_since[i].get_or_insert(now);
            if !counted[i] && now - since > limit {
                counted[i] = true;
                episodes += 1;
            }
        }
        episodes
    }

    /// The rotation scenario after the initial agreement (see the [module docs](self)).
    fn rotation(&mut self) -> (Duration, RotationOutcome) {
        let cfg = self.cfg;
        // Joins and the first leader hand-over of a cold boot settle first.
        self.phase = "warm-up";
        let warm_start = self.now();
        self.run_for(cfg.warmup);
        let warmup = self.now() - warm_start;
        let n = self.sim.len();
        let t = &self.sim.config().timing;
        let susp_min = t
            .probe_interval
            .mul_f64(t.suspicion_mult as f64 * (n as f64).log10().max(1.0));
        let susp_max = susp_min * t.suspicion_max_mult;
        let period = cfg
            .security
            .as_ref()
            .map_or(Duration::from_secs(60), |s| s.rotation_max);
        let start = self.now();
        let step = cfg.keyring_step;
        let part_at = start + step * 4;
        let partition = period * cfg.partition_periods;
        let heal_at = part_at + partition;
        let end = self.cut((start + cfg.rotation_run).max(heal_at + step));
        let mut plan = vec![
            (start + step, Step::Install),
            (start + step * 2, Step::Use),
            (start + step * 3, Step::Remove),
            (part_at, Step::Partition),
            (heal_at, Step::Heal),
        ];
        plan.reverse();

        let old_key = self
            .sim
            .flock(0)
            .and_then(|f| f.keyring())
            .map(|k| k.primary().clone());
        let new_key = crate::crypto::SecretKey::from_bytes(self.sim.rng().gen());
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(self.sim.rng());
        let before = self.sent();
        let stream_before = self.sim.metrics().stream_bytes;
        let made_before: u64 = (0..n)
            .filter_map(|i| self.sim.flock(i))
            .map(|f| f.stats().rotations)
            .sum();
        let deaths_from = self.sim.metrics().live_deaths.len();
        let deaths_total_from = self.sim.metrics().live_deaths_total;

        let mut out = RotationOutcome {
            partition,
            ..RotationOutcome::default()
        };
        let mut victim: Option<usize> = None;
        let mut part_started: Option<Duration> = None;
        // The partitioned node is left out of every count until the agreement after the heal.
        let mut excused = false;
        let mut epochs: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
        let mut below_since: Vec<Option<Duration>> = vec![None; n];
        let mut below_counted = vec![false; n];
        let mut agreed = self.sim.agreement(false).agreed;
        let mut first = true;
        self.phase = "rotation";
        self.sim.watch_terms(true);
        self.full_backoff = Duration::from_millis(500);
        self.next_full = Duration::ZERO;
        loop {
            // Steps due now.
            while plan.last().is_some_and(|(at, _)| *at <= self.now()) {
                let (_, s) = plan.pop().expect("checked");
                match s {
                    Step::Install | Step::Use | Step::Remove => {
                        let k = match s {
                            Step::Install => 0,
                            Step::Use => 1,
                            _ => 2,
                        };
                        let node = order[k % n];
                        let op = match s {
                            Step::Install => crate::crypto::KeyringOp::Install(new_key.clone()),
                            Step::Use => crate::crypto::KeyringOp::Use(new_key.clone()),
                            _ => match &old_key {
                                Some(old) => crate::crypto::KeyringOp::Remove(old.clone()),
                                None => continue,
                            },
                        };
                        self.sim.command(node, crate::Command::Keyring(op));
                    }
                    Step::Partition => {
                        let leader = self.common_leader();
                        let candidates: Vec<usize> = (0..n)
                            .filter(|&i| self.sim.is_running(i) && Some(i) != leader)
                            .collect();
                        if let Some(&v) = candidates.choose(self.sim.rng()) {
                            victim = Some(v);
                            excused = true;
                            part_started = Some(self.now());
                            self.sim.watch_terms(false);
                            self.sim.partition(&[vec![v]]);
                            self.phase = "partitioned";
                        }
                    }
                    Step::Heal => {
                        if victim.is_some() {
                            self.sim.heal();
                            out.heal = Some(self.now());
                            self.phase = "after-heal";
                            self.full_backoff = Duration::from_millis(500);
                            self.next_full = Duration::ZERO;
                        }
                    }
                }
            }
            if !first {
                let left_out = victim.filter(|_| excused);
                if let Some(e) = self.common_epoch(left_out) {
                    if epochs.insert(e) {
                        out.rotations += 1;
                    }
                }
                out.loss_views +=
                    self.short_views(left_out, susp_min, &mut below_since, &mut below_counted);
            }
            // Rejoin and agreement after the heal.
            if let (Some(v), Some(_)) = (victim, out.heal) {
                if out.rejoin.is_none() && self.rejoined(v) {
                    out.rejoin = Some(self.now());
                }
                if out.agreement.0.is_none() {
                    let (full, leader_agreed) = self.check();
                    if leader_agreed && out.agreement.1.is_none() {
                        out.agreement.1 = Some(self.now());
                    }
                    if full {
                        out.agreement.0 = Some(self.now());
                        excused = false;
                        below_since.iter_mut().for_each(|b| *b = None);
                        self.sim.watch_terms(true);
                        self.phase = "rotation";
                    }
                }
            }
            let now_agreed = self.sim.agreement(false).agreed;
            if !excused && agreed && !now_agreed {
                self.flaps += 1;
            }
            agreed = now_agreed;
            if first {
                // The epoch in force at the start is not a rotation of this run.
                epochs.extend((0..n).filter_map(|i| self.sim.flock(i)?.key_epoch()));
                first = false;
            }
            if self.now() >= end {
                break;
            }
            let mut next = (self.now() + self.cfg.cadence).min(end);
            if let Some((at, _)) = plan.last() {
                next = next.min(*at);
            }
            self.sim.run_until(next);
            self.tick();
        }
        let made_after: u64 = (0..n)
            .filter_map(|i| self.sim.flock(i))
            .map(|f| f.stats().rotations)
            .sum();
        out.rotations_made = made_after.saturating_sub(made_before);
        // Deaths of reachable, running nodes since the start, less the partition's.
        let m = self.sim.metrics();
        let excuse_until = out
            .heal
            .map(|h| (h + susp_max).max(out.agreement.0.unwrap_or(Duration::MAX)));
        let excused_death = |at: Duration, a: u32, b: u32| match (victim, part_started) {
            (Some(v), Some(p)) => {
                (a as usize == v || b as usize == v)
                    && at >= p
                    && excuse_until.is_none_or(|u| at <= u)
            }
            _ => false,
        };
        let kept = m.live_deaths[deaths_from.min(m.live_deaths.len())..]
            .iter()
            .filter(|&&(at, a, b)| !excused_death(at, a, b))
            .count() as u64;
        let unkept = (m.live_deaths_total - deaths_total_from)
            .saturating_sub((m.live_deaths.len() - deaths_from.min(m.live_deaths.len())) as u64);
        out.loss_deaths = kept + unkept;
        for f in (0..n).filter_map(|i| self.sim.flock(i)) {
            let Some(k) = f.keyring() else { continue };
            if k.primary().as_bytes() != new_key.as_bytes() {
                out.keyring_old_primary += 1;
            }
            if old_key.as_ref().is_some_and(|o| k.contains(o)) {
                out.keyring_old_held += 1;
            }
        }
        out.keyring_rotated = old_key.is_some()
            && (0..n).filter_map(|i| self.sim.flock(i)).all(|f| {
                f.keyring().is_some_and(|k| {
                    k.primary().as_bytes() == new_key.as_bytes()
                        && old_key.as_ref().is_some_and(|o| !k.contains(o))
                })
            });
        let span = secs(self.now() - start);
        let nodes = self.sim.running_count();
        out.traffic = self.traffic(&before, span, nodes);
        if span > 0.0 && nodes > 0 {
            let stream = self.sim.metrics().stream_bytes - stream_before;
            out.traffic.stream_bytes_per_node_per_s = stream as f64 / nodes as f64 / span;
        }
        (warmup, out)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs a scenario and reports what it measured.
pub fn run(cfg: &ScenarioConfig) -> Result<Report, crate::ConfigError> {
    run_with_progress(cfg, &mut |_| {})
}

/// [`run`], calling `progress` about once per simulated second (large flocks take minutes).
///
/// Reads the wall clock once before and once after, for [`Report::wall_s`]; nothing in the
/// simulation depends on it.
#[allow(clippy::disallowed_methods)]
pub fn run_with_progress(
    cfg: &ScenarioConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Report, crate::ConfigError> {
    let started = std::time::Instant::now();
    let sim = Sim::new(cfg.sim_config())?;
    let mut report = run_sim(cfg, sim, progress);
    report.wall_s = started.elapsed().as_secs_f64();
    report.peak_rss_mb = process_memory().map(|(_, peak)| peak as f64 / (1 << 20) as f64);
    Ok(report)
}

/// The process's resident and peak resident set sizes in bytes (Linux `/proc/self`; None
/// elsewhere): what benchmarks and memory-bound tests report.
pub fn process_memory() -> Option<(u64, u64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hwm_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((pages * 4096, hwm_kb * 1024))
}

fn run_sim(cfg: &ScenarioConfig, sim: Sim, progress: &mut dyn FnMut(&Progress)) -> Report {
    let n = sim.len();
    let mut r = Run {
        cfg,
        sim,
        progress,
        phase: if cfg.scenario == Scenario::PartitionHeal {
            "split"
        } else {
            "boot"
        },
        next_progress: Duration::ZERO,
        end_at: cfg.duration,
        full_always: n <= 300,
        next_full: Duration::ZERO,
        full_backoff: Duration::from_millis(500),
        flaps: 0,
        faults: 0,
    };
    let mut failed_phase = None;
    let mut trigger = Duration::ZERO;
    let mut agreement = (None, None);
    let mut initial = None;
    let mut leaders_before_heal = None;
    let mut rotation: Option<RotationOutcome> = None;
    let mut rotation_warmup = Duration::ZERO;

    if cfg.scenario == Scenario::PartitionHeal {
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(r.sim.rng());
        let (a, b) = order.split_at(n / 2);
        r.sim.partition(&[a.to_vec(), b.to_vec()]);
    }
    r.sim.start_all_within(cfg.start_within);
    let first = r.until_agreed(cfg.phase_deadline);
    let boot_end = first.0.unwrap_or(r.now());
    let boot_traffic = r.traffic(&vec![(0, 0); n], secs(boot_end), n);

    match cfg.scenario {
        Scenario::ColdBoot => agreement = first,
        _ if first.0.is_none() => {
            failed_phase = Some(if cfg.scenario == Scenario::PartitionHeal {
                "split"
            } else {
                "boot"
            });
        }
        Scenario::KillLeader => {
            initial = first.0;
            r.sim.watch_terms(true);
            r.phase = "settle";
            r.run_for(cfg.settle);
            let a = r.sim.agreement(false);
            let leader = a.leaders.iter().next().and_then(|&id| r.sim.index_of(id));
            match leader {
                Some(l) if a.leader_agreed && !r.out_of_time() => {
                    r.sim.crash(l);
                    r.phase = "after-crash";
                    trigger = r.now();
                    agreement = r.until_agreed(trigger + cfg.phase_deadline);
                }
                _ => failed_phase = Some("settle"),
            }
        }
        Scenario::PartitionHeal => {
            initial = first.0;
            leaders_before_heal = Some(r.sim.agreement(false).leaders.len());
            r.phase = "settle";
            r.run_for(cfg.settle);
            if r.out_of_time() {
                failed_phase = Some("settle");
            } else {
                r.sim.heal();
                r.phase = "after-heal";
                trigger = r.now();
                agreement = r.until_agreed(trigger + cfg.phase_deadline);
            }
        }
        Scenario::Churn => {
            initial = first.0;
            r.sim.watch_terms(true);
            r.phase = "churn";
            r.churn();
            r.phase = "after-churn";
            trigger = r.now();
            agreement = r.until_agreed(trigger + cfg.phase_deadline);
        }
        Scenario::Rotation => {
            initial = first.0;
            let (w, o) = r.rotation();
            rotation_warmup = w;
            if let Some(h) = o.heal {
                trigger = h;
            }
            agreement = o.agreement;
            rotation = Some(o);
        }
    }
    if failed_phase.is_none() && agreement.0.is_none() {
        failed_phase = Some(match cfg.scenario {
            Scenario::ColdBoot => "boot",
            Scenario::KillLeader => "after-crash",
            Scenario::PartitionHeal => "after-heal",
            Scenario::Churn => "after-churn",
            Scenario::Rotation => "after-heal",
        });
    }
    if agreement.0.is_some() {
        r.sim.watch_terms(true);
    }
    let (warmup, steady) = match rotation.as_mut() {
        Some(o) => (rotation_warmup, std::mem::take(&mut o.traffic)),
        None => r.window(),
    };
    let end = r.sim.agreement(true);
    let single = end.leaders.len() == 1 && end.leader_agreed;
    let leader_view = if single {
        end.leaders.iter().next().and_then(|&id| {
            let i = r.sim.index_of(id)?;
            r.sim.flock(i)?.leader().map(|l| (id, l.term))
        })
    } else {
        None
    };
    let m = r.sim.metrics();
    let since = |t: Option<Duration>| t.map(|t| secs(t.saturating_sub(trigger)));
    Report {
        nodes: n,
        seed: cfg.seed,
        scenario: cfg.scenario,
        preset: cfg.preset,
        loss: r.sim.net_config().loss,
        duplicate: r.sim.net_config().duplicate,
        secure: cfg.security.is_some(),
        converged: end.agreed,
        leaders: end.leaders.len(),
        leader: leader_view.map(|(id, _)| id.to_string()),
        term: leader_view.map(|(_, t)| t),
        agreement_s: since(agreement.0),
        leader_agreement_s: since(agreement.1),
        initial_agreement_s: initial.map(secs),
        leaders_before_heal,
        bytes_per_node_per_s: steady.bytes_per_node_per_s,
        msgs_per_node_per_s: steady.msgs_per_node_per_s,
        stream_bytes_per_node_per_s: steady.stream_bytes_per_node_per_s,
        max_bytes_per_node_per_s: steady.max_bytes_per_node_per_s,
        window_s: steady.secs,
        warmup_s: secs(warmup),
        boot_bytes_per_node_per_s: boot_traffic.bytes_per_node_per_s,
        boot_msgs_per_node_per_s: boot_traffic.msgs_per_node_per_s,
        false_positive_deaths: m.false_dead.len(),
        partition_deaths: m.partition_dead.len(),
        live_suspicions: m.live_suspicions,
        term_conflicts: m.term_conflicts(),
        flaps: r.flaps,
        faults: r.faults,
        live_nodes: r.sim.running_count(),
        oversized_datagrams: m.oversized_datagrams,
        sim_s: secs(r.now()),
        events: m.events,
        failed_phase: failed_phase.map(str::to_string),
        trace_hash: format!("{:016x}", r.sim.trace_hash()),
        state_hash: cfg
            .state_hash
            .then(|| format!("{:016x}", r.sim.state_hash())),
        rotations: rotation.as_ref().map(|o| o.rotations),
        rotations_made: rotation.as_ref().map(|o| o.rotations_made),
        membership_losses: rotation.as_ref().map(|o| o.loss_deaths + o.loss_views),
        membership_loss_deaths: rotation.as_ref().map(|o| o.loss_deaths),
        membership_loss_views: rotation.as_ref().map(|o| o.loss_views),
        partition_s: rotation.as_ref().map(|o| secs(o.partition)),
        rejoin_after_heal_s: rotation
            .as_ref()
            .and_then(|o| Some(secs(o.rejoin? - o.heal?))),
        keyring_rotated: rotation.as_ref().map(|o| o.keyring_rotated),
        keyring_old_primary: rotation.as_ref().map(|o| o.keyring_old_primary),
        keyring_old_held: rotation.as_ref().map(|o| o.keyring_old_held),
        wall_s: 0.0,
        peak_rss_mb: None,
    }
}
