//! The host's RDMA devices as libibverbs reports them: names, ports, GID tables.

use std::ffi::{CStr, c_int};
use std::net::Ipv6Addr;

use super::abi::{
    GID_TYPE_IB, GID_TYPE_ROCE_V1, GID_TYPE_ROCE_V2, IbvContext, IbvGid, IbvGidEntry, IbvPortAttr,
    LINK_LAYER_ETHERNET, LINK_LAYER_INFINIBAND, PORT_ACTIVE,
};
use super::verbs::Verbs;

/// Ports looked at per device: HCAs have one or two; the loop stops at the first that
/// does not answer.
const MAX_PORTS: u8 = 8;
/// GID entries read per port at most (rxe has 1024, mostly empty).
const MAX_GIDS: usize = 1024;

/// One RDMA device of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    pub name: String,
    /// As libibverbs gives it (`__be64`): the GUID's bytes in network order in memory.
    pub node_guid: u64,
    pub ports: Vec<Port>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub number: u8,
    pub active: bool,
    pub link_layer: LinkLayer,
    /// The active path MTU in bytes.
    pub active_mtu: u32,
    /// The populated entries of the GID table.
    pub gids: Vec<GidEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    Ethernet,
    Unknown(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    pub index: u32,
    pub gid: [u8; 16],
    /// The entry's type, where the library can tell it (rdma-core 29 and later).
    pub kind: Option<GidKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidKind {
    Ib,
    RoceV1,
    RoceV2,
}

/// Why the device list could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("libibverbs could not list the host's RDMA devices ({0})")]
    List(std::io::ErrorKind),
    #[error("RDMA device {name} could not be opened ({error})")]
    Open { name: String, error: String },
}

/// Every RDMA device of the host, each opened long enough to read its ports and GIDs.
/// A device that cannot be opened (permissions, a device going away) is an error.
pub fn list(verbs: &Verbs) -> Result<Vec<HostDevice>, DeviceError> {
    let mut count: c_int = 0;
    // SAFETY: `count` is a valid out-pointer; the list is freed below.
    let list = unsafe { (verbs.get_device_list)(&mut count) };
    if list.is_null() {
        return Err(DeviceError::List(std::io::Error::last_os_error().kind()));
    }
    let count = usize::try_from(count).unwrap_or(0);
    let mut devices = Vec::with_capacity(count);
    let mut failure = None;
    for i in 0..count {
        // SAFETY: the list holds `count` device pointers (then a null).
        let device = unsafe { *list.add(i) };
        // SAFETY: `device` came from the list, which is still alive; the name is a
        // NUL-terminated string inside the device, copied at once.
        let name = unsafe { CStr::from_ptr((verbs.get_device_name)(device)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above.
        let node_guid = unsafe { (verbs.get_device_guid)(device) };
        // SAFETY: as above; the context is closed by `Opened`'s drop.
        let context = unsafe { (verbs.open_device)(device) };
        if context.is_null() {
            failure = Some(DeviceError::Open {
                name,
                error: std::io::Error::last_os_error().to_string(),
            });
            break;
        }
        let opened = Opened { verbs, context };
        devices.push(HostDevice {
            name,
            node_guid,
            ports: opened.ports(),
        });
    }
    // SAFETY: the list came from get_device_list and no device pointer is used after this
    // (open contexts keep their own reference to the device).
    unsafe { (verbs.free_device_list)(list) };
    match failure {
        Some(error) => Err(error),
        None => Ok(devices),
    }
}

/// A device context, closed when dropped.
struct Opened<'a> {
    verbs: &'a Verbs,
    context: *mut IbvContext,
}

impl Opened<'_> {
    fn ports(&self) -> Vec<Port> {
        (1..=MAX_PORTS)
            .map_while(|number| self.port(number))
            .collect()
    }

    fn port(&self, number: u8) -> Option<Port> {
        let mut attr = IbvPortAttr::default();
        // SAFETY: an open context and a zeroed attribute structure at least as large as
        // what the library fills.
        if unsafe { (self.verbs.query_port)(self.context, number, &mut attr) } != 0 {
            return None;
        }
        Some(Port {
            number,
            active: attr.state == PORT_ACTIVE,
            link_layer: match attr.link_layer {
                LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
                LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
                // 0 is "unspecified", which libibverbs reports for InfiniBand.
                0 => LinkLayer::InfiniBand,
                other => LinkLayer::Unknown(other),
            },
            active_mtu: mtu_bytes(attr.active_mtu),
            gids: self.gids(number, attr.gid_tbl_len),
        })
    }

    fn gids(&self, port: u8, table_len: c_int) -> Vec<GidEntry> {
        gid_table(self.verbs, self.context, port, table_len)
    }
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        // SAFETY: the context was opened by `list` and nothing else holds it.
        unsafe { (self.verbs.close_device)(self.context) };
    }
}

/// The populated entries of `port`'s GID table (of `table_len` entries), with their types
/// where the library can tell (one ioctl on rdma-core 29 and later, else one query per
/// entry).
pub(super) fn gid_table(
    verbs: &Verbs,
    context: *mut IbvContext,
    port: u8,
    table_len: c_int,
) -> Vec<GidEntry> {
    let len = usize::try_from(table_len).unwrap_or(0).min(MAX_GIDS);
    if let Some(query_table) = verbs.query_gid_table {
        let mut entries = vec![IbvGidEntry::default(); len];
        // SAFETY: an open context; `entries` holds `len` entries of the size passed; the
        // library writes at most that many and returns how many it wrote.
        let got = unsafe {
            query_table(
                context,
                entries.as_mut_ptr(),
                len,
                0,
                size_of::<IbvGidEntry>(),
            )
        };
        if let Ok(got) = usize::try_from(got) {
            return entries
                .iter()
                .take(got.min(len))
                .filter(|e| e.port_num == u32::from(port))
                .map(|e| GidEntry {
                    index: e.gid_index,
                    gid: e.gid.raw,
                    kind: match e.gid_type {
                        GID_TYPE_IB => Some(GidKind::Ib),
                        GID_TYPE_ROCE_V1 => Some(GidKind::RoceV1),
                        GID_TYPE_ROCE_V2 => Some(GidKind::RoceV2),
                        _ => None,
                    },
                })
                .collect();
        }
    }
    (0..len)
        .filter_map(|index| {
            let mut gid = IbvGid::default();
            let index = c_int::try_from(index).ok()?;
            // SAFETY: an open context and a valid out-pointer.
            let rc = unsafe { (verbs.query_gid)(context, port, index, &mut gid) };
            (rc == 0 && gid.raw != [0; 16]).then_some(GidEntry {
                index: index as u32,
                gid: gid.raw,
                kind: None,
            })
        })
        .collect()
}

/// `enum ibv_mtu` (1 = 256 bytes … 5 = 4096) in bytes; 0 for anything else.
fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

impl std::fmt::Display for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The GUID's bytes are in memory order (network order), as ibv_devinfo prints them.
        let g = self.node_guid.to_ne_bytes();
        writeln!(
            f,
            "{}: node GUID {:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}:{:02x}{:02x}",
            self.name, g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
        )?;
        for port in &self.ports {
            writeln!(
                f,
                "  port {}: {}, {}, MTU {}",
                port.number,
                if port.active { "active" } else { "down" },
                match port.link_layer {
                    LinkLayer::InfiniBand => "InfiniBand".to_string(),
                    LinkLayer::Ethernet => "Ethernet".to_string(),
                    LinkLayer::Unknown(n) => format!("link layer {n}"),
                },
                port.active_mtu
            )?;
            for gid in &port.gids {
                writeln!(
                    f,
                    "    GID {:<4} {:<40} {}",
                    gid.index,
                    Ipv6Addr::from(gid.gid).to_string(),
                    match gid.kind {
                        Some(GidKind::Ib) => "IB",
                        Some(GidKind::RoceV1) => "RoCE v1",
                        Some(GidKind::RoceV2) => "RoCE v2",
                        None => "",
                    }
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_mtus_are_the_ib_enum_in_bytes() {
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 6].map(mtu_bytes),
            [0, 256, 512, 1024, 2048, 4096, 0]
        );
    }

    #[test]
    fn a_device_prints_its_ports_and_gids() {
        let device = HostDevice {
            name: "rxe0".into(),
            node_guid: u64::from_ne_bytes([0x02, 0x11, 0x22, 0xff, 0xfe, 0x33, 0x44, 0x55]),
            ports: vec![Port {
                number: 1,
                active: true,
                link_layer: LinkLayer::Ethernet,
                active_mtu: 1024,
                gids: vec![GidEntry {
                    index: 1,
                    gid: Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001).octets(),
                    kind: Some(GidKind::RoceV2),
                }],
            }],
        };
        let text = device.to_string();
        assert!(
            text.starts_with("rxe0: node GUID 0211:22ff:fe33:4455\n"),
            "{text}"
        );
        assert!(
            text.contains("port 1: active, Ethernet, MTU 1024"),
            "{text}"
        );
        assert!(text.contains("GID 1    ::ffff:10.0.0.1"), "{text}");
        assert!(text.trim_end().ends_with("RoCE v2"), "{text}");
    }
}
