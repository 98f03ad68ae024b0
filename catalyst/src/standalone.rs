//! The standalone backend: this agent's topics, one [`TopicLog`] each under `<dir>/topics/`.
//!
//! A subscription is a stream that reads the next batch from the log only when the previous one
//! was taken (so a slow reader lags on disk), and waits on the topic's "next offset" watch when
//! it has read everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::log::TopicLog;
use crate::{
    now_ms, CatalystError, Retention, Start, Subscription, TopicInfo, BATCH_BYTES_MAX,
    BATCH_MESSAGES_MAX,
};

struct Topic {
    log: TopicLog,
    next: watch::Sender<u64>,
    subscribers: AtomicU32,
    deleted: CancellationToken,
}

impl Topic {
    fn new(log: TopicLog) -> Arc<Topic> {
        let next = log.figures().next;
        Arc::new(Topic {
            log,
            next: watch::Sender::new(next),
            subscribers: AtomicU32::new(0),
            deleted: CancellationToken::new(),
        })
    }

    fn info(&self) -> TopicInfo {
        let f = self.log.figures();
        TopicInfo {
            name: self.log.name().to_string(),
            retention: self.log.retention(),
            first_offset: f.first,
            next_offset: f.next,
            messages: f.next - f.first,
            bytes: f.bytes,
            groups: f.groups.into_iter().collect(),
        }
    }
}

/// Counts a subscription while it lives.
struct Counted(Arc<Topic>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// This agent's topics.
#[derive(Clone)]
pub struct Standalone {
    dir: PathBuf,
    topics: Arc<RwLock<BTreeMap<String, Arc<Topic>>>>,
}

impl Standalone {
    /// Opens (or makes) the topics under `dir`.
    pub fn open(dir: &Path) -> Result<Standalone, CatalystError> {
        let topics_dir = dir.join("topics");
        std::fs::create_dir_all(&topics_dir)
            .map_err(|e| CatalystError::Io(format!("creating {}: {e}", topics_dir.display())))?;
        let mut topics = BTreeMap::new();
        let entries = std::fs::read_dir(&topics_dir)
            .map_err(|e| CatalystError::Io(format!("listing {}: {e}", topics_dir.display())))?;
        for e in entries.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if crate::check_name("topic", &name).is_err() || !e.path().join("topic.json").exists() {
                continue;
            }
            let log = TopicLog::open(&name, &e.path())?;
            topics.insert(name, Topic::new(log));
        }
        Ok(Standalone {
            dir: topics_dir,
            topics: Arc::new(RwLock::new(topics)),
        })
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>, CatalystError> {
        self.topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| CatalystError::NoTopic(name.to_string()))
    }

    /// Makes a topic.
    pub fn create(&self, name: &str, retention: Retention) -> Result<TopicInfo, CatalystError> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if topics.contains_key(name) {
            return Err(CatalystError::TopicExists(name.to_string()));
        }
        let dir = self.dir.join(name);
        // A directory left by a create that failed half-way is not a topic: start it afresh.
        let _ = std::fs::remove_dir_all(&dir);
        let log = TopicLog::create(name, &dir, retention).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        let topic = Topic::new(log);
        let info = topic.info();
        topics.insert(name.to_string(), topic);
        Ok(info)
    }

    /// Every topic.
    pub fn list(&self) -> Vec<TopicInfo> {
        let topics: Vec<_> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        topics.iter().map(|t| t.info()).collect()
    }

    /// Removes a topic.
    pub fn delete(&self, name: &str) -> Result<(), CatalystError> {
        let topic = self
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| CatalystError::NoTopic(name.to_string()))?;
        topic.deleted.cancel();
        std::fs::remove_dir_all(topic.log.dir())
            .map_err(|e| CatalystError::Io(format!("removing {}: {e}", topic.log.dir().display())))
    }

    /// Appends to a topic.
    pub fn publish(&self, name: &str, messages: &[Bytes]) -> Result<Vec<u64>, CatalystError> {
        let topic = self.topic(name)?;
        let first = topic.log.append(messages, now_ms())?;
        let next = first + messages.len() as u64;
        topic.next.send_if_modified(|n| {
            let moved = *n < next;
            *n = (*n).max(next);
            moved
        });
        Ok((first..next).collect())
    }

    /// Records a group's offset.
    pub fn commit(&self, name: &str, group: &str, next: u64) -> Result<(), CatalystError> {
        self.topic(name)?.log.commit(group, next)
    }

    /// Subscriptions open on a topic.
    pub fn subscribers(&self, name: &str) -> u32 {
        self.topic(name)
            .map(|t| t.subscribers.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A subscription to a topic.
    pub fn subscribe(
        &self,
        name: &str,
        start: Start,
        group: Option<&str>,
    ) -> Result<Subscription, CatalystError> {
        let topic = self.topic(name)?;
        let f = topic.log.figures();
        let start = match group.and_then(|g| topic.log.committed(g)) {
            Some(c) => Start::Offset(c),
            None => start,
        };
        let from = match start {
            Start::Earliest => f.first,
            Start::Latest => f.next,
            Start::Offset(o) if o > f.next => {
                return Err(CatalystError::OffsetPastEnd {
                    topic: name.to_string(),
                    offset: o,
                    next: f.next,
                })
            }
            Start::Offset(o) => o.max(f.first),
        };
        topic.subscribers.fetch_add(1, Ordering::Relaxed);
        let rx = topic.next.subscribe();
        let state = (Counted(topic), rx, from, false);
        Ok(Box::pin(futures_util::stream::unfold(
            state,
            |(counted, mut rx, mut from, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    rx.borrow_and_update();
                    match counted
                        .0
                        .log
                        .read(from, BATCH_MESSAGES_MAX, BATCH_BYTES_MAX)
                    {
                        Err(e) => return Some((Err(e), (counted, rx, from, true))),
                        Ok(r) if !r.messages.is_empty() => {
                            from = r.next;
                            return Some((Ok(r.messages), (counted, rx, from, false)));
                        }
                        Ok(_) => {}
                    }
                    let deleted = counted.0.deleted.clone();
                    tokio::select! {
                        _ = deleted.cancelled() => {
                            let e = CatalystError::NoTopic(counted.0.log.name().to_string());
                            return Some((Err(e), (counted, rx, from, true)));
                        }
                        _ = rx.changed() => {}
                    }
                }
            },
        )))
    }

    /// Syncs every topic's log and enforces retention every `every` until `stop`.
    pub async fn maintain(self, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let topics: Vec<_> = self
                .topics
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            let now = now_ms();
            for t in topics {
                if let Err(e) = t.log.sync() {
                    tracing::warn!(topic = t.log.name(), error = %e, "catalyst: sync failed");
                }
                let dropped = t.log.enforce_retention(now);
                if dropped > 0 {
                    tracing::debug!(topic = t.log.name(), dropped, "catalyst: retention");
                }
            }
        }
        // A last sync at shutdown.
        let topics: Vec<_> = self
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for t in topics {
            let _ = t.log.sync();
        }
    }
}
