//! `decode_frame` never panics (nor allocates past its limit), and what it accepts roundtrips.
#![no_main]

use crux_proto::flock::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode_frame(data) {
        let out = encode_frame(&frame);
        assert_eq!(decode_frame(&out).expect("re-encoded frame decodes"), frame);
    }
});
