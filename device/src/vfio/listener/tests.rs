use std::os::unix::net::UnixListener;

use super::*;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "vfio-user-pvrdma-unit-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn existing_path_is_refused_without_force() {
    let dir = TempDir::new("exists");
    let path = dir.0.join("sock");
    std::fs::write(&path, b"").expect("create file");
    let err = listen(&path, false).expect_err("exists");
    assert!(matches!(err, ListenError::Exists { .. }));
    assert!(err.to_string().contains(&path.display().to_string()));
    // --force does not delete regular files.
    let err = listen(&path, true).expect_err("not a socket");
    assert!(matches!(err, ListenError::NotASocket { .. }));
    assert!(path.exists());
}

#[test]
fn force_replaces_a_stale_socket_but_not_a_live_one() {
    let dir = TempDir::new("force");
    let path = dir.0.join("sock");
    // Dropping a std listener leaves its socket file behind: stale.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(matches!(
        listen(&path, false),
        Err(ListenError::Exists { .. })
    ));
    let server = listen(&path, true).expect("stale socket replaced");
    // Now it is live: --force must not steal it.
    assert!(matches!(
        listen(&path, true),
        Err(ListenError::InUse { .. })
    ));
    drop(server);
    assert!(!path.exists(), "the server removes its socket on drop");
}

#[test]
fn a_missing_directory_is_named() {
    let path = Path::new("/nonexistent-dir-for-vfio-user-pvrdma/sock");
    let err = listen(path, false).expect_err("no such directory");
    assert!(matches!(err, ListenError::NoDirectory { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot listen on /nonexistent-dir-for-vfio-user-pvrdma/sock: the directory \
         /nonexistent-dir-for-vfio-user-pvrdma does not exist"
    );
}

#[test]
fn bind_failure_names_the_path() {
    // Longer than a UNIX socket address holds (108 bytes), in a directory that exists.
    let dir = TempDir::new("long");
    let path = dir.0.join("s".repeat(120));
    let err = listen(&path, false).expect_err("too long");
    assert!(matches!(err, ListenError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
}
