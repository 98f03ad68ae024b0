//! The in-process store node of the store's tests: a [`Store`] on 127.0.0.1 with its gRPC
//! server, fast Raft timings, and a stop or restart on the same dir and port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crux_steward::server::Admit;
use crux_store::{Store, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// The default of [`StoreConfig::snapshot_every`].
pub const SNAPSHOT_EVERY: u64 = 1000;

pub fn admit_loopback() -> Admit {
    Arc::new(|ip: IpAddr| {
        if ip.is_loopback() {
            vec!["0000000000000001".into()]
        } else {
            Vec::new()
        }
    })
}

pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub netid: SocketAddr,
    pub store: Store,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

pub fn config(id: u64, dir: PathBuf, netid: SocketAddr, snapshot_every: u64) -> StoreConfig {
    let mut c = StoreConfig::new(dir, id, netid);
    c.local_ip = Some(LOCAL);
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(200), Duration::from_millis(400));
    c.op_timeout = Duration::from_secs(2);
    c.snapshot_every = snapshot_every;
    c
}

impl Node {
    pub async fn start(id: u64, dir: PathBuf, listener: TcpListener, snapshot_every: u64) -> Node {
        Node::start_with(id, dir, listener, snapshot_every, admit_loopback()).await
    }

    pub async fn start_with(
        id: u64,
        dir: PathBuf,
        listener: TcpListener,
        snapshot_every: u64,
        admit: Admit,
    ) -> Node {
        let netid = listener.local_addr().unwrap();
        let store = Store::open(config(id, dir.clone(), netid, snapshot_every))
            .await
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = store.service(admit);
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
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
        let listener = TcpListener::bind(self.netid).await.unwrap();
        *self = Node::start(self.id, self.dir.clone(), listener, snapshot_every).await;
    }
}
