//! What a service sees of the flock: this node, the leader it follows, the members and whether
//! each lives. The agent publishes a new view for each snapshot of the flock driver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The flock views, newest first; `changed()` wakes on every new one.
pub type FlockWatch = watch::Receiver<Arc<FlockView>>;

/// One member of the flock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Boot id of the incarnation the flock knows.
    pub boot: u64,
    /// Flock address (its IP is where the node's other ports are).
    pub addr: SocketAddr,
    /// Alive or suspect.
    pub live: bool,
    /// For a member not live (dead or left): for how long, as the flock says.
    pub gone_for: Duration,
}

/// The leader this node follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leader {
    /// Its node id.
    pub id: u64,
    /// Its flock address.
    pub addr: SocketAddr,
    /// The election term.
    pub term: u64,
}

/// The flock as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlockView {
    /// This node's id.
    pub me: u64,
    /// This node's flock address.
    pub addr: SocketAddr,
    /// The leader it follows, if one is known.
    pub leader: Option<Leader>,
    /// Whether this node has started leaving.
    pub leaving: bool,
    /// Live (alive or suspect) members, this node included.
    pub live: usize,
    /// Every member known, this node included, in node id order.
    pub members: Vec<Member>,
}

impl FlockView {
    /// A flock of this node alone, leading term 1 (tests, and a start value).
    pub fn alone(me: u64, addr: SocketAddr) -> FlockView {
        FlockView {
            me,
            addr,
            leader: Some(Leader {
                id: me,
                addr,
                term: 1,
            }),
            leaving: false,
            live: 1,
            members: vec![Member {
                id: me,
                boot: 0,
                addr,
                live: true,
                gone_for: Duration::ZERO,
            }],
        }
    }

    /// Whether this node leads.
    pub fn leads(&self) -> bool {
        self.leader.is_some_and(|l| l.id == self.me)
    }

    /// Member `id`, if the flock knows it.
    pub fn member(&self, id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The live members, this node included.
    pub fn live_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.live)
    }

    /// Where node `id` serves `port`: its flock IP and that port.
    pub fn netid_of(&self, id: u64, port: u16) -> Option<SocketAddr> {
        self.member(id).map(|m| SocketAddr::new(m.addr.ip(), port))
    }
}

/// A node id as the flock prints it (16 hex digits), the name placement uses for a node.
pub fn node_name(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_node_leads_and_is_found_at_its_own_address() {
        let addr: SocketAddr = "127.0.0.9:7700".parse().unwrap();
        let v = FlockView::alone(0xab, addr);
        assert!(v.leads());
        assert_eq!(
            v.netid_of(0xab, 7701),
            Some("127.0.0.9:7701".parse().unwrap())
        );
        assert_eq!(v.netid_of(1, 7701), None);
        assert_eq!(node_name(0xab), "00000000000000ab");
    }
}
