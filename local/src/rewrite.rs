//! The sans-io core: client-to-server HTTP/2 bytes in, the same bytes out, except that every
//! header block is decoded and re-encoded with a valid `:authority`.
//!
//! ```text
//!   client bytes ──▶ preface? ──no──▶ passed through as they are (h2 refuses them)
//!                       │yes
//!                       ▼
//!                 frame headers ──HEADERS/CONTINUATION──▶ block buffer ──END_HEADERS──▶
//!                       │other frames                      decode (client's table) ──▶
//!                       ▼                                  fix :authority ──▶ re-encode
//!                 passed through, streamed                 (no table) ──▶ HEADERS + CONTINUATION
//! ```

use crate::hpack::{Decoder, Encoder, Field, HpackError};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What `:authority` becomes when `h2` would refuse it: what Go and Node clients send on a
/// Unix socket.
pub const LOCALHOST: &[u8] = b"localhost";

/// The largest frame payload the server accepts: `h2`'s `SETTINGS_MAX_FRAME_SIZE`, left at
/// HTTP/2's initial value (RFC 9113 §6.5.2), which is also the largest frame the rewriter
/// writes.
pub const FRAME_MAX: usize = 16_384;

/// The header list size the server accepts (`SETTINGS_MAX_HEADER_LIST_SIZE`, hyper's default,
/// which `crate::serve_options` sets explicitly). A block decoding to more is handed on cut
/// just past this size, so `h2` refuses that one stream (HTTP 431) and the connection lives.
pub const HEADER_LIST_MAX: usize = 16 * 1024;

/// The most streams one connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`,
/// which the agent sets; tonic's default is no limit). A service holds one heartbeat stream per
/// registration and a watch or two; a client opening more is refused the excess streams
/// (REFUSED_STREAM) by `h2`.
pub const STREAMS_MAX: u32 = 1024;

/// The most header-block bytes (one HEADERS and its CONTINUATIONs) buffered before decoding.
/// A client sending more loses its connection, as with `h2` itself, which ends a connection
/// whose over-size block keeps coming.
pub const BLOCK_BYTES_MAX: usize = 64 * 1024;

/// The most client-open streams tracked per connection (past [`STREAMS_MAX`], `h2` refuses
/// them anyway).
pub const OPEN_TRACKED_MAX: usize = 2 * STREAMS_MAX as usize;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why the rewriter gave up on a connection. All come from the client's bytes; the connection
/// is then closed (the rewriter keeps no state worth saving).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// A header block does not decode (RFC 9113 COMPRESSION_ERROR).
    #[error("header block: {0}")]
    Hpack(#[from] HpackError),
    /// A header block larger than [`BLOCK_BYTES_MAX`].
    #[error("header block over {BLOCK_BYTES_MAX} bytes")]
    BlockTooLarge,
    /// Framing that RFC 9113 makes a connection error: a HEADERS or CONTINUATION frame over
    /// [`FRAME_MAX`], on stream 0, with bad padding, or a CONTINUATION that does not continue
    /// the open block, or another frame inside a block.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// What the rewriter did, for counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Header blocks re-encoded.
    pub blocks: u64,
    /// Blocks whose `:authority` was replaced by `localhost`.
    pub authority_fixed: u64,
    /// Blocks over [`HEADER_LIST_MAX`] handed on cut (h2 refuses the stream).
    pub over_limit: u64,
    /// The connection did not start with the HTTP/2 preface (passed through: h2 closes it).
    pub not_http2: bool,
}

#[derive(Debug)]
enum Mode {
    /// Matching the preface; this many bytes matched so far.
    Preface(usize),
    /// Between frames, or inside one.
    Frames,
    /// Not HTTP/2 with prior knowledge: every byte passes as it is.
    Passthrough,
}

#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    bytes: Vec<u8>,
}

/// One connection's client-to-server rewriter.
#[derive(Debug)]
pub struct Rewriter {
    mode: Mode,
    /// Bytes of a frame header, or of a HEADERS/CONTINUATION payload, not yet complete.
    pending: Vec<u8>,
    /// Payload bytes of a passed-through frame still to come.
    passing: usize,
    /// The header frame being collected: (type, flags, stream, payload length).
    frame: Option<(u8, u8, u32, usize)>,
    block: Option<Block>,
    decoder: Decoder,
    /// Streams the client opened and has not ended (END_STREAM) or reset, at most
    /// [`OPEN_TRACKED_MAX`]: how [`Rewriter::open_streams`] tells a client that vanished
    /// mid-stream.
    open: std::collections::BTreeSet<u32>,
    /// Counts since creation.
    pub seen: Seen,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter::new()
    }
}

impl Rewriter {
    /// A rewriter for a new connection.
    pub fn new() -> Rewriter {
        Rewriter {
            mode: Mode::Preface(0),
            pending: Vec::new(),
            passing: 0,
            frame: None,
            block: None,
            decoder: Decoder::default(),
            open: std::collections::BTreeSet::new(),
            seen: Seen::default(),
        }
    }

    /// Streams the client opened and has neither ended nor reset (up to [`OPEN_TRACKED_MAX`]).
    /// Non-zero when the client's bytes stop: it vanished mid-stream.
    pub fn open_streams(&self) -> usize {
        self.open.len()
    }

    /// How many of the next client bytes pass unchanged whatever they are: the rest of a
    /// passed-through frame's payload, or everything on a connection that is not HTTP/2. A
    /// reader may hand them on directly and tell [`Rewriter::skip`].
    pub fn direct(&self) -> usize {
        match self.mode {
            Mode::Passthrough => usize::MAX,
            Mode::Frames => self.passing,
            Mode::Preface(_) => 0,
        }
    }

    /// Records that `n` (at most [`Rewriter::direct`]) bytes were handed on directly.
    pub fn skip(&mut self, n: usize) {
        debug_assert!(n <= self.direct());
        if let Mode::Frames = self.mode {
            self.passing -= n.min(self.passing);
        }
    }

    /// Feeds client bytes; appends what the server should read to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        while !input.is_empty() {
            match self.mode {
                Mode::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                Mode::Preface(matched) => {
                    let n = (PREFACE.len() - matched).min(input.len());
                    if input[..n] != PREFACE[matched..matched + n] {
                        self.mode = Mode::Passthrough;
                        self.seen.not_http2 = true;
                        out.extend_from_slice(&PREFACE[..matched]);
                        continue;
                    }
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    self.mode = if matched + n == PREFACE.len() {
                        Mode::Frames
                    } else {
                        Mode::Preface(matched + n)
                    };
                }
                Mode::Frames => input = self.frames(input, out)?,
            }
        }
        Ok(())
    }

    fn frames<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> Result<&'a [u8], RewriteError> {
        if self.passing > 0 {
            let n = self.passing.min(input.len());
            out.extend_from_slice(&input[..n]);
            self.passing -= n;
            return Ok(&input[n..]);
        }
        if let Some((kind, flags, stream, len)) = self.frame {
            let n = (len - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..n]);
            if self.pending.len() == len {
                let payload = std::mem::take(&mut self.pending);
                self.frame = None;
                self.header_frame(kind, flags, stream, &payload, out)?;
            }
            return Ok(&input[n..]);
        }
        let n = (9 - self.pending.len()).min(input.len());
        self.pending.extend_from_slice(&input[..n]);
        if self.pending.len() < 9 {
            return Ok(&input[n..]);
        }
        let h = std::mem::take(&mut self.pending);
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if kind == HEADERS || kind == CONTINUATION {
            if len > FRAME_MAX {
                return Err(RewriteError::Protocol("header frame over the frame size"));
            }
            if stream == 0 {
                return Err(RewriteError::Protocol("header frame on stream 0"));
            }
            if len == 0 {
                self.header_frame(kind, flags, stream, &[], out)?;
            } else {
                self.frame = Some((kind, flags, stream, len));
            }
        } else {
            if self.block.is_some() {
                return Err(RewriteError::Protocol("frame inside a header block"));
            }
            let ends = (kind == DATA && flags & END_STREAM != 0) || kind == RST_STREAM;
            if ends {
                self.open.remove(&stream);
            }
            out.extend_from_slice(&h);
            self.passing = len;
        }
        Ok(&input[n..])
    }

    fn header_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RewriteError> {
        let fragment = if kind == HEADERS {
            if self.block.is_some() {
                return Err(RewriteError::Protocol("HEADERS inside a header block"));
            }
            let mut p = payload;
            let mut pad = 0;
            if flags & PADDED != 0 {
                pad = *p.first().ok_or(RewriteError::Protocol("bad padding"))? as usize;
                p = &p[1..];
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let pr: [u8; 5] = p
                    .get(..5)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(RewriteError::Protocol("short priority"))?;
                priority = Some(pr);
                p = &p[5..];
            }
            if pad > p.len() {
                return Err(RewriteError::Protocol("bad padding"));
            }
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                bytes: Vec::new(),
            });
            &p[..p.len() - pad]
        } else {
            match &self.block {
                Some(b) if b.stream == stream => {}
                _ => return Err(RewriteError::Protocol("CONTINUATION without its HEADERS")),
            }
            payload
        };
        let Some(block) = self.block.as_mut() else {
            return Err(RewriteError::Protocol("no header block"));
        };
        if block.bytes.len() + fragment.len() > BLOCK_BYTES_MAX {
            return Err(RewriteError::BlockTooLarge);
        }
        block.bytes.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.finish(block, out)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if block.end_stream {
            self.open.remove(&block.stream);
        } else if self.open.len() < OPEN_TRACKED_MAX {
            self.open.insert(block.stream);
        }
        let mut decoded = self.decoder.decode(&block.bytes, HEADER_LIST_MAX)?;
        self.seen.blocks += 1;
        if decoded.over_limit {
            self.seen.over_limit += 1;
        }
        for f in decoded.fields.iter_mut() {
            if f.name == b":authority" && !valid_authority(&f.value) {
                f.value = LOCALHOST.to_vec();
                self.seen.authority_fixed += 1;
            }
        }
        let mut encoded = Vec::with_capacity(block.bytes.len() + 64);
        Encoder::plain().encode(&decoded.fields, &mut encoded);
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// Whether `h2` takes `value` as an authority: the same parser it uses.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Writes a header block as one HEADERS frame and as many CONTINUATIONs as it needs.
fn write_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let first_room = FRAME_MAX - if block.priority.is_some() { 5 } else { 0 };
    let first = encoded.len().min(first_room);
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if first == encoded.len() {
        flags |= END_HEADERS;
    }
    let len = first + if block.priority.is_some() { 5 } else { 0 };
    frame_header(len, HEADERS, flags, block.stream, out);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(&encoded[..first]);
    let mut rest = &encoded[first..];
    while !rest.is_empty() {
        let n = rest.len().min(FRAME_MAX);
        let flags = if n == rest.len() { END_HEADERS } else { 0 };
        frame_header(n, CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// Writes a frame header (RFC 9113 §4.1).
pub fn frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Encodes `fields` as one client header block on `stream`, in frames of at most
/// [`FRAME_MAX`], with `encoder` (for tests and tools that speak raw HTTP/2).
pub fn header_frames(
    encoder: &mut Encoder,
    stream: u32,
    fields: &[Field],
    end_stream: bool,
    out: &mut Vec<u8>,
) {
    let mut encoded = Vec::new();
    encoder.encode(fields, &mut encoded);
    let block = Block {
        stream,
        end_stream,
        priority: None,
        bytes: Vec::new(),
    };
    write_block(&block, &encoded, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpack::Decoder;

    fn request(authority: &[u8]) -> Vec<Field> {
        vec![
            Field::new(":method", "POST"),
            Field::new(":scheme", "http"),
            Field::new(":path", "/crux.reeve.v1.Reeve/Status"),
            Field::new(":authority", authority),
            Field::new("content-type", "application/grpc"),
            Field::new("te", "trailers"),
        ]
    }

    /// Splits `out` into frames: (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    fn authority_of(out: &[u8], d: &mut Decoder) -> Vec<Vec<u8>> {
        let mut block = Vec::new();
        let mut found = Vec::new();
        for (kind, flags, _, payload) in frames(out) {
            if kind == HEADERS || kind == CONTINUATION {
                block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    let fields = d.decode(&block, usize::MAX).unwrap().fields;
                    block.clear();
                    found.extend(
                        fields
                            .into_iter()
                            .filter(|f| f.name == b":authority")
                            .map(|f| f.value),
                    );
                }
            }
        }
        found
    }

    /// The forms clients send on a Unix socket (grpc/grpc issue 38142, grpc-java issue 12664):
    /// those h2 refuses become `localhost`, the valid ones stay, over a C-core-like encoder that
    /// indexes the authority once and refers to it after.
    #[test]
    fn each_authority_form_reaches_h2_valid() {
        let forms: [(&[u8], &[u8]); 5] = [
            (b"localhost", b"localhost"),
            (b"", b"localhost"),
            (b"/run/crux/reeve.sock", b"localhost"),
            (b"%2Frun%2Fcrux%2Freeve.sock", b"localhost"),
            (b"127.0.0.1:7701", b"127.0.0.1:7701"),
        ];
        for (sent, want) in forms {
            let mut enc = Encoder::indexing();
            let mut input = PREFACE.to_vec();
            frame_header(0, 0x4, 0, 0, &mut input); // SETTINGS
            for stream in [1, 3, 5] {
                header_frames(&mut enc, stream, &request(sent), false, &mut input);
                frame_header(5, 0x0, END_STREAM, stream, &mut input);
                input.extend_from_slice(&[0, 0, 0, 0, 0]);
            }
            // Byte by byte and all at once give the same.
            for chunk in [1, input.len()] {
                let mut r = Rewriter::new();
                let mut out = Vec::new();
                for c in input.chunks(chunk) {
                    r.push(c, &mut out).unwrap();
                }
                assert!(out.starts_with(PREFACE));
                let got = authority_of(&out[PREFACE.len()..], &mut Decoder::default());
                assert_eq!(
                    got,
                    vec![want.to_vec(); 3],
                    "sent {:?}",
                    String::from_utf8_lossy(sent)
                );
                assert_eq!(r.seen.blocks, 3);
                assert_eq!(r.seen.authority_fixed, if sent == want { 0 } else { 3 });
                let data: Vec<_> = frames(&out[PREFACE.len()..])
                    .into_iter()
                    .filter(|f| f.0 == 0)
                    .collect();
                assert_eq!(data.len(), 3, "DATA frames pass unchanged");
            }
        }
    }

    /// A unary call ends its half; a heartbeat-like stream left open is counted until reset.
    #[test]
    fn open_streams_are_those_the_client_has_not_ended() {
        let mut enc = Encoder::indexing();
        let mut input = PREFACE.to_vec();
        header_frames(&mut enc, 1, &request(b"localhost"), false, &mut input);
        frame_header(5, DATA, END_STREAM, 1, &mut input);
        input.extend_from_slice(&[0; 5]);
        header_frames(&mut enc, 3, &request(b"localhost"), false, &mut input);
        frame_header(5, DATA, 0, 3, &mut input);
        input.extend_from_slice(&[0; 5]);
        header_frames(&mut enc, 5, &request(b"localhost"), true, &mut input);
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.push(&input, &mut out).unwrap();
        assert_eq!(r.open_streams(), 1, "stream 3 is open");
        let mut rst = Vec::new();
        frame_header(4, RST_STREAM, 0, 3, &mut rst);
        rst.extend_from_slice(&[0, 0, 0, 8]);
        r.push(&rst, &mut out).unwrap();
        assert_eq!(r.open_streams(), 0);
    }

    #[test]
    fn http1_passes_through_untouched() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        for c in req.chunks(3) {
            r.push(c, &mut out).unwrap();
        }
        assert_eq!(out, req);
        assert!(r.seen.not_http2);
    }

    #[test]
    fn big_block_goes_out_in_continuations_and_cut_past_the_limit() {
        let mut fields = request(b"/x.sock");
        for i in 0..20 {
            fields.push(Field::new(format!("x-m{i}"), "v".repeat(3000)));
        }
        let mut input = PREFACE.to_vec();
        header_frames(&mut Encoder::plain(), 1, &fields, true, &mut input);
        let mut r = Rewriter::new();
        let mut out = Vec::new();
        r.push(&input, &mut out).unwrap();
        assert_eq!(r.seen.over_limit, 1);
        let fr = frames(&out[PREFACE.len()..]);
        assert!(fr.len() >= 2, "HEADERS then CONTINUATION");
        assert_eq!(fr[0].0, HEADERS);
        assert_eq!(fr[0].1 & END_STREAM, END_STREAM);
        assert!(fr.iter().all(|f| f.3.len() <= FRAME_MAX));
        let block: Vec<u8> = fr.iter().flat_map(|f| f.3.clone()).collect();
        let d = Decoder::default().decode(&block, usize::MAX).unwrap();
        let size: usize = d
            .fields
            .iter()
            .map(|f| f.name.len() + f.value.len() + 32)
            .sum();
        assert!(
            size > HEADER_LIST_MAX && size < HEADER_LIST_MAX + 3100,
            "{size}"
        );
    }

    #[test]
    fn framing_errors_end_the_connection() {
        let mut input = PREFACE.to_vec();
        frame_header(3, CONTINUATION, END_HEADERS, 1, &mut input);
        input.extend_from_slice(&[0x82, 0x86, 0x84]);
        let mut out = Vec::new();
        assert!(matches!(
            Rewriter::new().push(&input, &mut out),
            Err(RewriteError::Protocol(_))
        ));

        let mut input = PREFACE.to_vec();
        frame_header(FRAME_MAX + 1, HEADERS, END_HEADERS, 1, &mut input);
        assert!(Rewriter::new().push(&input, &mut out).is_err());

        // A block that never ends, in many CONTINUATIONs.
        let mut input = PREFACE.to_vec();
        frame_header(1, HEADERS, 0, 1, &mut input);
        input.push(0x82);
        let mut r = Rewriter::new();
        r.push(&input, &mut out).unwrap();
        let mut err = None;
        for _ in 0..10 {
            let mut c = Vec::new();
            frame_header(FRAME_MAX, CONTINUATION, 0, 1, &mut c);
            c.resize(9 + FRAME_MAX, 0x82);
            if let Err(e) = r.push(&c, &mut out) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(RewriteError::BlockTooLarge));
    }

    proptest::proptest! {
        /// Any bytes after the preface: an error or output, never a panic, and output never holds
        /// more than was put in plus the re-encoding's growth.
        #[test]
        fn arbitrary_frames_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
                                        chunk in 1usize..64) {
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&body);
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for c in input.chunks(chunk) {
                if r.push(c, &mut out).is_err() { break; }
            }
        }
    }
}
