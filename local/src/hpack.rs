//! HPACK (RFC 7541): a decoder that keeps the client's dynamic table, and a small encoder.
//!
//! The decoder is what [`crate::Rewriter`] runs on every header block a client sends: it must
//! track the client's dynamic table exactly, block after block, or every later block would
//! decode wrong. The encoder writes what the rewriter hands on to `h2`: each field a literal
//! *without indexing* (never-indexed fields stay never-indexed), so `h2`'s own table is never
//! used and cannot drift from ours. [`Encoder`] can also index and Huffman-code, as gRPC's C
//! core does, for tests.
//!
//! Everything here is a pure function over buffers; malformed input is an [`HpackError`],
//! never a panic.

use std::collections::VecDeque;
use std::sync::OnceLock;

use crate::huffman_table::{CODES, LENGTHS};

/// The dynamic table size a client may use: HTTP/2's initial `SETTINGS_HEADER_TABLE_SIZE`
/// (RFC 9113 §6.5.2), which the server (h2 with its defaults) never changes.
pub const TABLE_SIZE_MAX: usize = 4096;

/// Overhead counted per entry in table and header-list sizes (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// One header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Name, lower case for HTTP/2 (not checked here: `h2` checks).
    pub name: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Sent as "never indexed" (RFC 7541 §6.2.3); kept so when re-encoded.
    pub sensitive: bool,
}

impl Field {
    /// A field that is not sensitive.
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Field {
        Field {
            name: name.into(),
            value: value.into(),
            sensitive: false,
        }
    }

    fn size(&self) -> usize {
        self.name.len() + self.value.len() + ENTRY_OVERHEAD
    }
}

/// Why a header block does not decode. Every variant comes from the network (a client's bytes);
/// the decoder's table may have changed, and the connection must end (RFC 9113 §4.3: a
/// decoding error is a connection error of type COMPRESSION_ERROR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer does not fit in 28 bits.
    #[error("integer overflow")]
    IntegerOverflow,
    /// An index is 0 or past the end of the tables.
    #[error("index {0} out of range")]
    BadIndex(usize),
    /// Bad Huffman data: the end-of-string symbol, or padding longer than 7 bits or not all ones.
    #[error("bad huffman code")]
    BadHuffman,
    /// A table size update above the size the server allows, or after a field.
    #[error("bad dynamic table size update")]
    BadSizeUpdate,
}

/// The static table (RFC 7541, Appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// What decoding a block gave.
#[derive(Debug, Default)]
pub struct Decoded {
    /// The fields, in order, up to the list limit.
    pub fields: Vec<Field>,
    /// The header list was larger than the limit: `fields` holds only its first fields (at least
    /// the limit's worth), the rest were decoded (the table is in step) and dropped.
    pub over_limit: bool,
}

/// The decoding side of one connection: the client's dynamic table.
#[derive(Debug)]
pub struct Decoder {
    table: VecDeque<Field>,
    size: usize,
    size_max: usize,
    size_limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(TABLE_SIZE_MAX)
    }
}

impl Decoder {
    /// A decoder whose peer may use a table of up to `size_limit` bytes (the server's
    /// `SETTINGS_HEADER_TABLE_SIZE`).
    pub fn new(size_limit: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            size_max: size_limit,
            size_limit,
        }
    }

    /// Decodes one whole header block. Fields beyond `list_max` bytes of header list (RFC 9113
    /// §6.5.2 sizes) are decoded and dropped, and [`Decoded::over_limit`] says so.
    pub fn decode(&mut self, block: &[u8], list_max: usize) -> Result<Decoded, HpackError> {
        let mut out = Decoded::default();
        let mut list = 0usize;
        let mut pos = 0;
        let mut fields_seen = false;
        while pos < block.len() {
            let b = block[pos];
            let field = if b & 0x80 != 0 {
                let i = int(block, &mut pos, 7)?;
                self.get(i)?
            } else if b & 0xc0 == 0x40 {
                let f = self.literal(block, &mut pos, 6, false)?;
                self.insert(f.clone());
                f
            } else if b & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(HpackError::BadSizeUpdate);
                }
                let size = int(block, &mut pos, 5)?;
                if size > self.size_limit {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.size_max = size;
                self.evict(0);
                continue;
            } else {
                // 0001xxxx never indexed, 0000xxxx without indexing.
                let sensitive = b & 0x10 != 0;
                self.literal(block, &mut pos, 4, sensitive)?
            };
            fields_seen = true;
            list = list.saturating_add(field.size());
            if list > list_max {
                if !out.over_limit {
                    // Keep this one: what is handed on must still be over the limit.
                    out.fields.push(field);
                }
                out.over_limit = true;
            } else {
                out.fields.push(field);
            }
        }
        Ok(out)
    }

    fn get(&self, index: usize) -> Result<Field, HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Ok(Field::new(n.as_bytes(), v.as_bytes()));
        }
        self.table
            .get(index - 1 - STATIC.len())
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn literal(
        &self,
        block: &[u8],
        pos: &mut usize,
        prefix: u8,
        sensitive: bool,
    ) -> Result<Field, HpackError> {
        let index = int(block, pos, prefix)?;
        let name = if index == 0 {
            string(block, pos)?
        } else {
            self.get(index)?.name
        };
        let value = string(block, pos)?;
        Ok(Field {
            name,
            value,
            sensitive,
        })
    }

    fn insert(&mut self, mut field: Field) {
        field.sensitive = false;
        let size = field.size();
        if size > self.size_max {
            // RFC 7541 §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front(field);
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.size_max {
            match self.table.pop_back() {
                Some(f) => self.size -= f.size(),
                None => break,
            }
        }
    }
}

/// Reads an integer with an N-bit prefix (RFC 7541 §5.1).
fn int(buf: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let mask = (1u8 << prefix) - 1;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(first as usize);
    }
    let mut value = mask as usize;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Reads a string literal (RFC 7541 §5.2).
fn string(buf: &[u8], pos: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = int(buf, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    let raw = buf.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        huffman_decode(raw)
    } else {
        Ok(raw.to_vec())
    }
}

/// The Huffman code as a binary tree: node `i` has children `tree[i][bit]`; a child is a node
/// index, or `LEAF | symbol`.
fn tree() -> &'static Vec<[u16; 2]> {
    const LEAF: u16 = 0x8000;
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut tree: Vec<[u16; 2]> = vec![[0, 0]];
        let eos = (0x3fff_ffffu32, 30u8);
        let codes = CODES.iter().zip(LENGTHS.iter()).map(|(&c, &l)| (c, l));
        for (sym, (code, len)) in codes.chain(std::iter::once(eos)).enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    tree[node][bit] = LEAF | sym as u16;
                } else {
                    if tree[node][bit] == 0 {
                        tree.push([0, 0]);
                        tree[node][bit] = (tree.len() - 1) as u16;
                    }
                    node = tree[node][bit] as usize;
                }
            }
        }
        tree
    })
}

/// Decodes a Huffman-coded string: no end-of-string symbol, at most 7 bits of padding, all
/// ones (RFC 7541 §5.2).
pub fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, HpackError> {
    const LEAF: u16 = 0x8000;
    let tree = tree();
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let mut node = 0usize;
    let mut depth = 0u32;
    let mut all_ones = true;
    for &byte in raw {
        for i in (0..8).rev() {
            let bit = ((byte >> i) & 1) as usize;
            let next = tree[node][bit];
            depth += 1;
            all_ones &= bit == 1;
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == 256 {
                    return Err(HpackError::BadHuffman);
                }
                out.push(sym as u8);
                node = 0;
                depth = 0;
                all_ones = true;
            } else if next == 0 {
                return Err(HpackError::BadHuffman);
            } else {
                node = next as usize;
            }
        }
    }
    if depth > 7 || !all_ones {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

/// Huffman-codes `s`, padded with ones.
pub fn huffman_encode(s: &[u8], out: &mut Vec<u8>) {
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in s {
        acc = (acc << LENGTHS[b as usize]) | CODES[b as usize] as u64;
        bits += LENGTHS[b as usize] as u32;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
        acc &= (1u64 << bits) - 1;
    }
    if bits > 0 {
        out.push(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) as u8);
    }
}

fn huffman_len(s: &[u8]) -> usize {
    let bits: usize = s.iter().map(|&b| LENGTHS[b as usize] as usize).sum();
    bits.div_ceil(8)
}

/// Writes an integer with an N-bit prefix; `flags` are the bits above the prefix.
pub fn put_int(value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest as u8 & 0x7f) | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

fn put_string(s: &[u8], huffman: bool, out: &mut Vec<u8>) {
    if huffman && huffman_len(s) < s.len() {
        put_int(huffman_len(s), 7, 0x80, out);
        huffman_encode(s, out);
    } else {
        put_int(s.len(), 7, 0, out);
        out.extend_from_slice(s);
    }
}

/// An HPACK encoder. [`Encoder::plain`] is what the rewriter uses: literals without indexing,
/// no Huffman, no table. [`Encoder::indexing`] adds every field to a dynamic table and refers to
/// it later, Huffman-coding strings where shorter, as gRPC's C core does.
#[derive(Debug, Default)]
pub struct Encoder {
    indexing: bool,
    table: VecDeque<Field>,
    size: usize,
}

impl Encoder {
    /// Literals without indexing, raw strings: the decoder's table is never touched.
    pub fn plain() -> Encoder {
        Encoder::default()
    }

    /// Indexes every field in a table of [`TABLE_SIZE_MAX`] bytes and Huffman-codes strings.
    pub fn indexing() -> Encoder {
        Encoder {
            indexing: true,
            ..Encoder::default()
        }
    }

    /// Appends the encoding of `fields` (one header block) to `out`.
    pub fn encode(&mut self, fields: &[Field], out: &mut Vec<u8>) {
        for f in fields {
            if !self.indexing {
                put_int(0, 4, if f.sensitive { 0x10 } else { 0 }, out);
                put_string(&f.name, false, out);
                put_string(&f.value, false, out);
                continue;
            }
            if let Some(i) = self.find(f) {
                put_int(i, 7, 0x80, out);
                continue;
            }
            put_int(0, 6, 0x40, out);
            put_string(&f.name, true, out);
            put_string(&f.value, true, out);
            let size = f.size();
            if size > TABLE_SIZE_MAX {
                self.table.clear();
                self.size = 0;
                continue;
            }
            while self.size + size > TABLE_SIZE_MAX {
                if let Some(old) = self.table.pop_back() {
                    self.size -= old.size();
                }
            }
            self.size += size;
            self.table
                .push_front(Field::new(f.name.clone(), f.value.clone()));
        }
    }

    fn find(&self, f: &Field) -> Option<usize> {
        let st = STATIC
            .iter()
            .position(|(n, v)| n.as_bytes() == f.name && v.as_bytes() == f.value);
        if let Some(i) = st {
            return Some(i + 1);
        }
        self.table
            .iter()
            .position(|t| t.name == f.name && t.value == f.value)
            .map(|i| i + 1 + STATIC.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7541 C.4.1: "www.example.com" Huffman-coded.
    #[test]
    fn huffman_matches_rfc_7541_c_4_1() {
        let coded = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        assert_eq!(huffman_decode(&coded).unwrap(), b"www.example.com");
        let mut out = Vec::new();
        huffman_encode(b"www.example.com", &mut out);
        assert_eq!(out, coded);
    }

    #[test]
    fn huffman_rejects_long_or_zero_padding_and_eos() {
        // 'a' is 00011 (5 bits): padded with 3 ones is fine, with zeros is not.
        assert_eq!(huffman_decode(&[0b0001_1111]).unwrap(), b"a");
        assert_eq!(huffman_decode(&[0b0001_1000]), Err(HpackError::BadHuffman));
        // A whole byte of ones is 8 bits of padding.
        assert_eq!(huffman_decode(&[0xff]), Err(HpackError::BadHuffman));
        // EOS (30 ones) inside the string.
        assert_eq!(
            huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::BadHuffman)
        );
    }

    /// RFC 7541 C.3: three requests without Huffman, sharing a dynamic table.
    #[test]
    fn decodes_rfc_7541_c_3_requests_in_sequence() {
        let mut d = Decoder::default();
        let r1 = hex("828684410f7777772e6578616d706c652e636f6d");
        let r2 = hex("828684be58086e6f2d6361636865");
        let r3 = hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565");
        let names = |d: &mut Decoder, b: &[u8]| -> Vec<(String, String)> {
            d.decode(b, 1 << 20)
                .unwrap()
                .fields
                .into_iter()
                .map(|f| {
                    (
                        String::from_utf8(f.name).unwrap(),
                        String::from_utf8(f.value).unwrap(),
                    )
                })
                .collect()
        };
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            names(&mut d, &r1),
            vec![
                s(":method", "GET"),
                s(":scheme", "http"),
                s(":path", "/"),
                s(":authority", "www.example.com")
            ]
        );
        assert_eq!(
            names(&mut d, &r2)[4],
            s("cache-control", "no-cache"),
            "second request"
        );
        assert_eq!(
            names(&mut d, &r3),
            vec![
                s(":method", "GET"),
                s(":scheme", "https"),
                s(":path", "/index.html"),
                s(":authority", "www.example.com"),
                s("custom-key", "custom-value")
            ]
        );
        assert_eq!(d.size, 164, "table size after C.3.3");
    }

    #[test]
    fn size_update_above_limit_or_after_a_field_is_an_error() {
        let mut d = Decoder::default();
        let mut b = Vec::new();
        put_int(TABLE_SIZE_MAX + 1, 5, 0x20, &mut b);
        assert_eq!(
            d.decode(&b, 1 << 20).unwrap_err(),
            HpackError::BadSizeUpdate
        );
        assert_eq!(
            d.decode(&[0x82, 0x20], 1 << 20).unwrap_err(),
            HpackError::BadSizeUpdate
        );
        assert!(d.decode(&[0x20, 0x82], 1 << 20).is_ok());
    }

    #[test]
    fn list_over_limit_keeps_decoding_and_says_so() {
        let mut e = Encoder::indexing();
        let fields: Vec<Field> = (0..10)
            .map(|i| Field::new(format!("k{i}"), "v".repeat(100)))
            .collect();
        let mut b = Vec::new();
        e.encode(&fields, &mut b);
        let mut d = Decoder::default();
        let got = d.decode(&b, 300).unwrap();
        assert!(got.over_limit);
        assert_eq!(got.fields.len(), 3, "two within the limit, one over it");
        // The table is in step: the next block refers to all ten.
        let mut b = Vec::new();
        e.encode(&fields, &mut b);
        assert_eq!(d.decode(&b, 1 << 20).unwrap().fields, fields);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    proptest::proptest! {
        /// Whatever an indexing, Huffman-coding encoder sends, block after block, decodes to
        /// what it was given; and the plain re-encoding decodes the same with a fresh table.
        #[test]
        fn indexed_blocks_round_trip(blocks in proptest::collection::vec(
            proptest::collection::vec(
                (proptest::sample::select(vec![":authority", ":path", "te", "x-a", "x-bb", "grpc-timeout"]),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                 proptest::bool::ANY),
                0..12),
            1..8)) {
            let mut e = Encoder::indexing();
            let mut d = Decoder::default();
            let mut plain_d = Decoder::default();
            for block in blocks {
                let fields: Vec<Field> = block.into_iter().map(|(n, v, s)| {
                    let mut f = Field::new(n.as_bytes(), v);
                    f.sensitive = s;
                    f
                }).collect();
                let mut b = Vec::new();
                e.encode(&fields, &mut b);
                let got = d.decode(&b, usize::MAX).unwrap();
                let strip = |fs: &[Field]| fs.iter().map(|f| (f.name.clone(), f.value.clone())).collect::<Vec<_>>();
                proptest::prop_assert_eq!(strip(&got.fields), strip(&fields));
                let mut p = Vec::new();
                Encoder::plain().encode(&got.fields, &mut p);
                proptest::prop_assert_eq!(plain_d.decode(&p, usize::MAX).unwrap().fields, got.fields);
                proptest::prop_assert_eq!(plain_d.table.len(), 0);
            }
        }

        /// Any bytes: an error or fields, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(blocks in proptest::collection::vec(
            proptest::collection::vec(proptest::num::u8::ANY, 0..200), 1..4)) {
            let mut d = Decoder::default();
            for b in blocks {
                let _ = d.decode(&b, 1 << 16);
            }
        }
    }
}
