//! What the benchmarks share: percentiles, CPU and memory from `/proc`, waiting for a condition
//! with a deadline, and a small flock of real agents on loopback.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_tests::cluster::Cluster;
use tokio::time::Instant;

/// Kernel clock ticks per second in `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// The `crux` executable: the one given, else the one beside this binary (`target/release/`).
pub fn crux_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("crux"),
    };
    if !bin.is_file() {
        bail!(
            "no crux executable at {} (build it: cargo build --release -p crux-agent, or pass --crux)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Polls `check` every `every` until it returns `Some` or `timeout` passes.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The `p`-th percentile (0-100, nearest rank) of sorted values.
pub fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// "p50 / p99 / max" of durations in ms (sorts them).
pub fn summary_ms(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{} / {} / {}",
        ms(pct(v, 50.0)),
        ms(pct(v, 99.0)),
        ms(v.last().copied().unwrap_or_default())
    )
}

/// How many of `v` took `over` or longer.
pub fn count_over(v: &[Duration], over: Duration) -> usize {
    v.iter().filter(|d| **d >= over).count()
}

/// Name and CPU seconds (user + system) from a `/proc/.../stat` file.
fn stat_cpu(path: &Path) -> Option<(String, f64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let name = s[open + 1..close].to_string();
    let rest: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    // After the name: state is field 3 of the file, utime 14 and stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, (utime + stime) as f64 / TICKS))
}

/// CPU seconds a process has used (itself and its threads, exited ones included).
pub fn process_cpu(pid: u32) -> Option<f64> {
    stat_cpu(Path::new(&format!("/proc/{pid}/stat"))).map(|(_, s)| s)
}

/// CPU seconds this process has used.
pub fn self_cpu() -> f64 {
    stat_cpu(Path::new("/proc/self/stat"))
        .map(|(_, s)| s)
        .unwrap_or(0.0)
}

/// CPU seconds of this process's live threads, summed per thread-name prefix: one sum per
/// prefix, then the rest.
pub fn thread_cpu(prefixes: &[&str]) -> Vec<f64> {
    let mut sums = vec![0.0; prefixes.len() + 1];
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return sums;
    };
    for entry in dir.flatten() {
        let Some((name, cpu)) = stat_cpu(&entry.path().join("stat")) else {
            continue;
        };
        let k = prefixes
            .iter()
            .position(|p| name.starts_with(p))
            .unwrap_or(prefixes.len());
        sums[k] += cpu;
    }
    sums
}

/// Resident memory of this process, MiB.
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A register request for a running, healthy instance.
pub fn running(api: &str, inst: &str, addr: &str, valid_for: Duration) -> rpb::RegisterRequest {
    rpb::RegisterRequest {
        api: api.into(),
        inst: inst.into(),
        addr: addr.into(),
        state: crux_proto::grpc::steward::v1::RunState::Running as i32,
        health: crux_proto::grpc::steward::v1::Health::Healthy as i32,
        valid_for_ms: valid_for.as_millis() as u64,
        ..Default::default()
    }
}

/// Starts `n` real agents on a loopback range of their own (127.A.B.2 …, see
/// [`crux_tests::cluster`]) and waits until they agree on members and a leader and every reeve
/// is linked to a steward. Dropping the cluster kills exactly these agents.
pub async fn start_flock(bin: &Path, n: usize, timeout: Duration) -> anyhow::Result<Cluster> {
    start_flock_with(bin, n, timeout, "").await
}

/// [`start_flock`] with `extra` TOML appended to every agent's config first.
pub async fn start_flock_with(
    bin: &Path,
    n: usize,
    timeout: Duration,
    extra: &str,
) -> anyhow::Result<Cluster> {
    let mut cluster = Cluster::new(bin, 1, n, "local");
    for k in 1..=n {
        cluster.append_config(k, extra);
    }
    cluster.start_all();
    let nodes: Vec<usize> = (1..=n).collect();
    // The same leader at every poll for a second: a settled flock, not one between two merges.
    let hold = Duration::from_secs(1);
    let mut since: Option<(Instant, String)> = None;
    let agreed = tokio::task::block_in_place(|| {
        crux_tests::cluster::wait_for(timeout, || {
            let leader = cluster.agreement(&nodes).inspect_err(|_| since = None)?;
            match &since {
                Some((t, id)) if *id == leader.id && t.elapsed() >= hold => return Ok(()),
                Some((_, id)) if *id == leader.id => {}
                _ => since = Some((Instant::now(), leader.id)),
            }
            Err("agreement not yet held for a second".into())
        })
    });
    if let Err(e) = agreed {
        bail!(
            "the agents did not agree within {timeout:?}: {e}\n{}",
            cluster.logs(20)
        );
    }
    for a in &cluster.agents {
        let socket = a.socket.clone();
        wait_until(
            &format!("node{} linked to a steward", a.k),
            timeout,
            Duration::from_millis(50),
            async || {
                let mut c = crux_reeve::client::reeve_client(&socket).await.ok()?;
                let r = c
                    .lookup(rpb::LookupRequest {
                        selector: "api:none".into(),
                        ..Default::default()
                    })
                    .await
                    .ok()?;
                r.into_inner().linked.then_some(())
            },
        )
        .await?;
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(pct(&v, 50.0), 50);
        assert_eq!(pct(&v, 99.0), 99);
        assert_eq!(pct(&v, 100.0), 100);
        assert_eq!(pct(&[7u32], 99.0), 7);
        assert_eq!(pct::<u32>(&[], 50.0), 0);
    }

    #[test]
    fn reads_its_own_cpu_and_threads() {
        assert!(self_cpu() >= 0.0);
        let sums = thread_cpu(&["no-such-thread"]);
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0], 0.0);
        assert!(rss_mib() > 0.0);
    }
}
