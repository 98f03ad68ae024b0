//! The envelope seam: sealing what the state machine sends and opening what it receives (plain
//! headers with security off, [`Sec`](super::secure::Sec) with it on), the datagram budget, and
//! the rule that an answer to a possibly forged source is never larger than what came from it.

use std::net::SocketAddr;

use crux_proto::flock::{
    encode_frame, encode_message, message_len, DecodeError, Header, Kind, Message, NodeId,
    StreamFrame, HEADER_BYTES,
};
use tracing::trace;

use super::handshake::{encode_claim, Opened as SecOpened};
use super::machine::Flock;
use super::{DropReason, Transmit, TransmitKind};
use crate::crypto::Joined;

/// Bytes reserved in every datagram for the security envelope (nonce + tag).
pub(crate) const ENVELOPE_OVERHEAD: usize = 24 + 16;

/// What [`Flock::open`] found.
pub(super) enum Opened {
    Flock(Header, Vec<u8>),
    Request {
        request: Header,
        context: Vec<u8>,
        reply: Vec<u8>,
    },
    Joined(Joined),
    /// A handshake datagram to send to `to` (a cookie reply, or our request again with a cookie).
    Handshake {
        to: SocketAddr,
        payload: Vec<u8>,
        cookie_reply: bool,
    },
}

/// The envelope state.
pub(super) struct Wire {
    /// The bloc's tag, in every header.
    pub(super) bloc_tag: u32,
    /// The counter of the last datagram or frame sealed (per boot; replay windows key on it).
    pub(super) counter: u64,
    /// While a datagram is handled: its source, its length and its sender. An answer to a source
    /// that is not the sender's own address in the table (forged, or a node not in the table) is
    /// never larger than that datagram: it piggybacks only what fits, a push-pull answer that
    /// does not fit goes over a stream (TCP), anything else that does not fit is not sent. No
    /// amplification towards an address that may not have sent it (DESIGN.md "Node plane").
    pub(super) reply_cap: Option<(SocketAddr, usize, NodeId)>,
    /// While a datagram is handled: its source and the key epoch it came under. An answer to
    /// that source goes under the same key while we hold it, so that a member that missed a
    /// rotation (and a keyring change that would let it ask for the new key) still reads the
    /// answers — among them the push-pull that repairs its keyring.
    pub(super) answering: Option<(SocketAddr, u32)>,
}

impl Flock {
    /// Seals a body for the node at `to`; None when this node holds no key to seal with (it
    /// must join), or knows no node at `to`.
    pub(super) fn seal(&mut self, to: SocketAddr, body: &[u8]) -> Option<Vec<u8>> {
        self.seal_for(to, None, body)
    }

    /// Seals a body for node `recipient` (by default the node at `to`: the one last heard from
    /// there, or the member the table puts there) at `to`.
    pub(super) fn seal_for(
        &mut self,
        to: SocketAddr,
        recipient: Option<NodeId>,
        body: &[u8],
    ) -> Option<Vec<u8>> {
        self.wire.counter += 1;
        let mut out = Vec::with_capacity(HEADER_BYTES + ENVELOPE_OVERHEAD + body.len());
        let dest_epoch = self.keys.peer_epoch(to);
        let answer_epoch = self
            .wire
            .answering
            .filter(|(a, _)| *a == to)
            .map(|(_, e)| e);
        let Some(sec) = self.keys.sec.as_mut() else {
            let header = Header {
                kind: Kind::Flock,
                bloc_tag: self.wire.bloc_tag,
                key_id: 0,
                sender: self.me.id,
                boot: self.me.boot,
                counter: self.wire.counter,
            };
            header.write(&mut out);
            out.extend_from_slice(body);
            return Some(out);
        };
        let member = self
            .members
            .id_at(&to)
            .map(|id| (id, self.members.is_live(id)));
        let Some(recipient) = recipient.or_else(|| sec.recipient(to, member)) else {
            self.stats.unsealed += 1;
            return None;
        };
        if sec.seal(
            self.now,
            self.wire.counter,
            answer_epoch,
            dest_epoch,
            recipient,
            body,
            &mut self.rng,
            &mut out,
        ) {
            Some(out)
        } else {
            self.stats.unsealed += 1;
            None
        }
    }

    /// Opens a flock datagram or frame (plain mode: header checks only).
    pub(super) fn open(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        frame: bool,
    ) -> Result<Opened, DropReason> {
        if let Some(sec) = self.keys.sec.as_mut() {
            let mut out = Vec::new();
            if frame {
                let header = sec.open_frame(self.now, bytes, &mut out)?;
                return Ok(Opened::Flock(header, out));
            }
            let context = encode_claim(self.lead.claim.as_ref());
            return match sec.open_datagram(
                self.now,
                from,
                bytes,
                &mut self.wire.counter,
                &context,
                &mut self.rng,
                &mut out,
            )? {
                SecOpened::Flock(header) => Ok(Opened::Flock(header, out)),
                SecOpened::Request {
                    request,
                    context,
                    reply,
                } => Ok(Opened::Request {
                    request,
                    context,
                    reply,
                }),
                SecOpened::Joined(joined) => Ok(Opened::Joined(joined)),
                SecOpened::CookieReply { reply } => Ok(Opened::Handshake {
                    to: from,
                    payload: reply,
                    cookie_reply: true,
                }),
                SecOpened::Retry { to, request } => Ok(Opened::Handshake {
                    to,
                    payload: request,
                    cookie_reply: false,
                }),
            };
        }
        let (header, rest) = Header::parse(bytes).map_err(|e| match e {
            DecodeError::Truncated => DropReason::Truncated,
            _ => DropReason::BadMagic,
        })?;
        if header.bloc_tag != self.wire.bloc_tag {
            return Err(DropReason::WrongBloc);
        }
        if header.sender == self.me.id {
            return Err(DropReason::FromSelf);
        }
        if header.kind != Kind::Flock {
            return Err(DropReason::Unexpected);
        }
        Ok(Opened::Flock(header, rest.to_vec()))
    }

    /// Room for the body of one datagram.
    pub(super) fn body_budget(&self) -> usize {
        self.config.mtu - HEADER_BYTES - ENVELOPE_OVERHEAD
    }

    /// The body size of the datagram being handled, if it came from `to` and `to` is not its
    /// sender's address in the table: an answer piggybacks no more than fits in that size.
    pub(super) fn reply_body_cap(&self, to: SocketAddr) -> Option<usize> {
        let (from, len, sender) = self.wire.reply_cap?;
        if from != to || self.members.addr(sender) == Some(from) {
            return None;
        }
        Some(len.saturating_sub(HEADER_BYTES + ENVELOPE_OVERHEAD))
    }

    /// Room for the body of a datagram to `to`.
    pub(super) fn room_for(&self, to: SocketAddr) -> usize {
        let budget = self.body_budget();
        self.reply_body_cap(to)
            .map_or(budget, |cap| cap.min(budget))
    }

    pub(super) fn send(&mut self, to: SocketAddr, msg: &Message) {
        let mut body = Vec::with_capacity(256);
        encode_message(msg, &mut body);
        debug_assert!(
            body.len() <= self.body_budget(),
            "datagram over MTU: {msg:?}"
        );
        if self.reply_body_cap(to).is_some_and(|cap| body.len() > cap) {
            trace!(%to, len = body.len(), "answer to a foreign source larger than its request");
            return;
        }
        let Some(payload) = self.seal(to, &body) else {
            return;
        };
        self.stats.datagrams_out += 1;
        self.stats.bytes_out += payload.len() as u64;
        self.out.transmits.push_back(Transmit {
            to,
            kind: TransmitKind::Datagram,
            payload,
        });
    }

    /// Fills `msg`'s update list with as many queued updates as fit (see
    /// [`Flock::reply_body_cap`]), then sends it.
    pub(super) fn send_with_updates(&mut self, to: SocketAddr, mut msg: Message) {
        let fixed = message_len(&msg);
        // 3 bytes: room for the update count's varint to grow.
        let budget = self.room_for(to).saturating_sub(fixed + 3);
        let limit = self.retransmit_limit();
        let taken = self.spread.broadcasts.take(budget, limit);
        match &mut msg {
            Message::Ping { updates, .. }
            | Message::Ack { updates, .. }
            | Message::PingReq { updates, .. }
            | Message::IndirectPing { updates, .. }
            | Message::Gossip { updates } => *updates = taken,
            Message::Nack { .. } | Message::PushPull(_) => {}
        }
        self.send(to, &msg);
    }

    /// Opens a stream to `addr` with `frame` as its request.
    pub(super) fn send_frame(&mut self, addr: SocketAddr, frame: &StreamFrame) {
        let body = encode_frame(frame);
        let Some(payload) = self.seal(addr, &body) else {
            return;
        };
        self.stats.streams_out += 1;
        self.stats.stream_bytes_out += payload.len() as u64;
        self.out.transmits.push_back(Transmit {
            to: addr,
            kind: TransmitKind::Stream,
            payload,
        });
    }
}
