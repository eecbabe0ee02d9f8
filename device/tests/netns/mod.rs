//! "Hosts" for tests of servers on several hosts: each server runs in a network namespace
//! of its own, joined to the others through a bridge in a hub namespace (where a shared
//! service such as etcd runs), on a private /24 out of 10.232.0.0/16. Nothing leaves the
//! machine, and the namespaces go with the test, even when it fails. Needs root.

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};

pub struct Star {
    hub: String,
    hosts: Vec<String>,
    subnet: String,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Star {
    /// `count` host namespaces and the hub.
    pub fn new(count: usize) -> Star {
        remove_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{n}");
        let subnet = format!("10.232.{}", (pid as usize * 7 + n) % 250 + 1);
        let star = Star {
            hub: format!("pvt-hub-{tag}"),
            hosts: (0..count).map(|i| format!("pvt-h{i}-{tag}")).collect(),
            subnet,
        };
        ip(&["netns", "add", &star.hub]);
        ip(&["-n", &star.hub, "link", "set", "lo", "up"]);
        ip(&["-n", &star.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &star.hub, "link", "set", "br0", "up"]);
        let hub_addr = format!("{}/24", star.hub_addr());
        ip(&["-n", &star.hub, "addr", "add", &hub_addr, "dev", "br0"]);
        for (i, host) in star.hosts.iter().enumerate() {
            ip(&["netns", "add", host]);
            ip(&["-n", host, "link", "set", "lo", "up"]);
            // Interface names hold 15 bytes.
            let (end, hub_end) = (
                format!("pt{}{n}{i}a", pid % 100_000),
                format!("pt{}{n}{i}b", pid % 100_000),
            );
            ip(&[
                "link", "add", &end, "type", "veth", "peer", "name", &hub_end,
            ]);
            ip(&["link", "set", &end, "netns", host]);
            ip(&["link", "set", &hub_end, "netns", &star.hub]);
            let cidr = format!("{}/24", star.addr(i));
            ip(&["-n", host, "addr", "add", &cidr, "dev", &end]);
            ip(&["-n", host, "link", "set", &end, "up"]);
            ip(&["-n", &star.hub, "link", "set", &hub_end, "master", "br0"]);
            ip(&["-n", &star.hub, "link", "set", &hub_end, "up"]);
        }
        star
    }

    pub fn netns(&self, host: usize) -> &str {
        &self.hosts[host]
    }

    pub fn addr(&self, host: usize) -> String {
        format!("{}.{}", self.subnet, host + 1)
    }

    pub fn hub(&self) -> &str {
        &self.hub
    }

    pub fn hub_addr(&self) -> String {
        format!("{}.254", self.subnet)
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it, and so the pairs.
        for name in self.hosts.iter().chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Runs `f` on a thread that joined namespace `netns` (sockets it opens live there).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let handle = File::open(format!("/run/netns/{netns}"))
                    .unwrap_or_else(|e| panic!("namespace {netns}: {e}"));
                setns(handle, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("joining namespace {netns}: {e}"));
                f()
            })
            .join()
            .expect("the thread in the namespace")
    })
}

/// Deletes the namespaces of tests whose process died without cleaning up.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("pvt-") else {
            continue;
        };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip (iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed (these tests need root and network namespaces): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
