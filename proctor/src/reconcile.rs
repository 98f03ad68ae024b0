//! Reconciliation: from the intent, the live nodes and what their deans report, the whole set
//! of units every live node should run, and how far each service is from its intent.
//!
//! [`reconcile`] is level-triggered and stateless: a new leader computes the same [`Plan`] from
//! the same inputs, whatever their order. It is stable: a unit of the wanted kind that runs or
//! is starting on a live node that is still eligible is never moved.
//!
//! Per service S of the intent, with wanted unit U ([`Unit::of`]), the rules are:
//!
//! 1. **Keep** U where a live node reports it Pending or Healthy, the node passes `where`, and
//!    no kept U already holds its `distinct` value, up to `count` (Healthy first, then by node
//!    id). A node without the `distinct` attribute takes no U.
//! 2. **Fill** up to `count`, unless U failed on `count` nodes and on at least three (the
//!    artifact is at fault: no further node is tried while those failures stand; each dean
//!    holds a failed unit for a while, doubling, which is the back-off). Candidates are live
//!    nodes that pass `where`, do not hold U, did not report U Failed, and whose `distinct`
//!    value no U of S holds. One at a time, the
//!    candidate whose `spread` value holds fewest U of S wins, then the one with fewest units
//!    assigned so far (load, every service counted), then the lowest node id. Services are
//!    filled in `(horde, api)` order.
//! 3. **Live update**: units of S that are not U (an older inst, artifact or function) stay
//!    where they are reported Pending or Healthy until every node U is assigned to reports it
//!    Healthy (with at least one such node); then they are dropped. Old units reported Failed
//!    or Stopping are dropped at once. Old units do not count against `distinct` or `spread`
//!    (a live update starts the new instance beside the old one).
//! 4. Units whose `(horde, api)` is not in the intent are not assigned: they stop.
//!
//! Reports from nodes that are not live are ignored. If a node reports the same unit twice,
//! the first of Healthy, Pending, Failed, Stopping counts.
//!
//! Doneness per service: **Converged** when U is Healthy on `count` nodes and no old unit of S
//! is assigned or still stopping; **Failed** when U cannot reach `count` (fewer placeable nodes than wanted: the
//! message says why, e.g. `3 wanted, 1 placeable: 2 nodes failed it, 2 excluded by
//! where/distinct`), or when U failed on `count` nodes and on at least three (the artifact is
//! at fault, not the nodes; see the fill); otherwise **Progressing** (a failure or two is
//! progress elsewhere, not a state that flaps).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::intent::{Intent, ServiceSpec};
use crate::lang::{ParseError, Placement};
use crate::place::{distinct_key, spread_key, Node, Unit, UnitState};

/// What one node's dean reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The node id.
    pub node: String,
    /// The units it runs, starts, stops or recently failed, with their states.
    pub units: Vec<(Unit, UnitState)>,
}

/// How far a service is from its intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Doneness {
    /// The wanted unit is Healthy on `count` nodes and nothing old is left.
    Converged,
    /// On its way.
    Progressing,
    /// Cannot reach `count` (constraints, failures), or every attempt failed.
    Failed,
}

impl fmt::Display for Doneness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Doneness::Converged => "converged",
            Doneness::Progressing => "progressing",
            Doneness::Failed => "failed",
        })
    }
}

/// One service's doneness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The horde.
    pub horde: String,
    /// The api.
    pub api: String,
    /// The wanted instance.
    pub inst: String,
    /// Converged, progressing or failed.
    pub state: Doneness,
    /// The placement's `count` (0 when a hand-built spec's placement does not parse).
    pub desired: u32,
    /// Nodes assigned the wanted unit that report it Healthy.
    pub running: u32,
    /// Nodes the wanted unit is assigned to, by id.
    pub nodes: Vec<String>,
    /// For people: progress, or why it failed.
    pub message: String,
}

/// The outcome of [`reconcile`].
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Per live node (every one, possibly empty), the whole set of units it should run.
    pub assign: BTreeMap<String, BTreeSet<Unit>>,
    /// Per service of the intent, in `(horde, api)` order.
    pub status: Vec<ServiceStatus>,
}

/// The most nodes a message lists by id.
const MESSAGE_NODES_MAX: usize = 5;

/// One service while it is being reconciled.
struct Svc<'a> {
    spec: &'a ServiceSpec,
    unit: Unit,
    placement: Result<Placement, ParseError>,
    /// Nodes U is assigned to, in the order chosen.
    assigned: Vec<&'a str>,
    /// Old units of S reported Pending or Healthy on live nodes.
    old: Vec<(&'a str, &'a Unit)>,
    /// Nodes still stopping an old unit of S (not assigned any more, not gone yet).
    stopping: Vec<&'a str>,
}

/// Computes the plan (the rules are in the module doc).
pub fn reconcile(intent: &Intent, nodes: &[Node], observed: &[Observed]) -> Plan {
    // Live nodes by id. A duplicated id keeps the entry whose attributes print first, so the
    // choice does not depend on the input order.
    let mut live: BTreeMap<&str, &Node> = BTreeMap::new();
    for n in nodes {
        live.entry(&n.id)
            .and_modify(|have| {
                if format!("{:?}", n.attrs) < format!("{:?}", have.attrs) {
                    *have = n;
                }
            })
            .or_insert(n);
    }

    // Reports of live nodes, merged per node and unit.
    let rank = |s: UnitState| match s {
        UnitState::Healthy => 0,
        UnitState::Pending => 1,
        UnitState::Failed => 2,
        UnitState::Stopping => 3,
    };
    let mut seen: BTreeMap<&str, BTreeMap<&Unit, UnitState>> = BTreeMap::new();
    for o in observed {
        let Some((&id, _)) = live.get_key_value(o.node.as_str()) else {
            continue;
        };
        let units = seen.entry(id).or_default();
        for (u, s) in &o.units {
            units
                .entry(u)
                .and_modify(|have| {
                    if rank(*s) < rank(*have) {
                        *have = *s;
                    }
                })
                .or_insert(*s);
        }
    }
    let state_of = |node: &str, u: &Unit| seen.get(node).and_then(|m| m.get(u)).copied();

    // Services in (horde, api) order; a hand-built intent with a duplicated key keeps the first.
    let mut specs: Vec<&ServiceSpec> = intent.services.iter().collect();
    specs.sort_by(|a, b| (&a.horde, &a.api).cmp(&(&b.horde, &b.api)));
    specs.dedup_by(|b, a| a.horde == b.horde && a.api == b.api);
    let mut svcs: Vec<Svc<'_>> = specs
        .into_iter()
        .map(|spec| Svc {
            spec,
            unit: Unit::of(spec),
            placement: spec.try_placement(),
            assigned: Vec::new(),
            old: Vec::new(),
            stopping: Vec::new(),
        })
        .collect();

    let mut load: BTreeMap<&str, usize> = live.keys().map(|&id| (id, 0)).collect();

    // 1. Keep running U; collect the old units (they count as load while the fill runs).
    for svc in &mut svcs {
        for (&id, units) in &seen {
            for (&u, &s) in units {
                if u.is_of(&svc.spec.horde, &svc.spec.api) && *u != svc.unit && s.is_live() {
                    svc.old.push((id, u));
                    *load.get_mut(id).expect("live") += 1;
                }
                if u.is_of(&svc.spec.horde, &svc.spec.api)
                    && *u != svc.unit
                    && s == UnitState::Stopping
                {
                    svc.stopping.push(id);
                }
            }
        }
        let Ok(p) = &svc.placement else { continue };
        let mut running: Vec<(bool, &str)> = live
            .iter()
            .filter(|(id, n)| {
                state_of(id, &svc.unit).is_some_and(UnitState::is_live) && p.eligible(&n.attrs)
            })
            .map(|(&id, _)| (state_of(id, &svc.unit) != Some(UnitState::Healthy), id))
            .collect();
        running.sort();
        let mut taken = BTreeSet::new();
        for (_, id) in running {
            if svc.assigned.len() as u64 >= u64::from(p.count) {
                break;
            }
            match distinct_key(p, live[id]) {
                None => continue,
                Some(Some(k)) => {
                    if !taken.insert(k) {
                        continue;
                    }
                }
                Some(None) => {}
            }
            svc.assigned.push(id);
            *load.get_mut(id).expect("live") += 1;
        }
    }

    // 2. Fill the rest, unless the artifact is at fault (see [`gave_up`]).
    for svc in &mut svcs {
        let Ok(p) = &svc.placement else { continue };
        if gave_up(
            p.count as usize,
            failed_on(&live, &state_of, &svc.unit).len(),
        ) {
            continue;
        }
        let mut taken: BTreeSet<String> = BTreeSet::new();
        let mut per_spread: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for id in &svc.assigned {
            if let Some(Some(k)) = distinct_key(p, live[id]) {
                taken.insert(k);
            }
            *per_spread.entry(spread_key(p, live[id])).or_default() += 1;
        }
        // (node id, its distinct value, its spread value), computed once.
        let mut candidates: Vec<(&str, Option<String>, Option<String>)> = live
            .iter()
            .filter(|(id, n)| {
                !svc.assigned.contains(id)
                    && state_of(id, &svc.unit) != Some(UnitState::Failed)
                    && p.eligible(&n.attrs)
            })
            .filter_map(|(&id, n)| Some((id, distinct_key(p, n)?, spread_key(p, n))))
            .collect();
        while (svc.assigned.len() as u64) < u64::from(p.count) {
            let best = candidates
                .iter()
                .enumerate()
                .filter(|(_, (_, d, _))| d.as_ref().is_none_or(|k| !taken.contains(k)))
                .min_by_key(|(_, (id, _, sp))| {
                    (per_spread.get(sp).copied().unwrap_or(0), load[id], *id)
                })
                .map(|(i, _)| i);
            let Some(i) = best else { break };
            let (id, d, sp) = candidates.swap_remove(i);
            if let Some(k) = d {
                taken.insert(k);
            }
            *per_spread.entry(sp).or_default() += 1;
            *load.get_mut(id).expect("live") += 1;
            svc.assigned.push(id);
        }
    }

    // 3. Assignments and doneness.
    let mut assign: BTreeMap<String, BTreeSet<Unit>> = live
        .keys()
        .map(|id| (id.to_string(), BTreeSet::new()))
        .collect();
    let mut status = Vec::with_capacity(svcs.len());
    for svc in &svcs {
        let running = svc
            .assigned
            .iter()
            .filter(|id| state_of(id, &svc.unit) == Some(UnitState::Healthy))
            .count();
        let new_ready = !svc.assigned.is_empty() && running == svc.assigned.len();
        let keep_old = !new_ready && !svc.old.is_empty();
        for id in &svc.assigned {
            assign.get_mut(*id).expect("live").insert(svc.unit.clone());
        }
        if keep_old {
            for (id, u) in &svc.old {
                assign.get_mut(*id).expect("live").insert((*u).clone());
            }
        }
        let mut nodes: Vec<String> = svc.assigned.iter().map(|s| s.to_string()).collect();
        nodes.sort();
        let (state, message) = doneness(svc, &live, &state_of, running, keep_old);
        status.push(ServiceStatus {
            horde: svc.spec.horde.clone(),
            api: svc.spec.api.clone(),
            inst: svc.spec.inst.clone(),
            state,
            desired: svc.placement.as_ref().map_or(0, |p| p.count),
            running: running as u32,
            nodes,
            message,
        });
    }
    Plan { assign, status }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn list(ids: &[&str]) -> String {
    let mut s = ids
        .iter()
        .take(MESSAGE_NODES_MAX)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > MESSAGE_NODES_MAX {
        s.push_str(&format!(" and {} more", ids.len() - MESSAGE_NODES_MAX));
    }
    s
}

/// Failures on this many nodes (or on `count`, if more) make a service failed.
const FAILED_NODES_MIN: usize = 3;

/// Whether a unit that failed on `failed` nodes is failed for good: on as many nodes as it wants
/// instances, and on at least three, the artifact is at fault rather than the nodes. It is then
/// placed on no further node (a bad artifact would otherwise crash on every node of a large
/// flock in turn). Each dean reports a failed unit for its hold (`[picket] failed_hold`,
/// doubling), so once holds end the unit is tried again: that is the service's back-off. A few
/// failures are just progress elsewhere, not a state that flaps.
fn gave_up(count: usize, failed: usize) -> bool {
    failed >= count.max(FAILED_NODES_MIN)
}

/// The live nodes that report `unit` failed, by id.
fn failed_on<'a>(
    live: &BTreeMap<&'a str, &Node>,
    state_of: &dyn Fn(&str, &Unit) -> Option<UnitState>,
    unit: &Unit,
) -> Vec<&'a str> {
    live.keys()
        .copied()
        .filter(|id| state_of(id, unit) == Some(UnitState::Failed))
        .collect()
}

fn doneness(
    svc: &Svc<'_>,
    live: &BTreeMap<&str, &Node>,
    state_of: &dyn Fn(&str, &Unit) -> Option<UnitState>,
    running: usize,
    keep_old: bool,
) -> (Doneness, String) {
    let p = match &svc.placement {
        Ok(p) => p,
        Err(e) => return (Doneness::Failed, format!("placement: {e}")),
    };
    let count = p.count as usize;
    let failed = failed_on(live, state_of, &svc.unit);
    let old_nodes = || {
        let mut ids: Vec<&str> = svc.old.iter().map(|(id, _)| *id).collect();
        ids.dedup();
        ids
    };
    // The tail of a failed service's message while its old instance is kept.
    let old_stays = || {
        if keep_old {
            format!("; the old instance stays on {}", list(&old_nodes()))
        } else {
            String::new()
        }
    };
    if running == count && !keep_old {
        // Old units dropped this round, or still stopping: not gone yet.
        let mut lingering: Vec<&str> = svc
            .stopping
            .iter()
            .copied()
            .chain(svc.old.iter().map(|(id, _)| *id))
            .collect();
        lingering.sort_unstable();
        lingering.dedup();
        if lingering.is_empty() {
            return (Doneness::Converged, format!("{running}/{count} healthy"));
        }
        return (
            Doneness::Progressing,
            format!(
                "{running}/{count} healthy; the old instance is stopping on {}",
                list(&lingering)
            ),
        );
    }
    let starting = svc.assigned.len().saturating_sub(running);
    // Live nodes that neither failed U nor were assigned it.
    let untried = live
        .keys()
        .filter(|id| !svc.assigned.contains(id) && !failed.contains(id))
        .count();
    // With no node left untried and too few assigned, the branch below explains it better.
    if gave_up(count, failed.len())
        && running < count
        && (untried > 0 || svc.assigned.len() >= count)
    {
        let mut message = format!(
            "failed on {} ({})",
            plural(failed.len(), "node", "nodes"),
            list(&failed)
        );
        if untried > 0 {
            message.push_str("; no other node is tried while these failures stand");
        }
        if starting > 0 {
            message.push_str(&format!(", {starting} already starting"));
        }
        return (Doneness::Failed, message + &old_stays());
    }
    if svc.assigned.len() < count {
        // Neither assigned nor failed: excluded by `where` or `distinct` (the fill took every
        // other candidate).
        let excluded = untried;
        let mut why = Vec::new();
        if !failed.is_empty() {
            why.push(format!(
                "{} it ({})",
                plural(failed.len(), "node failed", "nodes failed"),
                list(&failed)
            ));
        }
        if excluded > 0 {
            why.push(format!(
                "{} by where/distinct",
                plural(excluded, "excluded", "excluded")
            ));
        }
        if live.len() < count {
            why.push(format!(
                "only {}",
                plural(live.len(), "live node", "live nodes")
            ));
        }
        let message = format!(
            "{count} wanted, {} placeable: {}",
            svc.assigned.len(),
            why.join(", ")
        );
        return (Doneness::Failed, message + &old_stays());
    }
    let mut message = format!("{running}/{count} healthy");
    if starting > 0 {
        message.push_str(&format!(", {starting} starting"));
    }
    if keep_old {
        message.push_str(&format!(
            ", the old instance stays on {} until the new one is healthy",
            list(&old_nodes())
        ));
    }
    if !failed.is_empty() {
        message.push_str(&format!(", failed on {}", list(&failed)));
    }
    (Doneness::Progressing, message)
}
