//! The ceiling: the AEADs of the TLS 1.3 suites the node plane offers, as `ring` runs them on
//! one core over full 16 KiB records (seal, then open), with no I/O and no framing.

use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};

use crate::now;

/// TLS's largest record payload.
const RECORD: usize = 16 << 10;

/// Bytes per second sealed and opened (each direction timed alone) with `alg`.
fn rate(alg: &'static ring::aead::Algorithm, bytes: u64) -> (f64, f64) {
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).expect("key"));
    let records = (bytes / RECORD as u64).max(1);
    let mut buf = crate::pattern(RECORD);
    let mut tags = Vec::with_capacity(records as usize);
    let mut sealed = Vec::with_capacity(records as usize);
    let t0 = now();
    for i in 0..records {
        let nonce = Nonce::assume_unique_for_key(nonce(i));
        let mut rec = buf.clone();
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from([23u8, 3, 3, 0, 0]), &mut rec)
            .expect("seal");
        if i < 64 {
            sealed.push(rec);
            tags.push(tag);
        }
    }
    let seal = t0.elapsed();
    // Open the first records again and again (each open needs its own sealed copy).
    let t0 = now();
    for i in 0..records {
        let k = (i % sealed.len() as u64) as usize;
        buf.copy_from_slice(&sealed[k]);
        buf.extend_from_slice(tags[k].as_ref());
        let nonce = Nonce::assume_unique_for_key(nonce(k as u64));
        key.open_in_place(nonce, Aad::from([23u8, 3, 3, 0, 0]), &mut buf)
            .expect("open");
        buf.truncate(RECORD);
    }
    let open = t0.elapsed();
    let total = (records * RECORD as u64) as f64;
    (total / seal.as_secs_f64(), total / open.as_secs_f64())
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

/// Prints the AEAD table.
pub fn report() {
    let bytes = 1u64 << 30;
    println!(
        "aead: ring on one core, 16 KiB records, 1 GiB each way (a record copy included, as \
         rustls copies into its record buffer); MB/s"
    );
    println!("  {:<34} {:>8} {:>8}", "suite's AEAD", "seal", "open");
    for (name, alg) in [
        ("AES-128-GCM (node plane's first)", &AES_128_GCM),
        ("AES-256-GCM", &AES_256_GCM),
        ("ChaCha20-Poly1305", &CHACHA20_POLY1305),
    ] {
        let (s, o) = rate(alg, bytes);
        println!("  {:<34} {:>8.0} {:>8.0}", name, s / 1e6, o / 1e6);
    }
}
