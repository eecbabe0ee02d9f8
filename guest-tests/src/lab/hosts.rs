//! "Hosts" for labs whose guests are served by several server processes: each server runs
//! in a network namespace of its own, and a veth pair on a private /30 joins the two, so
//! the servers' TCP transport crosses a real (virtual) link with addresses of its own and
//! nothing leaves the machine. The namespaces go with the lab, even when a test fails.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{LabError, Result};

/// The port the servers' TCP transport listens on inside their namespaces.
pub const TRANSPORT_PORT: u16 = 4791;

pub struct Hosts {
    names: Vec<String>,
    addrs: Vec<String>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Hosts {
    /// Two namespaces joined by a veth pair (needs root, as the lab's builds do).
    pub fn pair() -> Result<Hosts> {
        remove_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{n}", std::process::id());
        // A /30 per lab out of 10.231.0.0/16, from the process id and the lab's number.
        let block = (std::process::id() as usize * 7 + n) % (64 * 256);
        let (third, fourth) = (block / 64, (block % 64) * 4);
        let addrs = vec![
            format!("10.231.{third}.{}", fourth + 1),
            format!("10.231.{third}.{}", fourth + 2),
        ];
        let names = vec![format!("pvrdma-h0-{tag}"), format!("pvrdma-h1-{tag}")];
        let hosts = Hosts { names, addrs };
        let veth = [
            format!("pv0-{n}-{}", std::process::id() % 10_000),
            format!("pv1-{n}-{}", std::process::id() % 10_000),
        ];
        for name in &hosts.names {
            ip(&["netns", "add", name])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1],
        ])?;
        for ((end, name), addr) in veth.iter().zip(&hosts.names).zip(&hosts.addrs) {
            ip(&["link", "set", end, "netns", name])?;
            let cidr = format!("{addr}/30");
            ip(&["-n", name, "addr", "add", &cidr, "dev", end])?;
            ip(&["-n", name, "link", "set", end, "up"])?;
        }
        Ok(hosts)
    }

    pub fn netns(&self, host: usize) -> &str {
        &self.names[host]
    }

    pub fn addr(&self, host: usize) -> &str {
        &self.addrs[host]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and so the pair.
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Deletes the namespaces of labs whose test process died without cleaning up (killed
/// outright): named `pvrdma-hN-PID-M`, with PID no longer running.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("pvrdma-h") else {
            continue;
        };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(LabError::io("running ip (iproute2) for the lab's hosts"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Setup(format!(
            "ip {} failed (the two-host lab needs root and network namespaces): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
