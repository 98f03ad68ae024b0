//! The intent: which services should run, from which artifact, placed how.
//!
//! Operators write it as TOML:
//!
//! ```toml
//! [[service]]
//! horde = "default"            # optional, default "default"
//! api = "galumph2"
//! inst = "galumph2_3"
//! artifact = "sha256:<64 hex>" # a pastiche digest
//! function = "galumph2_3"      # the muster function name
//! placement = "count 3; distinct host"
//! ```
//!
//! It is stored as JSON ([`Intent::to_json`], `{"services":[...]}`). Both ways in
//! ([`parse_intent`], [`Intent::from_json`]) validate the same rules:
//!
//! - no unknown fields;
//! - `horde`, `api`, `inst` and `function` are 1 to [`NAME_BYTES_MAX`] characters of
//!   `[A-Za-z0-9_.-]`;
//! - `artifact` is `sha256:` and 64 lowercase hex digits;
//! - `placement` parses ([`crate::lang`]);
//! - one service per `(horde, api)`: a service runs one instance at a time, and changing its
//!   `inst` (or `artifact`) is how a live update is asked for.
//!
//! An intent without services is valid: it stops everything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lang::{self, ParseError, Placement};

/// Longest horde, api, inst or function name, in bytes.
pub const NAME_BYTES_MAX: usize = 128;

/// The horde of a service that names none.
pub const DEFAULT_HORDE: &str = "default";

/// One service of the intent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The horde the service runs in (`default` unless given).
    pub horde: String,
    /// The api the service provides; one service per (horde, api).
    pub api: String,
    /// The instance name; a new one asks for a live update.
    pub inst: String,
    /// The pastiche digest of the executable, `sha256:<64 lowercase hex>`.
    pub artifact: String,
    /// The muster function name the runner starts.
    pub function: String,
    /// The placement ([`crate::lang`]).
    pub placement: String,
}

impl ServiceSpec {
    /// The parsed placement.
    ///
    /// Specs inside an [`Intent`] from [`parse_intent`] or [`Intent::from_json`] always parse.
    /// A hand-built spec whose placement does not parse gets a placement of `count 0`, which
    /// places nothing; [`ServiceSpec::try_placement`] gives the error.
    pub fn placement(&self) -> Placement {
        self.try_placement().unwrap_or(Placement {
            count: 0,
            filter: None,
            distinct: None,
            spread: None,
        })
    }

    /// The parsed placement, or why it does not parse.
    pub fn try_placement(&self) -> Result<Placement, ParseError> {
        lang::parse(&self.placement)
    }

    /// The service's identity: `(horde, api)`.
    pub fn key(&self) -> (String, String) {
        (self.horde.clone(), self.api.clone())
    }
}

/// The whole intent: every service that should run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// The services, in the order given.
    pub services: Vec<ServiceSpec>,
}

/// Why an intent is refused. Nothing is applied when one is returned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IntentError {
    /// The TOML does not parse or has unknown or missing fields (toml's message names the line).
    #[error("intent: {0}")]
    Toml(String),
    /// The stored JSON does not parse or has unknown or missing fields.
    #[error("stored intent (JSON): {0}")]
    Json(String),
    /// A field of a service is invalid. `index` is 1-based.
    #[error("service {index} ({api}): {field}: {message}", api = show_api(api))]
    Field {
        /// 1-based position of the service.
        index: usize,
        /// Its api, as given.
        api: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A service's placement does not parse. `line` is the intent file's line of the placement
    /// string, when known (TOML only).
    #[error(
        "service {index} ({api}): placement: {error}{at}",
        api = show_api(api),
        at = line.map(|l| format!(" (intent line {l})")).unwrap_or_default()
    )]
    Placement {
        /// 1-based position of the service.
        index: usize,
        /// Its api.
        api: String,
        /// The parse error, positioned within the placement text.
        error: ParseError,
        /// The line of the intent file the placement string is on.
        line: Option<usize>,
    },
    /// Two services have the same (horde, api).
    #[error(
        "services {first} and {second} are both api {api} in horde {horde}: one service per (horde, api); change `inst` to update it"
    )]
    Duplicate {
        /// 1-based position of the first.
        first: usize,
        /// 1-based position of the second.
        second: usize,
        /// The horde.
        horde: String,
        /// The api.
        api: String,
    },
}

fn show_api(api: &str) -> &str {
    if api.is_empty() {
        "no api"
    } else {
        api
    }
}

/// The TOML file's shape: `[[service]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlIntent {
    #[serde(default)]
    service: Vec<TomlService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlService {
    #[serde(default = "default_horde")]
    horde: String,
    api: String,
    inst: String,
    artifact: String,
    function: String,
    placement: toml::Spanned<String>,
}

fn default_horde() -> String {
    DEFAULT_HORDE.to_string()
}

/// Parses and validates an intent file.
pub fn parse_intent(toml_text: &str) -> Result<Intent, IntentError> {
    let raw: TomlIntent =
        toml::from_str(toml_text).map_err(|e| IntentError::Toml(e.to_string().trim().into()))?;
    let mut lines = Vec::with_capacity(raw.service.len());
    let services = raw
        .service
        .into_iter()
        .map(|s| {
            let start = s.placement.span().start.min(toml_text.len());
            lines.push(toml_text[..start].matches('\n').count() + 1);
            ServiceSpec {
                horde: s.horde,
                api: s.api,
                inst: s.inst,
                artifact: s.artifact,
                function: s.function,
                placement: s.placement.into_inner(),
            }
        })
        .collect();
    let intent = Intent { services };
    intent.validate_at(|i| lines.get(i).copied())?;
    Ok(intent)
}

impl Intent {
    /// The stored form (compact JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an intent always serialises")
    }

    /// Reads and validates the stored form.
    pub fn from_json(s: &str) -> Result<Intent, IntentError> {
        let intent: Intent =
            serde_json::from_str(s).map_err(|e| IntentError::Json(e.to_string()))?;
        intent.validate()?;
        Ok(intent)
    }

    /// Checks every rule of the module doc; the first broken one is returned.
    pub fn validate(&self) -> Result<(), IntentError> {
        self.validate_at(|_| None)
    }

    fn validate_at(&self, line_of: impl Fn(usize) -> Option<usize>) -> Result<(), IntentError> {
        let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let index = i + 1;
            let field_err = |field: &'static str, message: String| IntentError::Field {
                index,
                api: s.api.clone(),
                field,
                message,
            };
            for (field, value) in [
                ("horde", &s.horde),
                ("api", &s.api),
                ("inst", &s.inst),
                ("function", &s.function),
            ] {
                check_name(value).map_err(|m| field_err(field, m))?;
            }
            check_digest(&s.artifact).map_err(|m| field_err("artifact", m))?;
            s.try_placement().map_err(|error| IntentError::Placement {
                index,
                api: s.api.clone(),
                error,
                line: line_of(i),
            })?;
            if let Some(first) = seen.insert((&s.horde, &s.api), index) {
                return Err(IntentError::Duplicate {
                    first,
                    second: index,
                    horde: s.horde.clone(),
                    api: s.api.clone(),
                });
            }
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{} bytes long, at most {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c)))
    {
        return Err(format!(
            "{name:?} contains {c:?}: names use only A-Z a-z 0-9 _ . -"
        ));
    }
    Ok(())
}

fn check_digest(digest: &str) -> Result<(), String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("{digest:?} is not a pastiche digest: expected sha256:<64 hex>"))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "{digest:?} is not a pastiche digest: expected sha256: and 64 lowercase hex digits"
        ));
    }
    Ok(())
}

/// A digest shortened for people: `sha256:` and 12 hex digits, then `…`.
fn short(digest: &str) -> String {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 && hex.is_char_boundary(12) => {
            format!("sha256:{}…", &hex[..12])
        }
        _ => digest.to_string(),
    }
}

/// A placement as printed in a diff: normalised when it parses, as written otherwise.
fn shown_placement(s: &ServiceSpec) -> String {
    s.try_placement()
        .map(|p| p.to_string())
        .unwrap_or_else(|_| s.placement.clone())
}

/// What changes from `old` to `new`, one line per change, for people; empty when nothing does.
///
/// Services are matched by `(horde, api)` and listed in that order:
///
/// ```text
/// + galumph2 (default): galumph2_3 sha256:0123456789ab… count 3; distinct host
/// - galumph1 (default): galumph1_1 sha256:ba9876543210… count 1
/// ~ galumph2: inst galumph2_3 -> galumph2_4
/// ~ galumph2 (blue): placement count 3 -> count 5; distinct host
/// ```
///
/// `~` lines name the horde when it is not `default`. Placements are compared parsed, so
/// spacing or clause order alone is no change.
pub fn diff(old: &Intent, new: &Intent) -> Vec<String> {
    let index = |i: &Intent| -> BTreeMap<(String, String), ServiceSpec> {
        i.services.iter().map(|s| (s.key(), s.clone())).collect()
    };
    let (old, new) = (index(old), index(new));
    let mut keys: Vec<&(String, String)> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        match (old.get(key), new.get(key)) {
            (None, Some(s)) | (Some(s), None) => {
                let sign = if new.contains_key(key) { '+' } else { '-' };
                out.push(format!(
                    "{sign} {} ({}): {} {} {}",
                    s.api,
                    s.horde,
                    s.inst,
                    short(&s.artifact),
                    shown_placement(s)
                ));
            }
            (Some(a), Some(b)) => {
                let name = if a.horde == DEFAULT_HORDE {
                    a.api.clone()
                } else {
                    format!("{} ({})", a.api, a.horde)
                };
                if a.inst != b.inst {
                    out.push(format!("~ {name}: inst {} -> {}", a.inst, b.inst));
                }
                if a.artifact != b.artifact {
                    let (x, y) = (short(&a.artifact), short(&b.artifact));
                    let (x, y) = if x == y {
                        (a.artifact.clone(), b.artifact.clone())
                    } else {
                        (x, y)
                    };
                    out.push(format!("~ {name}: artifact {x} -> {y}"));
                }
                if a.function != b.function {
                    out.push(format!(
                        "~ {name}: function {} -> {}",
                        a.function, b.function
                    ));
                }
                let same_placement = match (a.try_placement(), b.try_placement()) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => a.placement == b.placement,
                };
                if !same_placement {
                    out.push(format!(
                        "~ {name}: placement {} -> {}",
                        shown_placement(a),
                        shown_placement(b)
                    ));
                }
            }
            (None, None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const D2: &str = "sha256:ba9876543210fedcba9876543210fedcba9876543210fedcba9876543210fe";

    fn one(fields: &str) -> String {
        format!("[[service]]\n{fields}")
    }

    fn base() -> String {
        one(&format!(
            "api = \"galumph2\"\ninst = \"galumph2_3\"\nartifact = \"{D1}\"\nfunction = \"galumph2_3\"\nplacement = \"count 3; distinct host\"\n"
        ))
    }

    #[test]
    fn parses_a_service_with_the_default_horde() {
        let i = parse_intent(&base()).unwrap();
        assert_eq!(
            i.services,
            vec![ServiceSpec {
                horde: "default".into(),
                api: "galumph2".into(),
                inst: "galumph2_3".into(),
                artifact: D1.into(),
                function: "galumph2_3".into(),
                placement: "count 3; distinct host".into(),
            }]
        );
        assert_eq!(i.services[0].key(), ("default".into(), "galumph2".into()));
        assert_eq!(i.services[0].placement().count, 3);
        assert_eq!(i.services[0].placement().distinct.as_deref(), Some("host"));
    }

    #[test]
    fn empty_intent_is_valid() {
        assert_eq!(parse_intent("").unwrap(), Intent::default());
        assert_eq!(parse_intent("# nothing runs\n").unwrap(), Intent::default());
        assert_eq!(
            Intent::from_json(&Intent::default().to_json()).unwrap(),
            Intent::default()
        );
    }

    #[test]
    fn json_round_trip_and_validation() {
        let i = parse_intent(&base()).unwrap();
        let json = i.to_json();
        assert!(
            json.starts_with(r#"{"services":[{"horde":"default","api":"galumph2""#),
            "{json}"
        );
        assert_eq!(Intent::from_json(&json).unwrap(), i);
        let bad = json.replace("count 3", "count 0");
        let e = Intent::from_json(&bad).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("service 1 (galumph2): placement: line 1, column 7:"),
            "{e}"
        );
        let e = Intent::from_json(&json.replace("\"horde\"", "\"hoard\"")).unwrap_err();
        assert!(matches!(e, IntentError::Json(_)), "{e}");
        assert!(e.to_string().contains("hoard"), "{e}");
        assert!(matches!(Intent::from_json("{"), Err(IntentError::Json(_))));
    }

    #[test]
    fn unknown_and_missing_fields_are_refused() {
        let e = parse_intent(&format!("{}colour = \"red\"\n", base())).unwrap_err();
        assert!(matches!(e, IntentError::Toml(_)));
        assert!(e.to_string().contains("colour"), "{e}");
        let e = parse_intent(&base().replace("[[service]]", "[[services]]")).unwrap_err();
        assert!(e.to_string().contains("services"), "{e}");
        let e = parse_intent(&base().replace("inst = \"galumph2_3\"\n", "")).unwrap_err();
        assert!(e.to_string().contains("inst"), "{e}");
    }

    #[test]
    fn field_errors_name_service_and_field() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "api = \"galumph2\"",
                "api = \"\"",
                "service 1 (no api): api: empty",
            ),
            (
                "inst = \"galumph2_3\"",
                "inst = \"a b\"",
                "service 1 (galumph2): inst: \"a b\" contains ' '",
            ),
            (
                "function = \"galumph2_3\"",
                "function = \"f/x\"",
                "service 1 (galumph2): function: \"f/x\" contains '/'",
            ),
            (
                "api = \"galumph2\"",
                "api = \"galumph2\"\nhorde = \"\"",
                "service 1 (galumph2): horde: empty",
            ),
            (
                "artifact = \"sha256:0123",
                "artifact = \"md5:0123",
                "service 1 (galumph2): artifact:",
            ),
            (
                "0123456789abcdef\"",
                "0123456789ABCDEF\"",
                "64 lowercase hex",
            ),
            (
                "0123456789abcdef\"",
                "0123456789abcde\"",
                "64 lowercase hex",
            ),
        ];
        for (from, to, want) in cases {
            let text = base().replacen(from, to, 1);
            assert_ne!(text, base(), "{from}");
            let e = parse_intent(&text).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want}");
        }
        let long = "a".repeat(NAME_BYTES_MAX + 1);
        let e =
            parse_intent(&base().replace("inst = \"galumph2_3\"", &format!("inst = \"{long}\"")))
                .unwrap_err();
        assert!(e.to_string().contains("at most 128"), "{e}");
    }

    #[test]
    fn placement_errors_name_service_position_and_file_line() {
        let text = format!(
            "{}\n{}",
            base(),
            base()
                .replace("galumph2", "other")
                .replace("count 3", "count three")
        );
        let e = parse_intent(&text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "service 2 (other): placement: line 1, column 7: `count` needs a whole number of instances (1 or more), found `three` (intent line 13)"
        );
    }

    #[test]
    fn duplicate_horde_api_is_refused_other_horde_is_not() {
        let two = format!("{}{}", base(), base().replace("galumph2_3", "galumph2_4"));
        let e = parse_intent(&two).unwrap_err();
        assert_eq!(
            e,
            IntentError::Duplicate {
                first: 1,
                second: 2,
                horde: "default".into(),
                api: "galumph2".into()
            }
        );
        assert!(e.to_string().contains("change `inst` to update it"));
        let other = format!(
            "{}{}",
            base(),
            base().replace("api = ", "horde = \"blue\"\napi = ")
        );
        assert_eq!(parse_intent(&other).unwrap().services.len(), 2);
    }

    #[test]
    fn diff_lines() {
        let a = parse_intent(&base()).unwrap();
        assert!(diff(&a, &a).is_empty());
        assert_eq!(
            diff(&Intent::default(), &a),
            vec!["+ galumph2 (default): galumph2_3 sha256:0123456789ab… count 3; distinct host"]
        );
        assert_eq!(
            diff(&a, &Intent::default()),
            vec!["- galumph2 (default): galumph2_3 sha256:0123456789ab… count 3; distinct host"]
        );
        let mut b = a.clone();
        b.services[0].inst = "galumph2_4".into();
        b.services[0].artifact = D2.into();
        b.services[0].function = "galumph2_4".into();
        b.services[0].placement = "distinct host;count 5".into();
        assert_eq!(
            diff(&a, &b),
            vec![
                "~ galumph2: inst galumph2_3 -> galumph2_4",
                "~ galumph2: artifact sha256:0123456789ab… -> sha256:ba9876543210…",
                "~ galumph2: function galumph2_3 -> galumph2_4",
                "~ galumph2: placement count 3; distinct host -> count 5; distinct host",
            ]
        );
        // Formatting alone is no change.
        let mut c = a.clone();
        c.services[0].placement = " distinct  host ; count 3 ;".into();
        assert!(diff(&a, &c).is_empty());
        // Another horde is named, and lines come in (horde, api) order.
        let mut d = a.clone();
        d.services[0].horde = "blue".into();
        let mut e = d.clone();
        e.services[0].inst = "x".into();
        e.services.push(a.services[0].clone());
        assert_eq!(
            diff(&d, &e),
            vec![
                "~ galumph2 (blue): inst galumph2_3 -> x",
                "+ galumph2 (default): galumph2_3 sha256:0123456789ab… count 3; distinct host",
            ]
        );
    }

    #[test]
    fn hand_built_bad_placement_places_nothing() {
        let mut s = parse_intent(&base()).unwrap().services.remove(0);
        s.placement = "count".into();
        assert_eq!(s.placement().count, 0);
        assert!(s.try_placement().is_err());
    }
}
