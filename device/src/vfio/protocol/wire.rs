//! Byte layouts of vfio-user messages (QEMU's vfio-user specification, from "Header" to the DMA messages).
//!
//! Everything is host-endian, as the specification says. Parsers take the
//! bytes the client sent and return `None` when there are too few of them;
//! they never index, so no client input can make them panic. Bytes after a
//! fixed-size structure are not looked at here.

use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, vfio_region_info, vfio_region_sparse_mmap_area,
};

/// Size of the header in front of every message.
pub const HEADER_SIZE: usize = 16;
/// `VERSION`: major and minor before the JSON.
pub const VERSION_SIZE: usize = 4;
/// `DMA_MAP` request payload.
pub const DMA_MAP_SIZE: usize = 32;
/// `DMA_UNMAP` request and reply payload.
pub const DMA_UNMAP_SIZE: usize = 24;
/// `DEVICE_GET_INFO` request and reply payload. QEMU reads exactly this much
/// (QEMU's vfio-user specification, VFIO_USER_DEVICE_GET_INFO), so the reply must not grow.
pub const DEVICE_INFO_SIZE: usize = 16;
/// `DEVICE_GET_REGION_INFO` request payload and reply before capabilities.
pub const REGION_INFO_SIZE: usize = 32;
/// `DEVICE_GET_IRQ_INFO` request and reply payload.
pub const IRQ_INFO_SIZE: usize = 16;
/// `DEVICE_SET_IRQS` request payload before any BOOL data.
pub const IRQ_SET_SIZE: usize = 20;
/// `REGION_READ`/`REGION_WRITE` payload before the data.
pub const REGION_ACCESS_SIZE: usize = 16;
/// Sparse mmap capability: capability header plus `nr_areas`/`reserved`.
const SPARSE_CAP_HEADER_SIZE: usize = 16;
/// One `vfio_region_sparse_mmap_area`.
const SPARSE_AREA_SIZE: usize = 16;
/// Version of the sparse mmap capability layout.
const SPARSE_CAP_VERSION: u16 = 1;

/// Header flag bits.
pub mod flags {
    /// Bits 0-3: message type.
    pub const TYPE_MASK: u32 = 0xF;
    /// Type of a command message.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type of a reply message.
    pub const TYPE_REPLY: u32 = 1;
    /// Bit 4: the sender wants no reply (QEMU's posted writes).
    pub const NO_REPLY: u32 = 1 << 4;
    /// Bit 5: the reply reports a failure; `error` holds the errno.
    pub const ERROR: u32 = 1 << 5;
}

/// Command numbers (QEMU's vfio-user specification, the command table), including the ones we refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// 1: protocol version and capability negotiation.
    Version,
    /// 2: the client shares guest memory.
    DmaMap,
    /// 3: the client withdraws guest memory.
    DmaUnmap,
    /// 4: region and IRQ counts, device flags.
    DeviceGetInfo,
    /// 5: one region's description, capabilities and mmap fd.
    DeviceGetRegionInfo,
    /// 6: ioeventfds/ioregionfds (unsupported).
    DeviceGetRegionIoFds,
    /// 7: one IRQ index's description.
    DeviceGetIrqInfo,
    /// 8: interrupt eventfds.
    DeviceSetIrqs,
    /// 9: read from a region.
    RegionRead,
    /// 10: write to a region.
    RegionWrite,
    /// 11: server-to-client only (never valid from the client).
    DmaRead,
    /// 12: server-to-client only (never valid from the client).
    DmaWrite,
    /// 13: reset the device.
    DeviceReset,
    /// 14: old dirty-page command, removed from the specification.
    DirtyPages,
    /// 15: batched posted writes (not advertised, unsupported).
    RegionWriteMulti,
    /// 16: feature probe/get/set, e.g. migration (unsupported).
    DeviceFeature,
    /// 17: migration data read (unsupported).
    MigDataRead,
    /// 18: migration data write (unsupported).
    MigDataWrite,
}

impl Command {
    /// Decodes a command number; `None` for numbers the specification does
    /// not define.
    pub fn from_wire(number: u16) -> Option<Self> {
        Some(match number {
            1 => Self::Version,
            2 => Self::DmaMap,
            3 => Self::DmaUnmap,
            4 => Self::DeviceGetInfo,
            5 => Self::DeviceGetRegionInfo,
            6 => Self::DeviceGetRegionIoFds,
            7 => Self::DeviceGetIrqInfo,
            8 => Self::DeviceSetIrqs,
            9 => Self::RegionRead,
            10 => Self::RegionWrite,
            11 => Self::DmaRead,
            12 => Self::DmaWrite,
            13 => Self::DeviceReset,
            14 => Self::DirtyPages,
            15 => Self::RegionWriteMulti,
            16 => Self::DeviceFeature,
            17 => Self::MigDataRead,
            18 => Self::MigDataWrite,
            _ => return None,
        })
    }
}

/// Reads host-endian integers off the front of a byte slice.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_ne_bytes(*head))
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_ne_bytes(*head))
    }

    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_ne_bytes(*head))
    }
}

/// The 16-byte message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Chosen by the sender, echoed in the reply.
    pub id: u16,
    /// Command number.
    pub command: u16,
    /// Whole message size, header included.
    pub size: u32,
    /// Type, No_reply and Error bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Decodes a complete header.
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Self {
        let [
            i0,
            i1,
            c0,
            c1,
            s0,
            s1,
            s2,
            s3,
            f0,
            f1,
            f2,
            f3,
            e0,
            e1,
            e2,
            e3,
        ] = *bytes;
        Self {
            id: u16::from_ne_bytes([i0, i1]),
            command: u16::from_ne_bytes([c0, c1]),
            size: u32::from_ne_bytes([s0, s1, s2, s3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            error: u32::from_ne_bytes([e0, e1, e2, e3]),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0; HEADER_SIZE];
        let parts = self
            .id
            .to_ne_bytes()
            .into_iter()
            .chain(self.command.to_ne_bytes())
            .chain(self.size.to_ne_bytes())
            .chain(self.flags.to_ne_bytes())
            .chain(self.error.to_ne_bytes());
        for (slot, byte) in out.iter_mut().zip(parts) {
            *slot = byte;
        }
        out
    }

    /// The type bits.
    pub fn message_type(&self) -> u32 {
        self.flags & flags::TYPE_MASK
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }
}

/// Appends host-endian integers to a reply payload.
#[derive(Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    /// An empty payload with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self(Vec::with_capacity(capacity))
    }

    /// Appends a `u16`.
    pub fn u16(mut self, value: u16) -> Self {
        self.0.extend_from_slice(&value.to_ne_bytes());
        self
    }

    /// Appends a `u32`.
    pub fn u32(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_ne_bytes());
        self
    }

    /// Appends a `u64`.
    pub fn u64(mut self, value: u64) -> Self {
        self.0.extend_from_slice(&value.to_ne_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(mut self, value: &[u8]) -> Self {
        self.0.extend_from_slice(value);
        self
    }
}

/// `VERSION` fixed part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// Protocol major version.
    pub major: u16,
    /// Protocol minor version.
    pub minor: u16,
}

impl Version {
    /// Decodes the first [`VERSION_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            major: f.u16()?,
            minor: f.u16()?,
        })
    }
}

/// `DMA_MAP` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// Payload size claimed by the client.
    pub argsz: u32,
    /// READ 1, WRITE 2.
    pub flags: u32,
    /// Offset of the window in the attached fd.
    pub offset: u64,
    /// Guest-physical start.
    pub address: u64,
    /// Window length.
    pub size: u64,
}

impl DmaMap {
    /// Decodes the first [`DMA_MAP_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            argsz: f.u32()?,
            flags: f.u32()?,
            offset: f.u64()?,
            address: f.u64()?,
            size: f.u64()?,
        })
    }
}

/// `DMA_UNMAP` request and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Payload size.
    pub argsz: u32,
    /// Raw flags; 2 = unmap all (`VFIO_DMA_UNMAP_FLAG_ALL`).
    pub flags: u32,
    /// Guest-physical start.
    pub address: u64,
    /// Window length.
    pub size: u64,
}

impl DmaUnmap {
    /// Decodes the first [`DMA_UNMAP_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            argsz: f.u32()?,
            flags: f.u32()?,
            address: f.u64()?,
            size: f.u64()?,
        })
    }

    /// Encodes the [`DMA_UNMAP_SIZE`]-byte reply.
    pub fn encode(&self) -> Vec<u8> {
        Encoder::with_capacity(DMA_UNMAP_SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u64(self.address)
            .u64(self.size)
            .0
    }
}

/// `DEVICE_GET_INFO` request and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Request: room for the reply; reply: size needed.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indices.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Decodes the first [`DEVICE_INFO_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            argsz: f.u32()?,
            flags: f.u32()?,
            num_regions: f.u32()?,
            num_irqs: f.u32()?,
        })
    }

    /// Encodes the [`DEVICE_INFO_SIZE`]-byte reply.
    pub fn encode(&self) -> Vec<u8> {
        Encoder::with_capacity(DEVICE_INFO_SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.num_regions)
            .u32(self.num_irqs)
            .0
    }
}

/// `DEVICE_GET_REGION_INFO` request: only `argsz` and `index` matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfoRequest {
    /// Room the client has for the reply payload.
    pub argsz: u32,
    /// Region index.
    pub index: u32,
}

impl RegionInfoRequest {
    /// Decodes the first [`REGION_INFO_SIZE`] bytes (a `vfio_region_info`).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let info = parse_region_info(bytes)?;
        Some(Self {
            argsz: info.argsz,
            index: info.index,
        })
    }
}

/// Decodes a `vfio_region_info` from the first [`REGION_INFO_SIZE`] bytes.
pub fn parse_region_info(bytes: &[u8]) -> Option<vfio_region_info> {
    let mut f = Fields(bytes);
    Some(vfio_region_info {
        argsz: f.u32()?,
        flags: f.u32()?,
        index: f.u32()?,
        cap_offset: f.u32()?,
        size: f.u64()?,
        offset: f.u64()?,
    })
}

/// Encodes a `vfio_region_info` ([`REGION_INFO_SIZE`] bytes).
pub fn encode_region_info(info: &vfio_region_info) -> Encoder {
    Encoder::with_capacity(REGION_INFO_SIZE)
        .u32(info.argsz)
        .u32(info.flags)
        .u32(info.index)
        .u32(info.cap_offset)
        .u64(info.size)
        .u64(info.offset)
}

/// Encodes a sparse mmap capability listing `areas`, as the last (only)
/// capability of the chain. `None` if the size does not fit the wire's u32.
pub fn sparse_mmap_capability(areas: &[vfio_region_sparse_mmap_area]) -> Option<Vec<u8>> {
    let nr_areas = u32::try_from(areas.len()).ok()?;
    let len = areas
        .len()
        .checked_mul(SPARSE_AREA_SIZE)?
        .checked_add(SPARSE_CAP_HEADER_SIZE)?;
    u32::try_from(len).ok()?;
    let id = u16::try_from(VFIO_REGION_INFO_CAP_SPARSE_MMAP).ok()?;
    let mut out = Encoder::with_capacity(len)
        .u16(id)
        .u16(SPARSE_CAP_VERSION)
        .u32(0) // next: end of chain
        .u32(nr_areas)
        .u32(0); // reserved
    for area in areas {
        out = out.u64(area.offset).u64(area.size);
    }
    Some(out.0)
}

/// `DEVICE_GET_IRQ_INFO` request and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// Request: room for the reply; reply: size needed.
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

impl IrqInfo {
    /// Decodes the first [`IRQ_INFO_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            argsz: f.u32()?,
            flags: f.u32()?,
            index: f.u32()?,
            count: f.u32()?,
        })
    }

    /// Encodes the [`IRQ_INFO_SIZE`]-byte reply.
    pub fn encode(&self) -> Vec<u8> {
        Encoder::with_capacity(IRQ_INFO_SIZE)
            .u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count)
            .0
    }
}

/// `DEVICE_SET_IRQS` request (a `vfio_irq_set` without its data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqSet {
    /// Payload size claimed by the client.
    pub argsz: u32,
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}

impl IrqSet {
    /// Decodes the first [`IRQ_SET_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            argsz: f.u32()?,
            flags: f.u32()?,
            index: f.u32()?,
            start: f.u32()?,
            count: f.u32()?,
        })
    }
}

/// `REGION_READ`/`REGION_WRITE` request and reply, without data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Number of data bytes.
    pub count: u32,
}

impl RegionAccess {
    /// Decodes the first [`REGION_ACCESS_SIZE`] bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let mut f = Fields(bytes);
        Some(Self {
            offset: f.u64()?,
            region: f.u32()?,
            count: f.u32()?,
        })
    }

    /// Encodes the fixed part, leaving room for `data_len` more bytes.
    pub fn encode(&self, data_len: usize) -> Encoder {
        Encoder::with_capacity(REGION_ACCESS_SIZE.saturating_add(data_len))
            .u64(self.offset)
            .u32(self.region)
            .u32(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let header = Header {
            id: 0x1234,
            command: 9,
            size: 0x20,
            flags: flags::TYPE_REPLY | flags::ERROR,
            error: 22,
        };
        assert_eq!(Header::parse(&header.encode()), header);
        assert_eq!(&header.encode()[..2], &0x1234u16.to_ne_bytes());
        assert_eq!(&header.encode()[12..], &22u32.to_ne_bytes());
    }

    #[test]
    fn short_payloads_do_not_parse() {
        assert_eq!(DmaMap::parse(&[0; DMA_MAP_SIZE - 1]), None);
        assert_eq!(DmaUnmap::parse(&[0; DMA_UNMAP_SIZE - 1]), None);
        assert_eq!(DeviceInfo::parse(&[0; DEVICE_INFO_SIZE - 1]), None);
        assert_eq!(RegionInfoRequest::parse(&[0; REGION_INFO_SIZE - 1]), None);
        assert_eq!(IrqInfo::parse(&[0; IRQ_INFO_SIZE - 1]), None);
        assert_eq!(IrqSet::parse(&[0; IRQ_SET_SIZE - 1]), None);
        assert_eq!(RegionAccess::parse(&[0; REGION_ACCESS_SIZE - 1]), None);
        assert_eq!(Version::parse(&[0; VERSION_SIZE - 1]), None);
        assert_eq!(Version::parse(&[]), None);
    }

    #[test]
    fn fixed_sizes_match_the_encoders() {
        let unmap = DmaUnmap {
            argsz: 24,
            flags: 2,
            address: 3,
            size: 4,
        };
        assert_eq!(unmap.encode().len(), DMA_UNMAP_SIZE);
        assert_eq!(DmaUnmap::parse(&unmap.encode()), Some(unmap));
        let info = DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        };
        assert_eq!(info.encode().len(), DEVICE_INFO_SIZE);
        assert_eq!(DeviceInfo::parse(&info.encode()), Some(info));
        let irq = IrqInfo {
            argsz: 16,
            flags: 1,
            index: 2,
            count: 3,
        };
        assert_eq!(irq.encode().len(), IRQ_INFO_SIZE);
        let region = vfio_region_info {
            argsz: 32,
            flags: 3,
            index: 7,
            cap_offset: 0,
            size: 256,
            offset: 0x1000,
        };
        let bytes = encode_region_info(&region).0;
        assert_eq!(bytes.len(), REGION_INFO_SIZE);
        assert_eq!(parse_region_info(&bytes), Some(region));
        let access = RegionAccess {
            offset: 8,
            region: 7,
            count: 4,
        };
        assert_eq!(access.encode(0).0.len(), REGION_ACCESS_SIZE);
        assert_eq!(RegionAccess::parse(&access.encode(0).0), Some(access));
    }

    #[test]
    fn sparse_capability_layout() {
        let areas = [
            vfio_region_sparse_mmap_area {
                offset: 0x1000,
                size: 0x1000,
            },
            vfio_region_sparse_mmap_area {
                offset: 0x4000,
                size: 0x2000,
            },
        ];
        let cap = sparse_mmap_capability(&areas).expect("fits");
        assert_eq!(cap.len(), 16 + 2 * 16);
        assert_eq!(&cap[0..2], &1u16.to_ne_bytes(), "id SPARSE_MMAP");
        assert_eq!(&cap[2..4], &1u16.to_ne_bytes(), "version 1");
        assert_eq!(&cap[4..8], &0u32.to_ne_bytes(), "end of chain");
        assert_eq!(&cap[8..12], &2u32.to_ne_bytes(), "nr_areas");
        assert_eq!(&cap[16..24], &0x1000u64.to_ne_bytes());
        assert_eq!(&cap[40..48], &0x2000u64.to_ne_bytes());
    }

    #[test]
    fn command_numbers() {
        assert_eq!(Command::from_wire(1), Some(Command::Version));
        assert_eq!(Command::from_wire(13), Some(Command::DeviceReset));
        assert_eq!(Command::from_wire(18), Some(Command::MigDataWrite));
        for unknown in [0, 19, 0xFFFF] {
            assert_eq!(Command::from_wire(unknown), None);
        }
    }
}
