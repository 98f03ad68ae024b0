//! Merging two store groups that were formed apart into one.
//!
//! A bloc that cold-boots while partitioned forms a flock, and a Raft group, on each side. When the
//! flocks merge, the flock leader sees live members in more than one group and picks a survivor
//! ([`survivor`]); each other group (a loser) is merged into it by [`crate::Store::merge`]:
//!
//! 1. **Seal** the loser: the [`SEALED_KEY`] document (naming the survivor) is written through
//!    the loser's leader. From the moment it is applied the loser refuses every write with
//!    [`StoreError::Merged`] ("group L was merged into group S … retry"): a write made on the
//!    losing side during the merge either was acknowledged before the seal, and is then copied,
//!    or fails with that error and nothing is written. Raft orders the seal after every write it
//!    acknowledged, so a read after the seal sees them all.
//! 2. **Copy**: the loser's whole data is read consistently (after the seal it can no longer
//!    change) and compared with the survivor's; the differences become ordinary writes through the
//!    survivor's leader ([`plan`]): muster entries the survivor lacks are added; documents it lacks
//!    are created (compare-and-swap on absence); a muster entry or document both hold with
//!    different values keeps the survivor's, and the loser's is written under
//!    `merged/<loser id>/<key>` (muster entries as `merged/<loser id>/muster/<horde>/<api>/<inst>`,
//!    JSON; resources, such as K/V keys, under the name `merged/<loser id>/<name>` of the same
//!    type and horde: [`plan_resources`]) and logged. A conflicting concurrent write makes the plan be computed again. Document
//!    generations are the survivor's (a copied document gets a new one).
//! 3. **Record**: `store/merged/<loser id>` in the survivor holds the [`MergeReport`].
//! 4. **Abandon**: every live node of the loser is told to abandon its store
//!    ([`crate::Store::abandon`]): it sets the database aside, opens an empty one and joins the
//!    survivor through the usual voter and learner supervision. A loser node that was down comes
//!    back later still in the loser group; the flock leader then finds the record and only tells
//!    it to abandon (its data cannot hold anything the sealed loser had not committed).
//!
//! A loser that cannot be sealed (it has no quorum among the live nodes and was never merged)
//! cannot be merged automatically: the flock leader logs a warning each round and retries; the
//! operator recovers it (`crux store recover`) or discards its nodes' stores (`--discard`). While it
//! is visible, voter and learner changes go on only if the flock leader is in the survivor, and
//! never add a node of another group.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::resource::{
    registry, Op, Outcome, ReadResult, Resource, ResourceId, ResourceQuery, Txn,
};
use crate::types::{hex, GROUP_KEY, MERGED_PREFIX, SEALED_KEY};
use crate::{
    Answer, Applied, Command, Fail, Forwarded, MusterEntry, Query, QueryResult, Store, StoreError,
};

/// Most commands in one merge write (each write is one Raft entry).
const BATCH: usize = 200;

/// How long one step of a merge (a seal, a read, a batch) may take.
const STEP: Duration = Duration::from_secs(10);

/// One group as the flock leader sees it: its id and where some of its live members are (its
/// leader first, if known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupNodes {
    /// The group's id.
    pub id: u64,
    /// NetIDs of live members of the group.
    pub nodes: Vec<SocketAddr>,
}

/// What a merge copied; kept in the survivor as `store/merged/<loser id>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct MergeReport {
    /// The loser's id.
    pub from: String,
    /// The survivor's id.
    pub into: String,
    /// Muster entries the survivor lacked, added.
    pub muster_added: usize,
    /// Documents the survivor lacked, created.
    pub docs_added: usize,
    /// Resources (K/V keys, …) the survivor lacked, created.
    #[serde(default)]
    pub resources_added: usize,
    /// Where the loser's values that differed from the survivor's were kept (`merged/...`;
    /// resources as `<type>:<horde>:merged/<loser id>/<name>`).
    pub kept_aside: Vec<String>,
    /// When the merge finished (Unix milliseconds).
    pub at_ms: u64,
}

/// A group as the flock leader sees it, for [`survivor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSeen {
    /// The group's id.
    pub id: u64,
    /// How many live members report it.
    pub live: usize,
    /// The highest applied index any of them reports.
    pub applied: u64,
}

/// The group that survives a merge: the one with the most live members, then the larger applied
/// index, then the smaller id. Deterministic: every flock leader that sees the same picks the same.
pub fn survivor(groups: &[GroupSeen]) -> Option<GroupSeen> {
    groups.iter().copied().max_by(|a, b| {
        (a.live, a.applied, std::cmp::Reverse(a.id)).cmp(&(
            b.live,
            b.applied,
            std::cmp::Reverse(b.id),
        ))
    })
}

/// The key under which a value of the loser that differs from the survivor's is kept.
pub fn aside_key(loser: u64, key: &str) -> String {
    format!("merged/{}/{key}", hex(loser))
}

fn muster_aside_key(loser: u64, e: &MusterEntry) -> String {
    aside_key(loser, &format!("muster/{}/{}/{}", e.horde, e.api, e.inst))
}

/// The writes that bring what the loser holds into the survivor, and the report of them (without
/// its time). Pure: the same data gives the same plan; an empty plan means nothing is missing.
pub fn plan(
    loser: u64,
    survivor: u64,
    loser_muster: &[MusterEntry],
    loser_docs: &[(String, String, u64)],
    survivor_muster: &[MusterEntry],
    survivor_docs: &[(String, String, u64)],
) -> (Vec<Command>, MergeReport) {
    let have_muster: BTreeMap<(&str, &str, &str), &MusterEntry> = survivor_muster
        .iter()
        .map(|e| ((e.horde.as_str(), e.api.as_str(), e.inst.as_str()), e))
        .collect();
    let have_docs: BTreeMap<&str, &str> = survivor_docs
        .iter()
        .map(|(k, v, _)| (k.as_str(), v.as_str()))
        .collect();
    let mut out = Vec::new();
    let mut report = MergeReport {
        from: hex(loser),
        into: hex(survivor),
        ..MergeReport::default()
    };
    let keep_aside =
        |out: &mut Vec<Command>, report: &mut MergeReport, key: String, value: &str| {
            if have_docs.get(key.as_str()).copied() != Some(value) {
                out.push(Command::DocPut {
                    key: key.clone(),
                    value: value.to_string(),
                    if_generation: None,
                });
            }
            report.kept_aside.push(key);
        };
    for e in loser_muster {
        match have_muster.get(&(e.horde.as_str(), e.api.as_str(), e.inst.as_str())) {
            None => {
                out.push(Command::MusterAdd(e.clone()));
                report.muster_added += 1;
            }
            // The same entry written on both sides (only the time differs): nothing to keep.
            Some(h) if h.filename == e.filename && h.function == e.function => {}
            Some(_) => {
                let value = serde_json::to_string(e).expect("plain data serializes");
                keep_aside(&mut out, &mut report, muster_aside_key(loser, e), &value);
            }
        }
    }
    for (key, value, _) in loser_docs {
        if key == GROUP_KEY || key == SEALED_KEY {
            continue;
        }
        match have_docs.get(key.as_str()) {
            None => {
                out.push(Command::DocPut {
                    key: key.clone(),
                    value: value.clone(),
                    if_generation: Some(0),
                });
                report.docs_added += 1;
            }
            Some(v) if v == value => {}
            Some(_) => keep_aside(&mut out, &mut report, aside_key(loser, key), value),
        }
    }
    (out, report)
}

/// The resource transactions that bring the loser's resources into the survivor: those it lacks
/// are created (compare-and-swap on absence); one both hold with a different spec or flags keeps
/// the survivor's, and the loser's is written under the name `merged/<loser id>/<name>` (same
/// type and horde). Each transaction stays within the registry's operation and byte limits.
/// Pure, like [`plan`]; adds to `report`.
pub fn plan_resources(
    loser: u64,
    loser_items: &[Resource],
    survivor_items: &[Resource],
    report: &mut MergeReport,
) -> Vec<Txn> {
    let have: BTreeMap<&ResourceId, &Resource> =
        survivor_items.iter().map(|r| (&r.id, r)).collect();
    let mut ops = Vec::new();
    for r in loser_items {
        match have.get(&r.id) {
            None => {
                ops.push(Op::Put {
                    id: r.id.clone(),
                    flags: r.flags,
                    spec: r.spec.clone(),
                    if_version: Some(0),
                });
                report.resources_added += 1;
            }
            Some(h) if h.spec == r.spec && h.flags == r.flags => {}
            Some(_) => {
                let id = ResourceId {
                    name: aside_key(loser, &r.id.name),
                    ..r.id.clone()
                };
                let same = have
                    .get(&id)
                    .is_some_and(|h| h.spec == r.spec && h.flags == r.flags);
                if !same {
                    ops.push(Op::Put {
                        id: id.clone(),
                        flags: r.flags,
                        spec: r.spec.clone(),
                        if_version: None,
                    });
                }
                report
                    .kept_aside
                    .push(format!("{}:{}:{}", id.rtype, id.horde, id.name));
            }
        }
    }
    let mut txns: Vec<Txn> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = match &op {
            Op::Put { spec, .. } => spec.len(),
            _ => 0,
        };
        let full = txns.last().is_none_or(|t| {
            t.ops.len() >= registry::TXN_OPS_MAX || bytes + size > registry::TXN_BYTES_MAX
        });
        if full {
            txns.push(Txn::new(Vec::new()));
            bytes = 0;
        }
        bytes += size;
        txns.last_mut().expect("pushed").ops.push(op);
    }
    txns
}

/// Documents as `(key, value, generation)`.
type Docs = Vec<(String, String, u64)>;

fn dump(r: QueryResult) -> Result<(Vec<MusterEntry>, Docs), StoreError> {
    match r {
        QueryResult::Dump { muster, docs } => Ok((muster, docs)),
        other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
    }
}

fn resources(r: QueryResult) -> Result<ReadResult, StoreError> {
    match r {
        QueryResult::Resource(r) => Ok(r),
        other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
    }
}

fn doc<'a>(docs: &'a [(String, String, u64)], key: &str) -> Option<&'a str> {
    docs.iter()
        .find(|(k, _, _)| k == key)
        .map(|(_, v, _)| v.as_str())
}

/// Checks that `docs` are those of group `id`.
fn check_group(docs: &[(String, String, u64)], id: u64) -> Result<(), StoreError> {
    match doc(docs, GROUP_KEY) {
        Some(g) if g == hex(id) => Ok(()),
        other => Err(StoreError::Invalid(format!(
            "the nodes given for group {} are in group {}: nothing merged",
            hex(id),
            other.unwrap_or("(none)")
        ))),
    }
}

impl Store {
    /// Runs `req` on the leader of the group `nodes` belong to (which need not be this node's
    /// group), following the nodes' hints, within `budget`.
    async fn call_at(
        &self,
        nodes: &[SocketAddr],
        req: &Forwarded,
        budget: Duration,
    ) -> Result<Answer, StoreError> {
        let deadline = Instant::now() + budget;
        let me = self.inner().config.netid;
        let write = matches!(req, Forwarded::Write(_));
        let mut queue: std::collections::VecDeque<SocketAddr> = nodes.iter().copied().collect();
        let mut tries = nodes.len() * 4 + 4;
        let mut why = String::from("no node given");
        while let Some(addr) = queue.pop_front() {
            if tries == 0 || Instant::now() >= deadline {
                break;
            }
            tries -= 1;
            let r = if addr == me {
                self.exec(req, deadline).await
            } else {
                self.forward(addr, req, deadline).await
            };
            match r {
                Ok(a) => return Ok(a),
                Err(Fail::Error(e)) => return Err(e),
                Err(Fail::NotLeader(Some(h))) if h.netid != addr => {
                    why = format!("{addr} does not lead");
                    queue.push_front(h.netid);
                }
                Err(Fail::NotLeader(_)) => {
                    why = format!("{addr} does not lead and knows no leader");
                    queue.push_back(addr);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Fail::NotSent(e)) => why = e,
                Err(Fail::NoAnswer(e)) if write => {
                    return Err(StoreError::Unconfirmed(format!(
                        "{addr} did not answer: {e}"
                    )))
                }
                Err(Fail::NoAnswer(e)) => why = e,
            }
        }
        Err(StoreError::NoQuorum(format!(
            "no leader of the group at {nodes:?} answered within {budget:?} (last: {why})"
        )))
    }

    async fn write_at(&self, nodes: &[SocketAddr], cmd: Command) -> Result<Applied, StoreError> {
        match self.call_at(nodes, &Forwarded::Write(cmd), STEP).await? {
            Answer::Applied(a) => Ok(a),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }

    async fn read_at(&self, nodes: &[SocketAddr], q: Query) -> Result<QueryResult, StoreError> {
        match self.call_at(nodes, &Forwarded::Read(q), STEP).await? {
            Answer::Read(r) => Ok(r),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }

    /// The record of an earlier merge of group `loser` into `survivor`, if the survivor holds one
    /// (a consistent read through the survivor's leader).
    pub async fn merged_already(
        &self,
        loser: u64,
        survivor: &GroupNodes,
    ) -> Result<Option<MergeReport>, StoreError> {
        let key = format!("{MERGED_PREFIX}{}", hex(loser));
        match self.read_at(&survivor.nodes, Query::DocGet { key }).await? {
            QueryResult::Doc(Some((v, _))) => Ok(serde_json::from_str(&v).ok()),
            QueryResult::Doc(None) => Ok(None),
            other => Err(StoreError::Raft(format!("unexpected answer {other:?}"))),
        }
    }

    /// Merges group `loser` into group `survivor` (see the module docs): seals the loser, copies
    /// what the survivor lacks, records the merge in the survivor. It does not abandon the loser's
    /// nodes: [`Store::abandon_at`] does, once this returned. Safe to run again: a second run
    /// copies nothing new.
    pub async fn merge(
        &self,
        loser: &GroupNodes,
        survivor: &GroupNodes,
    ) -> Result<MergeReport, StoreError> {
        if loser.id == survivor.id {
            return Err(StoreError::Invalid(format!(
                "group {} cannot be merged into itself",
                hex(loser.id)
            )));
        }
        // Check both sides are what they are said to be before sealing anything.
        let (_, sdocs) = dump(self.read_at(&survivor.nodes, Query::Dump).await?)?;
        check_group(&sdocs, survivor.id)?;
        if let Some(s) = doc(&sdocs, SEALED_KEY) {
            return Err(StoreError::Invalid(format!(
                "the survivor {} is itself sealed into {s}: nothing merged",
                hex(survivor.id)
            )));
        }
        let (_, ldocs) = dump(self.read_at(&loser.nodes, Query::Dump).await?)?;
        check_group(&ldocs, loser.id)?;
        // 1. Seal.
        let seal = Command::DocPut {
            key: SEALED_KEY.into(),
            value: hex(survivor.id),
            if_generation: Some(0),
        };
        match self.write_at(&loser.nodes, seal).await? {
            Applied::Doc { .. } => {
                warn!(
                    group = hex(loser.id),
                    into = hex(survivor.id),
                    "store group sealed: it takes no more writes"
                )
            }
            Applied::Sealed { into, .. } if into == hex(survivor.id) => {}
            Applied::Sealed { into, .. } => {
                return Err(StoreError::Invalid(format!(
                    "group {} is already sealed into group {into}, not {}",
                    hex(loser.id),
                    hex(survivor.id)
                )))
            }
            other => {
                return Err(StoreError::Raft(format!(
                    "sealing: unexpected answer {other:?}"
                )))
            }
        }
        // 2. Copy: the loser no longer changes.
        let (lmuster, ldocs) = dump(self.read_at(&loser.nodes, Query::Dump).await?)?;
        check_group(&ldocs, loser.id)?;
        if doc(&ldocs, SEALED_KEY) != Some(hex(survivor.id).as_str()) {
            return Err(StoreError::Raft(format!(
                "group {} read back unsealed after its seal",
                hex(loser.id)
            )));
        }
        let mut report = MergeReport::default();
        for round in 0.. {
            if round == 10 {
                return Err(StoreError::Raft(
                    "the survivor kept changing under the merge (10 rounds of conflicts)".into(),
                ));
            }
            let (smuster, sdocs) = dump(self.read_at(&survivor.nodes, Query::Dump).await?)?;
            check_group(&sdocs, survivor.id)?;
            let (cmds, r) = plan(loser.id, survivor.id, &lmuster, &ldocs, &smuster, &sdocs);
            if round == 0 {
                report = r;
            }
            if cmds.is_empty() {
                break;
            }
            let mut conflict = false;
            for chunk in cmds.chunks(BATCH) {
                match self
                    .write_at(&survivor.nodes, Command::Batch(chunk.to_vec()))
                    .await?
                {
                    Applied::Batch(_) => {}
                    Applied::Conflict { key, .. } => {
                        info!(%key, "merge write conflicted with a concurrent write; planning again");
                        conflict = true;
                        break;
                    }
                    other => {
                        return Err(StoreError::Raft(format!(
                            "copying into {}: unexpected answer {other:?}",
                            hex(survivor.id)
                        )))
                    }
                }
            }
            if !conflict {
                break;
            }
        }
        // The loser's resources, likewise.
        let lres = resources(
            self.read_at(&loser.nodes, Query::Resource(ResourceQuery::Every))
                .await?,
        )?;
        for round in 0.. {
            if round == 10 {
                return Err(StoreError::Raft(
                    "the survivor's resources kept changing under the merge (10 rounds of \
                     conflicts)"
                        .into(),
                ));
            }
            let sres = resources(
                self.read_at(&survivor.nodes, Query::Resource(ResourceQuery::Every))
                    .await?,
            )?;
            let mut r = MergeReport::default();
            let txns = plan_resources(loser.id, &lres.items, &sres.items, &mut r);
            if round == 0 {
                report.resources_added = r.resources_added;
                report.kept_aside.extend(r.kept_aside);
            }
            let mut conflict = false;
            for txn in txns {
                match self
                    .write_at(&survivor.nodes, Command::Resource(txn))
                    .await?
                {
                    Applied::Resource(Outcome::Applied { .. }) => {}
                    Applied::Resource(Outcome::Failed { id, .. }) => {
                        info!(name = %id.name, "merge write conflicted with a concurrent write; planning again");
                        conflict = true;
                        break;
                    }
                    other => {
                        return Err(StoreError::Raft(format!(
                            "copying resources into {}: unexpected answer {other:?}",
                            hex(survivor.id)
                        )))
                    }
                }
            }
            if !conflict {
                break;
            }
        }
        for k in &report.kept_aside {
            warn!(
                key = %k,
                from = hex(loser.id),
                into = hex(survivor.id),
                "both store groups held this entry with different values: the survivor's is kept, \
                 the loser's is kept under this key"
            );
        }
        // 3. Record.
        report.at_ms = crate::now_ms();
        let record = Command::DocPut {
            key: format!("{MERGED_PREFIX}{}", hex(loser.id)),
            value: serde_json::to_string(&report).expect("plain data serializes"),
            if_generation: None,
        };
        self.write_at(&survivor.nodes, record).await?;
        warn!(
            from = hex(loser.id),
            into = hex(survivor.id),
            muster_added = report.muster_added,
            docs_added = report.docs_added,
            resources_added = report.resources_added,
            kept_aside = report.kept_aside.len(),
            "store groups merged: the loser's data is in the survivor"
        );
        Ok(report)
    }

    /// Tells the node at `netid` (this node or another) to abandon its store of group `group`,
    /// merged into `into` ([`Store::abandon`]).
    pub async fn abandon_at(
        &self,
        netid: SocketAddr,
        group: u64,
        into: u64,
    ) -> Result<(), StoreError> {
        if netid == self.inner().config.netid {
            return self.abandon(group, into).await.map(|_| ());
        }
        let deadline = Instant::now() + STEP;
        match self
            .forward(netid, &Forwarded::Abandon { group, into }, deadline)
            .await
        {
            Ok(_) => Ok(()),
            Err(Fail::Error(e)) => Err(e),
            Err(Fail::NotSent(e)) | Err(Fail::NoAnswer(e)) => Err(StoreError::NoQuorum(e)),
            Err(Fail::NotLeader(_)) => Err(StoreError::Raft(format!(
                "{netid}: unexpected answer to an abandon request"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: &str, f: &str) -> MusterEntry {
        MusterEntry {
            horde: "h".into(),
            api: "a".into(),
            inst: i.into(),
            filename: format!("sha256:{f}"),
            function: "main".into(),
            timestamp_ms: 1,
        }
    }

    fn d(k: &str, v: &str) -> (String, String, u64) {
        (k.into(), v.into(), 1)
    }

    #[test]
    fn survivor_is_most_live_then_applied_then_smallest_id() {
        let g = |id, live, applied| GroupSeen { id, live, applied };
        assert_eq!(survivor(&[g(1, 2, 90), g(2, 3, 5)]).unwrap().id, 2);
        assert_eq!(survivor(&[g(1, 3, 90), g(2, 3, 5)]).unwrap().id, 1);
        assert_eq!(survivor(&[g(9, 3, 5), g(2, 3, 5)]).unwrap().id, 2);
        assert_eq!(survivor(&[g(2, 3, 5), g(9, 3, 5)]).unwrap().id, 2);
        assert_eq!(survivor(&[]), None);
    }

    #[test]
    fn plan_adds_missing_and_keeps_conflicts_aside() {
        let mut later = entry("same", "00");
        later.timestamp_ms = 7;
        let lm = vec![entry("only-loser", "01"), entry("both", "02"), later];
        let sm = vec![entry("both", "03"), entry("same", "00")];
        let ld = vec![
            d(GROUP_KEY, "0000000000000001"),
            d(SEALED_KEY, "0000000000000002"),
            d("x", "loser"),
            d("y", "same"),
            d("z", "new"),
        ];
        let sd = vec![
            d(GROUP_KEY, "0000000000000002"),
            d("x", "survivor"),
            d("y", "same"),
        ];
        let (cmds, report) = plan(1, 2, &lm, &ld, &sm, &sd);
        assert_eq!(report.muster_added, 1);
        assert_eq!(report.docs_added, 1);
        assert_eq!(
            report.kept_aside,
            vec![
                "merged/0000000000000001/muster/h/a/both".to_string(),
                "merged/0000000000000001/x".to_string()
            ]
        );
        assert_eq!(cmds.len(), 4);
        assert_eq!(cmds[0], Command::MusterAdd(entry("only-loser", "01")));
        assert!(cmds.contains(&Command::DocPut {
            key: "z".into(),
            value: "new".into(),
            if_generation: Some(0)
        }));
        assert!(cmds.contains(&Command::DocPut {
            key: "merged/0000000000000001/x".into(),
            value: "loser".into(),
            if_generation: None
        }));
        // Once applied, the plan is empty: a merge run twice copies nothing new.
        let mut sm2 = sm.clone();
        let mut sd2 = sd.clone();
        for c in &cmds {
            match c {
                Command::MusterAdd(e) => sm2.push(e.clone()),
                Command::DocPut { key, value, .. } => sd2.push(d(key, value)),
                other => panic!("{other:?}"),
            }
        }
        let (again, _) = plan(1, 2, &lm, &ld, &sm2, &sd2);
        assert!(again.is_empty(), "{again:?}");
    }

    fn kv(name: &str, spec: &[u8]) -> Resource {
        Resource {
            id: ResourceId::kv("default", name),
            version: 7,
            create_index: 7,
            flags: 0,
            spec: spec.to_vec(),
            status: Vec::new(),
        }
    }

    #[test]
    fn resources_missing_are_created_and_differing_ones_kept_aside_within_the_limits() {
        let mut loser: Vec<Resource> = (0..70).map(|i| kv(&format!("k{i:02}"), b"v")).collect();
        loser.push(kv("same", b"x"));
        loser.push(kv("shared", b"from-loser"));
        loser.push(kv("big1", &vec![1; 300 << 10]));
        loser.push(kv("big2", &vec![2; 300 << 10]));
        let survivor = vec![kv("same", b"x"), kv("shared", b"from-survivor")];
        let mut report = MergeReport::default();
        let txns = plan_resources(0xa, &loser, &survivor, &mut report);
        assert_eq!(report.resources_added, 72);
        assert_eq!(
            report.kept_aside,
            [format!("kv:default:merged/{}/shared", hex(0xa))]
        );
        let ops: usize = txns.iter().map(|t| t.ops.len()).sum();
        assert_eq!(ops, 73);
        for t in &txns {
            registry::check_txn(t, true).unwrap();
        }
        assert!(txns.iter().flat_map(|t| &t.ops).any(|o| matches!(o,
            Op::Put { id, spec, if_version: None, .. }
                if id.name == format!("merged/{}/shared", hex(0xa)) && spec == b"from-loser")));
        // Once applied, nothing more to do.
        let mut after = survivor.clone();
        for o in txns.iter().flat_map(|t| &t.ops) {
            if let Op::Put { id, spec, .. } = o {
                after.push(Resource {
                    id: id.clone(),
                    ..kv("", spec)
                });
            }
        }
        let mut again = MergeReport::default();
        assert!(plan_resources(0xa, &loser, &after, &mut again).is_empty());
        assert_eq!(again.resources_added, 0);
    }
}
