//! `/metrics` in the Prometheus text exposition format (version 0.0.4), written from the flock
//! snapshot: a handful of gauges and counters need no metrics library.

use std::fmt::Write;

use crux_flock::driver::Snapshot;
use crux_flock::{DropReason, MemberState};

use crate::state::AgentState;

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn value(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let escaped = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{escaped}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.value(name, &[], v);
    }
}

/// Renders every metric of the agent.
pub fn render(state: &AgentState) -> String {
    let snap = state.flock.snapshot();
    let mut o = Out(String::with_capacity(4096));
    render_flock(&mut o, &snap, state.key_epoch());
    o.one(
        "crux_ready",
        "gauge",
        "1 while every bootstrap step serves (the store takes writes).",
        u8::from(state.is_ready()),
    );
    let logs = state.ops.logs();
    o.one(
        "crux_log_watchers",
        "gauge",
        "Log watchers connected (`crux monitor`, `crux debug`).",
        logs.watchers(),
    );
    o.one(
        "crux_log_lines_dropped_total",
        "counter",
        "Log lines not sent to a watcher that read too slowly (it was told how many).",
        logs.dropped_total(),
    );
    o.family(
        "crux_node_plane_rejected_total",
        "counter",
        "Node-plane connections refused at their handshake or closed later (revoked, tampered), by reason.",
    );
    for (reason, n) in state.transport.rejected() {
        o.value(
            "crux_node_plane_rejected_total",
            &[("reason", reason.label())],
            n,
        );
    }
    o.family(
        "crux_local_api_rejected_total",
        "counter",
        "Local-socket connections closed or requests refused before the API saw them, by reason.",
    );
    for (reason, n) in state.local.rejected() {
        o.value("crux_local_api_rejected_total", &[("reason", reason)], n);
    }
    o.one(
        "crux_local_api_authority_fixed_total",
        "counter",
        "Local-socket requests whose :authority (a socket path, empty) became localhost.",
        state
            .local
            .get()
            .authority_fixed
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    o.family(
        "crux_dns_queries_total",
        "counter",
        "DNS queries answered, by response code.",
    );
    for (rcode, n) in state.dns.queries() {
        o.value("crux_dns_queries_total", &[("rcode", rcode)], n);
    }
    o.family(
        "crux_dns_dropped_total",
        "counter",
        "DNS packets dropped without an answer, by reason.",
    );
    for (reason, n) in state.dns.drops() {
        o.value("crux_dns_dropped_total", &[("reason", reason)], n);
    }
    o.family(
        "crux_dns_forwarded_total",
        "counter",
        "DNS queries outside the domain forwarded to the upstream resolvers (dns.forward), by result: ok (relayed), failed (no upstream answered: SERVFAIL), busy (too many in flight: dropped).",
    );
    for (result, n) in state.dns.forwards() {
        o.value("crux_dns_forwarded_total", &[("result", result)], n);
    }
    o.family(
        "crux_bootstrap_step_seconds",
        "gauge",
        "Time each finished bootstrap step took.",
    );
    for s in state.steps().iter().filter(|s| s.done) {
        o.value(
            "crux_bootstrap_step_seconds",
            &[("step", s.name)],
            s.elapsed.as_secs_f64(),
        );
    }
    render_disk(
        &mut o,
        &state.store.disk_stats(),
        state.pastiche.write_errors(),
    );
    o.one(
        "crux_uptime_seconds",
        "gauge",
        "Time since the agent started.",
        state.uptime().as_secs(),
    );
    o.0
}

/// The store's and pastiche's disk trouble.
fn render_disk(o: &mut Out, store: &crux_store::DiskStats, pastiche: crux_pastiche::WriteErrors) {
    o.family(
        "crux_store_write_errors_total",
        "counter",
        "Store writes that failed or were refused, by reason (disk_full: no room under the store's directory).",
    );
    o.value(
        "crux_store_write_errors_total",
        &[("reason", "disk_full")],
        store.disk_full,
    );
    o.value(
        "crux_store_write_errors_total",
        &[("reason", "io")],
        store.io,
    );
    o.one(
        "crux_store_disk_full",
        "gauge",
        "1 while the store refuses writes for lack of room.",
        u8::from(store.full),
    );
    o.one(
        "crux_store_reopened_total",
        "counter",
        "Times the store's Raft node was reopened after a storage error stopped it.",
        store.reopened,
    );
    o.family(
        "crux_pastiche_write_errors_total",
        "counter",
        "Pastiche writes (puts, pulls, pins) that failed, by reason (disk_full: no room).",
    );
    o.value(
        "crux_pastiche_write_errors_total",
        &[("reason", "disk_full")],
        pastiche.disk_full,
    );
    o.value(
        "crux_pastiche_write_errors_total",
        &[("reason", "io")],
        pastiche.io,
    );
}

fn render_flock(o: &mut Out, snap: &Snapshot, key_epoch: Option<u64>) {
    o.family(
        "crux_members",
        "gauge",
        "Members this node knows, by state (self included).",
    );
    for st in [
        MemberState::Alive,
        MemberState::Suspect,
        MemberState::Dead,
        MemberState::Left,
    ] {
        let n = snap.members.iter().filter(|m| m.info.state == st).count();
        o.value("crux_members", &[("state", st.as_str())], n);
    }
    let me = snap.identity.id;
    o.family(
        "crux_leader",
        "gauge",
        "The leader this node follows (1 per known leader).",
    );
    if let Some(l) = snap.leader {
        let (id, addr) = (l.id.to_string(), l.addr.to_string());
        let is_self = if l.id == me { "true" } else { "false" };
        o.value(
            "crux_leader",
            &[("id", &id), ("addr", &addr), ("self", is_self)],
            1,
        );
    }
    o.one(
        "crux_leader_known",
        "gauge",
        "1 when a leader is known.",
        u8::from(snap.leader.is_some()),
    );
    o.one(
        "crux_is_leader",
        "gauge",
        "1 when this node is the leader.",
        u8::from(snap.leader.is_some_and(|l| l.id == me)),
    );
    o.one(
        "crux_term",
        "gauge",
        "Election term of the known leader (0: none).",
        snap.leader.map_or(0, |l| l.term),
    );
    if let Some(epoch) = key_epoch {
        o.one(
            "crux_key_epoch",
            "gauge",
            "Transient key epoch in use.",
            epoch,
        );
    }
    let s = &snap.stats;
    let mut counter = |name: &str, help: &str, v: u64| o.one(name, "counter", help, v);
    counter(
        "crux_datagrams_in_total",
        "Datagrams received.",
        s.datagrams_in,
    );
    counter(
        "crux_datagrams_out_total",
        "Datagrams sent.",
        s.datagrams_out,
    );
    counter(
        "crux_datagram_bytes_in_total",
        "Bytes of datagrams received.",
        s.bytes_in,
    );
    counter(
        "crux_datagram_bytes_out_total",
        "Bytes of datagrams sent.",
        s.bytes_out,
    );
    counter(
        "crux_streams_in_total",
        "Stream frames received.",
        s.streams_in,
    );
    counter(
        "crux_streams_out_total",
        "Stream frames sent.",
        s.streams_out,
    );
    counter(
        "crux_stream_bytes_in_total",
        "Stream bytes received.",
        s.stream_bytes_in,
    );
    counter(
        "crux_stream_bytes_out_total",
        "Stream bytes sent.",
        s.stream_bytes_out,
    );
    counter("crux_probes_total", "Direct probes sent.", s.probes);
    counter(
        "crux_probe_failures_total",
        "Probes ending in suspicion.",
        s.probe_failures,
    );
    counter(
        "crux_push_pulls_total",
        "Push-pull exchanges started.",
        s.push_pulls,
    );
    counter(
        "crux_refutations_total",
        "Suspicions refuted.",
        s.refutations,
    );
    counter("crux_leader_claims_total", "Leader claims made.", s.claims);
    counter(
        "crux_key_rotations_total",
        "Transient keys made as leader.",
        s.rotations,
    );
    counter(
        "crux_key_requests_total",
        "Key requests sent.",
        s.key_requests,
    );
    counter("crux_joins_total", "Own handshakes answered.", s.joins);
    counter(
        "crux_unsealed_total",
        "Datagrams unsent, no key.",
        s.unsealed,
    );
    o.family(
        "crux_handshakes_total",
        "counter",
        "Join and key-request handshakes, by side.",
    );
    o.value(
        "crux_handshakes_total",
        &[("side", "started")],
        s.handshakes_sent,
    );
    o.value(
        "crux_handshakes_total",
        &[("side", "answered")],
        s.handshakes_answered,
    );
    o.family(
        "crux_dropped_total",
        "counter",
        "Datagrams and frames dropped, by reason.",
    );
    for r in DropReason::ALL {
        o.value(
            "crux_dropped_total",
            &[("reason", r.as_str())],
            s.dropped(r),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_flock::{BootId, Identity, NodeId, Stats};

    #[test]
    fn flock_metrics_are_prometheus_text() {
        let snap = Snapshot {
            identity: Identity {
                id: NodeId(1),
                boot: BootId(2),
                addr: "127.0.0.2:7700".parse().unwrap(),
                key: None,
            },
            now: std::time::Duration::ZERO,
            members: Vec::new(),
            leader: None,
            live: 1,
            stats: Stats::default(),
            leaving: false,
            key_epoch: Some(7),
            keys: Vec::new(),
        };
        let mut o = Out(String::new());
        render_flock(&mut o, &snap, Some(7));
        let text = o.0;
        assert!(text.contains("# TYPE crux_members gauge\n"));
        assert!(text.contains("crux_members{state=\"alive\"} 0\n"));
        assert!(text.contains("crux_dropped_total{reason=\"bad_magic\"} 0\n"));
        assert!(text.contains("crux_key_epoch 7\n"));
        assert!(text.contains("crux_leader_known 0\n"));
        assert!(text.contains("crux_handshakes_total{side=\"answered\"} 0\n"));
        let mut o = Out(String::new());
        let store = crux_store::DiskStats {
            disk_full: 3,
            io: 1,
            full: true,
            reopened: 2,
        };
        let pastiche = crux_pastiche::WriteErrors {
            disk_full: 4,
            io: 0,
        };
        render_disk(&mut o, &store, pastiche);
        let disk = o.0;
        for line in [
            "# TYPE crux_store_write_errors_total counter\n",
            "crux_store_write_errors_total{reason=\"disk_full\"} 3\n",
            "crux_store_write_errors_total{reason=\"io\"} 1\n",
            "crux_store_disk_full 1\n",
            "crux_store_reopened_total 2\n",
            "crux_pastiche_write_errors_total{reason=\"disk_full\"} 4\n",
            "crux_pastiche_write_errors_total{reason=\"io\"} 0\n",
        ] {
            assert!(disk.contains(line), "{line} in {disk}");
        }
        let text = text + &disk;
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
