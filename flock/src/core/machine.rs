//! [`Flock`]: discovery, SWIM/Lifeguard membership and leader election in one state machine.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{LeaderClaim, MemberInfo, MemberState, NodeId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::detect::Detection;
use super::discovery::Discovery;
use super::dissemination::Dissemination;
use super::keys::Keys;
use super::leader::{election_tick, Leadership};
use super::membership::reap_period;
use super::secure::{Sec, SecurityTiming};
use super::table::Table;
use super::throttle::AddrThrottle;
use super::timer::{Timer, Timers};
use super::wire::Wire;
use super::{Command, Event, Identity, LeaderView, Member, Outbox, Stats, Transmit};
use crate::config::{bloc_tag, Config, ConfigError};
use crate::crypto::Keyring;

/// Room kept in the output queues once drained.
const OUTBOX_KEEP: usize = 64;

/// The flock state machine. See the crate docs for the protocol.
///
/// `Flock` routes inputs (datagrams, stream frames, timers, commands) to the concern they belong
/// to; each concern keeps its state in its own sub-state type, in its own file:
///
/// | field | type | file |
/// |---|---|---|
/// | `timers` | `Timers` | `timer.rs` |
/// | `detect` | `Detection` | `detect.rs` (probes, suspicion, Lifeguard) |
/// | `spread` | `Dissemination` | `dissemination.rs` (gossip, push-pull, digests) |
/// | `discovery` | `Discovery` | `discovery.rs` |
/// | `lead` | `Leadership` | `leader.rs` |
/// | `keys` | `Keys` | `keys.rs` (with `Sec`: `secure.rs`, `handshake.rs`, `ring.rs`) |
/// | `wire` | `Wire` | `wire.rs` (sealing, opening, datagram budget) |
///
/// What every concern reads stays here: the member table and the revoked nodes (their rules are
/// in `membership.rs`), this node's entry, the RNG, the outputs. `inbound.rs` routes what comes
/// from the network; this file routes timers.
pub struct Flock {
    pub(super) config: Config,
    pub(super) me: Identity,
    /// This node's own entry (state Alive, or Left once it left).
    pub(super) self_member: Member,
    /// The one RNG: every random choice draws from it, in an order the simulator replays.
    pub(super) rng: ChaCha8Rng,
    /// Every other member, with the live and dead sets and the live digest derived from them.
    pub(super) members: Table,
    /// Nodes revoked by the flock (at most [`REVOKED_MAX`](super::membership::REVOKED_MAX)):
    /// kept out of the table, their datagrams dropped.
    pub(super) revoked: std::collections::BTreeSet<NodeId>,
    /// Revoked nodes told so lately, by address (see [`Flock::tell_revoked`]).
    pub(super) told_revoked: AddrThrottle,
    pub(super) timers: Timers,
    pub(super) detect: Detection,
    pub(super) spread: Dissemination,
    pub(super) discovery: Discovery,
    pub(super) lead: Leadership,
    pub(super) keys: Keys,
    pub(super) wire: Wire,
    pub(super) leaving: bool,
    pub(super) left: bool,
    /// Time of the input being handled.
    pub(super) now: Duration,
    pub(super) stats: Stats,
    pub(super) out: Outbox,
}

impl Flock {
    /// The node [`super::FlockBuilder::start`] makes: rng first, then everything that draws
    /// from it.
    pub(super) fn with_rng(
        config: Config,
        identity: Identity,
        rng: ChaCha8Rng,
        keys: Option<(Keyring, SecurityTiming)>,
        now: Duration,
    ) -> Result<Flock, ConfigError> {
        config.validate()?;
        let self_member = Member {
            info: MemberInfo {
                id: identity.id,
                boot: identity.boot,
                addr: identity.addr,
                incarnation: 0,
                state: MemberState::Alive,
                key: identity.key,
            },
            since: now,
        };
        let mut flock = Flock {
            wire: Wire {
                bloc_tag: bloc_tag(&config.bloc),
                counter: 0,
                reply_cap: None,
                answering: None,
            },
            config,
            me: identity,
            self_member,
            rng,
            members: Table::default(),
            revoked: Default::default(),
            told_revoked: AddrThrottle::default(),
            timers: Timers::default(),
            detect: Detection::default(),
            spread: Dissemination::default(),
            discovery: Discovery::default(),
            lead: Leadership::new(now),
            keys: Keys::default(),
            leaving: false,
            left: false,
            now,
            stats: Stats::default(),
            out: Outbox::default(),
        };

        flock.keys.sec = keys.map(|(keyring, security)| {
            Sec::new(
                &flock.config.bloc,
                flock.config.mtu,
                keyring,
                security,
                identity.id,
                identity.boot,
                identity.addr,
                now,
            )
        });
        // Spread the periodic work of many nodes started together.
        let t = flock.config.timing.clone();
        let jitter = |rng: &mut ChaCha8Rng, d: Duration| {
            Duration::from_nanos(rng.gen_range(0..d.as_nanos().max(1) as u64))
        };
        let first_probe = now + jitter(&mut flock.rng, t.probe_interval);
        flock.schedule(first_probe, Timer::Probe);
        let first_gossip = now + jitter(&mut flock.rng, t.gossip_interval);
        flock.schedule(first_gossip, Timer::Gossip);
        let first_pp =
            now + t.push_pull_fast_interval + jitter(&mut flock.rng, t.push_pull_fast_interval);
        flock.schedule(first_pp, Timer::PushPull);
        flock.schedule(now, Timer::Discovery);
        let first_dead = now + jitter(&mut flock.rng, t.dead_probe_interval);
        flock.schedule(first_dead, Timer::DeadProbe);
        flock.schedule(now + reap_period(&t), Timer::Reap);
        flock.schedule(now + election_tick(&t), Timer::Election);
        Ok(flock)
    }

    /// Every pending timer's deadline, soonest first (tests of the schedule).
    #[cfg(test)]
    pub(crate) fn timer_deadlines(&self) -> Vec<Duration> {
        self.timers.deadlines()
    }

    // ----- queries -------------------------------------------------------------------------

    /// Every member this node knows of, itself included.
    pub fn members(&self) -> impl Iterator<Item = Member> + '_ {
        std::iter::once(self.self_member).chain(self.members.iter())
    }

    /// One member (this node included).
    pub fn member(&self, id: NodeId) -> Option<Member> {
        if id == self.me.id {
            Some(self.self_member)
        } else {
            self.members.get(id)
        }
    }

    /// The leader this node follows.
    pub fn leader(&self) -> Option<LeaderView> {
        let claim = self.lead.claim?;
        let addr = self.member(claim.leader)?.info.addr;
        Some(LeaderView {
            id: claim.leader,
            addr,
            term: claim.term,
        })
    }

    /// The current leader claim, with its beat counter.
    pub fn leader_claim(&self) -> Option<LeaderClaim> {
        self.lead.claim
    }

    /// This node.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Live members (alive or suspect), this node included.
    pub fn live_count(&self) -> usize {
        self.members.live_len() + 1
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// True once a graceful leave has completed.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Lifeguard local-health score (0 = healthy).
    pub fn awareness(&self) -> u32 {
        self.detect.awareness
    }

    // ----- outputs -------------------------------------------------------------------------

    /// Next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.out.transmits.pop_front();
        if t.is_none() {
            self.out.transmits.shrink_to(OUTBOX_KEEP);
        }
        t
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.out.events.pop_front();
        if e.is_none() {
            // A push-pull that teaches N members emits N events at once: do not keep room for
            // N events ever after (the simulator holds every node's queues).
            self.out.events.shrink_to(OUTBOX_KEEP);
        }
        e
    }

    /// When [`Flock::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.left {
            return None;
        }
        self.timers.next_at()
    }

    // ----- inputs --------------------------------------------------------------------------

    /// A command from the application.
    pub fn handle_command(&mut self, now: Duration, cmd: Command) {
        self.now = now;
        if self.left {
            return;
        }
        match cmd {
            Command::Join(addrs) => {
                for addr in addrs {
                    if addr != self.me.addr {
                        self.send_discovery_ping(addr);
                    }
                }
            }
            Command::Leave => self.start_leave(now),
            Command::Keyring(op) => self.keyring_op(op, true, 0),
            Command::Revoke(id) => self.apply_revoke(now, id),
        }
    }

    /// Runs every timer that is due.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.now = now;
        while !self.left {
            let Some(timer) = self.timers.pop_due(now) else {
                break;
            };
            self.on_timer(now, timer);
        }
    }

    // ----- envelope seam -------------------------------------------------------------------

    /// This node's own entry.
    pub(super) fn my_info(&self) -> MemberInfo {
        self.self_member.info
    }

    // ----- timers --------------------------------------------------------------------------

    /// Wakes the core at `at` for `timer`.
    pub(super) fn schedule(&mut self, at: Duration, timer: Timer) {
        self.timers.schedule(at, timer);
    }

    /// Routes a due timer to the concern that scheduled it.
    pub(super) fn on_timer(&mut self, now: Duration, timer: Timer) {
        match timer {
            Timer::Probe => self.on_probe_timer(now),
            Timer::ProbeTimeout { seq } => self.on_probe_timeout(now, seq),
            Timer::IndirectTimeout { seq } => self.on_indirect_timeout(now, seq),
            Timer::RelayTimeout { seq } => self.on_relay_timeout(seq),
            Timer::Suspicion { id, token } => self.on_suspicion_timeout(now, id, token),
            Timer::SuspectProbe { id, token } => self.on_suspect_probe_timer(now, id, token),
            Timer::Gossip => self.on_gossip_timer(now),
            Timer::PushPull => self.on_push_pull_timer(now),
            Timer::Discovery => self.on_discovery_timer(now),
            Timer::DeadProbe => self.on_dead_probe_timer(now),
            Timer::Reap => self.on_reap_timer(now),
            Timer::Beat { term } => self.on_beat_timer(now, term),
            Timer::Election => self.on_election_timer(now),
            Timer::LeaveDone => self.on_leave_done(),
        }
    }

    // ----- probing (SWIM + Lifeguard) ------------------------------------------------------

    /// The address of a member of the table.
    pub(super) fn addr(&self, id: NodeId) -> SocketAddr {
        self.members.addr(id).expect("a member of the table")
    }

    // ----- gossip and push-pull ------------------------------------------------------------

    // ----- messages ------------------------------------------------------------------------

    // ----- membership rules ----------------------------------------------------------------

    // ----- leave ---------------------------------------------------------------------------

    // ----- leader election -----------------------------------------------------------------
}
