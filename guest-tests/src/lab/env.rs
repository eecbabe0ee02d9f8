//! Where the lab's pieces are: `lab.env` written by `scripts/lab`, the launcher in this
//! repository, and the server binary of this build.

use std::path::{Path, PathBuf};

use super::error::{LabError, Result};

/// The artifacts `scripts/lab` built.
#[derive(Debug, Clone)]
pub struct LabEnv {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub launcher: PathBuf,
    /// The Debian versions `scripts/lab` resolved, so a failure names what it ran on.
    pub versions: String,
}

impl LabEnv {
    /// Reads `lab.env` from `PVRDMA_LAB_ENV`, or from the cache folder the scripts use.
    pub fn load() -> Result<LabEnv> {
        let path = std::env::var_os("PVRDMA_LAB_ENV")
            .map_or_else(|| cache_dir().join("lab.env"), PathBuf::from);
        let text = std::fs::read_to_string(&path).map_err(|_| LabError::NotBuilt(path.clone()))?;
        let text_value = |key: &str| env_value(&text, key).unwrap_or("unknown").to_string();
        let path_value = |key: &str| -> Result<PathBuf> {
            env_value(&text, key)
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .ok_or_else(|| LabError::NotBuilt(path.clone()))
        };
        Ok(LabEnv {
            qemu: path_value("LAB_QEMU")?,
            kernel: path_value("LAB_KERNEL")?,
            initrd: path_value("LAB_INITRD")?,
            launcher: repo_root().join("qemu/launch-guest"),
            versions: format!(
                "QEMU {} ({}), kernel {} ({}), guest {}",
                text_value("LAB_QEMU_VERSION"),
                text_value("LAB_QEMU_SUITE"),
                text_value("LAB_KERNEL_VERSION"),
                text_value("LAB_KERNEL_ABI"),
                text_value("LAB_GUEST_PACKAGES"),
            ),
        })
    }
}

/// One `KEY='value'` line of `lab.env` (the quotes are optional).
fn env_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('\''))
}

/// The cache folder shared with the shell scripts (`scripts/lib/common.sh`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VFIO_USER_PVRDMA_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("vfio-user-pvrdma")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `vfio-user-pvrdma` binary: `PVRDMA_SERVER_BIN`, or the one cargo built next to the
/// running test executable (`target/<profile>/`).
pub fn server_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PVRDMA_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(LabError::io("locating the test executable"))?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join("vfio-user-pvrdma"))
        .collect::<Vec<_>>();
    candidates.iter().find(|path| path.is_file()).cloned().ok_or_else(|| {
        LabError::Setup(format!(
            "the vfio-user-pvrdma binary is not built (looked at {candidates:?}): run `cargo build -p vfio-user-pvrdma` with the same profile, or set PVRDMA_SERVER_BIN"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::env_value;

    #[test]
    fn lab_env_values_lose_their_quotes() {
        let text = "# comment\nLAB_QEMU_VERSION='1:11.1.3+ds-2~bpo13+1'\nLAB_KERNEL_ABI=6.12.117+deb13-amd64\nLAB_GUEST_PACKAGES='rdma-core=56.1-1 perftest=25.0-1'\n";
        assert_eq!(
            env_value(text, "LAB_QEMU_VERSION"),
            Some("1:11.1.3+ds-2~bpo13+1")
        );
        assert_eq!(
            env_value(text, "LAB_KERNEL_ABI"),
            Some("6.12.117+deb13-amd64")
        );
        assert_eq!(
            env_value(text, "LAB_GUEST_PACKAGES"),
            Some("rdma-core=56.1-1 perftest=25.0-1")
        );
        assert_eq!(env_value(text, "LAB_MISSING"), None);
    }
}
