//! End-to-end: a bloc cold-booted while partitioned forms two store groups (nodes 1-2 and 3-5,
//! whose address spaces do not reach each other), each writes its own muster entries and a
//! document both hold; once every node probes the whole space the flocks merge, and the flock
//! leader merges the stores into one group without losing any acknowledged write.

use std::collections::BTreeSet;
use std::time::Duration;

use crux_tests::cluster::Cluster;

mod common;
use common::{put_doc, reeve, runtime, status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(60);

fn add(c: &Cluster, k: usize, inst: &str) -> Result<(), String> {
    common::muster_add(c, k, "merge", inst)
}

fn search(c: &Cluster, k: usize) -> Result<BTreeSet<String>, String> {
    common::muster_search(c, k, "merge")
}

fn get_doc(c: &Cluster, k: usize, key: &str) -> Result<Option<String>, String> {
    use crux_proto::grpc::reeve::v1 as pb;
    runtime().block_on(async {
        let r = reeve(c, k)
            .await
            .doc_get(pb::DocGetRequest { key: key.into() })
            .await
            .map_err(|s| format!("node{k}: {}", s.message()))?
            .into_inner();
        Ok(r.found.then_some(r.value))
    })
}

/// The group every node in `nodes` reports, once they all report the same one with a leader.
fn one_group(c: &Cluster, nodes: &[usize]) -> Result<String, String> {
    let mut seen = BTreeSet::new();
    for &k in nodes {
        let s = status(c, k)?;
        if s.leader_addr.is_empty() || s.voters.is_empty() {
            return Err(format!("node{k}: no leader yet: {s:?}"));
        }
        seen.insert(s.group.ok_or_else(|| format!("node{k}: no group yet"))?);
    }
    if seen.len() == 1 {
        Ok(seen.into_iter().next().unwrap_or_default())
    } else {
        Err(format!("groups {seen:?}"))
    }
}

#[test]
fn groups_formed_apart_merge_when_the_flocks_do() {
    let mut c = Cluster::new(BIN, 1, 5, PRESET);
    let a = [1, 2];
    let b = [3, 4, 5];
    for k in a {
        c.set_space(k, 1..=2);
    }
    for k in b {
        c.set_space(k, 3..=5);
    }
    c.start_all();
    c.stable_agreement(&a, Duration::from_secs(1), CONVERGE);
    c.stable_agreement(&b, Duration::from_secs(1), CONVERGE);
    let ga = c.wait_for("side a's group", CONVERGE, || one_group(&c, &a));
    let gb = c.wait_for("side b's group", CONVERGE, || one_group(&c, &b));
    assert_ne!(ga, gb, "two groups formed apart");

    // Each side writes its own entries, and a document both hold with different values.
    for inst in ["a1", "a2"] {
        c.wait_for("a write on side a", CONVERGE, || add(&c, 1, inst));
    }
    for inst in ["b1", "b2", "b3"] {
        c.wait_for("a write on side b", CONVERGE, || add(&c, 4, inst));
    }
    c.wait_for("a doc on side a", CONVERGE, || {
        put_doc(&c, 2, "shared", "from-a")
    });
    c.wait_for("a doc on side b", CONVERGE, || {
        put_doc(&c, 5, "shared", "from-b")
    });
    assert_eq!(
        search(&c, 2).unwrap(),
        ["a1", "a2"].map(String::from).into()
    );
    assert_eq!(
        search(&c, 3).unwrap(),
        ["b1", "b2", "b3"].map(String::from).into()
    );

    // The heal: every node probes the whole space (restarted, keeping its store).
    for k in 1..=5 {
        c.kill9(k);
        c.set_space(k, 1..=5);
    }
    c.start_all();
    let all = [1, 2, 3, 4, 5];
    c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let want: BTreeSet<String> = ["a1", "a2", "b1", "b2", "b3"].map(String::from).into();
    let group = c.wait_for("one group with every entry on all five", CONVERGE, || {
        let g = one_group(&c, &all)?;
        for k in all {
            let got = search(&c, k)?;
            if got != want {
                return Err(format!("node{k}: {got:?}"));
            }
        }
        Ok(g)
    });
    // The survivor is the group with more live members: side b's.
    assert_eq!(group, gb);
    // Both held `shared`: the survivor's value stays, side a's is kept aside.
    for k in all {
        assert_eq!(get_doc(&c, k, "shared").unwrap().as_deref(), Some("from-b"));
        assert_eq!(
            get_doc(&c, k, &format!("merged/{ga}/shared"))
                .unwrap()
                .as_deref(),
            Some("from-a"),
            "node{k}"
        );
    }
    // New writes through a former side-a node land in the one group.
    c.wait_for("a write after the merge", CONVERGE, || add(&c, 1, "after"));
    let mut want = want;
    want.insert("after".into());
    for k in all {
        assert_eq!(search(&c, k).unwrap(), want, "node{k}");
    }
    // The store's own documents cannot be written by clients.
    assert!(put_doc(&c, 3, "store/group", "0000000000000001").is_err());
    assert_eq!(one_group(&c, &all).unwrap(), gb);
}
