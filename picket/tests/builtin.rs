//! Built-in services under `run_builtin`: their alive messages become reeve registrations.
//! Reference: the seed's `Galumph2_3(quit, alive, network)` and its heartbeats section.
//! Virtual time (paused tokio clock): the reeve's expiry reads the same clock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crux_picket::builtin::{from_fn, run_builtin, Fservice, Network, Static};
use crux_proto::grpc::reeve::v1 as rpb;
use crux_reeve::{Reeve, ReeveConfig};

const BEAT: Duration = Duration::from_millis(100);

fn reeve() -> Arc<Reeve> {
    let (_tx, rx) = tokio::sync::watch::channel(None);
    Reeve::new(
        ReeveConfig {
            node: "00000000000000b1".into(),
            boot: 1,
            local_ip: None,
            transport: crux_transport::Transport::generate().unwrap(),
            heartbeat_interval: BEAT,
            grace: Duration::from_secs(60),
            netid: "127.0.0.1:7701".into(),
        },
        rx,
    )
}

fn network() -> Network {
    Network {
        node_ip: "127.0.0.1".parse().unwrap(),
        node: "00000000000000b1".into(),
    }
}

fn point(api: &str, inst: &str, healthy: bool) -> Fservice {
    Fservice {
        api: api.into(),
        inst: inst.into(),
        netid: "127.0.0.1:7701".into(),
        healthy,
    }
}

/// (inst, addr) of the live instances of `selector`, after the reeve checks expiry.
fn live(r: &Reeve, selector: &str) -> Vec<(String, String)> {
    r.check_expiry();
    r.lookup(&rpb::LookupRequest {
        selector: selector.into(),
        horde: String::new(),
        live_only: true,
    })
    .unwrap()
    .instances
    .into_iter()
    .map(|i| (i.inst, i.addr))
    .collect()
}

/// Lets virtual time run for `d`.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn static_points_stay_registered_while_it_runs_and_go_on_quit() {
    let r = reeve();
    let quit = tokio_util::sync::CancellationToken::new();
    let s = Static::new(
        "pastiche",
        vec![point("pastiche1", "pastiche1_b1", true)],
        BEAT,
    );
    let h = run_builtin(Box::new(s), r.clone(), network(), quit.clone());
    run_for(BEAT / 2).await;
    assert_eq!(
        live(&r, "pastiche1"),
        vec![("pastiche1_b1".to_string(), "127.0.0.1:7701".to_string())]
    );
    // Far past one validity period (3 intervals): the heartbeats keep it live.
    run_for(BEAT * 30).await;
    assert_eq!(live(&r, "pastiche1").len(), 1);
    assert_eq!(r.local_len(), 1, "registered once, not again per message");
    quit.cancel();
    h.await.unwrap();
    assert!(live(&r, "pastiche1").is_empty());
    assert_eq!(r.local_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn points_missing_from_a_message_are_deregistered_and_health_follows() {
    let r = reeve();
    let quit = tokio_util::sync::CancellationToken::new();
    let (step_tx, step_rx) = tokio::sync::watch::channel(0u32);
    let b = from_fn("two", move |quit, alive, _net| {
        let mut step = step_rx.clone();
        Box::pin(async move {
            let mut tick = tokio::time::interval(BEAT);
            loop {
                tokio::select! {
                    _ = quit.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                    _ = step.changed() => {}
                }
                let pts = match *step.borrow() {
                    0 => vec![point("a1", "a1_1", true), point("b1", "b1_1", true)],
                    _ => vec![point("a1", "a1_1", false)],
                };
                if alive.send(pts).await.is_err() {
                    return Ok(());
                }
            }
        })
    });
    let h = run_builtin(Box::new(b), r.clone(), network(), quit.clone());
    run_for(BEAT / 2).await;
    assert_eq!(live(&r, "a1").len(), 1);
    assert_eq!(live(&r, "b1").len(), 1);
    step_tx.send(1).unwrap();
    run_for(BEAT / 2).await;
    assert!(live(&r, "b1").is_empty(), "b1 left the alive message");
    assert!(live(&r, "a1").is_empty(), "a1 is unhealthy, so not live");
    assert_eq!(r.local_len(), 1, "a1 is still registered");
    quit.cancel();
    h.await.unwrap();
    assert_eq!(r.local_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_failed_builtin_is_restarted_with_backoff_and_its_points_removed_meanwhile() {
    let r = reeve();
    let quit = tokio_util::sync::CancellationToken::new();
    let runs = Arc::new(AtomicU32::new(0));
    let n = runs.clone();
    let b = from_fn("flaky", move |quit, alive, _net| {
        let run = n.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            alive.send(vec![point("flaky1", "flaky1_1", true)]).await?;
            if run == 1 {
                tokio::time::sleep(BEAT).await;
                anyhow::bail!("first run fails");
            }
            if run == 2 {
                panic!("second run panics");
            }
            let mut tick = tokio::time::interval(BEAT);
            loop {
                tokio::select! {
                    _ = quit.cancelled() => return Ok(()),
                    _ = tick.tick() => { alive.send(vec![point("flaky1", "flaky1_1", true)]).await?; }
                }
            }
        })
    });
    let h = run_builtin(Box::new(b), r.clone(), network(), quit.clone());
    run_for(BEAT / 2).await;
    assert_eq!(live(&r, "flaky1").len(), 1);
    // The first run fails at BEAT; during the back-off (500 ms) nothing is registered.
    run_for(BEAT).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(r.local_len(), 0);
    // Second run (panics at once), then a back-off of 1 s, then the third run stays.
    run_for(Duration::from_secs(3)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    assert_eq!(live(&r, "flaky1").len(), 1);
    quit.cancel();
    h.await.unwrap();
    assert_eq!(r.local_len(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_builtin_that_cannot_be_restarted_stays_stopped() {
    struct Once;
    impl crux_picket::Builtin for Once {
        fn name(&self) -> &str {
            "once"
        }
        fn run(
            self: Box<Self>,
            _quit: tokio_util::sync::CancellationToken,
            alive: tokio::sync::mpsc::Sender<Vec<Fservice>>,
            _network: Network,
        ) -> crux_picket::builtin::BoxFuture<anyhow::Result<()>> {
            Box::pin(async move {
                alive.send(vec![point("once1", "once1_1", true)]).await?;
                tokio::time::sleep(BEAT).await;
                anyhow::bail!("broken")
            })
        }
    }
    let r = reeve();
    let h = run_builtin(
        Box::new(Once),
        r.clone(),
        network(),
        tokio_util::sync::CancellationToken::new(),
    );
    h.await.unwrap();
    assert_eq!(r.local_len(), 0);
}
