//! The library services use to join the registry through their node's agent (its Unix socket):
//!
//! * [`Registration`]: registers an instance and keeps its heartbeat stream going; registers
//!   again if the agent restarts or forgets it.
//! * [`connect`]: the seed's `ConnectGalumph(selector, t)`: a tonic [`Channel`] to the best live
//!   instance a selector picks, which moves to a better instance when one appears.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crux_proto::grpc::reeve::v1::{self as rpb, reeve_client::ReeveClient};
use crux_proto::grpc::steward::v1::{Health, Instance, RunState};
use crux_steward::select::{best_first, is_live};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{debug, warn};

/// What can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot reach the agent at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The agent refused a call.
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
}

/// A channel to the agent's local socket.
pub async fn socket_channel(path: &Path, timeout: Duration) -> Result<Channel, ClientError> {
    let owned = path.to_path_buf();
    Endpoint::from_static("http://crux.local")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })
}

/// A reeve client on the agent's local socket.
pub async fn reeve_client(path: &Path) -> Result<ReeveClient<Channel>, ClientError> {
    Ok(ReeveClient::new(
        socket_channel(path, Duration::from_secs(5)).await?,
    ))
}

/// State and health a service reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// Running state.
    pub state: RunState,
    /// Health.
    pub health: Health,
}

/// A registered instance whose heartbeats a background task keeps sending.
#[derive(Debug)]
pub struct Registration {
    socket: PathBuf,
    report: watch::Sender<Report>,
    id: watch::Receiver<Option<(String, Vec<u8>)>>,
    acks: watch::Receiver<Option<rpb::HeartbeatAck>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    interval: Duration,
}

impl Registration {
    /// Registers `req` with the agent at `socket` and keeps it alive with heartbeats at the
    /// interval the agent asks for. Fails if the first registration fails; after that, the task
    /// registers again whenever the agent has lost the instance (a restarted agent).
    pub async fn start(
        socket: impl Into<PathBuf>,
        req: rpb::RegisterRequest,
    ) -> Result<Registration, ClientError> {
        let socket = socket.into();
        let mut client = reeve_client(&socket).await?;
        let first = client.register(req.clone()).await?.into_inner();
        let report = Report {
            state: RunState::try_from(req.state)
                .ok()
                .filter(|s| *s != RunState::Unspecified)
                .unwrap_or(RunState::Starting),
            health: Health::try_from(req.health)
                .ok()
                .filter(|h| *h != Health::Unspecified)
                .unwrap_or(Health::Healthy),
        };
        let (report_tx, report_rx) = watch::channel(report);
        let (id_tx, id_rx) = watch::channel(Some((first.id.clone(), first.token.clone())));
        let (ack_tx, ack_rx) = watch::channel(None);
        let interval = Duration::from_millis(first.heartbeat_interval_ms.max(10));
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            socket.clone(),
            req,
            first,
            report_rx,
            id_tx,
            ack_tx,
            stop.clone(),
        ));
        Ok(Registration {
            socket,
            report: report_tx,
            id: id_rx,
            acks: ack_rx,
            stop,
            task: Some(task),
            interval,
        })
    }

    /// The heartbeat interval the agent asked for.
    pub fn heartbeat_interval(&self) -> Duration {
        self.interval
    }

    /// The instance id (a new one after a re-registration).
    pub fn id(&self) -> Option<String> {
        self.id.borrow().as_ref().map(|(id, _)| id.clone())
    }

    /// Reports a new state and health (sent at once).
    pub fn report(&self, state: RunState, health: Health) {
        let _ = self.report.send(Report { state, health });
    }

    /// The last heartbeat ack: the leader, FlockID and steward this node is linked to.
    pub fn acks(&self) -> watch::Receiver<Option<rpb::HeartbeatAck>> {
        self.acks.clone()
    }

    /// Stops the heartbeats and deregisters the instance.
    pub async fn deregister(mut self) -> Result<(), ClientError> {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let Some((id, token)) = self.id.borrow().clone() else {
            return Ok(());
        };
        let mut client = reeve_client(&self.socket).await?;
        client
            .deregister(rpb::DeregisterRequest { id, token })
            .await?;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn keep_alive(
    socket: PathBuf,
    req: rpb::RegisterRequest,
    mut current: rpb::RegisterResponse,
    mut report: watch::Receiver<Report>,
    id_tx: watch::Sender<Option<(String, Vec<u8>)>>,
    acks: watch::Sender<Option<rpb::HeartbeatAck>>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = heartbeat_stream(&socket, &current, &mut report, &acks, &stop).await;
        if stop.is_cancelled() {
            return;
        }
        debug!(id = %current.id, ?outcome, "heartbeat stream ended");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // The agent no longer knows the instance (it restarted, or the instance expired while
        // the stream was down): register again. Otherwise reopen the stream.
        let lost = matches!(&outcome, Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::PermissionDenied));
        if !lost {
            continue;
        }
        let again = async {
            let mut c = reeve_client(&socket).await?;
            let mut r = req.clone();
            let now = *report.borrow();
            r.state = now.state as i32;
            r.health = now.health as i32;
            Ok::<_, ClientError>(c.register(r).await?.into_inner())
        };
        match again.await {
            Ok(r) => {
                current = r;
                let _ = id_tx.send(Some((current.id.clone(), current.token.clone())));
                backoff = Duration::from_millis(100);
            }
            Err(e) => warn!(error = %e, "registering again failed"),
        }
    }
}

/// One heartbeat stream, until it fails or `stop`.
async fn heartbeat_stream(
    socket: &Path,
    reg: &rpb::RegisterResponse,
    report: &mut watch::Receiver<Report>,
    acks: &watch::Sender<Option<rpb::HeartbeatAck>>,
    stop: &CancellationToken,
) -> Result<(), tonic::Status> {
    let mut client = reeve_client(socket)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(10));
    let (tx, rx) = mpsc::channel(4);
    let beat = |r: Report, first: bool| rpb::HeartbeatRequest {
        id: if first { reg.id.clone() } else { String::new() },
        token: if first { reg.token.clone() } else { Vec::new() },
        state: r.state as i32,
        health: r.health as i32,
        valid_for_ms: (interval * 3).as_millis() as u64,
    };
    let now = *report.borrow_and_update();
    let _ = tx.send(beat(now, true)).await;
    let mut inbound = client
        .heartbeat(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut every = tokio::time::interval(interval);
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = every.tick() => {
                let now = *report.borrow();
                if tx.send(beat(now, false)).await.is_err() {
                    return Err(tonic::Status::unavailable("heartbeat stream closed"));
                }
            }
            r = report.changed() => {
                if r.is_err() {
                    return Ok(());
                }
                let now = *report.borrow_and_update();
                if tx.send(beat(now, false)).await.is_err() {
                    return Err(tonic::Status::unavailable("heartbeat stream closed"));
                }
            }
            ack = inbound.message() => match ack? {
                Some(a) => { let _ = acks.send(Some(a)); }
                None => return Err(tonic::Status::unavailable("the agent closed the heartbeat stream")),
            },
        }
    }
}

/// A channel that follows the best live instance of a selector.
#[derive(Debug, Clone)]
pub struct Follow {
    channel: Channel,
    current: watch::Receiver<Option<Instance>>,
    _stop: Arc<DropGuard>,
}

impl Follow {
    /// The channel; calls go to the instance [`Follow::current`] names.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The instance calls go to now (None while none is live).
    pub fn current(&self) -> watch::Receiver<Option<Instance>> {
        self.current.clone()
    }
}

/// Connects to the best live instance `selector` picks in `horde` (empty: `default`), following
/// the registry: when a better instance appears, or the current one stops being live, new calls
/// go to the new best. Changes come from the agent's watch stream as they happen; every `rescan`
/// the choice is also checked against a fresh lookup (and the watch reopened if it broke).
/// Returns once the registry has been read; while nothing is live, calls wait.
pub async fn connect(
    socket: impl Into<PathBuf>,
    selector: &str,
    horde: &str,
    rescan: Duration,
) -> Result<Follow, ClientError> {
    let socket = socket.into();
    let mut client = reeve_client(&socket).await?;
    // Checks the selector and reads the registry once before returning.
    let first = client
        .lookup(rpb::LookupRequest {
            selector: selector.to_string(),
            horde: horde.to_string(),
            live_only: true,
        })
        .await?
        .into_inner();
    let (channel, changes) = Channel::balance_channel::<String>(16);
    let (current_tx, current_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let mut chooser = Chooser {
        changes,
        current: current_tx,
    };
    chooser.choose(first.instances.first()).await;
    tokio::spawn(follow(
        socket,
        selector.to_string(),
        horde.to_string(),
        rescan.max(Duration::from_millis(10)),
        chooser,
        stop.clone(),
    ));
    Ok(Follow {
        channel,
        current: current_rx,
        _stop: Arc::new(stop.drop_guard()),
    })
}

struct Chooser {
    changes: mpsc::Sender<Change<String, Endpoint>>,
    current: watch::Sender<Option<Instance>>,
}

impl Chooser {
    /// Moves the channel to `best` (a live instance) if it is not there already.
    async fn choose(&mut self, best: Option<&Instance>) {
        let now = self.current.borrow().clone();
        let same = match (&now, best) {
            (Some(a), Some(b)) => a.id == b.id && a.addr == b.addr,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some(b) = best {
            match Endpoint::from_shared(format!("http://{}", b.addr)) {
                Ok(e) => {
                    let key = format!("{}@{}", b.id, b.addr);
                    let _ = self.changes.send(Change::Insert(key, e)).await;
                }
                Err(e) => {
                    warn!(addr = %b.addr, error = %e, "instance address is not usable");
                    return;
                }
            }
        }
        if let Some(old) = &now {
            let _ = self
                .changes
                .send(Change::Remove(format!("{}@{}", old.id, old.addr)))
                .await;
        }
        debug!(to = ?best.map(|b| &b.inst), "following");
        let _ = self.current.send(best.cloned());
    }
}

async fn follow(
    socket: PathBuf,
    selector: String,
    horde: String,
    rescan: Duration,
    mut chooser: Chooser,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(rescan);
    loop {
        // (Re)open the watch; while it runs, each event recomputes the best.
        let mut known: std::collections::HashMap<String, Instance> = Default::default();
        let watch = async {
            let mut c = reeve_client(&socket).await?;
            let s = c
                .watch(rpb::WatchRequest {
                    selector: selector.clone(),
                    horde: horde.clone(),
                    from_revision: 0,
                })
                .await?
                .into_inner();
            Ok::<_, ClientError>((c, s))
        };
        let (mut client, mut events) = tokio::select! {
            _ = stop.cancelled() => return,
            w = watch => match w {
                Ok(w) => w,
                Err(e) => {
                    debug!(error = %e, "watch failed; retrying at the next rescan");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = every.tick() => continue,
                    }
                }
            },
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                e = events.message() => match e {
                    Ok(Some(ev)) => {
                        if ev.snapshot {
                            known.clear();
                        }
                        for i in ev.remove {
                            known.remove(&i.id);
                        }
                        for i in ev.put {
                            known.insert(i.id.clone(), i);
                        }
                        let mut live: Vec<&Instance> = known.values().filter(|i| is_live(i)).collect();
                        live.sort_by(|a, b| best_first(a, b));
                        chooser.choose(live.first().copied()).await;
                    }
                    _ => break,
                },
                _ = every.tick() => {
                    let r = client.lookup(rpb::LookupRequest {
                        selector: selector.clone(),
                        horde: horde.clone(),
                        live_only: true,
                    }).await;
                    match r {
                        Ok(r) => chooser.choose(r.into_inner().instances.first()).await,
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
