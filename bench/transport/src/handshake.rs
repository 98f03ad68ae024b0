//! Time to an established connection: plain TCP connect against `Transport::connect` (TCP
//! connect, TLS 1.3 with Ed25519 raw public keys both ways, bloc proof both ways).

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{join, now, on_thread, pair, thread_cpu, Plane as Path};

struct Run {
    /// Sorted.
    samples: Vec<Duration>,
    client_cpu: Duration,
    server_cpu: Duration,
    total: usize,
}

/// `warmup` untimed then `n` timed connections, one after the other; each is dropped as soon as
/// it is established. The server accepts (and for the node plane, completes its side of the
/// handshake) on its own thread.
fn run(path: Path, n: usize, warmup: usize) -> anyhow::Result<Run> {
    let (a, b) = pair()?;
    let stop = CancellationToken::new();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let s = stop.clone();
    let srv = on_thread("acceptor", move || async move {
        let listener = TcpListener::from_std(std_listener)?;
        let cpu0 = thread_cpu();
        match path {
            Path::Tcp => loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    c = listener.accept() => drop(c?),
                }
            },
            Path::Node => {
                let mut incoming = Box::pin(b.incoming(listener, s.clone()));
                loop {
                    tokio::select! {
                        _ = s.cancelled() => break,
                        c = incoming.next() => match c {
                            Some(c) => drop(c?),
                            None => break,
                        },
                    }
                }
            }
        }
        Ok(thread_cpu() - cpu0)
    });
    let cli = on_thread("dialer", move || async move {
        let mut samples = Vec::with_capacity(n);
        let mut cpu = Duration::ZERO;
        for i in 0..warmup + n {
            let cpu0 = thread_cpu();
            let t0 = now();
            match path {
                Path::Tcp => {
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    drop(s);
                }
                Path::Node => drop(a.connect(addr, None).await?),
            }
            let took = t0.elapsed();
            if i >= warmup {
                samples.push(took);
                cpu += thread_cpu() - cpu0;
            }
        }
        Ok((samples, cpu))
    });
    let dialled = join(cli);
    stop.cancel();
    let server_cpu = join(srv)?;
    let (mut samples, client_cpu) = dialled?;
    samples.sort();
    Ok(Run {
        samples,
        client_cpu,
        server_cpu,
        total: warmup + n,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Runs and prints the handshake table.
pub fn report(n: usize, warmup: usize) -> anyhow::Result<()> {
    let n = n.max(1);
    println!(
        "handshake: {n} connections one after the other on loopback (after {warmup} untimed), \
         each dropped once established; ms"
    );
    println!(
        "  {:<46} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>11}",
        "path", "min", "median", "p99", "max", "mean", "client CPU", "server CPU"
    );
    for (name, path) in [
        ("plain TCP connect", Path::Tcp),
        ("node plane: TCP + TLS 1.3 + bloc proof", Path::Node),
    ] {
        let r = run(path, n, warmup)?;
        let s = &r.samples;
        let mean = s.iter().sum::<Duration>() / s.len() as u32;
        let p99 = s[((s.len() * 99).div_ceil(100)).saturating_sub(1)];
        println!(
            "  {:<46} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>11}",
            name,
            ms(s[0]),
            ms(s[s.len() / 2]),
            ms(p99),
            ms(s[s.len() - 1]),
            ms(mean),
            ms(r.client_cpu / n as u32),
            // The server's thread ran every connection, warm-up included.
            ms(r.server_cpu / r.total as u32),
        );
    }
    println!("  (CPU columns: ms of that side's thread per connection)");
    Ok(())
}
