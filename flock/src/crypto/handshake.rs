//! The join handshake: how a node holding a secondary key obtains the current transient key.
//!
//! ```text
//! initiator                                               responder (holds the transient key)
//!   e_i ← random x25519 secret
//!   JoinRequest ─ seal(handshake key, [1, purpose, E_i, context, zero padding]) ─▶
//!                                                       open with the key the key id names
//!                                                       e_r ← random; s = X25519(e_r, E_i)
//!                                                       k = HKDF(bloc, secondary ‖ s ‖ T, "join-reply")
//!   ◀─ JoinReply ─ seal(handshake key, [2, E_r, AEAD(k, current ‖ previous key ‖ context, ad = T)])
//!   s = X25519(e_i, E_r); same k; open
//! ```
//!
//! `T` is the transcript hash: SHA-256 of the request datagram, the reply's header and `E_r`, so
//! a reply only opens for the request it answers. Both datagrams are [`Kind::Handshake`] and
//! sealed under the handshake key derived from the secondary key (the header's `key_id` names
//! which secondary key); outsiders see nothing but sizes. The transient key itself is sealed under
//! `k`, which needs one of the ephemeral secrets: someone who records the exchange and later
//! learns the secondary key opens both outer layers, sees `E_i` and `E_r`, and still cannot
//! compute `s`. The ephemeral secrets live only in memory and are wiped on drop.
//!
//! The request is padded to [`REQUEST_BYTES`], so that the reply ([`REPLY_BYTES`]) is never
//! larger than the request that caused it: a forged source address gains no amplification.
//!
//! Each side may attach up to [`MAX_CONTEXT_BYTES`] of its own (the core's leader claim, say):
//! when two flocks that formed apart meet, their members hold different transient keys, and the
//! contexts let both sides of a key request see whose flock wins and which side adopts the
//! other's keys.

use rand::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};
use crux_proto::flock::{BootId, Header, Kind, NodeId, HEADER_BYTES};

use super::envelope::{check, open, seal, sealed_len, OpenError, TAG_BYTES};
use super::keyring::Keyring;
use super::keys::{key_id, label, Bloc, PacketKey, SecretKey};
use super::transient::{JoinKeys, KeyAnnouncement, TransientKeys, ANNOUNCEMENT_BYTES};
use crate::DropReason;

const TYPE_REQUEST: u8 = 1;
const TYPE_REPLY: u8 = 2;
const PUBLIC_BYTES: usize = 32;

/// Most bytes of context each side may attach (the core's own business: its leader claim, say,
/// so that two flocks that formed apart can decide whose keys win). Authenticated under the
/// handshake key; the reply's context is also sealed under the ephemeral key.
pub const MAX_CONTEXT_BYTES: usize = 64;
/// Plaintext bytes of a join request: type, purpose, the ephemeral public key, the context's
/// length and its bytes, zero padding (so that the request is larger than any reply).
pub const REQUEST_BODY_BYTES: usize = 192;
const REQUEST_CONTEXT_AT: usize = 2 + PUBLIC_BYTES;
/// Bytes of the sealed keys inside a reply: a flag (previous key present), the current and
/// the previous epoch and key ([`JoinKeys`]; zeros when there is no previous key).
const KEYS_BYTES: usize = 1 + 2 * ANNOUNCEMENT_BYTES;
/// Bytes sealed under the ephemeral key in a reply: the keys, the context's length and bytes.
const INNER_BYTES: usize = KEYS_BYTES + 1 + MAX_CONTEXT_BYTES;
/// Plaintext bytes of a join reply: type, the ephemeral public key, the sealed keys and context.
pub const REPLY_BODY_BYTES: usize = 1 + PUBLIC_BYTES + INNER_BYTES + TAG_BYTES;
/// Bytes of a join request datagram.
pub const REQUEST_BYTES: usize = sealed_len(REQUEST_BODY_BYTES);
/// Bytes of a join reply datagram (never more than [`REQUEST_BYTES`]).
pub const REPLY_BYTES: usize = sealed_len(REPLY_BODY_BYTES);

const _: () = assert!(REPLY_BYTES <= REQUEST_BYTES);
const _: () = assert!(REQUEST_CONTEXT_AT + 1 + MAX_CONTEXT_BYTES <= REQUEST_BODY_BYTES);

/// Writes `len || context || zeros` into `out` (`1 + MAX_CONTEXT_BYTES` bytes).
fn put_context(context: &[u8], out: &mut [u8]) {
    assert!(
        context.len() <= MAX_CONTEXT_BYTES,
        "handshake context is {} bytes, over {MAX_CONTEXT_BYTES}",
        context.len()
    );
    out[0] = context.len() as u8;
    out[1..1 + context.len()].copy_from_slice(context);
}

/// Reads what [`put_context`] wrote; everything after the context (to the end of `bytes`) must
/// be zero.
fn get_context(bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
    let len = bytes[0] as usize;
    if len > MAX_CONTEXT_BYTES || bytes[1 + len..].iter().any(|b| *b != 0) {
        return Err(OpenError::Malformed);
    }
    Ok(bytes[1..1 + len].to_vec())
}

/// Why the node asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A node that is not in the flock yet.
    Join = 0,
    /// A member that missed rotations (paused, partitioned, restarted) asks for the key again.
    KeyRequest = 1,
}

/// The sender fields of a handshake datagram's header (the rest is filled in: kind, bloc tag,
/// key id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// This node's id.
    pub sender: NodeId,
    /// This node's boot id.
    pub boot: BootId,
    /// This node's next datagram counter (the same counter as its flock datagrams).
    pub counter: u64,
}

/// Why a handshake datagram was not accepted. Comes from the network, except
/// [`HandshakeError::NoTransientKey`] (this node cannot answer); changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The datagram failed a check of the envelope, or its body is not a handshake message.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// This node holds no fresh transient key to hand out.
    #[error("no fresh transient key to hand out")]
    NoTransientKey,
}

impl HandshakeError {
    /// The drop counter for this failure.
    pub fn drop_reason(&self) -> DropReason {
        match self {
            HandshakeError::Open(e) => e.drop_reason(),
            HandshakeError::NoTransientKey => DropReason::Unexpected,
        }
    }
}

impl From<HandshakeError> for DropReason {
    fn from(e: HandshakeError) -> DropReason {
        e.drop_reason()
    }
}

fn handshake_header(bloc: &Bloc, key_id: u32, origin: Origin) -> Header {
    Header {
        kind: Kind::Handshake,
        bloc_tag: bloc.tag(),
        key_id,
        sender: origin.sender,
        boot: origin.boot,
        counter: origin.counter,
    }
}

fn transcript_start(request: &[u8]) -> Sha256 {
    let mut t = Sha256::new();
    t.update(b"crux-flock/v1/join-transcript\0");
    t.update(request);
    t
}

fn transcript_end(mut t: Sha256, reply_header: &[u8], responder_public: &[u8]) -> [u8; 32] {
    t.update(reply_header);
    t.update(responder_public);
    t.finalize().into()
}

fn reply_key(
    bloc: &Bloc,
    secondary: &SecretKey,
    shared: &[u8; 32],
    transcript: &[u8],
) -> PacketKey {
    PacketKey::from_derived(&bloc.derive(
        &[secondary.as_bytes(), shared, transcript],
        label::JOIN_REPLY,
    ))
}

/// The checks every handshake datagram gets: size and kind, then the envelope checks
/// (`max_bytes` is the exact size expected).
fn check_handshake(bytes: &[u8], size: usize, bloc: &Bloc) -> Result<Header, OpenError> {
    if bytes.len() > size {
        return Err(OpenError::Oversized {
            len: bytes.len(),
            limit: size,
        });
    }
    let header = check(bytes, size, bloc.tag())?;
    if bytes.len() != size {
        return Err(OpenError::Truncated(bytes.len()));
    }
    if header.kind != Kind::Handshake {
        return Err(OpenError::Malformed);
    }
    Ok(header)
}

/// The joining side of one handshake: holds the ephemeral secret until a reply arrives.
pub struct HandshakeInitiator {
    bloc: Bloc,
    secondary: SecretKey,
    key_id: u32,
    packet: PacketKey,
    ephemeral: StaticSecret,
    transcript: Sha256,
    purpose: Purpose,
}

impl std::fmt::Debug for HandshakeInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeInitiator")
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

impl HandshakeInitiator {
    /// Starts a handshake under `secondary` (the keyring's primary key): returns the state to keep
    /// and the request datagram ([`REQUEST_BYTES`] bytes) to send. The same request may be sent to
    /// several members; any of their replies completes it. `context` (at most
    /// [`MAX_CONTEXT_BYTES`], may be empty) reaches the responder in [`Response::context`].
    ///
    /// Panics if `context` is longer than [`MAX_CONTEXT_BYTES`].
    pub fn new<R: RngCore + CryptoRng>(
        rng: &mut R,
        secondary: &SecretKey,
        bloc: &Bloc,
        purpose: Purpose,
        origin: Origin,
        context: &[u8],
    ) -> (HandshakeInitiator, Vec<u8>) {
        let ephemeral = StaticSecret::random_from_rng(&mut *rng);
        let public = PublicKey::from(&ephemeral);
        let id = key_id(secondary, bloc);
        let packet = PacketKey::handshake(secondary, bloc);
        let mut body = [0u8; REQUEST_BODY_BYTES];
        body[0] = TYPE_REQUEST;
        body[1] = purpose as u8;
        body[2..2 + PUBLIC_BYTES].copy_from_slice(public.as_bytes());
        put_context(context, &mut body[REQUEST_CONTEXT_AT..]);
        let mut request = Vec::with_capacity(REQUEST_BYTES);
        seal(
            &packet,
            &handshake_header(bloc, id, origin),
            &body,
            rng,
            &mut request,
        );
        let state = HandshakeInitiator {
            bloc: bloc.clone(),
            secondary: secondary.clone(),
            key_id: id,
            packet,
            ephemeral,
            transcript: transcript_start(&request),
            purpose,
        };
        (state, request)
    }

    /// Why this handshake was started.
    pub fn purpose(&self) -> Purpose {
        self.purpose
    }

    /// The key id of the secondary key this handshake uses.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Opens a reply: its (authenticated) header, the transient keys it carries (install them
    /// with [`TransientKeys::install_join`]) and the responder's context. Any failure is a drop
    /// ([`HandshakeError::drop_reason`]); the state stays usable for another reply to the same
    /// request.
    pub fn finish(&self, reply: &[u8]) -> Result<Joined, HandshakeError> {
        let header = check_handshake(reply, REPLY_BYTES, &self.bloc)?;
        if header.key_id != self.key_id {
            return Err(OpenError::UnknownKey(header.key_id).into());
        }
        let mut body = Zeroizing::new(Vec::with_capacity(REPLY_BODY_BYTES));
        open(&self.packet, reply, &mut body)?;
        if body.len() != REPLY_BODY_BYTES || body[0] != TYPE_REPLY {
            return Err(OpenError::Malformed.into());
        }
        let mut public = [0u8; PUBLIC_BYTES];
        public.copy_from_slice(&body[1..1 + PUBLIC_BYTES]);
        let shared = self.ephemeral.diffie_hellman(&PublicKey::from(public));
        if !shared.was_contributory() {
            return Err(OpenError::AuthFailed.into());
        }
        let transcript = transcript_end(self.transcript.clone(), &reply[..HEADER_BYTES], &public);
        let key = reply_key(&self.bloc, &self.secondary, shared.as_bytes(), &transcript);
        let sealed = &body[1 + PUBLIC_BYTES..];
        let mut plain = Zeroizing::new([0u8; INNER_BYTES]);
        plain.copy_from_slice(&sealed[..INNER_BYTES]);
        key.cipher
            .decrypt_in_place_detached(
                &XNonce::default(),
                &transcript,
                &mut plain[..],
                Tag::from_slice(&sealed[INNER_BYTES..]),
            )
            .map_err(|_| OpenError::AuthFailed)?;
        Ok(Joined {
            header,
            keys: decode_keys(&plain[..KEYS_BYTES])?,
            context: get_context(&plain[KEYS_BYTES..])?,
        })
    }
}

/// A completed handshake, as the initiator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The reply's authenticated header (the responder's id, boot and counter: record it with
    /// [`ReplayTable::accept`](super::ReplayTable::accept)).
    pub header: Header,
    /// The transient keys ([`TransientKeys::install_join`]).
    pub keys: JoinKeys,
    /// The responder's context.
    pub context: Vec<u8>,
}

fn encode_keys(keys: &JoinKeys, out: &mut [u8]) {
    out[0] = keys.previous.is_some() as u8;
    out[1..1 + ANNOUNCEMENT_BYTES].copy_from_slice(&Zeroizing::new(keys.current.encode())[..]);
    if let Some(prev) = &keys.previous {
        out[1 + ANNOUNCEMENT_BYTES..].copy_from_slice(&Zeroizing::new(prev.encode())[..]);
    }
}

fn decode_keys(bytes: &[u8]) -> Result<JoinKeys, OpenError> {
    let current = KeyAnnouncement::decode(&bytes[1..1 + ANNOUNCEMENT_BYTES])?;
    let rest = &bytes[1 + ANNOUNCEMENT_BYTES..];
    let previous = match bytes[0] {
        0 if rest.iter().all(|b| *b == 0) => None,
        1 => Some(KeyAnnouncement::decode(rest)?),
        _ => return Err(OpenError::Malformed),
    };
    Ok(JoinKeys { current, previous })
}

/// What a responder answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request's authenticated header: check it against the replay table
    /// ([`ReplayTable::accept`](super::ReplayTable::accept)) before sending the reply.
    pub request: Header,
    /// Why the initiator asks.
    pub purpose: Purpose,
    /// The initiator's context.
    pub context: Vec<u8>,
    /// The reply datagram ([`REPLY_BYTES`] bytes, never more than the request).
    pub reply: Vec<u8>,
}

/// Answers a join request (or key request) with the current transient key (and the previous
/// one while it is still accepted: [`TransientKeys::join_keys`]).
///
/// Checks in order: size (exactly [`REQUEST_BYTES`]), header and bloc tag, kind, then the key the
/// header's key id names in `keyring` ([`OpenError::UnknownKey`] if none: one key, one decryption
/// attempt), then the body. Answers only with a transient key that is not stale at `now`
/// ([`HandshakeError::NoTransientKey`] otherwise). The caller rate-limits by source address
/// *before* calling this ([`RateLimiter`](super::RateLimiter)), and sends nothing on error.
/// `context` (at most [`MAX_CONTEXT_BYTES`]) reaches the initiator in [`Joined::context`].
///
/// Panics if `context` is longer than [`MAX_CONTEXT_BYTES`].
#[allow(clippy::too_many_arguments)]
pub fn respond<R: RngCore + CryptoRng>(
    keyring: &Keyring,
    bloc: &Bloc,
    request: &[u8],
    transient: &TransientKeys,
    now: std::time::Duration,
    origin: Origin,
    context: &[u8],
    rng: &mut R,
) -> Result<Response, HandshakeError> {
    let keys = transient.join_keys(now);
    respond_with(keyring, bloc, request, keys.as_ref(), origin, context, rng)
}

/// [`respond`] with the transient keys to hand out given directly (`None`: this node holds no
/// fresh key, and the answer is [`HandshakeError::NoTransientKey`] once the request checked out).
/// The flock core keeps its own key set and answers through this.
pub fn respond_with<R: RngCore + CryptoRng>(
    keyring: &Keyring,
    bloc: &Bloc,
    request: &[u8],
    keys: Option<&JoinKeys>,
    origin: Origin,
    context: &[u8],
    rng: &mut R,
) -> Result<Response, HandshakeError> {
    let header = check_handshake(request, REQUEST_BYTES, bloc)?;
    let (secondary, packet) = keyring
        .by_key_id(header.key_id, bloc)
        .ok_or(OpenError::UnknownKey(header.key_id))?;
    let mut body = Zeroizing::new(Vec::with_capacity(REQUEST_BODY_BYTES));
    open(&packet, request, &mut body)?;
    if body.len() != REQUEST_BODY_BYTES || body[0] != TYPE_REQUEST {
        return Err(OpenError::Malformed.into());
    }
    let their_context = get_context(&body[REQUEST_CONTEXT_AT..])?;
    let purpose = match body[1] {
        0 => Purpose::Join,
        1 => Purpose::KeyRequest,
        _ => return Err(OpenError::Malformed.into()),
    };
    let keys = keys.ok_or(HandshakeError::NoTransientKey)?;
    let mut their = [0u8; PUBLIC_BYTES];
    their.copy_from_slice(&body[2..2 + PUBLIC_BYTES]);
    let ephemeral = StaticSecret::random_from_rng(&mut *rng);
    let public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(&PublicKey::from(their));
    if !shared.was_contributory() {
        return Err(OpenError::Malformed.into());
    }
    let reply_header = handshake_header(bloc, header.key_id, origin);
    let mut header_bytes = Vec::with_capacity(HEADER_BYTES);
    reply_header.write(&mut header_bytes);
    let transcript = transcript_end(transcript_start(request), &header_bytes, public.as_bytes());
    let key = reply_key(bloc, secondary, shared.as_bytes(), &transcript);

    let mut reply_body = Zeroizing::new([0u8; REPLY_BODY_BYTES]);
    reply_body[0] = TYPE_REPLY;
    reply_body[1..1 + PUBLIC_BYTES].copy_from_slice(public.as_bytes());
    let sealed = &mut reply_body[1 + PUBLIC_BYTES..];
    encode_keys(keys, &mut sealed[..KEYS_BYTES]);
    put_context(context, &mut sealed[KEYS_BYTES..INNER_BYTES]);
    // The key k is used exactly once (e_r is fresh for every reply), so a fixed nonce is safe.
    let tag = key
        .cipher
        .encrypt_in_place_detached(&XNonce::default(), &transcript, &mut sealed[..INNER_BYTES])
        .expect("a few bytes are within the AEAD's limits");
    sealed[INNER_BYTES..].copy_from_slice(&tag);
    let mut reply = Vec::with_capacity(REPLY_BYTES);
    seal(&packet, &reply_header, &reply_body[..], rng, &mut reply);
    Ok(Response {
        request: header,
        purpose,
        context: their_context,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::transient::ROTATION_MAX;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use std::time::Duration;

    const NOW: Duration = Duration::from_secs(100);

    fn origin(n: u64) -> Origin {
        Origin {
            sender: NodeId(n),
            boot: BootId(n + 100),
            counter: 1,
        }
    }

    struct World {
        rng: ChaCha20Rng,
        bloc: Bloc,
        secondary: SecretKey,
        keyring: Keyring,
        transient: TransientKeys,
    }

    fn world() -> World {
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let bloc = Bloc::new("bloc-a");
        let secondary = SecretKey::generate(&mut rng);
        let keyring = Keyring::new(secondary.clone());
        let mut transient = TransientKeys::new(bloc.clone(), ROTATION_MAX);
        transient.install(77, SecretKey::generate(&mut rng), NOW);
        World {
            rng,
            bloc,
            secondary,
            keyring,
            transient,
        }
    }

    impl World {
        /// Node 1 starts a handshake under the world's secondary key.
        fn initiate(&mut self, purpose: Purpose, context: &[u8]) -> (HandshakeInitiator, Vec<u8>) {
            HandshakeInitiator::new(
                &mut self.rng,
                &self.secondary,
                &self.bloc,
                purpose,
                origin(1),
                context,
            )
        }

        /// Node 2 answers `request` at `now` with the world's keyring and transient keys.
        fn respond_at(
            &mut self,
            request: &[u8],
            now: Duration,
            context: &[u8],
        ) -> Result<Response, HandshakeError> {
            respond(
                &self.keyring,
                &self.bloc,
                request,
                &self.transient,
                now,
                origin(2),
                context,
                &mut self.rng,
            )
        }

        /// [`respond_at`](Self::respond_at) at [`NOW`], with no context.
        fn respond(&mut self, request: &[u8]) -> Result<Response, HandshakeError> {
            self.respond_at(request, NOW, b"")
        }
    }

    fn exchange(w: &mut World) -> (HandshakeInitiator, Vec<u8>, Response) {
        let (state, request) = w.initiate(Purpose::Join, b"");
        let resp = w.respond(&request).unwrap();
        (state, request, resp)
    }

    #[test]
    fn sizes() {
        assert_eq!(REQUEST_BYTES, 268);
        assert_eq!(REPLY_BYTES, 263);
    }

    #[test]
    fn roundtrip_hands_over_the_current_transient_key() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        assert_eq!(request.len(), REQUEST_BYTES);
        assert_eq!(resp.reply.len(), REPLY_BYTES);
        assert!(resp.reply.len() <= request.len());
        assert_eq!(resp.purpose, Purpose::Join);
        assert_eq!(resp.request.sender, NodeId(1));
        assert_eq!(resp.request.kind, Kind::Handshake);
        assert_eq!(resp.request.key_id, key_id(&w.secondary, &w.bloc));
        let Joined {
            header,
            keys,
            context,
        } = state.finish(&resp.reply).unwrap();
        assert!(context.is_empty());
        assert_eq!(header.sender, NodeId(2));
        assert_eq!(header.boot, BootId(102));
        assert_eq!(keys.current.epoch, 77);
        assert_eq!(&keys.current.key, w.transient.current().unwrap().1);
        assert_eq!(keys.previous, None);
        let ann = keys;
        // A second reply (another responder) also completes the same state.
        let resp2 = respond(
            &w.keyring,
            &w.bloc,
            &request,
            &w.transient,
            NOW,
            origin(3),
            b"",
            &mut w.rng,
        )
        .unwrap();
        assert_eq!(state.finish(&resp2.reply).unwrap().keys, ann);
    }

    #[test]
    fn key_request_uses_the_same_exchange() {
        let mut w = world();
        let (state, request) = w.initiate(Purpose::KeyRequest, b"");
        let resp = w.respond(&request).unwrap();
        assert_eq!(resp.purpose, Purpose::KeyRequest);
        assert_eq!(state.finish(&resp.reply).unwrap().keys.current.epoch, 77);
    }

    #[test]
    fn every_installed_secondary_key_admits_a_joiner() {
        let mut w = world();
        let other = SecretKey::generate(&mut w.rng);
        w.keyring.install(other.clone()).unwrap();
        let (state, request) =
            HandshakeInitiator::new(&mut w.rng, &other, &w.bloc, Purpose::Join, origin(1), b"");
        let resp = w.respond(&request).unwrap();
        assert_eq!(resp.request.key_id, key_id(&other, &w.bloc));
        assert_eq!(state.finish(&resp.reply).unwrap().keys.current.epoch, 77);
    }

    #[test]
    fn wrong_secondary_key_fails() {
        let mut w = world();
        let wrong = SecretKey::generate(&mut w.rng);
        let (_, request) =
            HandshakeInitiator::new(&mut w.rng, &wrong, &w.bloc, Purpose::Join, origin(1), b"");
        let err = w.respond(&request).unwrap_err();
        assert_eq!(
            err,
            HandshakeError::Open(OpenError::UnknownKey(key_id(&wrong, &w.bloc)))
        );
        assert_eq!(err.drop_reason(), DropReason::UnknownKey);
        // Forge the right key id onto a request sealed under the wrong key: one attempt, fails.
        let mut forged = request.clone();
        forged[8..12].copy_from_slice(&key_id(&w.secondary, &w.bloc).to_le_bytes());
        let err = w.respond(&forged).unwrap_err();
        assert_eq!(err.drop_reason(), DropReason::AuthFailed);
        // And the initiator rejects a reply sealed under another secondary key.
        let (state, _) =
            HandshakeInitiator::new(&mut w.rng, &wrong, &w.bloc, Purpose::Join, origin(1), b"");
        let (_, _, resp) = exchange(&mut w);
        assert_eq!(
            state.finish(&resp.reply).unwrap_err(),
            HandshakeError::Open(OpenError::UnknownKey(key_id(&w.secondary, &w.bloc)))
        );
    }

    #[test]
    fn wrong_bloc_fails() {
        let mut w = world();
        let other = Bloc::new("bloc-b");
        // Same secondary key, other bloc: the tag differs, so it is dropped before crypto.
        let (_, request) = HandshakeInitiator::new(
            &mut w.rng,
            &w.secondary,
            &other,
            Purpose::Join,
            origin(1),
            b"",
        );
        let err = w.respond(&request).unwrap_err();
        assert_eq!(err, HandshakeError::Open(OpenError::WrongBloc(other.tag())));
        // With the tag and key id forged to ours, the derived keys still differ.
        let mut forged = request.clone();
        forged[4..8].copy_from_slice(&w.bloc.tag().to_le_bytes());
        forged[8..12].copy_from_slice(&key_id(&w.secondary, &w.bloc).to_le_bytes());
        let err = w.respond(&forged).unwrap_err();
        assert_eq!(err.drop_reason(), DropReason::AuthFailed);
    }

    #[test]
    fn tampered_bytes_fail() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        for i in 0..request.len() {
            let mut bad = request.clone();
            bad[i] ^= 0x40;
            let r = w.respond(&bad);
            assert!(r.is_err(), "request byte {i}");
        }
        for i in 0..resp.reply.len() {
            let mut bad = resp.reply.clone();
            bad[i] ^= 0x40;
            assert!(state.finish(&bad).is_err(), "reply byte {i}");
        }
        assert!(w.respond(&request[..200]).is_err());
        let mut long = request.clone();
        long.push(0);
        let err = w.respond(&long);
        assert_eq!(err.unwrap_err().drop_reason(), DropReason::Oversized);
        assert_eq!(
            state.finish(&request).unwrap_err().drop_reason(),
            DropReason::Oversized
        );
        assert_eq!(
            state.finish(&resp.reply[..100]).unwrap_err().drop_reason(),
            DropReason::Truncated
        );
    }

    #[test]
    fn during_a_switch_the_reply_carries_both_keys() {
        let mut w = world();
        let new = w
            .transient
            .rotate(NOW + Duration::from_secs(30), &mut w.rng);
        let later = NOW + Duration::from_secs(31);
        let (state, request) = w.initiate(Purpose::Join, b"");
        let resp = w.respond_at(&request, later, b"").unwrap();
        assert!(resp.reply.len() <= request.len());
        let keys = state.finish(&resp.reply).unwrap().keys;
        assert_eq!(keys.current, new);
        assert_eq!(keys.previous.as_ref().map(|p| p.epoch), Some(77));
        let mut joiner = TransientKeys::new(w.bloc.clone(), ROTATION_MAX);
        joiner.install_join(keys, later);
        assert_eq!(joiner.sealing_key(later).unwrap().0, 77);
        assert!(joiner.accepts(new.epoch, later));
    }

    #[test]
    fn contexts_travel_both_ways() {
        let mut w = world();
        let long = [7u8; MAX_CONTEXT_BYTES];
        let (state, request) = w.initiate(Purpose::KeyRequest, b"claim of the initiator");
        let resp = w.respond_at(&request, NOW, &long).unwrap();
        assert_eq!(resp.context, b"claim of the initiator");
        assert_eq!(resp.reply.len(), REPLY_BYTES);
        let joined = state.finish(&resp.reply).unwrap();
        assert_eq!(joined.context, long);
        assert_eq!(joined.keys.current.epoch, 77);
    }

    #[test]
    #[should_panic(expected = "handshake context is 65 bytes")]
    fn an_oversized_context_is_a_programming_error() {
        let mut w = world();
        let ctx = [0u8; MAX_CONTEXT_BYTES + 1];
        let _ = w.initiate(Purpose::Join, &ctx);
    }

    #[test]
    fn a_bad_context_length_is_malformed() {
        let mut w = world();
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        let public = PublicKey::from(&StaticSecret::random_from_rng(&mut w.rng));
        for (len, trailing) in [(65u8, false), (3, true)] {
            let mut body = [0u8; REQUEST_BODY_BYTES];
            body[0] = TYPE_REQUEST;
            body[2..34].copy_from_slice(public.as_bytes());
            body[REQUEST_CONTEXT_AT] = len;
            if trailing {
                body[REQUEST_BODY_BYTES - 1] = 1;
            }
            let mut d = Vec::new();
            seal(&packet, &h, &body, &mut w.rng, &mut d);
            let err = w.respond(&d);
            assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
        }
    }

    #[test]
    fn reply_to_another_request_does_not_open() {
        let mut w = world();
        let (state_a, _, _) = exchange(&mut w);
        let (_, _, resp_b) = exchange(&mut w);
        assert_eq!(
            state_a.finish(&resp_b.reply).unwrap_err(),
            HandshakeError::Open(OpenError::AuthFailed)
        );
    }

    #[test]
    fn responder_without_a_fresh_key_does_not_answer() {
        let mut w = world();
        let (_, request) = w.initiate(Purpose::Join, b"");
        let empty = TransientKeys::new(w.bloc.clone(), ROTATION_MAX);
        let err = respond(
            &w.keyring,
            &w.bloc,
            &request,
            &empty,
            NOW,
            origin(2),
            b"",
            &mut w.rng,
        );
        assert_eq!(err.unwrap_err(), HandshakeError::NoTransientKey);
        let late = NOW + Duration::from_secs(91);
        let err = w.respond_at(&request, late, b"");
        assert_eq!(err.unwrap_err().drop_reason(), DropReason::Unexpected);
    }

    #[test]
    fn a_flock_datagram_is_not_a_handshake() {
        let mut w = world();
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let mut h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        h.kind = Kind::Flock;
        let mut d = Vec::new();
        seal(&packet, &h, &[0; REQUEST_BODY_BYTES], &mut w.rng, &mut d);
        let err = w.respond(&d);
        assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
    }

    /// Forward secrecy: with the secondary key, an eavesdropper opens both outer layers and
    /// learns E_i and E_r, but the key that seals the transient key needs X25519(e_i, E_r).
    #[test]
    fn a_recorded_exchange_cannot_be_opened_with_only_the_secondary_key() {
        let mut w = world();
        let (state, request, resp) = exchange(&mut w);
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let (mut req_body, mut rep_body) = (Vec::new(), Vec::new());
        open(&packet, &request, &mut req_body).unwrap();
        open(&packet, &resp.reply, &mut rep_body).unwrap();
        let e_i: [u8; 32] = req_body[2..34].try_into().unwrap();
        let e_r: [u8; 32] = rep_body[1..33].try_into().unwrap();
        let transient = w.transient.current().unwrap().1.clone();
        assert!(
            !rep_body.windows(4).any(|win| win == 77u32.to_le_bytes()),
            "epoch is sealed too"
        );
        // The transient key is nowhere in clear in the opened layers.
        assert!(!rep_body.windows(32).any(|win| win == transient.as_bytes()));
        let transcript = transcript_end(transcript_start(&request), &resp.reply[..36], &e_r);
        let sealed = &rep_body[33..];
        let try_open = |shared: &[u8; 32]| {
            let key = reply_key(&w.bloc, &w.secondary, shared, &transcript);
            let mut plain = sealed[..INNER_BYTES].to_vec();
            key.cipher
                .decrypt_in_place_detached(
                    &XNonce::default(),
                    &transcript,
                    &mut plain,
                    Tag::from_slice(&sealed[INNER_BYTES..]),
                )
                .is_ok()
        };
        // Everything the eavesdropper can compute from public values fails.
        assert!(!try_open(&[0; 32]));
        assert!(!try_open(&e_i));
        assert!(!try_open(&e_r));
        let mut attacker = ChaCha20Rng::seed_from_u64(999);
        let guess = StaticSecret::random_from_rng(&mut attacker);
        assert!(!try_open(
            guess.diffie_hellman(&PublicKey::from(e_r)).as_bytes()
        ));
        assert!(!try_open(
            guess.diffie_hellman(&PublicKey::from(e_i)).as_bytes()
        ));
        // Only the shared secret of the ephemeral keys opens it.
        let shared = state.ephemeral.diffie_hellman(&PublicKey::from(e_r));
        assert!(try_open(shared.as_bytes()));
        // And the derived key depends on the ephemeral secret: another e_i, another key.
        let other = StaticSecret::random_from_rng(&mut attacker);
        let k1 = w.bloc.derive(
            &[w.secondary.as_bytes(), shared.as_bytes(), &transcript],
            label::JOIN_REPLY,
        );
        let k2 = w.bloc.derive(
            &[
                w.secondary.as_bytes(),
                other.diffie_hellman(&PublicKey::from(e_r)).as_bytes(),
                &transcript,
            ],
            label::JOIN_REPLY,
        );
        assert_ne!(k1, k2);
    }

    #[test]
    fn low_order_public_keys_are_refused() {
        let mut w = world();
        // A request whose ephemeral key is the identity point (all zero): no contribution.
        let packet = PacketKey::handshake(&w.secondary, &w.bloc);
        let h = handshake_header(&w.bloc, key_id(&w.secondary, &w.bloc), origin(1));
        let mut body = [0u8; REQUEST_BODY_BYTES];
        body[0] = TYPE_REQUEST;
        let mut d = Vec::new();
        seal(&packet, &h, &body, &mut w.rng, &mut d);
        let err = w.respond(&d);
        assert_eq!(err.unwrap_err(), HandshakeError::Open(OpenError::Malformed));
        // A reply with a zero responder key is refused by the initiator.
        let (state, _) = w.initiate(Purpose::Join, b"");
        let mut rbody = [0u8; REPLY_BODY_BYTES];
        rbody[0] = TYPE_REPLY;
        let mut r = Vec::new();
        seal(&packet, &h, &rbody, &mut w.rng, &mut r);
        assert_eq!(
            state.finish(&r).unwrap_err(),
            HandshakeError::Open(OpenError::AuthFailed)
        );
    }

    #[test]
    fn deterministic_given_the_rng() {
        let run = || {
            let mut w = world();
            let (_, request, resp) = exchange(&mut w);
            (request, resp.reply)
        };
        assert_eq!(run(), run());
    }
}
