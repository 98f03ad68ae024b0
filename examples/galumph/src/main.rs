//! `galumph`: the seed's Galumph service as a picket plugin, and a small client for it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crux_picket::plugin::{PluginEnv, ShutdownReason};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::{Health, RunState};
use galumph::pb::{galumph_client::GalumphClient, galumph_server::GalumphServer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Exit status of the `crash` function (tests use it for crash loops).
const CRASH_STATUS: u8 = 3;
/// Exit status when the environment or function is not usable.
const USAGE_STATUS: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "galumph",
    version,
    about = "The seed's Galumph service as a crux picket plugin",
    long_about = "The seed's Galumph service (a table of named values) as a crux picket plugin.

Without a subcommand, galumph runs as a plugin: the crux agent (picket) starts it with
CRUX_PLUGIN_PROTOCOL=1, CRUX_PLUGIN_TOKEN, CRUX_REEVE_SOCKET, CRUX_PLUGIN_SOCKET_DIR, CRUX_NODE_IP,
CRUX_FUNCTION, CRUX_HORDE, CRUX_API and CRUX_INST set. It serves Galumph on CRUX_NODE_IP, port 0,
registers it with the agent's reeve as CRUX_API/CRUX_INST, prints the handshake line
`1|<version>|unix|<socket>|grpc`, and runs until picket calls Shutdown or SIGTERM arrives; then it
deregisters and exits 0. An empty CRUX_REEVE_SOCKET means: do not register (no agent to talk to).

The function decides the version: galumph2_3 serves version 2.3. The function `crash` exits with
status 3 at once (for testing crash loops). Started by hand, without picket, it says so and exits 2.

With `call`, it is a client: it finds the best live galumph2 instance through the agent's socket
and calls it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Call the best live Galumph instance, found through the agent's reeve socket.
    Call {
        /// The agent's local socket.
        #[arg(long, default_value = "/run/crux/reeve.sock")]
        socket: PathBuf,
        /// Which instances: an api (the best live one) or an exact inst.
        #[arg(long, default_value = "galumph2")]
        selector: String,
        /// Horde (empty: default).
        #[arg(long, default_value = "")]
        horde: String,
        #[command(subcommand)]
        what: Call,
    },
}

#[derive(Debug, Subcommand)]
enum Call {
    /// Add or replace the entry NAME.
    Register {
        /// Entry name.
        name: String,
        /// Its value.
        value: String,
    },
    /// Print every entry, and which instance answered.
    Table,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("galumph: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = match cli.cmd {
        None => return rt.block_on(plugin()),
        Some(Cmd::Call {
            socket,
            selector,
            horde,
            what,
        }) => rt.block_on(call(socket, selector, horde, what)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("galumph: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn plugin() -> ExitCode {
    let env = match PluginEnv::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("galumph: {e}\n(see `galumph --help`)");
            return ExitCode::from(USAGE_STATUS);
        }
    };
    if env.function == "crash" {
        eprintln!("galumph: function `crash`: exiting with status {CRASH_STATUS}");
        return ExitCode::from(CRASH_STATUS);
    }
    let version = match galumph::version_of(&env.function) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("galumph: {e}");
            return ExitCode::from(USAGE_STATUS);
        }
    };
    match serve(env, version).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("galumph: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(env: PluginEnv, version: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((env.node_ip, 0))
        .await
        .with_context(|| format!("binding {}:0", env.node_ip))?;
    let addr = listener.local_addr()?;
    let table = galumph::Table::new(&env.inst, &env.node_ip.to_string(), &version);
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(GalumphServer::new(table))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
                .await
        }
    });
    let registration = if env.reeve_socket.as_os_str().is_empty() {
        warn!("CRUX_REEVE_SOCKET is empty: serving without registering");
        None
    } else {
        let req = rpb::RegisterRequest {
            api: env.api.clone(),
            inst: env.inst.clone(),
            addr: addr.to_string(),
            horde: env.horde.clone(),
            state: RunState::Running as i32,
            health: Health::Healthy as i32,
            ..Default::default()
        };
        let r = crux_reeve::client::Registration::start(&env.reeve_socket, req)
            .await
            .with_context(|| {
                format!(
                    "registering with the reeve at {}",
                    env.reeve_socket.display()
                )
            })?;
        Some(r)
    };
    info!(inst = %env.inst, %addr, %version, "galumph serving");
    let shutdown = crux_picket::plugin::serve(&env, &version).await?;
    let why = shutdown.await;
    match why {
        ShutdownReason::Rpc { grace } => {
            info!(
                grace_ms = grace.as_millis() as u64,
                "shutdown requested by picket"
            )
        }
        other => info!(signal = ?other, "shutdown on a signal"),
    }
    if let Some(r) = registration {
        if let Err(e) = r.deregister().await {
            warn!(error = %e, "deregistering failed");
        }
    }
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "the galumph server failed"),
        Ok(_) => {}
        Err(_) => warn!("the galumph server did not drain in 2 s"),
    }
    Ok(())
}

async fn call(socket: PathBuf, selector: String, horde: String, what: Call) -> anyhow::Result<()> {
    let follow = crux_reeve::client::connect(&socket, &selector, &horde, Duration::from_secs(5))
        .await
        .with_context(|| format!("looking up {selector}"))?;
    let mut current = follow.current();
    let inst = tokio::time::timeout(Duration::from_secs(5), current.wait_for(|c| c.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|c| c.clone()))
        .with_context(|| format!("no live instance of {selector} within 5 s"))?;
    let mut client = GalumphClient::new(follow.channel());
    match what {
        Call::Register { name, value } => {
            let r = client
                .register(galumph::pb::GalumphInstance {
                    name: name.clone(),
                    value,
                })
                .await?
                .into_inner();
            println!(
                "{} {name} at {} ({} entries)",
                if r.replaced { "replaced" } else { "registered" },
                inst.inst,
                r.count
            );
        }
        Call::Table => {
            let t = client.table(galumph::pb::TableReq {}).await?.into_inner();
            println!("{} (version {}) on {}", t.inst, t.version, t.node);
            for i in t.instances {
                println!("{}\t{}", i.name, i.value);
            }
        }
    }
    Ok(())
}
