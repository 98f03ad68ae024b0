//! `decode_message` never panics, and what it accepts re-encodes to a message that decodes equal.
#![no_main]

use crux_proto::flock::{decode_message, encode_message, message_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_message(data) {
        let mut out = Vec::new();
        encode_message(&msg, &mut out);
        assert_eq!(out.len(), message_len(&msg));
        assert_eq!(
            decode_message(&out).expect("re-encoded message decodes"),
            msg
        );
    }
});
