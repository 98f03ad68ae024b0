//! Property tests: the placement language round-trips through its printed form, and
//! `reconcile` keeps its invariants on random clusters.

use std::collections::{BTreeMap, BTreeSet};

use crux_proctor::{
    parse, reconcile, Attrs, CmpOp, Doneness, Expr, Intent, Node, Observed, Placement, Plan,
    ServiceSpec, Unit, UnitState, Value,
};
use proptest::prelude::*;

const RESERVED: [&str; 6] = ["and", "or", "not", "in", "true", "false"];

fn ident() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_.-]{0,8}".prop_filter("reserved word", |s| !RESERVED.contains(&s.as_str()))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::Str),
        "[a-z\"\\\\ ]{0,6}".prop_map(Value::Str),
        (-1000i32..1000).prop_map(|n| Value::Num(f64::from(n))),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(Value::Num),
        any::<bool>().prop_map(Value::Bool),
    ]
}

fn op() -> impl Strategy<Value = CmpOp> {
    prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge)
    ]
}

fn expr() -> impl Strategy<Value = Expr> {
    let cmp = (ident(), op(), value()).prop_map(|(attr, op, value)| {
        // The language refuses ordering against a boolean.
        let op = if matches!(value, Value::Bool(_)) && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
            CmpOp::Eq
        } else {
            op
        };
        Expr::Cmp { attr, op, value }
    });
    let within = (ident(), prop::collection::vec(value(), 1..4))
        .prop_map(|(attr, values)| Expr::In { attr, values });
    prop_oneof![cmp, within].prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            prop::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
            prop::collection::vec(inner, 2..4).prop_map(Expr::Or),
        ]
    })
}

fn placement() -> impl Strategy<Value = Placement> {
    (
        1..=u32::MAX,
        prop::option::of(expr()),
        prop::option::of(ident()),
        prop::option::of(ident()),
    )
        .prop_map(|(count, filter, distinct, spread)| Placement {
            count,
            filter,
            distinct,
            spread,
        })
}

/// Token soup: near-miss placements that reach the parser's error paths.
fn soup() -> impl Strategy<Value = String> {
    let tok = prop_oneof![
        Just("count"),
        Just("where"),
        Just("distinct"),
        Just("spread"),
        Just("and"),
        Just("or"),
        Just("not"),
        Just("in"),
        Just("("),
        Just(")"),
        Just(","),
        Just(";"),
        Just("=="),
        Just("!="),
        Just("<"),
        Just(">="),
        Just("="),
        Just("!"),
        Just("3"),
        Just("-1.5"),
        Just("0"),
        Just("1.2.3"),
        Just("\"s\""),
        Just("\"x\\"),
        Just("true"),
        Just("host"),
        Just("rack"),
        Just("é"),
        Just("\n"),
        Just("-"),
    ];
    prop::collection::vec((tok, prop_oneof![Just(""), Just(" "), Just("\n")]), 0..16)
        .prop_map(|v| v.into_iter().map(|(t, s)| format!("{t}{s}")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn printed_placement_parses_back_to_the_same_tree(p in placement()) {
        let printed = p.to_string();
        prop_assert_eq!(parse(&printed), Ok(p), "printed: {}", printed);
    }

    #[test]
    fn printed_form_is_a_fixed_point(p in placement()) {
        let once = p.to_string();
        let twice = parse(&once).unwrap().to_string();
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn any_text_parses_or_errs_inside_the_text(src in prop_oneof![any::<String>(), soup()]) {
        match parse(&src) {
            Ok(p) => {
                prop_assert!(p.count >= 1);
                prop_assert_eq!(parse(&p.to_string()), Ok(p));
            }
            Err(e) => {
                let lines: Vec<&str> = src.split('\n').collect();
                prop_assert!(e.line >= 1 && e.line as usize <= lines.len(), "{e} in {src:?}");
                let width = lines[e.line as usize - 1].chars().count() + 1;
                prop_assert!(e.column >= 1 && e.column as usize <= width, "{e} in {src:?}");
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}

// ---- reconcile ----

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

#[derive(Clone, Debug)]
struct World {
    intent: Intent,
    nodes: Vec<Node>,
    observed: Vec<Observed>,
}

fn opt<T: Clone + std::fmt::Debug + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop::option::weighted(0.8, s)
}

fn node_attrs() -> impl Strategy<Value = Attrs> {
    (
        opt(0..5u8),
        opt(0..3u8),
        0..2u8,
        prop_oneof![Just("linux"), Just("bsd")],
        prop_oneof![Just(4.0), Just(8.0), Just(16.0)],
    )
        .prop_map(|(host, rack, zone, os, mem)| {
            let mut a = Attrs::new();
            if let Some(h) = host {
                a.insert("host".into(), Value::Str(format!("h{h}")));
            }
            if let Some(r) = rack {
                a.insert("rack".into(), Value::Str(format!("r{r}")));
            }
            a.insert("zone".into(), Value::Num(f64::from(zone)));
            a.insert("os".into(), Value::Str(os.into()));
            a.insert("mem_gb".into(), Value::Num(mem));
            a
        })
}

fn placement_text() -> impl Strategy<Value = String> {
    (
        1..=5u32,
        prop_oneof![
            Just(""),
            Just("; where os == \"linux\""),
            Just("; where mem_gb >= 8"),
            Just("; where rack != \"r1\""),
            Just("; where not zone == 1 or os == \"bsd\""),
        ],
        prop_oneof![Just(""), Just("; distinct host"), Just("; distinct rack")],
        prop_oneof![Just(""), Just("; spread rack"), Just("; spread zone")],
    )
        .prop_map(|(n, w, d, s)| format!("count {n}{w}{d}{s}"))
}

fn state() -> impl Strategy<Value = UnitState> {
    prop_oneof![
        Just(UnitState::Pending),
        Just(UnitState::Healthy),
        Just(UnitState::Failed),
        Just(UnitState::Stopping)
    ]
}

/// A unit of api `a{api}` (api 9: not in any intent) in one of four versions.
fn unit(api: usize, version: usize) -> Unit {
    Unit {
        horde: "default".into(),
        api: format!("a{api}"),
        inst: format!("i{}", version % 2),
        artifact: if version < 2 { D1 } else { D2 }.into(),
        function: "f".into(),
    }
}

fn world() -> impl Strategy<Value = World> {
    let services = prop::collection::vec((0..4usize, placement_text()), 0..4);
    let nodes = prop::collection::vec(opt(node_attrs()), 8);
    // Per reported node id n0..n9 (n8, n9 never live): per api a0..a3 and a9, maybe a unit.
    let reports = prop::collection::vec(prop::collection::vec(opt((0..4usize, state())), 5), 10);
    (services, nodes, reports).prop_map(|(services, nodes, reports)| {
        let services = services
            .into_iter()
            .enumerate()
            .map(|(i, (v, placement))| {
                let u = unit(i, v);
                ServiceSpec {
                    horde: u.horde,
                    api: u.api,
                    inst: u.inst,
                    artifact: u.artifact,
                    function: u.function,
                    placement,
                }
            })
            .collect();
        let nodes = nodes
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.map(|attrs| Node {
                    id: format!("n{i}"),
                    attrs,
                })
            })
            .collect();
        let observed = reports
            .into_iter()
            .enumerate()
            .map(|(i, per_api)| Observed {
                node: format!("n{i}"),
                units: per_api
                    .into_iter()
                    .enumerate()
                    .filter_map(|(api, u)| {
                        u.map(|(v, s)| (unit(if api == 4 { 9 } else { api }, v), s))
                    })
                    .collect(),
            })
            .collect();
        World {
            intent: Intent { services },
            nodes,
            observed,
        }
    })
}

/// Fisher-Yates with a small seeded generator (xorshift64*).
fn shuffle<T>(v: &mut [T], seed: &mut u64) {
    for i in (1..v.len()).rev() {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        let r = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

fn state_in(w: &World, node: &str, u: &Unit) -> Option<UnitState> {
    w.observed
        .iter()
        .filter(|o| o.node == node)
        .flat_map(|o| &o.units)
        .find(|(x, _)| x == u)
        .map(|(_, s)| *s)
}

fn all_healthy(plan: &Plan) -> Vec<Observed> {
    plan.assign
        .iter()
        .map(|(n, us)| Observed {
            node: n.clone(),
            units: us.iter().map(|u| (u.clone(), UnitState::Healthy)).collect(),
        })
        .collect()
}

fn check_invariants(w: &World, plan: &Plan) -> Result<(), TestCaseError> {
    let live: BTreeMap<&str, &Node> = w.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let keys: BTreeSet<&str> = plan.assign.keys().map(String::as_str).collect();
    prop_assert_eq!(
        &keys,
        &live.keys().copied().collect::<BTreeSet<_>>(),
        "one entry per live node"
    );
    prop_assert_eq!(plan.status.len(), w.intent.services.len());
    for spec in &w.intent.services {
        let p = spec.placement();
        let u = Unit::of(spec);
        let on: Vec<&str> = plan
            .assign
            .iter()
            .filter(|(_, us)| us.contains(&u))
            .map(|(n, _)| n.as_str())
            .collect();
        prop_assert!(
            on.len() <= p.count as usize,
            "{} over count: {:?}",
            spec.api,
            on
        );
        let mut values = BTreeSet::new();
        for id in &on {
            let n = live[id];
            prop_assert!(p.eligible(&n.attrs), "{} on ineligible {}", spec.api, id);
            prop_assert_ne!(
                state_in(w, id, &u),
                Some(UnitState::Failed),
                "{} on {} where it failed",
                spec.api,
                id
            );
            if let Some(d) = &p.distinct {
                let v = n.attrs.get(d);
                prop_assert!(v.is_some(), "{} on {} without {}", spec.api, id, d);
                prop_assert!(
                    values.insert(v.unwrap().to_string()),
                    "{} twice on {} {:?}",
                    spec.api,
                    d,
                    v
                );
            }
        }
        let st = plan.status.iter().find(|s| s.api == spec.api).unwrap();
        prop_assert_eq!(
            &st.nodes,
            &on.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
        prop_assert_eq!(st.desired, p.count);
        if on.len() < p.count as usize {
            prop_assert_eq!(st.state, Doneness::Failed, "{}: {}", spec.api, st.message);
        }
        if st.state == Doneness::Converged {
            prop_assert_eq!(on.len(), p.count as usize);
            prop_assert!(on
                .iter()
                .all(|id| state_in(w, id, &u) == Some(UnitState::Healthy)));
            let old = plan
                .assign
                .values()
                .flatten()
                .any(|x| x.api == u.api && *x != u);
            prop_assert!(!old, "{} converged with an old unit assigned", spec.api);
        }
        // Stability: running units on eligible nodes, within count and distinct, all stay.
        let running: Vec<&str> = live
            .iter()
            .filter(|(id, n)| {
                state_in(w, id, &u)
                    .is_some_and(|s| s == UnitState::Pending || s == UnitState::Healthy)
                    && p.eligible(&n.attrs)
                    && p.distinct.as_ref().is_none_or(|d| n.attrs.contains_key(d))
            })
            .map(|(id, _)| *id)
            .collect();
        let distinct_values: BTreeSet<String> = running
            .iter()
            .map(|id| {
                p.distinct
                    .as_ref()
                    .map(|d| live[id].attrs[d].to_string())
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        if running.len() <= p.count as usize && distinct_values.len() == running.len() {
            for id in &running {
                prop_assert!(on.contains(id), "{} moved off {}", spec.api, id);
            }
        }
    }
    // Every assigned unit is wanted, or an old unit of a service still reported running there.
    for (id, us) in &plan.assign {
        for x in us {
            let spec = w.intent.services.iter().find(|s| s.api == x.api);
            prop_assert!(
                spec.is_some(),
                "{} assigned on {} though not in the intent",
                x,
                id
            );
            if *x != Unit::of(spec.unwrap()) {
                let s = state_in(w, id, x);
                prop_assert!(
                    s == Some(UnitState::Pending) || s == Some(UnitState::Healthy),
                    "old {} assigned on {} in state {:?}",
                    x,
                    id,
                    s
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn plans_keep_the_invariants(w in world()) {
        let plan = reconcile(&w.intent, &w.nodes, &w.observed);
        check_invariants(&w, &plan)?;
    }

    #[test]
    fn plans_do_not_depend_on_input_order(w in world(), seed in any::<u64>()) {
        let plan = reconcile(&w.intent, &w.nodes, &w.observed);
        let mut seed = seed | 1;
        let mut nodes = w.nodes.clone();
        shuffle(&mut nodes, &mut seed);
        let mut observed = w.observed.clone();
        shuffle(&mut observed, &mut seed);
        for o in &mut observed {
            shuffle(&mut o.units, &mut seed);
        }
        let mut intent = w.intent.clone();
        shuffle(&mut intent.services, &mut seed);
        prop_assert_eq!(reconcile(&intent, &nodes, &observed), plan);
    }

    #[test]
    fn all_healthy_as_assigned_reaches_a_fixed_point(w in world()) {
        let p1 = reconcile(&w.intent, &w.nodes, &w.observed);
        let p2 = reconcile(&w.intent, &w.nodes, &all_healthy(&p1));
        let w3 = World { observed: all_healthy(&p2), ..w.clone() };
        let p3 = reconcile(&w.intent, &w.nodes, &w3.observed);
        check_invariants(&w3, &p3)?;
        // Old units p3 dropped are reported gone one round later: from then on, a fixed point.
        let p4 = reconcile(&w.intent, &w.nodes, &all_healthy(&p3));
        prop_assert_eq!(&p4.assign, &p3.assign);
        let p5 = reconcile(&w.intent, &w.nodes, &all_healthy(&p4));
        prop_assert_eq!(&p5, &p4);
        let p3 = p4;
        for st in &p3.status {
            let want = if st.nodes.len() == st.desired as usize { Doneness::Converged } else { Doneness::Failed };
            prop_assert_eq!(st.state, want, "{}: {}", st.api, st.message);
        }
        // Nothing U ran on in p1 was moved.
        for (id, us) in &p1.assign {
            for u in us.iter().filter(|u| w.intent.services.iter().any(|s| Unit::of(s) == **u)) {
                prop_assert!(p3.assign[id].contains(u), "{} moved off {}", u, id);
            }
        }
    }

    #[test]
    fn fresh_plan_all_healthy_is_converged_at_once(w in world()) {
        let p1 = reconcile(&w.intent, &w.nodes, &[]);
        let p2 = reconcile(&w.intent, &w.nodes, &all_healthy(&p1));
        prop_assert_eq!(&p2.assign, &p1.assign);
        for st in &p2.status {
            let want = if st.nodes.len() == st.desired as usize { Doneness::Converged } else { Doneness::Failed };
            prop_assert_eq!(st.state, want, "{}: {}", st.api, st.message);
        }
        prop_assert_eq!(reconcile(&w.intent, &w.nodes, &all_healthy(&p2)), p2);
    }
}
