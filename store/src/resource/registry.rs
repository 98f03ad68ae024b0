//! The type registry: per resource type, its name rules and limits. Every write and read of the
//! generic path is checked here before it is sent to the Raft leader, so bad input is refused
//! with a clear message and changes nothing.
//!
//! # Limits
//!
//! | what | limit | why |
//! | --- | --- | --- |
//! | `kv` key | 1–512 bytes of UTF-8, no NUL, no `.` or `..` segment, no leading `/` | keys are paths people type; 512 as in issue 16 |
//! | `kv` value | ≤ 512 KiB | Consul's `kv_max_value_size` |
//! | operations per transaction | ≤ 64 | Consul's transaction limit |
//! | bytes of values (specs) per transaction | ≤ 512 KiB (names add at most 64 × 512 B) | Consul's `txn_max_req_len`; one Raft entry stays well under the node plane's 16 MiB message limit |
//! | horde | 1–64 bytes of `a-z 0-9 - _ .` | as registry hordes |
//! | `route` name / spec | ≤ 128 bytes / ≤ 16 KiB (Fuse checks them further) | an xDS target name; a route is small |
//!
//! The `kv` names starting with `crux/` are reserved for the system (intents, placement, keys):
//! writing them needs the `system` flag; a delete by prefix without it spares them.

use super::{Op, ResourceQuery, Txn};
use crate::StoreError;

/// One resource type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeSpec {
    /// Its name.
    pub name: &'static str,
    /// The longest name, in bytes.
    pub name_bytes_max: usize,
    /// The largest spec, in bytes.
    pub spec_bytes_max: usize,
    /// Names starting with this are the system's: written only with the `system` flag.
    pub reserved_prefix: Option<&'static str>,
    /// What a resource of this type is called in messages ("key").
    pub noun: &'static str,
}

/// The K/V type (Blueprint): a key, a value of bytes and flags.
pub const KV: TypeSpec = TypeSpec {
    name: "kv",
    name_bytes_max: 512,
    spec_bytes_max: 512 << 10,
    reserved_prefix: Some("crux/"),
    noun: "key",
};

/// The route type (Fuse): a route's name (also its xDS target name) and its spec, JSON that
/// `crux_fuse::route` writes and checks.
pub const ROUTE: TypeSpec = TypeSpec {
    name: "route",
    name_bytes_max: 128,
    spec_bytes_max: 16 << 10,
    reserved_prefix: None,
    noun: "route",
};

/// Every type the store knows.
pub const TYPES: &[TypeSpec] = &[KV, ROUTE];

/// The most operations in one transaction.
pub const TXN_OPS_MAX: usize = 64;

/// The most bytes of specs (values) in one transaction.
pub const TXN_BYTES_MAX: usize = 512 << 10;

/// The longest horde name.
pub const HORDE_BYTES_MAX: usize = 64;

/// The type named `name`.
pub fn spec(name: &str) -> Result<&'static TypeSpec, StoreError> {
    TYPES.iter().find(|t| t.name == name).ok_or_else(|| {
        StoreError::Invalid(format!(
            "unknown resource type {name:?} (known: {})",
            TYPES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

fn invalid(msg: String) -> StoreError {
    StoreError::Invalid(msg)
}

/// Checks a horde name.
pub fn check_horde(horde: &str) -> Result<(), StoreError> {
    if horde.is_empty() || horde.len() > HORDE_BYTES_MAX {
        return Err(invalid(format!(
            "horde {horde:?}: must be 1-{HORDE_BYTES_MAX} bytes"
        )));
    }
    if !horde
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(invalid(format!(
            "horde {horde:?}: only a-z, 0-9, '-', '_' and '.' are allowed"
        )));
    }
    Ok(())
}

/// Checks the text of a name or prefix of type `t` (not its reserved namespace). `prefix`: a
/// prefix may be empty and may end inside a segment.
fn check_text(t: &TypeSpec, name: &str, prefix: bool) -> Result<(), StoreError> {
    let noun = t.noun;
    if name.is_empty() && !prefix {
        return Err(invalid(format!("empty {noun}")));
    }
    if name.len() > t.name_bytes_max {
        return Err(invalid(format!(
            "{noun} of {} bytes: at most {} are allowed",
            name.len(),
            t.name_bytes_max
        )));
    }
    if name.contains('\0') {
        return Err(invalid(format!("{noun} {name:?}: contains NUL")));
    }
    if name.starts_with('/') {
        return Err(invalid(format!(
            "{noun} {name:?}: starts with '/' (write {:?})",
            name.trim_start_matches('/')
        )));
    }
    let segments: Vec<&str> = name.split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        // A prefix's last segment may be the start of a longer one ("a/.." is refused, "a/." as
        // a prefix of "a/.x" is not).
        if (*s == ".." || *s == ".") && !(prefix && i == last) {
            return Err(invalid(format!(
                "{noun} {name:?}: '.' and '..' segments are not allowed"
            )));
        }
    }
    Ok(())
}

fn reserved(t: &TypeSpec, name: &str, system: bool) -> Result<(), StoreError> {
    match t.reserved_prefix {
        Some(r) if !system && name.starts_with(r) => Err(invalid(format!(
            "{} {name:?}: names under {r:?} are reserved for the system (intents, placement, \
             keys); pass the system flag (--system) to write them",
            t.noun
        ))),
        _ => Ok(()),
    }
}

/// Checks a transaction: its size, and every operation's type, horde, name and spec. `system`
/// allows writes to a type's reserved names. Nothing is sent when this refuses.
pub fn check_txn(txn: &Txn, system: bool) -> Result<(), StoreError> {
    if txn.ops.is_empty() {
        return Err(invalid("empty transaction: no operations".into()));
    }
    if txn.ops.len() > TXN_OPS_MAX {
        return Err(invalid(format!(
            "transaction of {} operations: at most {TXN_OPS_MAX} are allowed",
            txn.ops.len()
        )));
    }
    let mut bytes = 0usize;
    for (n, op) in txn.ops.iter().enumerate() {
        let at = |e: StoreError| match e {
            StoreError::Invalid(m) if txn.ops.len() > 1 => invalid(format!("operation {n}: {m}")),
            other => other,
        };
        match op {
            Op::Check { id, .. } => {
                let t = spec(&id.rtype).map_err(at)?;
                check_horde(&id.horde).map_err(at)?;
                check_text(t, &id.name, false).map_err(at)?;
            }
            Op::Delete { id, .. } => {
                let t = spec(&id.rtype).map_err(at)?;
                check_horde(&id.horde).map_err(at)?;
                check_text(t, &id.name, false).map_err(at)?;
                reserved(t, &id.name, system).map_err(at)?;
            }
            Op::Put { id, spec: s, .. } => {
                let t = spec(&id.rtype).map_err(at)?;
                check_horde(&id.horde).map_err(at)?;
                check_text(t, &id.name, false).map_err(at)?;
                reserved(t, &id.name, system).map_err(at)?;
                if s.len() > t.spec_bytes_max {
                    return Err(at(invalid(format!(
                        "value of {} bytes for {} {:?}: at most {} ({} KiB) are allowed",
                        s.len(),
                        t.noun,
                        id.name,
                        t.spec_bytes_max,
                        t.spec_bytes_max >> 10
                    ))));
                }
                bytes += s.len();
            }
            Op::DeletePrefix {
                rtype,
                horde,
                prefix,
                spare,
            } => {
                let t = spec(rtype).map_err(at)?;
                check_horde(horde).map_err(at)?;
                check_text(t, prefix, true).map_err(at)?;
                if prefix.is_empty() {
                    return Err(at(invalid(
                        "refusing to delete by an empty prefix (every key): name a prefix".into(),
                    )));
                }
                reserved(t, prefix, system).map_err(at)?;
                let want = if system { None } else { t.reserved_prefix };
                if spare.as_deref() != want {
                    return Err(at(invalid(format!(
                        "delete by prefix must spare {want:?}, not {spare:?}"
                    ))));
                }
            }
        }
    }
    if bytes > TXN_BYTES_MAX {
        return Err(invalid(format!(
            "transaction of {bytes} bytes of values: at most {TXN_BYTES_MAX} ({} KiB) are \
             allowed",
            TXN_BYTES_MAX >> 10
        )));
    }
    Ok(())
}

/// The `spare` a delete by prefix of type `rtype` needs: the reserved prefix unless `system`.
pub fn spare_for(rtype: &str, system: bool) -> Option<String> {
    if system {
        return None;
    }
    spec(rtype)
        .ok()
        .and_then(|t| t.reserved_prefix)
        .map(str::to_string)
}

/// Checks a read's type, horde and name or prefix.
pub fn check_query(q: &ResourceQuery) -> Result<(), StoreError> {
    match q {
        ResourceQuery::Get(id) => {
            let t = spec(&id.rtype)?;
            check_horde(&id.horde)?;
            check_text(t, &id.name, false)
        }
        ResourceQuery::List {
            rtype,
            horde,
            prefix,
        } => {
            let t = spec(rtype)?;
            check_horde(horde)?;
            check_text(t, prefix, true)
        }
        ResourceQuery::Every => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::ResourceId;

    fn put(k: &str, len: usize) -> Op {
        Op::Put {
            id: ResourceId::kv("default", k),
            flags: 0,
            spec: vec![b'x'; len],
            if_version: None,
        }
    }

    fn refused(txn: Vec<Op>, system: bool) -> String {
        match check_txn(&Txn::new(txn), system) {
            Err(StoreError::Invalid(m)) => m,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn keys_and_values_within_the_limits_pass() {
        check_txn(&Txn::new(vec![put("a/b.c/d", 512 << 10)]), false).unwrap();
        check_txn(&Txn::new(vec![put(&"k".repeat(512), 0)]), false).unwrap();
        check_txn(&Txn::new(vec![put("crux/intent", 1)]), true).unwrap();
        let ops: Vec<Op> = (0..64).map(|i| put(&format!("k{i}"), 10)).collect();
        check_txn(&Txn::new(ops), false).unwrap();
    }

    #[test]
    fn bad_keys_values_and_transactions_are_refused_with_a_reason() {
        assert!(refused(vec![put("", 1)], false).contains("empty key"));
        assert!(refused(vec![put(&"k".repeat(513), 1)], false).contains("513 bytes"));
        assert!(refused(vec![put("a\0b", 1)], false).contains("NUL"));
        assert!(refused(vec![put("a/../b", 1)], false).contains("'..'"));
        assert!(refused(vec![put("..", 1)], false).contains("'..'"));
        assert!(refused(vec![put("/a", 1)], false).contains("starts with '/'"));
        assert!(refused(vec![put("a", (512 << 10) + 1)], false).contains("at most 524288"));
        assert!(refused(vec![put("crux/intent", 1)], false).contains("reserved"));
        let ops: Vec<Op> = (0..65).map(|i| put(&format!("k{i}"), 1)).collect();
        assert!(refused(ops, false).contains("65 operations"));
        let ops: Vec<Op> = (0..3).map(|i| put(&format!("k{i}"), 200 << 10)).collect();
        assert!(refused(ops, false).contains("bytes of values"));
        assert!(refused(vec![], false).contains("empty transaction"));
        let m = refused(vec![put("ok", 1), put("", 1)], false);
        assert!(m.starts_with("operation 1: "), "{m}");
        let del = |prefix: &str, system| Op::DeletePrefix {
            rtype: "kv".into(),
            horde: "default".into(),
            prefix: prefix.into(),
            spare: spare_for("kv", system),
        };
        assert!(refused(vec![del("", false)], false).contains("empty prefix"));
        assert!(refused(vec![del("crux/", false)], false).contains("reserved"));
        check_txn(&Txn::new(vec![del("c", false)]), false).unwrap();
        check_txn(&Txn::new(vec![del("crux/", true)]), true).unwrap();
        let mut bad_horde = put("a", 1);
        if let Op::Put { id, .. } = &mut bad_horde {
            id.horde = "Bad Horde".into();
        }
        assert!(refused(vec![bad_horde], false).contains("horde"));
        let mut unknown = put("a", 1);
        if let Op::Put { id, .. } = &mut unknown {
            id.rtype = "nope".into();
        }
        assert!(refused(vec![unknown], false).contains("unknown resource type"));
    }
}
