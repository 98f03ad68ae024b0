//! SHA-256 throughput of the `sha2` crate as pastiche uses it: one hash per 4 MiB piece
//! (`crux_pastiche::sha256`, what a puller checks every piece with), and one streaming hash over
//! the whole blob (the digest, fed piece by piece).

use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest as _, Sha256};

use crate::now;

/// What one run measured.
#[derive(Debug)]
pub struct ShaReport {
    /// Bytes hashed by each of the two measurements.
    pub bytes: u64,
    /// Hashing every piece on its own (`crux_pastiche::sha256`).
    pub pieces: Duration,
    /// One `Sha256` fed every piece (the whole digest).
    pub whole: Duration,
    /// `/proc/cpuinfo` lists `sha_ni`.
    pub cpuinfo_sha_ni: bool,
    /// The running CPU has the SHA extensions (`is_x86_feature_detected!("sha")`), which `sha2`
    /// 0.10 detects at run time and uses.
    pub detected_sha: bool,
}

fn cpuinfo_sha_ni() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "sha_ni"))
        })
        .unwrap_or(false)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
fn detected_sha() -> bool {
    std::arch::is_x86_feature_detected!("sha")
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
fn detected_sha() -> bool {
    false
}

/// Hashes `total` bytes in pieces of `piece` bytes, twice (per piece, then as one stream), out of
/// a 64 MiB buffer of random bytes (larger than any cache, so the bytes come from memory as a
/// pulled piece's would).
pub fn run(total: u64, piece: usize) -> ShaReport {
    let buf_len = (64usize << 20).max(piece);
    let mut buf = vec![0u8; buf_len];
    rand_chacha::ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut buf);
    let per_buf = buf_len / piece;
    let count = total.div_ceil(piece as u64);
    let piece_at = |k: u64| {
        let at = (k as usize % per_buf) * piece;
        &buf[at..at + piece]
    };

    let mut sink = 0u8;
    let start = now();
    for k in 0..count {
        sink ^= crux_pastiche::sha256(piece_at(k))[0];
    }
    let pieces = now().duration_since(start);

    let start = now();
    let mut h = Sha256::new();
    for k in 0..count {
        h.update(piece_at(k));
    }
    sink ^= h.finalize()[0];
    let whole = now().duration_since(start);
    std::hint::black_box(sink);

    ShaReport {
        bytes: count * piece as u64,
        pieces,
        whole,
        cpuinfo_sha_ni: cpuinfo_sha_ni(),
        detected_sha: detected_sha(),
    }
}
