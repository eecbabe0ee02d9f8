//! Helpers shared by the guest test files.
#![allow(
    dead_code,
    reason = "each test file uses its own part of these helpers"
)]

pub mod host;

/// Runs every check even when one fails, then reports all failures at once: a boot is too
/// expensive to learn about one failure per run.
#[derive(Default)]
pub struct Checks(Vec<String>);

impl Checks {
    pub fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => eprintln!("  ok   {name}"),
            Err(e) => {
                eprintln!("  FAIL {name}: {e}");
                self.0.push(format!("{name}: {e}"));
            }
        }
    }

    pub fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n{}",
            self.0.len(),
            self.0.join("\n\n")
        );
    }
}

pub fn expect_contains(text: &str, needle: &str) -> Result<(), String> {
    if text.contains(needle) {
        Ok(())
    } else {
        Err(format!("expected `{needle}` in:\n{text}"))
    }
}

/// The agent binary this build made; the lab puts it into every guest.
pub const AGENT: &str = env!("CARGO_BIN_EXE_pvrdma-guest-agent");

/// Soft-RoCE on the guest's loopback interface (`rxelo`) with an address for each of two
/// servers' guests (127.0.0.11 and 127.0.0.12): two servers in one VM reach each other's
/// guests only through `lo`, and rxe takes only the packets of the interface it is bound
/// to. Prints the sysfs file of the second address's GID once it is there.
pub const LOOP_DEVICE_SETUP: &str = "modprobe rdma_rxe && \
     ip addr add 127.0.0.11/8 dev lo && ip addr add 127.0.0.12/8 dev lo && \
     rdma link add rxelo type rxe netdev lo && \
     for i in $(seq 100); do grep -q 7f00:000c /sys/class/infiniband/rxelo/ports/1/gids/* 2>/dev/null && break; sleep 0.1; done; \
     grep -l 7f00:000c /sys/class/infiniband/rxelo/ports/1/gids/*";

/// The executable cargo builds for `args` (`test -p … --test NAME`, `bench -p … --bench
/// NAME`) and names `name`, built if it is not: cargo names it with a hash, so ask cargo.
pub fn cargo_artifact(args: &[&str], name: &str) -> Result<std::path::PathBuf, String> {
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace above guest-tests")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = std::process::Command::new(cargo)
        .args(args)
        .args(["--no-run", "--message-format=json"])
        .current_dir(workspace)
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cargo could not build {name}:\n{}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    let wanted = format!("\"name\":\"{name}\"");
    String::from_utf8_lossy(&built.stdout)
        .lines()
        .filter(|line| line.contains("\"reason\":\"compiler-artifact\"") && line.contains(&wanted))
        .find_map(|line| {
            let at = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = line[at..].find('"')?;
            Some(std::path::PathBuf::from(&line[at..at + end]))
        })
        .ok_or_else(|| format!("cargo named no executable for {name}"))
}

/// Loads the driver and waits until the IPv4 GID exists; returns that GID's index.
pub fn prepare(guest: &mut guest_tests::lab::Guest) -> Result<String, String> {
    let script = r#"
modprobe vmw_pvrdma || exit 1
for i in $(seq 100); do
  for f in /sys/class/infiniband/vmw_pvrdma0/ports/1/gids/*; do
    case "$(cat "$f" 2>/dev/null)" in *ffff:*) basename "$f"; exit 0 ;; esac
  done
  sleep 0.1
done
echo "no IPv4 GID" >&2; exit 1
"#;
    guest
        .check(script)
        .map(|s| s.trim().to_string())
        .map_err(|e| e.to_string())
}

/// Waits (up to 30 s under TCG) until guest 0 has a TCP listener on 18515, or 2 s for rping.
pub fn wait_listening(lab: &mut guest_tests::lab::Lab, server: &str) -> Result<(), String> {
    if server.starts_with("rping") {
        std::thread::sleep(std::time::Duration::from_secs(2));
        return Ok(());
    }
    lab.guest(0)
        .check("for i in $(seq 300); do ss -Hltn 'sport = :18515' | grep -q LISTEN && exit 0; sleep 0.1; done; echo 'server never listened' >&2; exit 1")
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Runs `server` in the background on `a`, then `client` on `b`, and returns both outputs.
pub fn pair(
    lab: &mut guest_tests::lab::Lab,
    server: &str,
    client: &str,
    timeout: std::time::Duration,
) -> Result<(String, String), String> {
    let server_ip = lab.guest(0).ip().to_string();
    lab.guest(0)
        .check(&format!(
            "rm -f /tmp/server.out; ({server}) >/tmp/server.out 2>&1 & echo $! >/tmp/server.pid"
        ))
        .map_err(|e| e.to_string())?;
    // The tools try their TCP connect once: wait until the server listens (the verbs tools and
    // perftest exchange parameters on TCP port 18515; rping has no TCP socket to wait for).
    wait_listening(lab, server)?;
    let client_out = lab
        .guest(1)
        .run_with_timeout(&client.replace("SERVER", &server_ip), timeout)
        .map_err(|e| e.to_string())?;
    let server_out = lab
        .guest(0)
        .run_with_timeout("while kill -0 $(cat /tmp/server.pid) 2>/dev/null; do sleep 0.2; done; cat /tmp/server.out", timeout)
        .map_err(|e| e.to_string())?;
    let client_text = format!("{}{}", client_out.stdout, client_out.stderr);
    if client_out.status != 0 {
        return Err(format!(
            "client exited {}:\n{client_text}\n--- server ---\n{}",
            client_out.status, server_out.stdout
        ));
    }
    Ok((server_out.stdout, client_text))
}
