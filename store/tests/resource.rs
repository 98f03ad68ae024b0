//! The generic resource path (DESIGN.md "Stored things are resources", issue 16) on an
//! in-process group of three stores: writes through a follower, linearizable and local reads,
//! compare-and-swap and atomic transactions, and watches that are gapless, resumable, and say
//! when they had to start over from a fresh listing.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Fleet, Node, LOCAL, SNAPSHOT_EVERY};
use crux_store::resource::{
    Event, Filter, Op, OpResult, Outcome, ResourceId, ResourceQuery, Txn, WatchEvent,
};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

async fn group(snapshot_every: u64) -> (tempfile::TempDir, Vec<Node>) {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = Fleet::default();
    let mut nodes = Vec::new();
    for i in 0..3u64 {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let dir = tmp.path().join(format!("n{i}"));
        nodes.push(Node::start(&fleet, 200 + i, dir, listener, snapshot_every).await);
    }
    let voters: BTreeMap<u64, SocketAddr> = nodes.iter().map(|n| (n.id, n.netid)).collect();
    nodes[0].store.initialize(voters).await.unwrap();
    for n in &nodes {
        n.store
            .wait_for(WAIT, "a leader", |m| m.current_leader.is_some())
            .await
            .unwrap();
    }
    (tmp, nodes)
}

/// A node that is not the Raft leader.
fn follower(nodes: &[Node]) -> usize {
    nodes
        .iter()
        .position(|n| n.store.status().role != "leader")
        .unwrap()
}

fn put(k: &str, v: &str, if_version: Option<u64>) -> Op {
    Op::Put {
        id: ResourceId::kv("default", k),
        flags: 0,
        spec: v.as_bytes().to_vec(),
        if_version,
    }
}

fn one(ops: Vec<Op>) -> Txn {
    Txn::new(ops)
}

fn applied_index(o: &Outcome) -> u64 {
    match o {
        Outcome::Applied { index, .. } => *index,
        other => panic!("not applied: {other:?}"),
    }
}

fn prefix(p: &str) -> Filter {
    Filter {
        rtype: "kv".into(),
        horde: "default".into(),
        name: p.into(),
        prefix: true,
    }
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a watch event in time")
        .expect("the watch goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_a_follower_cas_and_atomic_transactions() {
    let (_tmp, nodes) = group(SNAPSHOT_EVERY).await;
    let f = follower(&nodes);
    let s = &nodes[f].store;
    let o = s
        .resource_txn(one(vec![put("app/a", "1", Some(0))]), false)
        .await
        .unwrap();
    let ia = applied_index(&o);
    // Linearizable reads on every node see it at once; the version is the log index.
    for n in &nodes {
        let r = n
            .store
            .resource_read(ResourceQuery::Get(ResourceId::kv("default", "app/a")), true)
            .await
            .unwrap();
        assert_eq!(r.items.len(), 1);
        assert_eq!((r.items[0].version, r.items[0].create_index), (ia, ia));
        assert_eq!(r.index, ia);
    }
    // A compare-and-swap on a stale version is refused with the current one; nothing changes.
    let o = s
        .resource_txn(one(vec![put("app/a", "2", Some(ia - 1))]), false)
        .await
        .unwrap();
    assert_eq!(
        o,
        Outcome::Failed {
            op: 0,
            id: ResourceId::kv("default", "app/a"),
            current: ia
        }
    );
    let ib = applied_index(
        &s.resource_txn(one(vec![put("app/a", "2", Some(ia))]), false)
            .await
            .unwrap(),
    );
    assert!(ib > ia);
    // One failed check: nothing of the transaction is applied.
    let o = s
        .resource_txn(
            one(vec![
                put("app/b", "x", None),
                Op::Delete {
                    id: ResourceId::kv("default", "app/a"),
                    if_version: None,
                },
                Op::Check {
                    id: ResourceId::kv("default", "app/a"),
                    version: ia,
                },
            ]),
            false,
        )
        .await
        .unwrap();
    // The check sees the delete before it in the same transaction: absent, version 0.
    assert!(
        matches!(
            o,
            Outcome::Failed {
                op: 2,
                current: 0,
                ..
            }
        ),
        "{o:?}"
    );
    let list = |consistent| {
        s.resource_read(
            ResourceQuery::List {
                rtype: "kv".into(),
                horde: "default".into(),
                prefix: "app/".into(),
            },
            consistent,
        )
    };
    let names = |r: crux_store::resource::ReadResult| {
        r.items
            .into_iter()
            .map(|r| (r.id.name, r.spec))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(list(true).await.unwrap()),
        [("app/a".to_string(), b"2".to_vec())]
    );
    // All checks pass: everything is applied at one index.
    let o = s
        .resource_txn(
            one(vec![
                Op::Check {
                    id: ResourceId::kv("default", "app/a"),
                    version: ib,
                },
                put("app/b", "x", Some(0)),
                put("app/c", "y", None),
            ]),
            false,
        )
        .await
        .unwrap();
    let ic = applied_index(&o);
    let Outcome::Applied { results, .. } = o else {
        unreachable!()
    };
    assert!(matches!(&results[1], OpResult::Put(r) if r.version == ic));
    assert_eq!(names(list(true).await.unwrap()).len(), 3);
    // Bad input is refused before anything is sent.
    let e = s
        .resource_txn(one(vec![put("", "x", None)]), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("empty key"), "{e}");
    // Delete by prefix.
    let o = s
        .resource_txn(
            one(vec![Op::DeletePrefix {
                rtype: "kv".into(),
                horde: "default".into(),
                prefix: "app/".into(),
                spare: Some("crux/".into()),
            }]),
            false,
        )
        .await
        .unwrap();
    assert!(matches!(o, Outcome::Applied { results, .. } if results == [OpResult::Deleted(3)]));
    assert!(list(true).await.unwrap().items.is_empty());
    // A local read on every node catches up to the same state.
    for n in &nodes {
        n.store
            .wait_for(WAIT, "applied", |m| {
                m.last_applied.is_some_and(|l| l.index > ic)
            })
            .await
            .unwrap();
        let r = n
            .store
            .resource_read(
                ResourceQuery::List {
                    rtype: "kv".into(),
                    horde: "default".into(),
                    prefix: String::new(),
                },
                false,
            )
            .await
            .unwrap();
        assert!(r.items.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_is_gapless_in_order_and_resumes_without_loss_or_repeat() {
    let (_tmp, mut nodes) = group(20).await;
    let f = follower(&nodes);
    let before = applied_index(
        &nodes[0]
            .store
            .resource_txn(one(vec![put("w/seed", "0", None)]), false)
            .await
            .unwrap(),
    );
    nodes[f]
        .store
        .wait_for(WAIT, "the seed applied", |m| {
            m.last_applied.is_some_and(|l| l.index >= before)
        })
        .await
        .unwrap();
    let mut rx = nodes[f].store.resource_watch(prefix("w/"), None);
    let WatchEvent::Snapshot {
        index: snap,
        compacted: false,
        items,
    } = next(&mut rx).await
    else {
        panic!("a listing first")
    };
    assert!(snap >= before);
    assert_eq!(items.len(), 1);

    // Writes from every node, some outside the prefix, one a transaction of two.
    let mut want = Vec::new();
    for i in 0..30 {
        let n = &nodes[i % 3].store;
        let ops = if i == 10 {
            vec![put("w/t1", "a", None), put("w/t2", "b", None)]
        } else if i % 7 == 0 {
            vec![put("other", &i.to_string(), None)]
        } else {
            vec![put(&format!("w/{i}"), &i.to_string(), None)]
        };
        let inside = ops.len() > 1 || i % 7 != 0;
        let index = applied_index(&n.resource_txn(one(ops), false).await.unwrap());
        if inside {
            want.push(index);
        }
    }
    // Read half, then drop the watch and resume from the last index seen.
    let mut seen = Vec::new();
    let mut t_events = 0;
    while seen.len() < want.len() / 2 {
        match next(&mut rx).await {
            WatchEvent::Changes { index, events } => {
                assert!(events.iter().all(|e| e.id().name.starts_with("w/")));
                if events.len() == 2 {
                    t_events += 1;
                }
                seen.push(index);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(rx);
    let last = *seen.last().unwrap();
    let mut rx = nodes[f].store.resource_watch(prefix("w/"), Some(last));
    while seen.len() < want.len() {
        match next(&mut rx).await {
            WatchEvent::Changes { index, events } => {
                if events.len() == 2 {
                    t_events += 1;
                }
                seen.push(index);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, want, "every change, in order, once");
    assert_eq!(t_events, 1, "the transaction is seen whole, once");
    // A change after the resume arrives too.
    let i = applied_index(
        &nodes[0]
            .store
            .resource_txn(one(vec![put("w/late", "z", None)]), false)
            .await
            .unwrap(),
    );
    assert!(
        matches!(next(&mut rx).await, WatchEvent::Changes { index, events }
        if index == i && matches!(&events[0], Event::Put(r) if r.spec == b"z"))
    );
    drop(rx);

    // A blocking wait returns once a change after the index arrives, not before.
    let s = nodes[f].store.clone();
    let waiting = tokio::spawn(async move { s.resource_wait(prefix("w/late"), i, WAIT).await });
    let j = applied_index(
        &nodes[1]
            .store
            .resource_txn(one(vec![put("w/late", "zz", None)]), false)
            .await
            .unwrap(),
    );
    assert!(waiting.await.unwrap(), "woken by the change at {j}");
    assert!(
        !nodes[f]
            .store
            .resource_wait(prefix("w/late"), j, Duration::from_millis(300))
            .await,
        "nothing changed after {j}"
    );

    // After a restart the node holds only what it re-applied after its latest snapshot (built
    // every 20 entries): resuming from before it gives a fresh listing flagged as such.
    nodes[f].restart(20).await;
    nodes[f]
        .store
        .wait_for(WAIT, "caught up", |m| {
            m.last_applied.is_some_and(|l| l.index >= j)
        })
        .await
        .unwrap();
    let mut rx = nodes[f].store.resource_watch(prefix("w/"), Some(before));
    match next(&mut rx).await {
        WatchEvent::Snapshot {
            compacted: true,
            items,
            index,
        } => {
            assert!(index >= j);
            assert_eq!(items.len(), 28, "{items:?}");
        }
        other => panic!("expected a compacted listing, got {other:?}"),
    }
}
