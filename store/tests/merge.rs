//! Two store groups formed apart (as a partitioned cold boot makes them) merged into one: the
//! group id, sealing, copying, conflicts kept aside, abandoning and rejoining, on 127.0.0.1.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{rebind, Fleet, Node, LOCAL, SNAPSHOT_EVERY};
use crux_store::merge::{aside_key, survivor};
use crux_store::resource::{Op, ResourceId, ResourceQuery, Txn};
use crux_store::{
    hex, Applied, Command, GroupNodes, GroupSeen, MusterEntry, Query, QueryResult, Store,
    StoreError, MERGED_PREFIX,
};
use tokio::net::TcpListener;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(15);

/// Waits (with a deadline) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn entry(inst: &str, digit: u64) -> MusterEntry {
    MusterEntry {
        horde: "h".into(),
        api: "echo".into(),
        inst: inst.into(),
        filename: format!("sha256:{digit:064x}"),
        function: "main".into(),
        timestamp_ms: crux_store::now_ms(),
    }
}

fn put(key: &str, value: &str) -> Command {
    Command::DocPut {
        key: key.into(),
        value: value.into(),
        if_generation: None,
    }
}

fn muster_of(r: QueryResult) -> Vec<MusterEntry> {
    match r {
        QueryResult::Muster(v) => v,
        other => panic!("{other:?}"),
    }
}

fn local_doc(s: &Store, key: &str) -> Option<String> {
    match s.local(Query::DocGet { key: key.into() }) {
        QueryResult::Doc(d) => d.map(|d| d.0),
        other => panic!("{other:?}"),
    }
}

fn local_muster(s: &Store) -> Vec<MusterEntry> {
    muster_of(s.local(Query::MusterSearch {
        horde: None,
        api: None,
        inst: None,
    }))
}

/// `n` stores with ids from `first`: nodes `..split` initialized as one group and `split..` as
/// another. Waits until each group is named (by its first leader, the same id on every member);
/// the tempdir, the nodes, and the two group ids.
async fn two_groups(
    first: u64,
    n: usize,
    split: usize,
) -> (tempfile::TempDir, Vec<Node>, u64, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let fleet = Fleet::default();
    let mut nodes = Vec::new();
    for i in 0..n as u64 {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let dir = tmp.path().join(format!("n{i}"));
        nodes.push(Node::start(&fleet, first + i, dir, listener, SNAPSHOT_EVERY).await);
    }
    let ids: Vec<(u64, SocketAddr)> = nodes.iter().map(|n| (n.id, n.netid)).collect();
    let voters =
        |r: std::ops::Range<usize>| -> BTreeMap<u64, SocketAddr> { r.map(|i| ids[i]).collect() };
    nodes[0].store.initialize(voters(0..split)).await.unwrap();
    nodes[split]
        .store
        .initialize(voters(split..n))
        .await
        .unwrap();
    until("both groups named on every member", || {
        nodes.iter().all(|n| n.store.group().is_some())
    })
    .await;
    let a = nodes[0].store.group().unwrap();
    let b = nodes[split].store.group().unwrap();
    (tmp, nodes, a, b)
}

/// Nodes 0-1 form one group and nodes 2-4 another, each with its own data (and one document and
/// one muster entry both hold with different values). The merge copies the smaller group's data
/// into the larger, writes on the sealed side fail with a clear error, the smaller group's nodes
/// abandon their stores at runtime and join the survivor, and every entry is then on all five.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_groups_formed_apart_merge_into_one() {
    let (tmp, mut nodes, a, b) = two_groups(100, 5, 2).await;
    let ids: Vec<(u64, SocketAddr)> = nodes.iter().map(|n| (n.id, n.netid)).collect();
    assert_ne!(a, b);
    assert_eq!(nodes[1].store.group(), Some(a));
    assert!(nodes[3..].iter().all(|n| n.store.group() == Some(b)));
    assert_eq!(nodes[4].store.status().group, Some(hex(b)));

    // Different data on each side.
    let side_a = [
        entry("a1", 1),
        entry("a2", 2),
        entry("both", 3),
        entry("same", 9),
    ];
    let side_b = [entry("b1", 4), entry("both", 5), entry("same", 9)];
    for e in &side_a {
        nodes[1]
            .store
            .write(Command::MusterAdd(e.clone()))
            .await
            .unwrap();
    }
    for e in &side_b {
        nodes[3]
            .store
            .write(Command::MusterAdd(e.clone()))
            .await
            .unwrap();
    }
    nodes[1].store.write(put("only-a", "1")).await.unwrap();
    nodes[1].store.write(put("shared", "from-a")).await.unwrap();
    nodes[4].store.write(put("only-b", "2")).await.unwrap();
    nodes[4].store.write(put("shared", "from-b")).await.unwrap();
    // K/V keys (resources) likewise.
    let kv = |k: &str, v: &str| {
        Txn::new(vec![Op::Put {
            id: ResourceId::kv("default", k),
            flags: 0,
            spec: v.as_bytes().to_vec(),
            if_version: None,
        }])
    };
    for (n, k, v) in [
        (1, "kv-a", "1"),
        (1, "kv-shared", "from-a"),
        (3, "kv-shared", "from-b"),
    ] {
        nodes[n].store.resource_txn(kv(k, v), false).await.unwrap();
    }

    // The group id survives a restart (and is the same after it).
    nodes[4].restart(SNAPSHOT_EVERY).await;
    until("node 4 back in group b", || {
        nodes[4].store.group() == Some(b)
    })
    .await;

    // The survivor: the group with more live members.
    let applied = |r: std::ops::Range<usize>| {
        r.filter_map(|i| nodes[i].store.status().last_applied)
            .max()
            .unwrap_or(0)
    };
    let seen = [
        GroupSeen {
            id: a,
            live: 2,
            applied: applied(0..2),
        },
        GroupSeen {
            id: b,
            live: 3,
            applied: applied(2..5),
        },
    ];
    assert_eq!(survivor(&seen).unwrap().id, b);
    let loser = GroupNodes {
        id: a,
        nodes: nodes[0..2].iter().map(|n| n.netid).collect(),
    };
    let winner = GroupNodes {
        id: b,
        nodes: nodes[2..5].iter().map(|n| n.netid).collect(),
    };
    // Giving the wrong nodes for a group changes nothing.
    let wrong = GroupNodes {
        id: a,
        nodes: winner.nodes.clone(),
    };
    assert!(matches!(
        nodes[0].store.merge(&wrong, &loser).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(nodes[0].store.status().sealed_into, None);

    // The merge, run from a node of the losing group.
    let report = nodes[0].store.merge(&loser, &winner).await.unwrap();
    assert_eq!(report.muster_added, 2, "{report:?}");
    assert_eq!(report.docs_added, 1, "{report:?}");
    assert_eq!(report.resources_added, 1, "{report:?}");
    assert_eq!(report.kept_aside.len(), 3, "{report:?}");
    // Run again: nothing new is copied.
    let again = nodes[1].store.merge(&loser, &winner).await.unwrap();
    assert_eq!(
        again.muster_added + again.docs_added + again.resources_added,
        0,
        "{again:?}"
    );
    for (k, want) in [
        ("kv-a".to_string(), "1"),
        ("kv-shared".to_string(), "from-b"),
        (aside_key(a, "kv-shared"), "from-a"),
    ] {
        let got = nodes[2]
            .store
            .resource_read(ResourceQuery::Get(ResourceId::kv("default", &k)), true)
            .await
            .unwrap()
            .items
            .pop()
            .map(|r| r.spec);
        assert_eq!(got, Some(want.as_bytes().to_vec()), "{k}");
    }
    assert_eq!(
        nodes[2]
            .store
            .merged_already(a, &winner)
            .await
            .unwrap()
            .map(|r| r.into),
        Some(hex(b))
    );

    // The sealed group refuses writes with a clear error and writes nothing.
    let refused = nodes[1]
        .store
        .write(Command::MusterAdd(entry("late", 7)))
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        StoreError::Merged {
            group: hex(a),
            into: hex(b)
        },
        "{refused}"
    );
    assert!(
        refused.to_string().contains("merged into group"),
        "{refused}"
    );
    assert!(local_muster(&nodes[0].store)
        .iter()
        .all(|e| e.inst != "late"));

    // Abandoning is refused for another group than the node's.
    assert!(matches!(
        nodes[2].store.abandon_at(nodes[0].netid, b, a).await,
        Err(StoreError::Invalid(_))
    ));
    // Node 0 abandons (at runtime) while node 1 still runs group a and keeps sending it Raft
    // traffic: node 0 refuses it, stays empty, and joins the survivor.
    let term = nodes[1].store.status().term;
    let mut watch0 = nodes[0].store.changes();
    nodes[2]
        .store
        .abandon_at(nodes[0].netid, a, b)
        .await
        .unwrap();
    // Subscribers made before keep receiving, told to re-read.
    loop {
        let c = tokio::time::timeout(WAIT, watch0.recv())
            .await
            .unwrap()
            .unwrap();
        if c == crux_store::Change::Reset {
            break;
        }
    }
    assert_eq!(nodes[0].store.group(), None);
    // Node 1, left alone in group a, calls elections; node 0 refuses to vote in them (an empty
    // node would otherwise grant its vote and be handed group a's log back).
    nodes[1]
        .store
        .wait_for(WAIT, "two more elections on node 1", |m| {
            m.current_term >= term + 2 || m.state == openraft::ServerState::Leader
        })
        .await
        .unwrap();
    assert_ne!(nodes[1].store.status().role, "leader");
    assert_eq!(nodes[0].store.group(), None);
    assert!(nodes[0].store.status().voters.is_empty());
    assert!(nodes[0].store.join_only());
    assert!(local_muster(&nodes[0].store).is_empty());
    assert!(std::fs::read_dir(tmp.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(&format!("n0.abandoned-{}", hex(a)))));
    nodes[3]
        .store
        .add_learner(nodes[0].id, nodes[0].netid)
        .await
        .unwrap();
    until("node 0 in group b", || nodes[0].store.group() == Some(b)).await;
    // The last node of the loser abandons too (its own store, through itself).
    nodes[1]
        .store
        .abandon_at(nodes[1].netid, a, b)
        .await
        .unwrap();
    nodes[2]
        .store
        .add_learner(nodes[1].id, nodes[1].netid)
        .await
        .unwrap();
    nodes[2]
        .store
        .set_voters(ids.into_iter().collect())
        .await
        .unwrap();

    // One group on all five, with every entry written on either side.
    until("one group on all five", || {
        nodes.iter().all(|n| n.store.group() == Some(b))
    })
    .await;
    let mut want: Vec<(String, String)> = side_b
        .iter()
        .map(|e| (e.inst.clone(), e.filename.clone()))
        .collect();
    want.extend(
        side_a
            .iter()
            .filter(|e| !side_b.iter().any(|f| f.inst == e.inst))
            .map(|e| (e.inst.clone(), e.filename.clone())),
    );
    want.sort();
    for n in &nodes {
        let mut got: Vec<(String, String)> = muster_of(
            n.store
                .read(Query::MusterSearch {
                    horde: None,
                    api: None,
                    inst: None,
                })
                .await
                .unwrap(),
        )
        .into_iter()
        .map(|e| (e.inst, e.filename))
        .collect();
        got.sort();
        assert_eq!(got, want, "node {:x}", n.id);
        until("the node's copy caught up", || {
            local_doc(&n.store, &format!("{MERGED_PREFIX}{}", hex(a))).is_some()
        })
        .await;
        assert_eq!(local_doc(&n.store, "only-a").as_deref(), Some("1"));
        assert_eq!(local_doc(&n.store, "only-b").as_deref(), Some("2"));
        // Both held `shared`: the survivor's value stays, the loser's is kept aside.
        assert_eq!(local_doc(&n.store, "shared").as_deref(), Some("from-b"));
        assert_eq!(
            local_doc(&n.store, &aside_key(a, "shared")).as_deref(),
            Some("from-a")
        );
        let both: MusterEntry = serde_json::from_str(
            &local_doc(&n.store, &aside_key(a, "muster/h/echo/both")).unwrap(),
        )
        .unwrap();
        assert_eq!(both.filename, side_a[2].filename);
    }
    // Writes through a former loser node land in the survivor.
    let w = nodes[1]
        .store
        .write(Command::MusterAdd(entry("after", 8)))
        .await
        .unwrap();
    assert_eq!(w, Applied::Ok);
    let found = muster_of(
        nodes[4]
            .store
            .read(Query::MusterSearch {
                horde: None,
                api: None,
                inst: Some("after".into()),
            })
            .await
            .unwrap(),
    );
    assert_eq!(found.len(), 1);
    // After a restart, a former loser node is still in the survivor.
    nodes[0].restart(SNAPSHOT_EVERY).await;
    until("node 0 back in group b", || {
        nodes[0].store.group() == Some(b)
    })
    .await;
    for n in &nodes {
        n.store.shutdown().await;
    }
}

/// A node of the losing group that was down during the merge comes back still in that group
/// (unsealed, without a quorum): the survivor's record of the merge lets it be told to abandon,
/// the nodes that left its group refuse its elections, and it joins the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loser_node_down_during_the_merge_abandons_when_it_returns() {
    let (_tmp, mut nodes, a, b) = two_groups(200, 6, 3).await;
    nodes[0]
        .store
        .write(Command::MusterAdd(entry("a", 1)))
        .await
        .unwrap();
    until("node 2 has group a's entry", || {
        !local_muster(&nodes[2].store).is_empty()
    })
    .await;
    // Node 2 goes down; groups a (nodes 0-1 live) and b merge without it.
    nodes[2].stop().await;
    let loser = GroupNodes {
        id: a,
        nodes: vec![nodes[0].netid, nodes[1].netid],
    };
    let winner = GroupNodes {
        id: b,
        nodes: nodes[3..].iter().map(|n| n.netid).collect(),
    };
    assert_eq!(
        nodes[3].store.merged_already(a, &winner).await.unwrap(),
        None
    );
    nodes[3].store.merge(&loser, &winner).await.unwrap();
    for i in 0..2 {
        nodes[3]
            .store
            .abandon_at(nodes[i].netid, a, b)
            .await
            .unwrap();
        nodes[4]
            .store
            .add_learner(nodes[i].id, nodes[i].netid)
            .await
            .unwrap();
    }
    until("nodes 0-1 in group b", || {
        nodes[..2].iter().all(|n| n.store.group() == Some(b))
    })
    .await;

    // Node 2 returns, still in group a and not sealed (it missed the seal).
    let listener = rebind(nodes[2].netid).await;
    let fleet = nodes[2].fleet.clone();
    nodes[2] = Node::start(
        &fleet,
        nodes[2].id,
        nodes[2].dir.clone(),
        listener,
        SNAPSHOT_EVERY,
    )
    .await;
    assert_eq!(nodes[2].store.group(), Some(a));
    let term = nodes[2].store.status().term;
    // Its elections find no voter: nodes 0 and 1 refuse group a's traffic now.
    nodes[2]
        .store
        .wait_for(WAIT, "two elections on node 2", |m| {
            m.current_term >= term + 2 || m.state == openraft::ServerState::Leader
        })
        .await
        .unwrap();
    assert_ne!(nodes[2].store.status().role, "leader");
    assert!(nodes[..2].iter().all(|n| n.store.group() == Some(b)));
    // The survivor's record says group a was merged: node 2 is told to abandon, and joins b.
    let record = nodes[5].store.merged_already(a, &winner).await.unwrap();
    assert_eq!(record.map(|r| r.muster_added), Some(1));
    nodes[5]
        .store
        .abandon_at(nodes[2].netid, a, b)
        .await
        .unwrap();
    nodes[5]
        .store
        .add_learner(nodes[2].id, nodes[2].netid)
        .await
        .unwrap();
    until("node 2 in group b with the merged entry", || {
        nodes[2].store.group() == Some(b)
            && local_muster(&nodes[2].store).iter().any(|e| e.inst == "a")
    })
    .await;
    for n in &nodes {
        n.store.shutdown().await;
    }
}
