//! The page's sections as HTML, each from what the agent read: pure functions, so that a section
//! is the same whether it comes with the whole page or alone over the live stream.
//!
//! Every text that comes from outside (names, addresses, messages) is escaped. Rows carry
//! `data-*` attributes with their key and state (`data-node`, `data-state`, `data-api`,
//! `data-inst`), for the page's style and for scripts that read the page.

use std::fmt::Write;
use std::time::Duration;

use crux_flock::driver::Snapshot;
use crux_proto::grpc::pastiche::v1 as cpb;
use crux_proto::grpc::proctor::v1 as ppb;
use crux_proto::grpc::reeve::v1 as rpb;

use super::journal::Noted;

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as the page shows it: `850 ms`, `12 s`, `4 min 3 s`, `2 h 5 min`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s / 60 % 60),
    }
}

/// Bytes as the page shows them: `512 B`, `1.5 KiB`, `20.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The time of day of a Unix time in milliseconds, UTC: `05:02:11`.
pub fn clock(unix_ms: u64) -> String {
    let s = unix_ms / 1000 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// What the header says about this agent.
pub struct Header<'a> {
    /// The agent's version.
    pub version: &'a str,
    /// The bloc.
    pub bloc: &'a str,
    /// Whether the bootstrap is done.
    pub ready: bool,
    /// The bootstrap step under way (while not ready).
    pub pending: Option<&'a str>,
    /// Time since the agent started.
    pub uptime: Duration,
}

/// The header: this node, its bloc, readiness and uptime.
pub fn header(h: &Header, snap: &Snapshot) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<h1>crux <small>{}</small></h1><p>node <code>{}</code> at {} · bloc <b>{}</b> · ",
        esc(h.version),
        snap.identity.id,
        snap.identity.addr,
        esc(h.bloc)
    );
    if h.ready {
        s.push_str("<span class=\"ok\" data-ready=\"true\">ready</span>");
    } else {
        let _ = write!(
            s,
            "<span class=\"warn\" data-ready=\"false\">not ready: bootstrap step {}</span>",
            esc(h.pending.unwrap_or("shutdown"))
        );
    }
    let _ = write!(s, " · up {}</p>", age(h.uptime));
    s
}

/// Nodes: the leader, this node's key epoch and how long ago it changed, then every member with
/// its state and for how long it has had it.
pub fn nodes(snap: &Snapshot, rotated: Option<Duration>) -> String {
    let mut s = String::from("<h2>Nodes</h2><p>");
    match snap.leader {
        Some(l) => {
            let _ = write!(
                s,
                "leader <code data-leader=\"{}\">{}</code> at {} · term {}",
                l.id, l.id, l.addr, l.term
            );
        }
        None => s.push_str("<span class=\"warn\">no leader known</span>"),
    }
    let _ = write!(s, " · {} live of {}", snap.live, snap.members.len());
    match (snap.key_epoch, rotated) {
        (Some(e), Some(r)) => {
            let _ = write!(
                s,
                " · key epoch <b data-epoch=\"{e}\">{e}</b>, rotated {} ago",
                age(r)
            );
        }
        (Some(e), None) => {
            let _ = write!(s, " · key epoch <b data-epoch=\"{e}\">{e}</b>");
        }
        (None, _) => s.push_str(" · no transient key yet"),
    }
    s.push_str(
        "</p><table><thead><tr><th>node</th><th>address</th><th>state</th><th>for</th>\
         <th>incarnation</th><th></th></tr></thead><tbody>",
    );
    let leader = snap.leader.map(|l| l.id);
    for m in &snap.members {
        let i = &m.info;
        let state = i.state.as_str();
        let mut notes = Vec::new();
        if Some(i.id) == leader {
            notes.push("leader");
        }
        if i.id == snap.identity.id {
            notes.push("this node");
        }
        let _ = write!(
            s,
            "<tr data-node=\"{id}\" data-state=\"{state}\" class=\"{state}\"><td><code>{id}</code>\
             </td><td>{}</td><td class=\"st\">{state}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            i.addr,
            age(snap.now.saturating_sub(m.since)),
            i.incarnation,
            notes.join(", "),
            id = i.id,
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// The registry by api: each api's instances with their address, node, state and health.
pub fn registry(r: &rpb::ServicesResponse) -> String {
    let mut s = String::from("<h2>Registry</h2><p>");
    let apis = {
        let mut a: Vec<(&str, &str)> = r
            .instances
            .iter()
            .map(|i| (i.horde.as_str(), i.api.as_str()))
            .collect();
        a.dedup();
        a.len()
    };
    let _ = write!(
        s,
        "{} instance(s) of {apis} api(s) · revision {} · {}</p>",
        r.instances.len(),
        r.revision,
        if r.linked {
            "linked to the steward"
        } else {
            "<span class=\"warn\">no steward reachable: this node's last copy</span>"
        }
    );
    if r.instances.is_empty() {
        s.push_str("<p class=\"none\">no service registered</p>");
        return s;
    }
    s.push_str(
        "<table><thead><tr><th>api</th><th>instance</th><th>address</th><th>node</th>\
         <th>state</th><th>health</th></tr></thead><tbody>",
    );
    // The instances come sorted by horde and api: an api's name heads its first row.
    let mut last: Option<(&str, &str)> = None;
    for i in &r.instances {
        let key = (i.horde.as_str(), i.api.as_str());
        let head = if last == Some(key) {
            String::new()
        } else if i.horde == "default" {
            format!("<b>{}</b>", esc(&i.api))
        } else {
            format!("<b>{}</b> <small>({})</small>", esc(&i.api), esc(&i.horde))
        };
        last = Some(key);
        let state = crux_steward::select::state_name(i.state);
        let health = crux_steward::select::health_name(i.health);
        let class = if crux_steward::select::is_live(i) {
            "alive"
        } else {
            "suspect"
        };
        let _ = write!(
            s,
            "<tr data-api=\"{}\" data-inst=\"{}\" data-state=\"{state}\" data-health=\"{health}\" \
             class=\"{class}\"><td>{head}</td><td>{}</td><td>{}</td><td><code>{}</code></td>\
             <td class=\"st\">{state}</td><td class=\"st\">{health}</td></tr>",
            esc(&i.api),
            esc(&i.inst),
            esc(&i.inst),
            esc(&i.addr),
            esc(&i.node),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// The store: its leader, voters and log.
pub fn store(r: &Result<rpb::StoreStatusResponse, String>) -> String {
    let mut s = String::from("<h2>Store</h2>");
    let st = match r {
        Ok(st) => st,
        Err(e) => {
            let _ = write!(s, "<p class=\"warn\">{}</p>", esc(e));
            return s;
        }
    };
    if !st.initialized {
        s.push_str("<p class=\"warn\">no Raft group yet (not initialized)</p>");
        return s;
    }
    s.push_str("<p>");
    if st.leader_id.is_empty() {
        s.push_str("<span class=\"warn\">no leader</span>");
    } else {
        let _ = write!(
            s,
            "leader <code>{}</code> at {}",
            esc(&st.leader_id),
            esc(&st.leader_addr)
        );
    }
    let _ = write!(
        s,
        " · term {} · log index {} (applied {}) · this node is {}a voter</p>",
        st.term,
        st.last_log,
        st.last_applied,
        if st.voter { "" } else { "not " }
    );
    s.push_str(
        "<table><thead><tr><th>voter</th><th>address</th><th>behind the leader</th></tr></thead>\
         <tbody>",
    );
    for v in &st.voters {
        let lag = v.lag.map_or("-".to_string(), |l| format!("{l} entries"));
        let _ = write!(
            s,
            "<tr data-voter=\"{id}\"><td><code>{id}</code>{}</td><td>{}</td><td>{lag}</td></tr>",
            if v.id == st.leader_id { " leader" } else { "" },
            esc(&v.addr),
            id = esc(&v.id),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// The proctor's intents: per service, desired and observed instances and how far done.
pub fn placement(r: &Result<ppb::StatusResponse, String>) -> String {
    let mut s = String::from("<h2>Placement</h2>");
    let st = match r {
        Ok(st) => st,
        Err(e) => {
            let _ = write!(s, "<p class=\"warn\">{}</p>", esc(e));
            return s;
        }
    };
    let _ = write!(
        s,
        "<p>intent generation {} · proctor on <code>{}</code>, term {}</p>",
        st.generation,
        esc(&st.leader),
        st.term
    );
    if st.services.is_empty() {
        s.push_str("<p class=\"none\">no intent applied</p>");
        return s;
    }
    s.push_str(
        "<table><thead><tr><th>api</th><th>instance</th><th>desired</th><th>running</th>\
         <th>doneness</th><th>nodes</th><th></th></tr></thead><tbody>",
    );
    for v in &st.services {
        let class = match v.state.as_str() {
            "converged" => "alive",
            "failed" => "dead",
            _ => "suspect",
        };
        let _ = write!(
            s,
            "<tr data-api=\"{api}\" data-inst=\"{inst}\" data-state=\"{state}\" class=\"{class}\">\
             <td>{api}</td><td>{inst}</td><td>{}</td><td>{}</td><td class=\"st\">{state}</td><td>{}</td>\
             <td>{}</td></tr>",
            v.desired,
            v.running,
            esc(&v.nodes.join(", ")),
            esc(&v.message),
            api = esc(&v.api),
            inst = esc(&v.inst),
            state = esc(&v.state),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// This node's pastiche cache: what it holds and how full it is.
pub fn pastiche(r: &Result<cpb::ListResponse, String>, now_ms: u64) -> String {
    let mut s = String::from("<h2>Pastiche</h2>");
    let l = match r {
        Ok(l) => l,
        Err(e) => {
            let _ = write!(s, "<p class=\"warn\">{}</p>", esc(e));
            return s;
        }
    };
    let _ = write!(
        s,
        "<p>{} blob(s) · {} used of {}</p>",
        l.entries.len(),
        bytes(l.used_bytes),
        bytes(l.max_bytes)
    );
    if l.entries.is_empty() {
        return s;
    }
    s.push_str(
        "<table><thead><tr><th>digest</th><th>size</th><th>pinned</th><th>last used</th></tr>\
         </thead><tbody>",
    );
    for e in &l.entries {
        let _ = write!(
            s,
            "<tr data-digest=\"{d}\"><td><code title=\"{d}\">{}</code></td><td>{}</td><td>{}</td>\
             <td>{} ago</td></tr>",
            esc(&short_digest(&e.digest)),
            bytes(e.size),
            if e.pinned { "pinned" } else { "" },
            age(Duration::from_millis(now_ms.saturating_sub(e.last_used_ms))),
            d = esc(&e.digest),
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// `sha256:0123456789ab…`: enough of a digest to tell blobs apart on the page.
fn short_digest(d: &str) -> String {
    match d.char_indices().nth(19) {
        Some((at, _)) => format!("{}…", &d[..at]),
        None => d.to_string(),
    }
}

/// The recent events, newest first.
pub fn events<'a>(recent: impl Iterator<Item = &'a Noted>) -> String {
    let mut s = String::from("<h2>Recent events</h2><ol class=\"events\">");
    let mut any = false;
    for n in recent {
        any = true;
        let _ = write!(
            s,
            "<li class=\"{}\"><time>{}</time> {}</li>",
            n.kind,
            clock(n.at_ms),
            esc(&n.text)
        );
    }
    if !any {
        s.push_str("<li class=\"none\">nothing yet</li>");
    }
    s.push_str("</ol>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_flock::{BootId, Identity, LeaderView, Member, MemberInfo, MemberState, NodeId};

    fn member(id: u64, state: MemberState, since: Duration) -> Member {
        Member {
            info: MemberInfo {
                id: NodeId(id),
                boot: BootId(1),
                addr: format!("127.0.0.{id}:7700").parse().unwrap(),
                incarnation: 3,
                state,
                key: None,
            },
            since,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            identity: Identity {
                id: NodeId(2),
                boot: BootId(1),
                addr: "127.0.0.2:7700".parse().unwrap(),
                key: None,
            },
            now: Duration::from_secs(100),
            members: vec![
                member(2, MemberState::Alive, Duration::from_secs(10)),
                member(3, MemberState::Dead, Duration::from_secs(88)),
            ],
            leader: Some(LeaderView {
                id: NodeId(2),
                addr: "127.0.0.2:7700".parse().unwrap(),
                term: 4,
            }),
            live: 1,
            stats: Default::default(),
            leaving: false,
            key_epoch: Some(9),
            keys: Vec::new(),
        }
    }

    #[test]
    fn text_from_outside_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        let r = store(&Err("<script>alert(1)</script>".into()));
        assert!(!r.contains("<script>"), "{r}");
    }

    #[test]
    fn durations_bytes_and_times_read_as_people_write_them() {
        assert_eq!(age(Duration::from_millis(850)), "850 ms");
        assert_eq!(age(Duration::from_secs(12)), "12 s");
        assert_eq!(age(Duration::from_secs(243)), "4 min 3 s");
        assert_eq!(age(Duration::from_secs(7500)), "2 h 5 min");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 << 20), "20.0 MiB");
        assert_eq!(
            clock(86_400_000 + 5 * 3_600_000 + 2 * 60_000 + 11_000),
            "05:02:11"
        );
        assert_eq!(
            short_digest("sha256:0123456789abcdef"),
            "sha256:0123456789ab…"
        );
        assert_eq!(short_digest("sha256:01"), "sha256:01");
    }

    #[test]
    fn each_member_row_names_its_node_and_state() {
        let html = nodes(&snapshot(), Some(Duration::from_secs(12)));
        assert!(html
            .contains("<tr data-node=\"0000000000000002\" data-state=\"alive\" class=\"alive\">"));
        assert!(html.contains(
            "<td class=\"st\">alive</td><td>1 min 30 s</td><td>3</td><td>leader, this node</td>"
        ));
        assert!(
            html.contains("<tr data-node=\"0000000000000003\" data-state=\"dead\" class=\"dead\">")
        );
        assert!(html.contains("<td class=\"st\">dead</td><td>12 s</td>"));
        assert!(html.contains("term 4 · 1 live of 2"));
        assert!(html.contains("key epoch <b data-epoch=\"9\">9</b>, rotated 12 s ago"));
    }

    #[test]
    fn the_registry_groups_instances_under_their_api() {
        use crux_proto::grpc::steward::v1::{Health, Instance, RunState};
        let inst = |api: &str, inst: &str, health: Health| Instance {
            api: api.into(),
            inst: inst.into(),
            horde: "default".into(),
            addr: "127.0.0.2:9000".into(),
            node: "0000000000000002".into(),
            state: RunState::Running as i32,
            health: health as i32,
            ..Default::default()
        };
        let r = rpb::ServicesResponse {
            instances: vec![
                inst("ntp2", "ntp2_1", Health::Healthy),
                inst("ntp2", "ntp2_2", Health::Unhealthy),
                inst("snark", "snark_1", Health::Healthy),
            ],
            revision: 7,
            linked: true,
            flock_id: None,
        };
        let html = registry(&r);
        assert!(html.contains("3 instance(s) of 2 api(s) · revision 7 · linked"));
        assert_eq!(html.matches("<b>ntp2</b>").count(), 1, "{html}");
        assert!(html.contains(
            "data-api=\"ntp2\" data-inst=\"ntp2_2\" data-state=\"running\" \
             data-health=\"unhealthy\" class=\"suspect\""
        ));
        let empty = registry(&rpb::ServicesResponse::default());
        assert!(empty.contains("no service registered") && empty.contains("no steward"));
    }

    #[test]
    fn placement_shows_desired_observed_and_doneness() {
        let r = Ok(ppb::StatusResponse {
            generation: 3,
            leader: "0000000000000002".into(),
            term: 4,
            services: vec![ppb::ServiceStatus {
                horde: "default".into(),
                api: "galumph2".into(),
                inst: "galumph2_3".into(),
                state: "progressing".into(),
                desired: 3,
                running: 1,
                nodes: vec!["a".into(), "b".into()],
                message: "starting".into(),
            }],
        });
        let html = placement(&r);
        assert!(html.contains("intent generation 3"));
        assert!(html.contains(
            "<td>galumph2</td><td>galumph2_3</td><td>3</td><td>1</td><td class=\"st\">progressing</td>\
             <td>a, b</td><td>starting</td>"
        ));
        assert!(placement(&Err("no flock leader is known".into())).contains("no flock leader"));
    }
}
