//! Inbound: what comes from the network. A datagram is opened (see `wire.rs`), then routed: a
//! handshake to the key code (`keys.rs`), a flock message to the concern it belongs to. Stream
//! requests and replies (push-pull too large for a datagram, stream probes) come in here too.

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::flock::{
    decode_frame, decode_message, encode_frame, Header, MemberInfo, Message, StreamFrame, Update,
    HEADER_BYTES, MAX_STREAM_BYTES,
};
use tracing::{debug, trace};

use super::machine::Flock;
use super::wire::{Opened, ENVELOPE_OVERHEAD};
use super::{DropReason, Transmit, TransmitKind};
use crate::crypto::{KeyringOp, SecretKey};

impl Flock {
    /// A datagram from the network.
    pub fn handle_datagram(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.now = now;
        if bytes.len() > self.config.mtu {
            self.stats.drop(DropReason::Oversized);
            return;
        }
        let (header, body) = match self.open(from, bytes, false) {
            Ok(Opened::Flock(header, body)) => (header, body),
            Ok(Opened::Request {
                request,
                context,
                reply,
            }) => {
                self.on_handshake_request(now, from, request, context, reply);
                return;
            }
            Ok(Opened::Joined(joined)) => {
                self.on_joined(now, from, joined);
                return;
            }
            Ok(Opened::Handshake {
                to,
                payload,
                cookie_reply,
            }) => {
                self.send_handshake_datagram(to, payload, cookie_reply);
                return;
            }
            Err(reason) => {
                self.on_unopened(now, from, reason);
                return;
            }
        };
        if self.left {
            self.stats.drop(DropReason::Unexpected);
            return;
        }
        self.note_peer_epoch(from, &header);
        self.follow_newer_key(now, &header);
        let msg = match decode_message(&body) {
            Ok(m) => m,
            Err(e) => {
                trace!(%from, error = %e, "malformed datagram");
                self.stats.drop(DropReason::Malformed);
                return;
            }
        };
        self.wire.reply_cap = Some((from, bytes.len(), header.sender));
        self.wire.answering = self.keys.sec.is_some().then_some((from, header.key_id));
        self.on_message(now, from, header, msg);
        self.wire.reply_cap = None;
        self.wire.answering = None;
    }

    /// A handshake datagram the opening produced: a cookie reply to a joiner (we are under
    /// load), or our own request again, with the cookie a responder under load gave us.
    fn send_handshake_datagram(&mut self, to: SocketAddr, payload: Vec<u8>, cookie_reply: bool) {
        if cookie_reply {
            self.stats.cookies_sent += 1;
            self.stats.drop(DropReason::UnderLoad);
        } else {
            self.stats.cookies_received += 1;
            self.stats.handshakes_sent += 1;
        }
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += payload.len() as u64;
        self.out.transmits.push_back(Transmit {
            to,
            kind: TransmitKind::Datagram,
            payload,
        });
    }

    /// A datagram that did not open is dropped and counted. One from a member we cannot read
    /// makes us ask it for its keys.
    fn on_unopened(&mut self, now: Duration, from: SocketAddr, reason: DropReason) {
        let unreadable = matches!(
            reason,
            DropReason::UnknownKey | DropReason::AuthFailed | DropReason::StaleKey
        );
        if unreadable && self.members.id_at(&from).is_some() {
            // A member is alive but seals under keys we do not hold: we missed a
            // rotation, or it lives in another flock's keys (two flocks merging). A
            // handshake with it settles which keys both sides use.
            self.keys.hint = true;
            self.handshake_unreadable(now, from);
        }
        self.stats.drop(reason);
    }

    /// A stream request from a peer; returns the reply frame.
    pub fn handle_stream(
        &mut self,
        now: Duration,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<Vec<u8>> {
        self.now = now;
        let (header, frame) = self.open_stream(from, bytes)?;
        let sender = header.sender;
        if self.revoked.contains(&sender) {
            self.stats.drop(DropReason::Revoked);
            return None;
        }
        let answer = match frame {
            StreamFrame::PushPull(pp) => {
                let reply = !pp.reply;
                let ring_keys = self.ring_keys_for(pp.ring.as_ref());
                self.on_push_pull(now, sender, pp);
                reply.then(|| StreamFrame::PushPull(self.build_push_pull(true, false, ring_keys)))
            }
            StreamFrame::Probe { seq } => Some(StreamFrame::ProbeAck {
                seq,
                me: self.my_info(),
            }),
            StreamFrame::ProbeAck { .. } => {
                self.stats.drop(DropReason::Unexpected);
                return None;
            }
        };
        // Our reply carries our current entry: that answers any stale suspicion of us.
        self.detect.refute_pending = false;
        let frame = answer.filter(|_| !self.left)?;
        let body = encode_frame(&frame);
        // Answer under the key the request came in (the stream's source port is not the peer's
        // flock address, so look the sender up).
        let to = self.member(sender).map(|m| m.info.addr).unwrap_or(from);
        self.wire.answering = Some((to, header.key_id));
        let sealed = self.seal_for(to, Some(sender), &body);
        self.wire.answering = None;
        let sealed = sealed?;
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += sealed.len() as u64;
        Some(sealed)
    }

    /// The reply to a stream request this node made to `from`.
    pub fn handle_stream_reply(&mut self, now: Duration, from: SocketAddr, bytes: &[u8]) {
        self.now = now;
        let Some((header, frame)) = self.open_stream(from, bytes) else {
            return;
        };
        match frame {
            StreamFrame::PushPull(pp) => {
                self.detect.refute_pending = false;
                self.on_push_pull(now, header.sender, pp);
                self.answer_refutation(from);
            }
            StreamFrame::ProbeAck { seq, me } => {
                self.apply_sender(now, from, header, me);
                self.on_probe_ack(now, seq, header.sender);
            }
            StreamFrame::Probe { .. } => self.stats.drop(DropReason::Unexpected),
        }
    }

    /// A stream request to `to` failed (connect refused, timeout, reset).
    pub fn handle_stream_failed(&mut self, _now: Duration, to: SocketAddr) {
        debug!(%to, "stream failed");
    }

    /// Opens a stream frame (a request or a reply), counting it; None when it is dropped.
    pub(super) fn open_stream(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Option<(Header, StreamFrame)> {
        self.stats.streams_in += 1;
        self.stats.stream_bytes_in += bytes.len() as u64;
        if bytes.len() > MAX_STREAM_BYTES + HEADER_BYTES + ENVELOPE_OVERHEAD {
            self.stats.drop(DropReason::Oversized);
            return None;
        }
        let (header, body) = match self.open(from, bytes, true) {
            Ok(Opened::Flock(header, body)) => (header, body),
            Ok(_) => {
                self.stats.drop(DropReason::Malformed);
                return None;
            }
            Err(reason) => {
                self.stats.drop(reason);
                return None;
            }
        };
        if self.left {
            self.stats.drop(DropReason::Unexpected);
            return None;
        }
        match decode_frame(&body) {
            Ok(frame) => Some((header, frame)),
            Err(e) => {
                trace!(%from, error = %e, "malformed stream frame");
                self.stats.drop(DropReason::Malformed);
                None
            }
        }
    }

    /// An authenticated flock message: dispatched, then any refutation it called for is sent
    /// straight back to its source.
    pub(super) fn on_message(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        msg: Message,
    ) {
        if self.revoked.contains(&header.sender) {
            self.stats.drop(DropReason::Revoked);
            self.tell_revoked(now, from, header.sender);
            return;
        }
        self.detect.refute_pending = false;
        self.dispatch(now, from, header, msg);
        self.answer_refutation(from);
    }

    /// What a ping or an ack tells about its sender and the flock: the sender's own entry, the
    /// piggybacked updates, and its membership digest. Returns whether the sender was unknown.
    pub(super) fn take_peer_news(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        me: MemberInfo,
        digest: u64,
        updates: &[Update],
    ) -> bool {
        let unknown = !self.members.contains(me.id);
        self.apply_sender(now, from, header, me);
        self.apply_updates(now, updates);
        if !unknown && me.id == header.sender {
            self.compare_digest(now, from, digest);
        }
        unknown
    }

    /// Routes an authenticated flock message to the concern it belongs to.
    pub(super) fn dispatch(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        msg: Message,
    ) {
        let sender = header.sender;
        // A member we hold dead or left is talking to us: push-pull so both sides learn
        // (partition heal, false death).
        self.heal_if_dead(now, from, sender, header.boot);
        match msg {
            Message::Ping {
                seq,
                target: _,
                me,
                digest,
                updates,
            } => self.on_ping(now, from, header, seq, me, digest, &updates),
            Message::Ack {
                seq,
                me,
                digest,
                updates,
            } => self.on_ack(now, from, header, seq, me, digest, &updates),
            Message::PingReq {
                seq,
                target,
                target_addr,
                updates,
            } => self.on_ping_req(now, from, seq, target, target_addr, &updates),
            Message::IndirectPing {
                seq,
                target,
                updates,
            } => self.on_indirect_ping(now, from, seq, target, &updates),
            Message::Nack { seq } => self.on_nack(seq),
            Message::Gossip { updates } => self.apply_updates(now, &updates),
            Message::PushPull(pp) => self.on_push_pull_message(now, from, sender, pp),
        }
    }

    /// A ping: take the news it carries, and ack with ours.
    #[allow(clippy::too_many_arguments)]
    fn on_ping(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        seq: u32,
        me: MemberInfo,
        digest: u64,
        updates: &[Update],
    ) {
        let unknown = self.take_peer_news(now, from, header, me, digest, updates);
        if self.leaving {
            return;
        }
        let ack = Message::Ack {
            seq,
            me: self.my_info(),
            digest: self.digest(),
            updates: Vec::new(),
        };
        self.send_with_updates(from, ack);
        if unknown && self.members.contains(me.id) {
            trace!(peer = %me.id, "discovered by a ping");
        }
    }

    /// An ack: to a probe of ours, or to an indirect probe we relay (forwarded to its
    /// requester). An ack from a node we did not know starts a join (push-pull).
    #[allow(clippy::too_many_arguments)]
    fn on_ack(
        &mut self,
        now: Duration,
        from: SocketAddr,
        header: Header,
        seq: u32,
        me: MemberInfo,
        digest: u64,
        updates: &[Update],
    ) {
        let unknown = self.take_peer_news(now, from, header, me, digest, updates);
        if let Some(relay) = self.detect.relays.remove(&seq) {
            let fwd = Message::Ack {
                seq: relay.seq,
                me,
                digest,
                updates: Vec::new(),
            };
            self.send_with_updates(relay.requester, fwd);
        } else {
            self.on_probe_ack(now, seq, me.id);
        }
        if unknown && self.members.contains(me.id) && !self.leaving {
            // We found a node we did not know: join with it.
            self.start_push_pull(from, true);
        }
    }

    /// Applies piggybacked or gossiped updates, each by the concern it belongs to.
    pub(super) fn apply_updates(&mut self, now: Duration, updates: &[Update]) {
        for update in updates {
            match *update {
                Update::Alive { member } => self.apply_alive(now, member),
                Update::Suspect {
                    id,
                    boot,
                    incarnation,
                    from,
                } => self.apply_suspect(now, id, boot, incarnation, from),
                Update::Dead {
                    id,
                    boot,
                    incarnation,
                    from,
                } => self.apply_dead(now, id, boot, incarnation, from),
                Update::Left {
                    id,
                    boot,
                    incarnation,
                } => self.apply_left(now, id, boot, incarnation),
                Update::Leader(claim) => self.apply_claim(now, claim),
                Update::Revoke { id } => self.apply_revoke(now, id),
                Update::Key { leader, epoch, key } => self.apply_key(now, leader, epoch, key),
                Update::Keyring { op, key, version } => {
                    let key = SecretKey::from_bytes(key);
                    let op = match op {
                        0 => KeyringOp::Install(key),
                        1 => KeyringOp::Use(key),
                        2 => KeyringOp::Remove(key),
                        _ => continue,
                    };
                    self.keyring_op(op, false, version);
                }
            }
        }
    }
}
