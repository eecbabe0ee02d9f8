//! Runs inside a lab guest and serves the host fixture over the `pvrdma.agent` virtio-serial
//! port. The guest's init starts it last, so the HELLO it sends means "booted and ready".

use std::path::Path;
use std::time::{Duration, Instant};

use guest_tests::agent;

fn main() {
    // The port appears once the virtio-serial driver has probed; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        match agent::find_port(Path::new("/sys"), agent::PORT_NAME) {
            Ok(port) => break port,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("pvrdma-guest-agent: {e}");
                std::process::exit(1);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    if let Err(e) = agent::serve(&port) {
        eprintln!("pvrdma-guest-agent: {}: {e}", port.display());
        std::process::exit(1);
    }
}
