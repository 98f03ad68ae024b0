//! sealed-echo: one service calls another over TLS 1.3 pinned to the public key the other
//! registered with its agent (`crux_reeve::endpoint`).
//!
//! * [`serve`]: make or load the endpoint identity (a key file, mode 0600), bind, register api
//!   and inst with the agent *with the public key*, and serve `sealed_echo.v1.Echo` over TLS
//!   with that key.
//! * [`call`]: look the api up through the agent's socket, connect to the best live instance,
//!   accept its server only if it proves the registered key, and call `Say`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use crux_proto::flock::NodeKey;
use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::{Health, RunState};
use crux_reeve::endpoint::{self, ClientAuth, Connection, Dialer, ServiceEndpoint};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The generated Echo service.
pub mod pb {
    #![allow(missing_docs)]
    tonic::include_proto!("sealed_echo.v1");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};

/// Longest text `Say` takes.
pub const TEXT_MAX: usize = 64 << 10;

/// The Echo service of one instance.
#[derive(Debug)]
pub struct Service {
    inst: String,
}

#[tonic::async_trait]
impl Echo for Service {
    async fn say(&self, req: Request<pb::SayRequest>) -> Result<Response<pb::SayReply>, Status> {
        // Who called, as the TLS handshake proved it (a key when the server asks for one).
        let caller_key = endpoint::peer(&req)
            .and_then(|p| p.key)
            .map(|k| k.to_string())
            .unwrap_or_default();
        let text = req.into_inner().text;
        if text.len() > TEXT_MAX {
            return Err(Status::invalid_argument("text is longer than 64 KiB"));
        }
        Ok(Response::new(pb::SayReply {
            text,
            inst: self.inst.clone(),
            caller_key,
        }))
    }
}

/// What [`serve`] serves and registers.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The agent's socket; None: serve without registering.
    pub socket: Option<PathBuf>,
    /// The endpoint's key file (made on first start).
    pub key_file: PathBuf,
    /// Api and instance name to register.
    pub api: String,
    /// Instance name.
    pub inst: String,
    /// Horde ("" for the default).
    pub horde: String,
    /// Where to listen (port 0: any free one); registered as the instance's NetID.
    pub listen: SocketAddr,
    /// Which clients to accept.
    pub clients: ClientAuth,
}

/// Serves Echo as `opts` says until `shutdown`; calls `ready` with the bound address and the
/// endpoint's public key once it is registered (when a socket is given) and accepting.
pub async fn serve(
    opts: ServeOptions,
    ready: impl FnOnce(SocketAddr, NodeKey),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let endpoint = ServiceEndpoint::load_or_create(&opts.key_file, opts.clients.clone())
        .with_context(|| format!("endpoint identity {}", opts.key_file.display()))?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("binding {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let registration = match &opts.socket {
        Some(socket) => Some(
            endpoint
                .register(
                    socket.clone(),
                    rpb::RegisterRequest {
                        api: opts.api.clone(),
                        inst: opts.inst.clone(),
                        addr: addr.to_string(),
                        horde: opts.horde.clone(),
                        state: RunState::Running as i32,
                        health: Health::Healthy as i32,
                        ..Default::default()
                    },
                )
                .await
                .with_context(|| format!("registering {} with the agent", opts.inst))?,
        ),
        None => None,
    };
    let incoming = endpoint.incoming(listener, shutdown.clone());
    ready(addr, endpoint.public_key());
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(Service {
            inst: opts.inst.clone(),
        }))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .context("serving Echo")?;
    if let Some(r) = registration {
        r.deregister().await.context("deregistering")?;
    }
    Ok(())
}

/// Finds the best live instance of `selector` through `dialer`'s agent, connects to it over
/// TLS pinned to its registered key, and says `text`. Returns the reply and where it came from.
pub async fn call(
    dialer: &Dialer,
    selector: &str,
    text: &str,
) -> Result<(pb::SayReply, Connection), anyhow::Error> {
    let sealed = dialer.channel(selector).await?;
    let reply = EchoClient::new(sealed.channel())
        .say(pb::SayRequest { text: text.into() })
        .await
        .context("Say")?
        .into_inner();
    Ok((reply, sealed.connection()))
}
