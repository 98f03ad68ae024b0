//! What the runner tests share: an in-process reeve behind a real local socket, a reaper that
//! kills every process a test's picket started, and waiting on a condition with a deadline.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crux_picket::{Picket, PicketConfig, UnitSpec, UnitStatus};
use crux_proto::grpc::reeve::v1::{self as pb, reeve_server};
use crux_reeve::{Reeve, ReeveConfig};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Request, Response, Status};

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

/// Kills, when dropped (also when the test fails), every process whose environment names this
/// test's plugin socket directory: everything its pickets started, and their children.
pub struct Reaper {
    marker: Vec<u8>,
}

impl Reaper {
    pub fn new(picket_dir: &Path) -> Reaper {
        Reaper {
            marker: format!(
                "CRUX_PLUGIN_SOCKET_DIR={}",
                picket_dir.join("sock").display()
            )
            .into_bytes(),
        }
    }

    /// The pids whose environment carries the marker.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if env.split(|b| *b == 0).any(|v| v == self.marker.as_slice()) {
                out.push(pid);
            }
        }
        out
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Short timings for tests.
pub fn config(dir: &Path, reeve_socket: &Path) -> PicketConfig {
    let mut c = PicketConfig::new(dir, reeve_socket, "127.0.0.1".parse().unwrap());
    c.grace = Duration::from_millis(500);
    c.handshake_timeout = Duration::from_secs(10);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(80);
    c
}

pub fn galumph() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_galumph"))
}

pub fn spec(key: &str, function: &str, exe: &Path) -> UnitSpec {
    UnitSpec {
        key: key.into(),
        horde: String::new(),
        api: "galumph2".into(),
        inst: "galumph2_3".into(),
        function: function.into(),
        digest: "sha256:0000".into(),
        exe: exe.to_path_buf(),
    }
}

/// An executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Waits until `ok` holds for the units (checked on every change), at most `deadline`; panics
/// with the units if it never does.
pub async fn wait_for(
    p: &Picket,
    what: &str,
    deadline: Duration,
    ok: impl Fn(&[UnitStatus]) -> bool,
) -> Vec<UnitStatus> {
    let mut changed = p.changed();
    let r = tokio::time::timeout(deadline, async {
        loop {
            let u = p.units();
            if ok(&u) {
                return u;
            }
            if changed.changed().await.is_err() {
                return p.units();
            }
        }
    })
    .await;
    match r {
        Ok(u) => u,
        Err(_) => panic!("waited {deadline:?} for {what}; units: {:#?}", p.units()),
    }
}

/// Whether `pid` has exited (no such process, or a zombie).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}

/// The keys and pids in `children.json`.
pub fn recorded(dir: &Path) -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(dir.join("children.json")).unwrap_or_default();
    if text.is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&text).expect("children.json is JSON");
    v["children"]
        .as_array()
        .expect("a children list")
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap().to_string(),
                c["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}
