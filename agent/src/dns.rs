//! DNS on this node: the [`crux_dns::Catalog`] over the node's registry replica and its view of
//! the flock, and the server started at the end of bootstrap step reeve (README "DNS").

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crux_proto::grpc::reeve::v1 as rpb;
use crux_proto::grpc::steward::v1::Instance;
use crux_service::{node_name, FlockWatch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// What DNS reads: the replica (answers keep coming while the steward moves) and the flock view.
struct NodeCatalog {
    reeve: Arc<crux_reeve::Reeve>,
    view: FlockWatch,
}

impl NodeCatalog {
    fn lookup(&self, selector: String, horde: &str) -> Vec<crux_dns::Instance> {
        let req = rpb::LookupRequest {
            selector,
            horde: horde.to_string(),
            live_only: true,
        };
        match self.reeve.lookup(&req) {
            Ok(r) => r.instances.iter().map(to_dns).collect(),
            // A name that is no selector (odd characters) has no instances.
            Err(_) => Vec::new(),
        }
    }
}

fn to_dns(i: &Instance) -> crux_dns::Instance {
    let (ip, port) = match i.addr.parse::<SocketAddr>() {
        Ok(a) => (Some(a.ip()), a.port()),
        Err(_) => match i.addr.rsplit_once(':') {
            Some((host, port)) => (host.parse().ok(), port.parse().unwrap_or(0)),
            None => (i.addr.parse().ok(), 0),
        },
    };
    let mut metadata: Vec<(String, String)> = i
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort();
    crux_dns::Instance {
        inst: i.inst.clone(),
        ip,
        port,
        node: i.node.clone(),
        metadata,
    }
}

impl crux_dns::Catalog for NodeCatalog {
    fn service(&self, api: &str, horde: &str) -> Vec<crux_dns::Instance> {
        self.lookup(format!("api:{api}"), horde)
    }

    fn instance(&self, inst: &str, horde: &str) -> Option<crux_dns::Instance> {
        self.lookup(format!("inst:{inst}"), horde)
            .into_iter()
            .next()
    }

    fn node(&self, node: &str) -> Option<IpAddr> {
        let view = self.view.borrow();
        let found = view
            .live_members()
            .find(|m| node_name(m.id).eq_ignore_ascii_case(node))
            .map(|m| m.addr.ip());
        found
    }

    fn leader(&self) -> Option<IpAddr> {
        self.view.borrow().leader.map(|l| l.addr.ip())
    }
}

/// Starts DNS (when `config` is set) under a supervisor, which a reload asks to run on new
/// settings ([`crate::ops::Ops::reload`]) through the returned sender; the returned future is the
/// supervisor, for the caller's task set, and ends at `stop`. A bind failure at start does not
/// stop the agent: it is logged as an error and DNS stays off on this node until a reload turns
/// it on.
pub async fn start(
    reeve: Arc<crux_reeve::Reeve>,
    view: FlockWatch,
    stats: Arc<crux_dns::Stats>,
    config: Option<crux_dns::DnsConfig>,
    stop: CancellationToken,
) -> (
    tokio::sync::mpsc::Sender<crate::ops::DnsApply>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let catalog: Arc<dyn crux_dns::Catalog> = Arc::new(NodeCatalog { reeve, view });
    let mut sup = Supervisor {
        catalog,
        stats,
        stop,
        running: None,
    };
    match config {
        None => info!("dns: off (dns.enabled = false)"),
        Some(config) => {
            if let Err(e) = sup.apply(Some(config)).await {
                error!(error = %e, "dns: not served (set dns.bind, or dns.enabled = false)");
            }
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (tx, sup.run(rx))
}

/// Owns the DNS server task and restarts it on new settings.
struct Supervisor {
    catalog: Arc<dyn crux_dns::Catalog>,
    stats: Arc<crux_dns::Stats>,
    stop: CancellationToken,
    running: Option<Running>,
}

struct Running {
    config: crux_dns::DnsConfig,
    addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn same(a: &crux_dns::DnsConfig, b: &crux_dns::DnsConfig) -> bool {
    let key = |c: &crux_dns::DnsConfig| {
        (
            c.bind,
            c.domain.clone(),
            c.ttl_s,
            c.rate_per_s,
            c.burst,
            c.forward.clone(),
            c.forward_timeout,
        )
    };
    key(a) == key(b)
}

impl Supervisor {
    async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<crate::ops::DnsApply>) {
        loop {
            let (config, done) = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                got = rx.recv() => match got {
                    Some(got) => got,
                    None => break,
                },
            };
            let _ = done.send(self.apply(config).await);
        }
        self.stop_running().await;
    }

    async fn stop_running(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop.cancel();
            let _ = r.task.await;
        }
    }

    async fn bind(&self, config: &crux_dns::DnsConfig) -> Result<crux_dns::Dns, String> {
        crux_dns::Dns::bind(config, self.catalog.clone(), self.stats.clone())
            .await
            .map_err(|e| e.to_string())
    }

    fn spawn(&mut self, dns: crux_dns::Dns, config: crux_dns::DnsConfig) -> String {
        let addr = dns.local_addr();
        info!(%addr, domain = %config.domain, ttl_s = config.ttl_s, "dns: serving UDP and TCP");
        let stop = self.stop.child_token();
        let task = tokio::spawn(dns.run(stop.clone()));
        self.running = Some(Running {
            config,
            addr,
            stop,
            task,
        });
        format!("serving on {addr}")
    }

    /// Runs on `config` (None: off). On an error the server that ran keeps running.
    async fn apply(&mut self, config: Option<crux_dns::DnsConfig>) -> Result<String, String> {
        let Some(config) = config else {
            self.stop_running().await;
            info!("dns: off (dns.enabled = false)");
            return Ok("off".into());
        };
        match &self.running {
            Some(r) if same(&r.config, &config) => return Ok(format!("serving on {}", r.addr)),
            // A new address: bound before the old server stops, so a failure changes nothing.
            Some(r) if r.config.bind != config.bind => {
                let dns = self.bind(&config).await?;
                self.stop_running().await;
                return Ok(self.spawn(dns, config));
            }
            _ => {}
        }
        // The same address (or nothing ran): the old server lets go of it first.
        let old = self.running.as_ref().map(|r| r.config.clone());
        self.stop_running().await;
        match self.bind(&config).await {
            Ok(dns) => Ok(self.spawn(dns, config)),
            Err(e) => {
                if let Some(old) = old {
                    if let Ok(dns) = self.bind(&old).await {
                        self.spawn(dns, old);
                    }
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::DnsSection;

    fn field_of(d: DnsSection) -> String {
        d.check().expect_err("refused").field
    }

    #[test]
    fn the_dns_section_is_checked_field_by_field() {
        let on = DnsSection::default()
            .check()
            .unwrap()
            .expect("on by default");
        assert_eq!(on.bind, "127.0.0.1:8600".parse().unwrap());
        assert_eq!((on.domain.as_str(), on.ttl_s), ("crux.", 5));
        let off = DnsSection {
            enabled: false,
            bind: "not checked when off".into(),
            ..Default::default()
        };
        assert!(off.check().unwrap().is_none());
        let bad_bind = DnsSection {
            bind: "8600".into(),
            ..Default::default()
        };
        assert_eq!(field_of(bad_bind), "dns.bind");
        let forward = DnsSection {
            forward: vec!["10.0.0.53".into(), "127.0.0.1:5353".into()],
            ..Default::default()
        };
        let on = forward.check().unwrap().unwrap();
        assert_eq!(
            on.forward,
            vec![
                "10.0.0.53:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap()
            ]
        );
        for bad in ["resolver.example", "127.0.0.1:8600"] {
            let d = DnsSection {
                forward: vec![bad.into()],
                ..Default::default()
            };
            assert_eq!(field_of(d), "dns.forward", "{bad}");
        }
        let d = DnsSection {
            forward_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        assert_eq!(field_of(d), "dns.forward_timeout");
        for ttl in [Duration::from_millis(1500), Duration::from_secs(3601)] {
            let d = DnsSection {
                ttl,
                ..Default::default()
            };
            assert_eq!(field_of(d), "dns.ttl");
        }
        let long_label = "a".repeat(64);
        for domain in ["", ".", "a..b", long_label.as_str()] {
            let d = DnsSection {
                domain: domain.into(),
                ..Default::default()
            };
            assert_eq!(field_of(d), "dns.domain", "{domain:?}");
        }
        let zero = DnsSection {
            ttl: Duration::ZERO,
            domain: "dc1.example".into(),
            ..Default::default()
        };
        assert_eq!(zero.check().unwrap().unwrap().ttl_s, 0);
    }
}
