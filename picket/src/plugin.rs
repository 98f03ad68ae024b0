//! The plugin side of picket's handshake, for plugin authors.
//!
//! Picket starts a plugin with its environment set ([`PluginEnv::from_env`] reads it). The plugin
//! calls [`serve`], which
//!
//! 1. binds a Unix socket in `CRUX_PLUGIN_SOCKET_DIR`,
//! 2. serves `grpc.health.v1.Health` (service `""` SERVING) and `crux.plugin.v1.Plugin` there
//!    (`Shutdown` only with the token picket gave, in the metadata `crux-plugin-token`),
//! 3. prints the handshake line `1|<version>|unix|<socket>|grpc` to stdout and flushes it,
//!
//! and returns a [`ShutdownSignal`]: a future that resolves when picket calls `Shutdown` or the
//! process gets SIGTERM (or SIGINT). The plugin then drains, deregisters, and exits.
//!
//! After the handshake a plugin should write its logs to stderr, never stdout: stdout is a pipe
//! to the agent that started it, and that agent may be gone.
//!
//! ```no_run
//! # async fn plugin() -> anyhow::Result<()> {
//! let env = crux_picket::plugin::PluginEnv::from_env()?;
//! // ... serve the plugin's own API on (env.node_ip, 0) and register it with the reeve ...
//! let shutdown = crux_picket::plugin::serve(&env, "2.3").await?;
//! let why = shutdown.await;
//! // ... deregister, drain, exit 0 ...
//! # let _ = why; Ok(()) }
//! ```

use std::future::Future;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crux_proto::grpc::plugin::v1::{self as ppb, plugin_server};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use crate::{PROTOCOL_VERSION, TOKEN_METADATA};

/// `CRUX_PLUGIN_PROTOCOL`: the handshake protocol version (`1`).
pub const ENV_PROTOCOL: &str = "CRUX_PLUGIN_PROTOCOL";
/// `CRUX_PLUGIN_TOKEN`: the one-time token (128 bits, hex), new per start.
pub const ENV_TOKEN: &str = "CRUX_PLUGIN_TOKEN";
/// `CRUX_REEVE_SOCKET`: the agent's local socket (empty: no registry to register with).
pub const ENV_REEVE_SOCKET: &str = "CRUX_REEVE_SOCKET";
/// `CRUX_PLUGIN_SOCKET_DIR`: where the plugin binds its control socket.
pub const ENV_SOCKET_DIR: &str = "CRUX_PLUGIN_SOCKET_DIR";
/// `CRUX_NODE_IP`: the node's IP; the plugin serves its own API on it (port 0).
pub const ENV_NODE_IP: &str = "CRUX_NODE_IP";
/// `CRUX_FUNCTION`: the muster entry's function name (which entry of the executable to run).
pub const ENV_FUNCTION: &str = "CRUX_FUNCTION";
/// `CRUX_HORDE`: the horde.
pub const ENV_HORDE: &str = "CRUX_HORDE";
/// `CRUX_API`: the API to register.
pub const ENV_API: &str = "CRUX_API";
/// `CRUX_INST`: the instance to register.
pub const ENV_INST: &str = "CRUX_INST";

/// Why a plugin's environment is not usable. Nothing has changed when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// `CRUX_PLUGIN_PROTOCOL` is unset: the process was not started by picket.
    #[error("not started by picket: {ENV_PROTOCOL} is not set (a plugin is started by the crux agent, which sets CRUX_PLUGIN_* and CRUX_* variables)")]
    NotStartedByPicket,
    /// Picket speaks another protocol version.
    #[error("picket speaks plugin protocol {0:?}, this plugin speaks {PROTOCOL_VERSION:?}")]
    Protocol(String),
    /// A variable picket always sets is missing.
    #[error("{0} is not set (picket always sets it)")]
    Missing(&'static str),
    /// A variable's value is not usable.
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// What picket tells a plugin through its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginEnv {
    /// The one-time token (hex) picket's control calls carry.
    pub token: String,
    /// The agent's local socket, for registering with the reeve (empty: none).
    pub reeve_socket: PathBuf,
    /// Where to bind the control socket.
    pub socket_dir: PathBuf,
    /// The node's IP.
    pub node_ip: IpAddr,
    /// The function to run (the muster entry's function name).
    pub function: String,
    /// The horde.
    pub horde: String,
    /// The API to register.
    pub api: String,
    /// The instance to register.
    pub inst: String,
}

impl PluginEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<PluginEnv, EnvError> {
        PluginEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the variables `get` returns (the environment, or a test's map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<PluginEnv, EnvError> {
        let protocol = get(ENV_PROTOCOL).ok_or(EnvError::NotStartedByPicket)?;
        if protocol != PROTOCOL_VERSION {
            return Err(EnvError::Protocol(protocol));
        }
        let need = |var: &'static str| get(var).ok_or(EnvError::Missing(var));
        let nonempty = |var: &'static str| {
            let v = need(var)?;
            if v.is_empty() {
                return Err(EnvError::Invalid {
                    var,
                    value: v,
                    reason: "must not be empty",
                });
            }
            Ok(v)
        };
        let token = nonempty(ENV_TOKEN)?;
        if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(EnvError::Invalid {
                var: ENV_TOKEN,
                value: token,
                reason: "must be at least 16 hex digits",
            });
        }
        let node_ip = nonempty(ENV_NODE_IP)?;
        let node_ip = node_ip.parse().map_err(|_| EnvError::Invalid {
            var: ENV_NODE_IP,
            value: node_ip.clone(),
            reason: "not an IP address",
        })?;
        let socket_dir = PathBuf::from(nonempty(ENV_SOCKET_DIR)?);
        if !socket_dir.is_absolute() {
            return Err(EnvError::Invalid {
                var: ENV_SOCKET_DIR,
                value: socket_dir.display().to_string(),
                reason: "must be an absolute path",
            });
        }
        Ok(PluginEnv {
            token,
            reeve_socket: PathBuf::from(need(ENV_REEVE_SOCKET)?),
            socket_dir,
            node_ip,
            function: nonempty(ENV_FUNCTION)?,
            horde: need(ENV_HORDE)?,
            api: nonempty(ENV_API)?,
            inst: nonempty(ENV_INST)?,
        })
    }
}

/// Why a plugin is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownReason {
    /// Picket called `Shutdown`: exit within `grace`.
    Rpc {
        /// How long picket waits before it sends SIGTERM.
        grace: Duration,
    },
    /// SIGTERM arrived.
    Terminate,
    /// SIGINT arrived.
    Interrupt,
}

/// Resolves when the plugin is asked to stop. The control server keeps answering until the
/// process exits; dropping the signal removes the control socket's file.
pub struct ShutdownSignal {
    socket: PathBuf,
    wait: Pin<Box<dyn Future<Output = ShutdownReason> + Send>>,
}

impl std::fmt::Debug for ShutdownSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownSignal")
            .field("socket", &self.socket)
            .finish()
    }
}

impl ShutdownSignal {
    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Future for ShutdownSignal {
    type Output = ShutdownReason;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ShutdownReason> {
        self.wait.as_mut().poll(cx)
    }
}

impl Drop for ShutdownSignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

struct Control {
    token: String,
    stop: watch::Sender<Option<ShutdownReason>>,
}

#[tonic::async_trait]
impl plugin_server::Plugin for Control {
    async fn shutdown(
        &self,
        req: Request<ppb::ShutdownRequest>,
    ) -> Result<Response<ppb::ShutdownResponse>, Status> {
        let given = req
            .metadata()
            .get(TOKEN_METADATA)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !same(given.as_bytes(), self.token.as_bytes()) {
            return Err(Status::permission_denied(format!(
                "Shutdown needs picket's token in the {TOKEN_METADATA} metadata"
            )));
        }
        let grace = Duration::from_millis(u64::from(req.get_ref().grace_ms));
        info!(grace_ms = grace.as_millis() as u64, "shutdown requested");
        self.stop.send_replace(Some(ShutdownReason::Rpc { grace }));
        Ok(Response::new(ppb::ShutdownResponse {}))
    }
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The handshake line for `version` on `socket`.
pub fn handshake_line(version: &str, socket: &Path) -> String {
    format!(
        "{PROTOCOL_VERSION}|{version}|unix|{}|grpc",
        socket.display()
    )
}

/// Binds the control socket in `env.socket_dir`, serves `grpc.health.v1` (SERVING) and
/// `crux.plugin.v1.Plugin` there, prints the handshake line to stdout and flushes it, and returns
/// the signal that resolves when `Shutdown` is called or SIGTERM/SIGINT arrives.
pub async fn serve(env: &PluginEnv, version: &str) -> anyhow::Result<ShutdownSignal> {
    if version.is_empty()
        || version
            .chars()
            .any(|c| c == '|' || c.is_control() || c.is_whitespace())
    {
        anyhow::bail!("plugin version {version:?} must be non-empty, without '|' or whitespace");
    }
    std::fs::create_dir_all(&env.socket_dir).map_err(|e| {
        anyhow::anyhow!(
            "creating the plugin socket directory {}: {e}",
            env.socket_dir.display()
        )
    })?;
    let socket = env.socket_dir.join(format!(
        "{}-{}.sock",
        std::process::id(),
        &env.token[..8.min(env.token.len())]
    ));
    match std::fs::remove_file(&socket) {
        Ok(()) => debug!(socket = %socket.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("removing the stale socket {}: {e}", socket.display()),
    }
    let listener = UnixListener::bind(&socket)
        .map_err(|e| anyhow::anyhow!("binding the control socket {}: {e}", socket.display()))?;
    // Signals are caught from now on, so a SIGTERM right after the handshake is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let (_reporter, health) = tonic_health::server::health_reporter();
    let control = plugin_server::PluginServer::new(Control {
        token: env.token.clone(),
        stop: stop_tx,
    });
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(control)
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "the plugin control server stopped");
        }
    });
    let line = handshake_line(version, &socket);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    debug!(%line, "handshake sent");
    let wait = Box::pin(async move {
        tokio::select! {
            r = stop_rx.wait_for(|r| r.is_some()) => match r {
                Ok(r) => r.unwrap_or(ShutdownReason::Terminate),
                Err(_) => ShutdownReason::Terminate,
            },
            _ = term.recv() => ShutdownReason::Terminate,
            _ = int.recv() => ShutdownReason::Interrupt,
        }
    });
    Ok(ShutdownSignal { socket, wait })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars() -> HashMap<&'static str, String> {
        HashMap::from([
            (ENV_PROTOCOL, "1".to_string()),
            (ENV_TOKEN, "0123456789abcdef0123456789abcdef".to_string()),
            (ENV_REEVE_SOCKET, "/run/crux/reeve.sock".to_string()),
            (ENV_SOCKET_DIR, "/var/lib/crux/picket/sock".to_string()),
            (ENV_NODE_IP, "127.0.0.1".to_string()),
            (ENV_FUNCTION, "galumph2_3".to_string()),
            (ENV_HORDE, "default".to_string()),
            (ENV_API, "galumph2".to_string()),
            (ENV_INST, "galumph2_3".to_string()),
        ])
    }

    fn read(v: &HashMap<&'static str, String>) -> Result<PluginEnv, EnvError> {
        PluginEnv::from_vars(|k| v.get(k).cloned())
    }

    #[test]
    fn the_environment_picket_sets_is_read() {
        let e = read(&vars()).unwrap();
        assert_eq!(e.inst, "galumph2_3");
        assert_eq!(e.node_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.reeve_socket, PathBuf::from("/run/crux/reeve.sock"));
    }

    #[test]
    fn a_process_not_started_by_picket_is_told_so() {
        let mut v = vars();
        v.remove(ENV_PROTOCOL);
        assert_eq!(read(&v), Err(EnvError::NotStartedByPicket));
        let msg = EnvError::NotStartedByPicket.to_string();
        assert!(msg.contains("not started by picket"), "{msg}");
        let mut v = vars();
        v.insert(ENV_PROTOCOL, "2".into());
        assert_eq!(read(&v), Err(EnvError::Protocol("2".into())));
        let mut v = vars();
        v.remove(ENV_API);
        assert_eq!(read(&v), Err(EnvError::Missing(ENV_API)));
        let mut v = vars();
        v.insert(ENV_NODE_IP, "node1".into());
        assert!(matches!(
            read(&v),
            Err(EnvError::Invalid {
                var: ENV_NODE_IP,
                ..
            })
        ));
        let mut v = vars();
        v.insert(ENV_TOKEN, "xyz".into());
        assert!(matches!(
            read(&v),
            Err(EnvError::Invalid { var: ENV_TOKEN, .. })
        ));
        let mut v = vars();
        v.insert(ENV_REEVE_SOCKET, String::new());
        assert_eq!(read(&v).unwrap().reeve_socket, PathBuf::new());
    }

    #[test]
    fn the_handshake_line_has_five_fields() {
        assert_eq!(
            handshake_line("2.3", Path::new("/s/1.sock")),
            "1|2.3|unix|/s/1.sock|grpc"
        );
    }
}
