//! Counters of the DNS server, read by whoever exports metrics (the agent's `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use hickory_server::proto::op::ResponseCode;

/// The response codes counted, as their metric label.
pub const RCODES: [&str; 6] = [
    "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused",
];

/// Why a packet got no answer, as its metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// It did not parse as a DNS message (short, bad names, compression loops, trailing junk).
    Malformed,
    /// Its source was over its rate.
    RateLimited,
    /// Larger than any query this server answers over UDP.
    Oversized,
    /// Not a query (the QR bit says response).
    NotQuery,
    /// The answer could not be encoded or sent.
    SendFailed,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 5] = [
        DropReason::Malformed,
        DropReason::RateLimited,
        DropReason::Oversized,
        DropReason::NotQuery,
        DropReason::SendFailed,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::RateLimited => "rate_limited",
            DropReason::Oversized => "oversized",
            DropReason::NotQuery => "not_query",
            DropReason::SendFailed => "send_failed",
        }
    }
}

/// How a forwarded query ended, as its metric label: relayed, no upstream answered (SERVFAIL
/// sent), or too many forwards in flight (dropped).
pub const FORWARD_RESULTS: [&str; 3] = ["ok", "failed", "busy"];

/// Queries answered by response code, packets dropped by reason, forwards by result.
#[derive(Debug, Default)]
pub struct Stats {
    answered: [AtomicU64; RCODES.len()],
    dropped: [AtomicU64; DropReason::ALL.len()],
    forwarded: [AtomicU64; FORWARD_RESULTS.len()],
}

impl Stats {
    /// Counts one answer with `rcode`.
    pub fn answered(&self, rcode: ResponseCode) {
        let i = match rcode {
            ResponseCode::NoError => 0,
            ResponseCode::FormErr => 1,
            ResponseCode::NXDomain => 3,
            ResponseCode::NotImp => 4,
            ResponseCode::Refused => 5,
            _ => 2,
        };
        self.answered[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one packet dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(rcode label, count)` for each response code.
    pub fn queries(&self) -> Vec<(&'static str, u64)> {
        RCODES
            .iter()
            .zip(&self.answered)
            .map(|(l, n)| (*l, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts one forwarded query by its result (one of [`FORWARD_RESULTS`]).
    pub fn forwarded(&self, result: &str) {
        if let Some(i) = FORWARD_RESULTS.iter().position(|r| *r == result) {
            self.forwarded[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(result label, count)` for each forward result.
    pub fn forwards(&self) -> Vec<(&'static str, u64)> {
        FORWARD_RESULTS
            .iter()
            .zip(&self.forwarded)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// `(reason label, count)` for each drop reason.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .zip(&self.dropped)
            .map(|(r, n)| (r.label(), n.load(Ordering::Relaxed)))
            .collect()
    }
}
