//! Forwarding of names outside the domain to upstream resolvers (`dns.forward`), so that one
//! resolver address serves both the flock's names and everything else (as Consul's
//! `recursors`).
//!
//! The query is sent as it came (its id kept) to the upstreams in order, each tried once within
//! the timeout, over the transport the client used: a UDP query over a UDP socket of its own,
//! connected to the upstream (only that address's datagrams are read) and a reply taken only if
//! its id and question match; a TCP query over a TCP connection. The reply is relayed as it is,
//! except that a UDP reply larger than the client's answer limit (the same no-amplification
//! limit as local answers) is replaced by the header and question with TC set, so the client
//! asks again over TCP. When no upstream answers, the client gets SERVFAIL. Forwards in flight
//! are bounded ([`FORWARDS_MAX`]); past it a query is dropped and counted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// Forwarded queries in flight at once, over both transports.
pub const FORWARDS_MAX: usize = 256;

/// The upstreams and how long each is given.
#[derive(Clone, Debug)]
pub struct Forwarder {
    /// Upstream resolvers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream is given to answer.
    pub timeout: Duration,
}

/// The largest DNS message over UDP we read from an upstream.
const UDP_REPLY_MAX: usize = 65_535;

impl Forwarder {
    /// The upstream's reply to `query` (a whole DNS message), over UDP; None when no upstream
    /// answered in time.
    pub async fn udp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for up in &self.upstreams {
            match tokio::time::timeout(self.timeout, udp_once(*up, query)).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => debug!(upstream = %up, error = %e, "dns: forward failed"),
                Err(_) => debug!(upstream = %up, "dns: forward timed out"),
            }
        }
        None
    }

    /// The same over TCP.
    pub async fn tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for up in &self.upstreams {
            match tokio::time::timeout(self.timeout, tcp_once(*up, query)).await {
                Ok(Ok(reply)) => return Some(reply),
                Ok(Err(e)) => debug!(upstream = %up, error = %e, "dns: forward failed"),
                Err(_) => debug!(upstream = %up, "dns: forward timed out"),
            }
        }
        None
    }
}

fn io_err(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

async fn udp_once(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let any: SocketAddr = if up.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; UDP_REPLY_MAX];
    loop {
        let n = sock.recv(&mut buf).await?;
        if answers(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_once(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(query.len()).map_err(|_| io_err("query too long"))?;
    let mut s = TcpStream::connect(up).await?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(query).await?;
    let n = usize::from(s.read_u16().await?);
    let mut reply = vec![0u8; n];
    s.read_exact(&mut reply).await?;
    if answers(query, &reply) {
        Ok(reply)
    } else {
        Err(io_err("the reply does not answer the query"))
    }
}

/// The length of the header and the first question of `msg`, if it has them.
fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.len() < 12 || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let mut at = 12;
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => {
                at += 1;
                break;
            }
            l if l & 0xC0 == 0xC0 => {
                at += 2;
                break;
            }
            l if l & 0xC0 == 0 => at += 1 + usize::from(l),
            _ => return None,
        }
    }
    let end = at + 4;
    (end <= msg.len()).then_some(end)
}

/// Whether `reply` is a response to `query`: same id, QR set, the same question.
pub fn answers(query: &[u8], reply: &[u8]) -> bool {
    let (Some(q), Some(r)) = (question_end(query), question_end(reply)) else {
        return false;
    };
    query[..2] == reply[..2]
        && reply[2] & 0x80 != 0
        && query[12..q].eq_ignore_ascii_case(&reply[12..r])
}

/// A reply made of `query`'s header and question only: QR set, `rcode`, TC when `truncated`,
/// RA copied from `ra_from` (the upstream's reply, when there is one). None when `query` has no
/// question.
pub fn minimal_reply(
    query: &[u8],
    rcode: u8,
    truncated: bool,
    ra_from: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let end = question_end(query)?;
    let mut r = query[..end].to_vec();
    // Flags: QR, the query's opcode and RD, TC when cut; RA as upstream said; the rcode.
    r[2] = 0x80 | (query[2] & 0x79) | if truncated { 0x02 } else { 0 };
    let ra = ra_from.and_then(|u| u.get(3)).map_or(0, |f| f & 0x80);
    r[3] = ra | (rcode & 0x0F);
    // One question, nothing else.
    r[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    Some(r)
}

/// What a UDP client gets for a forwarded `query` within `limit` bytes: the upstream's
/// `reply`, or header and question with TC when it is larger, or SERVFAIL when none came.
pub fn udp_answer(query: &[u8], reply: Option<&[u8]>, limit: usize) -> Option<Vec<u8>> {
    match reply {
        Some(r) if r.len() <= limit => Some(r.to_vec()),
        Some(r) => minimal_reply(query, r[3] & 0x0F, true, Some(r)),
        None => minimal_reply(query, 2, false, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `example.org A`, id 0xBEEF, RD set, with an EDNS OPT record.
    fn query() -> Vec<u8> {
        let mut q = vec![0xBE, 0xEF, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        q.extend_from_slice(b"\x07example\x03org\x00\x00\x01\x00\x01");
        q.extend_from_slice(&[0, 0, 41, 4, 0xD0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn a_minimal_reply_is_the_header_and_question_only() {
        let q = query();
        let r = minimal_reply(&q, 2, false, None).unwrap();
        assert_eq!(r.len(), 12 + 13 + 4, "no OPT record carried over");
        assert_eq!(&r[..2], &[0xBE, 0xEF]);
        assert_eq!(r[2], 0x81, "QR and RD");
        assert_eq!(r[3], 0x02, "SERVFAIL");
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert!(answers(&q, &r));
        assert!(r.len() <= q.len(), "never larger than the query");
    }

    #[test]
    fn a_large_upstream_reply_becomes_tc_within_the_limit() {
        let q = query();
        let mut up = minimal_reply(&q, 0, false, None).unwrap();
        up[3] |= 0x80; // RA
        up.extend(std::iter::repeat_n(0u8, 1000)); // records, as far as the size goes
        let out = udp_answer(&q, Some(&up), 200).unwrap();
        assert!(out.len() <= 200);
        assert_eq!(out[2] & 0x02, 0x02, "TC");
        assert_eq!(out[3], 0x80, "RA kept, NOERROR");
        // Small enough: relayed as it is.
        let small = minimal_reply(&q, 3, false, None).unwrap();
        assert_eq!(udp_answer(&q, Some(&small), 200).unwrap(), small);
        // None came: SERVFAIL.
        assert_eq!(udp_answer(&q, None, 200).unwrap()[3] & 0x0F, 2);
    }

    #[test]
    fn a_reply_to_another_query_is_not_taken() {
        let q = query();
        let mut other_id = minimal_reply(&q, 0, false, None).unwrap();
        other_id[1] ^= 1;
        assert!(!answers(&q, &other_id));
        let mut other_name = minimal_reply(&q, 0, false, None).unwrap();
        other_name[13] = b'f';
        assert!(!answers(&q, &other_name));
        let not_response = q.clone();
        assert!(!answers(&q, &not_response), "QR not set");
        assert!(!answers(&q, &[0xBE, 0xEF]));
        assert!(question_end(&[0; 12]).is_none(), "no question");
        // A label length running past the end, or a reserved label type: no question.
        assert!(question_end(b"\0\0\0\0\0\x01\0\0\0\0\0\0\x3f").is_none());
        assert!(question_end(b"\0\0\0\0\0\x01\0\0\0\0\0\0\x80\0\0\0\0").is_none());
    }
}
