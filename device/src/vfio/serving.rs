//! Serving one function on its socket, one client at a time, until told to stop.
//!
//! Two threads per socket: the doorman accepts connections and hands each to the worker,
//! which serves it until it goes away ([`protocol::serve_client_spinning`]) and then
//! cleans up. A connection that arrives while the worker is busy would otherwise wait
//! silently in the backlog (QEMU's realize blocks on it with no message); the doorman
//! answers its first message with EBUSY instead, so that QEMU exits saying
//! "version reply: Device or resource busy", and the server's log names it too.
//!
//! [`Serving::stop`] ends both threads: the doorman notices within [`STOP_POLL`], an
//! attached client's connection is shut down, and the socket file is removed (unless the
//! server was started with the socket, see [`Listener`]).

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, bounded};
use log::{error, info, warn};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::function::PciFunction;
use super::listener::{Listener, error_chain};
use super::protocol::{self, Errno};

/// How often the doorman, waiting for a connection, checks whether to stop.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// How long a new connection waits for the worker to finish cleaning up after the previous
/// client (which has just closed, say) before it is turned away as busy. Generous: turning
/// away a QEMU that connects right after the last one left would fail a VM's start.
const HANDOVER: Duration = Duration::from_secs(2);

/// Pause after a failed `accept()` (e.g. out of file descriptors) so a persistent failure
/// does not spin a core.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(500);

/// What the doorman, the worker and [`Serving::stop`] share.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// A client is being served now (cleared as soon as its session ends, before the
    /// cleanup): a knock meanwhile is turned away at once; between clients it waits.
    serving: AtomicBool,
    /// The attached client's connection (a clone), so that `stop` can shut it down.
    client: Mutex<Option<UnixStream>>,
}

impl Shared {
    fn client(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A function being served on its socket.
pub struct Serving {
    name: String,
    shared: Arc<Shared>,
    doorman: JoinHandle<()>,
    worker: JoinHandle<PciFunction>,
}

impl Serving {
    /// Starts serving `backend` on `listener`; `name` names the socket in logs and threads.
    pub fn start(
        name: String,
        listener: Listener,
        backend: PciFunction,
        spin: Duration,
    ) -> io::Result<Serving> {
        listener.set_nonblocking()?;
        let shared = Arc::new(Shared::default());
        let (handover, clients) = bounded(0);
        let worker = {
            let shared = Arc::clone(&shared);
            let name = name.clone();
            thread::Builder::new()
                .name(name.clone())
                .spawn(move || work(&shared, &clients, backend, spin))?
        };
        let doorman = {
            let shared = Arc::clone(&shared);
            let name = name.clone();
            thread::Builder::new()
                .name(format!("accept {name}"))
                .spawn(move || admit(&shared, &listener, &handover))
        };
        let doorman = match doorman {
            Ok(doorman) => doorman,
            Err(e) => {
                // The worker ends when the (never used) sender is dropped with the closure.
                let _ = worker.join();
                return Err(e);
            }
        };
        Ok(Serving {
            name,
            shared,
            doorman,
            worker,
        })
    }

    /// The socket's name (its path, or "fd N").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a client is attached now.
    pub fn client_attached(&self) -> bool {
        self.shared.client().is_some()
    }

    /// Stops serving: disconnects the attached client, if any, closes the socket and
    /// returns the function (cleaned up as after any client).
    pub fn stop(self) -> Option<PciFunction> {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(client) = self.shared.client().as_ref() {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        let _ = self.doorman.join();
        self.worker.join().ok()
    }
}

/// The doorman: accepts connections until told to stop, handing each to the worker or,
/// when the worker is busy, turning it away.
fn admit(shared: &Shared, listener: &Listener, handover: &Sender<UnixStream>) {
    while !shared.stopping.load(Ordering::Acquire) {
        match poll(
            &mut [PollFd::new(listener.as_fd(), PollFlags::POLLIN)],
            PollTimeout::try_from(STOP_POLL).unwrap_or(PollTimeout::NONE),
        ) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                error!("waiting for a client failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        }
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                error!("accepting a client failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        // While a client is attached a knock is answered at once; between clients the
        // worker may still be cleaning up after the last one.
        let wait = if shared.serving.load(Ordering::Acquire) {
            Duration::ZERO
        } else {
            HANDOVER
        };
        let stream = match handover.send_timeout(stream, wait) {
            Ok(()) => continue,
            Err(SendTimeoutError::Timeout(stream)) => stream,
            Err(SendTimeoutError::Disconnected(_)) => return,
        };
        // The logger limits this line per second, whoever knocks.
        warn!(
            "another client connected while one is attached: answered EBUSY and \
             closed it (one client per socket; is a second QEMU using this socket?)"
        );
        if let Err(e) = protocol::turn_away(&stream, Errno::EBUSY) {
            info!("the client turned away did not take its answer: {e}");
        }
    }
}

/// The worker: serves the clients the doorman hands over, one at a time, until the
/// doorman is gone; returns the function.
fn work(
    shared: &Shared,
    clients: &Receiver<UnixStream>,
    mut backend: PciFunction,
    spin: Duration,
) -> PciFunction {
    while let Ok(stream) = clients.recv() {
        *shared.client() = stream.try_clone().ok();
        shared.serving.store(true, Ordering::Release);
        // Checked after the client is published: either `stop` sees it, or this sees
        // `stopping`.
        if !shared.stopping.load(Ordering::Acquire) {
            info!("client connected");
            let served = protocol::serve_client_spinning(&stream, &mut backend, spin);
            shared.serving.store(false, Ordering::Release);
            // A connection `stop` shut down is no failure of the client's.
            if let Err(e) = served
                && !shared.stopping.load(Ordering::Acquire)
            {
                warn!("client connection failed: {}", error_chain(&e));
            }
            info!("client disconnected");
        }
        shared.serving.store(false, Ordering::Release);
        *shared.client() = None;
        drop(stream);
        backend.client_gone();
    }
    backend
}
