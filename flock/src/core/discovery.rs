//! Discovery: finding nodes that are not members yet, by probing random addresses of the
//! configured address space (fast while alone), the seeds, and members held dead (which may live
//! on in another flock). With security on, a discovery probe is a join handshake.

use std::net::SocketAddr;
use std::time::Duration;

use rand::Rng;

use super::machine::Flock;
use super::timer::Timer;
use crate::crypto::Purpose;

/// The discovery state.
#[derive(Default)]
pub(super) struct Discovery {
    /// Discovery rounds run so far (while alone, every other round goes to a seed).
    pub(super) round: u64,
}

impl Flock {
    pub(super) fn discovery_round(&mut self, alone: bool) {
        self.discovery.round += 1;
        // While alone, every other round goes to a seed (or an address seen before).
        if alone && !self.config.seeds.is_empty() && (self.discovery.round % 2 == 1) {
            let i = (self.discovery.round / 2) as usize % self.config.seeds.len();
            let addr = self.config.seeds[i];
            if addr != self.me.addr {
                self.send_discovery_ping(addr);
                return;
            }
        }
        let port = self.me.addr.port();
        let size = self.config.space.size(port);
        if size == 0 {
            if alone && !self.config.seeds.is_empty() {
                let i = self.rng.gen_range(0..self.config.seeds.len());
                let addr = self.config.seeds[i];
                if addr != self.me.addr {
                    self.send_discovery_ping(addr);
                }
            }
            return;
        }
        let i = self.rng.gen_range(0..size);
        let Some(addr) = self.config.space.nth(i, port) else {
            return;
        };
        let live_there = self
            .members
            .id_at(&addr)
            .is_some_and(|id| self.members.is_live(id));
        if addr == self.me.addr || live_there {
            return; // a live member: nothing to discover there
        }
        // Unknown, or a member we hold dead: it may live on in another flock (with security on,
        // under other keys, which only a handshake gets across).
        self.send_discovery_ping(addr);
    }

    /// Probes an address that is not a known member. With security on, that is a join
    /// handshake (sealed under the secondary key): it works before we hold any transient key,
    /// and it reaches flocks that formed apart under other transient keys.
    pub(super) fn send_discovery_ping(&mut self, addr: SocketAddr) {
        if self.keys.sec.is_some() {
            self.send_handshake(addr, Purpose::Join);
        } else {
            self.send_ping(addr, None);
        }
    }

    /// Timer: a discovery round (fast while alone).
    pub(super) fn on_discovery_timer(&mut self, now: Duration) {
        let t = &self.config.timing;
        let alone = self.members.live_len() == 0;
        let next = now
            + if alone {
                t.discovery_interval_alone
            } else {
                t.discovery_interval
            };
        self.schedule(next, Timer::Discovery);
        if !self.leaving {
            self.discovery_round(alone);
        }
    }

    /// Timer: probe a member held dead (it may have come back, or live on in another flock).
    pub(super) fn on_dead_probe_timer(&mut self, now: Duration) {
        let next = now + self.config.timing.dead_probe_interval;
        self.schedule(next, Timer::DeadProbe);
        if !self.leaving {
            if let Some(id) = self.members.choose_dead(&mut self.rng) {
                let addr = self.addr(id);
                self.send_ping(addr, Some(id));
            }
        }
    }
}
