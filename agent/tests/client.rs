//! The client library (`crux_reeve::client`) against a real agent: a service registers and keeps
//! heartbeating with `Registration`, and `connect(selector, rescan)` gives a channel that moves to
//! the best live instance as the registry changes (the seed's `ConnectGalumph`).

use std::net::SocketAddr;
use std::time::Duration;

use crux_proto::grpc::reeve::v1::RegisterRequest;
use crux_proto::grpc::steward::v1::{
    self as spb, steward_client::StewardClient, steward_server, Health, RunState,
};
use crux_reeve::client::{connect, Registration};
use crux_tests::cluster::Cluster;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const WAIT: Duration = Duration::from_secs(20);

/// A stand-in service: answers `Table` with its own number as the revision, so a caller can tell
/// which instance answered.
struct Numbered(u64);

#[tonic::async_trait]
impl steward_server::Steward for Numbered {
    type LinkStream = tokio_stream::Empty<Result<spb::StewardUpdate, Status>>;

    async fn link(
        &self,
        _: Request<tonic::Streaming<spb::ReeveBatch>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        Err(Status::unimplemented("not a steward"))
    }

    async fn holders(
        &self,
        _: Request<spb::HoldersRequest>,
    ) -> Result<Response<spb::HoldersResponse>, Status> {
        Err(Status::unimplemented("not a steward"))
    }

    async fn table(
        &self,
        _: Request<spb::TableRequest>,
    ) -> Result<Response<spb::TableResponse>, Status> {
        Ok(Response::new(spb::TableResponse {
            revision: self.0,
            ..Default::default()
        }))
    }
}

async fn serve_numbered(ip: std::net::IpAddr, n: u64) -> SocketAddr {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .expect("bind");
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(steward_server::StewardServer::new(Numbered(n)))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    addr
}

fn req(inst: &str, addr: SocketAddr) -> RegisterRequest {
    RegisterRequest {
        api: "galumph2".into(),
        inst: inst.into(),
        addr: addr.to_string(),
        state: RunState::Running as i32,
        health: Health::Healthy as i32,
        ..Default::default()
    }
}

/// Which instance answers a call on the followed channel, retried until `want` or the deadline.
async fn answers(ch: &tonic::transport::Channel, want: u64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let mut c = StewardClient::new(ch.clone());
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            c.table(spb::TableRequest::default()),
        )
        .await;
        match r {
            Ok(Ok(r)) if r.get_ref().revision == want => return Ok(()),
            Ok(Ok(r)) => last = format!("answered by {}", r.get_ref().revision),
            Ok(Err(s)) => last = format!("{s}"),
            Err(_) => last = "no answer in 2 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("instance {want} never answered; last: {last}"))
}

#[test]
fn connect_follows_the_best_live_instance() {
    let mut c = Cluster::new(BIN, 1, 1, "local");
    c.append_config(
        1,
        "[registry]\nheartbeat_interval = \"200ms\"\ngrace = \"2s\"\n",
    );
    c.start_all();
    c.stable_agreement(&[1], Duration::from_millis(500), WAIT);
    let socket = c.agent(1).socket.clone();
    let ip = c.agent(1).addr.ip();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let a9 = serve_numbered(ip, 9).await;
        let a10 = serve_numbered(ip, 10).await;
        let nine = Registration::start(&socket, req("galumph2_9", a9))
            .await
            .expect("register galumph2_9");
        let follow = connect(&socket, "galumph2", "", Duration::from_millis(500))
            .await
            .expect("connect");
        let ch = follow.channel();
        answers(&ch, 9).await.expect("galumph2_9 answers first");

        // A better instance appears: new calls go to it.
        let ten = Registration::start(&socket, req("galumph2_10", a10))
            .await
            .expect("register galumph2_10");
        answers(&ch, 10).await.expect("moved to galumph2_10");
        let ack = ten.acks().borrow().clone();
        let ack = match ack {
            Some(a) => a,
            None => {
                let mut acks = ten.acks();
                tokio::time::timeout(WAIT, acks.changed())
                    .await
                    .expect("an ack")
                    .expect("acks");
                let a = acks.borrow().clone();
                a.expect("ack")
            }
        };
        assert!(!ack.leader.is_empty(), "acks name the leader: {ack:?}");

        // It turns unhealthy: back to galumph2_9.
        ten.report(RunState::Running, Health::Unhealthy);
        answers(&ch, 9).await.expect("back to galumph2_9");
        // Healthy again, then deregistered.
        ten.report(RunState::Running, Health::Healthy);
        answers(&ch, 10).await.expect("galumph2_10 again");
        ten.deregister().await.expect("deregister");
        answers(&ch, 9)
            .await
            .expect("galumph2_9 after the deregistration");
        assert_eq!(
            follow.current().borrow().as_ref().map(|i| i.inst.clone()),
            Some("galumph2_9".to_string())
        );
        drop(nine);
    });
}
