//! The receive path of a datagram or frame, in the order the crate doc gives.

use std::time::Duration;

use crux_proto::flock::{Header, Kind};

use super::envelope::{check, open, OpenError};
use super::replay::ReplayTable;
use super::transient::TransientKeys;

/// What [`receive`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// An authenticated, fresh flock datagram: its body is in `out` (decode it with
    /// [`crux_proto::flock::decode_message`] or `decode_frame`). The replay window has recorded it.
    Flock(Header),
    /// A handshake datagram, checked for size and bloc only: rate-limit its source, then hand the
    /// bytes to [`respond`](super::respond) (a request) or
    /// [`HandshakeInitiator::finish`](super::HandshakeInitiator::finish) (a reply), and record
    /// the authenticated header with [`ReplayTable::accept`] before acting on it.
    Handshake(Header),
}

/// Size, header and bloc checks ([`check`]); for a flock datagram, the transient key its epoch
/// names ([`TransientKeys::key_for`]), a replay pre-check, one [`open`], and the replay window.
///
/// `max_bytes` is the MTU for datagrams, [`MAX_SEALED_FRAME_BYTES`](super::MAX_SEALED_FRAME_BYTES)
/// for stream frames. Nothing changes unless the datagram authenticated; the error's
/// [`drop_reason`](OpenError::drop_reason) is the counter to raise.
pub fn receive(
    bytes: &[u8],
    max_bytes: usize,
    bloc_tag: u32,
    transient: &TransientKeys,
    replay: &mut ReplayTable,
    now: Duration,
    out: &mut Vec<u8>,
) -> Result<Received, OpenError> {
    out.clear();
    let header = check(bytes, max_bytes, bloc_tag)?;
    if header.kind == Kind::Handshake {
        return Ok(Received::Handshake(header));
    }
    let key = transient.key_for(header.key_id, now)?;
    if !replay.check(header.sender, header.boot, header.counter) {
        return Err(OpenError::Replay);
    }
    open(key, bytes, out)?;
    if !replay.accept(header.sender, header.boot, header.counter) {
        out.clear();
        return Err(OpenError::Replay);
    }
    Ok(Received::Flock(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{seal, Bloc, SecretKey, ROTATION_MAX};
    use crate::DropReason;
    use crux_proto::flock::{BootId, NodeId};
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn accepts_once_and_counts_the_rest() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let bloc = Bloc::new("b");
        let mut keys = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        keys.install(5, SecretKey::generate(&mut rng), Duration::ZERO);
        let (epoch, packet) = keys.sealing_key(Duration::ZERO).unwrap();
        let header = Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: epoch,
            sender: NodeId(9),
            boot: BootId(1),
            counter: 3,
        };
        let mut d = Vec::new();
        seal(packet, &header, b"body", &mut rng, &mut d);
        let mut replay = ReplayTable::new(8);
        let mut out = Vec::new();
        let now = Duration::from_secs(1);
        let r = receive(&d, 1400, bloc.tag(), &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap(), Received::Flock(header));
        assert_eq!(out, b"body");
        let r = receive(&d, 1400, bloc.tag(), &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err().drop_reason(), DropReason::Replay);
        assert!(out.is_empty());
        let late = Duration::from_secs(91);
        let r = receive(&d, 1400, bloc.tag(), &keys, &mut replay, late, &mut out);
        assert_eq!(r.unwrap_err().drop_reason(), DropReason::StaleKey);
        // A forged copy with another counter fails authentication and moves no window.
        let mut forged = d.clone();
        forged[28] ^= 1;
        let r = receive(&forged, 1400, bloc.tag(), &keys, &mut replay, now, &mut out);
        assert_eq!(r.unwrap_err().drop_reason(), DropReason::AuthFailed);
        assert!(replay.check(NodeId(9), BootId(1), 2));
        let mut hs = d.clone();
        hs[3] = Kind::Handshake as u8;
        let r = receive(&hs, 1400, bloc.tag(), &keys, &mut replay, now, &mut out);
        assert!(matches!(r.unwrap(), Received::Handshake(h) if h.kind == Kind::Handshake));
    }
}
