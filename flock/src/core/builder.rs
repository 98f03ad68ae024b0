//! [`FlockBuilder`]: the one way to make a [`Flock`].
//!
//! ```ignore
//! let flock = Flock::builder(config, identity)
//!     .keys(keyring, SecurityTiming::default()) // sealed datagrams; leave out for plain mode
//!     .rng_seed(seed_from_the_os)               // or .sim_seed(n) in tests and the simulator
//!     .start(now)?;
//! ```
//!
//! The rng is seeded before anything draws from it: the first probe, gossip, push-pull and dead
//! probe are jittered with it, so nodes powered up together spread their first rounds instead of
//! sending them at the same instant. A flock without a seed is refused, never seeded with zeros.

use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::secure::SecurityTiming;
use super::{Flock, Identity};
use crate::config::{Config, ConfigError};
use crate::crypto::Keyring;

/// How the rng of a flock is seeded.
#[derive(Clone, Copy)]
enum Seed {
    /// 32 bytes from a cryptographically secure source (the agent draws them from the OS).
    Bytes([u8; 32]),
    /// A number: tests and the simulator, where runs must replay.
    Sim(u64),
}

/// Builds a [`Flock`]; see the module docs.
#[must_use = "a builder does nothing until `start`"]
pub struct FlockBuilder {
    config: Config,
    identity: Identity,
    keys: Option<(Keyring, SecurityTiming)>,
    seed: Option<Seed>,
}

impl Flock {
    /// Starts building a node with this config and identity.
    pub fn builder(config: Config, identity: Identity) -> FlockBuilder {
        FlockBuilder {
            config,
            identity,
            keys: None,
            seed: None,
        }
    }
}

impl FlockBuilder {
    /// Security on: every datagram sealed, discovery by join handshake under the keyring's
    /// primary key, transient keys rotated by the leader with `timing`. Without it the node
    /// sends plain datagrams (tests of the protocol alone).
    pub fn keys(mut self, keyring: Keyring, timing: SecurityTiming) -> FlockBuilder {
        self.keys = Some((keyring, timing));
        self
    }

    /// Seeds the rng from 32 bytes of a cryptographically secure source (the transient keys
    /// the leader makes come from this rng).
    pub fn rng_seed(mut self, seed: [u8; 32]) -> FlockBuilder {
        self.seed = Some(Seed::Bytes(seed));
        self
    }

    /// Seeds the rng from a number, for tests and the simulator (runs replay).
    pub fn sim_seed(mut self, seed: u64) -> FlockBuilder {
        self.seed = Some(Seed::Sim(seed));
        self
    }

    /// Makes the node at time `now`: it knows nobody yet and starts discovery at once.
    pub fn start(self, now: Duration) -> Result<Flock, ConfigError> {
        let rng = match self.seed {
            Some(Seed::Bytes(b)) => ChaCha8Rng::from_seed(b),
            Some(Seed::Sim(n)) => ChaCha8Rng::seed_from_u64(n),
            None => {
                return Err(ConfigError {
                    field: "rng_seed",
                    reason: "a flock needs an rng seed (rng_seed, or sim_seed in tests)".into(),
                })
            }
        };
        Flock::with_rng(self.config, self.identity, rng, self.keys, now)
    }
}
