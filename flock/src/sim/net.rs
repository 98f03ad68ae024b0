//! The simulated network: latency, loss, duplication, bandwidth of streams.

use std::time::Duration;

use crate::config::Preset;

/// How the simulated network treats traffic.
///
/// Every datagram independently: is lost with probability `loss`; otherwise arrives after
/// `latency + U[0, jitter]` (so datagrams sent close together can arrive out of order); and with
/// probability `duplicate` a second copy arrives after its own independent delay.
///
/// Streams are reliable (TCP): a request arrives after a connect round trip plus one way plus
/// `bytes / bandwidth`; the reply comes back after one way plus its transfer time. A stream to a
/// node that does not run, or that a partition hides, fails after `connect_timeout`.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// Fixed one-way delay of every datagram and stream segment.
    pub latency: Duration,
    /// Uniformly random extra one-way delay, drawn per datagram.
    pub jitter: Duration,
    /// Probability that a datagram is lost (0 ≤ loss < 1).
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Stream throughput between two nodes, in bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// How long a stream to an unreachable node takes to fail.
    pub connect_timeout: Duration,
}

impl NetConfig {
    /// A network that matches a timing preset.
    ///
    /// * `lan`: 250 µs one way + up to 250 µs jitter (a datacenter round trip of 0.5–1 ms),
    ///   1 Gbit/s streams, 1 s connect timeout.
    /// * `wan`: 40 ms + up to 60 ms jitter, 100 Mbit/s streams, 3 s connect timeout.
    /// * `local`: 30 µs + up to 40 µs jitter (loopback), 8 Gbit/s streams, 100 ms connect timeout.
    ///
    /// No loss and no duplication; set `loss` and `duplicate` as needed.
    pub fn preset(preset: Preset) -> NetConfig {
        match preset {
            Preset::Lan => NetConfig {
                latency: Duration::from_micros(250),
                jitter: Duration::from_micros(250),
                loss: 0.0,
                duplicate: 0.0,
                bandwidth_bytes_per_s: 125_000_000,
                connect_timeout: Duration::from_secs(1),
            },
            Preset::Wan => NetConfig {
                latency: Duration::from_millis(40),
                jitter: Duration::from_millis(60),
                loss: 0.0,
                duplicate: 0.0,
                bandwidth_bytes_per_s: 12_500_000,
                connect_timeout: Duration::from_secs(3),
            },
            Preset::Local => NetConfig {
                latency: Duration::from_micros(30),
                jitter: Duration::from_micros(40),
                loss: 0.0,
                duplicate: 0.0,
                bandwidth_bytes_per_s: 1_000_000_000,
                connect_timeout: Duration::from_millis(100),
            },
        }
    }

    /// Time to push `bytes` through a stream.
    pub fn transfer_time(&self, bytes: usize) -> Duration {
        if self.bandwidth_bytes_per_s == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(
            (bytes as u128 * 1_000_000_000 / self.bandwidth_bytes_per_s as u128) as u64,
        )
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::preset(Preset::Lan)
    }
}
