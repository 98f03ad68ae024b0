//! The datagram envelope: `header(36) || nonce(24) || ciphertext || tag(16)`.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};
use crux_proto::flock::{DecodeError, Header, NodeId, HEADER_BYTES, MAX_STREAM_BYTES};
use rand::{CryptoRng, RngCore};

use super::keys::PacketKey;
use crate::DropReason;

/// Bytes of the random XChaCha20 nonce that follows the header.
pub const NONCE_BYTES: usize = 24;
/// Bytes of the Poly1305 tag at the end.
pub const TAG_BYTES: usize = 16;
/// What sealing adds to a plaintext besides the header: nonce and tag.
pub const OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
/// Smallest sealed datagram: a header, a nonce, an empty plaintext and a tag.
pub const MIN_SEALED_BYTES: usize = HEADER_BYTES + OVERHEAD;
/// Largest sealed stream frame (the plaintext is at most [`MAX_STREAM_BYTES`]).
pub const MAX_SEALED_FRAME_BYTES: usize = MAX_STREAM_BYTES + HEADER_BYTES + OVERHEAD;

/// Length of the sealed form of a `plaintext_len`-byte body.
pub const fn sealed_len(plaintext_len: usize) -> usize {
    HEADER_BYTES + OVERHEAD + plaintext_len
}

/// Largest body that fits a sealed datagram of `mtu` bytes (0 when even an empty one does not).
pub const fn max_plaintext(mtu: usize) -> usize {
    mtu.saturating_sub(HEADER_BYTES + OVERHEAD)
}

/// Why a datagram or frame was not opened. Always comes from the network (or from a key the
/// node does not hold); opening changes no state. [`OpenError::drop_reason`] names the counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Larger than the limit for its kind (checked before anything else).
    #[error("{len} bytes is over the {limit}-byte limit")]
    Oversized {
        /// Length seen.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Shorter than a header plus nonce and tag.
    #[error("{0} bytes is shorter than the smallest sealed datagram")]
    Truncated(usize),
    /// Not a Crux datagram, or a wire version this build does not speak.
    #[error("not a crux datagram of a known version")]
    BadMagic,
    /// Header of an unknown datagram kind.
    #[error("unknown datagram kind {0}")]
    BadKind(u8),
    /// Another bloc's datagram.
    #[error("bloc tag {0:08x} is not ours")]
    WrongBloc(u32),
    /// The header's key id names no key this node holds.
    #[error("no key with id {0:08x}")]
    UnknownKey(u32),
    /// The header's key id names a transient epoch older than this node accepts.
    #[error("epoch {0} is too old")]
    StaleKey(u32),
    /// The one decryption attempt failed: forged, corrupted, or sealed under another key.
    #[error("authentication failed")]
    AuthFailed,
    /// Seen before (replay window).
    #[error("replayed or too old counter")]
    Replay,
    /// Authenticated, but the plaintext is not what the header's kind says it is.
    #[error("malformed body")]
    Malformed,
}

impl OpenError {
    /// The drop counter this failure goes to.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            OpenError::Oversized { .. } => DropReason::Oversized,
            OpenError::Truncated(_) => DropReason::Truncated,
            OpenError::BadMagic => DropReason::BadMagic,
            OpenError::BadKind(_) => DropReason::Malformed,
            OpenError::WrongBloc(_) => DropReason::WrongBloc,
            OpenError::UnknownKey(_) => DropReason::UnknownKey,
            OpenError::StaleKey(_) => DropReason::StaleKey,
            OpenError::AuthFailed => DropReason::AuthFailed,
            OpenError::Replay => DropReason::Replay,
            OpenError::Malformed => DropReason::Malformed,
        }
    }
}

impl From<OpenError> for DropReason {
    fn from(e: OpenError) -> DropReason {
        e.drop_reason()
    }
}

/// The drop counter for a body that authenticated but failed to decode
/// ([`crux_proto::flock::decode_message`], [`crux_proto::flock::decode_frame`],
/// [`Header::parse`]).
pub fn decode_drop_reason(e: &DecodeError) -> DropReason {
    match e {
        DecodeError::Truncated => DropReason::Truncated,
        DecodeError::BadMagic | DecodeError::BadVersion(_) => DropReason::BadMagic,
        DecodeError::TooLarge { .. } => DropReason::Oversized,
        DecodeError::BadKind(_) | DecodeError::Malformed(_) | DecodeError::Trailing(_) => {
            DropReason::Malformed
        }
    }
}

/// Bytes the recipient adds to the associated data: its node id.
pub const RECIPIENT_BYTES: usize = 8;

/// Seals `plaintext` under `key`: appends `header || nonce || ciphertext || tag` to `out`.
///
/// The nonce is 24 random bytes from `rng` (XChaCha20's 192-bit nonces make random nonces safe
/// for the many senders that share one group key). All [`HEADER_BYTES`] header bytes are the
/// associated data, so none of them can be changed without failing authentication. The caller
/// keeps the result within its limit: [`sealed_len`]`(plaintext.len())` bytes are appended.
pub fn seal<R: RngCore + CryptoRng>(
    key: &PacketKey,
    header: &Header,
    plaintext: &[u8],
    rng: &mut R,
    out: &mut Vec<u8>,
) {
    seal_with_ad(key, header, &[], plaintext, rng, out)
}

/// [`seal`] for one recipient: the associated data is the header followed by the recipient's
/// node id, which is not sent. Only [`open_for`] at that node opens it.
///
/// Many nodes share one transient key, and one sender's counter runs over all its peers: without
/// the recipient in the associated data, a datagram recorded on its way to one member would open
/// at any other, whose replay window never saw its counter, and could be answered there.
pub fn seal_for<R: RngCore + CryptoRng>(
    key: &PacketKey,
    header: &Header,
    recipient: NodeId,
    plaintext: &[u8],
    rng: &mut R,
    out: &mut Vec<u8>,
) {
    seal_with_ad(key, header, &recipient.0.to_le_bytes(), plaintext, rng, out)
}

fn seal_with_ad<R: RngCore + CryptoRng>(
    key: &PacketKey,
    header: &Header,
    extra_ad: &[u8],
    plaintext: &[u8],
    rng: &mut R,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.reserve(sealed_len(plaintext.len()));
    header.write(out);
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let (head, body) = out[start..].split_at_mut(HEADER_BYTES + NONCE_BYTES);
    let mut ad = [0u8; HEADER_BYTES + RECIPIENT_BYTES];
    let ad_len = HEADER_BYTES + extra_ad.len();
    ad[..HEADER_BYTES].copy_from_slice(&head[..HEADER_BYTES]);
    ad[HEADER_BYTES..ad_len].copy_from_slice(extra_ad);
    let tag = key
        .cipher
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &ad[..ad_len], body)
        .expect("a datagram is far below XChaCha20-Poly1305's length limit");
    out.extend_from_slice(&tag);
}

/// The checks every incoming datagram or frame goes through before any cryptographic work, in
/// order: size (`len > max_bytes` → [`OpenError::Oversized`]), header
/// ([`OpenError::Truncated`], [`OpenError::BadMagic`], [`OpenError::BadKind`]), room for a
/// nonce and a tag, and the bloc tag ([`OpenError::WrongBloc`]).
///
/// `max_bytes` is the configured MTU for datagrams, [`MAX_SEALED_FRAME_BYTES`] for stream frames.
pub fn check(bytes: &[u8], max_bytes: usize, bloc_tag: u32) -> Result<Header, OpenError> {
    if bytes.len() > max_bytes {
        return Err(OpenError::Oversized {
            len: bytes.len(),
            limit: max_bytes,
        });
    }
    let (header, _) = Header::parse(bytes).map_err(|e| match e {
        DecodeError::BadMagic | DecodeError::BadVersion(_) => OpenError::BadMagic,
        DecodeError::BadKind(k) => OpenError::BadKind(k),
        _ => OpenError::Truncated(bytes.len()),
    })?;
    if bytes.len() < MIN_SEALED_BYTES {
        return Err(OpenError::Truncated(bytes.len()));
    }
    if header.bloc_tag != bloc_tag {
        return Err(OpenError::WrongBloc(header.bloc_tag));
    }
    Ok(header)
}

/// Opens a sealed datagram or frame with `key`: exactly one decryption attempt. On success the
/// plaintext replaces the contents of `out` and the (authenticated) header is returned; on failure
/// `out` is left empty. Does the size-independent parts of [`check`] too, but not the size or bloc
/// checks: call [`check`] first (or use [`open_datagram`]).
pub fn open(key: &PacketKey, bytes: &[u8], out: &mut Vec<u8>) -> Result<Header, OpenError> {
    open_with_ad(key, bytes, &[], out)
}

/// [`open`] of a datagram or frame sealed by [`seal_for`] for `recipient` (this node): one
/// decryption attempt, which fails ([`OpenError::AuthFailed`]) for a datagram sealed for any
/// other node.
pub fn open_for(
    key: &PacketKey,
    bytes: &[u8],
    recipient: NodeId,
    out: &mut Vec<u8>,
) -> Result<Header, OpenError> {
    open_with_ad(key, bytes, &recipient.0.to_le_bytes(), out)
}

fn open_with_ad(
    key: &PacketKey,
    bytes: &[u8],
    extra_ad: &[u8],
    out: &mut Vec<u8>,
) -> Result<Header, OpenError> {
    out.clear();
    if bytes.len() < MIN_SEALED_BYTES {
        return Err(OpenError::Truncated(bytes.len()));
    }
    let (header, _) = Header::parse(bytes).map_err(|e| match e {
        DecodeError::BadKind(k) => OpenError::BadKind(k),
        _ => OpenError::BadMagic,
    })?;
    let mut ad_buf = [0u8; HEADER_BYTES + RECIPIENT_BYTES];
    let ad_len = HEADER_BYTES + extra_ad.len();
    ad_buf[..HEADER_BYTES].copy_from_slice(&bytes[..HEADER_BYTES]);
    ad_buf[HEADER_BYTES..ad_len].copy_from_slice(extra_ad);
    let ad = &ad_buf[..ad_len];
    let nonce = XNonce::from_slice(&bytes[HEADER_BYTES..HEADER_BYTES + NONCE_BYTES]);
    let tag_at = bytes.len() - TAG_BYTES;
    let tag = Tag::from_slice(&bytes[tag_at..]);
    out.extend_from_slice(&bytes[HEADER_BYTES + NONCE_BYTES..tag_at]);
    if key
        .cipher
        .decrypt_in_place_detached(nonce, ad, out, tag)
        .is_err()
    {
        out.clear();
        return Err(OpenError::AuthFailed);
    }
    Ok(header)
}

/// [`check`], then the key `select` picks for the authenticated-to-be header (it returns
/// [`OpenError::UnknownKey`] or [`OpenError::StaleKey`] when there is none), then one [`open`].
///
/// The replay check comes after this, on the returned header (see
/// [`ReplayTable`](super::ReplayTable)): a window only moves for datagrams that authenticated.
pub fn open_datagram<'k>(
    bytes: &[u8],
    max_bytes: usize,
    bloc_tag: u32,
    select: impl FnOnce(&Header) -> Result<&'k PacketKey, OpenError>,
    out: &mut Vec<u8>,
) -> Result<Header, OpenError> {
    out.clear();
    let header = check(bytes, max_bytes, bloc_tag)?;
    let key = select(&header)?;
    open(key, bytes, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::{Bloc, SecretKey};
    use crux_proto::flock::{BootId, Kind, NodeId};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn header(bloc: &Bloc) -> Header {
        Header {
            kind: Kind::Flock,
            bloc_tag: bloc.tag(),
            key_id: 7,
            sender: NodeId(0x1122),
            boot: BootId(0x3344),
            counter: 5,
        }
    }

    fn key(b: u8, bloc: &Bloc) -> PacketKey {
        PacketKey::transient(&SecretKey::from_bytes([b; 32]), bloc)
    }

    #[test]
    fn a_datagram_sealed_for_one_node_opens_only_there() {
        let bloc = Bloc::new("b");
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let k = key(1, &bloc);
        let mut d = Vec::new();
        seal_for(&k, &header(&bloc), NodeId(7), b"hello", &mut rng, &mut d);
        assert_eq!(d.len(), sealed_len(5), "the recipient is not sent");
        let mut plain = Vec::new();
        assert_eq!(
            open_for(&k, &d, NodeId(7), &mut plain).unwrap(),
            header(&bloc)
        );
        assert_eq!(plain, b"hello");
        assert_eq!(
            open_for(&k, &d, NodeId(8), &mut plain),
            Err(OpenError::AuthFailed)
        );
        assert!(plain.is_empty());
        assert_eq!(open(&k, &d, &mut plain), Err(OpenError::AuthFailed));
        let mut unbound = Vec::new();
        seal(&k, &header(&bloc), b"hello", &mut rng, &mut unbound);
        assert_eq!(
            open_for(&k, &unbound, NodeId(7), &mut plain),
            Err(OpenError::AuthFailed)
        );
    }

    #[test]
    fn sealed_layout_is_header_nonce_ciphertext_tag() {
        let bloc = Bloc::new("b");
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut out = b"prefix".to_vec();
        seal(&key(1, &bloc), &header(&bloc), b"hello", &mut rng, &mut out);
        assert_eq!(out.len(), 6 + sealed_len(5));
        assert_eq!(sealed_len(5), 36 + 24 + 5 + 16);
        let mut h = Vec::new();
        header(&bloc).write(&mut h);
        assert_eq!(&out[6..42], &h[..]);
        let mut nonce = [0u8; 24];
        rand::RngCore::fill_bytes(&mut ChaCha20Rng::seed_from_u64(1), &mut nonce);
        assert_eq!(&out[42..66], &nonce);
        assert_ne!(&out[66..71], b"hello");
        let mut plain = Vec::new();
        assert_eq!(
            open(&key(1, &bloc), &out[6..], &mut plain).unwrap(),
            header(&bloc)
        );
        assert_eq!(plain, b"hello");
    }

    #[test]
    fn constants() {
        assert_eq!(OVERHEAD, 40);
        assert_eq!(MIN_SEALED_BYTES, 76);
        assert_eq!(max_plaintext(1400), 1324);
        assert_eq!(max_plaintext(10), 0);
    }

    #[test]
    fn every_failure_has_its_reason() {
        let bloc = Bloc::new("b");
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut d = Vec::new();
        seal(&key(1, &bloc), &header(&bloc), &[0; 100], &mut rng, &mut d);
        let tag = bloc.tag();
        assert_eq!(
            check(&d, 100, tag).unwrap_err(),
            OpenError::Oversized {
                len: d.len(),
                limit: 100
            }
        );
        assert_eq!(
            check(&d[..35], 1400, tag).unwrap_err(),
            OpenError::Truncated(35)
        );
        assert_eq!(
            check(&d[..75], 1400, tag).unwrap_err(),
            OpenError::Truncated(75)
        );
        let mut bad = d.clone();
        bad[0] = b'X';
        assert_eq!(check(&bad, 1400, tag).unwrap_err(), OpenError::BadMagic);
        bad = d.clone();
        bad[2] = 9;
        assert_eq!(check(&bad, 1400, tag).unwrap_err(), OpenError::BadMagic);
        bad = d.clone();
        bad[3] = 9;
        assert_eq!(check(&bad, 1400, tag).unwrap_err(), OpenError::BadKind(9));
        assert_eq!(
            check(&d, 1400, tag ^ 1).unwrap_err(),
            OpenError::WrongBloc(tag)
        );
        let mut out = vec![1];
        assert_eq!(
            open(&key(2, &bloc), &d, &mut out).unwrap_err(),
            OpenError::AuthFailed
        );
        assert!(out.is_empty());
        let reasons: Vec<_> = [
            OpenError::Oversized { len: 1, limit: 0 },
            OpenError::Truncated(0),
            OpenError::BadMagic,
            OpenError::BadKind(3),
            OpenError::WrongBloc(0),
            OpenError::UnknownKey(0),
            OpenError::StaleKey(0),
            OpenError::AuthFailed,
            OpenError::Replay,
            OpenError::Malformed,
        ]
        .iter()
        .map(|e| e.drop_reason())
        .collect();
        use DropReason::*;
        assert_eq!(
            reasons,
            [
                Oversized, Truncated, BadMagic, Malformed, WrongBloc, UnknownKey, StaleKey,
                AuthFailed, Replay, Malformed
            ]
        );
    }

    #[test]
    fn open_datagram_selects_one_key() {
        let bloc = Bloc::new("b");
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut d = Vec::new();
        let k = key(1, &bloc);
        seal(&k, &header(&bloc), b"x", &mut rng, &mut d);
        let mut out = Vec::new();
        let mut calls = 0;
        let h = open_datagram(
            &d,
            1400,
            bloc.tag(),
            |h| {
                calls += 1;
                assert_eq!(h.key_id, 7);
                Ok(&k)
            },
            &mut out,
        )
        .unwrap();
        assert_eq!((h.counter, out.as_slice(), calls), (5, &b"x"[..], 1));
        let err = open_datagram(
            &d,
            1400,
            bloc.tag(),
            |h| Err(OpenError::UnknownKey(h.key_id)),
            &mut out,
        );
        assert_eq!(err.unwrap_err(), OpenError::UnknownKey(7));
    }

    #[test]
    fn two_blocs_sharing_a_key_cannot_read_each_other() {
        let (a, b) = (Bloc::new("a"), Bloc::new("b"));
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut d = Vec::new();
        // Even with the other bloc's tag forged into the header, the derived key differs.
        let mut h = header(&a);
        h.bloc_tag = b.tag();
        seal(&key(1, &a), &h, b"secret", &mut rng, &mut d);
        let mut out = Vec::new();
        assert_eq!(check(&d, 1400, b.tag()).unwrap(), h);
        assert_eq!(
            open(&key(1, &b), &d, &mut out).unwrap_err(),
            OpenError::AuthFailed
        );
    }

    #[test]
    fn decode_errors_map_to_reasons() {
        assert_eq!(
            decode_drop_reason(&DecodeError::Trailing(1)),
            DropReason::Malformed
        );
        assert_eq!(
            decode_drop_reason(&DecodeError::BadVersion(2)),
            DropReason::BadMagic
        );
        assert_eq!(
            decode_drop_reason(&DecodeError::TooLarge { len: 2, limit: 1 }),
            DropReason::Oversized
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn seal_open_roundtrips(plain in proptest::collection::vec(any::<u8>(), 0..1400), seed in any::<u64>(),
                                counter in any::<u64>(), key_id in any::<u32>()) {
            let bloc = Bloc::new("p");
            let mut h = header(&bloc);
            h.counter = counter;
            h.key_id = key_id;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut d = Vec::new();
            seal(&key(3, &bloc), &h, &plain, &mut rng, &mut d);
            prop_assert_eq!(d.len(), sealed_len(plain.len()));
            let mut out = Vec::new();
            prop_assert_eq!(check(&d, MAX_SEALED_FRAME_BYTES, bloc.tag()).unwrap(), h);
            prop_assert_eq!(open(&key(3, &bloc), &d, &mut out).unwrap(), h);
            prop_assert_eq!(out, plain);
        }
    }
}
