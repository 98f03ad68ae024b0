//! The member table: every member a node knows of, kept compact.
//!
//! A node of a 10,000-node flock holds 10,000 entries, and the simulator holds every node's table
//! at once (10^8 entries), so each entry is as small as the protocol allows: 40 bytes in the map
//! (an IPv4 address packed into 8 bytes; an IPv6 address kept beside the table), plus the
//! address index and the list of live members. Everything derived from the entries (the index by
//! address, the live and dead sets, the digest of the live membership) is kept in step by the
//! only two functions that change entries, [`Table::set`] and [`Table::remove`].

use std::hash::{BuildHasher, BuildHasherDefault};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use crux_proto::flock::{BootId, MemberInfo, MemberState, NodeId, NodeKey};
use rand::Rng;

use super::idset::IdSet;
use super::{is_live, FastHasher, FastMap, Member};

/// `live_pos` of an entry that is not live.
const NOT_LIVE: u32 = u32::MAX;
/// Bit set in the key of an IPv6 address (IPv4 keys use the low 48 bits).
const V6_KEY: u64 = 1 << 63;

/// A socket address as a 64-bit key: IPv4 addresses packed exactly, IPv6 addresses hashed (the
/// table keeps the full address beside and checks it on every lookup).
pub(crate) fn addr_key(addr: &SocketAddr) -> u64 {
    match addr {
        SocketAddr::V4(a) => (u64::from(a.ip().to_bits()) << 16) | u64::from(a.port()),
        SocketAddr::V6(a) => BuildHasherDefault::<FastHasher>::default().hash_one(a) | V6_KEY,
    }
}

struct Slot {
    boot: BootId,
    incarnation: u64,
    /// When the member entered its state, in nanoseconds of driver time.
    since: u64,
    /// [`addr_key`] of its address.
    addr: u64,
    state: MemberState,
    /// Index in [`Table::live`], or [`NOT_LIVE`].
    live_pos: u32,
}

/// The members of the flock other than this node.
#[derive(Default)]
pub(crate) struct Table {
    slots: FastMap<NodeId, Slot>,
    /// Full addresses of the members that have an IPv6 address.
    v6: FastMap<NodeId, SocketAddrV6>,
    /// Node-plane keys of the members that announce one (beside the slots, so that the
    /// simulator's keyless tables stay 40 bytes an entry).
    keys: FastMap<NodeId, NodeKey>,
    by_addr: FastMap<u64, NodeId>,
    /// Live (alive or suspect) members, in no particular order.
    live: Vec<NodeId>,
    /// Dead (not left) members.
    dead: IdSet,
    /// XOR of [`member_hash`] over the live members.
    digest: u64,
}

/// What the live-membership digest counts of one member.
/// (splitmix64 of id and boot).
pub(crate) fn member_hash(id: NodeId, boot: BootId) -> u64 {
    let mut z = id.0 ^ boot.0.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Table {
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn contains(&self, id: NodeId) -> bool {
        self.slots.contains_key(&id)
    }

    fn addr_of(&self, id: NodeId, slot: &Slot) -> SocketAddr {
        if slot.addr & V6_KEY == 0 {
            let ip = Ipv4Addr::from_bits((slot.addr >> 16) as u32);
            SocketAddr::V4(SocketAddrV4::new(ip, slot.addr as u16))
        } else {
            SocketAddr::V6(self.v6[&id])
        }
    }

    fn member_of(&self, id: NodeId, slot: &Slot) -> Member {
        Member {
            info: MemberInfo {
                id,
                boot: slot.boot,
                addr: self.addr_of(id, slot),
                incarnation: slot.incarnation,
                state: slot.state,
                key: self.keys.get(&id).copied(),
            },
            since: Duration::from_nanos(slot.since),
        }
    }

    pub(crate) fn get(&self, id: NodeId) -> Option<Member> {
        self.slots.get(&id).map(|s| self.member_of(id, s))
    }

    pub(crate) fn info(&self, id: NodeId) -> Option<MemberInfo> {
        self.get(id).map(|m| m.info)
    }

    pub(crate) fn addr(&self, id: NodeId) -> Option<SocketAddr> {
        self.slots.get(&id).map(|s| self.addr_of(id, s))
    }

    pub(crate) fn state(&self, id: NodeId) -> Option<MemberState> {
        self.slots.get(&id).map(|s| s.state)
    }

    pub(crate) fn is_live(&self, id: NodeId) -> bool {
        self.slots.get(&id).is_some_and(|s| is_live(s.state))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Member> + '_ {
        self.slots.iter().map(|(id, s)| self.member_of(*id, s))
    }

    /// The member at `addr`, if any.
    pub(crate) fn id_at(&self, addr: &SocketAddr) -> Option<NodeId> {
        let id = *self.by_addr.get(&addr_key(addr))?;
        (self.addr(id).as_ref() == Some(addr)).then_some(id)
    }

    /// XOR of [`member_hash`] over the live members.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    /// Inserts or replaces the entry of `info.id`.
    pub(crate) fn set(&mut self, info: MemberInfo, since: Duration) {
        let id = info.id;
        let key = addr_key(&info.addr);
        let mut live_pos = NOT_LIVE;
        match info.key {
            Some(k) => {
                self.keys.insert(id, k);
            }
            // A record without a key keeps the key of the same boot (it changes only with one).
            None if self.slots.get(&id).is_some_and(|old| old.boot == info.boot) => {}
            None => {
                self.keys.remove(&id);
            }
        }
        if let Some(old) = self.slots.get(&id) {
            live_pos = old.live_pos;
            if is_live(old.state) {
                self.digest ^= member_hash(id, old.boot);
            }
            if old.state == MemberState::Dead && info.state != MemberState::Dead {
                self.dead.remove(id);
            }
            if old.addr != key && self.by_addr.get(&old.addr) == Some(&id) {
                self.by_addr.remove(&old.addr);
            }
        }
        match info.addr {
            SocketAddr::V6(a) => {
                self.v6.insert(id, a);
            }
            SocketAddr::V4(_) => {
                self.v6.remove(&id);
            }
        }
        self.by_addr.insert(key, id);
        if is_live(info.state) {
            self.digest ^= member_hash(id, info.boot);
            if live_pos == NOT_LIVE {
                live_pos = self.live.len() as u32;
                self.live.push(id);
            }
        } else if live_pos != NOT_LIVE {
            self.unlist_live(live_pos);
            live_pos = NOT_LIVE;
        }
        if info.state == MemberState::Dead {
            self.dead.insert(id);
        }
        self.slots.insert(
            id,
            Slot {
                boot: info.boot,
                incarnation: info.incarnation,
                since: since.as_nanos() as u64,
                addr: key,
                state: info.state,
                live_pos,
            },
        );
    }

    /// Drops the entry of `id`.
    pub(crate) fn remove(&mut self, id: NodeId) -> Option<Member> {
        let member = self.get(id)?;
        let slot = self.slots.remove(&id).expect("present");
        if is_live(slot.state) {
            self.digest ^= member_hash(id, slot.boot);
            self.unlist_live(slot.live_pos);
        }
        self.dead.remove(id);
        self.v6.remove(&id);
        self.keys.remove(&id);
        if self.by_addr.get(&slot.addr) == Some(&id) {
            self.by_addr.remove(&slot.addr);
        }
        Some(member)
    }

    fn unlist_live(&mut self, pos: u32) {
        self.live.swap_remove(pos as usize);
        if let Some(&moved) = self.live.get(pos as usize) {
            self.slots.get_mut(&moved).expect("live member").live_pos = pos;
        }
    }

    // ----- live and dead sets --------------------------------------------------------------

    pub(crate) fn live_len(&self) -> usize {
        self.live.len()
    }

    pub(crate) fn live_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.live.iter().copied()
    }

    /// A uniformly random live member.
    pub(crate) fn choose_live(&self, rng: &mut impl Rng) -> Option<NodeId> {
        if self.live.is_empty() {
            None
        } else {
            Some(self.live[rng.gen_range(0..self.live.len())])
        }
    }

    /// Up to `k` distinct random live members, none of them in `exclude`.
    pub(crate) fn sample_live(
        &self,
        k: usize,
        exclude: &[NodeId],
        rng: &mut impl Rng,
    ) -> Vec<NodeId> {
        super::idset::sample(&self.live, k, exclude, rng)
    }

    /// A uniformly random dead member.
    pub(crate) fn choose_dead(&self, rng: &mut impl Rng) -> Option<NodeId> {
        self.dead.choose(rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn info(id: u64, addr: &str, state: MemberState) -> MemberInfo {
        MemberInfo {
            id: NodeId(id),
            boot: BootId(1),
            addr: addr.parse().unwrap(),
            incarnation: 0,
            state,
            key: None,
        }
    }

    #[test]
    fn entries_round_trip_v4_and_v6() {
        let mut t = Table::default();
        let a = info(1, "127.0.0.2:7946", MemberState::Alive);
        let b = info(2, "[fe80::1%3]:7946", MemberState::Suspect);
        t.set(a, Duration::from_millis(5));
        t.set(b, Duration::from_millis(7));
        assert_eq!(t.get(NodeId(1)).unwrap().info, a);
        assert_eq!(t.get(NodeId(2)).unwrap().info, b);
        assert_eq!(t.get(NodeId(2)).unwrap().since, Duration::from_millis(7));
        assert_eq!(t.id_at(&a.addr), Some(NodeId(1)));
        assert_eq!(t.id_at(&b.addr), Some(NodeId(2)));
        assert_eq!(t.id_at(&"127.0.0.3:7946".parse().unwrap()), None);
        assert_eq!(t.live_len(), 2);
    }

    #[test]
    fn derived_sets_follow_every_change() {
        let mut t = Table::default();
        let mut digest = 0;
        for i in 0..20 {
            let m = info(i, &format!("127.0.0.{}:1", i + 2), MemberState::Alive);
            t.set(m, Duration::ZERO);
            digest ^= member_hash(m.id, m.boot);
        }
        assert_eq!(t.digest(), digest);
        // Death takes a member out of the live set and the digest, into the dead set.
        let dead = info(3, "127.0.0.5:1", MemberState::Dead);
        t.set(dead, Duration::ZERO);
        digest ^= member_hash(dead.id, dead.boot);
        assert_eq!(t.digest(), digest);
        assert_eq!(t.live_len(), 19);
        assert!(!t.live_ids().any(|id| id == NodeId(3)));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        assert_eq!(t.choose_dead(&mut rng), Some(NodeId(3)));
        // A restart (new boot) at a new address: digest follows the boot, index the address.
        let back = MemberInfo {
            boot: BootId(2),
            addr: "127.0.0.99:1".parse().unwrap(),
            ..info(3, "127.0.0.5:1", MemberState::Alive)
        };
        t.set(back, Duration::ZERO);
        digest ^= member_hash(back.id, back.boot);
        assert_eq!(t.digest(), digest);
        assert_eq!(t.choose_dead(&mut rng), None);
        assert_eq!(t.id_at(&"127.0.0.5:1".parse().unwrap()), None);
        assert_eq!(t.id_at(&back.addr), Some(NodeId(3)));
        // Every live member is listed once, at the position its entry records.
        for (pos, id) in t.live.iter().enumerate() {
            assert_eq!(t.slots[id].live_pos as usize, pos);
        }
        assert_eq!(t.live_len(), 20);
        // Removal undoes everything.
        for i in 0..20 {
            t.remove(NodeId(i)).unwrap();
        }
        assert_eq!(t.digest(), 0);
        assert_eq!(t.live_len(), 0);
        assert!(t.by_addr.is_empty() && t.v6.is_empty());
    }
}
