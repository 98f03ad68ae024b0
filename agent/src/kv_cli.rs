//! `crux kv`: Blueprint K/V from the command line, over the client library
//! (`crux_reeve::kv`). Values to stdout as they are, tables for people, `--json` for scripts.
//!
//! Exit codes: 0 done; 1 another error (no agent, …); 2 bad input (a key, value or transaction
//! the limits refuse, a malformed file); 3 no such key (`get`); 4 a compare-and-swap or
//! transaction check failed, nothing written; 5 no quorum (the store refused: nothing written);
//! 6 the write was sent but its answer was lost (it may or may not have been applied: read back).

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use base64::Engine;
use crux_proto::grpc::kv::v1 as pb;
use crux_reeve::client::ClientError;
use crux_reeve::kv::{Kv, WriteOptions};
use serde::{Deserialize, Serialize};

/// Exit code: bad input.
pub const EXIT_INVALID: i32 = 2;
/// Exit code: no such key.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code: a compare-and-swap or check failed.
pub const EXIT_CONFLICT: i32 = 4;
/// Exit code: no quorum.
pub const EXIT_NO_QUORUM: i32 = 5;
/// Exit code: the outcome of a write is unknown.
pub const EXIT_UNCONFIRMED: i32 = 6;

/// `crux kv` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KvCmd {
    /// Write KEY: VALUE as given, `@FILE` for a file's bytes, `-` for stdin.
    Put {
        /// The key.
        key: String,
        /// The value, `@FILE` or `-`.
        value: String,
        /// Only if the key's modify index is INDEX (0: only if absent).
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
        /// Flags stored with the value.
        #[arg(long, default_value_t = 0)]
        flags: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Print KEY's value (exit 3 when absent).
    Get {
        /// The key.
        key: String,
        /// Print the entry with its metadata as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// List the keys under PREFIX.
    Ls {
        /// The prefix (empty: every key of the horde).
        #[arg(default_value = "")]
        prefix: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Delete KEY, or every key under `--prefix P`.
    Rm {
        /// The key.
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Delete every key under this prefix instead.
        #[arg(long)]
        prefix: Option<String>,
        /// Only if the key's modify index is INDEX.
        #[arg(long, value_name = "INDEX", conflicts_with = "prefix")]
        cas: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
    /// Print KEY (or the keys under `--prefix P`), then every change as it comes; reconnects
    /// from the last index seen if the agent goes away.
    Watch {
        /// The key.
        #[arg(required_unless_present = "prefix", conflicts_with = "prefix")]
        key: Option<String>,
        /// Watch every key under this prefix instead.
        #[arg(long)]
        prefix: Option<String>,
        /// Start after this index (0: with a listing).
        #[arg(long, default_value_t = 0)]
        from_index: u64,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
    },
    /// Apply up to 64 operations atomically, from a JSON file (or `-`, stdin): a list of
    /// `{"op": "check"|"put"|"delete"|"delete_prefix", "key": K, "value": TEXT | "value_base64":
    /// B64, "flags": F, "index": I (check), "cas": I (put, delete)}`.
    Txn {
        /// The file (`-`: stdin).
        #[arg(default_value = "-")]
        file: String,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
}

/// Arguments of every write.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Horde (default: `default`).
    #[arg(long, default_value = "")]
    horde: String,
    /// Allow keys under `crux/` (reserved for the system).
    #[arg(long)]
    system: bool,
}

/// Arguments of every read.
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// Read this agent's copy at once (possibly stale) instead of a linearizable read.
    #[arg(long)]
    stale: bool,
    /// Horde (default: `default`).
    #[arg(long, default_value = "")]
    horde: String,
}

/// A refusal as a message and an exit code.
fn refused(e: ClientError) -> anyhow::Result<i32> {
    let ClientError::Status(s) = e else {
        return Err(anyhow!("{e}"));
    };
    let code = match s.code() {
        tonic::Code::InvalidArgument => EXIT_INVALID,
        tonic::Code::Unavailable => EXIT_NO_QUORUM,
        tonic::Code::DeadlineExceeded => EXIT_UNCONFIRMED,
        _ => return Err(crate::client::status_error(s)),
    };
    eprintln!("crux: {}", s.message());
    Ok(code)
}

fn read_value(v: &str) -> anyhow::Result<Vec<u8>> {
    if v == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the value from stdin")?;
        Ok(buf)
    } else if let Some(path) = v.strip_prefix('@') {
        std::fs::read(path).with_context(|| format!("reading the value from {path}"))
    } else {
        Ok(v.as_bytes().to_vec())
    }
}

/// An entry as `--json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryJson {
    /// The key.
    pub key: String,
    /// The value, when it is UTF-8.
    pub value: Option<String>,
    /// The value, base64.
    pub value_base64: String,
    /// Flags.
    pub flags: u64,
    /// The log index that created it.
    pub create_index: u64,
    /// The log index that last wrote it.
    pub modify_index: u64,
}

fn entry_json(e: &pb::Entry) -> EntryJson {
    EntryJson {
        key: e.key.clone(),
        value: String::from_utf8(e.value.clone()).ok(),
        value_base64: base64::engine::general_purpose::STANDARD.encode(&e.value),
        flags: e.flags,
        create_index: e.create_index,
        modify_index: e.modify_index,
    }
}

fn preview(v: &[u8]) -> String {
    match std::str::from_utf8(v).map(|s| s.strip_suffix('\n').unwrap_or(s)) {
        Ok(s) if !s.chars().any(|c| c.is_control() && c != ' ') => {
            let mut p: String = s.chars().take(40).collect();
            if p.len() < s.len() {
                p.push('…');
            }
            p
        }
        _ => format!("({} bytes)", v.len()),
    }
}

/// One operation of a `crux kv txn` file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnOpJson {
    op: String,
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    value_base64: Option<String>,
    #[serde(default)]
    flags: u64,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    cas: Option<u64>,
}

fn txn_ops(text: &str) -> anyhow::Result<Vec<pb::TxnOp>> {
    let ops: Vec<TxnOpJson> = serde_json::from_str(text)
        .context("the transaction is not a JSON list of {\"op\", \"key\", ...} objects")?;
    ops.into_iter()
        .enumerate()
        .map(|(n, o)| {
            use pb::txn_op::Kind;
            let value = match (&o.value, &o.value_base64) {
                (Some(_), Some(_)) => {
                    return Err(anyhow!(
                        "operation {n}: give value or value_base64, not both"
                    ))
                }
                (Some(v), None) => v.as_bytes().to_vec(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| anyhow!("operation {n}: value_base64: {e}"))?,
                (None, None) => Vec::new(),
            };
            let kind = match o.op.as_str() {
                "check" => Kind::Check,
                "put" => Kind::Put,
                "delete" => Kind::Delete,
                "delete_prefix" => Kind::DeletePrefix,
                other => {
                    return Err(anyhow!(
                        "operation {n}: op {other:?} is not check, put, delete or delete_prefix"
                    ))
                }
            };
            if kind == Kind::Check && o.index.is_none() {
                return Err(anyhow!("operation {n}: a check needs \"index\""));
            }
            if kind != Kind::Check && o.index.is_some() {
                return Err(anyhow!(
                    "operation {n}: \"index\" is for checks; a {} takes \"cas\"",
                    o.op
                ));
            }
            if kind != Kind::Put && (o.value.is_some() || o.value_base64.is_some()) {
                return Err(anyhow!("operation {n}: only a put takes a value"));
            }
            Ok(pb::TxnOp {
                kind: kind as i32,
                key: o.key,
                value,
                flags: o.flags,
                index: o.index.or(o.cas).unwrap_or(0),
                cas: o.cas.is_some(),
            })
        })
        .collect()
}

/// Runs `crux kv …` once the store serves (waiting up to `wait`; a `--stale` read only for the
/// agent to answer); the exit code.
pub async fn run(socket: &Path, wait: Duration, cmd: &KvCmd) -> anyhow::Result<i32> {
    // Read local input before connecting: a bad file is bad input whatever the agent.
    let txn = match cmd {
        KvCmd::Txn { file, .. } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the transaction from stdin")?;
                s
            } else {
                std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?
            };
            match txn_ops(&text) {
                Ok(ops) => Some(ops),
                Err(e) => {
                    eprintln!("crux: {e:#}");
                    return Ok(EXIT_INVALID);
                }
            }
        }
        _ => None,
    };
    let stale = matches!(cmd, KvCmd::Get { read, .. } | KvCmd::Ls { read, .. } if read.stale);
    let needs: &[&str] = if stale { &[] } else { &["store"] };
    crate::client::wait_for_steps(socket, needs, wait).await?;
    // A watch may rightly wait long for its first answer; other calls are bounded.
    let timeout = match cmd {
        KvCmd::Watch { .. } => None,
        _ => Some(crate::client::CALL_TIMEOUT),
    };
    let kv = Kv::new(crate::client::channel(socket, timeout).await?, socket);
    match cmd {
        KvCmd::Put {
            key,
            value,
            cas,
            flags,
            common,
        } => {
            let value = read_value(value)?;
            let opts = WriteOptions {
                cas: *cas,
                flags: *flags,
                system: common.system,
            };
            match kv.horde(&common.horde).put(key, value, &opts).await {
                Err(e) => refused(e),
                Ok(r) if r.written => {
                    println!("put {key} at index {}", r.index);
                    Ok(0)
                }
                Ok(r) => {
                    eprintln!(
                        "crux: not written: {key} is at index {} ({}), not {}",
                        r.index,
                        if r.index == 0 { "absent" } else { "present" },
                        cas.unwrap_or(0)
                    );
                    Ok(EXIT_CONFLICT)
                }
            }
        }
        KvCmd::Get { key, json, read } => {
            let r = match kv.horde(&read.horde).get(key, read.stale).await {
                Ok(r) => r,
                Err(e) => return refused(e),
            };
            let Some(e) = r.entry.filter(|_| r.found) else {
                eprintln!("crux: no key {key:?}");
                return Ok(EXIT_NOT_FOUND);
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&entry_json(&e))?);
            } else {
                let mut out = std::io::stdout().lock();
                out.write_all(&e.value)?;
                if out.is_terminal() && !e.value.ends_with(b"\n") {
                    out.write_all(b"\n")?;
                }
                out.flush()?;
            }
            Ok(0)
        }
        KvCmd::Ls { prefix, json, read } => {
            let r = match kv.horde(&read.horde).list(prefix, read.stale).await {
                Ok(r) => r,
                Err(e) => return refused(e),
            };
            if *json {
                let v: Vec<EntryJson> = r.entries.iter().map(entry_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            let mut t = crate::client::table(&["KEY", "FLAGS", "CREATE", "MODIFY", "VALUE"]);
            for e in &r.entries {
                t.add_row(vec![
                    e.key.clone(),
                    e.flags.to_string(),
                    e.create_index.to_string(),
                    e.modify_index.to_string(),
                    preview(&e.value),
                ]);
            }
            println!("{t}");
            println!("{} keys, index {}", r.entries.len(), r.index);
            Ok(0)
        }
        KvCmd::Rm {
            key,
            prefix,
            cas,
            common,
        } => {
            let mut kv = kv.horde(&common.horde);
            let r = match (key, prefix) {
                (_, Some(p)) => kv.delete_prefix(p, common.system).await,
                (Some(k), None) => {
                    let opts = WriteOptions {
                        cas: *cas,
                        flags: 0,
                        system: common.system,
                    };
                    kv.delete(k, &opts).await
                }
                (None, None) => return Err(anyhow!("give a KEY or --prefix P")),
            };
            match r {
                Err(e) => refused(e),
                Ok(r) if r.done => {
                    match prefix {
                        Some(p) => println!(
                            "deleted {} keys under {p:?} at index {}",
                            r.deleted, r.index
                        ),
                        None if r.deleted == 0 => {
                            println!("{:?} did not exist", key.as_deref().unwrap_or_default())
                        }
                        None => println!(
                            "deleted {} at index {}",
                            key.as_deref().unwrap_or_default(),
                            r.index
                        ),
                    }
                    Ok(0)
                }
                Ok(r) => {
                    eprintln!(
                        "crux: not deleted: {} is at index {}, not {}",
                        key.as_deref().unwrap_or_default(),
                        r.index,
                        cas.unwrap_or(0)
                    );
                    Ok(EXIT_CONFLICT)
                }
            }
        }
        KvCmd::Watch {
            key,
            prefix,
            from_index,
            json,
            horde,
        } => {
            let (name, is_prefix) = match (key, prefix) {
                (_, Some(p)) => (p.as_str(), true),
                (Some(k), None) => (k.as_str(), false),
                (None, None) => return Err(anyhow!("give a KEY or --prefix P")),
            };
            let mut rx = match kv.horde(horde).watch(name, is_prefix, *from_index).await {
                Ok(rx) => rx,
                Err(e) => return refused(e),
            };
            while let Some(item) = rx.recv().await {
                match item {
                    Err(e) => eprintln!("crux: watch interrupted ({e}); resuming"),
                    Ok(e) => print_event(&e, *json)?,
                }
            }
            Ok(0)
        }
        KvCmd::Txn { json, common, .. } => {
            let ops = txn.unwrap_or_default();
            let n = ops.len();
            let r = match kv.horde(&common.horde).txn(ops, common.system).await {
                Ok(r) => r,
                Err(e) => return refused(e),
            };
            if *json {
                let v = serde_json::json!({
                    "applied": r.applied,
                    "index": r.index,
                    "results": r.results.iter().map(|x| serde_json::json!({
                        "entry": x.entry.as_ref().map(entry_json),
                        "deleted": x.deleted,
                    })).collect::<Vec<_>>(),
                    "failed_op": (!r.applied).then_some(r.failed_op),
                    "failed_key": (!r.applied).then_some(&r.failed_key),
                    "current_index": (!r.applied).then_some(r.current_index),
                    "leader": r.leader,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if r.applied {
                println!("applied {n} operations at index {}", r.index);
            } else {
                eprintln!(
                    "crux: nothing applied: operation {} ({:?}) failed: the key is at index {}",
                    r.failed_op, r.failed_key, r.current_index
                );
            }
            Ok(if r.applied { 0 } else { EXIT_CONFLICT })
        }
    }
}

fn print_event(e: &pb::WatchEvent, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({
            "index": e.index,
            "snapshot": e.snapshot,
            "compacted": e.compacted,
            "more": e.more,
            "entries": e.entries.iter().map(entry_json).collect::<Vec<_>>(),
            "deleted": e.deleted,
        });
        writeln!(out, "{v}")?;
    } else if e.snapshot {
        writeln!(
            out,
            "index {}: {}listing of {} keys{}",
            e.index,
            if e.compacted {
                "fresh (compacted) "
            } else {
                ""
            },
            e.entries.len(),
            if e.more { " (more follows)" } else { "" }
        )?;
        for x in &e.entries {
            writeln!(out, "  {} = {}", x.key, preview(&x.value))?;
        }
    } else {
        for x in &e.entries {
            writeln!(
                out,
                "index {}: put {} = {}",
                e.index,
                x.key,
                preview(&x.value)
            )?;
        }
        for k in &e.deleted {
            writeln!(out, "index {}: deleted {k}", e.index)?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_files_parse_and_bad_ones_say_why() {
        let ops = txn_ops(
            r#"[{"op":"check","key":"a","index":3},{"op":"put","key":"b","value":"x","cas":0},
                {"op":"put","key":"c","value_base64":"AAE="},{"op":"delete_prefix","key":"t/"}]"#,
        )
        .unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!((ops[0].index, ops[0].cas), (3, false));
        assert_eq!(
            (ops[1].index, ops[1].cas, ops[1].value.as_slice()),
            (0, true, &b"x"[..])
        );
        assert_eq!(ops[2].value, vec![0, 1]);
        for (bad, why) in [
            (r#"{"op":"put"}"#, "JSON list"),
            (r#"[{"op":"check","key":"a"}]"#, "needs \"index\""),
            (r#"[{"op":"frob","key":"a"}]"#, "not check"),
            (r#"[{"op":"put","key":"a","index":1}]"#, "takes \"cas\""),
            (r#"[{"op":"delete","key":"a","value":"v"}]"#, "only a put"),
            (r#"[{"op":"put","key":"a","extra":1}]"#, "JSON list"),
        ] {
            let e = format!("{:#}", txn_ops(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
