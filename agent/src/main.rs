//! The `crux` binary: the node agent (`crux agent`), a local flock in one command (`crux dev`),
//! the CLI that talks to an agent over its Unix socket (`crux status`, `crux members`,
//! `crux leader`, `crux node revoke`, `crux keys`, `crux services`, `crux lookup`, `crux watch`,
//! `crux pastiche`, `crux muster`, `crux kv`, `crux store`, `crux proctor`, `crux picket`,
//! `crux monitor`, `crux log-level`, `crux reload`, `crux debug`),
//! `crux register` (keeps a command registered while it runs), `crux keygen`, `crux completions`
//! (shell completion scripts) and the simulator front end (`crux sim`).
//!
//! This crate is the top of the graph and the only one that reads config files, `CRUX_*`
//! variables and the command line. It only wires: `agent.rs` prepares a node and runs the
//! bootstrap table of `bootstrap.rs` (flock → reeve → steward → store → picket → proctor →
//! pastiche), owning every task the steps start; `rpc/` serves the local socket, `steward.rs` the
//! node gRPC port (over `crux_transport`), `http.rs` `/ready`, `/metrics` and a status page, `ui/` the live web page. The
//! services' runtimes live in their crates (`crux_store::supervise`, `crux_placement`), started
//! through `crux_service::Service`. `ARCHITECTURE.md` at the root is the map.
//!
//! **Never.** No library depends on this crate, and it carries no service's runtime. Keys and
//! handles are made here and passed down (no process-global state); the clock is read here,
//! never in the flock core.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent;
mod bootstrap;
mod catalyst;
mod client;
mod config;
mod dev;
mod dns;
mod fuse;
mod http;
mod identity;
mod keys;
mod kv;
mod kv_cli;
mod logs;
mod metrics;
mod ops;
mod ops_cli;
mod pastiche;
mod placement;
mod register;
mod route_cli;
mod rpc;
mod sim_cmd;
mod state;
mod steward;
mod store;
mod store_cli;
mod topic_cli;
mod ui;
mod view;

/// Crux: a node agent that finds its peers, agrees on one flock with one leader, and runs the
/// flock's services.
#[derive(Debug, Parser)]
#[command(name = "crux", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node agent (config: --config FILE, CRUX_* variables, flags).
    Agent(Box<config::AgentFlags>),
    /// Run a local flock of N agent processes on 127.0.0.2 … 127.0.0.(N+1), with a live table.
    Dev(dev::DevArgs),
    /// List the members the local agent knows.
    Members {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        json: client::JsonArg,
    },
    /// Show the leader the local agent follows (exit 1 when none is known).
    Leader {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        json: client::JsonArg,
    },
    /// Operate on members of the flock (`crux node revoke ID`).
    Node {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(subcommand)]
        cmd: client::NodeCmd,
    },
    /// Show the local agent's identity and bootstrap progress.
    Status {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        json: client::JsonArg,
    },
    /// Manage the secondary keyring: list, install KEY, use KEY, remove KEY.
    Keys {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(subcommand)]
        cmd: client::KeysCmd,
    },
    /// List the registered service instances (from this node's replica of the registry).
    Services {
        #[command(flatten)]
        socket: client::SocketArg,
        /// Only this horde.
        #[arg(long, default_value = "")]
        horde: String,
        /// Only this api.
        #[arg(long, default_value = "")]
        api: String,
        /// Ask the steward for its own table instead of reading this node's replica.
        #[arg(long)]
        steward: bool,
        #[command(flatten)]
        json: client::JsonArg,
    },
    /// The instances a selector picks, best first (an api, or an exact inst; `api:NAME`,
    /// `inst:NAME` say which). Exit 1 when nothing matches.
    Lookup {
        /// The selector.
        selector: String,
        #[command(flatten)]
        socket: client::SocketArg,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
        #[command(flatten)]
        json: client::JsonArg,
    },
    /// Print the instances a selector picks, then every change as it comes (empty selector:
    /// all of the horde).
    Watch {
        /// The selector.
        #[arg(default_value = "")]
        selector: String,
        #[command(flatten)]
        socket: client::SocketArg,
        /// Horde (default: `default`).
        #[arg(long, default_value = "")]
        horde: String,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// Run COMMAND and keep it registered while it runs and its check passes; deregister it when
    /// it exits, and exit with its status.
    Register(Box<register::RegisterArgs>),
    /// Pastiche, the node's content-addressed cache: put, get, ls, rm, pin, unpin, verify.
    Pastiche {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(subcommand)]
        cmd: pastiche::PasticheCmd,
    },
    /// Muster: the runnable functions of the flock (durable): add, search, rm.
    Muster {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: store_cli::MusterCmd,
    },
    /// Blueprint K/V (durable, linearizable): put, get, ls, rm, watch, txn.
    Kv {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: kv_cli::KvCmd,
    },
    /// Catalyst durable topics: create, ls, rm, pub, sub (offsets, consumer groups), commit.
    Topic {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: topic_cli::TopicCmd,
    },
    /// Fuse routes served to proxies as xDS: add, ls, rm, proxies.
    Route {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: route_cli::RouteCmd,
    },
    /// The durable store (Raft among the voters the flock picks): status, recover.
    Store {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: store_cli::StoreCmd,
    },
    /// Placement: apply an intent, see what it would change, and how far it is done.
    Proctor {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: placement::ProctorCmd,
    },
    /// The service runner on this node: ps
    Picket {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        wait: client::WaitArg,
        #[command(subcommand)]
        cmd: placement::PicketCmd,
    },
    /// Stream the running agent's log lines from now on (at --level, whatever the agent's own
    /// filter), until interrupted.
    Monitor {
        #[command(flatten)]
        socket: client::SocketArg,
        /// The most verbose level shown: error, warn, info, debug or trace.
        #[arg(long, default_value = "info")]
        level: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Change the running agent's log filter at once (a level, or a filter such as
    /// `crux_flock=debug,info`); with --for, the filter before comes back after that long.
    LogLevel {
        /// The new filter.
        filter: String,
        /// Revert after this long (`30s`, `5m`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        for_: Option<std::time::Duration>,
        #[command(flatten)]
        socket: client::SocketArg,
    },
    /// Make the running agent read its config file again (as SIGHUP does): what can change
    /// live is applied, what cannot is refused naming the field; a config with an error
    /// changes nothing. Exit 1 when anything was refused.
    Reload {
        #[command(flatten)]
        socket: client::SocketArg,
    },
    /// Collect what a bug report needs from the running agent into a .tar.gz: status, members,
    /// leader, store status, metrics at the start and the end, the debug-level log for the
    /// duration, the config (secrets redacted), version and build.
    Debug {
        #[command(flatten)]
        socket: client::SocketArg,
        #[command(flatten)]
        args: ops_cli::DebugArgs,
    },
    /// Print a new random secondary key (base64) for `crux keys install` or a keyring file.
    Keygen,
    /// Run the deterministic flock simulator.
    Sim(sim_cmd::SimArgs),
    /// Print the shell completion script for bash, zsh, fish, elvish or powershell (the .deb
    /// installs bash, zsh and fish ones).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<i32> = match &cli.cmd {
        Cmd::Agent(flags) => Ok(agent::main(flags)),
        Cmd::Dev(args) => dev::main(args),
        Cmd::Members { socket, json } => {
            client::block_on(client::members(&socket.socket, json.json)).map(|()| 0)
        }
        Cmd::Leader { socket, json } => {
            client::block_on(client::leader(&socket.socket, json.json)).map(|()| 0)
        }
        Cmd::Status { socket, json } => {
            client::block_on(client::status(&socket.socket, json.json)).map(|()| 0)
        }
        Cmd::Node { socket, cmd } => {
            client::block_on(client::node(&socket.socket, cmd)).map(|()| 0)
        }
        Cmd::Keys { socket, cmd } => {
            client::block_on(client::keys(&socket.socket, cmd)).map(|()| 0)
        }
        Cmd::Services {
            socket,
            horde,
            api,
            steward,
            json,
        } => client::block_on(client::services(
            &socket.socket,
            horde,
            api,
            *steward,
            json.json,
        ))
        .map(|()| 0),
        Cmd::Lookup {
            selector,
            socket,
            horde,
            json,
        } => {
            client::block_on(client::lookup(&socket.socket, selector, horde, json.json)).map(|()| 0)
        }
        Cmd::Watch {
            selector,
            socket,
            horde,
            json,
        } => client::block_on(client::watch(&socket.socket, selector, horde, *json)).map(|()| 0),
        Cmd::Register(args) => register::main(args),
        Cmd::Muster { socket, wait, cmd } => {
            client::block_on_code(store_cli::muster(&socket.socket, wait.wait, cmd))
        }
        Cmd::Store { socket, wait, cmd } => {
            client::block_on_code(store_cli::store(&socket.socket, wait.wait, cmd))
        }
        Cmd::Kv { socket, wait, cmd } => {
            client::block_on_code(kv_cli::run(&socket.socket, wait.wait, cmd))
        }
        Cmd::Topic { socket, wait, cmd } => {
            client::block_on_code(topic_cli::run(&socket.socket, wait.wait, cmd))
        }
        Cmd::Route { socket, wait, cmd } => {
            client::block_on_code(route_cli::run(&socket.socket, wait.wait, cmd))
        }
        Cmd::Pastiche { socket, cmd } => client::block_on_code(pastiche::run(&socket.socket, cmd)),
        Cmd::Proctor { socket, wait, cmd } => {
            client::block_on_code(placement::proctor(&socket.socket, wait.wait, cmd))
        }
        Cmd::Picket { socket, wait, cmd } => {
            client::block_on_code(placement::picket(&socket.socket, wait.wait, cmd))
        }
        Cmd::Monitor {
            socket,
            level,
            json,
        } => client::block_on_code(ops_cli::monitor(&socket.socket, level, *json)),
        Cmd::LogLevel {
            filter,
            for_,
            socket,
        } => client::block_on_code(ops_cli::log_level(&socket.socket, filter, *for_)),
        Cmd::Reload { socket } => client::block_on_code(ops_cli::reload(&socket.socket)),
        Cmd::Debug { socket, args } => client::block_on_code(ops_cli::debug(&socket.socket, args)),
        Cmd::Keygen => {
            println!("{}", keys::generate());
            Ok(0)
        }
        Cmd::Sim(args) => sim_cmd::run(args).map(|()| 0),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "crux", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("crux: {e:#}");
            ExitCode::FAILURE
        }
    }
}
