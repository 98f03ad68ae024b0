//! What a query name asks for: the labels below the domain, read into a [`Target`].
//!
//! | name (below the domain)           | target                       |
//! |-----------------------------------|------------------------------|
//! | (the domain itself)               | [`Target::Apex`]             |
//! | `leader`                          | [`Target::Leader`]           |
//! | `NODE.node`                       | [`Target::Node`]             |
//! | `API.service[.HORDE]`             | [`Target::Service`]          |
//! | `_API._tcp.service[.HORDE]`       | [`Target::Service`] (RFC 2782 form, same answers) |
//! | `INST.inst[.HORDE]`               | [`Target::Inst`]             |
//! | anything else                     | [`Target::Unknown`]          |
//!
//! Keywords (`service`, `inst`, `node`, `leader`, `_tcp`) and the domain match in any case; the
//! API, instance, node and horde labels are passed on as the query spelled them.

/// What a name inside the domain names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The domain itself (its SOA).
    Apex,
    /// The leader's address.
    Leader,
    /// A node's address, by node id (16 hex digits, as the flock prints it).
    Node(String),
    /// The live instances of an API, best first. `horde` is empty for the default horde.
    Service {
        /// The API.
        api: String,
        /// The horde named in the query, or empty.
        horde: String,
    },
    /// One instance by name.
    Inst {
        /// The instance name.
        inst: String,
        /// The horde named in the query, or empty.
        horde: String,
    },
    /// Inside the domain but no name this server knows (NXDOMAIN).
    Unknown,
}

/// Where a query name stands with respect to the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Below (or at) the domain.
    Inside(Target),
    /// Outside the domain (REFUSED).
    Outside,
}

/// Reads `labels` (the query name's labels, leftmost first, without the root) against `domain`
/// (its labels, lowercase, leftmost first).
pub fn parse<'a, L>(labels: L, domain: &[String]) -> Parsed
where
    L: IntoIterator<Item = &'a [u8]>,
{
    let labels: Vec<&[u8]> = labels.into_iter().collect();
    if labels.len() < domain.len() {
        return Parsed::Outside;
    }
    let split = labels.len() - domain.len();
    let in_domain = labels[split..]
        .iter()
        .zip(domain)
        .all(|(l, d)| l.eq_ignore_ascii_case(d.as_bytes()));
    if !in_domain {
        return Parsed::Outside;
    }
    let mut below = Vec::with_capacity(split);
    for l in &labels[..split] {
        match std::str::from_utf8(l) {
            Ok(s) if !s.is_empty() => below.push(s),
            _ => return Parsed::Inside(Target::Unknown),
        }
    }
    Parsed::Inside(target(&below))
}

fn is(label: &str, keyword: &str) -> bool {
    label.eq_ignore_ascii_case(keyword)
}

fn target(below: &[&str]) -> Target {
    let owned = |s: &str| s.to_string();
    match below {
        [] => Target::Apex,
        [l] if is(l, "leader") => Target::Leader,
        [node, k] if is(k, "node") => Target::Node(owned(node)),
        [api, k, rest @ ..] if is(k, "service") && rest.len() <= 1 && !api.starts_with('_') => {
            Target::Service {
                api: owned(api),
                horde: rest.first().map(|h| owned(h)).unwrap_or_default(),
            }
        }
        [api, proto, k, rest @ ..]
            if is(proto, "_tcp") && is(k, "service") && rest.len() <= 1 && api.len() > 1 =>
        {
            match api.strip_prefix('_') {
                Some(api) => Target::Service {
                    api: owned(api),
                    horde: rest.first().map(|h| owned(h)).unwrap_or_default(),
                },
                None => Target::Unknown,
            }
        }
        [inst, k, rest @ ..] if is(k, "inst") && rest.len() <= 1 => Target::Inst {
            inst: owned(inst),
            horde: rest.first().map(|h| owned(h)).unwrap_or_default(),
        },
        _ => Target::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Parsed {
        let domain = vec!["crux".to_string()];
        parse(
            name.trim_end_matches('.')
                .split('.')
                .filter(|l| !l.is_empty())
                .map(str::as_bytes),
            &domain,
        )
    }

    fn svc(api: &str, horde: &str) -> Parsed {
        Parsed::Inside(Target::Service {
            api: api.into(),
            horde: horde.into(),
        })
    }

    #[test]
    fn names_inside_the_domain() {
        assert_eq!(p("crux."), Parsed::Inside(Target::Apex));
        assert_eq!(p("leader.crux."), Parsed::Inside(Target::Leader));
        assert_eq!(p("LEADER.CRUX."), Parsed::Inside(Target::Leader));
        assert_eq!(
            p("00000000000000ab.node.crux."),
            Parsed::Inside(Target::Node("00000000000000ab".into()))
        );
        assert_eq!(p("ntp2.service.crux."), svc("ntp2", ""));
        assert_eq!(p("Ntp2.Service.crux."), svc("Ntp2", ""));
        assert_eq!(p("ntp2.service.blue.crux."), svc("ntp2", "blue"));
        assert_eq!(p("_ntp2._tcp.service.crux."), svc("ntp2", ""));
        assert_eq!(p("_ntp2._tcp.service.blue.crux."), svc("ntp2", "blue"));
        assert_eq!(
            p("ntp2_10.inst.crux."),
            Parsed::Inside(Target::Inst {
                inst: "ntp2_10".into(),
                horde: String::new()
            })
        );
        assert_eq!(
            p("ntp2_10.inst.blue.crux."),
            Parsed::Inside(Target::Inst {
                inst: "ntp2_10".into(),
                horde: "blue".into()
            })
        );
    }

    #[test]
    fn unknown_names_inside_the_domain() {
        for name in [
            "nothing.crux.",
            "a.b.service.x.crux.",
            "service.crux.",
            "x.leader.crux.",
            "_ntp2._udp.service.crux.",
            "_._tcp.service.crux.",
            "_ntp2.service.crux.",
            "ntp2._tcp.service.crux.",
            "a.b.node.crux.",
            "a.inst.b.c.crux.",
        ] {
            assert_eq!(p(name), Parsed::Inside(Target::Unknown), "{name}");
        }
        let domain = vec!["crux".to_string()];
        let bad: [&[u8]; 3] = [b"\xff\xfe", b"service", b"crux"];
        assert_eq!(parse(bad, &domain), Parsed::Inside(Target::Unknown));
    }

    #[test]
    fn names_outside_the_domain() {
        assert_eq!(p("example.com."), Parsed::Outside);
        assert_eq!(p("."), Parsed::Outside);
        assert_eq!(p("crux.example."), Parsed::Outside);
        assert_eq!(p("ntp2.service.cruxx."), Parsed::Outside);
    }

    #[test]
    fn a_domain_of_several_labels() {
        let domain = vec!["dc1".to_string(), "example".to_string()];
        let labels: [&[u8]; 4] = [b"ntp2", b"service", b"DC1", b"example"];
        assert_eq!(parse(labels, &domain), svc("ntp2", ""));
        let labels: [&[u8]; 3] = [b"ntp2", b"service", b"example"];
        assert_eq!(parse(labels, &domain), Parsed::Outside);
    }
}
