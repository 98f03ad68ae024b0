//! `sealed-echo`: an Echo service whose clients reach it over TLS pinned to the public key it
//! registered with its agent, and such a client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use crux_proto::flock::NodeKey;
use crux_reeve::endpoint::{ClientAuth, Dialer, NodeIdentity};
use sealed_echo::ServeOptions;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "sealed-echo",
    version,
    about = "Two services talking over TLS pinned to the public key the server registered",
    long_about = "Two services talking over TLS pinned to the public key the server registered.

`sealed-echo serve` makes (or loads) an Ed25519 endpoint key, registers api/inst with the agent
with its public key, serves Echo over TLS 1.3 with that key, and prints one line
`ready addr=<host:port> key=<key>` on stdout once it accepts calls. SIGTERM or Ctrl-C: it
deregisters and exits 0.

`sealed-echo call TEXT` looks the api up through the agent's socket, connects to the best live
instance, refuses it unless its server proves the key the instance registered (or if it
registered none), and prints the reply, the instance, its key and the TLS cipher suite."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve Echo over TLS with the endpoint key, registered with the agent.
    Serve {
        /// The agent's local socket.
        #[arg(long, default_value = "/run/crux/reeve.sock")]
        socket: PathBuf,
        /// Serve without registering (no agent).
        #[arg(long)]
        no_register: bool,
        /// The endpoint's key file (PKCS#8, mode 0600; made on first start).
        #[arg(long)]
        key_file: PathBuf,
        /// Api to register.
        #[arg(long, default_value = "echo1")]
        api: String,
        /// Instance name to register.
        #[arg(long, default_value = "echo1_1")]
        inst: String,
        /// Horde (empty: default).
        #[arg(long, default_value = "")]
        horde: String,
        /// Address to listen on (port 0: any free port); registered as the NetID.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Clients accepted: `anonymous` (no client key asked), `any` (any client proving a
        /// key), or comma-separated 64-hex-digit keys.
        #[arg(long, default_value = "anonymous")]
        clients: String,
    },
    /// Call the best live instance of an api over TLS pinned to its registered key.
    Call {
        /// The agent's local socket.
        #[arg(long, default_value = "/run/crux/reeve.sock")]
        socket: PathBuf,
        /// An api (the best live instance) or an exact inst.
        #[arg(long, default_value = "echo1")]
        selector: String,
        /// Horde (empty: default).
        #[arg(long, default_value = "")]
        horde: String,
        /// Present this key file's key to servers that ask for one.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// What to say.
        text: String,
    },
}

fn parse_clients(s: &str) -> anyhow::Result<ClientAuth> {
    match s {
        "anonymous" => Ok(ClientAuth::Anonymous),
        "any" => Ok(ClientAuth::AnyKey),
        list => {
            let keys = list
                .split(',')
                .map(|h| {
                    let bytes = (0..h.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(h.get(i..i + 2).unwrap_or("x"), 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .ok()
                        .filter(|b| h.len() == 64 && b.len() == 32);
                    let bytes = bytes.with_context(|| format!("{h:?} is not 64 hex digits"))?;
                    Ok(NodeKey(bytes.try_into().expect("32 bytes")))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(ClientAuth::Keys(keys))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sealed-echo: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sealed-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Serve {
            socket,
            no_register,
            key_file,
            api,
            inst,
            horde,
            listen,
            clients,
        } => {
            let opts = ServeOptions {
                socket: (!no_register).then_some(socket),
                key_file,
                api,
                inst,
                horde,
                listen,
                clients: parse_clients(&clients)?,
            };
            let stop = CancellationToken::new();
            tokio::spawn({
                let stop = stop.clone();
                async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("a SIGTERM handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    stop.cancel();
                }
            });
            sealed_echo::serve(
                opts,
                |addr, key| println!("ready addr={addr} key={}", hex(&key)),
                stop,
            )
            .await
        }
        Cmd::Call {
            socket,
            selector,
            horde,
            key_file,
            text,
        } => {
            let mut dialer = Dialer::new(socket).horde(horde);
            if let Some(path) = key_file {
                let id = NodeIdentity::load_or_create(&path)
                    .with_context(|| format!("client key {}", path.display()))?;
                dialer = dialer.identity(id);
            }
            let (reply, conn) = sealed_echo::call(&dialer, &selector, &text).await?;
            println!("{}", reply.text);
            println!(
                "from {} at {} key={} over {}{}",
                reply.inst,
                conn.instance.addr,
                hex(&conn.key),
                conn.cipher_suite,
                if reply.caller_key.is_empty() {
                    String::new()
                } else {
                    format!(", as caller {}", reply.caller_key)
                }
            );
            Ok(())
        }
    }
}

fn hex(k: &NodeKey) -> String {
    k.0.iter().map(|b| format!("{b:02x}")).collect()
}
