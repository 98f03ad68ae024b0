//! What placement works on: live nodes with attributes, units of work and their states, and
//! the per-node questions a placement asks (eligible? which `distinct` and `spread` value?).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::intent::ServiceSpec;
use crate::lang::{Attrs, Placement};

/// A live node as placement sees it. `host` is an attribute like any other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node id (the flock member id); ties are broken by it.
    pub id: String,
    /// The node's attributes (config `[node.attributes]` plus host, os, arch, cpus, mem_gb).
    pub attrs: Attrs,
}

/// One unit of work: an instance of a service, run from a pastiche artifact.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Unit {
    /// The horde.
    pub horde: String,
    /// The api it provides.
    pub api: String,
    /// The instance name.
    pub inst: String,
    /// The pastiche digest of the executable.
    pub artifact: String,
    /// The muster function the runner starts.
    pub function: String,
}

impl Unit {
    /// The unit a service of the intent wants running.
    pub fn of(spec: &ServiceSpec) -> Unit {
        Unit {
            horde: spec.horde.clone(),
            api: spec.api.clone(),
            inst: spec.inst.clone(),
            artifact: spec.artifact.clone(),
            function: spec.function.clone(),
        }
    }

    /// The service it belongs to: `(horde, api)`.
    pub fn key(&self) -> (String, String) {
        (self.horde.clone(), self.api.clone())
    }

    /// Whether it belongs to the service with this `(horde, api)`.
    pub fn is_of(&self, horde: &str, api: &str) -> bool {
        self.horde == horde && self.api == api
    }
}

impl fmt::Display for Unit {
    /// `horde/api/inst` (artifact and function are in `Debug`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.horde, self.api, self.inst)
    }
}

/// A unit's state as a dean reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnitState {
    /// Being fetched or started.
    Pending,
    /// Running and passing its health check.
    Healthy,
    /// Failed (crash loop, failed fetch or start); kept in the report for a while so that the
    /// proctor does not retry on that node at once.
    Failed,
    /// Being stopped.
    Stopping,
}

impl UnitState {
    /// The state's name on the wire: `pending`, `healthy`, `failed`, `stopping`.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitState::Pending => "pending",
            UnitState::Healthy => "healthy",
            UnitState::Failed => "failed",
            UnitState::Stopping => "stopping",
        }
    }

    /// Pending or Healthy: the unit runs or is starting.
    pub fn is_live(self) -> bool {
        matches!(self, UnitState::Pending | UnitState::Healthy)
    }
}

impl fmt::Display for UnitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is none of `pending`, `healthy`, `failed`, `stopping`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown unit state {0:?} (expected pending, healthy, failed or stopping)")]
pub struct UnknownState(pub String);

impl FromStr for UnitState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<UnitState, UnknownState> {
        match s {
            "pending" => Ok(UnitState::Pending),
            "healthy" => Ok(UnitState::Healthy),
            "failed" => Ok(UnitState::Failed),
            "stopping" => Ok(UnitState::Stopping),
            _ => Err(UnknownState(s.to_string())),
        }
    }
}

/// The value of a placement's `distinct` attribute on a node, as a comparable key.
///
/// `None` when the placement has a `distinct` clause and the node lacks the attribute: such a
/// node cannot show it is distinct from the others and takes no instance (it counts as
/// excluded by `distinct`). `Some(None)` when the placement has no `distinct` clause.
pub fn distinct_key(p: &Placement, node: &Node) -> Option<Option<String>> {
    match &p.distinct {
        None => Some(None),
        Some(attr) => node.attrs.get(attr).map(|v| Some(v.to_string())),
    }
}

/// The value of a placement's `spread` attribute on a node, as a key. Nodes without the
/// attribute (or every node, without a `spread` clause) share the key `None`.
pub fn spread_key(p: &Placement, node: &Node) -> Option<String> {
    p.spread
        .as_ref()
        .and_then(|attr| node.attrs.get(attr))
        .map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lang::{parse, Value};

    #[test]
    fn unit_state_names_round_trip() {
        for s in [
            UnitState::Pending,
            UnitState::Healthy,
            UnitState::Failed,
            UnitState::Stopping,
        ] {
            assert_eq!(s.as_str().parse::<UnitState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(
            "running".parse::<UnitState>().unwrap_err().to_string(),
            "unknown unit state \"running\" (expected pending, healthy, failed or stopping)"
        );
    }

    #[test]
    fn distinct_and_spread_keys() {
        let node = |attrs: &[(&str, Value)]| Node {
            id: "n".into(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        let p = parse("count 2; distinct rack; spread zone").unwrap();
        let a = node(&[("rack", Value::Str("1".into())), ("zone", Value::Num(1.0))]);
        let b = node(&[("rack", Value::Num(1.0))]);
        // A string and a number with the same text are different values.
        assert_eq!(distinct_key(&p, &a), Some(Some("\"1\"".into())));
        assert_eq!(distinct_key(&p, &b), Some(Some("1".into())));
        assert_eq!(distinct_key(&p, &node(&[])), None);
        assert_eq!(spread_key(&p, &a), Some("1".into()));
        assert_eq!(spread_key(&p, &b), None);
        let q = parse("count 2").unwrap();
        assert_eq!(distinct_key(&q, &node(&[])), Some(None));
        assert_eq!(spread_key(&q, &a), None);
    }
}
