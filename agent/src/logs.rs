//! The agent's log, operated while it runs: the filter of the stderr log can be replaced at once
//! (`crux log-level`, a reload, SIGHUP) and reverted after a while, and any number of watchers
//! (`crux monitor`, `crux debug`) receive the log lines from the moment they connect, each at its
//! own level whatever the stderr filter says.
//!
//! ```text
//!   tracing event ──► fmt layer ─ filter: EnvFilter behind a reload handle ──► stderr
//!                 └─► hub layer ─ filter: the most verbose watcher's level ──► watcher 1: mpsc (bounded)
//!                                                                         └─► watcher 2: …
//! ```
//!
//! **Bounded.** A watcher is a bounded channel of [`WATCHER_LINES_MAX`] lines, each at most
//! [`LINE_BYTES_MAX`] bytes: the logging thread never waits for a watcher. A line that finds
//! the channel full is counted instead; the watcher then gets one line saying how many it missed
//! ("N lines dropped") as soon as there is room again.
//!
//! **Cheap when nobody watches.** The hub's filter says "off" while there is no watcher, so
//! `debug!` and `trace!` call sites stay disabled by the level check tracing makes before
//! anything else; a watcher coming or going rebuilds that check.
//!
//! The HTTP/2 stack's own debug and trace lines (targets `h2`, `hyper`, `tower`, `tonic`) are
//! not sent to watchers: they would describe the watcher's own stream, line after line.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::grpc::reeve::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

/// Lines a watcher's buffer holds before lines are dropped for it.
pub const WATCHER_LINES_MAX: usize = 1024;
/// Longest line (message and fields) sent to a watcher, in bytes; longer ones are cut.
pub const LINE_BYTES_MAX: usize = 8 * 1024;
/// Watchers at once (a `crux monitor` each); more are refused.
pub const WATCHERS_MAX: usize = 64;

/// Targets whose lines below INFO are not sent to watchers (see the module doc).
const TRANSPORT_TARGETS: [&str; 4] = ["h2", "hyper", "tower", "tonic"];

type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// The agent's log controls: made once at start by [`init`], shared by the local API, reload
/// and SIGHUP.
pub struct Logs {
    handle: Option<FilterHandle>,
    hub: Arc<Hub>,
    filter: Mutex<FilterState>,
    /// A pending revert: (when, to what, for which change).
    revert: watch::Sender<Option<Revert>>,
}

#[derive(Clone, Debug)]
struct FilterState {
    text: String,
    generation: u64,
}

/// A `--for` change's way back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revert {
    /// When (tokio's clock).
    pub at: tokio::time::Instant,
    /// The filter that comes back.
    pub to: String,
    generation: u64,
}

/// Installs the process's log subscriber: stderr through `filter` (reloadable), and the hub.
/// When a subscriber is installed already (a test harness), the controls still work on what
/// this process can reach: watchers get nothing and the filter is only recorded.
pub fn init(filter: &str) -> Arc<Logs> {
    let env = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (env, handle) = reload::Layer::new(env);
    let hub = Arc::new(Hub::default());
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(env);
    let installed = tracing_subscriber::registry()
        .with(fmt)
        .with(HubLayer { hub: hub.clone() }.with_filter(HubFilter { hub: hub.clone() }))
        .try_init()
        .is_ok();
    Arc::new(Logs {
        handle: installed.then_some(handle),
        hub,
        filter: Mutex::new(FilterState {
            text: filter.to_string(),
            generation: 0,
        }),
        revert: watch::channel(None).0,
    })
}

/// Checks a filter's text: a level or a `tracing` filter (`info,crux_flock=debug`).
pub fn check_filter(text: &str) -> Result<EnvFilter, String> {
    if text.trim().is_empty() {
        return Err("a log filter must not be empty".into());
    }
    EnvFilter::try_new(text).map_err(|e| format!("{text:?} is not a log filter: {e}"))
}

impl Logs {
    /// The filter in force.
    pub fn filter(&self) -> String {
        self.filter.lock().expect("filter lock").text.clone()
    }

    /// The pending revert of a `--for` change, if any.
    pub fn pending_revert(&self) -> Option<Revert> {
        self.revert.borrow().clone()
    }

    /// Replaces the filter at once; with `revert_after`, the one in force before comes back
    /// after that long unless another change comes first. Returns the previous filter. A bad
    /// filter changes nothing.
    pub fn set_filter(&self, text: &str, revert_after: Option<Duration>) -> Result<String, String> {
        let env = check_filter(text)?;
        let mut st = self.filter.lock().expect("filter lock");
        if let Some(h) = &self.handle {
            h.reload(env)
                .map_err(|e| format!("the log filter cannot be changed: {e}"))?;
        }
        let previous = std::mem::replace(&mut st.text, text.to_string());
        st.generation += 1;
        let revert = revert_after.map(|d| Revert {
            at: tokio::time::Instant::now() + d,
            to: previous.clone(),
            generation: st.generation,
        });
        self.revert.send_replace(revert);
        Ok(previous)
    }

    /// Carries out `--for` reverts until `stop` (one task, owned by the bootstrap's reeve step).
    pub async fn run_reverts(self: Arc<Self>, stop: CancellationToken) {
        let mut pending = self.revert.subscribe();
        loop {
            let next = pending.borrow_and_update().clone();
            let at = next.as_ref().map(|r| r.at);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                r = pending.changed() => if r.is_err() { return },
                _ = sleep_until(at) => {
                    let Some(r) = next else { continue };
                    self.revert_now(&r);
                }
            }
        }
    }

    fn revert_now(&self, r: &Revert) {
        let current = self.filter.lock().expect("filter lock").generation;
        if current != r.generation {
            return;
        }
        match self.set_filter(&r.to, None) {
            Ok(was) => tracing::info!(filter = %r.to, was = %was, "log filter reverted"),
            Err(e) => tracing::warn!(error = %e, "log filter revert failed"),
        }
    }

    /// A new watcher at `level`: the lines from now on, until the returned stream is dropped.
    pub fn watch(&self, level: LevelFilter) -> Result<LineStream, String> {
        self.hub.add(level)
    }

    /// Watchers now.
    pub fn watchers(&self) -> usize {
        self.hub.watchers.lock().expect("watchers lock").len()
    }

    /// Lines dropped for watchers that read too slowly, since the start.
    pub fn dropped_total(&self) -> u64 {
        self.hub.dropped_total.load(Ordering::Relaxed)
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Parses a watcher's level (`error` … `trace`; empty: `info`).
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    if text.trim().is_empty() {
        return Ok(LevelFilter::INFO);
    }
    text.trim()
        .parse::<LevelFilter>()
        .map_err(|_| format!("{text:?} is not a level: use error, warn, info, debug, trace or off"))
}

fn rank(level: LevelFilter) -> u8 {
    match level.into_level() {
        None => 0,
        Some(Level::ERROR) => 1,
        Some(Level::WARN) => 2,
        Some(Level::INFO) => 3,
        Some(Level::DEBUG) => 4,
        Some(Level::TRACE) => 5,
    }
}

fn rank_of(level: &Level) -> u8 {
    rank(LevelFilter::from_level(*level))
}

fn filter_of(rank: u8) -> LevelFilter {
    match rank {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

/// The watchers, and the most verbose level any of them asked for.
#[derive(Default)]
struct Hub {
    watchers: Mutex<Vec<Watcher>>,
    /// [`rank`] of the most verbose watcher (0: none).
    max: AtomicU8,
    next_id: AtomicU64,
    /// Lines dropped for slow watchers, ever.
    dropped_total: AtomicU64,
}

struct Watcher {
    id: u64,
    rank: u8,
    tx: mpsc::Sender<pb::LogLine>,
    /// Lines not sent since the last one that was.
    dropped: u64,
}

impl Hub {
    fn add(self: &Arc<Self>, level: LevelFilter) -> Result<LineStream, String> {
        let (tx, rx) = mpsc::channel(WATCHER_LINES_MAX);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = self.watchers.lock().expect("watchers lock");
            if w.len() >= WATCHERS_MAX {
                return Err(format!(
                    "{WATCHERS_MAX} watchers are connected already; try again later"
                ));
            }
            w.push(Watcher {
                id,
                rank: rank(level),
                tx,
                dropped: 0,
            });
            self.recompute(&w);
        }
        tracing::callsite::rebuild_interest_cache();
        Ok(LineStream {
            rx,
            _guard: WatcherGuard {
                hub: self.clone(),
                id,
            },
        })
    }

    fn remove(&self, id: u64) {
        {
            let mut w = self.watchers.lock().expect("watchers lock");
            w.retain(|w| w.id != id);
            self.recompute(&w);
        }
        tracing::callsite::rebuild_interest_cache();
    }

    fn recompute(&self, w: &[Watcher]) {
        let max = w.iter().map(|w| w.rank).max().unwrap_or(0);
        self.max.store(max, Ordering::Relaxed);
    }

    fn wants(&self, meta: &Metadata<'_>) -> bool {
        let r = rank_of(meta.level());
        if r > self.max.load(Ordering::Relaxed) {
            return false;
        }
        r <= rank(LevelFilter::INFO) || !is_transport(meta.target())
    }

    /// Offers `line` (made only if a watcher takes its level) to every watcher.
    fn publish(&self, level: &Level, line: impl FnOnce() -> pb::LogLine) {
        let r = rank_of(level);
        let Ok(mut watchers) = self.watchers.lock() else {
            return;
        };
        let mut make = Some(line);
        let mut made: Option<pb::LogLine> = None;
        for w in watchers.iter_mut().filter(|w| r <= w.rank) {
            if w.dropped > 0 {
                let marker = pb::LogLine {
                    unix_ms: unix_ms(),
                    level: "WARN".into(),
                    target: "crux::monitor".into(),
                    message: format!("{} lines dropped", w.dropped),
                    fields: Vec::new(),
                    dropped: w.dropped,
                };
                if w.tx.try_send(marker).is_err() {
                    w.dropped += 1;
                    self.dropped_total.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                w.dropped = 0;
            }
            if made.is_none() {
                made = make.take().map(|f| f());
            }
            let Some(line) = &made else { return };
            if w.tx.try_send(line.clone()).is_err() {
                w.dropped += 1;
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn is_transport(target: &str) -> bool {
    TRANSPORT_TARGETS.iter().any(|t| {
        target == *t
            || target
                .strip_prefix(t)
                .is_some_and(|rest| rest.starts_with("::") || rest.starts_with('_'))
    })
}

/// Wall-clock milliseconds since the Unix epoch (log lines' times).
#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A watcher's lines; dropping it ends the watch.
pub struct LineStream {
    rx: mpsc::Receiver<pb::LogLine>,
    _guard: WatcherGuard,
}

impl futures_util::Stream for LineStream {
    type Item = pb::LogLine;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::LogLine>> {
        self.rx.poll_recv(cx)
    }
}

struct WatcherGuard {
    hub: Arc<Hub>,
    id: u64,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

/// The hub's per-layer filter: events at or above the most verbose watcher's level.
struct HubFilter {
    hub: Arc<Hub>,
}

impl<S: Subscriber> Filter<S> for HubFilter {
    fn enabled(&self, meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        meta.is_event() && self.hub.wants(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if meta.is_event() {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(filter_of(self.hub.max.load(Ordering::Relaxed)))
    }
}

/// Turns events into [`pb::LogLine`]s for the watchers.
struct HubLayer {
    hub: Arc<Hub>,
}

impl<S: Subscriber> Layer<S> for HubLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _cx: Context<'_, S>) {
        let meta = event.metadata();
        self.hub.publish(meta.level(), || {
            let mut v = LineVisitor::default();
            event.record(&mut v);
            pb::LogLine {
                unix_ms: unix_ms(),
                level: meta.level().to_string(),
                target: meta.target().to_string(),
                message: v.message,
                fields: v.fields,
                dropped: 0,
            }
        });
    }
}

/// Collects an event's message and fields, within [`LINE_BYTES_MAX`].
#[derive(Default)]
struct LineVisitor {
    message: String,
    fields: Vec<pb::LogField>,
    bytes: usize,
}

impl LineVisitor {
    fn take(&mut self, mut text: String) -> Option<String> {
        let room = LINE_BYTES_MAX.saturating_sub(self.bytes);
        if room == 0 {
            return None;
        }
        if text.len() > room {
            let mut cut = room;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        self.bytes += text.len();
        Some(text)
    }

    fn put(&mut self, name: &str, text: String) {
        let Some(text) = self.take(text) else { return };
        if name == "message" {
            self.message = text;
        } else {
            self.fields.push(pb::LogField {
                name: name.to_string(),
                value: text,
            });
        }
    }
}

impl tracing::field::Visit for LineVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }
}

/// One line as `crux monitor` prints it: `2026-12-07T11:15:30.123Z  INFO target: message k=v`.
pub fn format_line(l: &pb::LogLine) -> String {
    let mut out = format!(
        "{} {:>5} {}: {}",
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(l.unix_ms)),
        l.level,
        l.target,
        l.message
    );
    for f in &l.fields {
        out.push(' ');
        out.push_str(&f.name);
        out.push('=');
        out.push_str(&f.value);
    }
    out
}

/// One line as `crux monitor --json` prints it.
pub fn line_json(l: &pb::LogLine) -> serde_json::Value {
    let fields: serde_json::Map<String, serde_json::Value> = l
        .fields
        .iter()
        .map(|f| (f.name.clone(), serde_json::Value::String(f.value.clone())))
        .collect();
    let mut v = serde_json::json!({
        "time": humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(l.unix_ms)
        ).to_string(),
        "level": l.level,
        "target": l.target,
        "message": l.message,
        "fields": fields,
    });
    if l.dropped > 0 {
        v["dropped"] = l.dropped.into();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_line(i: u64) -> pb::LogLine {
        pb::LogLine {
            message: format!("line {i}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_slow_watcher_gets_a_dropped_count_not_unbounded_memory() {
        let hub = Arc::new(Hub::default());
        let mut stream = hub.add(LevelFilter::INFO).unwrap();
        let total = WATCHER_LINES_MAX as u64 + 500;
        for i in 0..total {
            hub.publish(&Level::INFO, || meta_line(i));
        }
        // The buffer holds WATCHER_LINES_MAX lines; the rest were counted, not kept.
        let mut got = Vec::new();
        while let Ok(l) = stream.rx.try_recv() {
            got.push(l);
        }
        assert_eq!(got.len(), WATCHER_LINES_MAX);
        assert_eq!(
            got.last().unwrap().message,
            format!("line {}", WATCHER_LINES_MAX - 1)
        );
        // With room again, the next line is preceded by the count of those missed.
        hub.publish(&Level::INFO, || meta_line(total));
        let marker = stream.rx.try_recv().unwrap();
        assert_eq!(marker.dropped, 500);
        assert_eq!(marker.message, "500 lines dropped");
        assert_eq!(
            stream.rx.try_recv().unwrap().message,
            format!("line {total}")
        );
    }

    #[test]
    fn each_watcher_gets_its_own_level_and_leaving_turns_the_hub_off() {
        let hub = Arc::new(Hub::default());
        let mut info = hub.add(LevelFilter::INFO).unwrap();
        assert_eq!(hub.max.load(Ordering::Relaxed), rank(LevelFilter::INFO));
        let mut debug = hub.add(LevelFilter::DEBUG).unwrap();
        assert_eq!(hub.max.load(Ordering::Relaxed), rank(LevelFilter::DEBUG));
        hub.publish(&Level::DEBUG, || meta_line(1));
        hub.publish(&Level::WARN, || meta_line(2));
        assert_eq!(info.rx.try_recv().unwrap().message, "line 2");
        assert!(info.rx.try_recv().is_err());
        assert_eq!(debug.rx.try_recv().unwrap().message, "line 1");
        assert_eq!(debug.rx.try_recv().unwrap().message, "line 2");
        drop(debug);
        assert_eq!(hub.max.load(Ordering::Relaxed), rank(LevelFilter::INFO));
        drop(info);
        assert_eq!(hub.max.load(Ordering::Relaxed), 0);
        assert!(hub.watchers.lock().unwrap().is_empty());
    }

    #[test]
    fn transport_lines_below_info_are_not_watched() {
        assert!(is_transport("h2::codec"));
        assert!(is_transport("hyper_util::client"));
        assert!(is_transport("tonic"));
        assert!(!is_transport("crux_flock::driver"));
        assert!(!is_transport("h2o"));
    }

    #[test]
    fn levels_and_filters_are_checked() {
        assert_eq!(parse_level("").unwrap(), LevelFilter::INFO);
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::DEBUG);
        assert!(parse_level("loud").is_err());
        assert!(check_filter("info,crux_flock=debug").is_ok());
        assert!(check_filter("=,=").is_err());
        assert!(check_filter(" ").is_err());
    }

    #[test]
    fn long_lines_are_cut() {
        let mut v = LineVisitor::default();
        v.put("message", "x".repeat(LINE_BYTES_MAX * 2));
        v.put("other", "y".into());
        assert!(v.message.len() <= LINE_BYTES_MAX + '…'.len_utf8());
        assert!(v.fields.is_empty());
    }
}
