//! The store's maximum changed while it runs (a config reload, issue 25 item 7): a lower one
//! evicts least recently used unpinned blobs down to it at once; pinned blobs stay.

use crux_pastiche::Store;

const KIB: usize = 1 << 10;

fn blob(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn a_lower_maximum_evicts_the_least_recently_used_down_to_it_and_keeps_pins() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 20).unwrap();
    let put = |seed| s.put_reader(&blob(200 * KIB, seed)[..]).unwrap();
    let (pinned, old, mid, new) = (put(1), put(2), put(3), put(4));
    s.pin(&pinned.digest).unwrap();
    assert_eq!(s.used_bytes(), 4 * 200 * KIB as u64);

    s.set_max_bytes(450 * KIB as u64);
    assert_eq!(s.max_bytes(), 450 * KIB as u64);
    assert!(s.used_bytes() <= 450 * KIB as u64, "{}", s.used_bytes());
    assert!(s.has(&pinned.digest), "a pinned blob stays");
    assert!(
        !s.has(&old.digest) && !s.has(&mid.digest),
        "the least recently used go first"
    );
    assert!(s.has(&new.digest));

    // A higher one evicts nothing and lets more in.
    s.set_max_bytes(1 << 20);
    let more = put(5);
    assert!(s.has(&more.digest) && s.has(&new.digest) && s.has(&pinned.digest));
}
