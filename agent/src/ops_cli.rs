//! The CLI's side of operating a running agent: `crux monitor`, `crux log-level`, `crux reload`
//! and `crux debug` (README "Operating a running agent").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use crux_proto::grpc::reeve::v1 as pb;
use pb::reeve_client::ReeveClient;

use crate::client::{channel, connect, status_error};
use crate::logs::{format_line, line_json};

/// Most bytes of log lines a debug bundle keeps; past it lines are counted, not kept.
pub const BUNDLE_LOG_BYTES_MAX: usize = 64 << 20;

/// `crux monitor`: the agent's log lines from now on, until interrupted or the agent stops.
pub async fn monitor(socket: &Path, level: &str, json: bool) -> anyhow::Result<i32> {
    crate::logs::parse_level(level).map_err(anyhow::Error::msg)?;
    let mut c = ReeveClient::new(channel(socket, None).await?);
    let mut lines = c
        .monitor(pb::MonitorRequest {
            level: level.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            next = lines.message() => match next.map_err(status_error)? {
                Some(l) => {
                    let mut out = stdout.lock();
                    let written = if json {
                        writeln!(out, "{}", line_json(&l))
                    } else {
                        writeln!(out, "{}", format_line(&l))
                    };
                    // A closed pipe (`crux monitor | head`) ends the watch quietly.
                    if written.and_then(|()| out.flush()).is_err() {
                        return Ok(0);
                    }
                }
                None => bail!("the agent closed the log stream (it is stopping)"),
            },
        }
    }
}

/// `crux log-level FILTER [--for D]`.
pub async fn log_level(socket: &Path, filter: &str, for_: Option<Duration>) -> anyhow::Result<i32> {
    crate::logs::check_filter(filter).map_err(anyhow::Error::msg)?;
    let mut c = connect(socket).await?;
    let r = c
        .set_log_level(pb::SetLogLevelRequest {
            filter: filter.to_string(),
            revert_after_ms: for_.map(|d| d.as_millis() as u64).unwrap_or(0),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!("log filter: {} (was {})", r.filter, r.previous);
    if let Some(d) = for_ {
        println!(
            "reverts to {} in {}",
            r.previous,
            humantime::format_duration(d)
        );
    }
    Ok(0)
}

/// `crux reload`: exit 0 when every change was applied, 1 when a field was refused or the
/// config has an error (nothing changed then).
pub async fn reload(socket: &Path) -> anyhow::Result<i32> {
    let mut c = connect(socket).await?;
    let r = match c.reload(pb::ReloadRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            eprintln!("crux reload: {}", s.message());
            eprintln!("nothing was changed");
            return Ok(1);
        }
        Err(s) => return Err(status_error(s)),
    };
    let from = if r.path.is_empty() {
        "flags and environment".to_string()
    } else {
        r.path.clone()
    };
    if r.applied.is_empty() {
        println!("reloaded {from}: nothing to change");
    } else {
        println!("reloaded {from}: applied {}", r.applied.join(", "));
    }
    for line in &r.refused {
        eprintln!("refused: {line}");
    }
    Ok(if r.refused.is_empty() { 0 } else { 1 })
}

/// `crux debug`: a tar.gz of what a bug report needs from one agent.
#[derive(Debug, Clone, clap::Args)]
pub struct DebugArgs {
    /// How long to record the agent's debug-level log (and the wait between the two metrics
    /// snapshots).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The bundle to write (a .tar.gz).
    #[arg(short = 'o', long = "output", default_value = "crux-debug.tar.gz")]
    pub output: PathBuf,
}

/// The files of a bundle and what each holds (written as `index.txt`, the bundle's first file).
const BUNDLE_FILES: [(&str, &str); 11] = [
    ("index.txt", "this list"),
    (
        "version.txt",
        "the agent's version and build; the CLI's version",
    ),
    ("status.json", "`crux status --json` at the start"),
    ("members.json", "`crux members --json` at the start"),
    ("leader.json", "`crux leader --json` at the start"),
    (
        "store-status.json",
        "`crux store status --json` at the start",
    ),
    (
        "config.toml",
        "the config in force, secrets and the keyring location redacted",
    ),
    ("metrics-start.prom", "the metrics at the start"),
    ("metrics-end.prom", "the metrics at the end"),
    (
        "agent.log",
        "the agent's log at debug level for the duration",
    ),
    ("errors.txt", "what could not be collected, and why"),
];

/// Runs `crux <args> --json` against `socket` (the same binary), its output or its error.
async fn cli_json(socket: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the crux binary: {e}"))?;
    let out = tokio::process::Command::new(exe)
        .args(args)
        .arg("--json")
        .arg("--socket")
        .arg(socket)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running crux {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "crux {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `crux debug`.
pub async fn debug(socket: &Path, args: &DebugArgs) -> anyhow::Result<i32> {
    let mut c = connect(socket).await?;
    let mut errors = Vec::new();
    // The log first, so that the duration starts at once.
    let mut log_client = ReeveClient::new(channel(socket, None).await?);
    let mut lines = log_client
        .monitor(pb::MonitorRequest {
            level: "debug".into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut files: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let info = c
        .debug_info(pb::DebugInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let version = format!(
        "agent:\n{}config file: {}\n\ncli:\n{}",
        info.build,
        if info.config_path.is_empty() {
            "(none)"
        } else {
            &info.config_path
        },
        crate::ops::build_info()
    );
    files.push(("version.txt", version.into_bytes()));
    for (name, cmd) in [
        ("status.json", &["status"][..]),
        ("members.json", &["members"][..]),
        ("leader.json", &["leader"][..]),
        ("store-status.json", &["store", "status"][..]),
    ] {
        match cli_json(socket, cmd).await {
            Ok(out) => files.push((name, out)),
            Err(e) => {
                errors.push(format!("{name}: {e}"));
                files.push((name, format!("{{\"error\": {:?}}}\n", e).into_bytes()));
            }
        }
    }
    files.push(("config.toml", info.config.into_bytes()));
    files.push(("metrics-start.prom", info.metrics.into_bytes()));
    eprintln!(
        "recording the agent's debug log for {} (Ctrl-C ends early)…",
        humantime::format_duration(args.duration)
    );
    let mut log = Vec::new();
    let mut left_out = 0u64;
    let until = tokio::time::sleep(args.duration);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => break,
            _ = tokio::signal::ctrl_c() => {
                errors.push("interrupted: the log is shorter than asked".into());
                break;
            }
            next = lines.message() => match next {
                Ok(Some(l)) => {
                    let line = format_line(&l);
                    if log.len() + line.len() < BUNDLE_LOG_BYTES_MAX {
                        log.extend_from_slice(line.as_bytes());
                        log.push(b'\n');
                    } else {
                        left_out += 1;
                    }
                }
                Ok(None) => {
                    errors.push("agent.log: the agent closed the log stream".into());
                    break;
                }
                Err(e) => {
                    errors.push(format!("agent.log: {}", status_error(e)));
                    break;
                }
            },
        }
    }
    drop(lines);
    if left_out > 0 {
        errors.push(format!(
            "agent.log: {left_out} lines left out past {BUNDLE_LOG_BYTES_MAX} bytes"
        ));
    }
    files.push(("agent.log", log));
    match c.debug_info(pb::DebugInfoRequest {}).await {
        Ok(end) => files.push(("metrics-end.prom", end.into_inner().metrics.into_bytes())),
        Err(e) => errors.push(format!("metrics-end.prom: {}", status_error(e))),
    }
    let mut errors_txt = errors.join("\n");
    if !errors_txt.is_empty() {
        errors_txt.push('\n');
    }
    files.push(("errors.txt", errors_txt.into_bytes()));
    let index: String = BUNDLE_FILES
        .iter()
        .map(|(name, what)| format!("{name}: {what}\n"))
        .collect();
    files.insert(0, ("index.txt", index.into_bytes()));
    write_bundle(&args.output, &files)?;
    let bytes = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {} ({} files, {bytes} bytes)",
        args.output.display(),
        files.len()
    );
    for e in &errors {
        eprintln!("note: {e}");
    }
    Ok(0)
}

/// Writes `files` as a gzip'd tar under `crux-debug/`, through a temporary file renamed into
/// place (a failed write leaves no half bundle).
fn write_bundle(out: &Path, files: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let gz = flate2::write::GzEncoder::new(tmp.as_file(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = unix_s();
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h.set_cksum();
        tar.append_data(&mut h, format!("crux-debug/{name}"), data.as_slice())
            .with_context(|| format!("writing {name} into {}", out.display()))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .with_context(|| format!("writing {}", out.display()))?;
    tmp.persist(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Wall-clock seconds since the Unix epoch (the bundle's file times).
#[allow(clippy::disallowed_methods)]
fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
