//! Listening sockets: made at a path (never over a file that is not a stale socket), or
//! inherited from whoever started the server. Serving them is `vfio::serving`'s job.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::info;
use thiserror::Error;

use super::protocol;

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
    /// The socket's directory does not exist.
    #[error("cannot listen on {path}: the directory {dir} does not exist", path = .path.display(), dir = .dir.display())]
    NoDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// An inherited descriptor (`--fd`, socket activation) is not a listening socket.
    #[error("file descriptor {fd} is not a listening UNIX stream socket ({why})")]
    NotAListener {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: String,
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

/// A listening socket. One the server bound removes its file when dropped; one it
/// inherited (`--fd`, systemd socket activation) belongs to whoever made it and is never
/// unlinked.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    /// The file the server created, if it bound the socket itself.
    path: Option<PathBuf>,
}

impl std::os::fd::AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Listener {
    /// Accepts without waiting from now on (the caller polls; accepted connections block).
    pub fn set_nonblocking(&self) -> io::Result<()> {
        self.socket.set_nonblocking(true)
    }

    /// The path the socket is bound to, whoever made it (none for an unnamed or abstract
    /// socket).
    pub fn bound_path(&self) -> Option<PathBuf> {
        let address = self.socket.local_addr().ok()?;
        address.as_pathname().map(Path::to_path_buf)
    }

    /// Waits for the next client.
    pub fn accept(&self) -> io::Result<UnixStream> {
        self.socket.accept().map(|(stream, _)| stream)
    }

    /// Takes over `fd`, a listening UNIX stream socket the server was started with, after
    /// checking that it is one. It is closed on exec from then on.
    pub fn inherited(fd: RawFd) -> Result<Listener, ListenError> {
        use nix::sys::socket::{SockType, getsockopt, sockopt};
        let refuse = |why: String| ListenError::NotAListener { fd, why };
        let owned = protocol::adopt_inherited(fd).map_err(|e| refuse(e.to_string()))?;
        let kind = getsockopt(&owned, sockopt::SockType)
            .map_err(|e| refuse(format!("not a socket: {e}")))?;
        if kind != SockType::Stream {
            return Err(refuse(format!("a {kind:?} socket")));
        }
        let listening =
            getsockopt(&owned, sockopt::AcceptConn).map_err(|e| refuse(e.to_string()))?;
        if !listening {
            return Err(refuse("a socket nobody listens on".into()));
        }
        let local: Result<nix::sys::socket::UnixAddr, _> =
            nix::sys::socket::getsockname(owned.as_raw_fd());
        if local.is_err() {
            return Err(refuse("not a UNIX socket".into()));
        }
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| refuse(e.to_string()))?;
        Ok(Listener {
            socket: UnixListener::from(owned),
            path: None,
        })
    }

    /// The socket file the server created, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Best effort; a missing file is already what we want.
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Creates the listening socket for one PVRDMA function at `path`.
///
/// With `force`, a stale socket file (one nobody accepts on) is removed
/// first; anything else at the path is left alone. The returned listener
/// removes the socket file when dropped.
pub fn listen(path: &Path, force: bool) -> Result<Listener, ListenError> {
    if force {
        remove_stale_socket(path)?;
    }
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty())
        && !dir.is_dir()
    {
        return Err(ListenError::NoDirectory {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    // Checked first so an existing file gets the clearer error; bind()
    // itself never replaces anything.
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ListenError::Exists {
            path: path.to_path_buf(),
        });
    }
    let socket = UnixListener::bind(path).map_err(|source| match source.kind() {
        io::ErrorKind::AddrInUse => ListenError::Exists {
            path: path.to_path_buf(),
        },
        _ => ListenError::Bind {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Ok(Listener {
        socket,
        path: Some(path.to_path_buf()),
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

/// The error and its causes on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests;
