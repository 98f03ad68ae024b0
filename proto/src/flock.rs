//! Flock wire messages.
//!
//! A flock datagram is `Header || body`. The [`Header`] travels in clear (it is the associated
//! data of the envelope: the security layer authenticates it and encrypts the body); the body is
//! one bincode-encoded [`Message`]. Push-pull exchanges that outgrow one datagram travel as a
//! [`StreamFrame`] over a stream (TCP in the agent, a sized transfer in the simulator).
//!
//! Every encoding here uses [`bincode::config::standard`] (varint integers) with a decode limit, so
//! a hostile length prefix cannot make the decoder allocate more than the limit.

use std::net::SocketAddr;

use bincode::{Decode, Encode};

/// First two bytes of every flock datagram.
pub const MAGIC: [u8; 2] = *b"CX";
/// Wire version carried in every header.
pub const VERSION: u8 = 1;
/// Default maximum datagram size in bytes (fits a 1,500-byte Ethernet MTU with IP/UDP headers
/// and room to spare for tunnels, as QUIC's conservative 1,200–1,400 range).
pub const DEFAULT_MTU: usize = 1400;
/// Smallest MTU a flock accepts: a header, the envelope's overhead and one full member entry.
pub const MIN_MTU: usize = 512;
/// Largest datagram the decoder ever looks at (a UDP payload cannot be larger).
pub const MAX_DATAGRAM_BYTES: usize = 65_507;
/// Decode limit for one stream frame (the full member state of a very large flock).
pub const MAX_STREAM_BYTES: usize = 64 * 1024 * 1024;
/// Bytes of the fixed-size [`Header`] on the wire.
pub const HEADER_BYTES: usize = 2 + 1 + 1 + 4 + 4 + 8 + 8 + 8;

/// A node's identity: random at first start, kept in the data dir for the node's life.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct NodeId(pub u64);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(NodeId)
    }
}

/// Random for each start of a node: a restarted node has the same [`NodeId`] and a new boot id.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct BootId(pub u64);

impl std::fmt::Display for BootId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A node's static public key for the node plane (Ed25519, raw 32 bytes; see the `crux-transport`
/// crate). It travels in the node's sealed membership record, so a peer on the node plane is
/// accepted only while the flock lists that key for that node id.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeKey(pub [u8; 32]);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({self})")
    }
}

impl std::fmt::Display for NodeKey {
    /// The first 8 bytes in hex: enough to tell keys apart in logs and tables.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What kind of datagram follows the header.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Kind {
    /// A [`Message`] sealed under the group's transient key (or in clear without security).
    Flock = 0,
    /// A join handshake or key request, sealed under the secondary key.
    Handshake = 1,
}

/// The clear, fixed-size datagram header. The security layer authenticates all of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// What the body is.
    pub kind: Kind,
    /// Tag of the bloc (derived from the bloc ID): datagrams of other blocs are dropped unread.
    pub bloc_tag: u32,
    /// Which key sealed the body (transient epoch, or secondary key id for handshakes).
    pub key_id: u32,
    /// The sender's node id.
    pub sender: NodeId,
    /// The sender's boot id.
    pub boot: BootId,
    /// The sender's datagram counter for this boot (replay window).
    pub counter: u64,
}

impl Header {
    /// Writes the header's fixed [`HEADER_BYTES`] bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.bloc_tag.to_le_bytes());
        out.extend_from_slice(&self.key_id.to_le_bytes());
        out.extend_from_slice(&self.sender.0.to_le_bytes());
        out.extend_from_slice(&self.boot.0.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
    }

    /// Parses the header at the start of `bytes`; returns it and the rest.
    pub fn parse(bytes: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
        if bytes.len() < HEADER_BYTES {
            return Err(DecodeError::Truncated);
        }
        if bytes[0..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if bytes[2] != VERSION {
            return Err(DecodeError::BadVersion(bytes[2]));
        }
        let kind = match bytes[3] {
            0 => Kind::Flock,
            1 => Kind::Handshake,
            k => return Err(DecodeError::BadKind(k)),
        };
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let header = Header {
            kind,
            bloc_tag: u32_at(4),
            key_id: u32_at(8),
            sender: NodeId(u64_at(12)),
            boot: BootId(u64_at(20)),
            counter: u64_at(28),
        };
        Ok((header, &bytes[HEADER_BYTES..]))
    }
}

/// A member's state as the flock sees it.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Failed a probe; dead unless it refutes before the suspicion timeout.
    Suspect,
    /// Declared dead by the flock (still probed at a low rate so partitions heal).
    Dead,
    /// Left gracefully.
    Left,
}

impl MemberState {
    /// Lower-case name used by the CLI and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

/// One member as carried by push-pull and by gossip.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemberInfo {
    /// Node id.
    pub id: NodeId,
    /// Boot id of the incarnation of the node this entry is about.
    pub boot: BootId,
    /// Flock address of the node.
    pub addr: SocketAddr,
    /// Incarnation number (SWIM): only the node itself raises it, to refute suspicion.
    pub incarnation: u64,
    /// State at that incarnation.
    pub state: MemberState,
    /// The node's node-plane public key (None: a node without one, as in the simulator). It
    /// changes only with a new boot.
    pub key: Option<NodeKey>,
}

/// A leader claim, spread by gossip. The leader re-issues it with a higher `beat` regularly, which
/// is how members learn that the leader is alive without the leader contacting each of them.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Debug)]
pub struct LeaderClaim {
    /// The leader.
    pub leader: NodeId,
    /// The leader's boot id when it claimed.
    pub boot: BootId,
    /// Election term.
    pub term: u64,
    /// True when the leader claimed while alone: any claim made with company beats it.
    pub solo: bool,
    /// Liveness counter, raised by the leader each beat interval.
    pub beat: u64,
    /// The transient key epoch the leader seals with (0 without security): members seal with
    /// the same key, and ask for it when they do not hold it.
    pub epoch: u32,
    /// The version of the leader's secondary keyring ([`KeyringState::version`]; 0 without
    /// security or before any change): a member whose ring is at another version repairs it by
    /// push-pull.
    pub ring: u64,
}

impl LeaderClaim {
    /// Precedence between two competing claims: the greater key wins. A claim made with company
    /// beats a solo claim, then the higher term wins, then the lower node id.
    pub fn precedence(&self) -> (bool, u64, std::cmp::Reverse<NodeId>) {
        (!self.solo, self.term, std::cmp::Reverse(self.leader))
    }
}

/// A piggybacked membership or leadership update.
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Update {
    /// The member is alive at this incarnation (also how a node announces itself and refutes).
    Alive {
        /// The member.
        member: MemberInfo,
    },
    /// `from` suspects the member at `incarnation`.
    Suspect {
        /// The suspected member.
        id: NodeId,
        /// Its boot id.
        boot: BootId,
        /// The incarnation being suspected.
        incarnation: u64,
        /// Who suspects it (Lifeguard counts distinct suspecters as confirmations).
        from: NodeId,
    },
    /// `from` declared the member dead at `incarnation`.
    Dead {
        /// The dead member.
        id: NodeId,
        /// Its boot id.
        boot: BootId,
        /// The incarnation declared dead.
        incarnation: u64,
        /// Who declared it.
        from: NodeId,
    },
    /// The member left gracefully.
    Left {
        /// The member.
        id: NodeId,
        /// Its boot id.
        boot: BootId,
        /// Its incarnation when it left.
        incarnation: u64,
    },
    /// A leader claim or beat.
    Leader(LeaderClaim),
    /// A transient key of the flock led by `leader` (a rotation, or a merge spreading the
    /// winning flock's key). Only ever sent sealed under a transient key.
    Key {
        /// The leader that made the key.
        leader: NodeId,
        /// Its epoch (the header key id of datagrams sealed under it).
        epoch: u32,
        /// The key.
        key: [u8; 32],
    },
    /// The node is revoked: every member forgets it, ignores what it says of itself and drops
    /// its datagrams; its node-plane connections close. Spread like any update, and kept in
    /// push-pull so that a member that missed it learns it.
    Revoke {
        /// The revoked node.
        id: NodeId,
    },
    /// A secondary-keyring change (install / use / remove), spread to every member.
    Keyring {
        /// Operation code: 0 install, 1 use, 2 remove.
        op: u8,
        /// The secondary key it is about.
        key: [u8; 32],
        /// The keyring version this change makes ([`KeyringState::version`]).
        version: u64,
    },
}

/// Body of a flock datagram.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub enum Message {
    /// SWIM probe. `target` is the node the sender believes it is probing (a mismatch means the
    /// address now belongs to someone else). Discovery probes of unknown addresses have no target.
    Ping {
        /// Probe sequence number, echoed in the ack.
        seq: u32,
        /// Intended recipient, when known.
        target: Option<NodeId>,
        /// The sender's own entry, so an unknown recipient can add it at once.
        me: MemberInfo,
        /// Digest of the sender's live membership (see [`Message::Ack::digest`]).
        digest: u64,
        /// Piggybacked updates.
        updates: Vec<Update>,
    },
    /// Answer to a ping (direct, or relayed for an indirect probe).
    Ack {
        /// Sequence number of the ping answered.
        seq: u32,
        /// The node that answers.
        me: MemberInfo,
        /// Order-independent digest of the sender's set of live members (XOR of a hash of each
        /// live member's id and boot). Two nodes whose digests keep differing push-pull.
        digest: u64,
        /// Piggybacked updates.
        updates: Vec<Update>,
    },
    /// Ask the recipient to probe `target` on the sender's behalf (SWIM indirect probe).
    PingReq {
        /// Sequence number to echo.
        seq: u32,
        /// The member to probe.
        target: NodeId,
        /// Its address.
        target_addr: SocketAddr,
        /// Piggybacked updates.
        updates: Vec<Update>,
    },
    /// A relay's probe of `target`, asking it to ack to the relay.
    IndirectPing {
        /// The relay's sequence number.
        seq: u32,
        /// The member probed.
        target: NodeId,
        /// Piggybacked updates.
        updates: Vec<Update>,
    },
    /// The relay did not hear from the target in time (Lifeguard: the requester learns the relay
    /// itself is alive, which keeps its local-health estimate honest).
    Nack {
        /// Sequence number of the ping-req.
        seq: u32,
    },
    /// Gossip: piggyback-only datagram sent each gossip interval to a few random members.
    Gossip {
        /// The updates.
        updates: Vec<Update>,
    },
    /// Push-pull of the full state in one datagram (when it fits). `reply` is false on the
    /// initiator's side; the answer carries the responder's state with `reply` true.
    PushPull(PushPull),
}

/// Full-state anti-entropy exchange.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct PushPull {
    /// False from the initiator, true on the answer.
    pub reply: bool,
    /// True when the initiator is joining (it wants the answer even if it looks redundant).
    pub join: bool,
    /// The sender's whole member table, itself included.
    pub members: Vec<MemberInfo>,
    /// The leader the sender follows, if any.
    pub leader: Option<LeaderClaim>,
    /// The sender's secondary keyring (None without security): its version and digest always,
    /// its keys only in an answer to a sender whose ring is behind.
    pub ring: Option<KeyringState>,
    /// The nodes the sender holds revoked.
    pub revoked: Vec<NodeId>,
}

/// A secondary keyring as push-pull carries it (sealed under the transient key, like the
/// keyring changes gossip carries), so that a member that missed a change learns the ring.
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub struct KeyringState {
    /// Raised by every install / use / remove (the node where the operator ran it picks one
    /// above every version it knows; the others take the version the change carries). Of two
    /// rings, the higher version wins; at equal versions, the higher digest.
    pub version: u64,
    /// A digest of the keys and which one is primary.
    pub digest: u64,
    /// The keys, primary first (empty unless the receiver is behind). At most 16.
    pub keys: Vec<[u8; 32]>,
}

/// A frame exchanged over a stream: push-pull that does not fit a datagram, and the reliable
/// probe a node sends beside its indirect probes when a direct ping went unanswered (as
/// memberlist's TCP ping: a datagram lost on the way does not make a live member suspect).
#[derive(Encode, Decode, Clone, PartialEq, Eq, Debug)]
pub enum StreamFrame {
    /// Full-state exchange.
    PushPull(PushPull),
    /// "Are you alive?" over a stream, for the probe `seq` of the sender.
    Probe {
        /// Sequence number of the sender's probe.
        seq: u32,
    },
    /// The answer to [`StreamFrame::Probe`], with the responder's own entry (which refutes any
    /// suspicion of it the prober holds).
    ProbeAck {
        /// Sequence number of the probe answered.
        seq: u32,
        /// The responder's own entry.
        me: MemberInfo,
    },
}

/// Why bytes could not be decoded. Always comes from the network; decoding changes no state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("datagram shorter than a header")]
    Truncated,
    /// Not a Crux datagram.
    #[error("bad magic")]
    BadMagic,
    /// A wire version this build does not speak.
    #[error("unsupported wire version {0}")]
    BadVersion(u8),
    /// Unknown datagram kind.
    #[error("unknown datagram kind {0}")]
    BadKind(u8),
    /// Larger than the limit for its kind.
    #[error("{len} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Length seen.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The body is not a valid encoding.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// Valid encoding followed by extra bytes.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes a message body (without header).
pub fn encode_message(msg: &Message, out: &mut Vec<u8>) {
    bincode::encode_into_std_write(msg, out, config::<MAX_DATAGRAM_BYTES>())
        .expect("encoding into a Vec cannot fail");
}

/// Encoded length of a message body.
pub fn message_len(msg: &Message) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    bincode::encode_into_writer(msg, &mut counter, config::<MAX_DATAGRAM_BYTES>())
        .expect("sizing cannot fail");
    counter.bytes_written
}

/// Encoded length of one update.
pub fn update_len(update: &Update) -> usize {
    let mut counter = bincode::enc::write::SizeWriter::default();
    bincode::encode_into_writer(update, &mut counter, config::<MAX_DATAGRAM_BYTES>())
        .expect("sizing cannot fail");
    counter.bytes_written
}

/// Decodes a message body, rejecting trailing bytes.
pub fn decode_message(bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_DATAGRAM_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: MAX_DATAGRAM_BYTES,
        });
    }
    let (msg, used) = bincode::decode_from_slice(bytes, config::<MAX_DATAGRAM_BYTES>())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

/// Encodes a stream frame.
pub fn encode_frame(frame: &StreamFrame) -> Vec<u8> {
    bincode::encode_to_vec(frame, config::<MAX_STREAM_BYTES>()).expect("encoding cannot fail")
}

/// Decodes a stream frame, rejecting trailing bytes.
pub fn decode_frame(bytes: &[u8]) -> Result<StreamFrame, DecodeError> {
    if bytes.len() > MAX_STREAM_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit: MAX_STREAM_BYTES,
        });
    }
    let (frame, used) = bincode::decode_from_slice(bytes, config::<MAX_STREAM_BYTES>())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        ]
    }

    fn arb_state() -> impl Strategy<Value = MemberState> {
        prop_oneof![
            Just(MemberState::Alive),
            Just(MemberState::Suspect),
            Just(MemberState::Dead),
            Just(MemberState::Left)
        ]
    }

    fn arb_member() -> impl Strategy<Value = MemberInfo> {
        (
            any::<u64>(),
            any::<u64>(),
            arb_addr(),
            any::<u64>(),
            arb_state(),
            proptest::option::of(any::<[u8; 32]>()),
        )
            .prop_map(|(id, boot, addr, incarnation, state, key)| MemberInfo {
                id: NodeId(id),
                boot: BootId(boot),
                addr,
                incarnation,
                state,
                key: key.map(NodeKey),
            })
    }

    fn arb_claim() -> impl Strategy<Value = LeaderClaim> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(|(l, b, term, solo, beat, epoch, ring)| LeaderClaim {
                leader: NodeId(l),
                boot: BootId(b),
                term,
                solo,
                beat,
                epoch,
                ring,
            })
    }

    fn arb_update() -> impl Strategy<Value = Update> {
        prop_oneof![
            arb_member().prop_map(|member| Update::Alive { member }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, b, n, f)| {
                Update::Suspect {
                    id: NodeId(i),
                    boot: BootId(b),
                    incarnation: n,
                    from: NodeId(f),
                }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, b, n, f)| {
                Update::Dead {
                    id: NodeId(i),
                    boot: BootId(b),
                    incarnation: n,
                    from: NodeId(f),
                }
            }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(i, b, n)| Update::Left {
                id: NodeId(i),
                boot: BootId(b),
                incarnation: n
            }),
            arb_claim().prop_map(Update::Leader),
            (any::<u64>(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(l, epoch, key)| {
                Update::Key {
                    leader: NodeId(l),
                    epoch,
                    key,
                }
            }),
            (any::<u8>(), any::<[u8; 32]>(), any::<u64>())
                .prop_map(|(op, key, version)| Update::Keyring { op, key, version }),
            any::<u64>().prop_map(|id| Update::Revoke { id: NodeId(id) }),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let updates = || proptest::collection::vec(arb_update(), 0..8);
        prop_oneof![
            (
                any::<u32>(),
                proptest::option::of(any::<u64>()),
                arb_member(),
                any::<u64>(),
                updates()
            )
                .prop_map(|(seq, t, me, digest, updates)| Message::Ping {
                    seq,
                    target: t.map(NodeId),
                    me,
                    digest,
                    updates
                }),
            (any::<u32>(), arb_member(), any::<u64>(), updates()).prop_map(
                |(seq, me, digest, updates)| Message::Ack {
                    seq,
                    me,
                    digest,
                    updates
                }
            ),
            (any::<u32>(), any::<u64>(), arb_addr(), updates()).prop_map(
                |(seq, t, target_addr, updates)| Message::PingReq {
                    seq,
                    target: NodeId(t),
                    target_addr,
                    updates
                }
            ),
            (any::<u32>(), any::<u64>(), updates()).prop_map(|(seq, t, updates)| {
                Message::IndirectPing {
                    seq,
                    target: NodeId(t),
                    updates,
                }
            }),
            any::<u32>().prop_map(|seq| Message::Nack { seq }),
            updates().prop_map(|updates| Message::Gossip { updates }),
            (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec(arb_member(), 0..8),
                proptest::option::of(arb_claim()),
                proptest::option::of((
                    any::<u64>(),
                    any::<u64>(),
                    proptest::collection::vec(any::<[u8; 32]>(), 0..3)
                ))
            )
                .prop_map(|(reply, join, members, leader, ring)| Message::PushPull(
                    PushPull {
                        reply,
                        join,
                        members,
                        leader,
                        ring: ring.map(|(version, digest, keys)| KeyringState {
                            version,
                            digest,
                            keys
                        }),
                        revoked: leader.iter().map(|c| c.leader).collect(),
                    }
                )),
        ]
    }

    proptest! {
        #[test]
        fn message_roundtrips(msg in arb_message()) {
            let mut buf = Vec::new();
            encode_message(&msg, &mut buf);
            prop_assert_eq!(buf.len(), message_len(&msg));
            prop_assert_eq!(decode_message(&buf).unwrap(), msg);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_message(&bytes);
            let _ = decode_frame(&bytes);
            let _ = Header::parse(&bytes);
        }

        #[test]
        fn truncated_messages_are_rejected(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_message(&msg, &mut buf);
            let at = cut.index(buf.len());
            prop_assert!(decode_message(&buf[..at]).is_err());
        }

        #[test]
        fn header_roundtrips(kind in any::<bool>(), tag in any::<u32>(), key in any::<u32>(),
                             s in any::<u64>(), b in any::<u64>(), c in any::<u64>()) {
            let h = Header { kind: if kind { Kind::Flock } else { Kind::Handshake }, bloc_tag: tag,
                             key_id: key, sender: NodeId(s), boot: BootId(b), counter: c };
            let mut buf = Vec::new();
            h.write(&mut buf);
            buf.extend_from_slice(b"rest");
            prop_assert_eq!(buf.len(), HEADER_BYTES + 4);
            let (parsed, rest) = Header::parse(&buf).unwrap();
            prop_assert_eq!(parsed, h);
            prop_assert_eq!(rest, b"rest");
        }
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A PushPull whose member vector claims 2^60 entries must fail fast, not allocate.
        let mut buf = vec![6u8, 0, 0]; // variant PushPull, reply=false, join=false
        buf.push(253); // varint u64 marker
        buf.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode_message(&buf).is_err());
        assert!(decode_frame(&buf).is_err());
    }

    #[test]
    fn stream_frame_roundtrips() {
        let members = (0..1000)
            .map(|i| MemberInfo {
                id: NodeId(i),
                boot: BootId(i * 7),
                addr: SocketAddr::from(([127, 0, 0, (i % 250) as u8], 7700)),
                incarnation: i,
                state: MemberState::Alive,
                key: Some(NodeKey([i as u8; 32])),
            })
            .collect();
        let frame = StreamFrame::PushPull(PushPull {
            reply: true,
            join: false,
            members,
            leader: None,
            ring: None,
            revoked: vec![NodeId(3)],
        });
        let bytes = encode_frame(&frame);
        assert_eq!(decode_frame(&bytes).unwrap(), frame);
        let me = MemberInfo {
            id: NodeId(9),
            boot: BootId(3),
            addr: SocketAddr::from(([127, 0, 0, 9], 7700)),
            incarnation: 4,
            state: MemberState::Alive,
            key: None,
        };
        for frame in [
            StreamFrame::Probe { seq: 77 },
            StreamFrame::ProbeAck { seq: 77, me },
        ] {
            assert_eq!(decode_frame(&encode_frame(&frame)).unwrap(), frame);
        }
    }
}
