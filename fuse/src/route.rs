//! A route: what it matches, where it sends traffic, and the rules a route must follow. The
//! spec is stored as JSON in the store's `route` resources; [`RouteSpec::check`] runs before
//! every write, so the store never holds a route the snapshot cannot serve.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crux_proto::grpc::fuse::v1 as pb;

/// The most targets in one route.
pub const TARGETS_MAX: usize = 16;
/// The largest weight of one target (Envoy's and gRPC's weights are 32-bit; a small bound keeps
/// a sum from overflowing and the numbers readable).
pub const WEIGHT_MAX: u32 = 10_000;
/// The longest path prefix, in bytes.
pub const PREFIX_BYTES_MAX: usize = 1024;
/// The longest host, in bytes (a DNS name with a port).
pub const HOST_BYTES_MAX: usize = 259;
/// The longest timeout: one hour.
pub const TIMEOUT_MS_MAX: u64 = 3_600_000;
/// The most retries.
pub const RETRIES_MAX: u32 = 10;
/// The selector that picks the greatest live instance of an api (`ntp2_10` > `ntp2_9`).
pub const LATEST: &str = "latest";

/// Which instances of an api a target takes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Select {
    /// Every live instance.
    All,
    /// The greatest live instance (the registry's version rule).
    Latest,
    /// The instance of that name, while it lives.
    Inst(String),
}

/// One weighted target of a route.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The api.
    pub api: String,
    /// Which of its instances.
    pub select: Select,
    /// Relative weight.
    pub weight: u32,
}

impl Target {
    /// `API`, `API:latest` or `API:INST`.
    pub fn text(&self) -> String {
        match &self.select {
            Select::All => self.api.clone(),
            Select::Latest => format!("{}:{LATEST}", self.api),
            Select::Inst(i) => format!("{}:{i}", self.api),
        }
    }
}

/// A route as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Path prefix matched (`/` when only a host is given).
    pub prefix: String,
    /// Host matched (None: any).
    pub host: Option<String>,
    /// Where traffic goes.
    pub to: Vec<Target>,
    /// Per-request timeout in milliseconds (0: none).
    pub timeout_ms: u64,
    /// Retries (0: none).
    pub retries: u32,
}

/// A route refused: the message says which field and why. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRoute(pub String);

fn bad(m: impl Into<String>) -> BadRoute {
    BadRoute(m.into())
}

/// Checks a name usable as an xDS resource and target name: 1-128 of letters, digits, `_-.`.
pub fn check_name(what: &str, name: &str) -> Result<(), BadRoute> {
    crux_steward::select::check_name(what, name).map_err(|e| bad(e.0))
}

/// Parses `API`, `API:latest` or `API:INST`.
pub fn parse_target(text: &str, weight: u32) -> Result<Target, BadRoute> {
    let (api, sel) = match text.split_once(':') {
        Some((a, s)) => (a, Some(s)),
        None => (text, None),
    };
    check_name("target api", api)?;
    let select = match sel {
        None => Select::All,
        Some(LATEST) => Select::Latest,
        Some(inst) => {
            check_name("target instance", inst)?;
            Select::Inst(inst.to_string())
        }
    };
    Ok(Target {
        api: api.to_string(),
        select,
        weight,
    })
}

impl RouteSpec {
    /// Checks every field; the error names the first one at fault.
    pub fn check(&self) -> Result<(), BadRoute> {
        if !self.prefix.starts_with('/') {
            return Err(bad(format!(
                "match prefix {:?} must start with '/' (a gRPC method path is /package.Service/Method)",
                self.prefix
            )));
        }
        if self.prefix.len() > PREFIX_BYTES_MAX
            || !self.prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad(format!(
                "match prefix {:?}: at most {PREFIX_BYTES_MAX} bytes of printable ASCII without spaces",
                self.prefix
            )));
        }
        if let Some(h) = &self.host {
            let ok = !h.is_empty()
                && h.len() <= HOST_BYTES_MAX
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "host {h:?}: 1-{HOST_BYTES_MAX} bytes of letters, digits, '-', '.', '_' and ':'"
                )));
            }
        }
        if self.to.is_empty() {
            return Err(bad("a route needs at least one target (--to API)"));
        }
        if self.to.len() > TARGETS_MAX {
            return Err(bad(format!(
                "{} targets: at most {TARGETS_MAX} are allowed",
                self.to.len()
            )));
        }
        let mut seen = BTreeSet::new();
        let mut sum = 0u64;
        for t in &self.to {
            check_name("target api", &t.api)?;
            if let Select::Inst(i) = &t.select {
                check_name("target instance", i)?;
            }
            if !seen.insert((&t.api, &t.select)) {
                return Err(bad(format!("target {} is named twice", t.text())));
            }
            if t.weight > WEIGHT_MAX {
                return Err(bad(format!(
                    "weight {} of {}: at most {WEIGHT_MAX}",
                    t.weight,
                    t.text()
                )));
            }
            sum += u64::from(t.weight);
        }
        if sum == 0 {
            return Err(bad(format!(
                "the weights of {} sum to zero: no traffic could go anywhere (give one target a weight above 0)",
                self.to.iter().map(Target::text).collect::<Vec<_>>().join(", ")
            )));
        }
        if self.timeout_ms > TIMEOUT_MS_MAX {
            return Err(bad(format!(
                "timeout of {} ms: at most {TIMEOUT_MS_MAX} ms (1 h)",
                self.timeout_ms
            )));
        }
        if self.retries > RETRIES_MAX {
            return Err(bad(format!(
                "{} retries: at most {RETRIES_MAX}",
                self.retries
            )));
        }
        Ok(())
    }

    /// The JSON the store keeps.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored spec, checked.
    pub fn decode(bytes: &[u8]) -> Result<RouteSpec, BadRoute> {
        let spec: RouteSpec =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("unreadable route: {e}")))?;
        spec.check()?;
        Ok(spec)
    }

    /// From the API's message (name checked too).
    pub fn from_pb(r: &pb::Route) -> Result<RouteSpec, BadRoute> {
        check_name("route name", &r.name)?;
        if r.prefix.is_empty() && r.host.is_empty() {
            return Err(bad(format!(
                "route {}: give --match PREFIX or --host HOST (or both)",
                r.name
            )));
        }
        let to =
            r.to.iter()
                .map(|t| {
                    let text = if t.selector.is_empty() {
                        t.api.clone()
                    } else {
                        format!("{}:{}", t.api, t.selector)
                    };
                    parse_target(&text, t.weight)
                })
                .collect::<Result<Vec<_>, _>>()?;
        let spec = RouteSpec {
            prefix: if r.prefix.is_empty() {
                "/".into()
            } else {
                r.prefix.clone()
            },
            host: (!r.host.is_empty()).then(|| r.host.clone()),
            to,
            timeout_ms: r.timeout_ms,
            retries: r.retries,
        };
        spec.check()?;
        Ok(spec)
    }

    /// To the API's message.
    pub fn to_pb(&self, name: &str, version: u64) -> pb::Route {
        pb::Route {
            name: name.to_string(),
            prefix: self.prefix.clone(),
            host: self.host.clone().unwrap_or_default(),
            to: self
                .to
                .iter()
                .map(|t| pb::Target {
                    api: t.api.clone(),
                    selector: match &t.select {
                        Select::All => String::new(),
                        Select::Latest => LATEST.into(),
                        Select::Inst(i) => i.clone(),
                    },
                    weight: t.weight,
                })
                .collect(),
            timeout_ms: self.timeout_ms,
            retries: self.retries,
            version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(to: &[(&str, u32)]) -> pb::Route {
        pb::Route {
            name: "greet".into(),
            prefix: "/helloworld.Greeter/".into(),
            to: to
                .iter()
                .map(|(t, w)| {
                    let (api, sel) = t.split_once(':').unwrap_or((t, ""));
                    pb::Target {
                        api: api.into(),
                        selector: sel.into(),
                        weight: *w,
                    }
                })
                .collect(),
            ..Default::default()
        }
    }

    fn refused(r: pb::Route) -> String {
        RouteSpec::from_pb(&r).expect_err("refused").0
    }

    #[test]
    fn targets_parse_as_api_latest_or_instance() {
        let t = parse_target("ntp2", 1).unwrap();
        assert_eq!((t.api.as_str(), &t.select), ("ntp2", &Select::All));
        assert_eq!(
            parse_target("ntp2:latest", 1).unwrap().select,
            Select::Latest
        );
        assert_eq!(
            parse_target("ntp2:ntp2_10", 1).unwrap().select,
            Select::Inst("ntp2_10".into())
        );
        assert!(parse_target("a b", 1).is_err());
        assert!(parse_target("ntp2:", 1).is_err());
    }

    #[test]
    fn a_route_round_trips_through_the_store_form_and_the_api_form() {
        let spec = RouteSpec::from_pb(&route(&[("a", 3), ("b:latest", 1)])).unwrap();
        let back = RouteSpec::decode(&spec.encode()).unwrap();
        assert_eq!(back, spec);
        let pb = spec.to_pb("greet", 7);
        assert_eq!(pb.to[1].selector, "latest");
        assert_eq!(RouteSpec::from_pb(&pb).unwrap(), spec);
    }

    #[test]
    fn bad_routes_are_refused_with_the_field_at_fault() {
        assert!(refused(route(&[("a", 0), ("b", 0)])).contains("sum to zero"));
        assert!(refused(route(&[])).contains("at least one target"));
        assert!(refused(route(&[("a", 1), ("a", 2)])).contains("named twice"));
        assert!(refused(route(&[("a", WEIGHT_MAX + 1)])).contains("weight"));
        let mut r = route(&[("a", 1)]);
        r.prefix = "nope".into();
        assert!(refused(r).contains("must start with '/'"));
        let mut r = route(&[("a", 1)]);
        r.prefix = String::new();
        assert!(refused(r).contains("--match PREFIX or --host"));
        let mut r = route(&[("a", 1)]);
        r.name = "bad name".into();
        assert!(refused(r).contains("route name"));
        let mut r = route(&[("a", 1)]);
        r.host = "a host".into();
        assert!(refused(r).contains("host"));
        let mut r = route(&[("a", 1)]);
        r.timeout_ms = TIMEOUT_MS_MAX + 1;
        assert!(refused(r).contains("timeout"));
        let mut r = route(&[("a", 1)]);
        r.retries = RETRIES_MAX + 1;
        assert!(refused(r).contains("retries"));
        // A zero weight beside a positive one is fine (a target drained by weight).
        RouteSpec::from_pb(&route(&[("a", 0), ("b", 1)])).unwrap();
        assert!(RouteSpec::decode(b"{not json").is_err());
    }
}
