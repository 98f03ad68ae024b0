//! What the sealed-echo tests share: an in-process reeve behind a real local socket, the
//! example's binary started as a child (killed on drop), and waiting with a deadline.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::reeve::v1::{self as pb, reeve_server};
use crux_reeve::{Reeve, ReeveConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

/// How long any one step may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The reeve API on a Unix socket, answered by an in-process `crux_reeve::Reeve` (the registry
/// calls only: what plugins and `galumph call` use).
pub struct TestReeve {
    pub reeve: Arc<Reeve>,
    pub socket: PathBuf,
    _stop: DropGuard,
}

struct Svc(Arc<Reeve>);

fn no<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the test reeve"))
}

#[tonic::async_trait]
impl reeve_server::Reeve for Svc {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        no()
    }
    async fn members(
        &self,
        _: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersResponse>, Status> {
        no()
    }
    async fn leader(
        &self,
        _: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        no()
    }
    async fn list_keys(
        &self,
        _: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        no()
    }
    async fn install_key(
        &self,
        _: Request<pb::InstallKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        no()
    }
    async fn use_key(
        &self,
        _: Request<pb::UseKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        no()
    }
    async fn remove_key(
        &self,
        _: Request<pb::RemoveKeyRequest>,
    ) -> Result<Response<pb::KeyringResponse>, Status> {
        no()
    }
    async fn revoke(
        &self,
        _: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        no()
    }
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.0.register(req.into_inner()).map(Response::new)
    }
    type HeartbeatStream = crux_reeve::HeartbeatStream;
    async fn heartbeat(
        &self,
        req: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        Ok(self.0.heartbeat(req.into_inner()))
    }
    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.0.deregister(&req.into_inner())?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }
    async fn lookup(
        &self,
        req: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        self.0.lookup(&req.into_inner()).map(Response::new)
    }
    type WatchStream = crux_reeve::WatchStream;
    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.0.watch(req.into_inner()).map(Response::new)
    }
    async fn services(
        &self,
        req: Request<pb::ServicesRequest>,
    ) -> Result<Response<pb::ServicesResponse>, Status> {
        Ok(Response::new(self.0.services(&req.into_inner())))
    }
    async fn muster_add(
        &self,
        _: Request<pb::MusterAddRequest>,
    ) -> Result<Response<pb::MusterAddResponse>, Status> {
        no()
    }
    async fn muster_search(
        &self,
        _: Request<pb::MusterSearchRequest>,
    ) -> Result<Response<pb::MusterSearchResponse>, Status> {
        no()
    }
    async fn muster_remove(
        &self,
        _: Request<pb::MusterRemoveRequest>,
    ) -> Result<Response<pb::MusterRemoveResponse>, Status> {
        no()
    }
    async fn doc_get(
        &self,
        _: Request<pb::DocGetRequest>,
    ) -> Result<Response<pb::DocGetResponse>, Status> {
        no()
    }
    async fn doc_put(
        &self,
        _: Request<pb::DocPutRequest>,
    ) -> Result<Response<pb::DocPutResponse>, Status> {
        no()
    }
    type DocWatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::DocEvent, Status>> + Send + 'static>,
    >;
    async fn doc_watch(
        &self,
        _: Request<pb::DocWatchRequest>,
    ) -> Result<Response<Self::DocWatchStream>, Status> {
        no()
    }
    async fn store_status(
        &self,
        _: Request<pb::StoreStatusRequest>,
    ) -> Result<Response<pb::StoreStatusResponse>, Status> {
        no()
    }
    type MonitorStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::LogLine, Status>> + Send + 'static>,
    >;
    async fn monitor(
        &self,
        _: Request<pb::MonitorRequest>,
    ) -> Result<Response<Self::MonitorStream>, Status> {
        no()
    }
    async fn set_log_level(
        &self,
        _: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelResponse>, Status> {
        no()
    }
    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        no()
    }
    async fn debug_info(
        &self,
        _: Request<pb::DebugInfoRequest>,
    ) -> Result<Response<pb::DebugInfoResponse>, Status> {
        no()
    }
}

/// A reeve serving on `<dir>/reeve.sock`.
pub async fn reeve(dir: &Path) -> TestReeve {
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let reeve = Reeve::new(
        ReeveConfig {
            node: "00000000000000a1".into(),
            boot: 1,
            local_ip: None,
            transport: crux_transport::Transport::generate().unwrap(),
            heartbeat_interval: Duration::from_millis(200),
            grace: Duration::from_secs(60),
            netid: "127.0.0.1:7701".into(),
        },
        rx,
    );
    let socket = dir.join("reeve.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind the reeve socket");
    let stop = CancellationToken::new();
    let svc = reeve_server::ReeveServer::new(Svc(reeve.clone()));
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                s.cancelled_owned(),
            )
            .await;
    });
    TestReeve {
        reeve,
        socket,
        _stop: stop.drop_guard(),
    }
}

impl TestReeve {
    /// The live instances of `selector`.
    pub fn live(&self, selector: &str) -> Vec<crux_proto::grpc::steward::v1::Instance> {
        self.reeve
            .lookup(&pb::LookupRequest {
                selector: selector.into(),
                horde: String::new(),
                live_only: true,
            })
            .expect("lookup")
            .instances
    }
}

/// The example's binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sealed-echo"))
}

/// A running `sealed-echo serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    /// Where it listens.
    pub addr: String,
    /// Its key, 64 hex digits.
    pub key: String,
}

/// Starts `sealed-echo serve` with `args` and waits (up to [`DEADLINE`]) for its `ready` line.
pub async fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start sealed-echo serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .expect("sealed-echo serve printed no ready line in time")
        .unwrap()
        .expect("sealed-echo serve exited before it was ready");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_string()
    };
    let (addr, key) = (field("addr="), field("key="));
    // Keep reading (and dropping) its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Server { child, addr, key }
}

/// What `sealed-echo call` printed, and whether it succeeded.
pub struct Called {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `sealed-echo call` with `args` to its end (at most [`DEADLINE`]; killed past it).
pub async fn call(args: &[&str]) -> Called {
    let child = Command::new(bin())
        .arg("call")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start sealed-echo call");
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("sealed-echo call did not finish in time")
        .unwrap();
    Called {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// 64 hex digits.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TestReeve {
    /// Registers a running, healthy instance directly (as a service on this node would),
    /// valid for 10 minutes: the tests forge entries with it.
    pub fn register(&self, api: &str, inst: &str, addr: &str, public_key: Vec<u8>) {
        self.reeve
            .register(pb::RegisterRequest {
                api: api.into(),
                inst: inst.into(),
                addr: addr.into(),
                public_key,
                state: crux_proto::grpc::steward::v1::RunState::Running as i32,
                health: crux_proto::grpc::steward::v1::Health::Healthy as i32,
                valid_for_ms: 600_000,
                ..Default::default()
            })
            .expect("register");
    }
}
