//! The in-process store node of the store's tests: a [`Store`] on 127.0.0.1 with its gRPC
//! server, fast Raft timings, and a stop or restart on the same dir and port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_proto::flock::NodeId;
use crux_store::{Store, StoreConfig};
use crux_transport::Transport;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The default of [`StoreConfig::snapshot_every`].
pub const SNAPSHOT_EVERY: u64 = 1000;

/// The node plane of a test's in-process stores: one transport per node id, each listing every
/// node of the fleet (as the flock would list its live members).
#[derive(Clone, Default)]
pub struct Fleet(Arc<Mutex<Vec<(u64, Transport)>>>);

impl Fleet {
    /// The transport of node `id`: the one it had, or a new one that every node now lists.
    pub fn transport(&self, id: u64) -> Transport {
        let mut all = self.0.lock().unwrap();
        if let Some((_, t)) = all.iter().find(|(i, _)| *i == id) {
            return t.clone();
        }
        let t = Transport::generate().unwrap();
        all.push((id, t.clone()));
        let listed: Vec<_> = all
            .iter()
            .map(|(i, t)| (NodeId(*i), t.public_key()))
            .collect();
        for (_, t) in all.iter() {
            t.set_peers(listed.iter().copied());
        }
        t
    }
}

pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub netid: SocketAddr,
    pub store: Store,
    pub fleet: Fleet,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

pub fn config(
    id: u64,
    dir: PathBuf,
    netid: SocketAddr,
    snapshot_every: u64,
    transport: Transport,
) -> StoreConfig {
    let mut c = StoreConfig::new(dir, id, netid, transport);
    c.local_ip = Some(LOCAL);
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(200), Duration::from_millis(400));
    c.op_timeout = Duration::from_secs(2);
    c.snapshot_every = snapshot_every;
    c
}

impl Node {
    /// Node `id` of `fleet`, serving its store over the fleet's node plane on `listener`.
    pub async fn start(
        fleet: &Fleet,
        id: u64,
        dir: PathBuf,
        listener: TcpListener,
        snapshot_every: u64,
    ) -> Node {
        let netid = listener.local_addr().unwrap();
        let transport = fleet.transport(id);
        let store = Store::open(config(
            id,
            dir.clone(),
            netid,
            snapshot_every,
            transport.clone(),
        ))
        .await
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = store.service();
        let server = tokio::spawn(async move {
            let accepting = CancellationToken::new();
            let _guard = accepting.clone().drop_guard();
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(transport.incoming(listener, accepting), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Node {
            id,
            dir,
            netid,
            store,
            fleet: fleet.clone(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the store and its server (the database is released once openraft's tasks end).
    pub async fn stop(&mut self) {
        self.store.shutdown().await;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            if tokio::time::timeout(Duration::from_secs(3), &mut Box::pin(h))
                .await
                .is_err()
            {
                panic!("server did not stop");
            }
        }
    }

    /// Stops and reopens on the same dir and port.
    pub async fn restart(&mut self, snapshot_every: u64) {
        self.stop().await;
        let listener = rebind(self.netid).await;
        let fleet = self.fleet.clone();
        *self = Node::start(&fleet, self.id, self.dir.clone(), listener, snapshot_every).await;
    }
}

/// A listener on `addr` again, once the stopped server that held it let it go (the node plane's
/// accept task drops its listener as soon as it sees the server stop).
pub async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}
