//! The steward's registry: the table, the validity of each instance, and what a reeve's batch does
//! to them. Soft state: everything here is rebuilt from the reeves after a failover.
//!
//! * A batch from a reeve puts full records, extends validity with beats and removes ids; a
//!   `full` batch also drops every other instance of that node.
//! * Past its valid-until time an instance turns `unknown`; after the grace period it is removed.
//!   A beat before that brings it back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::steward::v1::{Beat, Health, Instance, ReeveBatch, RunState};
use tokio::time::Instant;

use crate::select::{check_name, horde_or_default};
use crate::table::{Change, Table};

/// The longest validity one message may grant.
pub const VALID_FOR_MAX: Duration = Duration::from_secs(3600);

/// Per-instance bookkeeping the table does not carry.
#[derive(Clone, Debug)]
struct Meta {
    node: String,
    deadline: Instant,
    unknown_since: Option<Instant>,
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The change it made to the table.
    pub change: Option<Arc<Change>>,
    /// Beats for ids the registry does not hold (the reeve should send a full batch).
    pub unknown_ids: Vec<String>,
    /// Records refused, with the reason (the rest of the batch applies).
    pub refused: Vec<String>,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    table: Table,
    meta: HashMap<String, Meta>,
    grace: Duration,
    /// Pastiche tracker: digest → nodes holding it (whole or in part).
    holders: HashMap<String, HashSet<String>>,
    /// node → digests it holds.
    holds: HashMap<String, HashSet<String>>,
    /// node → its node gRPC NetID.
    netids: HashMap<String, String>,
}

fn valid_for(ms: u64) -> Duration {
    Duration::from_millis(ms).min(VALID_FOR_MAX)
}

/// A running state as the reeve may send it: unspecified is `starting`; `unknown` is the
/// steward's word only, and counts as `starting`.
fn norm_state(s: i32) -> i32 {
    match RunState::try_from(s) {
        Ok(RunState::Running) => RunState::Running as i32,
        Ok(RunState::Stopping) => RunState::Stopping as i32,
        _ => RunState::Starting as i32,
    }
}

fn norm_health(h: i32) -> i32 {
    match Health::try_from(h) {
        Ok(Health::Degraded) => Health::Degraded as i32,
        Ok(Health::Unhealthy) => Health::Unhealthy as i32,
        _ => Health::Healthy as i32,
    }
}

/// Checks a record from a reeve and fills its defaults.
fn check(mut i: Instance, node: &str) -> Result<Instance, String> {
    if i.id.is_empty() || i.id.len() > 128 {
        return Err(format!("instance id {:?}: must be 1-128 bytes", i.id));
    }
    check_name("api", &i.api).map_err(|e| e.0)?;
    check_name("inst", &i.inst).map_err(|e| e.0)?;
    i.horde = horde_or_default(&i.horde).to_string();
    check_name("horde", &i.horde).map_err(|e| e.0)?;
    if i.addr.is_empty() || i.addr.len() > 256 {
        return Err(format!("{}: addr must be 1-256 bytes", i.id));
    }
    if i.public_key.len() > 1024 {
        return Err(format!("{}: public key longer than 1 KiB", i.id));
    }
    i.node = node.to_string();
    i.state = norm_state(i.state);
    i.health = norm_health(i.health);
    Ok(i)
}

impl Registry {
    /// An empty registry; instances past valid-until are removed `grace` later.
    pub fn new(grace: Duration) -> Registry {
        Registry {
            table: Table::with_log_of_table_size(),
            meta: HashMap::new(),
            grace,
            holders: HashMap::new(),
            holds: HashMap::new(),
            netids: HashMap::new(),
        }
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Starts from a replica of an earlier steward's table (this node's reeve holds one): every
    /// instance is kept for `valid` unless its reeve re-registers it first. So a new steward
    /// answers whole at once, and what no reeve claims again expires as usual.
    pub fn seed(&mut self, instances: Vec<Instance>, now: Instant, valid: Duration) {
        for i in &instances {
            let unknown = i.state == RunState::Unknown as i32;
            self.meta.insert(
                i.id.clone(),
                Meta {
                    node: i.node.clone(),
                    deadline: now + valid,
                    unknown_since: unknown.then_some(now),
                },
            );
        }
        self.table.commit(instances, &[]);
    }

    /// Applies one batch from the reeve of `node` (already checked to be the sender).
    pub fn apply(&mut self, now: Instant, node: &str, batch: ReeveBatch) -> Applied {
        let mut applied = Applied::default();
        self.apply_holds(node, &batch);
        let mut put = Vec::with_capacity(batch.put.len() + batch.beats.len());
        let mut seen = HashSet::new();
        for raw in batch.put {
            let valid = valid_for(raw.valid_for_ms);
            match check(raw, node) {
                Ok(mut i) => {
                    if let Some(m) = self.meta.get(&i.id) {
                        if m.node != node {
                            applied
                                .refused
                                .push(format!("{}: registered by another node", i.id));
                            continue;
                        }
                    }
                    // No validity left: the reeve says it is past valid-until there, so it is
                    // `unknown` at once (not `starting` until the next expiry round).
                    let expired = valid.is_zero();
                    if expired {
                        i.state = RunState::Unknown as i32;
                    }
                    self.meta.insert(
                        i.id.clone(),
                        Meta {
                            node: node.to_string(),
                            deadline: now + valid,
                            unknown_since: expired.then_some(now),
                        },
                    );
                    seen.insert(i.id.clone());
                    put.push(i);
                }
                Err(why) => applied.refused.push(why),
            }
        }
        for Beat {
            id,
            state,
            health,
            valid_for_ms,
        } in batch.beats
        {
            let Some(m) = self.meta.get_mut(&id).filter(|m| m.node == node) else {
                applied.unknown_ids.push(id);
                continue;
            };
            m.deadline = now + valid_for(valid_for_ms);
            m.unknown_since = None;
            if let Some(old) = self.table.get(&id) {
                let (state, health) = (norm_state(state), norm_health(health));
                if old.state != state || old.health != health {
                    let mut i = old.clone();
                    i.state = state;
                    i.health = health;
                    put.push(i);
                }
            }
        }
        let mut remove: Vec<String> = batch
            .remove
            .into_iter()
            .filter(|id| self.meta.get(id).is_some_and(|m| m.node == node))
            .collect();
        if batch.full {
            remove.extend(
                self.meta
                    .iter()
                    .filter(|(id, m)| m.node == node && !seen.contains(*id))
                    .map(|(id, _)| id.clone()),
            );
        }
        for id in &remove {
            self.meta.remove(id);
        }
        applied.change = self.table.commit(put, &remove);
        applied
    }

    fn apply_holds(&mut self, node: &str, batch: &ReeveBatch) {
        if !batch.netid.is_empty() && batch.netid.len() <= 256 {
            self.netids.insert(node.to_string(), batch.netid.clone());
        }
        if batch.full {
            self.forget_holdings(node);
        }
        let ok = |d: &String| !d.is_empty() && d.len() <= 128;
        for d in batch.holds.iter().filter(|d| ok(d)) {
            self.holders
                .entry(d.clone())
                .or_default()
                .insert(node.to_string());
            self.holds
                .entry(node.to_string())
                .or_default()
                .insert(d.clone());
        }
        for d in &batch.unholds {
            if let Some(set) = self.holders.get_mut(d) {
                set.remove(node);
                if set.is_empty() {
                    self.holders.remove(d);
                }
            }
            if let Some(set) = self.holds.get_mut(node) {
                set.remove(d);
            }
        }
    }

    /// Forgets what `node` holds (its link closed: what it holds is told again when it links).
    pub fn forget_holdings(&mut self, node: &str) {
        if let Some(digests) = self.holds.remove(node) {
            for d in digests {
                if let Some(set) = self.holders.get_mut(&d) {
                    set.remove(node);
                    if set.is_empty() {
                        self.holders.remove(&d);
                    }
                }
            }
        }
    }

    /// The nodes holding `digest` and their NetIDs, in node order.
    pub fn holders(&self, digest: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .holders
            .get(digest)
            .into_iter()
            .flatten()
            .filter_map(|n| self.netids.get(n).map(|a| (n.clone(), a.clone())))
            .collect();
        out.sort();
        out
    }

    /// Marks instances past valid-until `unknown` and removes those unknown for longer than the
    /// grace period.
    pub fn expire(&mut self, now: Instant) -> Option<Arc<Change>> {
        let mut put = Vec::new();
        let mut remove = Vec::new();
        for (id, m) in self.meta.iter_mut() {
            match m.unknown_since {
                None if m.deadline <= now => {
                    m.unknown_since = Some(now);
                    if let Some(old) = self.table.get(id) {
                        let mut i = old.clone();
                        i.state = RunState::Unknown as i32;
                        put.push(i);
                    }
                }
                Some(since) if now.saturating_duration_since(since) >= self.grace => {
                    remove.push(id.clone());
                }
                _ => {}
            }
        }
        for id in &remove {
            self.meta.remove(id);
        }
        self.table.commit(put, &remove)
    }

    /// The validity left of an instance.
    pub fn valid_for(&self, id: &str, now: Instant) -> Duration {
        self.meta
            .get(id)
            .map(|m| m.deadline.saturating_duration_since(now))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, state: RunState, valid_ms: u64) -> Instance {
        Instance {
            id: id.into(),
            api: "galumph2".into(),
            inst: format!("galumph2_{id}"),
            addr: "127.0.0.1:9".into(),
            state: state as i32,
            valid_for_ms: valid_ms,
            ..Default::default()
        }
    }

    fn batch(put: Vec<Instance>, beats: Vec<Beat>, full: bool) -> ReeveBatch {
        ReeveBatch {
            put,
            beats,
            full,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_valid_until_an_instance_is_unknown_then_gone_after_the_grace() {
        let mut r = Registry::new(Duration::from_secs(60));
        let t0 = Instant::now();
        r.apply(
            t0,
            "n1",
            batch(vec![rec("1", RunState::Running, 3000)], vec![], false),
        );
        let i = r.table().get("1").unwrap();
        assert_eq!((i.horde.as_str(), i.node.as_str()), ("default", "n1"));
        assert!(r.expire(t0 + Duration::from_millis(2999)).is_none());
        let c = r.expire(t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(c.put[0].state, RunState::Unknown as i32);
        assert!(
            r.expire(t0 + Duration::from_secs(62)).is_none(),
            "within grace"
        );
        let c = r.expire(t0 + Duration::from_secs(63)).unwrap();
        assert_eq!(c.remove.len(), 1);
        assert!(r.table().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_beat_extends_validity_and_revives_an_unknown_instance() {
        let mut r = Registry::new(Duration::from_secs(60));
        let t0 = Instant::now();
        r.apply(
            t0,
            "n1",
            batch(vec![rec("1", RunState::Running, 1000)], vec![], false),
        );
        r.expire(t0 + Duration::from_secs(2));
        let beat = Beat {
            id: "1".into(),
            state: RunState::Running as i32,
            health: Health::Healthy as i32,
            valid_for_ms: 3000,
        };
        let a = r.apply(
            t0 + Duration::from_secs(2),
            "n1",
            batch(vec![], vec![beat], false),
        );
        assert_eq!(a.change.unwrap().put[0].state, RunState::Running as i32);
        assert!(r.expire(t0 + Duration::from_millis(4900)).is_none());
        // A beat from another node, or for an id it never had, is not applied.
        let stray = Beat {
            id: "1".into(),
            ..Default::default()
        };
        let a = r.apply(t0, "n2", batch(vec![], vec![stray], false));
        assert_eq!(a.unknown_ids, ["1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_without_validity_is_unknown_at_once_and_a_beat_revives_it() {
        let mut r = Registry::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = r.apply(
            t0,
            "n1",
            batch(vec![rec("1", RunState::Running, 0)], vec![], false),
        );
        assert_eq!(a.change.unwrap().put[0].state, RunState::Unknown as i32);
        assert!(r.expire(t0).is_none(), "already unknown");
        let beat = Beat {
            id: "1".into(),
            state: RunState::Running as i32,
            health: Health::Healthy as i32,
            valid_for_ms: 3000,
        };
        let a = r.apply(t0, "n1", batch(vec![], vec![beat], false));
        assert_eq!(a.change.unwrap().put[0].state, RunState::Running as i32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_drops_what_the_node_no_longer_has() {
        let mut r = Registry::new(Duration::from_secs(60));
        let t0 = Instant::now();
        r.apply(
            t0,
            "n1",
            batch(
                vec![
                    rec("1", RunState::Running, 3000),
                    rec("2", RunState::Running, 3000),
                ],
                vec![],
                false,
            ),
        );
        r.apply(
            t0,
            "n2",
            batch(vec![rec("3", RunState::Running, 3000)], vec![], false),
        );
        let a = r.apply(
            t0,
            "n1",
            batch(vec![rec("2", RunState::Running, 3000)], vec![], true),
        );
        let c = a.change.unwrap();
        assert_eq!(
            c.remove.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["1"]
        );
        assert_eq!(r.table().len(), 2, "n2's instance stays");
        // n2 cannot take over n1's instance id.
        let a = r.apply(
            t0,
            "n2",
            batch(vec![rec("2", RunState::Running, 3000)], vec![], false),
        );
        assert_eq!(a.refused.len(), 1);
        assert_eq!(r.table().get("2").unwrap().node, "n1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_tracker_knows_who_holds_what_until_the_link_closes() {
        let mut r = Registry::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let held = |netid: &str, holds: &[&str], unholds: &[&str], full: bool| ReeveBatch {
            netid: netid.into(),
            holds: holds.iter().map(|s| s.to_string()).collect(),
            unholds: unholds.iter().map(|s| s.to_string()).collect(),
            full,
            ..Default::default()
        };
        r.apply(
            t0,
            "n1",
            held("10.0.0.1:7701", &["sha256:a", "sha256:b"], &[], true),
        );
        r.apply(t0, "n2", held("10.0.0.2:7701", &["sha256:a"], &[], true));
        assert_eq!(
            r.holders("sha256:a"),
            [
                ("n1".to_string(), "10.0.0.1:7701".to_string()),
                ("n2".to_string(), "10.0.0.2:7701".to_string())
            ]
        );
        r.apply(t0, "n1", held("", &[], &["sha256:a"], false));
        assert_eq!(r.holders("sha256:a").len(), 1);
        // A full batch replaces the node's set.
        r.apply(t0, "n1", held("", &["sha256:c"], &[], true));
        assert!(r.holders("sha256:b").is_empty());
        r.forget_holdings("n2");
        assert!(r.holders("sha256:a").is_empty());
        assert_eq!(r.holders("sha256:c").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_records_are_refused_and_the_rest_applies() {
        let mut r = Registry::new(Duration::from_secs(60));
        let mut bad = rec("x", RunState::Running, 1000);
        bad.api = "no spaces".into();
        let a = r.apply(
            Instant::now(),
            "n1",
            batch(vec![bad, rec("1", RunState::Running, 1000)], vec![], false),
        );
        assert_eq!(a.refused.len(), 1);
        assert!(a.refused[0].contains("api"), "{:?}", a.refused);
        assert_eq!(r.table().len(), 1);
    }
}
