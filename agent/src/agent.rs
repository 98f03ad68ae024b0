//! `crux agent`: loads the config, then brings the node up in DESIGN.md's bootstrap order, each
//! step logged with its elapsed time, and stays up until SIGTERM or SIGINT, when it leaves the
//! flock gracefully and exits 0.
//!
//! 1. **flock**: node identity and keyring from the data dir, UDP (and TCP for streams) bound,
//!    the address space probed, a flock joined or formed, a leader known.
//! 2. **reeve**: the heartbeater, the replica of the registry and the link to the steward start;
//!    the local socket (gRPC) opens. Registrations are accepted at once.
//! 3. **steward**: the node gRPC port serves the steward while this node leads (started and
//!    stopped as leadership moves), admitting only live members.
//! 4. **picket**: re-adopts the plugins a previous agent left running; the built-in services
//!    (pastiche1) start.
//! 5. **proctor/dean**: the dean on every node carries out its assignment; the proctor runs on the
//!    flock leader (started and stopped as leadership moves).
//!
//! Ready (sd_notify `READY=1`, HTTP `/ready` → 200) only after step 5.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crux_flock::driver::{Driver, DriverConfig, DriverHandle, Exit};
use crux_flock::{Event, Flock, Identity, SecurityTiming};
use rand::RngCore;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AgentFlags, ConfigError, RawConfig, Settings};
use crate::keys::Keys;
use crate::state::{AgentState, STEPS};
use crux_reeve::{Reeve, ReeveConfig, Target};
use crux_steward::StewardConfig;

/// Exit code of a config error.
pub const EXIT_CONFIG: i32 = 2;

/// Runs the agent; returns the process exit code.
pub fn main(flags: &AgentFlags) -> i32 {
    let settings = match RawConfig::load(flags, std::env::vars()).and_then(|raw| raw.validate()) {
        Ok(s) => s,
        Err(e) => {
            report_config_error(&e);
            return EXIT_CONFIG;
        }
    };
    init_logging(&settings.log_level);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crux agent: cannot start the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("crux agent: {e:#}");
            1
        }
    }
}

fn report_config_error(e: &ConfigError) {
    eprintln!("crux agent: {e}");
}

fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Wall-clock milliseconds since the Unix epoch (for the boot id).
#[allow(clippy::disallowed_methods)]
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The monotonic start instant of the agent (uptime, step times).
#[allow(clippy::disallowed_methods)]
fn now_instant() -> Instant {
    Instant::now()
}

/// Cancels `token` on SIGTERM or SIGINT; a second signal exits at once.
fn watch_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                info!(signal = name, "shutting down: leaving the flock");
                token.cancel();
            } else {
                warn!(signal = name, "second signal: exiting without waiting");
                std::process::exit(1);
            }
        }
    });
    Ok(())
}

/// The address others reach this node at: `advertise`, or for a wildcard `bind`, the local
/// address the kernel routes from towards the first seed or the first address of the space
/// (a UDP `connect` sends nothing).
fn resolve_advertise(s: &Settings) -> Result<SocketAddr, ConfigError> {
    if let Some(a) = s.advertise {
        return Ok(a);
    }
    let port = s.bind.port();
    let target = s
        .flock
        .seeds
        .first()
        .copied()
        .or_else(|| s.flock.space.nth(0, port));
    let ip = target.and_then(|t| {
        let any: SocketAddr = if t.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let sock = StdUdpSocket::bind(any).ok()?;
        sock.connect(t).ok()?;
        let ip = sock.local_addr().ok()?.ip();
        (!ip.is_unspecified()).then_some(ip)
    });
    match ip {
        Some(ip) => Ok(SocketAddr::new(ip, port)),
        None => Err(ConfigError {
            field: "advertise".into(),
            reason: format!(
                "bind address {} is a wildcard and no local address could be chosen from the \
                 seeds or the address space; set advertise to this node's ip:port",
                s.bind
            ),
        }),
    }
}

struct Steps {
    state: Arc<AgentState>,
    start: Instant,
}

impl Steps {
    /// Logs and records step `n` (1-based) as done.
    fn done(&self, n: usize, began: Instant, detail: &str) {
        let name = STEPS[n - 1];
        let elapsed = began.elapsed();
        self.state.step_done(name, elapsed, detail);
        info!(
            step = n,
            name,
            elapsed_ms = elapsed.as_millis() as u64,
            since_start_ms = self.start.elapsed().as_millis() as u64,
            "bootstrap step {n}/{} {name} done in {elapsed:.1?}: {detail}",
            STEPS.len()
        );
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let start = now_instant();
    let stop = CancellationToken::new();
    watch_signals(stop.clone())?;
    info!(version = env!("CARGO_PKG_VERSION"), bloc = %settings.flock.bloc, "crux agent starting");

    // ---- step 1: flock -------------------------------------------------------------------
    let began = now_instant();
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
    let id = crate::identity::load_or_create_node_id(&settings.data_dir)?;
    let transport = crate::identity::node_transport(&settings.data_dir)?;
    let boot = crate::identity::next_boot_id(&settings.data_dir, unix_ms())?;
    let keyring = crate::keys::load(&settings.keyring)?;
    let pastiche_store = {
        let (dir, max) = (settings.pastiche_dir.clone(), settings.pastiche_max);
        tokio::task::spawn_blocking(move || crux_pastiche::store::Store::open(&dir, max))
            .await
            .context("opening the pastiche store")?
            .with_context(|| {
                format!(
                    "opening the pastiche store {}",
                    settings.pastiche_dir.display()
                )
            })?
    };
    let addr = resolve_advertise(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let udp = UdpSocket::bind(settings.bind)
        .await
        .with_context(|| format!("binding flock UDP {}", settings.bind))?;
    let tcp = TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("binding flock TCP {} (push-pull streams)", settings.bind))?;
    // Every listener is bound before the node shows itself to the flock: a port in use fails
    // the start without a join-then-vanish.
    let grpc_addr = SocketAddr::new(settings.bind.ip(), settings.grpc_port);
    let grpc_listener = TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("binding node gRPC {grpc_addr}"))?;
    let http_listener = match settings.http {
        Some(http) => Some(
            TcpListener::bind(http)
                .await
                .with_context(|| format!("binding HTTP {http}"))?,
        ),
        None => None,
    };
    let store = {
        let mut c = crux_store::StoreConfig::new(
            settings.data_dir.join("store"),
            id.0,
            SocketAddr::new(addr.ip(), settings.grpc_port),
            transport.clone(),
        );
        c.local_ip = Some(addr.ip());
        if let Some(f) = &settings.store_partition_file {
            warn!(
                file = %f.display(),
                "store.partition_file_for_tests is set: while that file exists, this node's store \
                 traffic is cut"
            );
            c.partition_file = Some(f.clone());
        }
        crux_store::Store::open(c)
            .await
            .map_err(|e| anyhow::anyhow!("opening the durable store: {e}"))?
    };
    let identity = Identity {
        id,
        boot,
        addr,
        key: Some(transport.public_key()),
    };
    let clock = tokio::time::Instant::now();
    let mut rng_seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut rng_seed);
    let flock = Flock::builder(settings.flock.clone(), identity)
        .keys(keyring.clone(), SecurityTiming::default())
        .rng_seed(rng_seed)
        .start(clock.elapsed())
        .map_err(|e| anyhow::anyhow!("config field `{}`: {}", e.field, e.reason))?;
    let driver_config = DriverConfig {
        leave_timeout: settings.leave_timeout,
        ..Default::default()
    };
    let (driver, handle) = Driver::new(flock, udp, tcp, clock, driver_config);
    tokio::spawn(log_events(handle.clone(), stop.clone()));
    tokio::spawn(crate::keys::save_changes(
        handle.clone(),
        settings.keyring.clone(),
    ));
    // Node-plane connections, both ways, prove the bloc's key and a key the flock lists from
    // here on.
    crate::keys::follow_bloc_keys(&handle, &settings.flock.bloc, &keyring, transport.clone());
    tokio::spawn(crate::steward::follow_peers(
        handle.clone(),
        transport.clone(),
    ));
    let driver_task = tokio::spawn(driver.run(stop.clone()));
    info!(
        node = %id,
        boot = %boot,
        %addr,
        bind = %settings.bind,
        preset = %settings.preset,
        grpc = %grpc_addr,
        "flock bound"
    );

    if settings.flock.space.ranges.is_empty() && settings.flock.seeds.is_empty() {
        warn!("space and seeds are both empty: this node looks for no one and can only be found");
    }

    let servers = CancellationToken::new();
    let keys = Keys::new(handle.clone(), &settings.flock.bloc, keyring);
    let reeve = Reeve::new(
        ReeveConfig {
            node: id.to_string(),
            boot: boot.0,
            local_ip: Some(addr.ip()),
            transport: transport.clone(),
            heartbeat_interval: settings.registry.heartbeat_interval,
            grace: settings.registry.grace,
            netid: SocketAddr::new(addr.ip(), settings.grpc_port).to_string(),
        },
        steward_target(&handle, settings.grpc_port, stop.clone()),
    );
    let state = AgentState::new(
        handle.clone(),
        settings.clone(),
        keys,
        reeve,
        store.clone(),
        transport,
        start,
    );
    let steps = Steps {
        state: state.clone(),
        start,
    };
    let mut http_task = None;
    if let (Some(http), Some(listener)) = (settings.http, http_listener) {
        info!(%http, "HTTP /metrics and /ready listening");
        http_task = Some(tokio::spawn(crate::http::serve(
            listener,
            state.clone(),
            servers.clone(),
        )));
    }

    let listeners = Listeners {
        grpc: grpc_listener,
        pastiche: pastiche_store,
    };
    let outcome = bootstrap(
        &steps, &handle, &settings, began, listeners, &servers, &stop,
    )
    .await;
    let (mut tasks, picket) = match outcome {
        Ok(Some(up)) => (up.tasks, up.picket),
        Ok(None) => (Tasks::default(), None),
        Err(e) => {
            stop.cancel();
            let _ = driver_task.await;
            return Err(e);
        }
    };

    // ---- serve until a signal ------------------------------------------------------------
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            (name, how) = tasks.next_ended() => match how {
                Err(e) if e.is_panic() => tracing::error!(task = name, "task panicked"),
                _ => warn!(task = name, "task ended before shutdown"),
            },
        }
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let exit = driver_task.await.context("flock driver task")?;
    match exit {
        Exit::Left => info!("left the flock"),
        Exit::LeaveTimedOut => warn!("leave not confirmed within {:?}", settings.leave_timeout),
    }
    servers.cancel();
    if let Some(p) = picket {
        if settings.picket.stop_children_on_exit {
            info!("stopping the plugins (picket.stop_children_on_exit)");
            p.stop_all().await;
        } else if !p.units().is_empty() {
            info!(
                plugins = p.units().len(),
                "plugins keep running; the next agent start re-adopts them"
            );
        }
    }
    // Open client connections get a moment to finish; a stuck one does not hold the exit.
    let drain = Duration::from_secs(2);
    tasks.drain(drain).await;
    store.shutdown().await;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(drain, t).await;
    }
    let _ = std::fs::remove_file(&settings.socket);
    info!(uptime = ?start.elapsed(), "crux agent stopped");
    Ok(())
}

/// Every task the bootstrap starts, owned by name: none is dropped, one that ends while the
/// agent runs is reported by name, and shutdown waits for all of them (bounded).
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// The next task to end, by name, with how it ended (pending forever when none runs).
    async fn next_ended(&mut self) -> (&'static str, Result<(), tokio::task::JoinError>) {
        match self.set.join_next_with_id().await {
            Some(Ok((id, ()))) => (self.names.remove(&id).unwrap_or("?"), Ok(())),
            Some(Err(e)) => (self.names.remove(&e.id()).unwrap_or("?"), Err(e)),
            None => std::future::pending().await,
        }
    }

    /// Waits for every task to end, each within what is left of `limit`; the rest are aborted.
    async fn drain(mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.set.is_empty() {
            match tokio::time::timeout_at(deadline, self.next_ended()).await {
                Ok((name, Err(e))) if e.is_panic() => warn!(task = name, "task panicked"),
                Ok(_) => {}
                Err(_) => {
                    let left: Vec<_> = self.names.values().copied().collect();
                    warn!(tasks = ?left, "tasks still running at shutdown: aborted");
                    self.set.abort_all();
                    while self.set.join_next().await.is_some() {}
                    return;
                }
            }
        }
    }
}

/// What bootstrap brought up.
struct Up {
    tasks: Tasks,
    picket: Option<crux_picket::runner::Picket>,
}

/// Listeners bound before the node joins, served from their bootstrap step on.
struct Listeners {
    grpc: TcpListener,
    pastiche: crux_pastiche::store::Store,
}

/// Steps 1 (the wait for a flock) to 5. `Ok(None)`: a signal came first.
async fn bootstrap(
    steps: &Steps,
    handle: &DriverHandle,
    settings: &Settings,
    began: Instant,
    listeners: Listeners,
    servers: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Up>> {
    // Step 1 ends once this node is in a flock with a known leader (its own, if alone).
    let mut watch = handle.watch();
    let mut waited = Duration::ZERO;
    loop {
        let snap = watch.borrow_and_update().clone();
        if let Some(l) = snap.leader {
            let detail = format!(
                "node {} at {}, {} live member(s), leader {} term {}",
                snap.identity.id, snap.identity.addr, snap.live, l.id, l.term
            );
            steps.done(1, began, &detail);
            break;
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(None),
            r = watch.changed() => if r.is_err() {
                // The driver ends only after a shutdown (which may have won the race to here).
                if stop.is_cancelled() {
                    return Ok(None);
                }
                bail!("flock driver stopped during bootstrap")
            },
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                waited += Duration::from_secs(5);
                info!(waited = ?waited, live = snap.live, "bootstrap step 1/5 flock: waiting for a leader");
            }
        }
    }

    // Step 2: the heartbeater and the registry replica, linked to the steward; the local socket.
    let began = now_instant();
    let reeve = steps.state.reeve.clone();
    let mut tasks = Tasks::default();
    tasks.spawn(
        "steward link",
        crux_reeve::link::run(reeve.clone(), servers.clone()),
    );
    let store = listeners.pastiche.clone();
    let puller = crux_pastiche::pull::Puller::new(store.clone(), reeve.clone());
    let cache =
        crux_pastiche::cache::CacheService::new(store.clone(), puller.clone(), reeve.clone());
    let listener = crate::rpc::bind(&settings.socket).await?;
    let (placement_tx, placement_rx) = tokio::sync::watch::channel(None);
    let local = crate::rpc::serve(
        listener,
        steps.state.clone(),
        cache,
        placement_rx,
        servers.clone(),
    );
    tasks.spawn("local API", async move {
        if let Err(e) = local.await {
            warn!(error = %e, "local API server ended");
        }
    });
    steps.done(
        2,
        began,
        &format!(
            "local API on {} (mode 0660); registry replica and steward link running, \
             heartbeat interval {:?}",
            settings.socket.display(),
            settings.registry.heartbeat_interval
        ),
    );

    // Step 3: the node gRPC port, and the steward while this node leads.
    let began = now_instant();
    let (current_tx, current_rx) = tokio::sync::watch::channel(None);
    let snap = handle.snapshot();
    let netid = SocketAddr::new(snap.identity.addr.ip(), settings.grpc_port);
    tasks.spawn(
        "steward",
        crate::steward::supervise(
            handle.clone(),
            netid,
            reeve.clone(),
            StewardConfig {
                grace: settings.registry.grace,
                seed_valid: settings.registry.heartbeat_interval * 5,
                ..StewardConfig::default()
            },
            current_tx,
            servers.clone(),
        ),
    );
    let peer = crux_pastiche::serve::PeerService::new(store.clone(), settings.pastiche_corrupt);
    if settings.pastiche_corrupt {
        warn!(
            "pastiche.corrupt_serving_for_tests is set: every piece this node serves is corrupted"
        );
    }
    let durable = steps.state.store.clone();
    tasks.spawn(
        "store voters",
        crate::store::supervise(
            handle.clone(),
            durable.clone(),
            settings.grpc_port,
            settings.store_voter_grace,
            Duration::from_secs(1),
            Duration::from_secs(5),
            servers.clone(),
        ),
    );
    tasks.spawn(
        "store leader follower",
        crate::store::follow_leader(
            handle.clone(),
            durable.clone(),
            settings.grpc_port,
            Duration::from_secs(1),
            servers.clone(),
        ),
    );
    let (dean_tx, dean_rx) = tokio::sync::watch::channel(None);
    let (status_tx, status_rx) = tokio::sync::watch::channel(None);
    let node_server = crate::steward::serve(
        listeners.grpc,
        steps.state.transport.clone(),
        current_rx,
        peer,
        durable.service(),
        crate::proctor::PlacementNode::new(dean_rx, status_rx.clone()),
        servers.clone(),
    );
    tasks.spawn("node gRPC", async move {
        if let Err(e) = node_server.await {
            warn!(error = %e, "node gRPC server ended");
        }
    });
    let leads = snap.leader.map(|l| l.id) == Some(snap.identity.id);
    steps.done(
        3,
        began,
        &format!(
            "node gRPC on {netid}; the steward runs on the leader ({})",
            if leads {
                "this node, now"
            } else {
                "another node, now"
            }
        ),
    );

    // Step 4: picket: re-adopts the plugins a previous agent left running; the built-ins.
    let began = now_instant();
    let picket_dir = settings.data_dir.join("picket");
    let picket = crux_picket::runner::Picket::open(crux_picket::runner::PicketConfig {
        dir: picket_dir.clone(),
        reeve_socket: settings.socket.clone(),
        node_ip: netid.ip(),
        grace: settings.picket.stop_grace,
        handshake_timeout: Duration::from_secs(10),
        backoff_min: settings.picket.backoff,
        backoff_max: Duration::from_secs(30),
        crash_loop: settings.picket.crash_loop,
        stable: Duration::from_secs(10),
    })
    .await
    .with_context(|| format!("opening picket in {}", picket_dir.display()))?;
    let adopted = picket.units().len();
    tasks.spawn(
        "pastiche announce",
        crux_pastiche::cache::announce(
            store.clone(),
            puller.clone(),
            reeve.clone(),
            Duration::from_secs(1),
            servers.clone(),
        ),
    );
    let builtins = crate::pastiche::start_builtin(
        &reeve,
        netid,
        settings.registry.heartbeat_interval,
        servers.clone(),
    )?;
    steps.done(
        4,
        began,
        &format!(
            "{adopted} plugin(s) re-adopted; built-in pastiche1 running ({} of {} bytes used in {})",
            store.used_bytes(),
            store.max_bytes(),
            settings.pastiche_dir.display()
        ),
    );

    // Step 5: the dean here, the proctor while this node leads.
    let began = now_instant();
    if stop.is_cancelled() {
        return Ok(Some(Up {
            tasks,
            picket: Some(picket),
        }));
    }
    let dean = crate::dean::Dean::new(crate::dean::DeanParts {
        node: snap.identity.id.to_string(),
        attributes: crate::dean::attributes(netid.ip(), &settings.node_attributes),
        picket: picket.clone(),
        pastiche: store.clone(),
        puller,
        store: durable.clone(),
        dir: picket_dir,
        failed_hold: settings.picket.failed_hold,
    })?;
    dean_tx.send_replace(Some(dean.clone()));
    tasks.spawn("dean", dean.clone().run(servers.clone()));
    tasks.spawn(
        "proctor",
        crate::proctor::supervise(
            handle.clone(),
            durable.clone(),
            dean.clone(),
            steps.state.transport.clone(),
            settings.grpc_port,
            status_tx,
            servers.clone(),
        ),
    );
    placement_tx.send_replace(Some(crate::placement::PlacementLocal::new(
        steps.state.clone(),
        dean,
        status_rx,
        builtins,
    )));
    steps.done(5, began, "dean running; the proctor runs on the leader");
    steps.state.set_ready();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    info!(
        elapsed_ms = steps.start.elapsed().as_millis() as u64,
        "ready"
    );
    Ok(Some(Up {
        tasks,
        picket: Some(picket),
    }))
}

/// The steward the reeve should link to, following the flock's leader: its id, term and NetID
/// (the leader's IP and the node gRPC port, the same on every node of a bloc).
fn steward_target(
    handle: &DriverHandle,
    grpc_port: u16,
    stop: CancellationToken,
) -> tokio::sync::watch::Receiver<Option<Target>> {
    let of = move |snap: &crux_flock::driver::Snapshot| {
        snap.leader.map(|l| Target {
            leader: l.id.to_string(),
            term: l.term,
            steward: crux_steward::server::netid(l.addr, grpc_port),
        })
    };
    let mut flock = handle.watch();
    let (tx, rx) = tokio::sync::watch::channel(of(&flock.borrow_and_update()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = flock.changed() => if r.is_err() { return },
            }
            let t = of(&flock.borrow_and_update());
            tx.send_if_modified(|old| {
                let changed = *old != t;
                *old = t;
                changed
            });
        }
    });
    rx
}

/// Logs the flock's events until it stops; a node the flock revoked shuts down (`stop`).
async fn log_events(handle: DriverHandle, stop: CancellationToken) {
    let mut events = handle.subscribe();
    loop {
        match events.recv().await {
            Ok(Event::MemberJoined(m)) => info!(id = %m.id, addr = %m.addr, "member joined"),
            Ok(Event::MemberUpdated(m)) => {
                tracing::debug!(id = %m.id, addr = %m.addr, inc = m.incarnation, "member updated")
            }
            Ok(Event::MemberSuspect(m)) => info!(id = %m.id, addr = %m.addr, "member suspect"),
            Ok(Event::MemberDead(m)) => info!(id = %m.id, addr = %m.addr, "member dead"),
            Ok(Event::MemberLeft(m)) => info!(id = %m.id, addr = %m.addr, "member left"),
            Ok(Event::MemberReaped(id)) => info!(%id, "member reaped"),
            Ok(Event::LeaderChanged(Some(l))) => {
                info!(leader = %l.id, addr = %l.addr, term = l.term, "leader changed")
            }
            Ok(Event::LeaderChanged(None)) => info!("no leader known"),
            Ok(Event::LeaveComplete) => info!("leave gossiped"),
            Ok(Event::KeyringChanged) => info!("keyring changed"),
            Ok(Event::KeyringRefused(reason)) => warn!(%reason, "keyring change refused"),
            Ok(Event::MemberRevoked(id)) => warn!(%id, "member revoked: kept out of the flock"),
            Ok(Event::Revoked) => {
                tracing::error!(
                    "this node was revoked by the flock: it left, and the others keep it out; \
                     shutting down"
                );
                stop.cancel();
            }
            #[allow(unreachable_patterns)] // events the security work adds are logged as they are
            Ok(other) => info!(event = ?other, "flock event"),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                warn!(missed = n, "event log fell behind")
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Settings {
        RawConfig::from_toml(toml).unwrap().validate().unwrap()
    }

    #[test]
    fn advertise_is_chosen_for_a_wildcard_bind() {
        // Given: the kernel's route towards the first seed decides.
        let s = settings("bloc = \"b\"\nbind = \"0.0.0.0:7700\"\nseeds = [\"127.0.0.5:7700\"]");
        let a = resolve_advertise(&s).unwrap();
        assert!(a.ip().is_loopback() && a.port() == 7700, "{a}");
        // Named: taken as is.
        let s = settings("bloc = \"b\"\nbind = \"0.0.0.0:7700\"\nadvertise = \"10.1.2.3:7700\"");
        assert_eq!(
            resolve_advertise(&s).unwrap(),
            "10.1.2.3:7700".parse().unwrap()
        );
        // Nowhere to look and nothing named: the error names the field.
        let s = settings("bloc = \"b\"\nbind = \"0.0.0.0:7700\"");
        assert_eq!(resolve_advertise(&s).unwrap_err().field, "advertise");
    }
}
