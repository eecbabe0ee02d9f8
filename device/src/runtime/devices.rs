//! The devices a server process serves, each on its own socket, all in one fabric: those
//! given at start and those the control socket adds and removes while the others run.
//!
//! A device's node GUID is given with its socket (`PATH,guid=…`) or derived from the
//! socket's path, so it does not depend on the order of the command line or of additions.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use log::info;
use thiserror::Error;

use super::fabric::Fabric;
use crate::pvrdma::{DeviceConfig, caps};
use crate::vfio::PciFunction;
use crate::vfio::listener::{self, ListenError, Listener};
use crate::vfio::serving::Serving;
use crate::vfio::uar::DoorbellMode;

/// Most devices one process serves: each holds up to two threads and, with its client's
/// DMA windows, hundreds of descriptors.
pub const MAX_DEVICES: usize = 64;

/// A device's socket and settings, as `--socket-path PATH[,guid=G]` or `device add` give
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub path: PathBuf,
    /// The node GUID; derived from the path when not given.
    pub guid: Option<u64>,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    /// `PATH` or `PATH,guid=G`; G is 16 hex digits, with or without `:` between groups
    /// (as `ibv_devinfo` prints `5254:00ff:fe5e:0101`) or a 0x prefix.
    fn from_str(text: &str) -> Result<DeviceSpec, String> {
        let (path, guid) = match text.rsplit_once(",guid=") {
            Some((path, guid)) => (path, Some(parse_guid(guid)?)),
            None => (text, None),
        };
        if path.is_empty() {
            return Err(format!("{text:?} names no socket path"));
        }
        Ok(DeviceSpec {
            path: PathBuf::from(path),
            guid,
        })
    }
}

/// A node GUID: 16 hex digits, `:` between groups allowed, optional 0x.
pub fn parse_guid(text: &str) -> Result<u64, String> {
    let digits: String = text
        .strip_prefix("0x")
        .unwrap_or(text)
        .chars()
        .filter(|&c| c != ':')
        .collect();
    if digits.len() != 16 {
        return Err(format!(
            "GUID {text:?} is not 16 hex digits (e.g. 5254:00ff:fe5e:0101)"
        ));
    }
    let guid =
        u64::from_str_radix(&digits, 16).map_err(|e| format!("GUID {text:?} is not hex: {e}"))?;
    if guid == 0 {
        return Err("the GUID 0 is not a valid node GUID".into());
    }
    Ok(guid)
}

/// A GUID as `ibv_devinfo` prints it.
pub fn format_guid(guid: u64) -> String {
    let b = guid.to_be_bytes();
    format!(
        "{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

/// The GUID of a device whose socket is `path` and that was given none: QEMU's MAC prefix
/// 52:54:00 and three bytes of the path's FNV-1a hash, made an EUI-64.
pub fn derived_guid(path: &Path) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in path.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let h = hash.to_be_bytes();
    u64::from_be_bytes(caps::eui64([0x52, 0x54, 0x00, h[5], h[6], h[7]]))
}

/// Who may connect to the sockets the server makes, and where it may make them.
#[derive(Debug, Clone, Default)]
pub struct SocketPolicy {
    /// Remove a stale socket file at the path first.
    pub force: bool,
    /// Permission bits for each socket file (connecting needs write permission).
    pub mode: Option<u32>,
    /// The group each socket file is given.
    pub group: Option<u32>,
    /// With the sandbox on: the only directories new sockets may be made in.
    pub directories: Option<Vec<PathBuf>>,
}

/// Gives the socket file at `path` the policy's mode and group.
pub fn apply_policy(policy: &SocketPolicy, path: &Path) -> Result<(), DeviceError> {
    if let Some(mode) = policy.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
            |source| DeviceError::Permissions {
                what: "the mode",
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    if let Some(group) = policy.group {
        std::os::unix::fs::chown(path, None, Some(group)).map_err(|source| {
            DeviceError::Permissions {
                what: "the group",
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Why a device could not be added or removed.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("{path} is already served", path = .0.display())]
    Duplicate(PathBuf),
    #[error("GUID {guid} is already the GUID of {path}", guid = format_guid(*.guid), path = .path.display())]
    GuidTaken { guid: u64, path: PathBuf },
    #[error("the server serves {MAX_DEVICES} devices already")]
    TooMany,
    #[error(
        "the sandbox lets the server make sockets only in {dirs}: put {path} there, or start \
         the server with --sandbox off",
        path = .path.display()
    )]
    OutsideSandbox { path: PathBuf, dirs: String },
    #[error("cannot set {what} of {path}", path = .path.display())]
    Permissions {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start serving {path}", path = .path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no device is served on {path}", path = .0.display())]
    Unknown(PathBuf),
    #[error(
        "a client (QEMU) is attached to {path}: removing the device takes it from a running \
         guest; pass force to do it anyway",
        path = .0.display()
    )]
    Attached(PathBuf),
}

/// One served device.
struct Served {
    /// Its socket's path (or "fd N" for an unnamed inherited socket).
    name: PathBuf,
    guid: u64,
    slot: usize,
    serving: Serving,
}

/// How new devices are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    pub doorbells: DoorbellMode,
    /// See `--spin-us`.
    pub spin: Duration,
    /// Stage timing: whether on, and one pass in how many is timed.
    pub profiling: bool,
    pub profile_every: u32,
}

/// The devices of one process.
pub struct Devices {
    fabric: Fabric,
    settings: ServeSettings,
    policy: SocketPolicy,
    served: Mutex<Vec<Served>>,
    /// The memory-key seed of each new device.
    seed: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Devices {
    pub fn new(
        fabric: Fabric,
        settings: ServeSettings,
        policy: SocketPolicy,
        seed: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Devices {
        Devices {
            fabric,
            settings,
            policy,
            served: Mutex::new(Vec::new()),
            seed,
        }
    }

    fn served(&self) -> MutexGuard<'_, Vec<Served>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the socket of `spec` (by the socket policy) and serves a device on it.
    pub fn add(&self, spec: &DeviceSpec) -> Result<String, DeviceError> {
        if let Some(dirs) = &self.policy.directories {
            let dir = spec.path.parent().unwrap_or(Path::new(""));
            if !dirs.iter().any(|allowed| allowed == dir) {
                return Err(DeviceError::OutsideSandbox {
                    path: spec.path.clone(),
                    dirs: dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        // Checked before the socket is made, so a duplicate leaves the served file alone.
        self.check_new(&spec.path, spec.guid.unwrap_or(derived_guid(&spec.path)))?;
        let listener = listener::listen(&spec.path, self.policy.force)?;
        apply_policy(&self.policy, &spec.path)?;
        self.serve(spec.path.clone(), listener, spec.guid)
    }

    fn check_new(&self, name: &Path, guid: u64) -> Result<(), DeviceError> {
        let served = self.served();
        if served.len() >= MAX_DEVICES {
            return Err(DeviceError::TooMany);
        }
        if served.iter().any(|device| device.name == name) {
            return Err(DeviceError::Duplicate(name.to_path_buf()));
        }
        if let Some(other) = served.iter().find(|device| device.guid == guid) {
            return Err(DeviceError::GuidTaken {
                guid,
                path: other.name.clone(),
            });
        }
        Ok(())
    }

    /// Serves a device on `listener` (made by the caller, or inherited) named `name`.
    pub fn serve(
        &self,
        name: PathBuf,
        listener: Listener,
        guid: Option<u64>,
    ) -> Result<String, DeviceError> {
        let guid = guid.unwrap_or(derived_guid(&name));
        self.check_new(&name, guid)?;
        let config = DeviceConfig {
            node_guid: guid.to_be_bytes(),
            key_seed: (self.seed)(),
            ..DeviceConfig::default()
        };
        let function = PciFunction::with_doorbells(&self.fabric, config, self.settings.doorbells);
        let slot = function.slot();
        self.fabric.with_slot(slot, |slot, _| {
            slot.device.set_profiling(self.settings.profiling);
            slot.device
                .set_profile_sampling(self.settings.profile_every);
        });
        let shown = name.display().to_string();
        let serving = Serving::start(shown.clone(), listener, function, self.settings.spin)
            .map_err(|source| {
                self.fabric.retire(slot);
                DeviceError::Thread {
                    path: name.clone(),
                    source,
                }
            })?;
        let said = format!(
            "device {slot} serves {shown} (node GUID {})",
            format_guid(guid)
        );
        info!("{said}");
        self.served().push(Served {
            name,
            guid,
            slot,
            serving,
        });
        Ok(said)
    }

    /// Stops the device served on `path`: refused while a client is attached unless
    /// `force`, which disconnects it. Its socket file is removed (unless it was inherited).
    pub fn remove(&self, path: &Path, force: bool) -> Result<String, DeviceError> {
        let device = {
            let mut served = self.served();
            let index = served
                .iter()
                .position(|device| device.name == path)
                .ok_or_else(|| DeviceError::Unknown(path.to_path_buf()))?;
            if served[index].serving.client_attached() && !force {
                return Err(DeviceError::Attached(path.to_path_buf()));
            }
            served.remove(index)
        };
        let attached = device.serving.client_attached();
        drop(device.serving.stop());
        self.fabric.retire(device.slot);
        let said = format!(
            "device {} on {} removed{}",
            device.slot,
            path.display(),
            if attached {
                " (its client was disconnected)"
            } else {
                ""
            }
        );
        info!("{said}");
        Ok(said)
    }

    /// One line per device: slot, GUID, whether a client is attached, socket.
    pub fn list(&self) -> String {
        let mut text = String::new();
        for device in self.served().iter() {
            let _ = writeln!(
                text,
                "{}\t{}\t{}\t{}",
                device.slot,
                format_guid(device.guid),
                if device.serving.client_attached() {
                    "attached"
                } else {
                    "idle"
                },
                device.name.display()
            );
        }
        text
    }

    /// Each device's labels for the metrics.
    pub fn labels(&self) -> Vec<crate::profiler::prometheus::DeviceLabel> {
        self.served()
            .iter()
            .map(|device| crate::profiler::prometheus::DeviceLabel {
                index: device.slot,
                socket: device.name.display().to_string(),
                guid: format_guid(device.guid),
                attached: device.serving.client_attached(),
            })
            .collect()
    }

    /// How many devices are served.
    pub fn len(&self) -> usize {
        self.served().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops every device (at exit): clients are disconnected, socket files removed.
    pub fn stop_all(&self) {
        let all: Vec<Served> = self.served().drain(..).collect();
        for device in all {
            drop(device.serving.stop());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_guids_parse_as_documented() {
        let spec: DeviceSpec = "/run/a.sock".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("/run/a.sock"));
        assert_eq!(spec.guid, None);
        let spec: DeviceSpec = "/run/a,b.sock,guid=5254:00ff:fe5e:0101".parse().unwrap();
        assert_eq!(spec.path, PathBuf::from("/run/a,b.sock"));
        assert_eq!(spec.guid, Some(0x5254_00ff_fe5e_0101));
        assert_eq!(parse_guid("0x525400fffe5e0102"), Ok(0x5254_00ff_fe5e_0102));
        assert_eq!(
            parse_guid("52:54:00:ff:fe:5e:01:03"),
            Ok(0x5254_00ff_fe5e_0103)
        );
        for bad in [
            "",
            "12",
            "5254:00ff:fe5e:01011",
            "zz5400fffe5e0101",
            "0000000000000000",
        ] {
            assert!(parse_guid(bad).is_err(), "{bad:?}");
        }
        assert!(",guid=5254:00ff:fe5e:0101".parse::<DeviceSpec>().is_err());
        assert!("/a,guid=12".parse::<DeviceSpec>().is_err());
        assert_eq!(format_guid(0x5254_00ff_fe5e_0101), "5254:00ff:fe5e:0101");
    }

    #[test]
    fn a_derived_guid_depends_on_the_path_alone() {
        let a = derived_guid(Path::new("/run/vm-a.sock"));
        assert_eq!(a, derived_guid(Path::new("/run/vm-a.sock")));
        assert_ne!(a, derived_guid(Path::new("/run/vm-b.sock")));
        // An EUI-64 of a locally administered MAC with QEMU's prefix.
        assert_eq!(a >> 40, 0x50_5400);
        assert_eq!((a >> 24) & 0xffff, 0xfffe);
    }
}
