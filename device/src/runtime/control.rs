//! The control socket's server loop, and the fabric as what it reads and switches
//! (the protocol itself is `profiler::control`).

use std::thread;
use std::time::Duration;

use log::{debug, warn};

use super::devices::{DeviceError, DeviceSpec, Devices, parse_guid};
use super::fabric::Fabric;
use crate::profiler::Snapshot;
use crate::profiler::control::{DeviceRequest, Target, handle};
use crate::vfio::listener::Listener;

/// Pause after a failed `accept()`, so a persistent failure does not spin.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(200);

impl Target for Fabric {
    fn snapshot(&self) -> Snapshot {
        self.profile()
    }

    fn set_profiling(&self, on: bool) {
        Fabric::set_profiling(self, on);
    }
}

/// The fabric and the devices it serves, as the control socket of a server sees them.
pub struct Served {
    pub fabric: Fabric,
    pub devices: std::sync::Arc<Devices>,
}

impl Target for Served {
    fn snapshot(&self) -> Snapshot {
        self.fabric.profile()
    }

    fn set_profiling(&self, on: bool) {
        self.fabric.set_profiling(on);
    }

    fn device(&self, request: DeviceRequest<'_>) -> Result<String, String> {
        let chain = |e: DeviceError| crate::vfio::listener::error_chain(&e);
        match request {
            DeviceRequest::List => Ok(self.devices.list()),
            DeviceRequest::Add { path, guid } => {
                let guid = guid.map(parse_guid).transpose()?;
                let spec = DeviceSpec {
                    path: path.into(),
                    guid,
                };
                self.devices.add(&spec).map_err(chain)
            }
            DeviceRequest::Remove { path, force } => self
                .devices
                .remove(std::path::Path::new(path), force)
                .map_err(chain),
        }
    }
}

/// Serves the control socket forever, one client at a time.
pub fn serve(listener: &Listener, target: &dyn Target) -> ! {
    loop {
        match listener.accept() {
            Ok(stream) => {
                if let Err(e) = handle(stream, target) {
                    debug!("control client: {e}");
                }
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::profiler::control::{IO_TIMEOUT, MAX_REQUEST, answer, request};
    use crate::pvrdma::DeviceConfig;
    use crate::vfio::listener;

    fn fabric() -> Fabric {
        let fabric = Fabric::new();
        fabric.add_device(DeviceConfig::default());
        fabric.add_device(DeviceConfig::default());
        fabric
    }

    #[test]
    fn requests_and_malformed_requests() {
        let f = fabric();
        assert!(answer(&f, "stats").starts_with("profiling: off"));
        assert!(answer(&f, "stats json").contains("\"devices\""));
        assert_eq!(answer(&f, "profile on"), "ok: profiling on\n");
        assert_eq!(answer(&f, "profile"), "profiling on\n");
        assert!(f.profile().profiling);
        assert_eq!(answer(&f, "profile off"), "ok: profiling off\n");
        assert!(!f.profile().profiling);
        assert!(answer(&f, "help").starts_with("requests:"));
        for bad in [
            "",
            "   ",
            "stat",
            "stats xml",
            "svg",
            "svg 0",
            "svg x 2",
            "svg 0 -1",
            "svg 0 99999999999",
            "svg 0 2 3",
            "profile maybe",
            "\u{0}\u{7f}é",
        ] {
            let reply = answer(&f, bad);
            assert!(reply.starts_with("error: "), "{bad:?} → {reply:?}");
            assert_eq!(reply.lines().count(), 1, "{bad:?} → {reply:?}");
        }
        // No QPs yet: the SVG of any QP is an error, not a picture.
        assert_eq!(answer(&f, "svg 0 2"), "error: device 0 has no QP 2\n");
        assert_eq!(answer(&f, "svg 9 2"), "error: device 9 has no QP 2\n");
    }

    #[test]
    fn over_the_socket_a_silent_client_does_not_block_the_next_one() {
        let dir = std::env::temp_dir().join(format!(
            "pvrdma-control-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("control.sock");
        let server = listener::listen(&path, false).expect("listen");
        let target = Arc::new(fabric());
        let t = Arc::clone(&target);
        thread::spawn(move || serve(&server, &*t));

        // Connects and says nothing.
        let silent = UnixStream::connect(&path).expect("connect");
        let started = Instant::now();
        let table = request(&path, "stats", Duration::from_secs(10)).expect("stats");
        assert!(table.starts_with("profiling: off"), "{table}");
        assert!(started.elapsed() < IO_TIMEOUT + Duration::from_secs(5));
        // The silent client was told why it was dropped.
        let mut reply = String::new();
        silent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        (&silent).read_to_string(&mut reply).expect("read");
        assert!(reply.starts_with("error: no request"), "{reply:?}");

        // Garbage and an overlong line get an error line, and the server carries on.
        let reply = request(&path, "\u{fffd}garbage", Duration::from_secs(10)).expect("reply");
        assert!(reply.starts_with("error: unknown request"), "{reply:?}");
        let long = "x".repeat(MAX_REQUEST * 4);
        let reply = request(&path, &long, Duration::from_secs(10)).expect("reply");
        assert!(reply.starts_with("error: request longer"), "{reply:?}");
        let mut raw = UnixStream::connect(&path).expect("connect");
        raw.write_all(&[0xff, 0xfe, b'\n']).expect("write");
        let mut reply = String::new();
        raw.read_to_string(&mut reply).expect("read");
        assert_eq!(reply, "error: the request is not UTF-8\n");
        assert_eq!(
            request(&path, "profile on", Duration::from_secs(10)).expect("reply"),
            "ok: profiling on\n"
        );
        assert!(target.profile().profiling);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
