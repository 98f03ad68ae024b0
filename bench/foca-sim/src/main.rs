//! `foca-sim`: N nodes of the `foca` crate on `crux sim`'s simulated network, with `crux sim`'s
//! scenarios and report keys, for side-by-side figures (see `bench/foca-vs-crux.sh`).

use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use crux_bench_foca::{run, RunConfig, Scenario};

/// Runs the foca crate (SWIM) for N simulated nodes on `crux sim`'s network model (lan preset)
/// and reports how fast they agree and what they send.
#[derive(Parser, Debug)]
#[command(name = "foca-sim", version)]
struct Args {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Probability that a datagram is lost (0.05 = 5 %), throughout the run.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a datagram is delivered twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Seed of the run: the same seed gives the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// cold-boot, kill-node (foca has no leader: stands beside crux's kill-leader) or
    /// partition-heal.
    #[arg(long, default_value = "cold-boot")]
    scenario: Scenario,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run exactly this many simulated seconds (the steady-state window is whatever remains
    /// after the last agreement).
    #[arg(long)]
    duration: Option<f64>,
    /// Simulated seconds after agreement before traffic is measured.
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Simulated seconds of steady state over which traffic is measured.
    #[arg(long, default_value_t = 10.0)]
    window: f64,
    /// Longest wait, in simulated seconds, for each agreement of the scenario.
    #[arg(long, default_value_t = 120.0)]
    deadline: f64,
    /// Nodes a starting node announces to (random nodes started before it that it can reach).
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Well-known addresses of the whole flock every node holds as down placeholders (foca's
    /// bootstrap_with_wellknown example), retried by periodic_announce_to_down_members.
    #[arg(long, default_value_t = 3)]
    wellknown: usize,
    /// Tuning (off by default): periodic_announce_to_down_members every this many seconds
    /// instead of new_lan's 65 s.
    #[arg(long)]
    announce_down_every: Option<f64>,
}

fn secs(name: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{name} {s}: not a duration"))
}

fn config(a: &Args) -> Result<RunConfig, String> {
    if a.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    if !(0.0..1.0).contains(&a.loss) {
        return Err(format!("--loss {} must be in [0, 1)", a.loss));
    }
    if !(0.0..=1.0).contains(&a.duplicate) {
        return Err(format!("--duplicate {} must be in [0, 1]", a.duplicate));
    }
    let mut c = RunConfig::new(a.scenario, a.nodes, a.seed);
    c.net.loss = a.loss;
    c.net.duplicate = a.duplicate;
    c.warmup = secs("warmup", a.warmup)?;
    c.window = secs("window", a.window)?;
    c.phase_deadline = secs("deadline", a.deadline)?;
    c.duration = a.duration.map(|d| secs("duration", d)).transpose()?;
    c.seeds = a.seeds;
    c.wellknown = a.wellknown;
    if let Some(every) = a.announce_down_every {
        let frequency = secs("announce-down-every", every)?;
        if frequency.is_zero() {
            return Err("--announce-down-every must be positive".into());
        }
        let num_members = c
            .foca
            .periodic_announce_to_down_members
            .as_ref()
            .map_or(NonZeroUsize::MIN.saturating_add(1), |p| p.num_members);
        c.foca.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency,
            num_members,
        });
    }
    Ok(c)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("foca-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let report = run(&cfg);
    if args.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("foca-sim: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.table());
    }
    ExitCode::SUCCESS
}
