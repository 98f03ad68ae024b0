//! `crux agent`: loads the config, prepares everything that can fail before the node shows
//! itself (data dir, identity, keyring, every listener, the stores, the flock driver), then
//! runs the bootstrap table ([`crate::bootstrap`]: flock → reeve → steward → store → picket →
//! proctor → pastiche, each step logged with its elapsed time), and stays up until SIGTERM or
//! SIGINT.
//!
//! Ready (sd_notify `READY=1`, HTTP `/ready` → 200) only once every step of the table serves:
//! the store, for one, once it takes writes (a leader whose first entry committed).
//! On a signal the node leaves the flock first (so that the others stop routing to it), then the
//! steps are stopped in reverse order — placement before the plugins, the plugins before the
//! store, the node gRPC port and the local socket — and the store closes last; the agent exits 0.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use crux_flock::driver::{Driver, DriverConfig, DriverHandle, Exit};
use crux_flock::{Event, Flock, Identity, SecurityTiming};
use rand::RngCore;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bootstrap::{Boot, Tasks};
use crate::config::{AgentFlags, ConfigError, RawConfig, Settings};
use crate::keys::Keys;
use crate::state::AgentState;
use crux_reeve::{Reeve, ReeveConfig, Target};

/// Exit code of a config error.
pub const EXIT_CONFIG: i32 = 2;

/// How often the agent looks whether every step serves (to send sd_notify `READY=1` and log the
/// changes).
const READY_LOOK_EVERY: Duration = Duration::from_millis(100);

/// Runs the agent; returns the process exit code.
pub fn main(flags: &AgentFlags) -> i32 {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let loaded = RawConfig::load(flags, env.clone())
        .and_then(|raw| raw.validate().map(|settings| (raw, settings)));
    let (raw, settings) = match loaded {
        Ok(s) => s,
        Err(e) => {
            report_config_error(&RawConfig::locate(e, flags, &env));
            return EXIT_CONFIG;
        }
    };
    let logs = init_logging(&settings.log_level);
    let started_with = Started {
        flags: flags.clone(),
        env,
        raw,
        logs,
    };
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
    match rt.block_on(run(settings, started_with)) {
        Ok(()) => 0,
        Err(e) => {
            // One line on stderr (where the log goes too): what, where, and that it stopped.
            eprintln!("crux agent: {e:#}");
            1
        }
    }
}

fn report_config_error(e: &ConfigError) {
    eprintln!("crux agent: {e}");
}

/// The log: `RUST_LOG` when set and valid, else the config's `log_level`; reloadable, with
/// watchers (`crate::logs`).
fn init_logging(level: &str) -> std::sync::Arc<crate::logs::Logs> {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| crate::logs::check_filter(v).is_ok())
        .unwrap_or_else(|| level.to_string());
    crate::logs::init(&filter)
}

/// How the agent was started: what a reload reads again, and the log controls.
struct Started {
    flags: AgentFlags,
    env: Vec<(String, String)>,
    raw: RawConfig,
    logs: std::sync::Arc<crate::logs::Logs>,
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

/// The lock file in the data dir: held (an exclusive `flock`) by the agent that uses the dir.
pub const LOCK_FILE: &str = "lock";

/// Makes the data dir if need be, checks that this process may write it, and takes its lock:
/// two agents on one data dir would share a node id and overwrite each other's files. The lock
/// is held while the returned file is open (the agent's life); the file then holds this agent's
/// pid, for the message the next one would show.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::Read;
    let denied = |what: &str, e: &std::io::Error| {
        anyhow::anyhow!(
            "data dir {}: {what}: {e} (config field `data_dir`; the agent runs as uid {} and \
             needs to create and write files there)",
            dir.display(),
            nix_uid()
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| denied("cannot create it", &e))?;
    let path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| denied("cannot write in it", &e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            anyhow::bail!(
                "data dir {} is in use by another agent{} (it holds {}): each agent needs a \
                 data dir of its own (config field `data_dir`); nothing was changed",
                dir.display(),
                if holder.is_empty() {
                    String::new()
                } else {
                    format!(", pid {holder}")
                },
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("locking {}: {e}", path.display())
        }
    }
    Ok(file)
}

/// Writes this agent's pid into the data dir's lock file it holds (once the start can no longer
/// be refused: a refused start changes nothing in the data dir).
fn record_pid(lock: &mut std::fs::File, dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Seek, Write};
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .with_context(|| format!("writing {}", dir.join(LOCK_FILE).display()))
}

/// This process's user id (for messages).
fn nix_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// A listener that could not be bound, as one line: what, where, and which config field sets it.
fn bind_error(what: &str, field: &str, addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "port {} on {} is in use by another process",
            addr.port(),
            addr.ip()
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("{} is not an address of this host", addr.ip())
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "binding port {} needs privileges this process lacks",
            addr.port()
        ),
        _ => format!("cannot bind {addr}"),
    };
    anyhow::anyhow!("{what} {addr}: {why} ({e}; config field `{field}`); nothing was changed")
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
        None => Err(ConfigError::new(
            "advertise",
            format!(
                "bind address {} is a wildcard and no local address could be chosen from the \
                 seeds or the address space; set advertise to this node's ip:port",
                s.bind
            ),
        )),
    }
}

async fn run(settings: Settings, started_with: Started) -> anyhow::Result<()> {
    let start = now_instant();
    let stop = CancellationToken::new();
    watch_signals(stop.clone())?;
    // SIGHUP reloads the config (from bootstrap step reeve on); caught from here on so that an
    // early one does not end the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing SIGHUP handler")?;

    // ---- step 1: flock -------------------------------------------------------------------
    // Everything that can refuse the start is checked before anything in the data dir is
    // written: the data dir (writable, and not another agent's), every listener, the keyring.
    let began = tokio::time::Instant::now();
    let mut lock = lock_data_dir(&settings.data_dir)?;
    // Every listener is bound before the node shows itself to the flock: a port in use fails
    // the start without a join-then-vanish.
    let udp = UdpSocket::bind(settings.bind)
        .await
        .map_err(|e| bind_error("flock UDP", "bind", settings.bind, e))?;
    let tcp = TcpListener::bind(settings.bind)
        .await
        .map_err(|e| bind_error("flock TCP (push-pull streams)", "bind", settings.bind, e))?;
    let grpc_addr = SocketAddr::new(settings.bind.ip(), settings.grpc_port);
    let grpc_listener = TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| bind_error("node gRPC", "grpc_port", grpc_addr, e))?;
    let http_listener = match settings.http {
        Some(http) => Some(
            TcpListener::bind(http)
                .await
                .map_err(|e| bind_error("HTTP", "http_port", http, e))?,
        ),
        None => None,
    };
    let keyring = crate::keys::load(&settings.keyring)?;
    let addr = resolve_advertise(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    info!(version = env!("CARGO_PKG_VERSION"), bloc = %settings.flock.bloc, "crux agent starting");
    record_pid(&mut lock, &settings.data_dir)?;
    let id = crate::identity::load_or_create_node_id(&settings.data_dir)?;
    let transport = crate::identity::node_transport(&settings.data_dir)?;
    let boot = crate::identity::next_boot_id(&settings.data_dir, unix_ms())?;
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
    // The flock step's tasks follow the driver until it ends (after the node left).
    let mut tasks = Tasks::default();
    tasks.spawn("flock", "events", log_events(handle.clone(), stop.clone()));
    tasks.spawn(
        "flock",
        "keyring file",
        crate::keys::save_changes(handle.clone(), settings.keyring.clone()),
    );
    // Node-plane connections, both ways, prove the bloc's key and a key the flock lists from
    // here on.
    tasks.spawn(
        "flock",
        "bloc keys",
        crate::keys::follow_bloc_keys(&handle, &settings.flock.bloc, &keyring, transport.clone()),
    );
    tasks.spawn(
        "flock",
        "node-plane peers",
        crate::steward::follow_peers(handle.clone(), transport.clone()),
    );
    let (view, follow) = crate::view::follow(&handle, tasks.token("flock"));
    tasks.spawn("flock", "view", follow);
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
    let (target, follow) = steward_target(&handle, settings.grpc_port, tasks.token("flock"));
    tasks.spawn("flock", "steward target", follow);
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
        target,
    );
    let ops = std::sync::Arc::new(crate::ops::Ops::new(
        started_with.flags,
        started_with.env,
        started_with.raw,
        started_with.logs,
        pastiche_store.clone(),
        addr.ip(),
    ));
    let state = AgentState::new(
        handle.clone(),
        settings.clone(),
        keys,
        reeve,
        store.clone(),
        pastiche_store.clone(),
        transport,
        ops,
        start,
        &crate::bootstrap::rows(),
    );
    let mut http_task = None;
    if let (Some(http), Some(listener)) = (settings.http, http_listener) {
        info!(%http, "HTTP /metrics and /ready listening");
        http_task = Some(tokio::spawn(crate::http::serve(
            listener,
            state.clone(),
            servers.clone(),
        )));
    }

    let mut boot = Boot::new(
        state.clone(),
        handle.clone(),
        settings.clone(),
        stop.clone(),
        tasks,
        view,
        grpc_listener,
        pastiche_store,
    );
    boot.hup = Some(hup);
    // Step 1's work began with the data dir; its row of the table waits for a leader.
    let outcome = crate::bootstrap::run(&mut boot, began).await;
    match &outcome {
        Ok(true) => {
            state.set_bootstrapped();
            info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "bootstrap done: every step started"
            );
            // ---- serve until a signal ----------------------------------------------------
            // Ready (sd_notify READY=1, once) when every step serves; later changes are logged.
            let mut notified = false;
            let mut was_ready = false;
            let mut look = tokio::time::interval(READY_LOOK_EVERY);
            loop {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    (step, name, how) = boot.tasks.next_ended() => match how {
                        Err(e) if e.is_panic() => {
                            tracing::error!(step, task = name, "task panicked")
                        }
                        _ => warn!(step, task = name, "task ended before shutdown"),
                    },
                    _ = look.tick() => {
                        let o = state.overall();
                        if o.ready && !notified {
                            notified = true;
                            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                            info!(
                                elapsed_ms = start.elapsed().as_millis() as u64,
                                "ready: every step serves"
                            );
                        } else if o.ready && !was_ready {
                            info!("ready again: every step serves");
                        } else if !o.ready && was_ready {
                            warn!(
                                missing = o.missing.as_deref().unwrap_or(""),
                                "not ready any more"
                            );
                        }
                        was_ready = o.ready;
                    }
                }
            }
        }
        Ok(false) => {}
        Err(_) => stop.cancel(),
    }

    // ---- shutdown: leave the flock first, then the steps in reverse order -----------------
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let exit = driver_task.await.context("flock driver task")?;
    match exit {
        Exit::Left => info!("left the flock"),
        Exit::LeaveTimedOut => warn!("leave not confirmed within {:?}", settings.leave_timeout),
    }
    // Open client connections get a moment to finish; a stuck one does not hold the exit.
    let drain = Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + drain;
    for def in crate::bootstrap::TABLE.iter().rev() {
        boot.tasks.stop_step(def.name, deadline).await;
        if def.name == "picket" {
            if let Some(p) = boot.picket.take() {
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
        }
    }
    servers.cancel();
    store.shutdown().await;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(drain, t).await;
    }
    let _ = std::fs::remove_file(&settings.socket);
    info!(uptime = ?start.elapsed(), "crux agent stopped");
    outcome.map(|_| ())
}

/// The steward the reeve should link to, following the flock's leader: its id, term and NetID
/// (the leader's IP and the node gRPC port, the same on every node of a bloc).
fn steward_target(
    handle: &DriverHandle,
    grpc_port: u16,
    stop: CancellationToken,
) -> (
    tokio::sync::watch::Receiver<Option<Target>>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let of = move |snap: &crux_flock::driver::Snapshot| {
        snap.leader.map(|l| Target {
            leader: l.id.to_string(),
            term: l.term,
            steward: crux_steward::server::netid(l.addr, grpc_port),
        })
    };
    let mut flock = handle.watch();
    let (tx, rx) = tokio::sync::watch::channel(of(&flock.borrow_and_update()));
    let task = async move {
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
    };
    (rx, task)
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
