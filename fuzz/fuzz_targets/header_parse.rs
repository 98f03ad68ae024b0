//! `Header::parse` never panics, and what it accepts writes back to the same bytes.
#![no_main]

use crux_proto::flock::{Header, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((header, rest)) = Header::parse(data) {
        assert_eq!(rest.len(), data.len() - HEADER_BYTES);
        let mut out = Vec::new();
        header.write(&mut out);
        assert_eq!(&out[..], &data[..HEADER_BYTES]);
    }
});
