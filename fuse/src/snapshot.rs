//! Routes + registry → the four xDS resource types, as a pure function ([`build`]).
//!
//! ```text
//!   route NAME ──▶ Listener NAME (API listener: HttpConnectionManager, RDS "crux", router filter)
//!   host H     ──▶ Listener H    (the same, so that `xds:///H` resolves too)
//!   all routes ──▶ RouteConfiguration "crux": one virtual host per host (domains [H]) and one
//!                  for routes without a host (domains ["*"]); longest prefix first
//!   targets    ──▶ Cluster per (api, selector) (EDS over ADS, round robin)
//!   registry   ──▶ ClusterLoadAssignment per cluster: the live instances, weight 1 each
//! ```
//!
//! Every resource carries its own version (a hash of its encoding), and each type a version made
//! from its resources' names and versions: the same routes and registry give the same versions on
//! every agent, so a proxy that moves to another agent is not sent what it has.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};

use crux_proto::grpc::steward::v1::Instance;
use crux_steward::select::{best_first, is_live};

use crate::route::{RouteSpec, Select, Target};

/// The one route configuration every listener names (RDS).
pub const ROUTE_CONFIG: &str = "crux";

/// The one locality endpoints are put in (the flock; zones come with node attributes later).
pub const LOCALITY: &str = "crux";

/// The retry conditions of a route with retries: the ones both Envoy and gRPC understand.
pub const RETRY_ON: &str = "unavailable,reset,connect-failure";

/// The four resource types, in the order ADS serves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// LDS.
    Listener,
    /// RDS.
    Route,
    /// CDS.
    Cluster,
    /// EDS.
    Endpoint,
}

impl Kind {
    /// All four.
    pub const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoint];

    /// The type URL.
    pub fn url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoint => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    /// The type of a URL.
    pub fn from_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.url() == url)
    }

    /// Whether an empty subscription means every resource (LDS and CDS: the xDS spec's
    /// wildcard types).
    pub fn wildcard_when_empty(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }

    /// Index into [`Snapshot::types`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One encoded resource.
#[derive(Debug, PartialEq)]
pub struct Res {
    /// Its version: a hash of its encoding.
    pub version: String,
    /// The resource.
    pub any: Any,
}

/// The resources of one type.
#[derive(Debug, Default, PartialEq)]
pub struct TypeSnap {
    /// Made from the names and versions of the resources.
    pub version: String,
    /// By name.
    pub items: BTreeMap<String, Arc<Res>>,
}

/// Everything ADS serves, at one moment. Two snapshots are equal when their type versions (and
/// problems) are: versions are content hashes.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per [`Kind::index`] (shared with the next snapshot when unchanged).
    pub types: [Arc<TypeSnap>; 4],
    /// What could not be served and why.
    pub problems: Vec<String>,
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Snapshot) -> bool {
        self.problems == other.problems
            && self
                .types
                .iter()
                .zip(other.types.iter())
                .all(|(a, b)| a.version == b.version)
    }
}

impl Snapshot {
    /// The resources of `kind`.
    pub fn of(&self, kind: Kind) -> &TypeSnap {
        &self.types[kind.index()]
    }
}

fn hash_hex(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn res<M: Message + Name>(m: &M) -> Arc<Res> {
    let value = m.encode_to_vec();
    Arc::new(Res {
        version: hash_hex(&value),
        any: Any {
            type_url: M::type_url(),
            value,
        },
    })
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn type_snap(items: BTreeMap<String, Arc<Res>>) -> TypeSnap {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (n, r) in &items {
        n.hash(&mut h);
        r.version.hash(&mut h);
    }
    TypeSnap {
        version: format!("{:016x}", h.finish()),
        items,
    }
}

/// The cluster name of a target in `horde`: `API`, `API:latest` or `API:INST`, with `HORDE/`
/// before it outside the default horde.
pub fn cluster_name(horde: &str, t: &Target) -> String {
    if horde == crux_steward::select::DEFAULT_HORDE {
        t.text()
    } else {
        format!("{horde}/{}", t.text())
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        resource_api_version: core::ApiVersion::V3 as i32,
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource::default(),
        )),
        ..Default::default()
    }
}

fn duration_ms(ms: u64) -> PbDuration {
    PbDuration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn api_listener(name: &str) -> listener::Listener {
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: ROUTE_CONFIG.into(),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name: name.to_string(),
        api_listener: Some(listener::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    }
}

fn route_entry(name: &str, horde: &str, spec: &RouteSpec) -> route::Route {
    let live: Vec<&Target> = spec.to.iter().filter(|t| t.weight > 0).collect();
    let clusters = if live.len() == 1 {
        route::route_action::ClusterSpecifier::Cluster(cluster_name(horde, live[0]))
    } else {
        route::route_action::ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: live
                .iter()
                .map(|t| route::weighted_cluster::ClusterWeight {
                    name: cluster_name(horde, t),
                    weight: Some(UInt32Value { value: t.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let mut action = route::RouteAction {
        cluster_specifier: Some(clusters),
        ..Default::default()
    };
    if spec.timeout_ms > 0 {
        action.timeout = Some(duration_ms(spec.timeout_ms));
        // What gRPC's xDS client reads (gRFC A17); Envoy reads `timeout`.
        action.max_stream_duration = Some(route::route_action::MaxStreamDuration {
            max_stream_duration: Some(duration_ms(spec.timeout_ms)),
            ..Default::default()
        });
    }
    if spec.retries > 0 {
        action.retry_policy = Some(route::RetryPolicy {
            retry_on: RETRY_ON.into(),
            num_retries: Some(UInt32Value {
                value: spec.retries,
            }),
            ..Default::default()
        });
    }
    route::Route {
        name: name.to_string(),
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix(
                spec.prefix.clone(),
            )),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(action)),
        ..Default::default()
    }
}

fn eds_cluster(name: &str) -> cluster::Cluster {
    cluster::Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: name.to_string(),
        }),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        connect_timeout: Some(duration_ms(1000)),
        ..Default::default()
    }
}

fn socket_addr(i: &Instance) -> Option<SocketAddr> {
    i.addr.parse().ok()
}

fn load_assignment(name: &str, addrs: &[SocketAddr]) -> endpoint::ClusterLoadAssignment {
    let lb_endpoints = addrs
        .iter()
        .map(|a| endpoint::LbEndpoint {
            health_status: core::HealthStatus::Healthy as i32,
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                endpoint::Endpoint {
                    address: Some(core::Address {
                        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                            address: a.ip().to_string(),
                            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                                u32::from(a.port()),
                            )),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![endpoint::LocalityLbEndpoints {
            // gRPC refuses an assignment without a locality.
            locality: Some(core::Locality {
                region: LOCALITY.into(),
                ..Default::default()
            }),
            lb_endpoints,
            // gRPC ignores a locality without a weight.
            load_balancing_weight: Some(UInt32Value { value: 1 }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The live instances a target names, best first, with their addresses (instances whose NetID is
/// not `ip:port` are left out: a proxy needs an address).
pub fn endpoints(horde: &str, t: &Target, instances: &[Instance]) -> Vec<SocketAddr> {
    let mut live: Vec<&Instance> = instances
        .iter()
        .filter(|i| i.horde == horde && i.api == t.api && is_live(i))
        .filter(|i| match &t.select {
            Select::Inst(n) => &i.inst == n,
            _ => true,
        })
        .collect();
    live.sort_by(|a, b| best_first(a, b));
    if t.select == Select::Latest {
        live.truncate(1);
    }
    live.into_iter().filter_map(socket_addr).collect()
}

/// The snapshot of `routes` (name, spec) of `horde` over the registry's `instances`.
pub fn build(horde: &str, routes: &[(String, RouteSpec)], instances: &[Instance]) -> Snapshot {
    let mut listeners = BTreeMap::new();
    let mut clusters = BTreeMap::new();
    // Virtual hosts: by host ("" for any), routes longest prefix first, then by name.
    let mut hosts: BTreeMap<&str, Vec<(&String, &RouteSpec)>> = BTreeMap::new();
    let mut targets: BTreeMap<String, &Target> = BTreeMap::new();
    for (name, spec) in routes {
        listeners.insert(name.clone(), res(&api_listener(name)));
        if let Some(h) = &spec.host {
            if !listeners.contains_key(h) {
                listeners.insert(h.clone(), res(&api_listener(h)));
            }
        }
        hosts
            .entry(spec.host.as_deref().unwrap_or(""))
            .or_default()
            .push((name, spec));
        for t in &spec.to {
            targets.entry(cluster_name(horde, t)).or_insert(t);
        }
    }
    for cname in targets.keys() {
        clusters.insert(cname.clone(), res(&eds_cluster(cname)));
    }
    let (assignments, problems) = assignments(&targets, horde, instances);
    let mut vhosts = Vec::new();
    for (host, mut rs) in hosts {
        rs.sort_by(|a, b| {
            b.1.prefix
                .len()
                .cmp(&a.1.prefix.len())
                .then_with(|| a.0.cmp(b.0))
        });
        vhosts.push(route::VirtualHost {
            name: if host.is_empty() {
                "any".into()
            } else {
                host.to_string()
            },
            domains: vec![if host.is_empty() {
                "*".into()
            } else {
                host.to_string()
            }],
            routes: rs
                .into_iter()
                .map(|(n, s)| route_entry(n, horde, s))
                .collect(),
            ..Default::default()
        });
    }
    let mut route_configs = BTreeMap::new();
    if !routes.is_empty() {
        route_configs.insert(
            ROUTE_CONFIG.to_string(),
            res(&route::RouteConfiguration {
                name: ROUTE_CONFIG.into(),
                virtual_hosts: vhosts,
                ..Default::default()
            }),
        );
    }
    Snapshot {
        types: [
            Arc::new(type_snap(listeners)),
            Arc::new(type_snap(route_configs)),
            Arc::new(type_snap(clusters)),
            Arc::new(assignments),
        ],
        problems,
    }
}

fn targets<'a>(horde: &str, routes: &'a [(String, RouteSpec)]) -> BTreeMap<String, &'a Target> {
    let mut targets = BTreeMap::new();
    for (_, spec) in routes {
        for t in &spec.to {
            targets.entry(cluster_name(horde, t)).or_insert(t);
        }
    }
    targets
}

fn assignments(
    targets: &BTreeMap<String, &Target>,
    horde: &str,
    instances: &[Instance],
) -> (TypeSnap, Vec<String>) {
    let mut problems = Vec::new();
    let mut out = BTreeMap::new();
    for (cname, t) in targets {
        let addrs = endpoints(horde, t, instances);
        if addrs.is_empty() {
            problems.push(format!("cluster {cname}: no live instance"));
        }
        out.insert(cname.clone(), res(&load_assignment(cname, &addrs)));
    }
    (type_snap(out), problems)
}

/// [`build`] when only the registry changed since `prev` (built from the same `routes`): LDS,
/// RDS and CDS are `prev`'s, only the endpoints are made again.
pub fn endpoints_only(
    prev: &Snapshot,
    horde: &str,
    routes: &[(String, RouteSpec)],
    instances: &[Instance],
) -> Snapshot {
    let (eds, problems) = assignments(&targets(horde, routes), horde, instances);
    Snapshot {
        types: [
            prev.types[0].clone(),
            prev.types[1].clone(),
            prev.types[2].clone(),
            Arc::new(eds),
        ],
        problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::parse_target;
    use crux_proto::grpc::steward::v1::{Health, RunState};

    fn inst(api: &str, inst: &str, addr: &str, live: bool) -> Instance {
        Instance {
            api: api.into(),
            inst: inst.into(),
            addr: addr.into(),
            horde: "default".into(),
            state: if live {
                RunState::Running as i32
            } else {
                RunState::Stopping as i32
            },
            health: Health::Healthy as i32,
            ..Default::default()
        }
    }

    fn spec(prefix: &str, host: Option<&str>, to: &[(&str, u32)]) -> RouteSpec {
        RouteSpec {
            prefix: prefix.into(),
            host: host.map(str::to_string),
            to: to
                .iter()
                .map(|(t, w)| parse_target(t, *w).unwrap())
                .collect(),
            timeout_ms: 0,
            retries: 0,
        }
    }

    fn decode<M: Message + Default>(r: &Res) -> M {
        M::decode(r.any.value.as_slice()).unwrap()
    }

    #[test]
    fn routes_and_instances_make_listeners_one_route_config_clusters_and_endpoints() {
        let routes = vec![
            (
                "greet".to_string(),
                spec("/hello.Greeter/", None, &[("greeter", 1)]),
            ),
            (
                "web".to_string(),
                spec("/", Some("web.example"), &[("web:latest", 3), ("old", 1)]),
            ),
        ];
        let instances = vec![
            inst("greeter", "greeter_1", "127.0.0.1:5001", true),
            inst("greeter", "greeter_2", "127.0.0.1:5002", false),
            inst("web", "web_9", "127.0.0.1:6009", true),
            inst("web", "web_10", "127.0.0.1:6010", true),
        ];
        let s = build("default", &routes, &instances);
        let names = |k: Kind| s.of(k).items.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(Kind::Listener), ["greet", "web", "web.example"]);
        assert_eq!(names(Kind::Route), [ROUTE_CONFIG]);
        assert_eq!(names(Kind::Cluster), ["greeter", "old", "web:latest"]);
        assert_eq!(s.problems, ["cluster old: no live instance"]);
        let cla: endpoint::ClusterLoadAssignment = decode(&s.of(Kind::Endpoint).items["greeter"]);
        assert_eq!(
            cla.endpoints[0].lb_endpoints.len(),
            1,
            "the stopping one is out"
        );
        // `latest`: web_10 > web_9 (digit runs as numbers).
        assert_eq!(
            endpoints(
                "default",
                &parse_target("web:latest", 1).unwrap(),
                &instances
            ),
            ["127.0.0.1:6010".parse::<SocketAddr>().unwrap()]
        );
        let rc: route::RouteConfiguration = decode(&s.of(Kind::Route).items[ROUTE_CONFIG]);
        let domains: Vec<_> = rc.virtual_hosts.iter().map(|v| v.domains.clone()).collect();
        assert_eq!(
            domains,
            [vec!["*".to_string()], vec!["web.example".to_string()]]
        );
        let web = &rc.virtual_hosts[1].routes[0];
        let Some(route::route::Action::Route(a)) = &web.action else {
            panic!()
        };
        let Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier
        else {
            panic!("weighted: {a:?}")
        };
        let weights: Vec<_> = w
            .clusters
            .iter()
            .map(|c| (c.name.clone(), c.weight.unwrap().value))
            .collect();
        assert_eq!(
            weights,
            [("web:latest".to_string(), 3), ("old".to_string(), 1)]
        );
        let l: listener::Listener = decode(&s.of(Kind::Listener).items["greet"]);
        let m = hcm::HttpConnectionManager::decode(
            l.api_listener
                .unwrap()
                .api_listener
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert!(
            matches!(m.route_specifier, Some(hcm::http_connection_manager::RouteSpecifier::Rds(ref r)) if r.route_config_name == ROUTE_CONFIG)
        );
    }

    #[test]
    fn versions_follow_content_only() {
        let routes = vec![("a".to_string(), spec("/", None, &[("x", 1)]))];
        let one = vec![inst("x", "x_1", "127.0.0.1:1", true)];
        let two = vec![
            inst("x", "x_1", "127.0.0.1:1", true),
            inst("x", "x_2", "127.0.0.1:2", true),
        ];
        let s1 = build("default", &routes, &one);
        assert_eq!(
            s1,
            build("default", &routes, &one),
            "same input, same versions"
        );
        let s2 = build("default", &routes, &two);
        for k in [Kind::Listener, Kind::Route, Kind::Cluster] {
            assert_eq!(s1.of(k).version, s2.of(k).version, "{k:?} unchanged");
        }
        assert_ne!(s1.of(Kind::Endpoint).version, s2.of(Kind::Endpoint).version);
        let again = endpoints_only(&s1, "default", &routes, &two);
        assert_eq!(
            again, s2,
            "an endpoints-only rebuild gives what a full one does"
        );
        assert!(Arc::ptr_eq(&again.types[0], &s1.types[0]), "LDS shared");
        // A zero weight drops the target from the route but keeps its cluster.
        let routes = vec![("a".to_string(), spec("/", None, &[("x", 1), ("y", 0)]))];
        let s3 = build("default", &routes, &two);
        let rc: route::RouteConfiguration = decode(&s3.of(Kind::Route).items[ROUTE_CONFIG]);
        let Some(route::route::Action::Route(a)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(
            a.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster("x".into()))
        );
    }
}
