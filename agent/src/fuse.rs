//! Fuse on this node (README "Routes (xDS)"): the `[fuse]` config table and bootstrap step
//! fuse, which starts `crux_fuse` over the store's routes and this node's registry replica and
//! serves ADS on `fuse.ads_bind`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::error;

use crate::bootstrap::Boot;
use crate::config::ConfigError;

/// Routes served to proxies as xDS (`[fuse]` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuseSection {
    /// Serve ADS.
    pub enabled: bool,
    /// The ADS gRPC address, `ip:port` (loopback by default: the proxies of this node).
    pub ads_bind: String,
    /// The horde whose routes this node serves.
    pub horde: String,
    /// A response not acknowledged after this long is logged (the proxy is silent).
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
}

impl Default for FuseSection {
    fn default() -> Self {
        FuseSection {
            enabled: true,
            ads_bind: crux_fuse::DEFAULT_ADS_BIND.into(),
            horde: crux_fuse::api::DEFAULT_HORDE.into(),
            ack_timeout: crux_fuse::ads::ACK_TIMEOUT_DEFAULT,
        }
    }
}

/// Checked `[fuse]` settings.
#[derive(Clone, Debug)]
pub struct FuseSettings {
    /// Where ADS binds (None: not served).
    pub ads_bind: Option<SocketAddr>,
    /// The horde served.
    pub horde: String,
    /// See [`FuseSection::ack_timeout`].
    pub ack_timeout: Duration,
}

impl FuseSection {
    /// The settings, or the field at fault.
    pub fn check(&self) -> Result<FuseSettings, ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            field: field.into(),
            reason,
            at: None,
        };
        let ads_bind = if self.enabled {
            Some(self.ads_bind.parse::<SocketAddr>().map_err(|e| {
                err(
                    "fuse.ads_bind",
                    format!("{:?} is not ip:port ({e})", self.ads_bind),
                )
            })?)
        } else {
            None
        };
        crux_store::resource::registry::check_horde(&self.horde)
            .map_err(|e| err("fuse.horde", e.to_string()))?;
        if self.ack_timeout < Duration::from_secs(1) {
            return Err(err("fuse.ack_timeout", "must be at least 1s".into()));
        }
        Ok(FuseSettings {
            ads_bind,
            horde: self.horde.clone(),
            ack_timeout: self.ack_timeout,
        })
    }
}

/// Bootstrap step fuse. A bind failure does not stop the agent: it is logged as an error and
/// the routes are kept without ADS on this node.
pub async fn step(b: &mut Boot) -> anyhow::Result<Option<String>> {
    let s = b.settings.fuse.clone();
    let listener = match s.ads_bind {
        Some(a) => match tokio::net::TcpListener::bind(a).await {
            Ok(l) => Some(l),
            Err(e) => {
                error!(addr = %a, error = %e, "fuse: ADS not served (set fuse.ads_bind, or fuse.enabled = false)");
                None
            }
        },
        None => None,
    };
    let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    let stop = b.token("fuse");
    let service = crux_fuse::start(crux_fuse::Context {
        store: b.state.store.clone(),
        reeve: b.state.reeve.clone(),
        horde: s.horde.clone(),
        listener,
        ads: crux_fuse::AdsConfig {
            ack_timeout: s.ack_timeout,
        },
        board: b.state.fuse.clone(),
        stop,
    });
    b.adopt("fuse", service);
    Ok(Some(match addr {
        Some(a) => format!("routes of horde {} served as xDS (ADS) on {a}", s.horde),
        None => "routes kept; ADS not served on this node".into(),
    }))
}
