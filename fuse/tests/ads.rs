//! The ADS server's protocol rules on a loopback port, with envoy-types' own client: versions,
//! nonces, ACK, NACK (the rejected version is not sent again, the next one is), stale nonces,
//! a silent proxy, and the delta variant (wildcard, removals, NACK).

use std::sync::Arc;
use std::time::Duration;

use crux_fuse::ads::{Ads, AdsConfig, Board};
use crux_fuse::route::{parse_target, RouteSpec};
use crux_fuse::snapshot::{build, Kind, Snapshot};
use crux_proto::grpc::steward::v1::{Health, Instance, RunState};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

fn inst(i: &str, port: u16) -> Instance {
    Instance {
        api: "echo".into(),
        inst: i.into(),
        addr: format!("127.0.0.1:{port}"),
        horde: "default".into(),
        state: RunState::Running as i32,
        health: Health::Healthy as i32,
        ..Default::default()
    }
}

fn snap(names: &[&str], insts: &[Instance]) -> Arc<Snapshot> {
    let routes: Vec<(String, RouteSpec)> = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                RouteSpec {
                    prefix: format!("/{n}/"),
                    host: None,
                    to: vec![parse_target("echo", 1).unwrap()],
                    timeout_ms: 0,
                    retries: 0,
                },
            )
        })
        .collect();
    Arc::new(build("default", &routes, insts))
}

struct Server {
    tx: watch::Sender<Arc<Snapshot>>,
    board: Arc<Board>,
    client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    stop: CancellationToken,
}

async fn server(first: Arc<Snapshot>) -> Server {
    let (tx, rx) = watch::channel(first);
    let board = Arc::new(Board::default());
    let stop = CancellationToken::new();
    let ads = Ads::new(rx, board.clone(), AdsConfig::default(), stop.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ads.server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                s.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    let client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Server {
        tx,
        board,
        client,
        stop,
    }
}

fn req(kind: Kind, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "test-proxy".into(),
            ..Default::default()
        }),
        type_url: kind.url().into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a response within 5 s")
        .expect("stream ok")
        .expect("stream open")
}

async fn nothing<T: std::fmt::Debug>(s: &mut Streaming<T>, wait: Duration) {
    if let Ok(m) = tokio::time::timeout(wait, s.message()).await {
        panic!("expected no response, got {m:?}");
    }
}

async fn sotw(
    srv: &mut Server,
    first: DiscoveryRequest,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let s = srv
        .client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, s)
}

/// xDS protocol, "ACK/NACK and resource type instance version": a NACK keeps the proxy on its
/// last good version and the server does not send the rejected one again; the next change is
/// sent; a stale nonce is ignored; a silent proxy gets nothing more.
#[tokio::test]
async fn sotw_versions_nonces_ack_and_nack() {
    let one = [inst("echo_1", 5001)];
    let two = [inst("echo_1", 5001), inst("echo_2", 5002)];
    let mut srv = server(snap(&["a"], &one)).await;
    let (tx, mut s) = sotw(&mut srv, req(Kind::Listener, &[], "", "")).await;
    let r1 = next(&mut s).await;
    assert_eq!(r1.resources.len(), 1, "wildcard LDS: every listener");
    assert_eq!(r1.type_url, Kind::Listener.url());
    tx.send(req(Kind::Listener, &[], &r1.version_info, &r1.nonce))
        .await
        .unwrap();
    // EDS for one cluster.
    tx.send(req(Kind::Endpoint, &["echo"], "", ""))
        .await
        .unwrap();
    let e1 = next(&mut s).await;
    assert_eq!(e1.type_url, Kind::Endpoint.url());
    // NACK it: nothing is resent while the snapshot stays.
    let mut nack = req(Kind::Endpoint, &["echo"], "", &e1.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "bad endpoint".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    nothing(&mut s, Duration::from_millis(300)).await;
    let p = srv.board.proxies();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].node_id, "test-proxy");
    let eds = &p[0].types[&Kind::Endpoint];
    assert_eq!((eds.nacks, eds.last_error.as_str()), (1, "bad endpoint"));
    assert_eq!(eds.acked, "", "the rejected version was never acknowledged");
    // A change is sent; LDS is unchanged and not resent.
    srv.tx.send(snap(&["a"], &two)).unwrap();
    let e2 = next(&mut s).await;
    assert_eq!(e2.type_url, Kind::Endpoint.url());
    assert_ne!(e2.version_info, e1.version_info);
    assert_ne!(e2.nonce, e1.nonce);
    // A stale nonce (e1's) is ignored; the right one is an ACK.
    tx.send(req(Kind::Endpoint, &["echo"], &e1.version_info, &e1.nonce))
        .await
        .unwrap();
    tx.send(req(Kind::Endpoint, &["echo"], &e2.version_info, &e2.nonce))
        .await
        .unwrap();
    nothing(&mut s, Duration::from_millis(300)).await;
    let eds = srv.board.proxies()[0].types[&Kind::Endpoint].clone();
    assert_eq!(eds.acked, e2.version_info);
    assert!(eds.waiting_since.is_none());
    // A new listener: LDS sent again (the proxy ACKed r1, so a request waits).
    srv.tx.send(snap(&["a", "b"], &two)).unwrap();
    let r2 = next(&mut s).await;
    assert_eq!(r2.type_url, Kind::Listener.url());
    assert_eq!(r2.resources.len(), 2);
    // Silent from here: the next change is not sent (one response waits for its ACK).
    srv.tx.send(snap(&["a", "b", "c"], &two)).unwrap();
    nothing(&mut s, Duration::from_millis(300)).await;
    assert!(srv.board.proxies()[0].types[&Kind::Listener]
        .waiting_since
        .is_some());
    drop(tx);
    srv.stop.cancel();
}

fn dreq(kind: Kind, sub: &[&str], nonce: &str, error: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "delta-proxy".into(),
            ..Default::default()
        }),
        type_url: kind.url().into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        error_detail: error.map(|m| RpcStatus {
            code: 3,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// Incremental xDS: wildcard CDS gets every cluster, then only what changed, and removals by
/// name; a NACKed resource version is not sent again.
#[tokio::test]
async fn delta_sends_changes_and_removals_only() {
    let one = [inst("echo_1", 5001)];
    let mut srv = server(snap(&["a"], &one)).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(dreq(Kind::Listener, &[], "", None)).await.unwrap();
    let mut s: Streaming<DeltaDiscoveryResponse> = srv
        .client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut s).await;
    let names: Vec<_> = r1.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, ["a"]);
    tx.send(dreq(Kind::Listener, &[], &r1.nonce, None))
        .await
        .unwrap();
    // b added: only b is sent.
    srv.tx.send(snap(&["a", "b"], &one)).unwrap();
    let r2 = next(&mut s).await;
    let names: Vec<_> = r2.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(names, ["b"]);
    assert!(r2.removed_resources.is_empty());
    tx.send(dreq(Kind::Listener, &[], &r2.nonce, None))
        .await
        .unwrap();
    // a removed: said by name.
    srv.tx.send(snap(&["b"], &one)).unwrap();
    let r3 = next(&mut s).await;
    assert!(r3.resources.is_empty());
    assert_eq!(r3.removed_resources, ["a"]);
    // c added and rejected: not sent again; the proxy's error is kept.
    tx.send(dreq(Kind::Listener, &[], &r3.nonce, None))
        .await
        .unwrap();
    srv.tx.send(snap(&["b", "c"], &one)).unwrap();
    let r4 = next(&mut s).await;
    assert_eq!(r4.resources[0].name, "c");
    tx.send(dreq(Kind::Listener, &[], &r4.nonce, Some("no c")))
        .await
        .unwrap();
    nothing(&mut s, Duration::from_millis(300)).await;
    let l = srv.board.proxies()[0].types[&Kind::Listener].clone();
    assert_eq!((l.nacks, l.last_error.as_str()), (1, "no c"));
    assert!(srv.board.proxies()[0].delta);
    srv.stop.cancel();
}
