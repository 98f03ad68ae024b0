//! The standalone backend on its own (no agent): offsets dense across segments, a torn tail cut
//! on reopen, retention by size, groups' offsets kept across a reopen, a subscription that
//! reads lazily (a reader that takes nothing makes the log read nothing) and wakes on new
//! messages, bad input refused with nothing changed.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use crux_catalyst::log::{TopicLog, HEADER_BYTES};
use crux_catalyst::standalone::Standalone;
use crux_catalyst::{CatalystError, Retention, Start};
use futures_util::StreamExt;

fn msgs(n: usize, size: usize, tag: u8) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let mut v = vec![tag; size];
            v[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Bytes::from(v)
        })
        .collect()
}

#[test]
fn offsets_are_dense_across_segments_and_reads_return_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    // A 4 MiB size limit makes 1 MiB segments.
    let log = TopicLog::create(
        "t",
        &dir.path().join("t"),
        Retention {
            max_bytes: 4 << 20,
            max_age: Duration::ZERO,
        },
    )
    .unwrap();
    let mut next = 0;
    for round in 0..20u8 {
        let batch = msgs(100, 1000, round);
        assert_eq!(log.append(&batch, 7).unwrap(), next);
        next += 100;
    }
    let mut from = 0;
    let mut seen = 0;
    while from < next {
        let r = log.read(from, 300, 64 << 10).unwrap();
        assert!(!r.messages.is_empty(), "a read from {from} found nothing");
        for m in &r.messages {
            assert_eq!(m.offset, from + (m.offset - from));
            let round = (m.offset / 100) as u8;
            let i = m.offset % 100;
            assert_eq!(&m.payload[..8], &i.to_le_bytes());
            assert_eq!(m.payload[8], round);
            assert_eq!(m.payload.len(), 1000);
            assert_eq!(m.time_ms, 7);
            assert_eq!(m.offset, seen);
            seen += 1;
        }
        from = r.next;
    }
    assert_eq!(seen, next);
    // The same from a reopened log.
    drop(log);
    let log = TopicLog::open("t", &dir.path().join("t")).unwrap();
    let r = log.read(1234, 1, 1 << 20).unwrap();
    assert_eq!(r.messages[0].offset, 1234);
    assert_eq!(&r.messages[0].payload[..8], &34u64.to_le_bytes());
    assert_eq!(log.figures().next, 2000);
}

#[test]
fn a_torn_tail_is_cut_on_reopen_and_the_next_append_takes_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let log = TopicLog::create("t", &path, Retention::default()).unwrap();
    log.append(&msgs(10, 100, 1), 1).unwrap();
    drop(log);
    // Half a record at the end, as a crash in the middle of a write leaves it.
    let seg = path.join(format!("{:020}.log", 0));
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[50, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(f);
    let log = TopicLog::open("t", &path).unwrap();
    assert_eq!(log.figures().next, 10);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        10 * (100 + HEADER_BYTES) as u64
    );
    assert_eq!(log.append(&msgs(1, 100, 2), 1).unwrap(), 10);
    let r = log.read(9, 10, 1 << 20).unwrap();
    assert_eq!(
        r.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [9, 10]
    );
}

#[test]
fn retention_by_size_drops_the_oldest_segments_and_reads_start_at_the_oldest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let log = TopicLog::create(
        "t",
        &dir.path().join("t"),
        Retention {
            max_bytes: 4 << 20,
            max_age: Duration::ZERO,
        },
    )
    .unwrap();
    for _ in 0..12 {
        log.append(&msgs(1000, 1000, 0), 1).unwrap();
    }
    let before = log.figures();
    assert!(before.bytes > 11_000_000);
    assert!(log.enforce_retention(2) > 0);
    let after = log.figures();
    assert!(after.bytes <= 4 << 20, "{} bytes kept", after.bytes);
    assert!(after.first > 0);
    assert_eq!(after.next, 12_000);
    let r = log.read(0, 5, 1 << 20).unwrap();
    assert_eq!(r.messages[0].offset, after.first);
}

#[test]
fn retention_by_age_drops_segments_whose_newest_message_is_too_old() {
    let dir = tempfile::tempdir().unwrap();
    let log = TopicLog::create(
        "t",
        &dir.path().join("t"),
        Retention {
            max_bytes: 0,
            max_age: Duration::from_secs(60),
        },
    )
    .unwrap();
    log.append(&msgs(10, 100, 0), 1_000).unwrap();
    // Past half the age: the active segment is rolled; past the age: dropped.
    assert_eq!(log.enforce_retention(40_000), 0);
    log.append(&msgs(10, 100, 0), 40_000).unwrap();
    assert_eq!(log.enforce_retention(70_000), 1);
    let f = log.figures();
    assert_eq!((f.first, f.next), (10, 20));
}

#[test]
fn group_offsets_survive_a_reopen_and_a_commit_past_the_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t");
    let log = TopicLog::create("t", &path, Retention::default()).unwrap();
    log.append(&msgs(5, 10, 0), 1).unwrap();
    log.commit("g", 3).unwrap();
    match log.commit("g", 6) {
        Err(CatalystError::OffsetPastEnd { offset, next, .. }) => {
            assert_eq!((offset, next), (6, 5))
        }
        other => panic!("{other:?}"),
    }
    drop(log);
    let log = TopicLog::open("t", &path).unwrap();
    assert_eq!(log.committed("g"), Some(3));
    assert_eq!(log.committed("h"), None);
}

#[tokio::test]
async fn a_subscription_reads_lazily_and_wakes_on_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::open(dir.path()).unwrap();
    s.create("t", Retention::default()).unwrap();
    s.publish("t", &msgs(3, 16, 0)).unwrap();
    let mut sub = s.subscribe("t", Start::Offset(1), None).unwrap();
    assert_eq!(s.subscribers("t"), 1);
    let first = sub.next().await.unwrap().unwrap();
    assert_eq!(first.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2]);
    let waiting = tokio::spawn(async move {
        let b = sub.next().await.unwrap().unwrap();
        (b, sub)
    });
    s.publish("t", &msgs(2, 16, 1)).unwrap();
    let (b, sub) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.iter().map(|m| m.offset).collect::<Vec<_>>(), [3, 4]);
    drop(sub);
    assert_eq!(s.subscribers("t"), 0);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::open(dir.path()).unwrap();
    let bus = crux_catalyst::Bus::Standalone(s.clone());
    for name in ["", "a.b", "a b", "../x", &"x".repeat(129)] {
        assert!(
            matches!(
                bus.create(name, Retention::default()).await,
                Err(CatalystError::BadName { .. })
            ),
            "{name:?}"
        );
    }
    assert!(matches!(
        bus.publish("nope", vec![Bytes::from_static(b"x")]).await,
        Err(CatalystError::NoTopic(_))
    ));
    bus.create("t", Retention::default()).await.unwrap();
    assert!(matches!(
        bus.create("t", Retention::default()).await,
        Err(CatalystError::TopicExists(_))
    ));
    let big = Bytes::from(vec![0u8; crux_catalyst::MESSAGE_BYTES_MAX + 1]);
    assert!(matches!(
        bus.publish("t", vec![Bytes::from_static(b"ok"), big]).await,
        Err(CatalystError::MessageTooLarge { index: 1, .. })
    ));
    assert!(matches!(
        bus.publish("t", vec![]).await,
        Err(CatalystError::BadBatch(_))
    ));
    assert!(matches!(
        bus.subscribe("t", Start::Offset(1), None).await.err(),
        Some(CatalystError::OffsetPastEnd { .. })
    ));
    let t = &bus.list().await.unwrap()[0];
    assert_eq!((t.name.as_str(), t.next_offset, t.bytes), ("t", 0, 0));
    // Reopened, the same.
    let again = Standalone::open(dir.path()).unwrap();
    assert_eq!(again.list().len(), 1);
}
