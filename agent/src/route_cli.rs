//! `crux route`: Fuse routes from the command line, over the client library
//! (`crux_reeve::route`). Tables for people, `--json` for scripts.
//!
//! Exit codes: 0 done; 1 another error (no agent, …); 2 bad input (a field the route rules
//! refuse, weights summing to zero, an api the registry does not know: nothing written); 3 no such
//! route (`rm`); 4 the compare-and-swap failed; 5 no quorum (nothing written).

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use crux_proto::grpc::fuse::v1 as pb;
use crux_reeve::client::ClientError;
use crux_reeve::route::Routes;

/// Exit code: bad input.
pub const EXIT_INVALID: i32 = 2;
/// Exit code: no such route.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code: the compare-and-swap failed.
pub const EXIT_CONFLICT: i32 = 4;
/// Exit code: no quorum.
pub const EXIT_NO_QUORUM: i32 = 5;

/// `crux route` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RouteCmd {
    /// Create or replace route NAME (also the xDS target `xds:///NAME`).
    Add {
        /// The route's name.
        name: String,
        /// Path prefix matched (`/pkg.Service/`).
        #[arg(long = "match", value_name = "PREFIX")]
        prefix: Option<String>,
        /// Host (authority) matched.
        #[arg(long, value_name = "H")]
        host: Option<String>,
        /// Target: `API` (every live instance), `API:latest` (the greatest live one) or
        /// `API:INST`; repeat for a split.
        #[arg(long = "to", value_name = "API[:SELECTOR]", required = true)]
        to: Vec<String>,
        /// Weight of each `--to`, in the same order (default 1 each).
        #[arg(long = "weight", value_name = "N")]
        weight: Vec<u32>,
        /// Per-request timeout (`5s`, `250ms`).
        #[arg(long, value_name = "S", value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Retries on unavailable / reset / connect failure.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Only if the route's version is INDEX (0: only if absent).
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
    },
    /// List the routes.
    Ls {
        /// Name prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// This agent's copy (possibly stale).
        #[arg(long)]
        stale: bool,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
    },
    /// Remove route NAME.
    Rm {
        /// The route's name.
        name: String,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
    },
    /// The proxies connected to this agent's ADS server, what they acknowledged or rejected.
    Proxies {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn refused(e: ClientError) -> anyhow::Result<i32> {
    let ClientError::Status(s) = e else {
        return Err(anyhow!("{e}"));
    };
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => EXIT_INVALID,
        tonic::Code::Unavailable => EXIT_NO_QUORUM,
        _ => return Err(crate::client::status_error(s)),
    };
    eprintln!("crux: {}", s.message());
    Ok(code)
}

fn targets(to: &[String], weight: &[u32]) -> Result<Vec<pb::Target>, String> {
    if !weight.is_empty() && weight.len() != to.len() {
        return Err(format!(
            "{} --to and {} --weight: give one weight per target, or none",
            to.len(),
            weight.len()
        ));
    }
    Ok(to
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (api, sel) = t.split_once(':').unwrap_or((t, ""));
            pb::Target {
                api: api.into(),
                selector: sel.into(),
                weight: weight.get(i).copied().unwrap_or(1),
            }
        })
        .collect())
}

fn route_json(r: &pb::Route) -> serde_json::Value {
    serde_json::json!({
        "name": r.name,
        "prefix": r.prefix,
        "host": r.host,
        "to": r.to.iter().map(|t| serde_json::json!({
            "api": t.api, "selector": t.selector, "weight": t.weight,
        })).collect::<Vec<_>>(),
        "timeout_ms": r.timeout_ms,
        "retries": r.retries,
        "version": r.version,
    })
}

/// Runs `crux route …`; returns the exit code.
pub async fn run(socket: &Path, wait: Duration, cmd: &RouteCmd) -> anyhow::Result<i32> {
    let stale = matches!(
        cmd,
        RouteCmd::Ls { stale: true, .. } | RouteCmd::Proxies { .. }
    );
    let needs: &[&str] = if stale { &[] } else { &["store"] };
    crate::client::wait_for_steps(socket, needs, wait).await?;
    let ch = crate::client::channel(socket, Some(crate::client::CALL_TIMEOUT)).await?;
    match cmd {
        RouteCmd::Add {
            name,
            prefix,
            host,
            to,
            weight,
            timeout,
            retries,
            cas,
            horde,
        } => {
            let to = match targets(to, weight) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("crux: {e}");
                    return Ok(EXIT_INVALID);
                }
            };
            let route = pb::Route {
                name: name.clone(),
                prefix: prefix.clone().unwrap_or_default(),
                host: host.clone().unwrap_or_default(),
                to,
                timeout_ms: timeout.map_or(0, |d| d.as_millis() as u64),
                retries: *retries,
                version: 0,
            };
            match Routes::new(ch).horde(horde).add(route, *cas).await {
                Ok(r) if r.written => {
                    println!("route {name} written (version {})", r.index);
                    Ok(0)
                }
                Ok(r) => {
                    eprintln!(
                        "crux: route {name} is at version {}, not {}: nothing written",
                        r.index,
                        cas.unwrap_or_default()
                    );
                    Ok(EXIT_CONFLICT)
                }
                Err(e) => refused(e),
            }
        }
        RouteCmd::Ls {
            prefix,
            json,
            stale,
            horde,
        } => {
            let r = match Routes::new(ch).horde(horde).list(prefix, *stale).await {
                Ok(r) => r,
                Err(e) => return refused(e),
            };
            if *json {
                let all: Vec<_> = r.routes.iter().map(route_json).collect();
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header([
                "NAME", "MATCH", "HOST", "TO", "TIMEOUT", "RETRIES", "VERSION",
            ]);
            for r in &r.routes {
                let to: Vec<String> =
                    r.to.iter()
                        .map(|x| {
                            let api = if x.selector.is_empty() {
                                x.api.clone()
                            } else {
                                format!("{}:{}", x.api, x.selector)
                            };
                            format!("{api}={}", x.weight)
                        })
                        .collect();
                t.add_row([
                    r.name.clone(),
                    r.prefix.clone(),
                    if r.host.is_empty() {
                        "*".into()
                    } else {
                        r.host.clone()
                    },
                    to.join(" "),
                    if r.timeout_ms == 0 {
                        "-".into()
                    } else {
                        format!("{}ms", r.timeout_ms)
                    },
                    r.retries.to_string(),
                    r.version.to_string(),
                ]);
            }
            println!("{t}");
            Ok(0)
        }
        RouteCmd::Rm { name, horde } => match Routes::new(ch).horde(horde).remove(name).await {
            Ok(r) if r.removed => {
                println!("route {name} removed");
                Ok(0)
            }
            Ok(_) => {
                eprintln!("crux: no route {name}");
                Ok(EXIT_NOT_FOUND)
            }
            Err(e) => refused(e),
        },
        RouteCmd::Proxies { json } => {
            let r = match Routes::new(ch).proxies().await {
                Ok(r) => r,
                Err(e) => return refused(e),
            };
            if *json {
                let v = serde_json::json!({
                    "ads_addr": r.ads_addr,
                    "versions": r.versions,
                    "problems": r.problems,
                    "proxies": r.proxies.iter().map(|p| serde_json::json!({
                        "node_id": p.node_id, "peer": p.peer, "delta": p.delta,
                        "types": p.types.iter().map(|t| serde_json::json!({
                            "type": t.type_url, "sent": t.sent, "acked": t.acked,
                            "nacks": t.nacks, "last_error": t.last_error,
                            "subscribed": t.subscribed, "wildcard": t.wildcard,
                            "unacked_ms": t.unacked_ms,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "ADS: {}",
                if r.ads_addr.is_empty() {
                    "not served"
                } else {
                    &r.ads_addr
                }
            );
            for p in &r.problems {
                println!("problem: {p}");
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::NOTHING);
            t.set_header([
                "NODE",
                "PEER",
                "MODE",
                "TYPE",
                "SENT",
                "ACKED",
                "NACKS",
                "LAST ERROR",
            ]);
            for p in &r.proxies {
                for ty in &p.types {
                    t.add_row([
                        p.node_id.clone(),
                        p.peer.clone(),
                        if p.delta {
                            "delta".into()
                        } else {
                            "sotw".to_string()
                        },
                        ty.type_url.clone(),
                        ty.sent.clone(),
                        ty.acked.clone(),
                        ty.nacks.to_string(),
                        ty.last_error.clone(),
                    ]);
                }
            }
            println!("{t}");
            Ok(0)
        }
    }
}
