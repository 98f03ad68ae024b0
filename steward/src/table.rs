//! A table of instances whose every change is numbered by a revision and kept in a bounded log, so
//! that a watcher gets a snapshot and then the changes, and one that comes back resumes from the
//! last revision it saw. The steward's registry and every reeve's replica are such a table.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crux_proto::grpc::steward::v1::Instance;
use tokio::sync::broadcast;

/// Changes kept in the log for resuming watchers (counted in instances, not change sets); a
/// table made [`Table::with_log_of_table_size`] keeps at least as many as it holds instances.
pub const LOG_MAX: usize = 16_384;
/// Change sets a slow subscriber may fall behind before it must resync.
const CHANNEL_CAPACITY: usize = 1024;

/// One committed change set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Change {
    /// The table's revision after it.
    pub revision: u64,
    /// True: `put` is the whole table (a reset); everything else is gone.
    pub snapshot: bool,
    /// Instances that appeared or changed, as they are now.
    pub put: Vec<Instance>,
    /// Instances that are gone, as they were.
    pub remove: Vec<Instance>,
}

impl Change {
    fn len(&self) -> usize {
        self.put.len() + self.remove.len()
    }
}

/// The numbered table.
#[derive(Debug)]
pub struct Table {
    map: HashMap<String, Instance>,
    /// Ids by (horde, api) and by (horde, inst), so that a lookup reads only what it selects.
    by_api: HashMap<(String, String), std::collections::HashSet<String>>,
    by_inst: HashMap<(String, String), std::collections::HashSet<String>>,
    revision: u64,
    log: VecDeque<Arc<Change>>,
    log_len: usize,
    /// Whether the log grows with the table (to at least as many changes as instances).
    log_scales: bool,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Default for Table {
    fn default() -> Self {
        Table::new()
    }
}

/// Whether two records say the same (the revision and the validity left do not count).
pub fn same_record(a: &Instance, b: &Instance) -> bool {
    a.api == b.api
        && a.inst == b.inst
        && a.addr == b.addr
        && a.horde == b.horde
        && a.node == b.node
        && a.metadata == b.metadata
        && a.public_key == b.public_key
        && a.state == b.state
        && a.health == b.health
}

impl Table {
    /// An empty table at revision 0.
    pub fn new() -> Table {
        Table {
            map: HashMap::new(),
            by_api: HashMap::new(),
            by_inst: HashMap::new(),
            revision: 0,
            log: VecDeque::new(),
            log_len: 0,
            log_scales: false,
            tx: broadcast::channel(CHANNEL_CAPACITY).0,
        }
    }

    /// An empty table whose log keeps at least as many instance changes as the table holds
    /// instances (and at least [`LOG_MAX`]): the steward's, so that a reeve that relinks after
    /// a burst of changes resumes from the log instead of needing the whole table again.
    pub fn with_log_of_table_size() -> Table {
        Table {
            log_scales: true,
            ..Table::new()
        }
    }

    /// Instance changes the log keeps now.
    pub fn log_max(&self) -> usize {
        if self.log_scales {
            LOG_MAX.max(self.map.len())
        } else {
            LOG_MAX
        }
    }

    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// One instance.
    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.map.get(id)
    }

    /// Every instance, in no order.
    pub fn iter(&self) -> impl Iterator<Item = &Instance> + Clone {
        self.map.values()
    }

    /// New changes from now on. Take it under the same lock as a [`Table::snapshot`] or a
    /// [`Table::since`] so that nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// Every instance and the revision they are at.
    pub fn snapshot(&self) -> Change {
        Change {
            revision: self.revision,
            snapshot: true,
            put: self.map.values().cloned().collect(),
            remove: Vec::new(),
        }
    }

    /// The changes after `revision`, when the log still holds all of them.
    pub fn since(&self, revision: u64) -> Option<Vec<Arc<Change>>> {
        if revision > self.revision {
            return None;
        }
        if revision == self.revision {
            return Some(Vec::new());
        }
        let first = self.log.front()?;
        if first.revision > revision + 1 {
            return None; // the log was trimmed past it
        }
        Some(
            self.log
                .iter()
                .filter(|c| c.revision > revision)
                .cloned()
                .collect(),
        )
    }

    /// Applies puts (full records; no-ops skipped) and removals by id (absent ids skipped) as one
    /// change set. Returns it, or None when nothing changed.
    pub fn commit(&mut self, put: Vec<Instance>, remove: &[String]) -> Option<Arc<Change>> {
        let next = self.revision + 1;
        let mut change = Change {
            revision: next,
            ..Change::default()
        };
        for mut i in put {
            if let Some(old) = self.map.get(&i.id) {
                if same_record(old, &i) {
                    continue;
                }
            }
            i.revision = next;
            i.valid_for_ms = 0;
            match self.map.insert(i.id.clone(), i.clone()) {
                // A change of state or health (most changes: beats, expiry) keeps its place in
                // the indexes.
                Some(old) if old.horde == i.horde && old.api == i.api && old.inst == i.inst => {}
                Some(old) => {
                    self.unindex(&old);
                    self.index(&i);
                }
                None => self.index(&i),
            }
            change.put.push(i);
        }
        for id in remove {
            if let Some(old) = self.map.remove(id) {
                self.unindex(&old);
                change.put.retain(|p| &p.id != id);
                change.remove.push(old);
            }
        }
        self.publish(change)
    }

    fn index(&mut self, i: &Instance) {
        for (map, name) in [(&mut self.by_api, &i.api), (&mut self.by_inst, &i.inst)] {
            map.entry((i.horde.clone(), name.clone()))
                .or_default()
                .insert(i.id.clone());
        }
    }

    fn unindex(&mut self, i: &Instance) {
        for (map, name) in [(&mut self.by_api, &i.api), (&mut self.by_inst, &i.inst)] {
            let key = (i.horde.clone(), name.clone());
            if let Some(set) = map.get_mut(&key) {
                set.remove(&i.id);
                if set.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }

    /// The instances `selector` can pick in `horde` (a superset of its matches, read from the
    /// indexes; every instance of the horde for [`crate::Selector::All`]).
    pub fn candidates<'a>(
        &'a self,
        selector: &crate::Selector,
        horde: &str,
    ) -> Box<dyn Iterator<Item = &'a Instance> + 'a> {
        use crate::Selector;
        let horde = crate::select::horde_or_default(horde).to_string();
        let ids = |map: &'a HashMap<(String, String), std::collections::HashSet<String>>,
                   name: &str| {
            map.get(&(horde.clone(), name.to_string()))
                .into_iter()
                .flatten()
                .filter_map(|id| self.map.get(id))
        };
        match selector {
            Selector::Api(a) => Box::new(ids(&self.by_api, a)),
            Selector::Inst(n) => Box::new(ids(&self.by_inst, n)),
            Selector::Name(n) => {
                if self.by_inst.contains_key(&(horde.clone(), n.clone())) {
                    Box::new(ids(&self.by_inst, n))
                } else {
                    Box::new(ids(&self.by_api, n))
                }
            }
            Selector::All => Box::new(self.map.values().filter(move |i| i.horde == horde)),
        }
    }

    /// Makes the table equal to `instances` (a snapshot from elsewhere), as one change set of the
    /// differences. Returns it, or None when nothing changed.
    pub fn replace_all(&mut self, instances: Vec<Instance>) -> Option<Arc<Change>> {
        let keep: std::collections::HashSet<&str> =
            instances.iter().map(|i| i.id.as_str()).collect();
        let gone: Vec<String> = self
            .map
            .keys()
            .filter(|id| !keep.contains(id.as_str()))
            .cloned()
            .collect();
        drop(keep);
        self.commit(instances, &gone)
    }

    fn publish(&mut self, change: Change) -> Option<Arc<Change>> {
        if change.put.is_empty() && change.remove.is_empty() {
            return None;
        }
        self.revision = change.revision;
        let change = Arc::new(change);
        self.log_len += change.len();
        self.log.push_back(change.clone());
        let max = self.log_max();
        while self.log_len > max && self.log.len() > 1 {
            if let Some(old) = self.log.pop_front() {
                self.log_len -= old.len();
            }
        }
        // No subscriber is fine: nobody is watching.
        let _ = self.tx.send(change.clone());
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, addr: &str) -> Instance {
        Instance {
            id: id.into(),
            api: "a".into(),
            inst: format!("a_{id}"),
            addr: addr.into(),
            horde: "default".into(),
            ..Default::default()
        }
    }

    #[test]
    fn changes_are_numbered_and_no_ops_are_not_changes() {
        let mut t = Table::new();
        let mut rx = t.subscribe();
        let c = t
            .commit(vec![inst("1", "x:1"), inst("2", "x:2")], &[])
            .unwrap();
        assert_eq!(c.revision, 1);
        assert!(
            t.commit(vec![inst("1", "x:1")], &[]).is_none(),
            "same record"
        );
        assert!(t.commit(vec![], &["9".into()]).is_none(), "absent id");
        let c = t.commit(vec![inst("1", "x:9")], &["2".into()]).unwrap();
        assert_eq!((c.revision, c.put.len(), c.remove.len()), (2, 1, 1));
        assert_eq!(t.get("1").unwrap().revision, 2);
        assert_eq!(rx.try_recv().unwrap().revision, 1);
        assert_eq!(rx.try_recv().unwrap().revision, 2);
    }

    #[test]
    fn a_watcher_resumes_from_the_log_or_needs_a_snapshot() {
        let mut t = Table::new();
        for k in 0..10 {
            t.commit(vec![inst(&k.to_string(), "x:1")], &[]);
        }
        assert_eq!(t.since(10).unwrap().len(), 0);
        let after7: Vec<u64> = t.since(7).unwrap().iter().map(|c| c.revision).collect();
        assert_eq!(after7, [8, 9, 10]);
        assert!(t.since(11).is_none(), "from the future: snapshot");
        // Trim the log past revision 1.
        for k in 0..LOG_MAX {
            t.commit(vec![inst(&format!("b{k}"), "x:1")], &[]);
        }
        assert!(t.since(1).is_none());
        assert!(t.since(t.revision() - 5).is_some());
    }

    #[test]
    fn a_log_of_table_size_keeps_as_many_changes_as_the_table_has_instances() {
        let n = LOG_MAX + LOG_MAX / 2;
        let mut fixed = Table::new();
        let mut scaled = Table::with_log_of_table_size();
        for t in [&mut fixed, &mut scaled] {
            for k in 0..n {
                t.commit(vec![inst(&k.to_string(), "x:1")], &[]);
            }
        }
        assert!(fixed.since(1).is_none(), "trimmed to LOG_MAX");
        assert_eq!(scaled.log_max(), n);
        assert_eq!(scaled.since(1).unwrap().len(), n - 1);
        // A round of changes of every instance still leaves one table's worth to resume from.
        let r = scaled.revision();
        for k in 0..n {
            scaled.commit(vec![inst(&k.to_string(), "x:2")], &[]);
        }
        assert!(scaled.since(r).is_some());
        assert!(scaled.since(r - 1).is_none());
    }

    #[test]
    fn the_indexes_follow_every_change() {
        use crate::Selector;
        let mut t = Table::new();
        t.commit(vec![inst("1", "x:1"), inst("2", "x:2")], &[]);
        let ids = |t: &Table, s: &str| {
            let mut v: Vec<String> = t
                .candidates(&Selector::parse(s).unwrap(), "")
                .map(|i| i.id.clone())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&t, "a"), ["1", "2"]);
        assert_eq!(ids(&t, "a_2"), ["2"]);
        assert_eq!(ids(&t, "inst:a_1"), ["1"]);
        t.commit(vec![], &["1".into()]);
        assert_eq!(ids(&t, "api:a"), ["2"]);
        t.replace_all(vec![inst("3", "x:3")]);
        assert_eq!(ids(&t, "a"), ["3"]);
        assert!(ids(&t, "a_2").is_empty());
        assert!(t.candidates(&Selector::All, "other").next().is_none());
        assert_eq!(t.candidates(&Selector::All, "").count(), 1);
    }

    #[test]
    fn replace_all_commits_only_the_differences() {
        let mut t = Table::new();
        t.commit(vec![inst("1", "x:1"), inst("2", "x:2")], &[]);
        let c = t
            .replace_all(vec![inst("2", "x:2"), inst("3", "x:3")])
            .unwrap();
        assert_eq!(
            c.put.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["3"]
        );
        assert_eq!(
            c.remove.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["1"]
        );
        assert!(t
            .replace_all(vec![inst("2", "x:2"), inst("3", "x:3")])
            .is_none());
    }
}
