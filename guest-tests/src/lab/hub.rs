//! The lab's private Ethernet segment: a hub on a UNIX datagram socket. Each guest's QEMU
//! sends its frames here (`-netdev dgram`) and the hub repeats every frame to the other
//! guests. Nothing leaves the machine and no host privilege is needed.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::error::{LabError, Result};

pub struct Hub {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    /// Binds the hub at `path`; `ports` are the guests' own datagram sockets.
    pub fn start(path: &Path, ports: Vec<PathBuf>) -> Result<Hub> {
        let socket = UnixDatagram::bind(path).map_err(LabError::io(format!(
            "binding the lab segment at {}",
            path.display()
        )))?;
        // The timeout lets the thread notice `stop` without a wake-up message.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(LabError::io("configuring the lab segment"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("lab-segment".into())
                .spawn(move || repeat_frames(&socket, &ports, &stop))
                .map_err(LabError::io("starting the lab segment thread"))?
        };
        Ok(Hub {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

fn repeat_frames(socket: &UnixDatagram, ports: &[PathBuf], stop: &AtomicBool) {
    let mut frame = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut frame) else {
            continue;
        };
        let sender = from.as_pathname();
        for port in ports.iter().filter(|port| Some(port.as_path()) != sender) {
            // A guest that has not started yet (or has stopped) simply misses the frame,
            // as on a real segment.
            let _ = socket.send_to(&frame[..len], port);
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reach_every_other_port_but_not_the_sender() {
        let dir = std::env::temp_dir().join(format!("lab-hub-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("port{i}"))).collect();
        let sockets: Vec<UnixDatagram> = ports
            .iter()
            .map(|p| UnixDatagram::bind(p).unwrap())
            .collect();
        for socket in &sockets {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            socket.set_nonblocking(false).unwrap();
        }
        let hub_path = dir.join("hub");
        let hub = Hub::start(&hub_path, ports.clone()).unwrap();
        sockets[0].send_to(b"frame", &hub_path).unwrap();
        let mut buf = [0u8; 16];
        for socket in &sockets[1..] {
            let len = socket.recv(&mut buf).unwrap();
            assert_eq!(&buf[..len], b"frame");
        }
        sockets[0].set_nonblocking(true).unwrap();
        assert!(
            sockets[0].recv(&mut buf).is_err(),
            "the sender must not get its own frame"
        );
        drop(hub);
        assert!(!hub_path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
