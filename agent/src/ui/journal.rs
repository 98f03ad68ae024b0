//! What the page lists as recent events, and when this node's transient key last changed.
//!
//! Fed with the flock's events as they come, and with each reading of the registry and the
//! store, from which it notes what changed since the reading before (a registration, an expiry,
//! a health change, a new store leader): readings, not a stream of changes, so a reading missed
//! costs nothing. Bounded: the newest [`EVENTS_MAX`] events.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crux_flock::Event;
use crux_proto::grpc::steward::v1::Instance;

/// Events kept.
pub const EVENTS_MAX: usize = 50;

/// One event as the page lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Noted {
    /// When it was noted, Unix milliseconds.
    pub at_ms: u64,
    /// Its class on the page: `alive`, `suspect`, `dead` or `info`.
    pub kind: &'static str,
    /// What happened.
    pub text: String,
}

/// An instance as the journal compares readings: its name, state and health.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    name: String,
    state: &'static str,
    health: &'static str,
}

/// Recent events and the key epoch's age.
#[derive(Debug, Default)]
pub struct Journal {
    events: VecDeque<Noted>,
    /// The key epoch this node seals with and the driver time it was first seen.
    key: Option<(u32, Duration)>,
    /// The registry at the last reading, by instance id (None: not read yet).
    registry: Option<BTreeMap<String, Seen>>,
    /// The store leader at the last reading (None: not read yet).
    store_leader: Option<String>,
    ready: bool,
}

impl Journal {
    fn note(&mut self, at_ms: u64, kind: &'static str, text: String) {
        if self.events.len() == EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(Noted { at_ms, kind, text });
    }

    /// The events, newest first.
    pub fn recent(&self) -> impl Iterator<Item = &Noted> {
        self.events.iter().rev()
    }

    /// Notes a flock event (a member's update, which says nothing new to people, is left out).
    pub fn flock_event(&mut self, at_ms: u64, e: &Event) {
        let (kind, text) = match e {
            Event::MemberJoined(m) => ("alive", format!("node {} joined from {}", m.id, m.addr)),
            Event::MemberUpdated(_) => return,
            Event::MemberSuspect(m) => {
                ("suspect", format!("node {} at {} is suspect", m.id, m.addr))
            }
            Event::MemberDead(m) => ("dead", format!("node {} at {} is dead", m.id, m.addr)),
            Event::MemberLeft(m) => ("info", format!("node {} at {} left", m.id, m.addr)),
            Event::MemberReaped(id) => ("info", format!("node {id} forgotten")),
            Event::LeaderChanged(Some(l)) => (
                "info",
                format!("leader is now {} at {}, term {}", l.id, l.addr, l.term),
            ),
            Event::LeaderChanged(None) => ("suspect", "no leader known".to_string()),
            Event::LeaveComplete => ("info", "this node left the flock".to_string()),
            Event::MemberRevoked(id) => ("dead", format!("node {id} revoked")),
            Event::Revoked => ("dead", "this node was revoked by the flock".to_string()),
            Event::KeyringChanged => ("info", "the bloc keyring changed".to_string()),
            Event::KeyringRefused(why) => ("suspect", format!("keyring change refused: {why}")),
            #[allow(unreachable_patterns)] // events the flock adds later are listed as they are
            other => ("info", format!("{other:?}")),
        };
        self.note(at_ms, kind, text);
    }

    /// Notes that `n` flock events were lost (this journal fell behind).
    pub fn missed(&mut self, at_ms: u64, n: u64) {
        self.note(at_ms, "suspect", format!("{n} flock event(s) missed"));
    }

    /// Notes the agent's readiness when it changes.
    pub fn ready(&mut self, at_ms: u64, ready: bool) {
        if ready != self.ready {
            self.ready = ready;
            let text = if ready {
                "agent ready"
            } else {
                "agent not ready"
            };
            self.note(at_ms, if ready { "alive" } else { "suspect" }, text.into());
        }
    }

    /// Takes the key epoch of a snapshot at driver time `now`; returns how long ago it changed
    /// (None: no key).
    pub fn key_epoch(&mut self, at_ms: u64, epoch: Option<u32>, now: Duration) -> Option<Duration> {
        let epoch = epoch?;
        match self.key {
            Some((e, since)) if e == epoch => Some(now.saturating_sub(since)),
            _ => {
                self.key = Some((epoch, now));
                self.note(
                    at_ms,
                    "info",
                    format!("sealing with transient key epoch {epoch}"),
                );
                Some(Duration::ZERO)
            }
        }
    }

    /// Takes a reading of the registry: notes what was registered, changed or went away since
    /// the reading before (the first reading is taken as it is).
    pub fn registry(&mut self, at_ms: u64, instances: &[Instance]) {
        let now: BTreeMap<String, Seen> = instances
            .iter()
            .map(|i| {
                let seen = Seen {
                    name: format!("{} {}", i.api, i.inst),
                    state: crux_steward::select::state_name(i.state),
                    health: crux_steward::select::health_name(i.health),
                };
                (i.id.clone(), seen)
            })
            .collect();
        let Some(before) = self.registry.replace(now.clone()) else {
            return;
        };
        for (id, s) in &now {
            match before.get(id) {
                None => self.note(
                    at_ms,
                    "alive",
                    format!("{} registered ({}, {})", s.name, s.state, s.health),
                ),
                Some(b) if b != s => self.note(
                    at_ms,
                    if s.health == "healthy" {
                        "info"
                    } else {
                        "suspect"
                    },
                    format!("{} is now {}, {}", s.name, s.state, s.health),
                ),
                Some(_) => {}
            }
        }
        for (id, b) in &before {
            if !now.contains_key(id) {
                self.note(at_ms, "dead", format!("{} gone from the registry", b.name));
            }
        }
    }

    /// Takes a reading of the store's leader (empty: none); notes a change.
    pub fn store_leader(&mut self, at_ms: u64, leader: &str) {
        if self.store_leader.as_deref() == Some(leader) {
            return;
        }
        let first = self.store_leader.replace(leader.to_string()).is_none();
        if first && !leader.is_empty() {
            return;
        }
        if leader.is_empty() {
            self.note(at_ms, "suspect", "the store has no leader".into());
        } else {
            self.note(at_ms, "info", format!("store leader is now {leader}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_proto::grpc::steward::v1::{Health, RunState};

    fn inst(id: &str, health: Health) -> Instance {
        Instance {
            id: id.into(),
            api: "ntp2".into(),
            inst: format!("ntp2_{id}"),
            state: RunState::Running as i32,
            health: health as i32,
            ..Default::default()
        }
    }

    fn texts(j: &Journal) -> Vec<String> {
        j.recent().map(|n| n.text.clone()).collect()
    }

    #[test]
    fn registry_readings_note_what_changed_between_them() {
        let mut j = Journal::default();
        j.registry(1, &[inst("1", Health::Healthy)]);
        assert!(texts(&j).is_empty(), "the first reading is taken as it is");
        j.registry(2, &[inst("1", Health::Healthy), inst("2", Health::Healthy)]);
        j.registry(
            3,
            &[inst("1", Health::Unhealthy), inst("2", Health::Healthy)],
        );
        j.registry(4, &[inst("1", Health::Unhealthy)]);
        j.registry(5, &[inst("1", Health::Unhealthy)]);
        assert_eq!(
            texts(&j),
            [
                "ntp2 ntp2_2 gone from the registry",
                "ntp2 ntp2_1 is now running, unhealthy",
                "ntp2 ntp2_2 registered (running, healthy)",
            ]
        );
    }

    #[test]
    fn the_key_age_counts_from_the_epoch_change() {
        let mut j = Journal::default();
        let s = Duration::from_secs;
        assert_eq!(j.key_epoch(0, None, s(1)), None);
        assert_eq!(j.key_epoch(0, Some(4), s(2)), Some(s(0)));
        assert_eq!(j.key_epoch(0, Some(4), s(32)), Some(s(30)));
        assert_eq!(j.key_epoch(0, Some(5), s(40)), Some(s(0)));
        assert_eq!(j.key_epoch(0, Some(5), s(41)), Some(s(1)));
        assert_eq!(
            texts(&j),
            [
                "sealing with transient key epoch 5",
                "sealing with transient key epoch 4"
            ]
        );
    }

    #[test]
    fn only_the_newest_events_are_kept() {
        let mut j = Journal::default();
        for i in 0..(EVENTS_MAX as u64 + 10) {
            j.missed(i, i);
        }
        assert_eq!(j.recent().count(), EVENTS_MAX);
        assert_eq!(j.recent().next().unwrap().at_ms, EVENTS_MAX as u64 + 9);
    }

    #[test]
    fn a_store_leader_change_is_noted_once() {
        let mut j = Journal::default();
        j.store_leader(1, "a");
        j.store_leader(2, "a");
        j.store_leader(3, "");
        j.store_leader(4, "b");
        assert_eq!(
            texts(&j),
            ["store leader is now b", "the store has no leader"]
        );
    }
}
