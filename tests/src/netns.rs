//! Real hosts on one machine: network namespaces on a bridge, for partition tests.
//!
//! [`Netns::create`] makes `n` namespaces, each with one veth into a bridge of its own, and
//! gives namespace k the address `198.18.0.(k+1)/24` (RFC 2544's benchmarking range: it lives
//! only inside these namespaces and on their bridge, which has no address in the test's own
//! namespace, so two clusters, or a real network on the host, never see each other). An agent
//! started with [`Netns::wrap`] runs inside its namespace: its own interfaces, its own routes,
//! the only path to the others the bridge.
//!
//! Cuts are routes: [`Netns::block`] adds a blackhole route for one peer's address in one
//! namespace, so that direction loses every datagram and connection attempt at once (this
//! kernel has no `tc` qdiscs or packet filters to do it otherwise). [`Netns::isolate`],
//! [`Netns::partition`] and [`Netns::heal`] are blocks in both directions. Everything is undone
//! when the [`Netns`] is dropped: namespaces, veths and the bridge are deleted (the processes in
//! them must be gone first: [`crate::cluster::Cluster`] kills its agents before it drops this).
//!
//! Needs root (CAP_NET_ADMIN) and the `ip` command; [`Netns::create`] says why it cannot run
//! otherwise, and the tests skip with that message.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::Command;

/// `n` network namespaces on a bridge of their own.
#[derive(Debug)]
pub struct Netns {
    /// Namespace names, node k's at `k - 1`.
    names: Vec<String>,
    bridge: String,
    /// Host-side veth names, node k's at `k - 1`.
    veths: Vec<String>,
    /// Blocked directions (from, to), 1-based.
    blocked: BTreeSet<(usize, usize)>,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Node k's address.
    pub fn ip(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, (k + 1) as u8)
    }

    /// Makes `n` namespaces (1 ≤ n ≤ 250) named after this process and `test_id`, so that
    /// concurrent tests and test runs do not meet. An error says why (not root, no `ip`).
    pub fn create(test_id: u8, n: usize) -> Result<Netns, String> {
        assert!((1..=250).contains(&n));
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: network namespaces need CAP_NET_ADMIN".into());
        }
        let tag = format!("{}x{test_id}", std::process::id());
        let mut ns = Netns {
            names: Vec::new(),
            bridge: format!("cb{tag}"),
            veths: Vec::new(),
            blocked: BTreeSet::new(),
        };
        if ns.bridge.len() > 15 {
            ns.bridge.truncate(15);
        }
        run(&["link", "add", &ns.bridge, "type", "bridge"])?;
        run(&["link", "set", &ns.bridge, "up"])?;
        for k in 1..=n {
            let name = format!("crux-{tag}-{k}");
            run(&["netns", "add", &name])?;
            ns.names.push(name.clone());
            // veth names are at most 15 bytes: "cv" + a hash of the tag + the node.
            let host = format!("cv{:x}n{k}", short(&tag));
            let peer = format!("cp{:x}n{k}", short(&tag));
            run(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
            ns.veths.push(host.clone());
            run(&["link", "set", &peer, "netns", &name])?;
            run(&["link", "set", &host, "master", &ns.bridge])?;
            run(&["link", "set", &host, "up"])?;
            let addr = format!("{}/24", Netns::ip(k));
            run(&["-n", &name, "addr", "add", &addr, "dev", &peer])?;
            run(&["-n", &name, "link", "set", &peer, "up"])?;
            run(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// How many namespaces.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// A command that runs `program` inside node k's namespace (`ip netns exec` execs it: the
    /// child's pid is the program's).
    pub fn wrap(&self, k: usize, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[k - 1]]);
        cmd.arg(OsString::from(program));
        cmd
    }

    /// Loses everything node `from` sends to node `to` (connections to it fail at once).
    pub fn block(&mut self, from: usize, to: usize) -> Result<(), String> {
        if self.blocked.insert((from, to)) {
            let dst = format!("{}/32", Netns::ip(to));
            run(&[
                "-n",
                &self.names[from - 1],
                "route",
                "add",
                "blackhole",
                &dst,
            ])?;
        }
        Ok(())
    }

    /// Undoes [`Netns::block`].
    pub fn unblock(&mut self, from: usize, to: usize) -> Result<(), String> {
        if self.blocked.remove(&(from, to)) {
            let dst = format!("{}/32", Netns::ip(to));
            run(&[
                "-n",
                &self.names[from - 1],
                "route",
                "del",
                "blackhole",
                &dst,
            ])?;
        }
        Ok(())
    }

    /// Cuts node k off from every other node, both ways.
    pub fn isolate(&mut self, k: usize) -> Result<(), String> {
        for j in (1..=self.len()).filter(|j| *j != k) {
            self.block(k, j)?;
            self.block(j, k)?;
        }
        Ok(())
    }

    /// Cuts every side off from every other side, both ways (nodes named by no side keep
    /// talking to everyone).
    pub fn partition(&mut self, sides: &[&[usize]]) -> Result<(), String> {
        for (i, a) in sides.iter().enumerate() {
            for b in sides.iter().skip(i + 1) {
                for &x in a.iter() {
                    for &y in b.iter() {
                        self.block(x, y)?;
                        self.block(y, x)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every block.
    pub fn heal(&mut self) -> Result<(), String> {
        let all: Vec<(usize, usize)> = self.blocked.iter().copied().collect();
        for (from, to) in all {
            self.unblock(from, to)?;
        }
        Ok(())
    }
}

/// A short stable hash of the tag, for interface names.
fn short(tag: &str) -> u32 {
    tag.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    }) & 0xff_ffff
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = run(&["netns", "del", name]);
        }
        for veth in &self.veths {
            let _ = run(&["link", "del", veth]);
        }
        let _ = run(&["link", "del", &self.bridge]);
    }
}
