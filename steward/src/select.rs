//! Selectors: which registered instances a name picks, and in what order.
//!
//! A selector names an api (`ntp2`: every instance of it, the greatest live one first) or an exact
//! instance (`ntp2_3`). `api:NAME` and `inst:NAME` say which; a bare name is an instance name when
//! an instance of that name exists in the horde, and an api otherwise. Instance names are compared
//! with digit runs as numbers, so `ntp2_10` > `ntp2_9`.

use std::cmp::Ordering;

use crux_proto::grpc::steward::v1::{Health, Instance, RunState};

/// The horde of an instance or a lookup that names none.
pub const DEFAULT_HORDE: &str = "default";

/// What a selector asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// Every instance of an api.
    Api(String),
    /// The instance of that name.
    Inst(String),
    /// A bare name: an instance of that name if one exists, else an api.
    Name(String),
    /// Everything (an empty selector, for watches).
    All,
}

/// A selector or a name that is not acceptable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadName(pub String);

/// Checks an api, inst or horde name: 1-128 characters, letters, digits, `_`, `-`, `.`.
pub fn check_name(what: &str, name: &str) -> Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName(format!("{what} must not be empty")));
    }
    if name.len() > 128 {
        return Err(BadName(format!(
            "{what} {name:?} is longer than 128 characters"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(BadName(format!(
            "{what} {name:?} holds {c:?}: use letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}

impl Selector {
    /// Parses `NAME`, `api:NAME` or `inst:NAME`; an empty text selects everything.
    pub fn parse(text: &str) -> Result<Selector, BadName> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Selector::All);
        }
        let (kind, name) = match text.split_once(':') {
            Some((k, n)) => (Some(k), n),
            None => (None, text),
        };
        check_name("selector name", name)?;
        let name = name.to_string();
        match kind {
            None => Ok(Selector::Name(name)),
            Some("api") => Ok(Selector::Api(name)),
            Some("inst") => Ok(Selector::Inst(name)),
            Some(k) => Err(BadName(format!(
                "selector kind {k:?} is not `api` or `inst`"
            ))),
        }
    }

    /// Resolves a bare name against `instances` (of the horde being looked in): an instance name
    /// when one of them bears it, else an api.
    pub fn resolve<'a>(&self, mut instances: impl Iterator<Item = &'a Instance>) -> Selector {
        match self {
            Selector::Name(n) => {
                if instances.any(|i| &i.inst == n) {
                    Selector::Inst(n.clone())
                } else {
                    Selector::Api(n.clone())
                }
            }
            other => other.clone(),
        }
    }

    /// Whether `i` matches (after [`Selector::resolve`]; a bare name matches either way).
    pub fn matches(&self, i: &Instance) -> bool {
        match self {
            Selector::Api(a) => &i.api == a,
            Selector::Inst(n) => &i.inst == n,
            Selector::Name(n) => &i.inst == n || &i.api == n,
            Selector::All => true,
        }
    }
}

/// Lower-case name of a run state (`starting`, `running`, `stopping`, `unknown`).
pub fn state_name(s: i32) -> &'static str {
    match RunState::try_from(s) {
        Ok(RunState::Starting) => "starting",
        Ok(RunState::Running) => "running",
        Ok(RunState::Stopping) => "stopping",
        Ok(RunState::Unknown) => "unknown",
        _ => "unspecified",
    }
}

/// Lower-case name of a health (`healthy`, `degraded`, `unhealthy`).
pub fn health_name(h: i32) -> &'static str {
    match Health::try_from(h) {
        Ok(Health::Healthy) => "healthy",
        Ok(Health::Degraded) => "degraded",
        Ok(Health::Unhealthy) => "unhealthy",
        _ => "unspecified",
    }
}

/// Live: running and healthy.
pub fn is_live(i: &Instance) -> bool {
    i.state == RunState::Running as i32 && i.health == Health::Healthy as i32
}

/// The horde an instance or a request names, `default` when empty.
pub fn horde_or_default(h: &str) -> &str {
    if h.is_empty() {
        DEFAULT_HORDE
    } else {
        h
    }
}

/// Compares two names with digit runs as numbers: `a9` < `a10`, `x2_9` < `x2_10`. Leading zeros
/// do not count (`a007` = `a7` in value; the shorter text comes first on a tie).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let (si, sj) = (i, j);
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let da = trim_zeros(&a[si..i]);
            let db = trim_zeros(&b[sj..j]);
            let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
            if ord != Ordering::Equal {
                return ord;
            }
        } else {
            let ord = a[i].cmp(&b[j]);
            if ord != Ordering::Equal {
                return ord;
            }
            i += 1;
            j += 1;
        }
    }
    (a.len() - i)
        .cmp(&(b.len() - j))
        .then_with(|| a.len().cmp(&b.len()))
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let n = d.iter().take_while(|c| **c == b'0').count();
    &d[n..]
}

/// Best first: live before not live, then the greatest instance name, then api and id (so the
/// order is total and the same on every node).
pub fn best_first(a: &Instance, b: &Instance) -> Ordering {
    is_live(b)
        .cmp(&is_live(a))
        .then_with(|| natural_cmp(&b.inst, &a.inst))
        .then_with(|| a.api.cmp(&b.api))
        .then_with(|| a.id.cmp(&b.id))
}

/// The instances of `horde` that `selector` matches, best first.
pub fn select<'a>(
    instances: impl Iterator<Item = &'a Instance> + Clone,
    selector: &Selector,
    horde: &str,
    live_only: bool,
) -> Vec<Instance> {
    let horde = horde_or_default(horde);
    let in_horde = instances.filter(move |i| i.horde == horde);
    let resolved = selector.resolve(in_horde.clone());
    let mut out: Vec<Instance> = in_horde
        .filter(|i| resolved.matches(i) && (!live_only || is_live(i)))
        .cloned()
        .collect();
    out.sort_by(best_first);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(api: &str, inst: &str, live: bool) -> Instance {
        Instance {
            id: format!("id-{inst}"),
            api: api.into(),
            inst: inst.into(),
            horde: DEFAULT_HORDE.into(),
            state: if live {
                RunState::Running
            } else {
                RunState::Starting
            } as i32,
            health: Health::Healthy as i32,
            ..Default::default()
        }
    }

    #[test]
    fn digit_runs_compare_as_numbers() {
        assert_eq!(natural_cmp("ntp2_10", "ntp2_9"), Ordering::Greater);
        assert_eq!(natural_cmp("ntp2_9", "ntp2_10"), Ordering::Less);
        assert_eq!(natural_cmp("a", "a1"), Ordering::Less);
        assert_eq!(natural_cmp("b1", "a9"), Ordering::Greater);
        assert_eq!(natural_cmp("x007", "x7"), Ordering::Greater);
        assert_eq!(natural_cmp("x7", "x7"), Ordering::Equal);
        assert_eq!(
            natural_cmp("x18446744073709551616", "x18446744073709551615"),
            Ordering::Greater,
            "runs longer than a u64 still compare"
        );
        let mut names = vec!["g_10", "g_9", "g_1", "g_100", "g_2"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["g_1", "g_2", "g_9", "g_10", "g_100"]);
    }

    #[test]
    fn an_api_selects_the_greatest_live_instance_first() {
        let all = [
            inst("galumph2", "galumph2_9", true),
            inst("galumph2", "galumph2_10", true),
            inst("galumph2", "galumph2_11", false),
            inst("other", "other_99", true),
        ];
        let got = select(all.iter(), &Selector::parse("galumph2").unwrap(), "", false);
        let names: Vec<_> = got.iter().map(|i| i.inst.as_str()).collect();
        assert_eq!(names, ["galumph2_10", "galumph2_9", "galumph2_11"]);
        let live = select(
            all.iter(),
            &Selector::parse("api:galumph2").unwrap(),
            "",
            true,
        );
        assert_eq!(live.len(), 2);
    }

    #[test]
    fn an_inst_selects_exactly_that_instance_and_hordes_scope() {
        let mut other_horde = inst("galumph2", "galumph2_10", true);
        other_horde.horde = "blue".into();
        other_horde.id = "blue-10".into();
        let all = [
            inst("galumph2", "galumph2_9", true),
            inst("galumph2", "galumph2_10", true),
            other_horde,
        ];
        let got = select(
            all.iter(),
            &Selector::parse("galumph2_9").unwrap(),
            "",
            false,
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].inst, "galumph2_9");
        let blue = select(
            all.iter(),
            &Selector::parse("galumph2").unwrap(),
            "blue",
            false,
        );
        assert_eq!(blue.len(), 1);
        assert_eq!(blue[0].id, "blue-10");
        assert!(select(
            all.iter(),
            &Selector::parse("inst:galumph2").unwrap(),
            "",
            false
        )
        .is_empty());
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        assert!(Selector::parse("a b").unwrap_err().0.contains("' '"));
        assert!(Selector::parse("kind:x").unwrap_err().0.contains("kind"));
        assert!(Selector::parse("api:").unwrap_err().0.contains("empty"));
        assert_eq!(Selector::parse("  ").unwrap(), Selector::All);
    }
}
