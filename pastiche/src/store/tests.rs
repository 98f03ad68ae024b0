use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::*;
use crate::manifest::MIN_PIECE_SIZE;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

fn manifest_of(bytes: &[u8], piece_size: u64) -> Manifest {
    let mut h = Hasher::new(piece_size);
    h.update(bytes);
    h.finish()
}

fn piece(bytes: &[u8], m: &Manifest, i: u32) -> Vec<u8> {
    let o = m.piece_offset(i) as usize;
    bytes[o..o + m.piece_len(i) as usize].to_vec()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn read_all(s: &Store, d: &Digest) -> Vec<u8> {
    let mut out = Vec::new();
    s.open_blob(d).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn put_then_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    let bytes = data(2 * PIECE_SIZE as usize + 12345, 1);
    let m = s.put_reader(&bytes[..]).unwrap();
    assert_eq!(m.digest, Digest::of(&bytes));
    assert_eq!(m.size, bytes.len() as u64);
    assert_eq!(m.piece_count(), 3);
    m.check().unwrap();
    assert!(s.has(&m.digest));
    assert_eq!(s.manifest(&m.digest).unwrap(), m);
    assert_eq!(read_all(&s, &m.digest), bytes);
    for i in 0..3 {
        assert_eq!(s.read_piece(&m.digest, i).unwrap(), piece(&bytes, &m, i));
    }
    assert!(matches!(
        s.read_piece(&m.digest, 3),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.have(&m.digest).unwrap(), vec![true; 3]);
    assert_eq!(s.used_bytes(), m.size);
    let blob = fs::read(dir.path().join("blobs/sha256").join(m.digest.hex())).unwrap();
    assert_eq!(blob, bytes);
    assert!(files_in(&dir.path().join("tmp")).is_empty());

    // put_file, an empty blob, and a reopen that finds them all.
    let path = dir.path().join("input");
    fs::write(&path, b"small file").unwrap();
    let m2 = s.put_file(&path).unwrap();
    assert_eq!(m2.digest, Digest::of(b"small file"));
    let empty = s.put_reader(&b""[..]).unwrap();
    assert_eq!(empty.piece_count(), 0);
    assert_eq!(read_all(&s, &empty.digest), b"");
    drop(s);
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(s.list().len(), 3);
    assert_eq!(s.manifest(&m.digest).unwrap(), m);
    assert_eq!(read_all(&s, &m2.digest), b"small file");
    assert_eq!(s.used_bytes(), m.size + 10);
    let missing = Digest::of(b"nope");
    assert!(matches!(s.open_blob(&missing), Err(StoreError::NotFound(d)) if d == missing));
    assert_eq!(
        s.open_blob(&missing).unwrap_err().to_string(),
        format!("unknown digest {missing}")
    );
}

#[test]
fn dedup() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 20).unwrap();
    let bytes = data(100_000, 2);
    let a = s.put_reader(&bytes[..]).unwrap();
    let b = s.put_reader(&bytes[..]).unwrap();
    assert_eq!(a, b);
    assert_eq!(s.list().len(), 1);
    assert_eq!(s.used_bytes(), 100_000);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    // A pull of a present blob has nothing to do.
    let p = s.begin_pull(a.clone()).unwrap();
    assert!(p.missing().is_empty());
    assert_eq!(p.finish().unwrap(), a);
    assert_eq!(s.used_bytes(), 100_000);
}

#[test]
fn lru_eviction_and_pins() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 300).unwrap();
    let put = |s: &Store, seed| s.put_reader(&data(100, seed)[..]).unwrap().digest;
    let (a, b, c) = (put(&s, 1), put(&s, 2), put(&s, 3));
    assert_eq!(s.used_bytes(), 300);
    s.open_blob(&a).unwrap(); // a is now the most recently used
    s.pin(&b).unwrap(); // b is the oldest, but pinned
    let d = put(&s, 4);
    assert!(!s.has(&c), "c was the least recently used unpinned blob");
    assert!(s.has(&a) && s.has(&b) && s.has(&d));
    s.read_piece(&d, 0).unwrap(); // order now: a, d (b pinned)
    let e = put(&s, 5);
    assert!(!s.has(&a));
    assert!(s.has(&b) && s.has(&d) && s.has(&e));
    assert_eq!(s.used_bytes(), 300);
    let listed: Vec<(Digest, bool)> = s.list().iter().map(|x| (x.digest, x.pinned)).collect();
    let mut want = vec![(b, true), (d, false), (e, false)];
    want.sort();
    assert_eq!(listed, want);

    // Pinned bytes are never evicted: with 200 pinned, a 150-byte blob can never fit.
    s.pin(&d).unwrap();
    let err = s.put_reader(&data(150, 6)[..]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                size: 150,
                max: 300,
                pinned: 200
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "blob of 150 bytes does not fit in the store (max 300 bytes, pinned 200)"
    );
    assert!(s.has(&b) && s.has(&d) && s.has(&e));
    // ... and putting a pinned blob again still deduplicates.
    assert_eq!(s.put_reader(&data(100, 2)[..]).unwrap().digest, b);

    // Pins persist across open; explicit rm removes a pinned blob; unpin makes it evictable.
    drop(s);
    let s = Store::open(dir.path(), 300).unwrap();
    assert!(s.list().iter().filter(|x| x.pinned).count() == 2);
    assert!(s.remove(&b).unwrap());
    assert!(!s.remove(&b).unwrap());
    assert!(matches!(s.pin(&b), Err(StoreError::NotFound(_))));
    assert!(matches!(s.unpin(&b), Err(StoreError::NotFound(_))));
    s.unpin(&d).unwrap();
    let news = [put(&s, 7), put(&s, 8), put(&s, 9)];
    assert!(!s.has(&d) && !s.has(&e), "unpinned blobs evicted");
    assert!(news.iter().all(|x| s.has(x)));
    assert_eq!(s.used_bytes(), 300);
    let names = files_in(&dir.path().join("blobs/sha256"));
    assert_eq!(names.len(), 6, "{names:?}"); // three blobs, three manifests, no pin markers
}

#[test]
fn too_large_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1000).unwrap();
    let keep = s.put_reader(&data(400, 1)[..]).unwrap().digest;
    let big = data(3000, 2);
    let err = s.put_reader(&big[..]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::TooLarge {
                size: 3000,
                max: 1000,
                pinned: 0
            }
        ),
        "{err:?}"
    );
    let path = dir.path().join("big");
    fs::write(&path, &big).unwrap();
    let err = s.put_file(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size: 3000, .. }),
        "{err:?}"
    );
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(!s.has(&Digest::of(&big)));
    assert!(s.has(&keep), "a blob that can never fit evicts nothing");
    assert_eq!(s.used_bytes(), 400);

    let m = manifest_of(&data(2000, 3), MIN_PIECE_SIZE);
    let err = s.begin_pull(m.clone()).unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size: 2000, .. }),
        "{err:?}"
    );
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(s.manifest(&m.digest).is_none());
    assert_eq!(s.used_bytes(), 400);
    assert_eq!(files_in(&dir.path().join("blobs/sha256")).len(), 2);

    let mut bad = m;
    bad.pieces.push([0; 32]);
    assert!(matches!(s.begin_pull(bad), Err(StoreError::BadManifest(_))));
}

#[test]
fn room_reserved_by_live_pull() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1000).unwrap();
    let old = s.put_reader(&data(500, 1)[..]).unwrap().digest;
    let m = manifest_of(&data(700, 2), MIN_PIECE_SIZE);
    let pull = s.begin_pull(m.clone()).unwrap();
    assert!(!s.has(&old), "evicted to reserve room for the pull");
    assert_eq!(s.used_bytes(), 700);
    assert!(matches!(
        s.begin_pull(m.clone()),
        Err(StoreError::PullInProgress(_))
    ));
    let err = s.put_reader(&data(500, 3)[..]).unwrap_err();
    assert!(matches!(err, StoreError::Busy { size: 500, .. }), "{err:?}");
    assert!(
        files_in(&dir.path().join("tmp")).len() == 3,
        "only the pull's state"
    );
    drop(pull);
    // The dropped pull's temp state is kept (and counted) until room is needed.
    assert_eq!(s.used_bytes(), 700);
    s.put_reader(&data(500, 3)[..]).unwrap();
    assert_eq!(s.used_bytes(), 500);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[test]
fn bad_piece_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    let bytes = data(3 * MIN_PIECE_SIZE as usize - 10, 4);
    let m = manifest_of(&bytes, MIN_PIECE_SIZE);
    let pull = s.begin_pull(m.clone()).unwrap();
    assert_eq!(s.manifest(&m.digest).unwrap(), m);
    assert!(!s.has(&m.digest));
    let mut bad = piece(&bytes, &m, 1);
    bad[7] ^= 0x40;
    assert!(matches!(
        pull.write_piece(1, &bad),
        Err(StoreError::PieceMismatch { index: 1 })
    ));
    let short = &piece(&bytes, &m, 1)[1..];
    assert!(matches!(
        pull.write_piece(1, short),
        Err(StoreError::PieceMismatch { index: 1 })
    ));
    assert!(matches!(
        pull.write_piece(9, short),
        Err(StoreError::PieceMismatch { index: 9 })
    ));
    assert_eq!(pull.missing(), vec![0, 1, 2]);
    assert_eq!(s.have(&m.digest).unwrap(), vec![false; 3]);
    assert!(matches!(
        s.read_piece(&m.digest, 1),
        Err(StoreError::NotFound(_))
    ));
    // Nothing was written either.
    let part = fs::read(s.part_path(&m.digest)).unwrap();
    assert!(part.iter().all(|b| *b == 0));

    pull.write_piece(1, &piece(&bytes, &m, 1)).unwrap();
    assert_eq!(pull.missing(), vec![0, 2]);
    assert_eq!(s.have(&m.digest).unwrap(), vec![false, true, false]);
    assert_eq!(s.read_piece(&m.digest, 1).unwrap(), piece(&bytes, &m, 1));
    assert!(matches!(
        pull.finish(),
        Err(StoreError::Incomplete { missing: 2 })
    ));
}

#[test]
fn interrupted_pull_resumes_from_verified_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(5 * MIN_PIECE_SIZE as usize + 99, 5);
    let m = manifest_of(&bytes, MIN_PIECE_SIZE);
    let d = m.digest;
    {
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let pull = s.begin_pull(m.clone()).unwrap();
        for i in [0, 2, 5] {
            pull.write_piece(i, &piece(&bytes, &m, i)).unwrap();
        }
        // Dropped without finish: the state stays for a resume.
    }
    {
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(
            s.used_bytes(),
            m.size,
            "the interrupted pull's room is counted"
        );
        assert!(!s.has(&d));
        let pull = s.begin_pull(m.clone()).unwrap();
        assert_eq!(pull.missing(), vec![1, 3, 4]);
        pull.write_piece(3, &piece(&bytes, &m, 3)).unwrap();
        pull.flush().unwrap();
        pull.write_piece(4, &piece(&bytes, &m, 4)).unwrap();
        // A kill -9: no drop, so piece 4 (written after the last flush) is not recorded.
        std::mem::forget(pull);
    }
    // Corrupt a recorded piece on disk: the resume must not trust it.
    let part = dir.path().join("tmp").join(format!("{}.part", d.hex()));
    let f = OpenOptions::new().write(true).open(&part).unwrap();
    f.write_all_at(&[0xff], m.piece_offset(2) + 17).unwrap();
    drop(f);
    // A stray put temp file and junk are cleaned by open; the pull's state is not.
    fs::write(dir.path().join("tmp/put-1-1.part"), b"junk").unwrap();
    fs::write(dir.path().join("tmp/other.have"), b"junk").unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(files_in(&dir.path().join("tmp")).len(), 3);
    let pull = s.begin_pull(m.clone()).unwrap();
    assert_eq!(pull.missing(), vec![1, 2, 4]);
    for i in pull.missing() {
        pull.write_piece(i, &piece(&bytes, &m, i)).unwrap();
    }
    assert_eq!(pull.finish().unwrap(), m);
    assert_eq!(read_all(&s, &d), bytes);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(s.used_bytes(), m.size);

    // A resume with a different manifest for the same digest discards the old state.
    let s2 = tempfile::tempdir().unwrap();
    let s2 = Store::open(s2.path(), 1 << 30).unwrap();
    let pull = s2.begin_pull(m.clone()).unwrap();
    pull.write_piece(0, &piece(&bytes, &m, 0)).unwrap();
    drop(pull);
    let m2 = manifest_of(&bytes, 2 * MIN_PIECE_SIZE);
    let pull = s2.begin_pull(m2.clone()).unwrap();
    assert_eq!(pull.missing(), vec![0, 1, 2]);
    assert_eq!(s2.used_bytes(), m.size);
    // remove() cancels a live pull and deletes its state.
    assert!(s2.remove(&d).unwrap());
    assert!(matches!(
        pull.write_piece(0, &piece(&bytes, &m2, 0)),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(pull.finish(), Err(StoreError::NotFound(_))));
    assert_eq!(s2.used_bytes(), 0);
}

#[test]
fn lying_manifest_is_caught_at_finish() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    let real = data(3 * MIN_PIECE_SIZE as usize, 6);
    let other = data(3 * MIN_PIECE_SIZE as usize, 7);
    let mut m = manifest_of(&other, MIN_PIECE_SIZE);
    m.digest = Digest::of(&real); // piece hashes consistent, of other content
    m.check().unwrap();
    let pull = s.begin_pull(m.clone()).unwrap();
    for i in 0..3 {
        pull.write_piece(i, &piece(&other, &m, i)).unwrap();
    }
    let err = pull.finish().unwrap_err();
    assert!(
        matches!(err, StoreError::DigestMismatch { want, got }
            if want == m.digest && got == Digest::of(&other)),
        "{err:?}"
    );
    assert!(!s.has(&m.digest));
    assert!(s.manifest(&m.digest).is_none());
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    assert_eq!(s.used_bytes(), 0);
    // A fresh pull starts from nothing.
    let m = manifest_of(&real, MIN_PIECE_SIZE);
    let pull = s.begin_pull(m.clone()).unwrap();
    assert_eq!(pull.missing().len(), 3);
}

#[test]
fn verify_evicts_corrupt_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    let good = s.put_reader(&data(300_000, 8)[..]).unwrap().digest;
    let bad = s.put_reader(&data(300_000, 9)[..]).unwrap().digest;
    s.pin(&bad).unwrap();
    assert_eq!(
        s.verify().unwrap(),
        VerifyReport {
            checked: 2,
            corrupt: vec![]
        }
    );
    let path = dir.path().join("blobs/sha256").join(bad.hex());
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x5a], 123_456).unwrap();
    drop(f);
    assert_eq!(
        s.verify().unwrap(),
        VerifyReport {
            checked: 2,
            corrupt: vec![bad]
        }
    );
    assert!(!s.has(&bad) && s.has(&good));
    assert!(!path.exists());
    assert_eq!(s.used_bytes(), 300_000);
    assert_eq!(
        s.verify().unwrap(),
        VerifyReport {
            checked: 1,
            corrupt: vec![]
        }
    );
}

#[test]
fn open_repairs_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = {
        let s = Store::open(dir.path(), 1 << 30).unwrap();
        let a = s.put_reader(&data(1000, 1)[..]).unwrap().digest;
        let b = s.put_reader(&data(1000, 2)[..]).unwrap().digest;
        (a, b)
    };
    let blobs = dir.path().join("blobs/sha256");
    // a lost its manifest (rebuilt by rehashing); b's bytes are wrong (removed);
    // an orphan manifest and pin marker are removed.
    fs::remove_file(blobs.join(format!("{}.manifest", a.hex()))).unwrap();
    fs::write(blobs.join(b.hex()), data(1000, 3)).unwrap();
    fs::remove_file(blobs.join(format!("{}.manifest", b.hex()))).unwrap();
    let c = Digest::of(b"c");
    fs::write(blobs.join(format!("{}.pin", c.hex())), b"").unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    assert!(s.has(&a) && !s.has(&b) && !s.has(&c));
    assert_eq!(read_all(&s, &a), data(1000, 1));
    assert_eq!(files_in(&blobs).len(), 2);
    // Lowering the maximum evicts down to it.
    s.put_reader(&data(1000, 4)[..]).unwrap();
    drop(s);
    let s = Store::open(dir.path(), 1500).unwrap();
    assert_eq!(s.used_bytes(), 1000);
    assert_eq!(s.list().len(), 1);
}

#[test]
fn concurrent_pieces_and_puts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 30).unwrap();
    let bytes = data(16 * MIN_PIECE_SIZE as usize + 1, 10);
    let m = manifest_of(&bytes, MIN_PIECE_SIZE);
    let pull = s.begin_pull(m.clone()).unwrap();
    let n = m.piece_count();
    std::thread::scope(|scope| {
        for t in 0..4u32 {
            let (pull, bytes, m, s) = (&pull, &bytes, &m, &s);
            scope.spawn(move || {
                // Every thread writes every piece, in its own order: duplicates are no-ops.
                for k in 0..n {
                    let i = (k * 7 + t * 5) % n;
                    pull.write_piece(i, &piece(bytes, m, i)).unwrap();
                    assert_eq!(s.read_piece(&m.digest, i).unwrap(), piece(bytes, m, i));
                }
            });
            scope.spawn(move || {
                let b = data(10_000 + t as usize, t as u8);
                assert_eq!(s.put_reader(&b[..]).unwrap().digest, Digest::of(&b));
            });
        }
    });
    assert!(pull.missing().is_empty());
    let journal = fs::read(s.have_path(&m.digest)).unwrap();
    assert!(journal.len() <= 4 * n as usize);
    assert_eq!(pull.finish().unwrap(), m);
    assert_eq!(read_all(&s, &m.digest), bytes);
    assert_eq!(s.list().len(), 5);
    assert_eq!(s.used_bytes(), m.size + 4 * 10_000 + 6);
    assert!(!s.inner.state.lock().unwrap().live.contains_key(&m.digest));
    assert_eq!(s.inner.used.load(Ordering::Relaxed), s.used_bytes());
}

#[test]
fn store_is_send_sync_and_pull_is_send() {
    fn send_sync<T: Send + Sync + Clone>() {}
    fn send<T: Send + Sync>() {}
    send_sync::<Store>();
    send::<Pull>();
}

#[test]
fn no_room_is_told_apart_named_after_the_store_and_counted() {
    for (raw, full) in [(28, true), (122, true), (5, false), (13, false)] {
        let e = StoreError::from(io::Error::from_raw_os_error(raw));
        assert_eq!(matches!(e, StoreError::NoSpace { .. }), full, "errno {raw}");
        assert_eq!(matches!(e, StoreError::Io(_)), !full, "errno {raw}");
    }
    assert!(is_full(&io::Error::from(io::ErrorKind::StorageFull)));
    assert!(is_full(&io::Error::from(io::ErrorKind::QuotaExceeded)));
    assert!(!is_full(&io::Error::other("disk full (only words)")));

    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 20).unwrap();
    let e = s.fault(io::Error::from_raw_os_error(28).into());
    assert_eq!(
        e.to_string(),
        format!("disk full: {}", dir.path().display())
    );
    let status = crate::serve::status(e);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().starts_with("disk full: "), "{status:?}");
    let _ = s.fault(io::Error::from_raw_os_error(5).into());
    // Not write errors: a reader that fails, a blob that does not fit.
    let _ = s.fault(StoreError::Input(io::Error::other("upload interrupted")));
    let _ = s.fault(StoreError::Busy {
        size: 1,
        reserved: 1,
        max: 1,
    });
    assert_eq!(
        s.write_errors(),
        WriteErrors {
            disk_full: 1,
            io: 1
        }
    );

    // A put whose reader fails imports nothing and is not counted as a write error.
    struct Broken;
    impl Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("the upload broke off"))
        }
    }
    assert!(matches!(s.put_reader(Broken), Err(StoreError::Input(_))));
    assert_eq!(
        s.write_errors(),
        WriteErrors {
            disk_full: 1,
            io: 1
        }
    );
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[test]
fn a_pull_that_found_no_room_gives_its_room_back_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), 1 << 20).unwrap();
    let bytes = data(3 * MIN_PIECE_SIZE as usize, 4);
    let m = manifest_of(&bytes, MIN_PIECE_SIZE);
    let pull = s.begin_pull(m.clone()).unwrap();
    pull.write_piece(0, &piece(&bytes, &m, 0)).unwrap();
    assert_eq!(s.used_bytes(), m.size);
    // As a piece write on a full disk reports it.
    let e = pull.failed(io::Error::from_raw_os_error(28).into());
    assert!(
        matches!(e, StoreError::NoSpace { ref path } if path == dir.path()),
        "{e:?}"
    );
    drop(pull);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(s.used_bytes(), 0);
    assert!(s.manifest(&m.digest).is_none());
    assert_eq!(s.write_errors().disk_full, 1);
    // A later pull starts afresh and completes.
    let pull = s.begin_pull(m.clone()).unwrap();
    assert_eq!(pull.missing().len(), 3);
    for i in 0..3 {
        pull.write_piece(i, &piece(&bytes, &m, i)).unwrap();
    }
    assert_eq!(pull.finish().unwrap(), m);
    assert_eq!(read_all(&s, &m.digest), bytes);
}
