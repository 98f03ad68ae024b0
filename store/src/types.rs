//! What the store holds and the commands, answers and queries about it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::resource::{self, Batch, Outcome, ReadResult, ResourceQuery, Txn};

/// One muster entry: which executable (a pastiche digest and the function the runner starts) runs
/// instance `inst` of `api` in `horde`. Keyed by `(horde, api, inst)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MusterEntry {
    /// The horde (namespace).
    pub horde: String,
    /// The API the instance serves.
    pub api: String,
    /// The instance name.
    pub inst: String,
    /// The pastiche digest of the executable (`sha256:<hex>`).
    pub filename: String,
    /// The function (entry point) the runner starts.
    pub function: String,
    /// When the entry was written (milliseconds since the Unix epoch, set by the writer).
    pub timestamp_ms: u64,
}

/// A change of the replicated state. Applied in log order on every node, all or nothing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Adds a muster entry, replacing the one with the same `(horde, api, inst)`.
    MusterAdd(MusterEntry),
    /// Removes the muster entry `(horde, api, inst)`; answers [`Applied::Removed`].
    MusterRemove {
        /// The horde.
        horde: String,
        /// The API.
        api: String,
        /// The instance.
        inst: String,
    },
    /// Sets a document; answers [`Applied::Doc`] with its new generation, or
    /// [`Applied::Conflict`].
    DocPut {
        /// The document's key.
        key: String,
        /// Its new value.
        value: String,
        /// `None`: unconditional; `Some(0)`: only if the document is absent; `Some(n)`: only if
        /// its generation is `n`.
        if_generation: Option<u64>,
    },
    /// Deletes a document; answers [`Applied::Removed`] or [`Applied::Conflict`].
    DocDelete {
        /// The document's key.
        key: String,
        /// As for [`Command::DocPut`].
        if_generation: Option<u64>,
    },
    /// Several commands applied together, all or nothing: if one compare-and-swap fails, none is
    /// applied and the answer is that [`Applied::Conflict`]; otherwise [`Applied::Batch`] with one
    /// answer per command. A resource transaction inside a batch is refused (it answers
    /// [`Applied::Conflict`] on the key `(resource transaction in a batch)`): send it alone.
    Batch(Vec<Command>),
    /// A resource transaction ([`crate::resource`]), applied at its log index, all or nothing;
    /// answers [`Applied::Resource`].
    Resource(Txn),
}

/// The answer to a [`Command`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Done (a muster entry added; also the answer to Raft's own entries).
    Ok,
    /// A document was written; `generation` is its new generation.
    Doc {
        /// The document's key.
        key: String,
        /// Its generation now.
        generation: u64,
    },
    /// A compare-and-swap failed: `key` is at generation `current` (0: absent). Nothing was
    /// applied (in a batch, nothing of the batch).
    Conflict {
        /// The key whose generation did not match.
        key: String,
        /// Its generation (0: absent).
        current: u64,
    },
    /// Whether a removal found something to remove.
    Removed(bool),
    /// The answers of a [`Command::Batch`], in order.
    Batch(Vec<Applied>),
    /// The answer to a [`Command::Resource`].
    Resource(Outcome),
    /// Nothing was applied: this group was merged into another (its [`SEALED_KEY`] document is
    /// set) and takes no more writes. [`crate::Store::write`] answers it as
    /// [`crate::StoreError::Merged`].
    Sealed {
        /// This group's id (hex), if it has one.
        group: String,
        /// The id (hex) of the group it was merged into.
        into: String,
    },
}

/// The document holding the group's id (16 hex digits), written once by the first leader of a
/// group (compare-and-swap on absence, so the first write wins) and replicated like any document:
/// the same on every member, kept by snapshots and restarts. Reserved: never copied by a merge.
pub const GROUP_KEY: &str = "store/group";

/// The document that seals a group merged into another: its value is the survivor's id. Once it
/// is applied the group refuses every write ([`Applied::Sealed`]).
pub const SEALED_KEY: &str = "store/sealed";

/// The prefix of the documents recording a merge in the survivor: `store/merged/<loser id>`
/// holds a [`crate::merge::MergeReport`] as JSON.
pub const MERGED_PREFIX: &str = "store/merged/";

/// A read of the replicated state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// Muster entries matching every field given (none given: all), ordered by
    /// `(horde, api, inst)`.
    MusterSearch {
        /// Only this horde.
        horde: Option<String>,
        /// Only this API.
        api: Option<String>,
        /// Only this instance.
        inst: Option<String>,
    },
    /// One document.
    DocGet {
        /// Its key.
        key: String,
    },
    /// Every document whose key starts with `prefix`, ordered by key.
    DocList {
        /// The prefix ("" for all).
        prefix: String,
    },
    /// Everything: every muster entry and every document, read at one point of the log.
    Dump,
    /// Resources ([`crate::resource`]).
    Resource(ResourceQuery),
}

/// The answer to a [`Query`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum QueryResult {
    /// For [`Query::MusterSearch`].
    Muster(Vec<MusterEntry>),
    /// For [`Query::DocGet`]: the value and generation, if the document exists.
    Doc(Option<(String, u64)>),
    /// For [`Query::DocList`]: `(key, value, generation)`.
    Docs(Vec<(String, String, u64)>),
    /// For [`Query::Dump`].
    Dump {
        /// Every muster entry, ordered by `(horde, api, inst)`.
        muster: Vec<MusterEntry>,
        /// Every document `(key, value, generation)`, ordered by key.
        docs: Vec<(String, String, u64)>,
    },
    /// For [`Query::Resource`].
    Resource(ReadResult),
}

/// What the state machine applied on this node, in order (see [`crate::Store::changes`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A muster entry was added or replaced.
    MusterAdded(MusterEntry),
    /// A muster entry was removed.
    MusterRemoved {
        /// The horde.
        horde: String,
        /// The API.
        api: String,
        /// The instance.
        inst: String,
    },
    /// A document was written.
    DocPut {
        /// Its key.
        key: String,
        /// Its value.
        value: String,
        /// Its generation.
        generation: u64,
    },
    /// A document was deleted.
    DocDeleted {
        /// Its key.
        key: String,
    },
    /// The whole state was replaced (a snapshot was installed from the leader): re-read what you
    /// watch.
    Reset,
}

type MusterKey = (String, String, String);

/// The state machine's data. Document generations are store-wide revisions: each write of any
/// document takes the next one, so they only grow and are never reused (a delete and re-create
/// cannot fool a compare-and-swap).
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Data {
    revision: u64,
    muster: BTreeMap<MusterKey, MusterEntry>,
    docs: BTreeMap<String, (String, u64)>,
    pub(crate) resources: resource::Table,
}

/// How [`Data`] is written into a snapshot.
#[derive(Serialize, Deserialize)]
struct DataFile {
    revision: u64,
    muster: Vec<MusterEntry>,
    docs: Vec<(String, String, u64)>,
    /// Absent in snapshots written before resources existed.
    #[serde(default)]
    resources: resource::TableFile,
}

enum Undo {
    Muster(MusterKey, Option<MusterEntry>),
    Doc(String, Option<(String, u64)>),
    Revision(u64),
}

/// A group id as written in documents and status: 16 hex digits.
pub fn hex(id: u64) -> String {
    format!("{id:016x}")
}

fn muster_key(e: &MusterEntry) -> MusterKey {
    (e.horde.clone(), e.api.clone(), e.inst.clone())
}

impl Data {
    /// The group's id, once its first leader named it ([`GROUP_KEY`]).
    pub(crate) fn group(&self) -> Option<u64> {
        self.docs
            .get(GROUP_KEY)
            .and_then(|(v, _)| u64::from_str_radix(v, 16).ok())
    }

    /// The group this one was merged into, if it is sealed ([`SEALED_KEY`]).
    pub(crate) fn sealed(&self) -> Option<u64> {
        self.docs
            .get(SEALED_KEY)
            .and_then(|(v, _)| u64::from_str_radix(v, 16).ok())
    }

    /// Applies `cmd` (as the entry at log index 0).
    #[cfg(test)]
    pub(crate) fn apply(&mut self, cmd: &Command) -> (Applied, Vec<Change>) {
        let (a, c, _) = self.apply_at(0, cmd);
        (a, c)
    }

    /// Applies `cmd`, the log entry at `index`; returns the answer, what changed (nothing on a
    /// conflict, nothing once the group is sealed) and the resource changes, if any.
    pub(crate) fn apply_at(
        &mut self,
        index: u64,
        cmd: &Command,
    ) -> (Applied, Vec<Change>, Option<Arc<Batch>>) {
        if let Some(into) = self.sealed() {
            let group = self.group().map(hex).unwrap_or_default();
            return (
                Applied::Sealed {
                    group,
                    into: hex(into),
                },
                Vec::new(),
                None,
            );
        }
        if let Command::Resource(txn) = cmd {
            let (outcome, batch) = self.resources.apply(index, txn);
            return (Applied::Resource(outcome), Vec::new(), batch);
        }
        let mut undo = Vec::new();
        let mut changes = Vec::new();
        match self.apply_one(cmd, &mut undo, &mut changes) {
            Ok(a) => (a, changes, None),
            Err(conflict) => {
                for u in undo.into_iter().rev() {
                    match u {
                        Undo::Muster(k, Some(e)) => {
                            self.muster.insert(k, e);
                        }
                        Undo::Muster(k, None) => {
                            self.muster.remove(&k);
                        }
                        Undo::Doc(k, Some(d)) => {
                            self.docs.insert(k, d);
                        }
                        Undo::Doc(k, None) => {
                            self.docs.remove(&k);
                        }
                        Undo::Revision(r) => self.revision = r,
                    }
                }
                (conflict, Vec::new(), None)
            }
        }
    }

    fn generation(&self, key: &str) -> u64 {
        self.docs.get(key).map_or(0, |d| d.1)
    }

    fn apply_one(
        &mut self,
        cmd: &Command,
        undo: &mut Vec<Undo>,
        changes: &mut Vec<Change>,
    ) -> Result<Applied, Applied> {
        match cmd {
            Command::MusterAdd(e) => {
                let k = muster_key(e);
                let old = self.muster.insert(k.clone(), e.clone());
                undo.push(Undo::Muster(k, old));
                changes.push(Change::MusterAdded(e.clone()));
                Ok(Applied::Ok)
            }
            Command::MusterRemove { horde, api, inst } => {
                let k = (horde.clone(), api.clone(), inst.clone());
                match self.muster.remove(&k) {
                    Some(old) => {
                        undo.push(Undo::Muster(k, Some(old)));
                        changes.push(Change::MusterRemoved {
                            horde: horde.clone(),
                            api: api.clone(),
                            inst: inst.clone(),
                        });
                        Ok(Applied::Removed(true))
                    }
                    None => Ok(Applied::Removed(false)),
                }
            }
            Command::DocPut {
                key,
                value,
                if_generation,
            } => {
                let current = self.generation(key);
                if if_generation.is_some_and(|g| g != current) {
                    return Err(Applied::Conflict {
                        key: key.clone(),
                        current,
                    });
                }
                undo.push(Undo::Revision(self.revision));
                self.revision += 1;
                let generation = self.revision;
                let old = self.docs.insert(key.clone(), (value.clone(), generation));
                undo.push(Undo::Doc(key.clone(), old));
                changes.push(Change::DocPut {
                    key: key.clone(),
                    value: value.clone(),
                    generation,
                });
                Ok(Applied::Doc {
                    key: key.clone(),
                    generation,
                })
            }
            Command::DocDelete { key, if_generation } => {
                let current = self.generation(key);
                if if_generation.is_some_and(|g| g != current) {
                    return Err(Applied::Conflict {
                        key: key.clone(),
                        current,
                    });
                }
                match self.docs.remove(key) {
                    Some(old) => {
                        undo.push(Undo::Doc(key.clone(), Some(old)));
                        changes.push(Change::DocDeleted { key: key.clone() });
                        Ok(Applied::Removed(true))
                    }
                    None => Ok(Applied::Removed(false)),
                }
            }
            Command::Resource(_) => Err(Applied::Conflict {
                key: "(resource transaction in a batch)".into(),
                current: 0,
            }),
            Command::Batch(cmds) => {
                let mut out = Vec::with_capacity(cmds.len());
                for c in cmds {
                    out.push(self.apply_one(c, undo, changes)?);
                }
                Ok(Applied::Batch(out))
            }
        }
    }

    /// Answers `q` from this data.
    pub(crate) fn query(&self, q: &Query) -> QueryResult {
        match q {
            Query::MusterSearch { horde, api, inst } => {
                let want = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
                QueryResult::Muster(
                    self.muster
                        .values()
                        .filter(|e| {
                            want(horde, &e.horde) && want(api, &e.api) && want(inst, &e.inst)
                        })
                        .cloned()
                        .collect(),
                )
            }
            Query::DocGet { key } => QueryResult::Doc(self.docs.get(key).cloned()),
            Query::DocList { prefix } => QueryResult::Docs(
                self.docs
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, (v, g))| (k.clone(), v.clone(), *g))
                    .collect(),
            ),
            Query::Dump => QueryResult::Dump {
                muster: self.muster.values().cloned().collect(),
                docs: self
                    .docs
                    .iter()
                    .map(|(k, (v, g))| (k.clone(), v.clone(), *g))
                    .collect(),
            },
            Query::Resource(q) => QueryResult::Resource(self.resources.query(q)),
        }
    }

    /// The snapshot form.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let file = DataFile {
            revision: self.revision,
            muster: self.muster.values().cloned().collect(),
            docs: self
                .docs
                .iter()
                .map(|(k, (v, g))| (k.clone(), v.clone(), *g))
                .collect(),
            resources: self.resources.to_file(),
        };
        serde_json::to_vec(&file).expect("plain data serializes")
    }

    /// Reads the snapshot form.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Result<Data, serde_json::Error> {
        let file: DataFile = serde_json::from_slice(bytes)?;
        Ok(Data {
            revision: file.revision,
            muster: file
                .muster
                .into_iter()
                .map(|e| (muster_key(&e), e))
                .collect(),
            docs: file.docs.into_iter().map(|(k, v, g)| (k, (v, g))).collect(),
            resources: resource::Table::from_file(file.resources, 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(h: &str, a: &str, i: &str) -> MusterEntry {
        MusterEntry {
            horde: h.into(),
            api: a.into(),
            inst: i.into(),
            filename: "sha256:00".into(),
            function: "main".into(),
            timestamp_ms: 1,
        }
    }

    fn put(key: &str, value: &str, if_generation: Option<u64>) -> Command {
        Command::DocPut {
            key: key.into(),
            value: value.into(),
            if_generation,
        }
    }

    #[test]
    fn muster_add_replace_search_remove() {
        let mut d = Data::default();
        d.apply(&Command::MusterAdd(entry("h", "a", "1")));
        d.apply(&Command::MusterAdd(entry("h", "a", "2")));
        d.apply(&Command::MusterAdd(entry("g", "b", "1")));
        let mut e = entry("h", "a", "1");
        e.function = "other".into();
        d.apply(&Command::MusterAdd(e.clone()));
        let q = |d: &Data, h: Option<&str>, a: Option<&str>, i: Option<&str>| match d.query(
            &Query::MusterSearch {
                horde: h.map(Into::into),
                api: a.map(Into::into),
                inst: i.map(Into::into),
            },
        ) {
            QueryResult::Muster(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(q(&d, None, None, None).len(), 3);
        assert_eq!(q(&d, Some("h"), None, None).len(), 2);
        assert_eq!(q(&d, None, None, Some("1")).len(), 2);
        assert_eq!(q(&d, Some("h"), Some("a"), Some("1")), vec![e]);
        let rm = Command::MusterRemove {
            horde: "h".into(),
            api: "a".into(),
            inst: "1".into(),
        };
        assert_eq!(d.apply(&rm).0, Applied::Removed(true));
        assert_eq!(d.apply(&rm).0, Applied::Removed(false));
        assert_eq!(q(&d, None, None, None).len(), 2);
    }

    #[test]
    fn cas_and_generations() {
        let mut d = Data::default();
        assert_eq!(
            d.apply(&put("k", "v1", Some(0))).0,
            Applied::Doc {
                key: "k".into(),
                generation: 1
            }
        );
        assert_eq!(
            d.apply(&put("k", "v2", Some(0))).0,
            Applied::Conflict {
                key: "k".into(),
                current: 1
            }
        );
        assert_eq!(
            d.apply(&put("k", "v2", Some(1))).0,
            Applied::Doc {
                key: "k".into(),
                generation: 2
            }
        );
        let del = |g| Command::DocDelete {
            key: "k".into(),
            if_generation: g,
        };
        assert_eq!(
            d.apply(&del(Some(1))).0,
            Applied::Conflict {
                key: "k".into(),
                current: 2
            }
        );
        assert_eq!(d.apply(&del(Some(2))).0, Applied::Removed(true));
        // Re-created: a new generation, never an old one.
        assert_eq!(
            d.apply(&put("k", "v3", Some(0))).0,
            Applied::Doc {
                key: "k".into(),
                generation: 3
            }
        );
        assert_eq!(
            d.query(&Query::DocGet { key: "k".into() }),
            QueryResult::Doc(Some(("v3".into(), 3)))
        );
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let mut d = Data::default();
        d.apply(&put("x", "1", None));
        let before = d.clone();
        let (a, ch) = d.apply(&Command::Batch(vec![
            Command::MusterAdd(entry("h", "a", "1")),
            put("y", "1", Some(0)),
            Command::DocDelete {
                key: "x".into(),
                if_generation: None,
            },
            put("y", "2", Some(0)),
        ]));
        assert_eq!(
            a,
            Applied::Conflict {
                key: "y".into(),
                current: 2
            }
        );
        assert!(ch.is_empty());
        assert_eq!(d, before);
        let (a, ch) = d.apply(&Command::Batch(vec![
            Command::MusterAdd(entry("h", "a", "1")),
            put("y", "1", Some(0)),
        ]));
        assert_eq!(
            a,
            Applied::Batch(vec![
                Applied::Ok,
                Applied::Doc {
                    key: "y".into(),
                    generation: 2
                }
            ])
        );
        assert_eq!(ch.len(), 2);
    }

    #[test]
    fn group_id_and_seal() {
        let mut d = Data::default();
        assert_eq!(d.group(), None);
        d.apply(&put(GROUP_KEY, &hex(0xabc), Some(0)));
        // The first naming wins.
        assert!(matches!(
            d.apply(&put(GROUP_KEY, &hex(0xdef), Some(0))).0,
            Applied::Conflict { .. }
        ));
        assert_eq!(d.group(), Some(0xabc));
        d.apply(&Command::MusterAdd(entry("h", "a", "1")));
        d.apply(&put(SEALED_KEY, &hex(0x123), Some(0)));
        assert_eq!(d.sealed(), Some(0x123));
        let before = d.clone();
        let sealed = Applied::Sealed {
            group: hex(0xabc),
            into: hex(0x123),
        };
        for cmd in [
            Command::MusterAdd(entry("h", "a", "2")),
            put("k", "v", None),
            Command::Batch(vec![put("k", "v", None)]),
            put(SEALED_KEY, &hex(0x999), None),
        ] {
            let (a, changes) = d.apply(&cmd);
            assert_eq!(a, sealed);
            assert!(changes.is_empty());
        }
        assert_eq!(d, before);
        // Kept by snapshots.
        let back = Data::from_bytes(&d.to_bytes()).unwrap();
        assert_eq!((back.group(), back.sealed()), (Some(0xabc), Some(0x123)));
    }

    #[test]
    fn list_and_snapshot_round_trip() {
        let mut d = Data::default();
        for k in ["a/1", "a/2", "b/1", "a"] {
            d.apply(&put(k, k, None));
        }
        d.apply(&Command::MusterAdd(entry("h", "a", "1")));
        let QueryResult::Docs(docs) = d.query(&Query::DocList {
            prefix: "a/".into(),
        }) else {
            panic!()
        };
        assert_eq!(
            docs.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        let back = Data::from_bytes(&d.to_bytes()).unwrap();
        assert_eq!(back, d);
    }
}
