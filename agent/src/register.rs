//! `crux register ... -- COMMAND [ARGS...]`: runs COMMAND and keeps it in the registry while it
//! runs and its check passes, so that programs which do not speak the API can join it.
//!
//! * The instance is registered `starting`; it turns `running`/`healthy` once the command runs
//!   and its check (if any) passes, `unhealthy` while the check fails.
//! * SIGTERM and SIGINT are passed to the command. When it exits, the instance is reported
//!   `stopping`, deregistered, and `crux register` exits with the command's status (128 + the
//!   signal number when a signal ended it).
//! * If the agent is not reachable, the command still runs and registration is retried.

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use crux_proto::grpc::reeve::v1 as pb;
use crux_proto::grpc::steward::v1::{Health, RunState};
use crux_reeve::client::Registration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tracing::warn;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// `crux register` arguments.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    socket: crate::client::SocketArg,
    /// The API the command serves.
    #[arg(long)]
    api: String,
    /// Its instance name.
    #[arg(long)]
    inst: String,
    /// Where it is reached, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Horde (default: `default`).
    #[arg(long, default_value = "")]
    horde: String,
    /// Healthy while a TCP connection to --addr succeeds.
    #[arg(long, group = "check")]
    check_tcp: bool,
    /// Healthy while a GET of this http:// URL answers 2xx.
    #[arg(long, group = "check", value_name = "URL")]
    check_http: Option<String>,
    /// Healthy while this shell command exits 0.
    #[arg(long, group = "check", value_name = "CMD")]
    check_cmd: Option<String>,
    /// How often the check runs (default: the agent's heartbeat interval).
    #[arg(long, value_parser = humantime::parse_duration)]
    check_interval: Option<Duration>,
    /// Metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

#[derive(Debug, Clone)]
enum Check {
    None,
    Tcp(String),
    Http { host: String, path: String },
    Cmd(String),
}

fn parse_http(url: &str) -> anyhow::Result<Check> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--check-http {url:?}: only http:// URLs are checked"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        bail!("--check-http {url:?}: no host");
    }
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    Ok(Check::Http {
        host,
        path: path.to_string(),
    })
}

impl Check {
    fn of(a: &RegisterArgs) -> anyhow::Result<Check> {
        Ok(if a.check_tcp {
            Check::Tcp(a.addr.clone())
        } else if let Some(u) = &a.check_http {
            parse_http(u)?
        } else if let Some(c) = &a.check_cmd {
            Check::Cmd(c.clone())
        } else {
            Check::None
        })
    }

    /// Whether the check passes now.
    async fn passes(&self) -> bool {
        let run = async {
            match self {
                Check::None => true,
                Check::Tcp(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
                Check::Http { host, path } => http_ok(host, path).await.unwrap_or(false),
                Check::Cmd(cmd) => Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map(|s| s.success())
                    .unwrap_or(false),
            }
        };
        tokio::time::timeout(CHECK_TIMEOUT, run)
            .await
            .unwrap_or(false)
    }
}

/// A GET answered with a 2xx status.
async fn http_ok(host: &str, path: &str) -> std::io::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: crux-register\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let k = s.read(&mut head[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let line = String::from_utf8_lossy(&head[..n]);
    // "HTTP/1.x 2yy ..."
    Ok(line.starts_with("HTTP/1.") && line.get(9..10) == Some("2"))
}

/// Runs `crux register`; returns the exit code.
pub fn main(args: &RegisterArgs) -> anyhow::Result<i32> {
    let check = Check::of(args)?;
    let mut metadata = std::collections::HashMap::new();
    for kv in &args.meta {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--meta {kv:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_string(), v.to_string());
    }
    for (what, name) in [("--api", &args.api), ("--inst", &args.inst)] {
        crux_steward::select::check_name(what, name).map_err(|e| anyhow!("{e}"))?;
    }
    if !args.horde.is_empty() {
        crux_steward::select::check_name("--horde", &args.horde).map_err(|e| anyhow!("{e}"))?;
    }
    let req = pb::RegisterRequest {
        api: args.api.clone(),
        inst: args.inst.clone(),
        addr: args.addr.clone(),
        horde: args.horde.clone(),
        metadata,
        public_key: Vec::new(),
        state: RunState::Starting as i32,
        health: Health::Healthy as i32,
        valid_for_ms: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(run(args, req, check))
}

async fn run(args: &RegisterArgs, req: pb::RegisterRequest, check: Check) -> anyhow::Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut child = Command::new(&args.command[0])
        .args(&args.command[1..])
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", args.command[0]))?;
    let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let socket = args.socket.socket.clone();

    let mut reg: Option<Registration> = None;
    let mut interval = args.check_interval.unwrap_or(Duration::from_secs(1));
    let mut tick = tokio::time::interval(interval);
    let mut retry_note = true;
    let status: ExitStatus = loop {
        tokio::select! {
            s = child.wait() => break s.context("waiting for the command")?,
            _ = term.recv() => forward(pid, nix::sys::signal::Signal::SIGTERM),
            _ = int.recv() => forward(pid, nix::sys::signal::Signal::SIGINT),
            _ = tick.tick() => {
                if reg.is_none() {
                    match Registration::start(socket.clone(), req.clone()).await {
                        Ok(r) => {
                            if args.check_interval.is_none() {
                                // Check at the agent's heartbeat interval.
                                let hb = r.heartbeat_interval();
                                if hb != interval {
                                    interval = hb;
                                    tick = tokio::time::interval(interval);
                                    tick.tick().await;
                                }
                            }
                            reg = Some(r);
                        }
                        Err(e) => {
                            if retry_note {
                                warn_agent(&socket, &e.to_string());
                                retry_note = false;
                            }
                            continue;
                        }
                    }
                }
                if let Some(r) = &reg {
                    let health = if check.passes().await { Health::Healthy } else { Health::Unhealthy };
                    r.report(RunState::Running, health);
                }
            }
        }
    };
    if let Some(r) = reg {
        r.report(RunState::Stopping, Health::Healthy);
        if let Err(e) = r.deregister().await {
            warn!(error = %e, "deregistering failed; the registry drops the instance when its validity runs out");
        }
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    })
}

fn forward(pid: Option<nix::unistd::Pid>, sig: nix::sys::signal::Signal) {
    if let Some(p) = pid {
        let _ = nix::sys::signal::kill(p, sig);
    }
}

fn warn_agent(socket: &Path, why: &str) {
    eprintln!(
        "crux register: cannot register with the agent at {} ({why}); the command runs and \
         registration is retried",
        socket.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_check_urls_are_parsed() {
        match parse_http("http://127.0.0.1:8080/health").unwrap() {
            Check::Http { host, path } => {
                assert_eq!(host, "127.0.0.1:8080");
                assert_eq!(path, "/health");
            }
            other => panic!("{other:?}"),
        }
        match parse_http("http://localhost").unwrap() {
            Check::Http { host, path } => {
                assert_eq!((host.as_str(), path.as_str()), ("localhost:80", "/"))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_http("https://x").is_err());
    }
}
