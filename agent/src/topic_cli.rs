//! `crux topic`: Catalyst's durable topics from the command line, over the client library
//! (`crux_catalyst::client`), the same whether the agent keeps topics itself or passes them to
//! NATS.
//!
//! Exit codes: 0 done; 1 another error (no agent, …); 2 bad input (a name, size, offset or
//! message the limits refuse); 3 no such topic; 4 the topic exists already; 5 the backend is
//! unavailable (NATS away: nothing was acknowledged, publish again).

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use crux_catalyst::client::Topics;
use crux_catalyst::{Retention, Start};
use crux_reeve::client::ClientError;
use serde::Serialize;

/// Exit code: bad input.
pub const EXIT_INVALID: i32 = 2;
/// Exit code: no such topic.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code: the topic exists.
pub const EXIT_EXISTS: i32 = 4;
/// Exit code: the backend is unavailable.
pub const EXIT_UNAVAILABLE: i32 = 5;

/// Lines of stdin sent in one publish call, at most.
const PUB_BATCH_LINES: usize = 1000;
/// Bytes of stdin sent in one publish call, about.
const PUB_BATCH_BYTES: usize = 1 << 20;

/// `crux topic` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TopicCmd {
    /// Make TOPIC (1-128 of A-Z a-z 0-9 _ -), with retention by size and/or age.
    Create {
        /// The topic.
        topic: String,
        /// Drop the oldest messages while the topic holds more than this (`512MiB`, `10GB`).
        #[arg(long, value_name = "SIZE", value_parser = crate::config::parse_size)]
        max_bytes: Option<u64>,
        /// Drop messages older than this (`7d`, `1h`).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        max_age: Option<Duration>,
    },
    /// List the topics with their offsets, size, groups and subscribers on this agent.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove TOPIC, its messages and its groups' offsets.
    Rm {
        /// The topic.
        topic: String,
    },
    /// Publish MSG to TOPIC; without MSG or with `-`, each line of stdin is one message.
    /// Prints the offsets the messages got once they are stored.
    Pub {
        /// The topic.
        topic: String,
        /// The message, or `-` for stdin (the default).
        msg: Option<String>,
    },
    /// Print TOPIC's messages, one per line, from an offset or a group's committed offset, then
    /// every new one. With --group, the offset after each printed batch is committed.
    Sub {
        /// The topic.
        topic: String,
        /// Where to start: an offset, `earliest` (the default) or `latest`. With --group, only
        /// while the group has no committed offset.
        #[arg(long, value_name = "OFFSET", value_parser = parse_from)]
        from: Option<Start>,
        /// Read as consumer group G: start at its committed offset, commit as messages are
        /// printed.
        #[arg(long, value_name = "G")]
        group: Option<String>,
        /// Exit after N messages.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object per message (`offset`, `time_ms`, `payload`).
        #[arg(long)]
        json: bool,
    },
    /// Record that GROUP reads OFFSET next on TOPIC.
    Commit {
        /// The topic.
        topic: String,
        /// The group.
        group: String,
        /// The offset the group reads next.
        offset: u64,
    },
}

/// `--from`: an offset, `earliest` or `latest`.
pub fn parse_from(s: &str) -> Result<Start, String> {
    match s {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ => s.parse().map(Start::Offset).map_err(|_| {
            format!("{s:?} is not an offset: a whole number from 0, `earliest` or `latest`")
        }),
    }
}

fn code(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect { .. } => 1,
        ClientError::Status(s) => match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => EXIT_INVALID,
            tonic::Code::NotFound => EXIT_NOT_FOUND,
            tonic::Code::AlreadyExists => EXIT_EXISTS,
            tonic::Code::Unavailable => EXIT_UNAVAILABLE,
            _ => 1,
        },
    }
}

fn fail(e: ClientError) -> anyhow::Result<i32> {
    eprintln!("crux: {e}");
    Ok(code(&e))
}

#[derive(Serialize)]
struct TopicJson {
    name: String,
    first_offset: u64,
    next_offset: u64,
    messages: u64,
    bytes: u64,
    max_bytes: u64,
    max_age_ms: u64,
    subscribers: u32,
    groups: std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct MessageJson<'a> {
    offset: u64,
    time_ms: u64,
    payload: std::borrow::Cow<'a, str>,
}

/// Runs a `crux topic` command against the agent at `socket`; the exit code.
pub async fn run(socket: &Path, wait: Duration, cmd: &TopicCmd) -> anyhow::Result<i32> {
    crate::client::wait_for_steps(socket, &["catalyst"], wait).await?;
    let channel = crate::client::channel(socket, None).await?;
    let mut t = Topics::new(channel);
    match cmd {
        TopicCmd::Create {
            topic,
            max_bytes,
            max_age,
        } => {
            let r = Retention {
                max_bytes: max_bytes.unwrap_or(0),
                max_age: max_age.unwrap_or_default(),
            };
            match t.create(topic, r).await {
                Ok(_) => println!("created topic {topic}"),
                Err(e) => return fail(e),
            }
        }
        TopicCmd::Ls { json } => {
            let list = match t.list().await {
                Ok(l) => l,
                Err(e) => return fail(e),
            };
            if *json {
                let out: Vec<TopicJson> = list
                    .topics
                    .into_iter()
                    .map(|t| {
                        let r = t.retention.unwrap_or_default();
                        TopicJson {
                            name: t.name,
                            first_offset: t.first_offset,
                            next_offset: t.next_offset,
                            messages: t.messages,
                            bytes: t.bytes,
                            max_bytes: r.max_bytes,
                            max_age_ms: r.max_age_ms,
                            subscribers: t.subscribers,
                            groups: t
                                .groups
                                .into_iter()
                                .map(|g| (g.name, g.committed))
                                .collect(),
                        }
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
                table.set_header([
                    "TOPIC",
                    "OFFSETS",
                    "MESSAGES",
                    "BYTES",
                    "RETENTION",
                    "GROUPS",
                    "SUBS",
                ]);
                for tp in &list.topics {
                    let r = tp.retention.unwrap_or_default();
                    let mut ret = Vec::new();
                    if r.max_bytes > 0 {
                        ret.push(size(r.max_bytes));
                    }
                    if r.max_age_ms > 0 {
                        ret.push(
                            humantime::format_duration(Duration::from_millis(r.max_age_ms))
                                .to_string(),
                        );
                    }
                    let groups: Vec<String> = tp
                        .groups
                        .iter()
                        .map(|g| format!("{}@{}", g.name, g.committed))
                        .collect();
                    table.add_row([
                        tp.name.clone(),
                        format!("{}..{}", tp.first_offset, tp.next_offset),
                        tp.messages.to_string(),
                        tp.bytes.to_string(),
                        if ret.is_empty() {
                            "forever".into()
                        } else {
                            ret.join(", ")
                        },
                        groups.join(" "),
                        tp.subscribers.to_string(),
                    ]);
                }
                println!("{table}");
                println!("{} topic(s), backend {}", list.topics.len(), list.backend);
            }
        }
        TopicCmd::Rm { topic } => match t.delete(topic).await {
            Ok(()) => println!("removed topic {topic}"),
            Err(e) => return fail(e),
        },
        TopicCmd::Pub { topic, msg } => match msg.as_deref() {
            Some(m) if m != "-" => match t.publish(topic, vec![m.as_bytes().to_vec()]).await {
                Ok(o) => println!("published 1 message to {topic} at offset {}", o[0]),
                Err(e) => return fail(e),
            },
            _ => return publish_stdin(&mut t, topic).await,
        },
        TopicCmd::Sub {
            topic,
            from,
            group,
            count,
            json,
        } => {
            return subscribe(
                &mut t,
                topic,
                from.unwrap_or(Start::Earliest),
                group.as_deref(),
                *count,
                *json,
            )
            .await
        }
        TopicCmd::Commit {
            topic,
            group,
            offset,
        } => match t.commit(topic, group, *offset).await {
            Ok(()) => println!("group {group} reads {topic} from offset {offset}"),
            Err(e) => return fail(e),
        },
    }
    Ok(0)
}

/// Bytes in the largest binary unit that divides them (`1 GiB`, `512 KiB`, `1000 B`).
fn size(b: u64) -> String {
    for (unit, name) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if b >= unit && b.is_multiple_of(unit) {
            return format!("{} {name}", b / unit);
        }
    }
    format!("{b} B")
}

async fn publish_stdin(t: &mut Topics, topic: &str) -> anyhow::Result<i32> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let (mut sent, mut first, mut last) = (0u64, None, 0u64);
    loop {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < PUB_BATCH_LINES && bytes < PUB_BATCH_BYTES {
            match lines.next() {
                Some(l) => {
                    let l = l.context("reading stdin")?;
                    bytes += l.len();
                    batch.push(l.into_bytes());
                }
                None => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        let n = batch.len() as u64;
        match t.publish(topic, batch).await {
            Ok(o) => {
                first.get_or_insert(o[0]);
                last = *o.last().unwrap_or(&0);
                sent += n;
            }
            Err(e) => {
                if sent > 0 {
                    eprintln!("crux: {sent} message(s) were published before this error");
                }
                return fail(e);
            }
        }
    }
    match first {
        Some(f) => println!("published {sent} message(s) to {topic} at offsets {f}..={last}"),
        None => println!("nothing to publish (stdin was empty)"),
    }
    Ok(0)
}

async fn subscribe(
    t: &mut Topics,
    topic: &str,
    from: Start,
    group: Option<&str>,
    count: Option<u64>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut stream = match t.subscribe(topic, from, group).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        let batch = match stream.message().await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(0),
            Err(s) => return fail(ClientError::Status(s)),
        };
        let mut next = None;
        {
            let mut out = stdout.lock();
            for m in &batch.messages {
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
                if json {
                    let j = MessageJson {
                        offset: m.offset,
                        time_ms: m.time_ms,
                        payload: String::from_utf8_lossy(&m.payload),
                    };
                    writeln!(out, "{}", serde_json::to_string(&j)?)?;
                } else {
                    out.write_all(&m.payload)?;
                    out.write_all(b"\n")?;
                }
                seen += 1;
                next = Some(m.offset + 1);
            }
            out.flush()?;
        }
        // Committed only once printed: at-least-once.
        if let (Some(g), Some(n)) = (group, next) {
            if let Err(e) = t.commit(topic, g, n).await {
                return fail(e);
            }
        }
        if count.is_some_and(|c| seen >= c) {
            return Ok(0);
        }
    }
}
