//! The receive path of a flock datagram or frame, in the order the crate doc gives: the one the
//! flock core runs on everything sealed under a transient key.

use std::time::Duration;

use crux_proto::flock::{Header, Kind, NodeId};

use super::envelope::{check, open_for};
use super::replay::ReplayTable;
use super::transient::TransientKeys;
use crate::DropReason;

/// Size, header and bloc checks ([`check`]), then, for a flock datagram sent by another node and
/// sealed for `me`: the transient key its epoch names ([`TransientKeys::key_for`]), a replay
/// pre-check, one [`open_for`], and the replay window. The body is left in `out`.
///
/// `max_bytes` is the MTU for datagrams, [`MAX_SEALED_FRAME_BYTES`](super::MAX_SEALED_FRAME_BYTES)
/// for stream frames. Nothing changes unless the datagram authenticated; the error is the
/// counter to raise. A handshake datagram is [`DropReason::Malformed`] here: the core opens
/// those before (`core/handshake.rs`).
pub fn receive(
    bytes: &[u8],
    max_bytes: usize,
    me: NodeId,
    transient: &TransientKeys,
    replay: &mut ReplayTable,
    now: Duration,
    out: &mut Vec<u8>,
) -> Result<Header, DropReason> {
    let header = check(bytes, max_bytes, transient.bloc().tag()).map_err(DropReason::from)?;
    if header.sender == me {
        return Err(DropReason::FromSelf);
    }
    if header.kind != Kind::Flock {
        return Err(DropReason::Malformed);
    }
    let key = transient
        .key_for(header.key_id, now)
        .map_err(DropReason::from)?;
    if !replay.check(header.sender, header.boot, header.counter) {
        return Err(DropReason::Replay);
    }
    open_for(key, bytes, me, out).map_err(DropReason::from)?;
    if !replay.accept(header.sender, header.boot, header.counter) {
        return Err(DropReason::Replay);
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{seal_for, Bloc, ROTATION_MAX};
    use crux_proto::flock::BootId;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const ME: NodeId = NodeId(2);

    #[test]
    fn accepts_once_and_counts_the_rest() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let bloc = Bloc::new("b");
        let mut keys = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        let epoch = keys.make_key(Duration::ZERO, NodeId(9), &mut rng).unwrap();
        keys.set_own(epoch);
        let (epoch, packet) = keys.sealing_key(None, Duration::ZERO).unwrap();
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: epoch,
            sender: NodeId(9),
            boot: BootId(1),
            counter: 3,
        };
        let mut d = Vec::new();
        seal_for(packet, &header, ME, b"body", &mut rng, &mut d);
        let mut replay = ReplayTable::new(8);
        let mut out = Vec::new();
        let now = Duration::from_secs(1);
        let r = receive(&d, 1400, ME, &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap(), header);
        assert_eq!(out, b"body");
        let r = receive(&d, 1400, ME, &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::Replay);
        // Sealed for another node: it does not open here.
        let mut fresh = ReplayTable::new(8);
        let r = receive(&d, 1400, NodeId(3), &keys, &mut fresh, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::AuthFailed);
        let r = receive(&d, 1400, NodeId(9), &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::FromSelf);
        let late = Duration::from_secs(91);
        let r = receive(&d, 1400, ME, &keys, &mut replay, late, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::StaleKey);
        // A forged copy with another counter fails authentication and moves no window.
        let mut forged = d.clone();
        forged[28] ^= 1;
        let r = receive(&forged, 1400, ME, &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::AuthFailed);
        assert!(replay.check(NodeId(9), BootId(1), 2));
        let mut hs = d.clone();
        hs[3] = Kind::Handshake as u8;
        let r = receive(&hs, 1400, ME, &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::Malformed);
        let r = receive(&d, d.len() - 1, ME, &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err(), DropReason::Oversized);
    }
}
