//! Operating the running agent: `crux reload` and SIGHUP read the config again and apply what
//! can change live; `crux debug` asks for what a bug report needs ([`Ops::debug_info`]).
//!
//! A reload reads the config exactly as the start did (the same file, the `CRUX_*` variables
//! the agent started with, its flags), checks all of it, and only then compares it with the
//! config in force, field by field (dotted names: `dns.ttl`, `node.attributes.rack`):
//!
//! | field                | live? | how                                                    |
//! |----------------------|-------|--------------------------------------------------------|
//! | `log_level`          | yes   | the stderr filter is replaced (as `crux log-level`)    |
//! | `node.attributes.*`  | yes   | the dean reports them at the proctor's next sync       |
//! | `pastiche.max_size`  | yes   | a lower maximum evicts down to it at once              |
//! | `dns.*`              | yes   | the DNS server is restarted on the new settings        |
//! | anything else        | no    | refused, one line naming the field; the old value stays |
//!
//! The timing preset, the registry's heartbeat interval and grace, the binds, the data dir and
//! the bloc are taken by the flock core, the reeve and the steward at start, so they are refused.
//! A config with any error changes nothing: the error is the start's (`path:line: config field
//! …`). A DNS restart that fails (a new `dns.bind` in use) changes nothing either: it is tried
//! first, and the old server keeps serving.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crux_proto::grpc::reeve::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::{AgentFlags, RawConfig};
use crate::logs::Logs;

/// What a reload may apply while the agent runs (see the module doc).
fn is_live(field: &str) -> bool {
    field == "log_level"
        || field == "pastiche.max_size"
        || field.starts_with("node.attributes.")
        || field == "node.attributes"
        || field.starts_with("dns.")
}

/// A request to the DNS supervisor: run on these settings (None: off); the answer says where
/// it serves, or why the old settings stay.
pub type DnsApply = (
    Option<crux_dns::DnsConfig>,
    oneshot::Sender<Result<String, String>>,
);

/// The reload state: how the config was read, the config in force, and the parts a reload
/// reaches.
pub struct Ops {
    flags: AgentFlags,
    env: Vec<(String, String)>,
    logs: Arc<Logs>,
    pastiche: crux_pastiche::store::Store,
    /// The config in force: the one the agent started with, plus what reloads applied.
    current: Mutex<RawConfig>,
    /// This node's IP (the built-in `host` attribute).
    host: std::net::IpAddr,
    dean: Mutex<Option<Arc<crux_placement::Dean>>>,
    dns: Mutex<Option<mpsc::Sender<DnsApply>>>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Ops {
    /// The config `raw` is in force; a reload reads it again with `flags` and `env`.
    pub fn new(
        flags: AgentFlags,
        env: Vec<(String, String)>,
        raw: RawConfig,
        logs: Arc<Logs>,
        pastiche: crux_pastiche::store::Store,
        host: std::net::IpAddr,
    ) -> Ops {
        Ops {
            flags,
            env,
            logs,
            pastiche,
            current: Mutex::new(raw),
            host,
            dean: Mutex::new(None),
            dns: Mutex::new(None),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// The log controls.
    pub fn logs(&self) -> &Arc<Logs> {
        &self.logs
    }

    /// The dean, once step proctor made it (node attributes change through it).
    pub fn set_dean(&self, dean: Arc<crux_placement::Dean>) {
        *self.dean.lock().expect("dean lock") = Some(dean);
    }

    /// The DNS supervisor's way in, once step reeve started it.
    pub fn set_dns(&self, tx: mpsc::Sender<DnsApply>) {
        *self.dns.lock().expect("dns lock") = Some(tx);
    }

    /// This node's attributes as placement sees them (empty before step proctor), the values
    /// of secret-looking names (`db_password`) redacted.
    pub fn node_attributes(&self) -> BTreeMap<String, String> {
        let mut a = self
            .dean
            .lock()
            .expect("dean lock")
            .as_ref()
            .map(|d| d.attributes())
            .unwrap_or_default();
        for (k, v) in a.iter_mut() {
            if is_secret(k) {
                *v = "\"<redacted>\"".into();
            }
        }
        a
    }

    /// The config attributes in force (`[node.attributes]`, before the built-ins).
    pub fn config_attributes(&self) -> BTreeMap<String, toml::Value> {
        self.current
            .lock()
            .expect("config lock")
            .node
            .attributes
            .clone()
    }

    /// The config file read (None: flags and environment only).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.flags.config.as_deref()
    }

    /// Reads the config again and applies what can change live (see the module doc). `Err`:
    /// the config has an error (or the DNS restart failed) and nothing changed.
    pub async fn reload(&self) -> Result<pb::ReloadResponse, String> {
        let done = self.reload_once().await;
        if let Err(e) = &done {
            warn!("reload refused, nothing changed: {e}");
        }
        done
    }

    async fn reload_once(&self) -> Result<pb::ReloadResponse, String> {
        let _one = self.busy.lock().await;
        let new = RawConfig::load(&self.flags, self.env.clone())
            .and_then(|raw| raw.validate().map(|_| raw))
            .map_err(|e| RawConfig::locate(e, &self.flags, &self.env).to_string())?;
        let old = self.current.lock().expect("config lock").clone();
        let changed = diff(&old, &new);
        let (live, fixed): (Vec<_>, Vec<_>) = changed.into_iter().partition(|f| is_live(f));
        let refused: Vec<String> = fixed
            .iter()
            .map(|f| {
                format!(
                    "config field `{f}` cannot change while the agent runs: it keeps {}; restart \
                     the agent to use the new value",
                    value_text(&old, f)
                )
            })
            .collect();
        // The config in force next: the old one with the live fields of the new one.
        let mut next = old.clone();
        next.log_level = new.log_level.clone();
        next.node.attributes = new.node.attributes.clone();
        next.pastiche.max_size = new.pastiche.max_size.clone();
        next.dns = new.dns.clone();
        let checked = next.validate().map_err(|e| e.to_string())?;
        // DNS first: the one change that can still fail (a bind); it changes nothing then.
        if live.iter().any(|f| f.starts_with("dns.")) {
            let tx = self.dns.lock().expect("dns lock").clone();
            let Some(tx) = tx else {
                return Err(
                    "dns: the DNS server is not started yet (bootstrap step reeve); \
                            nothing was changed"
                        .into(),
                );
            };
            let (done_tx, done_rx) = oneshot::channel();
            tx.send((checked.dns.clone(), done_tx))
                .await
                .map_err(|_| "dns: the DNS server has stopped; nothing was changed".to_string())?;
            let now = done_rx
                .await
                .map_err(|_| "dns: the DNS server has stopped; nothing was changed".to_string())?
                .map_err(|e| format!("{e}; nothing was changed"))?;
            info!(dns = %now, "reload: dns restarted");
        }
        if live.iter().any(|f| f == "log_level") {
            self.logs.set_filter(&checked.log_level, None)?;
        }
        if live.iter().any(|f| f.starts_with("node.attributes")) {
            if let Some(dean) = self.dean.lock().expect("dean lock").as_ref() {
                dean.set_attributes(crux_placement::dean::attributes(
                    self.host,
                    &checked.node_attributes,
                ));
            }
        }
        if live.iter().any(|f| f == "pastiche.max_size") {
            self.pastiche.set_max_bytes(checked.pastiche_max);
        }
        *self.current.lock().expect("config lock") = next;
        let path = self
            .config_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        for r in &refused {
            warn!("reload: {r}");
        }
        info!(applied = ?live, refused = fixed.len(), config = %path, "config reloaded");
        Ok(pb::ReloadResponse {
            applied: live,
            refused,
            path,
        })
    }

    /// Version, build, the config in force (secrets redacted), the metrics of `state`.
    pub fn debug_info(&self, metrics: String) -> pb::DebugInfoResponse {
        let config = self.current.lock().expect("config lock").clone();
        pb::DebugInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            build: build_info(),
            config: redacted_toml(&config),
            metrics,
            config_path: self
                .config_path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }
}

/// Reloads on every SIGHUP until `stop`, logging the outcome (one task, owned by step reeve).
pub async fn on_sighup(
    mut hup: tokio::signal::unix::Signal,
    ops: Arc<Ops>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        info!("SIGHUP: reloading the config");
        // The outcome is logged by the reload.
        let _ = ops.reload().await;
    }
}

/// Facts about this build, `key: value` per line.
pub fn build_info() -> String {
    format!(
        "version: {}\ntarget: {}-{}\nprofile: {}\npackage: {}\n",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        env!("CARGO_PKG_NAME"),
    )
}

/// Fields whose value a debug bundle never shows: the keyring's location and anything named
/// like a secret.
fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "keyring"
        || [
            "secret",
            "password",
            "passwd",
            "token",
            "private",
            "credential",
        ]
        .iter()
        .any(|s| n.contains(s))
}

/// The config as TOML with secret-looking fields replaced by `"<redacted>"`.
pub fn redacted_toml(raw: &RawConfig) -> String {
    fn walk(v: &mut toml::Value) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t.iter_mut() {
                if is_secret(k) {
                    *v = toml::Value::String("<redacted>".into());
                } else {
                    walk(v);
                }
            }
        }
    }
    let mut v = match toml::Value::try_from(raw) {
        Ok(v) => v,
        Err(e) => return format!("# the config could not be shown: {e}\n"),
    };
    walk(&mut v);
    toml::to_string(&v).unwrap_or_else(|e| format!("# the config could not be shown: {e}\n"))
}

/// The dotted names of the fields that differ between `a` and `b` (tables are walked; arrays
/// and values compare whole).
pub fn diff(a: &RawConfig, b: &RawConfig) -> Vec<String> {
    let flat = |raw: &RawConfig| {
        let mut out = BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(raw) {
            flatten("", &v, &mut out);
        }
        out
    };
    let (fa, fb) = (flat(a), flat(b));
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect()
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&name, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The value of dotted `field` in `raw`, as TOML text (`unset` when absent).
fn value_text(raw: &RawConfig, field: &str) -> String {
    let mut out = BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(raw) {
        flatten("", &v, &mut out);
    }
    match out.get(field) {
        Some(v) if is_secret(field.rsplit('.').next().unwrap_or(field)) => {
            let _ = v;
            "its value".into()
        }
        Some(v) => v.to_string(),
        None => "it unset".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(toml: &str) -> RawConfig {
        RawConfig::from_toml(toml).unwrap()
    }

    #[test]
    fn the_diff_names_each_changed_field_by_its_dotted_name() {
        let a = raw("bloc = \"b\"\nbind = \"127.0.0.2:7700\"\n[node.attributes]\nrack = \"r1\"\n");
        let b = raw(
            "bloc = \"b\"\nbind = \"127.0.0.3:7700\"\nlog_level = \"debug\"\n\
             [node.attributes]\nrack = \"r2\"\nssd = true\n[dns]\nttl = \"1s\"\n",
        );
        assert_eq!(
            diff(&a, &b),
            vec![
                "bind",
                "dns.ttl",
                "log_level",
                "node.attributes.rack",
                "node.attributes.ssd"
            ]
        );
        assert!(diff(&a, &a).is_empty());
        let live: Vec<_> = diff(&a, &b).into_iter().filter(|f| is_live(f)).collect();
        assert_eq!(
            live,
            vec![
                "dns.ttl",
                "log_level",
                "node.attributes.rack",
                "node.attributes.ssd"
            ]
        );
        assert!(!is_live("bloc") && !is_live("data_dir") && !is_live("preset"));
        assert_eq!(value_text(&a, "bind"), "\"127.0.0.2:7700\"");
    }

    #[test]
    fn secrets_are_redacted() {
        let a = raw(
            "bloc = \"b\"\nkeyring = \"/etc/crux/keyring\"\n[node.attributes]\n\
             db_password = \"hunter2\"\nrack = \"r1\"\n",
        );
        let text = redacted_toml(&a);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("/etc/crux/keyring"), "{text}");
        assert!(text.contains("rack = \"r1\""), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }
}
