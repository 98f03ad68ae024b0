//! Galumph, the seed's example service (`Galumph2_3(quit, alive, network)`), as a picket plugin.
//!
//! * [`pb`]: the generated `galumph.v1` gRPC code (`proto/galumph.proto`).
//! * [`Table`]: the service: a bounded table of named values.
//! * [`version_of`]: the version a function name implements (`galumph2_3` is version 2.3).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tonic::{Request, Response, Status};

/// The generated Galumph gRPC code.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("galumph.v1");
}

/// The most entries a table holds.
pub const ENTRIES_MAX: usize = 10_000;
/// The longest name, bytes.
pub const NAME_MAX: usize = 256;
/// The longest value, bytes.
pub const VALUE_MAX: usize = 4096;

/// The version a function name implements, by the seed's convention: `galumph2_3` → `2.3`
/// (`galumph` followed by numbers joined by `_`).
pub fn version_of(function: &str) -> Result<String, String> {
    let rest = function.strip_prefix("galumph").ok_or_else(|| {
        format!("function {function:?} is not galumph<major>[_<minor>...] (e.g. galumph2_3)")
    })?;
    let parts: Vec<&str> = rest.split('_').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "function {function:?} is not galumph<major>[_<minor>...] (e.g. galumph2_3)"
        ));
    }
    Ok(parts.join("."))
}

/// The Galumph service of one instance.
#[derive(Debug)]
pub struct Table {
    inst: String,
    node: String,
    version: String,
    entries: Mutex<BTreeMap<String, String>>,
}

impl Table {
    /// An empty table served as `inst` (version `version`) on `node`.
    pub fn new(inst: &str, node: &str, version: &str) -> Table {
        Table {
            inst: inst.to_string(),
            node: node.to_string(),
            version: version.to_string(),
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl pb::galumph_server::Galumph for Table {
    async fn register(
        &self,
        req: Request<pb::GalumphInstance>,
    ) -> Result<Response<pb::RegisterResp>, Status> {
        let i = req.into_inner();
        if i.name.is_empty() || i.name.len() > NAME_MAX {
            return Err(Status::invalid_argument(format!(
                "name must be 1 to {NAME_MAX} bytes"
            )));
        }
        if i.value.len() > VALUE_MAX {
            return Err(Status::invalid_argument(format!(
                "value must be at most {VALUE_MAX} bytes"
            )));
        }
        let mut e = self.entries();
        if !e.contains_key(&i.name) && e.len() >= ENTRIES_MAX {
            return Err(Status::resource_exhausted(format!(
                "the table is full ({ENTRIES_MAX} entries)"
            )));
        }
        let replaced = e.insert(i.name, i.value).is_some();
        Ok(Response::new(pb::RegisterResp {
            count: e.len() as u32,
            replaced,
        }))
    }

    async fn table(&self, _req: Request<pb::TableReq>) -> Result<Response<pb::TableResp>, Status> {
        let instances = self
            .entries()
            .iter()
            .map(|(name, value)| pb::GalumphInstance {
                name: name.clone(),
                value: value.clone(),
            })
            .collect();
        Ok(Response::new(pb::TableResp {
            instances,
            inst: self.inst.clone(),
            node: self.node.clone(),
            version: self.version.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::pb::galumph_server::Galumph;
    use super::*;

    #[test]
    fn function_names_give_versions() {
        assert_eq!(version_of("galumph2_3").unwrap(), "2.3");
        assert_eq!(version_of("galumph2").unwrap(), "2");
        assert_eq!(version_of("galumph10_0_1").unwrap(), "10.0.1");
        for bad in [
            "galumph",
            "galumph2_",
            "galumph_3",
            "ntp2_3",
            "galumph2x",
            "crash",
        ] {
            let e = version_of(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[tokio::test]
    async fn the_table_keeps_entries_by_name_and_refuses_bad_ones() {
        let t = Table::new("galumph2_3", "127.0.0.1", "2.3");
        let reg = |n: &str, v: &str| {
            Request::new(pb::GalumphInstance {
                name: n.into(),
                value: v.into(),
            })
        };
        let r = t.register(reg("a", "1")).await.unwrap().into_inner();
        assert_eq!((r.count, r.replaced), (1, false));
        let r = t.register(reg("a", "2")).await.unwrap().into_inner();
        assert_eq!((r.count, r.replaced), (1, true));
        t.register(reg("b", "3")).await.unwrap();
        let e = t.register(reg("", "x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let big = "x".repeat(VALUE_MAX + 1);
        assert!(t.register(reg("c", &big)).await.is_err());
        let tab = t
            .table(Request::new(pb::TableReq {}))
            .await
            .unwrap()
            .into_inner();
        let got: Vec<(String, String)> = tab
            .instances
            .into_iter()
            .map(|i| (i.name, i.value))
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), "2".into()), ("b".into(), "3".into())]
        );
        assert_eq!(
            (tab.inst.as_str(), tab.version.as_str()),
            ("galumph2_3", "2.3")
        );
    }
}
