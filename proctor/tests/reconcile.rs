//! The rules of `proctor::reconcile`, one test each, with exact plans.

use std::collections::{BTreeMap, BTreeSet};

use crux_proctor::{
    parse_intent, reconcile, Attrs, Doneness, Intent, Node, Observed, Plan, ServiceSpec, Unit,
    UnitState, Value,
};

const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

fn spec(api: &str, inst: &str, placement: &str) -> ServiceSpec {
    ServiceSpec {
        horde: "default".into(),
        api: api.into(),
        inst: inst.into(),
        artifact: D1.into(),
        function: inst.into(),
        placement: placement.into(),
    }
}

fn intent(specs: &[ServiceSpec]) -> Intent {
    let i = Intent {
        services: specs.to_vec(),
    };
    i.validate().expect("test intent is valid");
    i
}

/// `n1 host=h1 rack=r1 os=linux`: id, then `k=v` pairs (numbers when they parse).
fn node(desc: &str) -> Node {
    let mut words = desc.split_whitespace();
    let id = words.next().unwrap().to_string();
    let attrs: Attrs = words
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            let v = v
                .parse::<f64>()
                .map(Value::Num)
                .unwrap_or_else(|_| Value::Str(v.into()));
            (k.to_string(), v)
        })
        .collect();
    Node { id, attrs }
}

/// Five nodes, one host each, racks r1 r1 r2 r2 r3, n4 and n5 run bsd.
fn five() -> Vec<Node> {
    [
        "n1 host=h1 rack=r1 os=linux mem_gb=16",
        "n2 host=h2 rack=r1 os=linux mem_gb=8",
        "n3 host=h3 rack=r2 os=linux mem_gb=4",
        "n4 host=h4 rack=r2 os=bsd mem_gb=16",
        "n5 host=h5 rack=r3 os=bsd mem_gb=16",
    ]
    .into_iter()
    .map(node)
    .collect()
}

fn obs(node: &str, units: &[(&Unit, UnitState)]) -> Observed {
    Observed {
        node: node.into(),
        units: units.iter().map(|(u, s)| ((*u).clone(), *s)).collect(),
    }
}

/// Node id → the units (as `api/inst`) assigned, leaving out empty nodes.
fn placed(plan: &Plan) -> BTreeMap<String, Vec<String>> {
    plan.assign
        .iter()
        .filter(|(_, us)| !us.is_empty())
        .map(|(n, us)| {
            (
                n.clone(),
                us.iter().map(|u| format!("{}/{}", u.api, u.inst)).collect(),
            )
        })
        .collect()
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(n, us)| (n.to_string(), us.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// Every unit of the plan reported in `state` on the node it is assigned to.
fn all(plan: &Plan, state: UnitState) -> Vec<Observed> {
    plan.assign
        .iter()
        .map(|(n, us)| Observed {
            node: n.clone(),
            units: us.iter().map(|u| (u.clone(), state)).collect(),
        })
        .collect()
}

#[test]
fn every_live_node_has_an_entry_and_an_empty_intent_stops_everything() {
    let old = Unit::of(&spec("a", "a_1", "count 1"));
    let plan = reconcile(
        &Intent::default(),
        &five(),
        &[obs("n1", &[(&old, UnitState::Healthy)])],
    );
    let ids: Vec<&str> = plan.assign.keys().map(String::as_str).collect();
    assert_eq!(ids, ["n1", "n2", "n3", "n4", "n5"]);
    assert!(plan.assign.values().all(BTreeSet::is_empty));
    assert!(plan.status.is_empty());
}

#[test]
fn fresh_placement_fills_by_node_id_and_reports_progressing() {
    let i = intent(&[spec("a", "a_1", "count 3; distinct host")]);
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(
        placed(&plan),
        expect(&[("n1", &["a/a_1"]), ("n2", &["a/a_1"]), ("n3", &["a/a_1"])])
    );
    let s = &plan.status[0];
    assert_eq!(
        (s.state, s.desired, s.running),
        (Doneness::Progressing, 3, 0)
    );
    assert_eq!(s.nodes, ["n1", "n2", "n3"]);
    assert_eq!(s.message, "0/3 healthy, 3 starting");
    assert_eq!(s.state.to_string(), "progressing");
}

#[test]
fn where_filters_nodes() {
    let i = intent(&[spec(
        "a",
        "a_1",
        r#"count 2; where os == "bsd" or mem_gb < 8"#,
    )]);
    let plan = reconcile(&i, &five(), &[]);
    // n3 (4 GB), n4 and n5 (bsd) pass; the two lowest ids win.
    assert_eq!(
        placed(&plan),
        expect(&[("n3", &["a/a_1"]), ("n4", &["a/a_1"])])
    );
}

#[test]
fn spread_balances_across_values_before_node_id() {
    let i = intent(&[spec("a", "a_1", "count 3; spread rack")]);
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(
        placed(&plan),
        expect(&[("n1", &["a/a_1"]), ("n3", &["a/a_1"]), ("n5", &["a/a_1"])])
    );
    // A fourth goes back to the first rack with the fewest, by id.
    let i = intent(&[spec("a", "a_1", "count 4; spread rack")]);
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(plan.status[0].nodes, ["n1", "n2", "n3", "n5"]);
}

#[test]
fn distinct_attribute_caps_placement_and_fails_with_a_reason() {
    let i = intent(&[spec("a", "a_1", "count 4; distinct rack")]);
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(plan.status[0].nodes, ["n1", "n3", "n5"]);
    let s = &plan.status[0];
    assert_eq!(s.state, Doneness::Failed);
    assert_eq!(
        s.message,
        "4 wanted, 3 placeable: 2 excluded by where/distinct"
    );
    // Nodes lacking the distinct attribute take none.
    let nodes = vec![node("n1 host=h1"), node("n2"), node("n3 host=h3")];
    let i = intent(&[spec("a", "a_1", "count 3; distinct host")]);
    let plan = reconcile(&i, &nodes, &[]);
    assert_eq!(plan.status[0].nodes, ["n1", "n3"]);
    assert_eq!(
        plan.status[0].message,
        "3 wanted, 2 placeable: 1 excluded by where/distinct"
    );
}

#[test]
fn too_few_live_nodes_is_failed() {
    let i = intent(&[spec("a", "a_1", "count 7")]);
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(plan.status[0].nodes.len(), 5);
    assert_eq!(plan.status[0].state, Doneness::Failed);
    assert_eq!(
        plan.status[0].message,
        "7 wanted, 5 placeable: only 5 live nodes"
    );
}

#[test]
fn running_units_stay_where_they_are() {
    // n4 and n5 would never be chosen first, but the unit already runs there.
    let s = spec("a", "a_1", "count 3; distinct host");
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[
            obs("n4", &[(&u, UnitState::Healthy)]),
            obs("n5", &[(&u, UnitState::Pending)]),
        ],
    );
    assert_eq!(plan.status[0].nodes, ["n1", "n4", "n5"]);
    assert_eq!(plan.status[0].running, 1);
    assert_eq!(plan.status[0].message, "1/3 healthy, 2 starting");
}

#[test]
fn over_count_keeps_healthy_first_then_lower_id() {
    let s = spec("a", "a_1", "count 2");
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[
            obs("n1", &[(&u, UnitState::Pending)]),
            obs("n2", &[(&u, UnitState::Pending)]),
            obs("n3", &[(&u, UnitState::Healthy)]),
        ],
    );
    assert_eq!(plan.status[0].nodes, ["n1", "n3"]);
}

#[test]
fn kept_units_respect_distinct() {
    // Two hosts share h1: only one of them keeps the unit.
    let nodes = vec![node("n1 host=h1"), node("n2 host=h1"), node("n3 host=h3")];
    let s = spec("a", "a_1", "count 2; distinct host");
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &nodes,
        &[
            obs("n1", &[(&u, UnitState::Pending)]),
            obs("n2", &[(&u, UnitState::Healthy)]),
        ],
    );
    assert_eq!(plan.status[0].nodes, ["n2", "n3"]);
}

#[test]
fn a_unit_on_a_node_that_is_no_longer_eligible_moves() {
    let s = spec("a", "a_1", r#"count 1; where os == "bsd""#);
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[obs("n1", &[(&u, UnitState::Healthy)])],
    );
    assert_eq!(placed(&plan), expect(&[("n4", &["a/a_1"])]));
}

#[test]
fn a_dead_node_s_unit_is_placed_elsewhere() {
    let s = spec("a", "a_1", "count 3; distinct host");
    let u = Unit::of(&s);
    let i = intent(&[s]);
    let report: Vec<Observed> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| obs(n, &[(&u, UnitState::Healthy)]))
        .collect();
    let plan = reconcile(&i, &five(), &report);
    assert_eq!(plan.status[0].state, Doneness::Converged);
    assert_eq!(plan.status[0].message, "3/3 healthy");
    // n2 dies: its (stale) report is ignored and the unit goes to n4.
    let alive: Vec<Node> = five().into_iter().filter(|n| n.id != "n2").collect();
    let plan = reconcile(&i, &alive, &report);
    assert!(!plan.assign.contains_key("n2"));
    assert_eq!(plan.status[0].nodes, ["n1", "n3", "n4"]);
    assert_eq!(
        (plan.status[0].state, plan.status[0].running),
        (Doneness::Progressing, 2)
    );
}

#[test]
fn nodes_that_failed_the_unit_are_avoided() {
    let s = spec("a", "a_1", "count 2");
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[
            obs("n1", &[(&u, UnitState::Failed)]),
            obs("n2", &[(&u, UnitState::Healthy)]),
        ],
    );
    assert_eq!(plan.status[0].nodes, ["n2", "n3"]);
    assert_eq!(plan.status[0].state, Doneness::Progressing);
    assert_eq!(
        plan.status[0].message,
        "1/2 healthy, 1 starting, failed on n1"
    );
}

#[test]
fn failures_and_constraints_explain_a_failed_service() {
    let s = spec("a", "a_1", r#"count 3; where os == "linux""#);
    let u = Unit::of(&s);
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[
            obs("n1", &[(&u, UnitState::Failed)]),
            obs("n2", &[(&u, UnitState::Failed)]),
        ],
    );
    let st = &plan.status[0];
    assert_eq!(st.nodes, ["n3"]);
    assert_eq!(st.state, Doneness::Failed);
    assert_eq!(
        st.message,
        "3 wanted, 1 placeable: 2 nodes failed it (n1, n2), 2 excluded by where/distinct"
    );
}

#[test]
fn failures_on_a_few_nodes_are_progress_elsewhere_on_count_or_three_failed() {
    let s = spec("a", "a_1", "count 1");
    let u = Unit::of(&s);
    let i = intent(&[s]);
    let failed_on = |nodes: &[&str]| -> Vec<Observed> {
        nodes
            .iter()
            .map(|n| obs(n, &[(&u, UnitState::Failed)]))
            .collect()
    };
    // One node failed it: tried on the next, progressing (no flapping to failed meanwhile).
    let plan = reconcile(&i, &five(), &failed_on(&["n1"]));
    assert_eq!(plan.status[0].nodes, ["n2"]);
    assert_eq!(plan.status[0].state, Doneness::Progressing);
    let plan = reconcile(&i, &five(), &failed_on(&["n1", "n2"]));
    assert_eq!(plan.status[0].state, Doneness::Progressing);
    // Three nodes failed it: failed, and no further node is tried (n4 and n5 are free).
    let plan = reconcile(&i, &five(), &failed_on(&["n1", "n2", "n3"]));
    assert_eq!(plan.status[0].nodes, Vec::<String>::new());
    assert!(plan.assign.values().all(|us| us.is_empty()), "{plan:?}");
    assert_eq!(plan.status[0].state, Doneness::Failed);
    assert_eq!(
        plan.status[0].message,
        "failed on 3 nodes (n1, n2, n3); no other node is tried while these failures stand"
    );
    // An attempt already starting when the third failure came is kept, and the state stays
    // failed meanwhile.
    let mut o = failed_on(&["n1", "n2", "n3"]);
    o.push(obs("n4", &[(&u, UnitState::Pending)]));
    let plan = reconcile(&i, &five(), &o);
    assert_eq!(plan.status[0].nodes, ["n4"]);
    assert_eq!(plan.status[0].state, Doneness::Failed);
    assert_eq!(
        plan.status[0].message,
        "failed on 3 nodes (n1, n2, n3); no other node is tried while these failures stand, \
         1 already starting"
    );
    // When a node's hold ends it stops reporting the failure: two failures are progress
    // again, and the unit is tried on another node (the lowest id among the least loaded).
    let plan = reconcile(&i, &five(), &failed_on(&["n2", "n3"]));
    assert_eq!(plan.status[0].nodes, ["n1"]);
    assert_eq!(plan.status[0].state, Doneness::Progressing);
    // A healthy instance ends it.
    let mut o = failed_on(&["n1", "n2", "n3"]);
    o.push(obs("n4", &[(&u, UnitState::Healthy)]));
    let plan = reconcile(&i, &five(), &o);
    assert_eq!(plan.status[0].state, Doneness::Converged);
}

#[test]
fn live_update_keeps_the_old_instance_until_the_new_one_is_healthy() {
    let three: Vec<Node> = five().into_iter().take(3).collect();
    let old = Unit::of(&spec("a", "a_3", "count 3; distinct host"));
    let mut new_spec = spec("a", "a_4", "count 3; distinct host");
    new_spec.artifact = D2.into();
    let new = Unit::of(&new_spec);
    let i = intent(&[new_spec]);
    let both = &["a/a_3", "a/a_4"][..];

    // Step 1: the old one runs everywhere; the new one is added beside it.
    let report: Vec<Observed> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| obs(n, &[(&old, UnitState::Healthy)]))
        .collect();
    let plan = reconcile(&i, &three, &report);
    assert_eq!(
        placed(&plan),
        expect(&[("n1", both), ("n2", both), ("n3", both)])
    );
    let st = &plan.status[0];
    assert_eq!((st.state, st.inst.as_str()), (Doneness::Progressing, "a_4"));
    assert_eq!(
        st.message,
        "0/3 healthy, 3 starting, the old instance stays on n1, n2, n3 until the new one is healthy"
    );

    // Step 2: healthy on two of three: the old one stays everywhere.
    let mut report = all(&plan, UnitState::Healthy);
    report[2].units.retain(|(u, _)| *u != new);
    report[2].units.push((new.clone(), UnitState::Pending));
    let plan = reconcile(&i, &three, &report);
    assert_eq!(
        placed(&plan),
        expect(&[("n1", both), ("n2", both), ("n3", both)])
    );
    assert_eq!(plan.status[0].running, 2);

    // Step 3: healthy everywhere: the old one is dropped; the service is converged only once
    // the deans have stopped it.
    let plan = reconcile(&i, &three, &all(&plan, UnitState::Healthy));
    assert_eq!(
        placed(&plan),
        expect(&[("n1", &["a/a_4"]), ("n2", &["a/a_4"]), ("n3", &["a/a_4"])])
    );
    assert_eq!(plan.status[0].state, Doneness::Progressing);
    assert_eq!(
        plan.status[0].message,
        "3/3 healthy; the old instance is stopping on n1, n2, n3"
    );
    // The deans report it stopping: still progressing, the same plan.
    let mut stopping = all(&plan, UnitState::Healthy);
    stopping[0].units.push((old.clone(), UnitState::Stopping));
    let again = reconcile(&i, &three, &stopping);
    assert_eq!(placed(&again), placed(&plan));
    assert_eq!(again.status[0].state, Doneness::Progressing);
    assert_eq!(
        again.status[0].message,
        "3/3 healthy; the old instance is stopping on n1"
    );
    // Gone: converged, and a fixed point.
    let done = reconcile(&i, &three, &all(&plan, UnitState::Healthy));
    assert_eq!(done.status[0].state, Doneness::Converged);
    assert_eq!(done.status[0].message, "3/3 healthy");
    assert_eq!(reconcile(&i, &three, &all(&done, UnitState::Healthy)), done);
}

#[test]
fn live_update_drops_old_units_that_failed_at_once() {
    let old = Unit::of(&spec("a", "a_3", "count 2"));
    let s = spec("a", "a_4", "count 2");
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[
            obs("n1", &[(&old, UnitState::Healthy)]),
            obs("n2", &[(&old, UnitState::Failed)]),
            obs("n3", &[(&old, UnitState::Stopping)]),
        ],
    );
    // The new unit avoids the loaded n1; the old one stays only on n1.
    assert_eq!(
        placed(&plan),
        expect(&[("n1", &["a/a_3"]), ("n2", &["a/a_4"]), ("n3", &["a/a_4"])])
    );
}

#[test]
fn live_update_that_fails_everywhere_keeps_the_old_instance() {
    let three: Vec<Node> = five().into_iter().take(3).collect();
    let old = Unit::of(&spec("a", "a_3", "count 2"));
    let s = spec("a", "a_4", "count 2");
    let new = Unit::of(&s);
    let report: Vec<Observed> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| obs(n, &[(&old, UnitState::Healthy), (&new, UnitState::Failed)]))
        .collect();
    let plan = reconcile(&intent(&[s]), &three, &report);
    assert_eq!(
        placed(&plan),
        expect(&[("n1", &["a/a_3"]), ("n2", &["a/a_3"]), ("n3", &["a/a_3"])])
    );
    assert_eq!(plan.status[0].state, Doneness::Failed);
    assert_eq!(
        plan.status[0].message,
        "2 wanted, 0 placeable: 3 nodes failed it (n1, n2, n3); the old instance stays on n1, n2, n3"
    );
}

#[test]
fn units_of_services_not_in_the_intent_stop() {
    let s = spec("a", "a_1", "count 1");
    let u = Unit::of(&s);
    let gone = Unit::of(&spec("gone", "gone_1", "count 1"));
    let mut other_horde = u.clone();
    other_horde.horde = "blue".into();
    let plan = reconcile(
        &intent(&[s]),
        &five(),
        &[obs(
            "n1",
            &[
                (&u, UnitState::Healthy),
                (&gone, UnitState::Healthy),
                (&other_horde, UnitState::Healthy),
            ],
        )],
    );
    assert_eq!(placed(&plan), expect(&[("n1", &["a/a_1"])]));
    assert_eq!(plan.status[0].state, Doneness::Converged);
}

#[test]
fn load_spreads_services_across_nodes() {
    let nodes = vec![node("n1"), node("n2"), node("n3")];
    let i = intent(&[
        spec("a", "a_1", "count 1"),
        spec("b", "b_1", "count 2"),
        spec("c", "c_1", "count 1"),
    ]);
    let plan = reconcile(&i, &nodes, &[]);
    assert_eq!(
        placed(&plan),
        expect(&[
            ("n1", &["a/a_1", "c/c_1"]),
            ("n2", &["b/b_1"]),
            ("n3", &["b/b_1"])
        ])
    );
    // Kept units count as load before any fill: with c kept on n1, a goes to n2, b to n3 and
    // then to n1 (n1 and n2 both hold one: the lower id).
    let c = Unit::of(&i.services[2]);
    let plan = reconcile(&i, &nodes, &[obs("n1", &[(&c, UnitState::Healthy)])]);
    assert_eq!(
        placed(&plan),
        expect(&[
            ("n1", &["b/b_1", "c/c_1"]),
            ("n2", &["a/a_1"]),
            ("n3", &["b/b_1"])
        ])
    );
}

#[test]
fn status_is_in_horde_api_order_whatever_the_intent_order() {
    let mut blue = spec("a", "a_1", "count 1");
    blue.horde = "blue".into();
    let i = intent(&[
        spec("z", "z_1", "count 1"),
        spec("a", "a_1", "count 1"),
        blue,
    ]);
    let plan = reconcile(&i, &five(), &[]);
    let keys: Vec<(&str, &str)> = plan
        .status
        .iter()
        .map(|s| (s.horde.as_str(), s.api.as_str()))
        .collect();
    assert_eq!(keys, [("blue", "a"), ("default", "a"), ("default", "z")]);
}

#[test]
fn a_hand_built_bad_placement_is_failed_and_keeps_old_units() {
    let old = Unit::of(&spec("a", "a_1", "count 1"));
    let bad = Intent {
        services: vec![spec("a", "a_2", "count zero")],
    };
    let plan = reconcile(&bad, &five(), &[obs("n2", &[(&old, UnitState::Healthy)])]);
    assert_eq!(placed(&plan), expect(&[("n2", &["a/a_1"])]));
    let st = &plan.status[0];
    assert_eq!((st.state, st.desired), (Doneness::Failed, 0));
    assert!(
        st.message.starts_with("placement: line 1, column 7:"),
        "{}",
        st.message
    );
}

#[test]
fn duplicate_reports_and_nodes_do_not_depend_on_order() {
    let s = spec("a", "a_1", "count 1");
    let u = Unit::of(&s);
    let i = intent(&[s]);
    let a = obs("n3", &[(&u, UnitState::Failed)]);
    let b = obs("n3", &[(&u, UnitState::Healthy)]);
    let p1 = reconcile(&i, &five(), &[a.clone(), b.clone()]);
    let p2 = reconcile(&i, &five(), &[b, a]);
    assert_eq!(p1, p2);
    assert_eq!(
        p1.status[0].nodes,
        ["n3"],
        "Healthy wins over Failed in a duplicated report"
    );
    let mut nodes = five();
    nodes.push(node("n1 os=other"));
    let p1 = reconcile(&i, &nodes, &[]);
    nodes.reverse();
    assert_eq!(reconcile(&i, &nodes, &[]), p1);
}

#[test]
fn a_parsed_intent_file_reconciles() {
    let text = format!(
        "[[service]]\napi = \"galumph2\"\ninst = \"galumph2_3\"\nartifact = \"{D1}\"\nfunction = \"galumph2_3\"\nplacement = \"count 2; where os == 'linux'; distinct host\"\n"
    )
    .replace('\'', "\\\"");
    let i = parse_intent(&text).unwrap();
    let plan = reconcile(&i, &five(), &[]);
    assert_eq!(
        placed(&plan),
        expect(&[
            ("n1", &["galumph2/galumph2_3"]),
            ("n2", &["galumph2/galumph2_3"])
        ])
    );
    let plan2 = reconcile(&i, &five(), &all(&plan, UnitState::Healthy));
    assert_eq!(plan2.assign, plan.assign);
    assert_eq!(plan2.status[0].state, Doneness::Converged);
}
