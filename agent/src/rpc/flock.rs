//! The local API's flock calls: the agent's status, the members, the leader, the keyring and
//! revocation, answered from the flock driver's snapshot and commands.

use crux_flock::MemberState;
use crux_proto::grpc::reeve::v1 as pb;
use tonic::{Response, Status};

use crate::keys::KeyEntry;
use crate::state::AgentState;

/// UNAVAILABLE, naming the step under way, until the bootstrap is done.
pub(super) fn check_ready(state: &AgentState) -> Result<(), Status> {
    if state.bootstrapped() {
        Ok(())
    } else {
        let step = state.pending_step().unwrap_or("shutdown");
        Err(Status::unavailable(format!(
            "agent not ready (bootstrap step {step})"
        )))
    }
}

/// `Status`: identity, bloc and bootstrap progress (answers before ready).
pub(super) fn status(state: &AgentState) -> pb::StatusResponse {
    let snap = state.flock.snapshot();
    let steps = state
        .steps()
        .into_iter()
        .map(|s| {
            let (phase, phase_for_ms, phase_detail) = match &s.readiness {
                Some(r) => (
                    r.phase.to_string(),
                    r.since.elapsed().as_millis() as u64,
                    r.detail.clone(),
                ),
                None => ("pending".to_string(), 0, String::new()),
            };
            pb::BootstrapStep {
                name: s.name.to_string(),
                done: s.done,
                elapsed_ms: s.elapsed.as_millis() as u64,
                detail: s.detail,
                phase,
                phase_for_ms,
                phase_detail,
            }
        })
        .collect();
    let overall = state.overall();
    let logs = state.ops.logs();
    let revert = logs.pending_revert();
    pb::StatusResponse {
        node_id: snap.identity.id.to_string(),
        boot_id: snap.identity.boot.to_string(),
        bloc: state.settings.flock.bloc.clone(),
        addr: snap.identity.addr.to_string(),
        ready: overall.ready,
        steps,
        live_members: snap.live as u64,
        key_epoch: state.key_epoch(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: state.uptime().as_millis() as u64,
        ready_for_ms: overall.for_.as_millis() as u64,
        not_ready: overall.missing.unwrap_or_default(),
        bootstrapped: state.bootstrapped(),
        log_filter: logs.filter(),
        log_filter_reverts_in_ms: revert
            .as_ref()
            .map(|r| {
                r.at.saturating_duration_since(tokio::time::Instant::now())
                    .as_millis() as u64
            })
            .unwrap_or(0),
        log_filter_reverts_to: revert.map(|r| r.to).unwrap_or_default(),
        node_attributes: state.ops.node_attributes().into_iter().collect(),
    }
}

fn state_pb(s: MemberState) -> pb::MemberState {
    match s {
        MemberState::Alive => pb::MemberState::Alive,
        MemberState::Suspect => pb::MemberState::Suspect,
        MemberState::Dead => pb::MemberState::Dead,
        MemberState::Left => pb::MemberState::Left,
    }
}

/// `Members`: every member this node knows, itself included.
pub(super) fn members(state: &AgentState) -> pb::MembersResponse {
    let snap = state.flock.snapshot();
    let leader = snap.leader.map(|l| l.id);
    let members = snap
        .members
        .iter()
        .map(|m| pb::Member {
            id: m.info.id.to_string(),
            addr: m.info.addr.to_string(),
            state: state_pb(m.info.state) as i32,
            leader: Some(m.info.id) == leader,
            incarnation: m.info.incarnation,
            boot_id: m.info.boot.to_string(),
            self_: m.info.id == snap.identity.id,
            state_age_ms: snap.now.saturating_sub(m.since).as_millis() as u64,
        })
        .collect();
    pb::MembersResponse { members }
}

/// `Leader`: NOT_FOUND while no leader is known.
pub(super) fn leader(state: &AgentState) -> Result<pb::LeaderResponse, Status> {
    match state.flock.snapshot().leader {
        Some(l) => Ok(pb::LeaderResponse {
            id: l.id.to_string(),
            addr: l.addr.to_string(),
            term: l.term,
        }),
        None => Err(Status::not_found("no leader known")),
    }
}

fn keys_pb(keys: Vec<KeyEntry>) -> Vec<pb::Key> {
    keys.into_iter()
        .map(|k| pb::Key {
            id: k.id,
            primary: k.primary,
        })
        .collect()
}

/// `ListKeys`: the keyring's key ids, never the key material.
pub(super) fn list_keys(state: &AgentState) -> pb::ListKeysResponse {
    pb::ListKeysResponse {
        keys: keys_pb(state.keys.list()),
        nodes: 1,
    }
}

/// The answer to a keyring change: the keyring after it, and the live members it spreads to
/// (this node included).
pub(super) fn keyring_changed(
    state: &AgentState,
    r: anyhow::Result<Vec<KeyEntry>>,
) -> Result<Response<pb::KeyringResponse>, Status> {
    let keys = r.map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
    Ok(Response::new(pb::KeyringResponse {
        keys: keys_pb(keys),
        nodes: state.flock.snapshot().live as u32,
    }))
}

/// `Revoke`: a member this node knows, not itself.
pub(super) async fn revoke(state: &AgentState, text: &str) -> Result<pb::RevokeResponse, Status> {
    let id: crux_flock::NodeId = text.trim().parse().map_err(|_| {
        Status::invalid_argument(format!("{text:?} is not a node id (16 hex digits)"))
    })?;
    let snap = state.flock.snapshot();
    if id == snap.identity.id {
        return Err(Status::invalid_argument(
            "this node cannot revoke itself: revoke it from another member",
        ));
    }
    let Some(member) = snap.members.iter().find(|m| m.info.id == id) else {
        return Err(Status::not_found(format!("no member {id} is known here")));
    };
    let addr = member.info.addr.to_string();
    state
        .flock
        .command(crux_flock::Command::Revoke(id))
        .await
        .map_err(|_| Status::unavailable("the flock is stopping"))?;
    tracing::warn!(node = %id, %addr, "node revoked by an operator");
    Ok(pb::RevokeResponse { addr })
}
