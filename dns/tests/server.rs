//! The server over real loopback sockets, on a catalog this test fills: the answers' shape, the
//! truncation and amplification bounds, malformed packets dropped and counted, the per-source
//! rate limit, TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crux_dns::limit::{udp_answer_limit, MAX_AMPLIFICATION};
use crux_dns::{Catalog, Dns, DnsConfig, Instance, Stats};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A catalog of fixed instances (the agent's is tested end to end in agent/tests/dns.rs).
#[derive(Default)]
struct Fixed {
    instances: Mutex<Vec<(String, Instance)>>,
}

impl Catalog for Fixed {
    fn service(&self, api: &str, horde: &str) -> Vec<Instance> {
        assert_eq!(horde, "");
        let g = self.instances.lock().unwrap();
        g.iter()
            .filter(|(a, _)| a == api)
            .map(|(_, i)| i.clone())
            .collect()
    }
    fn instance(&self, inst: &str, _horde: &str) -> Option<Instance> {
        let g = self.instances.lock().unwrap();
        g.iter().map(|(_, i)| i).find(|i| i.inst == inst).cloned()
    }
    fn node(&self, node: &str) -> Option<IpAddr> {
        (node == "00000000000000ab").then(|| "127.0.0.7".parse().unwrap())
    }
    fn leader(&self) -> Option<IpAddr> {
        Some("127.0.0.8".parse().unwrap())
    }
}

fn inst(name: &str, ip: &str, port: u16) -> Instance {
    Instance {
        inst: name.into(),
        ip: Some(ip.parse().unwrap()),
        port,
        node: "00000000000000ab".into(),
        metadata: vec![("color".into(), "blue".into())],
    }
}

struct Running {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: CancellationToken,
    client: UdpSocket,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(instances: Vec<(String, Instance)>, rate_per_s: u32, burst: u32) -> Running {
    let catalog = Arc::new(Fixed {
        instances: Mutex::new(instances),
    });
    let stats = Arc::new(Stats::default());
    let config = DnsConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        rate_per_s,
        burst,
        ..DnsConfig::default()
    };
    let dns = Dns::bind(&config, catalog, stats.clone()).await.unwrap();
    let addr = dns.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(dns.run(stop.clone()));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    Running {
        addr,
        stats,
        stop,
        client,
    }
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

impl Running {
    /// Sends `bytes`, returns the raw answer (None: none within 500 ms).
    async fn raw(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        self.client.send_to(bytes, self.addr).await.unwrap();
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(Duration::from_millis(500), self.client.recv_from(&mut buf))
            .await
        {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    async fn ask(&self, name: &str, qtype: RecordType, edns: Option<u16>) -> (usize, Message) {
        let q = query(name, qtype, edns);
        let a = self.raw(&q).await.expect("an answer");
        (a.len(), Message::from_vec(&a).expect("a DNS message"))
    }

    fn count(&self, label: &str) -> u64 {
        self.stats
            .queries()
            .into_iter()
            .chain(self.stats.drops())
            .find(|(l, _)| *l == label)
            .map(|(_, n)| n)
            .unwrap()
    }
}

fn ips(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn answers_by_name() {
    let s = start(
        vec![
            ("svc".into(), inst("svc_10", "127.0.0.2", 40010)),
            ("svc".into(), inst("svc_9", "127.0.0.1", 40009)),
        ],
        0,
        0,
    )
    .await;
    let (_, m) = s.ask("svc.service.crux.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(ips(&m), ["127.0.0.2", "127.0.0.1"]);
    assert_eq!(m.answers[0].ttl, 5);

    let (_, m) = s
        .ask("_svc._tcp.service.crux.", RecordType::SRV, None)
        .await;
    let srv: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(
        srv,
        ["0 1 40010 svc_10.inst.crux.", "1 1 40009 svc_9.inst.crux."]
    );
    assert_eq!(m.additionals.len(), 2);

    let (_, m) = s.ask("svc_9.inst.crux.", RecordType::TXT, None).await;
    assert_eq!(m.answers.len(), 1);
    let txt = m.answers[0].data.to_string();
    assert!(
        txt.contains("inst=svc_9") && txt.contains("color=blue"),
        "{txt}"
    );

    let (_, m) = s
        .ask("00000000000000ab.node.crux.", RecordType::A, None)
        .await;
    assert_eq!(ips(&m), ["127.0.0.7"]);
    let (_, m) = s.ask("leader.crux.", RecordType::A, None).await;
    assert_eq!(ips(&m), ["127.0.0.8"]);
    // An address family the name has not: no data, with the SOA.
    let (_, m) = s.ask("leader.crux.", RecordType::AAAA, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

    for name in ["nosuch.service.crux.", "x.y.z.crux.", "ffff.node.crux."] {
        let (_, m) = s.ask(name, RecordType::A, None).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }
    let (_, m) = s.ask("example.com.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    assert!(m.answers.is_empty() && m.authorities.is_empty());

    let (_, m) = s.ask("svc.service.crux.", RecordType::ANY, None).await;
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].record_type(), RecordType::HINFO);

    assert_eq!(s.count("nxdomain"), 3);
    assert_eq!(s.count("refused"), 1);
    assert_eq!(s.count("noerror"), 7);
}

#[tokio::test]
async fn udp_answers_are_bounded_and_truncated() {
    let many: Vec<(String, Instance)> = (0..200u16)
        .map(|i| {
            let ip = format!("10.0.{}.{}", i / 250, i % 250 + 1);
            ("big".into(), inst(&format!("big_{i}"), &ip, 1000 + i))
        })
        .collect();
    let s = start(many, 0, 0).await;
    for (qtype, edns) in [
        (RecordType::A, None),
        (RecordType::A, Some(4096)),
        (RecordType::SRV, None),
        (RecordType::SRV, Some(1232)),
        (RecordType::TXT, Some(65535)),
    ] {
        let q = query("big.service.crux.", qtype, edns);
        let a = s.raw(&q).await.expect("an answer");
        let m = Message::from_vec(&a).expect("a DNS message");
        let limit = udp_answer_limit(q.len(), edns);
        assert!(
            a.len() <= limit,
            "{qtype:?} {edns:?}: {} > {limit}",
            a.len()
        );
        assert!(a.len() <= q.len() * MAX_AMPLIFICATION);
        assert!(a.len() <= if edns.is_some() { 1232 } else { 512 });
        assert!(m.metadata.truncation, "{qtype:?} {edns:?}: TC not set");
        assert!(!m.answers.is_empty() && m.answers.len() < 200);
    }
    // Over TCP the whole answer.
    let q = query("big.service.crux.", RecordType::A, None);
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&(q.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tcp.write_all(&q).await.unwrap();
    let len = tcp.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    tcp.read_exact(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 200);
}

#[tokio::test]
async fn bad_packets_are_dropped_and_counted() {
    let s = start(vec![("svc".into(), inst("svc_1", "127.0.0.1", 1))], 0, 0).await;
    // Too short for a header; a name that points at itself; a name running past the end.
    let mut self_pointer = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    self_pointer.extend([0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    let mut cut = query("svc.service.crux.", RecordType::A, None);
    cut.truncate(cut.len() - 3);
    for p in [&[0x12u8, 0x34, 0x01][..], &self_pointer, &cut] {
        assert_eq!(s.raw(p).await, None, "{p:?} was answered");
    }
    assert_eq!(s.count("malformed"), 3);
    // Oversized.
    let mut big = query("svc.service.crux.", RecordType::A, None);
    big.resize(600, 0);
    assert_eq!(s.raw(&big).await, None);
    assert_eq!(s.count("oversized"), 1);
    // A response sent to the server is not answered.
    let mut m = Message::from_vec(&query("svc.service.crux.", RecordType::A, None)).unwrap();
    m.metadata.message_type = MessageType::Response;
    assert_eq!(s.raw(&m.to_vec().unwrap()).await, None);
    assert_eq!(s.count("not_query"), 1);
    // Two questions: FORMERR.
    let mut two = Message::from_vec(&query("svc.service.crux.", RecordType::A, None)).unwrap();
    two.add_query(Query::query(
        Name::from_ascii("leader.crux.").unwrap(),
        RecordType::A,
    ));
    let a = s.raw(&two.to_vec().unwrap()).await.expect("an answer");
    assert_eq!(
        Message::from_vec(&a).unwrap().metadata.response_code,
        ResponseCode::FormErr
    );
    // Over TCP: counted, and the connection closed.
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(&[0, 3, 0x12, 0x34, 0x01]).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "{rest:?}");
    assert_eq!(s.count("malformed"), 4);
    // The server still answers.
    let (_, m) = s.ask("svc.service.crux.", RecordType::A, None).await;
    assert_eq!(ips(&m), ["127.0.0.1"]);
}

#[tokio::test]
async fn a_flood_from_one_source_is_cut_to_its_rate() {
    let s = start(vec![("svc".into(), inst("svc_1", "127.0.0.1", 1))], 1, 5).await;
    let q = query("svc.service.crux.", RecordType::A, None);
    let mut answered = 0;
    for _ in 0..20 {
        if s.raw(&q).await.is_some() {
            answered += 1;
        }
    }
    // The burst, and at most the refill of the time the loop took (20 × ≤ 500 ms at 1/s).
    assert!(answered >= 5, "{answered}");
    assert!(answered <= 5 + 10, "{answered}");
    assert_eq!(s.count("rate_limited"), 20 - answered);
}
