//! DNS end to end (issue 25, items 1, 2 and 4): three `crux agent` processes on loopback, each
//! serving DNS on its own IP and port, resolved with `dig` (Debian dnsutils) and Python's
//! `dnspython` (in `.dev/venv`, from examples/python/requirements.txt). Each part whose resolver is
//! absent prints a SKIPPED line and is skipped.
//!
//! The test kills only the processes it started (the agents, the `crux register` sidecars).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crux_tests::cluster::{http_get, Cluster, Registration};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(20);
/// The registry heartbeat interval of this test.
const HB: Duration = Duration::from_secs(1);
/// An instance's validity when its sidecar sets none: three heartbeat intervals
/// (`ReeveConfig::default_valid_for`).
const VALIDITY: Duration = Duration::from_secs(3);

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

fn skipped(what: &str) {
    eprintln!("dns: SKIPPED {what}");
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have_dig() -> bool {
    Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `dig @server -p PORT ARGS…` (no retries, no recursion): its whole output.
fn dig(server: SocketAddr, args: &[&str]) -> Result<String, String> {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args([
            "-p",
            &server.port().to_string(),
            "+time=2",
            "+tries=1",
            "+norecurse",
        ])
        .args(args)
        .output()
        .map_err(|e| format!("dig: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!(
            "dig {args:?} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

/// `dig +short`: the answers' data, one per line, in the order of the answer section.
fn short(server: SocketAddr, name: &str, qtype: &str) -> Result<Vec<String>, String> {
    let text = dig(server, &["+short", name, qtype])?;
    Ok(text.lines().map(|l| l.trim().to_string()).collect())
}

/// The status of a full `dig` answer (`NOERROR`, `NXDOMAIN`, …).
fn status(text: &str) -> String {
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("(none)")
        .to_string()
}

/// The records of one section as `dig +noall +SECTION` prints them: (name, type, data).
fn section(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    sec: &str,
) -> Vec<(String, String, String)> {
    let text = dig(server, &["+noall", &format!("+{sec}"), name, qtype]).expect("dig");
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[3].to_string(), f[4..].join(" "))
        })
        .collect()
}

fn metric(c: &Cluster, k: usize, line_start: &str) -> u64 {
    let text = http_get(c.agent(k).http, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn register(c: &Cluster, k: usize, inst: &str, port: u16, meta: &[&str]) -> Registration {
    c.register(
        k,
        "svc",
        inst,
        SocketAddr::new(c.agent(k).addr.ip(), port),
        meta,
    )
}

fn ip(c: &Cluster, k: usize) -> String {
    c.agent(k).addr.ip().to_string()
}

/// A resolver run by `.dev/venv/bin/python` with dnspython: A and SRV of `name` at `server`,
/// one answer per line in answer order (`A ip`, `SRV prio weight port target`).
fn dnspython(python: &Path, server: SocketAddr, name: &str) -> Result<Vec<String>, String> {
    const SCRIPT: &str = r#"
import sys
import dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = [sys.argv[1]]
r.port = int(sys.argv[2])
r.lifetime = 3
for qtype in ("A", "SRV"):
    for rr in r.resolve(sys.argv[3], qtype, search=False):
        print(qtype, rr.to_text())
"#;
    let out = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(server.ip().to_string())
        .arg(server.port().to_string())
        .arg(name)
        .output()
        .map_err(|e| format!("python: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Registration to answers on every node, the version order, SRV (both spellings) with its
/// targets' addresses, TXT metadata, inst, node and leader names, NXDOMAIN with SOA, REFUSED
/// outside the domain, minimal ANY, malformed packets dropped and counted, dnspython, and a
/// kill -9 disappearing within the instance's validity.
#[test]
fn dns_on_three_nodes() {
    if !have_dig() {
        skipped("the DNS test: no `dig` (Debian dnsutils: run dev/setup.sh)");
        return;
    }
    let mut c = Cluster::new(BIN, 1, 3, PRESET);
    for k in 1..=3 {
        c.append_config(
            k,
            &format!(
                "[registry]\nheartbeat_interval = \"{}ms\"\n",
                HB.as_millis()
            ),
        );
    }
    c.start_all();
    let all = [1, 2, 3];
    let leader = c.stable_agreement(&all, Duration::from_secs(1), CONVERGE);
    let dns3 = c.agent(3).dns;

    // 1. svc_9 on node 1, svc_10 on node 2: every node answers A with svc_10's address first.
    let _nine = register(&c, 1, "svc_9", 40009, &["--meta", "color=blue"]);
    let mut ten = register(&c, 2, "svc_10", 40010, &["--meta", "color=green"]);
    let both = vec![ip(&c, 2), ip(&c, 1)];
    c.wait_for(
        "svc_10 then svc_9 in A answers on every node",
        CONVERGE,
        || {
            for k in all {
                let got = short(c.agent(k).dns, "svc.service.crux", "A")?;
                if got != both {
                    return Err(format!("node{k} answers {got:?}"));
                }
            }
            Ok(())
        },
    );

    // 2. SRV, by the name itself and by its RFC 2782 spelling: best first, with ports and
    //    targets whose addresses come in the additional section.
    let srv = vec![
        "0 1 40010 svc_10.inst.crux.".to_string(),
        "1 1 40009 svc_9.inst.crux.".to_string(),
    ];
    assert_eq!(short(dns3, "svc.service.crux", "SRV").unwrap(), srv);
    assert_eq!(short(dns3, "_svc._tcp.service.crux", "SRV").unwrap(), srv);
    let additional = section(dns3, "svc.service.crux", "SRV", "additional");
    assert!(
        additional.contains(&("svc_10.inst.crux.".into(), "A".into(), ip(&c, 2))),
        "{additional:?}"
    );
    assert!(
        additional.contains(&("svc_9.inst.crux.".into(), "A".into(), ip(&c, 1))),
        "{additional:?}"
    );
    // Over TCP the same.
    let tcp = dig(dns3, &["+tcp", "+short", "svc.service.crux", "SRV"]).unwrap();
    assert_eq!(tcp.lines().collect::<Vec<_>>(), srv);

    // 3. TXT: metadata; an instance by name; a node by id; the leader.
    let txt = short(dns3, "svc_10.inst.crux", "TXT").unwrap();
    assert_eq!(txt.len(), 1, "{txt:?}");
    assert!(txt[0].contains("\"inst=svc_10\""), "{txt:?}");
    assert!(txt[0].contains("\"color=green\""), "{txt:?}");
    assert_eq!(short(dns3, "svc_9.inst.crux", "A").unwrap(), [ip(&c, 1)]);
    let id1 = c.node_id(1).expect("node 1 id");
    assert_eq!(
        short(dns3, &format!("{id1}.node.crux"), "A").unwrap(),
        [ip(&c, 1)]
    );
    let leader_k = c.index_of(&leader.id).expect("leader is ours");
    assert_eq!(short(dns3, "leader.crux", "A").unwrap(), [ip(&c, leader_k)]);

    // 4. Unknown names inside the domain: NXDOMAIN with the SOA; outside it: REFUSED.
    let nx = dig(dns3, &["nosuch.service.crux", "A"]).unwrap();
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    let auth = section(dns3, "nosuch.service.crux", "A", "authority");
    assert!(
        auth.iter().any(|(n, t, _)| n == "crux." && t == "SOA"),
        "{auth:?}"
    );
    let nx = dig(dns3, &["what.ever.crux", "A"]).unwrap();
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");
    let refused = dig(dns3, &["example.com", "A"]).unwrap();
    assert_eq!(status(&refused), "REFUSED", "{refused}");

    // 5. ANY: one small HINFO record (RFC 8482), not every record of the name.
    let any = section(dns3, "svc.service.crux", "ANY", "answer");
    assert_eq!(any.len(), 1, "{any:?}");
    assert_eq!(any[0].1, "HINFO");
    assert!(any[0].2.contains("RFC8482"), "{any:?}");

    // 6. Malformed packets (too short; a compression pointer to itself): no reply, counted;
    //    the server answers the next query.
    let before = metric(&c, 3, "crux_dns_dropped_total{reason=\"malformed\"}");
    let sock = UdpSocket::bind(SocketAddr::new(c.agent(3).addr.ip(), 0)).expect("udp");
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let short_packet: &[u8] = &[0x12, 0x34, 0x01];
    let self_pointer: &[u8] = &[
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x0c, 0x00,
        0x01, 0x00, 0x01,
    ];
    for p in [short_packet, self_pointer] {
        sock.send_to(p, dns3).expect("send");
    }
    let mut buf = [0u8; 1500];
    let got = sock.recv_from(&mut buf);
    assert!(got.is_err(), "a malformed packet was answered: {got:?}");
    c.wait_for("the malformed packets counted", CONVERGE, || {
        let n = metric(&c, 3, "crux_dns_dropped_total{reason=\"malformed\"}");
        if n >= before + 2 {
            Ok(())
        } else {
            Err(format!(
                "crux_dns_dropped_total{{reason=\"malformed\"}} {n}, was {before}"
            ))
        }
    });
    assert_eq!(short(dns3, "svc.service.crux", "A").unwrap(), both);
    assert!(metric(&c, 3, "crux_dns_queries_total{rcode=\"nxdomain\"}") >= 2);
    assert!(metric(&c, 3, "crux_dns_queries_total{rcode=\"refused\"}") >= 1);

    // 7. dnspython resolves the same A and SRV.
    let python = repo().join(".dev/venv/bin/python");
    let py_ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import dns.resolver"])
            .status()
            .is_ok_and(|s| s.success());
    if py_ok {
        let got = dnspython(&python, dns3, "svc.service.crux.").expect("dnspython");
        let want: Vec<String> = both
            .iter()
            .map(|a| format!("A {a}"))
            .chain(srv.iter().map(|s| format!("SRV {s}")))
            .collect();
        assert_eq!(got, want);
    } else {
        skipped(&format!(
            "the dnspython part (no {} with dnspython: run dev/setup.sh)",
            python.display()
        ));
    }

    // 8. kill -9 of svc_10's process: its heartbeats stop, and every node drops it from its
    //    answers within its validity (and the heartbeat that carries the news).
    ten.kill9();
    let killed = now();
    c.wait_for("svc_10 gone from every node's answers", CONVERGE, || {
        for k in all {
            let got = short(c.agent(k).dns, "svc.service.crux", "A")?;
            if got != [ip(&c, 1)] {
                return Err(format!("node{k} answers {got:?}"));
            }
        }
        Ok(())
    });
    let gone = killed.elapsed();
    eprintln!("svc_10 left every node's DNS answers {gone:?} after its kill -9");
    assert!(
        gone <= VALIDITY + 2 * HB,
        "svc_10 took {gone:?} to leave the answers (validity {VALIDITY:?}, heartbeat {HB:?})"
    );
}

/// Names outside the domain go to `dns.forward` (issue 25, item 1's last sentence): node 1
/// forwards to node 2's DNS server, which serves the domain `upstream.` instead of `crux.`.
#[test]
fn names_outside_the_domain_are_forwarded_to_the_upstream_resolvers() {
    if !have_dig() {
        skipped("the DNS forwarding test: no `dig` (Debian dnsutils: run dev/setup.sh)");
        return;
    }
    let mut c = Cluster::new(BIN, 2, 2, PRESET);
    let upstream = c.agent(2).dns;
    c.append_config(
        1,
        &format!("dns.forward = [\"{upstream}\"]\ndns.forward_timeout = \"500ms\"\n"),
    );
    c.append_config(2, "dns.domain = \"upstream.\"\n");
    c.start_all();
    let leader = c.stable_agreement(&[1, 2], Duration::from_secs(1), CONVERGE);
    let leader_ip = leader.addr.rsplit_once(':').unwrap().0.to_string();
    let dns1 = c.agent(1).dns;

    // The upstream's own name, asked of node 1: forwarded, over UDP and over TCP.
    c.wait_for("leader.upstream through node 1", CONVERGE, || {
        let got = short(dns1, "leader.upstream", "A")?;
        if got == vec![leader_ip.clone()] {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
    let tcp = dig(dns1, &["+tcp", "+short", "leader.upstream", "A"]).expect("dig +tcp");
    assert_eq!(tcp.trim(), leader_ip, "over TCP");
    // Node 1's own domain is still its own.
    assert_eq!(
        short(dns1, "leader.crux", "A").unwrap(),
        vec![leader_ip.clone()]
    );
    // What the upstream refuses comes back as it said.
    let text = dig(dns1, &["example.org", "A"]).expect("dig");
    assert_eq!(status(&text), "REFUSED", "{text}");
    // Node 2 does not forward (none configured): outside its domain is REFUSED.
    let text = dig(upstream, &["leader.crux", "A"]).expect("dig");
    assert_eq!(status(&text), "REFUSED", "{text}");
    let ok = metric(&c, 1, "crux_dns_forwarded_total{result=\"ok\"}");
    assert!(ok >= 3, "forwards relayed: {ok}");

    // No upstream answers: SERVFAIL, after the timeout, and node 1 goes on answering its own.
    c.kill9(2);
    let text = dig(dns1, &["leader.upstream", "A"]).expect("dig");
    assert_eq!(status(&text), "SERVFAIL", "{text}");
    assert!(metric(&c, 1, "crux_dns_forwarded_total{result=\"failed\"}") >= 1);
    let text = dig(dns1, &["nothing.service.crux", "A"]).expect("dig");
    assert!(
        ["NOERROR", "NXDOMAIN"].contains(&status(&text).as_str()),
        "{text}"
    );
}
