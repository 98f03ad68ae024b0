//! Catalyst on the agent: its config table (`[catalyst]`) and its bootstrap step. The service
//! itself is the `crux-catalyst` crate; the local socket serves it from step reeve on
//! (answering "not started yet" until this step ran), `crux topic` is [`crate::topic_cli`].

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::bootstrap::Boot;
use crate::config::ConfigError;

/// Catalyst (`[catalyst]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalystSection {
    /// Where topics live: `standalone` (this agent keeps them in `<data_dir>/catalyst`) or a
    /// NATS server with JetStream, `nats://host:port`, that every topic call is passed to.
    pub backend: String,
}

impl Default for CatalystSection {
    fn default() -> Self {
        CatalystSection {
            backend: "standalone".into(),
        }
    }
}

impl CatalystSection {
    /// The backend, checked.
    pub fn check(&self, data_dir: &Path) -> Result<crux_catalyst::Backend, ConfigError> {
        let b = self.backend.trim();
        if b.is_empty() || b == "standalone" {
            return Ok(crux_catalyst::Backend::Standalone(
                data_dir.join("catalyst"),
            ));
        }
        let Some(rest) = b.strip_prefix("nats://") else {
            return Err(ConfigError::new(
                "catalyst.backend",
                format!("{b:?}: expected \"standalone\" or \"nats://host:port\""),
            ));
        };
        if rest.is_empty() || rest.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "catalyst.backend",
                format!("{b:?}: no host in the NATS URL"),
            ));
        }
        Ok(crux_catalyst::Backend::Nats(b.to_string()))
    }
}

/// Step catalyst: opens the topics (or the NATS client) and hands the bus to the local API.
/// Serves once the topics are open (standalone) or NATS is connected.
pub async fn step(b: &mut Boot, step: &'static str) -> anyhow::Result<Option<String>> {
    let stop = b.tasks.token(step);
    let backend = b.settings.catalyst.clone();
    let (service, bus) = crux_catalyst::start(crux_catalyst::Catalyst {
        backend: backend.clone(),
        every: Duration::from_secs(1),
        stop,
    })
    .await
    .with_context(|| format!("starting catalyst ({backend:?})"))?;
    let detail = match &bus {
        crux_catalyst::Bus::Standalone(_) => service.ready().get().detail,
        crux_catalyst::Bus::Nats(n) => format!("passing topics through to NATS at {}", n.url()),
    };
    b.catalyst.send_replace(Some(bus));
    b.adopt(step, service);
    Ok(Some(detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crux_catalyst::Backend;

    fn check(backend: &str) -> Result<Backend, String> {
        CatalystSection {
            backend: backend.into(),
        }
        .check(Path::new("/d"))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_backend_is_standalone_in_the_data_dir_or_a_nats_url() {
        let standalone = Backend::Standalone("/d/catalyst".into());
        assert_eq!(check("standalone"), Ok(standalone.clone()));
        assert_eq!(check(""), Ok(standalone));
        assert_eq!(
            check("nats://10.0.0.1:4222"),
            Ok(Backend::Nats("nats://10.0.0.1:4222".into()))
        );
        let e = check("kafka://k:9092").unwrap_err();
        assert!(
            e.contains("catalyst.backend") && e.contains("nats://host:port"),
            "{e}"
        );
        let e = check("nats://").unwrap_err();
        assert!(e.contains("no host"), "{e}");
    }
}
