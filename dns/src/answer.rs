//! The answer to one question: pure over a [`Catalog`], no sockets.

use std::net::IpAddr;

use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::rdata::{A, AAAA, HINFO, SOA, SRV, TXT};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};

use crate::name::{parse, Parsed, Target};
use crate::{Catalog, Instance};

/// A TXT character-string is at most 255 bytes (RFC 1035 §3.3).
const TXT_STRING_MAX: usize = 255;

/// The zone this server answers for.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The domain, e.g. `crux.`.
    pub origin: Name,
    /// Its labels, lowercase, leftmost first.
    pub labels: Vec<String>,
    /// TTL of every record, in seconds.
    pub ttl: u32,
}

/// What to send back for one question.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// The response code.
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of a negative answer).
    pub authorities: Vec<Record>,
    /// Additional section (the addresses of SRV targets).
    pub additionals: Vec<Record>,
}

impl Reply {
    pub(crate) fn with(rcode: ResponseCode) -> Reply {
        Reply {
            rcode,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

impl Zone {
    /// The zone of `domain` (e.g. `crux` or `crux.`).
    pub fn new(domain: &str, ttl: u32) -> Result<Zone, String> {
        let mut origin = Name::from_ascii(domain).map_err(|e| format!("{domain:?}: {e}"))?;
        origin.set_fqdn(true);
        if origin.is_root() {
            return Err("must not be the root".into());
        }
        let labels = origin
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
            .collect();
        Ok(Zone {
            origin,
            labels,
            ttl,
        })
    }

    /// The zone's SOA record (negative answers are cached for the TTL: RFC 2308 §5).
    pub fn soa(&self) -> Record {
        let host = |l: &str| {
            Name::from_ascii(l)
                .and_then(|n| n.append_domain(&self.origin))
                .unwrap_or_else(|_| self.origin.clone())
        };
        Record::from_rdata(
            self.origin.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                host("ns"),
                host("hostmaster"),
                1,
                3600,
                600,
                86400,
                self.ttl,
            )),
        )
    }

    fn negative(&self, rcode: ResponseCode) -> Reply {
        let mut r = Reply::with(rcode);
        r.authorities.push(self.soa());
        r
    }

    fn name(&self, labels: &[&str]) -> Option<Name> {
        Name::from_labels(labels.iter().map(|l| l.as_bytes()))
            .and_then(|n| n.append_domain(&self.origin))
            .ok()
    }

    fn addr(&self, owner: &Name, ip: IpAddr) -> Record {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(owner.clone(), self.ttl, rdata)
    }

    /// Whether `name` is at or below the domain (the names this server answers itself).
    pub fn contains(&self, name: &Name) -> bool {
        !matches!(parse(name.iter(), &self.labels), Parsed::Outside)
    }

    /// The answer to `qname`/`qtype`, from `catalog`.
    pub fn answer(&self, catalog: &dyn Catalog, qname: &Name, qtype: RecordType) -> Reply {
        let target = match parse(qname.iter(), &self.labels) {
            Parsed::Outside => return Reply::with(ResponseCode::Refused),
            Parsed::Inside(t) => t,
        };
        let mut owner = qname.clone();
        owner.set_fqdn(true);
        match target {
            Target::Unknown => self.negative(ResponseCode::NXDomain),
            Target::Apex => match qtype {
                RecordType::SOA => {
                    let mut r = Reply::with(ResponseCode::NoError);
                    r.answers.push(self.soa());
                    r
                }
                RecordType::ANY => self.any(&owner),
                _ => self.negative(ResponseCode::NoError),
            },
            Target::Leader => match catalog.leader() {
                Some(ip) => self.host(&owner, ip, qtype),
                None => Reply::with(ResponseCode::ServFail),
            },
            Target::Node(node) => match catalog.node(&node) {
                Some(ip) => self.host(&owner, ip, qtype),
                None => self.negative(ResponseCode::NXDomain),
            },
            Target::Service { api, horde } => {
                let found = catalog.service(&api, &horde);
                self.instances(&owner, &horde, &found, qtype)
            }
            Target::Inst { inst, horde } => {
                let found: Vec<Instance> = catalog.instance(&inst, &horde).into_iter().collect();
                self.instances(&owner, &horde, &found, qtype)
            }
        }
    }

    /// RFC 8482 §4.2: ANY gets one small synthesised HINFO record, not everything.
    fn any(&self, owner: &Name) -> Reply {
        let mut r = Reply::with(ResponseCode::NoError);
        r.answers.push(Record::from_rdata(
            owner.clone(),
            self.ttl,
            RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
        ));
        r
    }

    /// A name with one address (a node, the leader).
    fn host(&self, owner: &Name, ip: IpAddr, qtype: RecordType) -> Reply {
        match qtype {
            RecordType::A | RecordType::AAAA if matches_family(qtype, ip) => {
                let mut r = Reply::with(ResponseCode::NoError);
                r.answers.push(self.addr(owner, ip));
                r
            }
            RecordType::ANY => self.any(owner),
            _ => self.negative(ResponseCode::NoError),
        }
    }

    /// A name with instances (best first).
    fn instances(&self, owner: &Name, horde: &str, found: &[Instance], qtype: RecordType) -> Reply {
        if found.is_empty() {
            return self.negative(ResponseCode::NXDomain);
        }
        let mut r = Reply::with(ResponseCode::NoError);
        match qtype {
            RecordType::A | RecordType::AAAA => {
                let mut seen = Vec::new();
                for ip in found.iter().filter_map(|i| i.ip) {
                    if matches_family(qtype, ip) && !seen.contains(&ip) {
                        seen.push(ip);
                        r.answers.push(self.addr(owner, ip));
                    }
                }
            }
            RecordType::SRV => {
                for (rank, i) in found.iter().enumerate() {
                    let mut labels = vec![i.inst.as_str(), "inst"];
                    if !horde.is_empty() {
                        labels.push(horde);
                    }
                    let Some(target) = self.name(&labels) else {
                        continue;
                    };
                    let priority = u16::try_from(rank).unwrap_or(u16::MAX);
                    r.answers.push(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::SRV(SRV::new(priority, 1, i.port, target.clone())),
                    ));
                    if let Some(ip) = i.ip {
                        r.additionals.push(self.addr(&target, ip));
                    }
                }
            }
            RecordType::TXT => {
                for i in found {
                    let mut strings = vec![format!("inst={}", i.inst), format!("node={}", i.node)];
                    strings.extend(i.metadata.iter().map(|(k, v)| format!("{k}={v}")));
                    for s in &mut strings {
                        clamp_utf8(s, TXT_STRING_MAX);
                    }
                    r.answers.push(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::TXT(TXT::new(strings)),
                    ));
                }
            }
            RecordType::ANY => return self.any(owner),
            _ => {}
        }
        if r.answers.is_empty() {
            r.authorities.push(self.soa());
        }
        r
    }
}

fn matches_family(qtype: RecordType, ip: IpAddr) -> bool {
    matches!(
        (qtype, ip),
        (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_))
    )
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn clamp_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
