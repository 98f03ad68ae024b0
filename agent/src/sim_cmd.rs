//! `crux sim`: runs the real flock protocol code for N simulated nodes on virtual time and reports
//! how fast they agree and what they send, so that users can size clusters.
//!
//! The simulation itself lives in `crux_flock::sim`; this is its command-line front end.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use crux_flock::sim::scenario::Progress;
use crux_flock::sim::{scenario, Scenario, ScenarioConfig};
use crux_flock::Preset;

/// Arguments of `crux sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// Probability that a datagram is lost (0.05 = 5 %), throughout the run.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Seed of the run: the same seed gives the same run, bit for bit.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// What to simulate: cold-boot, kill-leader, partition-heal, churn or rotation (5 simulated
    /// minutes of transient-key rotations every 6-12 s, a secondary-keyring rotation and one node
    /// partitioned for 5 rotation periods; reports rotations, membership_losses,
    /// rejoin_after_heal_s and keyring_rotated).
    #[arg(long, default_value = "cold-boot")]
    pub scenario: Scenario,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Timing preset of the nodes and the simulated network: lan, wan or local.
    #[arg(long, default_value = "lan")]
    pub preset: Preset,
    /// Run exactly this many simulated seconds (the steady-state window is whatever remains after
    /// the last agreement). Without it the run ends after agreement and the window.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Simulated seconds after agreement before traffic is measured (joins settle).
    #[arg(long, default_value_t = 10.0)]
    pub warmup: f64,
    /// Simulated seconds of steady state, after the warm-up, over which traffic is measured.
    #[arg(long, default_value_t = 10.0)]
    pub window: f64,
    /// Probability that a datagram is delivered twice.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate: f64,
    /// Run the nodes without security: datagrams in clear, no join handshakes, no key rotation
    /// (measures the membership protocol alone). By default nodes run sealed, as the agent does.
    #[arg(long)]
    pub plain: bool,
    /// Shortest period, in simulated seconds, between two transient-key rotations (default: 30,
    /// or 6 in the rotation scenario).
    #[arg(long)]
    pub rotation_min: Option<f64>,
    /// Longest period between two rotations (default: 60, or 12 in the rotation scenario, whose
    /// partition lasts 5 times this).
    #[arg(long)]
    pub rotation_max: Option<f64>,
    /// Longest wait, in simulated seconds, for each agreement of the scenario.
    #[arg(long, default_value_t = 120.0)]
    pub deadline: f64,
}

fn seconds(name: &str, s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("--{name} {s}: not a duration"))
}

impl SimArgs {
    /// The scenario these arguments describe, checked.
    pub fn scenario_config(&self) -> anyhow::Result<ScenarioConfig> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if !(0.0..1.0).contains(&self.loss) {
            bail!("--loss {} must be in [0, 1)", self.loss);
        }
        if !(0.0..=1.0).contains(&self.duplicate) {
            bail!("--duplicate {} must be in [0, 1]", self.duplicate);
        }
        if self.plain && self.scenario == Scenario::Rotation {
            bail!("--scenario rotation rotates keys: it cannot run --plain");
        }
        let mut cfg = ScenarioConfig::new(self.scenario, self.nodes, self.seed);
        cfg.preset = self.preset;
        cfg.loss = self.loss;
        cfg.duplicate = self.duplicate;
        if self.plain {
            cfg.security = None;
        }
        if let Some(sec) = cfg.security.as_mut() {
            if let Some(s) = self.rotation_min {
                sec.rotation_min = seconds("rotation-min", s)?;
            }
            if let Some(s) = self.rotation_max {
                sec.rotation_max = seconds("rotation-max", s)?;
            }
            if sec.rotation_min.is_zero() || sec.rotation_min > sec.rotation_max {
                bail!("--rotation-min must be above zero and at most --rotation-max");
            }
        }
        cfg.window = seconds("window", self.window)?;
        cfg.warmup = seconds("warmup", self.warmup)?;
        cfg.phase_deadline = seconds("deadline", self.deadline)?;
        if let Some(d) = self.duration {
            let d = seconds("duration", d)?;
            if d.is_zero() {
                bail!("--duration must be greater than zero");
            }
            cfg.duration = Some(d);
        }
        Ok(cfg)
    }
}

/// Runs `crux sim`: prints a short table, or with `--json` exactly one JSON object. On a terminal,
/// a progress line on stderr shows the phase and the simulated time while it runs.
pub fn run(args: &SimArgs) -> anyhow::Result<()> {
    let cfg = args.scenario_config()?;
    let report = if std::io::stderr().is_terminal() {
        let mut show = |p: &Progress| {
            eprint!(
                "\r\x1b[K{}: {:.0} s simulated, {} nodes running, {} events",
                p.phase, p.sim_s, p.running, p.events
            );
        };
        let report = scenario::run_with_progress(&cfg, &mut show);
        eprint!("\r\x1b[K");
        report
    } else {
        scenario::run(&cfg)
    };
    let report = report.context("simulation config")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn parses_the_issue_flags() {
        let cli = Cli::try_parse_from([
            "crux",
            "--nodes",
            "1000",
            "--loss",
            "0.05",
            "--seed",
            "7",
            "--scenario",
            "kill-leader",
            "--json",
        ])
        .expect("parses");
        assert_eq!(cli.sim.nodes, 1000);
        assert_eq!(cli.sim.scenario, Scenario::KillLeader);
        assert!(cli.sim.json);
        let cfg = cli.sim.scenario_config().expect("valid");
        assert_eq!(cfg.loss, 0.05);
        assert_eq!(cfg.seed, 7);
        assert!(Cli::try_parse_from(["crux", "--scenario", "nope"]).is_err());
    }

    #[test]
    fn parses_the_rotation_scenario() {
        let cli = Cli::try_parse_from([
            "crux",
            "--nodes",
            "1000",
            "--scenario",
            "rotation",
            "--loss",
            "0.05",
            "--json",
        ])
        .expect("parses");
        assert_eq!(cli.sim.scenario, Scenario::Rotation);
        let cfg = cli.sim.scenario_config().expect("valid");
        assert_eq!(
            cfg.security,
            Some(crux_flock::sim::scenario::ROTATION_SCENARIO_TIMING)
        );
        let cli =
            Cli::try_parse_from(["crux", "--scenario", "rotation", "--plain"]).expect("parses");
        assert!(cli.sim.scenario_config().is_err());
    }

    #[test]
    fn rejects_bad_values() {
        let cli = Cli::try_parse_from(["crux", "--loss", "1.5"]).expect("parses");
        assert!(cli.sim.scenario_config().is_err());
        let cli = Cli::try_parse_from(["crux", "--nodes", "0"]).expect("parses");
        assert!(cli.sim.scenario_config().is_err());
    }
}
