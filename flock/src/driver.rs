//! tokio driver of the flock core (feature `driver`).
//!
//! One task owns the [`Flock`] state machine and feeds it every input; nothing else touches it.
//!
//! ```text
//!   shutdown ─┐
//!   UDP recv ─┤                        ┌─▶ UDP send (try_send_to; a full buffer drops, as UDP may)
//!   deadline ─┼─▶ owner task ─ Flock ──┼─▶ stream tasks (TCP, one frame out, one frame back)
//!   commands ─┤   (select!, biased)    ├─▶ events (broadcast)
//!   streams  ─┘                        └─▶ snapshot (watch: members, leader, stats)
//! ```
//!
//! * After every input the owner drains [`Flock::poll_transmit`] and [`Flock::poll_event`].
//! * Stream transmits (push-pull larger than a datagram) go over TCP to the same `ip:port` as the
//!   peer's flock UDP address: one frame each way, a frame being a `u32` big-endian length and the
//!   payload. Spawned tasks do the IO and send the outcome back to the owner through a channel, so
//!   the core stays single-owner. The driver listens on TCP at its own flock address for the same.
//! * `now` is the time since the driver's start instant. The wall clock is read once, in
//!   [`Driver::new`], and handed to the core ([`Flock::set_wall_clock`]) for the timestamps of
//!   its join requests.
//! * On shutdown the driver gives the core [`Command::Leave`], keeps driving it until
//!   [`Event::LeaveComplete`] or [`DriverConfig::leave_timeout`], then returns, closing its sockets.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crux_proto::flock::MAX_STREAM_BYTES;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use crate::crypto::{key_id, Bloc, Keyring, KeyringOp};
use crate::{Command, Event, Flock, Identity, LeaderView, Member, Stats, TransmitKind};

/// Largest stream frame accepted or sent: the core's stream limit plus room for the envelope.
pub const MAX_FRAME_BYTES: usize = MAX_STREAM_BYTES + 1024;

/// Receive buffer: the largest UDP payload over IPv4.
const RECV_BUFFER_BYTES: usize = 65_536;

/// Tunables of the driver (not of the protocol: those are in [`crate::Config`]).
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// How long a shutdown waits for the leave to be gossiped before closing anyway.
    pub leave_timeout: Duration,
    /// Whole-exchange limit of one stream (connect, write, read), either direction.
    pub stream_timeout: Duration,
    /// Stream exchanges in flight at once, incoming and outgoing counted apart. Further outgoing
    /// requests fail at once; further incoming connections are closed unread.
    pub streams_max: usize,
    /// How often the snapshot is republished to refresh its counters (membership and leader
    /// changes are published at once).
    pub publish_interval: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            leave_timeout: Duration::from_secs(5),
            stream_timeout: Duration::from_secs(10),
            streams_max: 8,
            publish_interval: Duration::from_millis(250),
        }
    }
}

/// What the rest of the agent sees of the flock: a copy taken by the owner task.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// This node.
    pub identity: Identity,
    /// Driver time when the snapshot was taken (compare with [`Member::since`]).
    pub now: Duration,
    /// Every member known, this node included, ordered by node id.
    pub members: Vec<Member>,
    /// The leader this node follows.
    pub leader: Option<LeaderView>,
    /// Alive and suspect members, this node included.
    pub live: usize,
    /// Counters.
    pub stats: Stats,
    /// Whether this node has started leaving.
    pub leaving: bool,
    /// Transient key epoch this node seals with (None: no key yet, or security off).
    pub key_epoch: Option<u32>,
    /// The secondary keyring by key id, primary first (empty with security off).
    pub keys: Vec<KeyId>,
}

/// A secondary key as the snapshot shows it: its id, never the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyId {
    /// The key id of the bloc ([`key_id`]), as in handshake headers.
    pub id: u32,
    /// Whether it is the primary key.
    pub primary: bool,
}

impl Snapshot {
    fn take(flock: &Flock, bloc: &Bloc, now: Duration, leaving: bool) -> Snapshot {
        let mut members: Vec<Member> = flock.members().collect();
        members.sort_by_key(|m| m.info.id);
        let keys = flock
            .keyring()
            .map(|ring| {
                ring.list()
                    .into_iter()
                    .enumerate()
                    .map(|(i, k)| KeyId {
                        id: key_id(k, bloc),
                        primary: i == 0,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Snapshot {
            identity: *flock.identity(),
            now,
            members,
            leader: flock.leader(),
            live: flock.live_count(),
            stats: flock.stats().clone(),
            leaving,
            key_epoch: flock.key_epoch(),
            keys,
        }
    }
}

/// How the driver ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The leave was gossiped ([`Event::LeaveComplete`]).
    Left,
    /// [`DriverConfig::leave_timeout`] passed before the leave completed.
    LeaveTimedOut,
}

/// The side of the driver the rest of the agent holds.
#[derive(Clone, Debug)]
pub struct DriverHandle {
    requests: mpsc::Sender<Request>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
    keyring: watch::Receiver<Option<Keyring>>,
}

/// What the handle asks of the owner task.
#[derive(Debug)]
enum Request {
    Command(Command),
    Keyring(KeyringOp, oneshot::Sender<Result<(), String>>),
}

/// The driver stopped and no longer takes commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the flock driver has stopped")]
pub struct Stopped;

impl DriverHandle {
    /// Sends a command to the core.
    pub async fn command(&self, cmd: Command) -> Result<(), Stopped> {
        self.requests
            .send(Request::Command(cmd))
            .await
            .map_err(|_| Stopped)
    }

    /// Changes the secondary keyring here and spreads the change to every member
    /// ([`Command::Keyring`]). The inner error is the core's reason for refusing the change.
    pub async fn keyring(&self, op: KeyringOp) -> Result<Result<(), String>, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Keyring(op, tx))
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// The current secondary keyring, updated after every change (made here or spread by the
    /// flock): the agent saves it to its keyring file. None with security off.
    pub fn keyring_watch(&self) -> watch::Receiver<Option<Keyring>> {
        self.keyring.clone()
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    /// Events from now on. A receiver that falls behind by more than the channel's capacity
    /// loses the oldest ones (`RecvError::Lagged`); the snapshot stays exact.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// An incoming stream request waiting for the core's reply.
struct StreamIn {
    from: SocketAddr,
    bytes: Vec<u8>,
    reply: oneshot::Sender<Option<Vec<u8>>>,
}

/// The outcome of a stream request this node made.
struct StreamOut {
    to: SocketAddr,
    reply: Result<Vec<u8>, io::Error>,
}

/// The tokio driver. Build it with [`Driver::new`], then `run` it in one task.
pub struct Driver {
    flock: Flock,
    udp: UdpSocket,
    tcp: TcpListener,
    config: DriverConfig,
    start: Instant,
    requests: mpsc::Receiver<Request>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    events: broadcast::Sender<Event>,
    keyring: watch::Sender<Option<Keyring>>,
    bloc: Bloc,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("identity", self.flock.identity())
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// Wraps a core whose `now` counts from `start`, a UDP socket and a TCP listener bound to the
    /// node's flock address.
    pub fn new(
        flock: Flock,
        udp: UdpSocket,
        tcp: TcpListener,
        start: Instant,
        config: DriverConfig,
    ) -> (Driver, DriverHandle) {
        let (req_tx, req_rx) = mpsc::channel(64);
        let mut flock = flock;
        let now = start.elapsed();
        // The one wall-clock reading: join requests carry the wall-clock time from here on,
        // counted on the monotonic clock (it never steps back under the core).
        #[allow(clippy::disallowed_methods)] // drivers read the clock; the core does not
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        flock.set_wall_clock(now, unix.as_nanos());
        let bloc = Bloc::new(&flock.config().bloc);
        let (snap_tx, snap_rx) =
            watch::channel(Arc::new(Snapshot::take(&flock, &bloc, now, false)));
        let (ev_tx, _) = broadcast::channel(1024);
        let (ring_tx, ring_rx) = watch::channel(flock.keyring().cloned());
        let handle = DriverHandle {
            requests: req_tx,
            snapshot: snap_rx,
            events: ev_tx.clone(),
            keyring: ring_rx,
        };
        let driver = Driver {
            flock,
            udp,
            tcp,
            config,
            start,
            requests: req_rx,
            snapshot: snap_tx,
            events: ev_tx,
            keyring: ring_tx,
            bloc,
        };
        (driver, handle)
    }

    /// Drives the core until `shutdown` is cancelled and the leave has completed (or timed out).
    pub async fn run(self, shutdown: CancellationToken) -> Exit {
        let Driver {
            mut flock,
            udp,
            tcp,
            config,
            start,
            mut requests,
            snapshot,
            events,
            keyring,
            bloc,
        } = self;
        let now = || start.elapsed();
        let tasks = CancellationToken::new();
        let _stop_tasks = tasks.clone().drop_guard();

        let (in_tx, mut in_rx) = mpsc::channel::<StreamIn>(config.streams_max.max(1));
        let (out_tx, mut out_rx) = mpsc::channel::<StreamOut>(config.streams_max.max(1));
        let out_slots = Arc::new(Semaphore::new(config.streams_max.max(1)));
        tokio::spawn(accept_streams(tcp, in_tx, config.clone(), tasks.clone()));

        let mut out = Outputs {
            udp: &udp,
            events: &events,
            out_tx: &out_tx,
            out_slots: &out_slots,
            config: &config,
            tasks: &tasks,
            changed: false,
            leave_complete: false,
            keyring_changed: false,
            refused: None,
        };
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut publish = tokio::time::interval(config.publish_interval);
        publish.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut leave_deadline: Option<Instant> = None;
        let mut commands_open = true;

        out.drain(&mut flock, now());
        let exit = loop {
            let deadline = flock.poll_timeout().map(|d| start + d);
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if leave_deadline.is_none() => {
                    debug!("shutdown: leaving the flock");
                    flock.handle_command(now(), Command::Leave);
                    leave_deadline = Some(Instant::now() + config.leave_timeout);
                    out.changed = true;
                }
                _ = sleep_until_opt(leave_deadline) => {
                    warn!(timeout = ?config.leave_timeout, "leave did not complete in time; closing");
                    break Exit::LeaveTimedOut;
                }
                r = udp.recv_from(&mut buf) => match r {
                    Ok((n, from)) => flock.handle_datagram(now(), from, &buf[..n]),
                    // ICMP errors surface here on some platforms; they are not fatal.
                    Err(e) => debug!(error = %e, "udp recv failed"),
                },
                _ = sleep_until_opt(deadline) => flock.handle_timeout(now()),
                req = requests.recv(), if commands_open => match req {
                    Some(Request::Command(cmd)) => flock.handle_command(now(), cmd),
                    Some(Request::Keyring(op, reply)) => {
                        let t = now();
                        out.refused = None;
                        flock.handle_command(t, Command::Keyring(op));
                        out.drain(&mut flock, t);
                        // Publish before replying, so the caller sees its change.
                        if out.keyring_changed {
                            out.keyring_changed = false;
                            let _ = keyring.send(flock.keyring().cloned());
                        }
                        out.changed = false;
                        let _ = snapshot.send(Arc::new(Snapshot::take(
                            &flock,
                            &bloc,
                            t,
                            leave_deadline.is_some(),
                        )));
                        let _ = reply.send(match out.refused.take() {
                            Some(reason) => Err(reason),
                            None => Ok(()),
                        });
                    }
                    None => commands_open = false,
                },
                Some(req) = in_rx.recv() => {
                    let reply = flock.handle_stream(now(), req.from, &req.bytes);
                    let _ = req.reply.send(reply);
                }
                Some(res) = out_rx.recv() => match res.reply {
                    Ok(bytes) => flock.handle_stream_reply(now(), res.to, &bytes),
                    Err(e) => {
                        debug!(to = %res.to, error = %e, "stream request failed");
                        flock.handle_stream_failed(now(), res.to);
                    }
                },
                _ = publish.tick() => out.changed = true,
            }
            // A flood of datagrams must not starve the timers.
            let t = now();
            if flock.poll_timeout().is_some_and(|d| d <= t) {
                flock.handle_timeout(t);
            }
            out.drain(&mut flock, t);
            if out.keyring_changed {
                out.keyring_changed = false;
                let _ = keyring.send(flock.keyring().cloned());
            }
            if out.changed {
                out.changed = false;
                let _ = snapshot.send(Arc::new(Snapshot::take(
                    &flock,
                    &bloc,
                    now(),
                    leave_deadline.is_some(),
                )));
            }
            if out.leave_complete {
                break Exit::Left;
            }
        };
        let _ = snapshot.send(Arc::new(Snapshot::take(&flock, &bloc, now(), true)));
        exit
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where the owner task puts the core's outputs.
struct Outputs<'a> {
    udp: &'a UdpSocket,
    events: &'a broadcast::Sender<Event>,
    out_tx: &'a mpsc::Sender<StreamOut>,
    out_slots: &'a Arc<Semaphore>,
    config: &'a DriverConfig,
    tasks: &'a CancellationToken,
    changed: bool,
    leave_complete: bool,
    /// A keyring change was applied (publish the keyring for the agent to save).
    keyring_changed: bool,
    /// The reason of the last refused keyring change.
    refused: Option<String>,
}

impl Outputs<'_> {
    fn drain(&mut self, flock: &mut Flock, now: Duration) {
        loop {
            let mut failed = Vec::new();
            let mut any = false;
            while let Some(t) = flock.poll_transmit() {
                any = true;
                match t.kind {
                    TransmitKind::Datagram => {
                        if let Err(e) = self.udp.try_send_to(&t.payload, t.to) {
                            // Full send buffer or unreachable: UDP may lose datagrams anyway.
                            trace!(to = %t.to, error = %e, "datagram not sent");
                        }
                    }
                    TransmitKind::Stream => match self.out_slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let tx = self.out_tx.clone();
                            let timeout = self.config.stream_timeout;
                            let tasks = self.tasks.clone();
                            tokio::spawn(async move {
                                let to = t.to;
                                let reply = tokio::select! {
                                    _ = tasks.cancelled() => return,
                                    r = tokio::time::timeout(timeout, request(to, &t.payload)) => {
                                        r.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
                                    }
                                };
                                drop(permit);
                                let _ = tx.send(StreamOut { to, reply }).await;
                            });
                        }
                        Err(_) => {
                            debug!(to = %t.to, "too many streams in flight; request dropped");
                            failed.push(t.to);
                        }
                    },
                }
            }
            while let Some(ev) = flock.poll_event() {
                any = true;
                self.changed = true;
                match &ev {
                    Event::LeaveComplete => self.leave_complete = true,
                    Event::KeyringChanged => self.keyring_changed = true,
                    Event::KeyringRefused(reason) => self.refused = Some(reason.clone()),
                    _ => {}
                }
                let _ = self.events.send(ev);
            }
            for to in &failed {
                flock.handle_stream_failed(now, *to);
            }
            if !any && failed.is_empty() {
                break;
            }
        }
    }
}

/// One outgoing stream exchange: connect, write one frame, read one frame.
async fn request(to: SocketAddr, payload: &[u8]) -> Result<Vec<u8>, io::Error> {
    let mut stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    write_frame(&mut stream, payload).await?;
    read_frame(&mut stream).await
}

/// Accepts incoming stream requests and hands them to the owner task.
async fn accept_streams(
    tcp: TcpListener,
    to_owner: mpsc::Sender<StreamIn>,
    config: DriverConfig,
    tasks: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(config.streams_max.max(1)));
    loop {
        let (stream, from) = tokio::select! {
            _ = tasks.cancelled() => return,
            r = tcp.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    debug!(error = %e, "stream accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%from, "too many streams in flight; connection closed");
            continue;
        };
        let to_owner = to_owner.clone();
        let tasks = tasks.clone();
        let timeout = config.stream_timeout;
        tokio::spawn(async move {
            let serve = serve_stream(stream, from, to_owner);
            tokio::select! {
                _ = tasks.cancelled() => {}
                r = tokio::time::timeout(timeout, serve) => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%from, error = %e, "incoming stream failed"),
                    Err(_) => debug!(%from, "incoming stream timed out"),
                },
            }
            drop(permit);
        });
    }
}

async fn serve_stream(
    mut stream: TcpStream,
    from: SocketAddr,
    to_owner: mpsc::Sender<StreamIn>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let bytes = read_frame(&mut stream).await?;
    let (tx, rx) = oneshot::channel();
    to_owner
        .send(StreamIn {
            from,
            bytes,
            reply: tx,
        })
        .await
        .map_err(|_| io::Error::other("driver stopped"))?;
    if let Ok(Some(reply)) = rx.await {
        write_frame(&mut stream, &reply).await?;
    }
    stream.shutdown().await
}

/// Writes one frame: `u32` big-endian length, then the payload.
pub async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> io::Result<()> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame over the stream limit",
        ));
    }
    w.write_all(&(payload.len() as u32).to_be_bytes()).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Reads one frame of at most [`MAX_FRAME_BYTES`]. Memory grows only as bytes arrive.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame over the stream limit",
        ));
    }
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BootId, Config, MemberState, NodeId, Preset};
    use rand_chacha::rand_core::SeedableRng;
    use std::net::{IpAddr, Ipv4Addr};

    /// Binds UDP and TCP on one free port of `ip`.
    async fn bind(ip: IpAddr) -> (UdpSocket, TcpListener) {
        for _ in 0..50 {
            let udp = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind(SocketAddr::new(ip, port)).await {
                return (udp, tcp);
            }
        }
        panic!("no free port on {ip}");
    }

    /// `n` drivers on `127.<block>.<subnet>.2…` sharing one port, each in its own task.
    struct TestFlock {
        handles: Vec<DriverHandle>,
        tasks: Vec<tokio::task::JoinHandle<Exit>>,
        stops: Vec<CancellationToken>,
    }

    async fn test_flock(subnet: u8, n: usize, mtu: usize) -> TestFlock {
        test_flock_with(subnet, n, mtu, None).await
    }

    /// As [`test_flock`]; with a keyring, every node runs with security on and that keyring.
    async fn test_flock_with(
        subnet: u8,
        n: usize,
        mtu: usize,
        keyring: Option<&Keyring>,
    ) -> TestFlock {
        let block = 10 + (std::process::id() % 200) as u8;
        let ips: Vec<IpAddr> = (0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, block, subnet, 2 + i as u8)))
            .collect();
        // One port for all: the first node's, if free on the others (else try another).
        let sockets = 'found: {
            for _ in 0..20 {
                let (udp0, tcp0) = bind(ips[0]).await;
                let port = udp0.local_addr().unwrap().port();
                let mut sockets = vec![(udp0, tcp0)];
                for ip in &ips[1..] {
                    let a = SocketAddr::new(*ip, port);
                    match (UdpSocket::bind(a).await, TcpListener::bind(a).await) {
                        (Ok(u), Ok(t)) => sockets.push((u, t)),
                        _ => break,
                    }
                }
                if sockets.len() == n {
                    break 'found sockets;
                }
            }
            panic!("no port free on all of {ips:?}");
        };
        let space = [format!("{}-{}", ips[0], ips[n - 1])];
        let start = Instant::now();
        let mut f = TestFlock {
            handles: Vec::new(),
            tasks: Vec::new(),
            stops: Vec::new(),
        };
        for (i, (udp, tcp)) in sockets.into_iter().enumerate() {
            let bloc = format!("driver-test-{}-{subnet}", std::process::id());
            let mut config = Config::new(bloc, Preset::Local);
            config.mtu = mtu;
            config.space = crate::AddressSpace::parse(&space, &[] as &[String]).unwrap();
            // Full-width ids, as real nodes have (they size the push-pull state).
            let identity = Identity {
                id: NodeId(0x9e37_79b9_7f4a_7c15 ^ (100 + i as u64)),
                boot: BootId(0x01a2_0090_0000_0000 + i as u64),
                addr: udp.local_addr().unwrap(),
                key: None,
            };
            let flock = match keyring {
                None => Flock::builder(config, identity)
                    .sim_seed(i as u64)
                    .start(start.elapsed())
                    .unwrap(),
                Some(ring) => Flock::builder(config, identity)
                    .keys(ring.clone(), crate::SecurityTiming::default())
                    .rng_seed([i as u8; 32])
                    .start(start.elapsed())
                    .unwrap(),
            };
            let (driver, handle) = Driver::new(flock, udp, tcp, start, DriverConfig::default());
            let stop = CancellationToken::new();
            f.tasks.push(tokio::spawn(driver.run(stop.clone())));
            f.handles.push(handle);
            f.stops.push(stop);
        }
        f
    }

    /// Every handle sees `n` live members and the same leader.
    fn agreed(handles: &[DriverHandle], n: usize) -> bool {
        let snaps: Vec<_> = handles.iter().map(|h| h.snapshot()).collect();
        let leader = snaps[0].leader.map(|l| l.id);
        leader.is_some()
            && snaps
                .iter()
                .all(|s| s.live == n && s.leader.map(|l| l.id) == leader)
    }

    async fn wait_agreed(handles: &[DriverHandle], n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut w = handles[0].watch();
        while !agreed(handles, n) {
            assert!(
                Instant::now() < deadline,
                "no agreement: {:?}",
                handles[0].snapshot()
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
        }
    }

    /// With security on, sealed datagrams still make a flock over real sockets; a keyring change
    /// made through one handle reaches every node's keyring watch, and a refused change comes back
    /// with the core's reason.
    #[tokio::test]
    async fn secure_flock_spreads_keyring_changes() {
        use crate::crypto::SecretKey;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (old, new) = (SecretKey::generate(&mut rng), SecretKey::generate(&mut rng));
        let ring = Keyring::new(SecretKey::from_bytes(*old.as_bytes()));
        let f = test_flock_with(253, 3, 1400, Some(&ring)).await;
        wait_agreed(&f.handles, 3).await;
        assert!(f.handles.iter().all(|h| h.snapshot().key_epoch.is_some()));

        let install = KeyringOp::Install(SecretKey::from_bytes(*new.as_bytes()));
        assert_eq!(f.handles[0].keyring(install).await.unwrap(), Ok(()));
        let deadline = Instant::now() + Duration::from_secs(20);
        for h in &f.handles {
            let mut w = h.keyring_watch();
            while w.borrow_and_update().as_ref().map(|r| r.len()) != Some(2) {
                assert!(Instant::now() < deadline, "install did not spread");
                let _ = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
            }
            assert_eq!(h.snapshot().keys.len(), 2);
        }
        let refused = f.handles[1].keyring(KeyringOp::Remove(old)).await.unwrap();
        assert!(refused.is_err(), "removing the primary key must be refused");
        wait_agreed(&f.handles, 3).await;
        for s in &f.stops {
            s.cancel();
        }
        for t in f.tasks {
            t.await.unwrap();
        }
    }

    /// Push-pull state larger than one datagram (24 members at the smallest MTU) travels over
    /// TCP stream frames, and the flock still converges.
    #[tokio::test]
    async fn large_push_pull_goes_over_tcp_streams() {
        let n = 24;
        let f = test_flock(252, n, crux_proto::flock::MIN_MTU).await;
        wait_agreed(&f.handles, n).await;
        let (mut out, mut inn) = (0, 0);
        for h in &f.handles {
            let s = h.snapshot().stats.clone();
            out += s.streams_out;
            inn += s.streams_in;
        }
        assert!(out > 0 && inn > 0, "no stream frames: out {out}, in {inn}");
        for s in &f.stops {
            s.cancel();
        }
        for t in f.tasks {
            t.await.unwrap();
        }
    }

    /// Three drivers on real loopback sockets find each other through the address space, agree
    /// on one leader, and a shutdown leaves gracefully: the others see the node `left`.
    #[tokio::test]
    async fn drivers_converge_and_leave_over_loopback() {
        let TestFlock {
            handles,
            mut tasks,
            stops,
        } = test_flock(251, 3, 1400).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        wait_agreed(&handles, 3).await;
        let mut w = handles[0].watch();

        // Node 2 shuts down: it leaves, and the others mark it left.
        stops[2].cancel();
        let exit = tasks.pop().unwrap().await.unwrap();
        assert_eq!(exit, Exit::Left);
        let left = |h: &DriverHandle| {
            h.snapshot().members.iter().any(|m| {
                m.info.id == NodeId(0x9e37_79b9_7f4a_7c15 ^ 102)
                    && m.info.state == MemberState::Left
            })
        };
        while !(left(&handles[0]) && left(&handles[1])) {
            assert!(
                Instant::now() < deadline,
                "leave not seen: {:?}",
                handles[0].snapshot()
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
        }
        for s in &stops[..2] {
            s.cancel();
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn frames_round_trip_and_refuse_oversized_lengths() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"hello").await.unwrap();
        assert_eq!(&wire[..4], &5u32.to_be_bytes());
        let mut r = &wire[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), b"hello");

        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        let mut r = &huge[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );

        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        let mut r = &short[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
