//! Listening sockets and the accept-serve-accept loop.
//!
//! `vfio_user::Server::run` accepts one client and serves it until it goes
//! away. QEMU 11.1.3 never reconnects, but a new QEMU may attach to the same
//! socket later, so [`serve`] runs forever, cleaning up between clients.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use log::{error, info, warn};
use thiserror::Error;
use vfio_user::Server;

use super::backend::PciFunctionBackend;
use super::regions::{server_irqs, server_regions};

/// Pause after a failed `accept()` (e.g. out of file descriptors) so a
/// persistent failure does not spin a core.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Why a socket could not be set up. Messages name the path because they are
/// printed as-is at startup.
#[derive(Debug, Error)]
pub enum ListenError {
    /// Something already exists at the path.
    #[error("cannot listen on {path}: the file already exists (remove it, or pass --force if it is a stale socket)", path = .path.display())]
    Exists {
        /// The socket path.
        path: PathBuf,
    },
    /// `--force` found something that is not a socket.
    #[error("cannot listen on {path}: it exists and is not a socket, refusing to remove it", path = .path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// `--force` found a socket some process is still serving.
    #[error("cannot listen on {path}: another server is accepting connections on it", path = .path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Inspecting or removing a stale socket failed.
    #[error("cannot remove stale socket {path}", path = .path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot listen on {path}", path = .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Creates the listening socket for one PVRDMA function at `path`.
///
/// With `force`, a stale socket file (one nobody accepts on) is removed
/// first; anything else at the path is left alone. The returned server
/// removes the socket file when dropped.
pub fn listen(path: &Path, force: bool) -> Result<Server, ListenError> {
    if force {
        remove_stale_socket(path)?;
    }
    // The device is resettable: QEMU then sends DEVICE_RESET at machine reset.
    Server::new(path, true, server_irqs(), server_regions()).map_err(|error| match error {
        vfio_user::Error::SocketPathExists => ListenError::Exists {
            path: path.to_path_buf(),
        },
        // Unwrapped so the OS error is not printed twice in the chain.
        vfio_user::Error::SocketBind(source) => ListenError::Bind {
            path: path.to_path_buf(),
            source,
        },
        other => ListenError::Bind {
            path: path.to_path_buf(),
            source: io::Error::other(other),
        },
    })
}

fn remove_stale_socket(path: &Path) -> Result<(), ListenError> {
    let remove_error = |source| ListenError::RemoveStale {
        path: path.to_path_buf(),
        source,
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(remove_error(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ListenError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    // A socket someone still listens on is not stale; stealing its path
    // would orphan that server.
    if UnixStream::connect(path).is_ok() {
        return Err(ListenError::InUse {
            path: path.to_path_buf(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            info!("removed stale socket {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(remove_error(e)),
    }
}

/// Serves clients on `server` one after the other, forever.
pub fn serve(server: &Server, backend: &mut PciFunctionBackend) -> ! {
    loop {
        match server.run(backend) {
            Ok(()) => {}
            Err(vfio_user::Error::SocketAccept(e)) => {
                // No client was attached, so there is nothing to clean up.
                error!("accepting a client failed: {e}");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
            // The crate drops the connection on any stream error.
            Err(e) => warn!("client connection failed: {e}"),
        }
        info!("client disconnected");
        backend.client_gone();
    }
}

#[cfg(test)]
mod tests;
