//! A host UD QP's own part: the receive buffers its datagrams land in, and the address
//! handles its sends go out with.
//!
//! A guest UD QP receives from every path at once (memcpy, TCP and the host device), so
//! its receive queue cannot be handed to the host QP: the host QP receives into buffers of
//! the server's instead, and each datagram is copied out ([`HostDatagram`]) for the device
//! to deliver to the guest's queue as it delivers any datagram. A datagram is at most one
//! MTU (4 KiB), so the copy is small; sends go straight from guest memory.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;

use super::abi::*;
use super::host::{HostAh, HostError, HostMr, HostPd, HostQp};
use crate::{Gid, HostDatagram};

/// Receive buffers per host UD QP: 32 × 4 KiB and the GRH, about 130 KiB a QP.
pub const BUFFERS: usize = 32;
/// One buffer: the 40-byte GRH the device writes first, then up to a 4 KiB datagram.
const SLOT: usize = 40 + 4096;
/// Address handles one host UD QP keeps (one per destination; they are never dropped while
/// the QP lives, as sends in flight may still use them).
pub const MAX_AHS: usize = 1024;
/// Marks a receive's `wr_id` (see `carrier.rs`).
pub const RECEIVE: u64 = 1 << 63;

/// Anonymous memory the host device writes datagrams into; unmapped when dropped.
struct Buffers {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this value; only the device and this value's owner touch it.
unsafe impl Send for Buffers {}

impl Buffers {
    fn new(len: usize) -> Result<Buffers, HostError> {
        // SAFETY: a fresh anonymous mapping the kernel places.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(HostError {
                call: "mmap",
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or(HostError {
            call: "mmap",
            reason: "a null mapping".into(),
        })?;
        Ok(Buffers { base, len })
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; its MR is dropped before it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One host UD QP's buffers and address handles.
pub struct Datagrams {
    /// The buffers' registration: dropped before the buffers (field order).
    mr: HostMr,
    buffers: Buffers,
    ahs: HashMap<(u8, Gid), HostAh>,
}

impl Datagrams {
    /// Buffers registered in `pd` (the QP's).
    pub fn new(pd: &Arc<HostPd>) -> Result<Datagrams, HostError> {
        let buffers = Buffers::new(BUFFERS * SLOT)?;
        // SAFETY: the buffers stay mapped as long as `Datagrams`, whose MR is dropped first.
        let mr =
            unsafe { pd.register_own(buffers.base.as_ptr(), buffers.len, ACCESS_LOCAL_WRITE)? };
        Ok(Datagrams {
            mr,
            buffers,
            ahs: HashMap::new(),
        })
    }

    /// Posts buffer `index` to `qp`.
    fn post(&self, qp: &mut HostQp, index: usize) -> Result<(), HostError> {
        let mut sge = IbvSge {
            // SAFETY: `index` < BUFFERS: inside the mapping.
            addr: unsafe { self.buffers.base.as_ptr().add(index * SLOT) } as u64,
            length: SLOT as u32,
            lkey: self.mr.lkey(),
        };
        let mut wr = IbvRecvWr {
            wr_id: RECEIVE | index as u64,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        qp.post_recv(&mut wr)
    }

    /// Posts every buffer (the QP just reached RTS; earlier posts went with a reset).
    pub fn post_all(&self, qp: &mut HostQp) -> Result<(), HostError> {
        (0..BUFFERS).try_for_each(|index| self.post(qp, index))
    }

    /// The datagram a successful receive completion `wc` names, copied out; its buffer is
    /// posted again. A failed one (flushed) gives nothing and its buffer stays out.
    pub fn take(&self, qp: &mut HostQp, wc: &IbvWc) -> Option<HostDatagram> {
        let index = usize::try_from(wc.wr_id & !RECEIVE).ok()?;
        if index >= BUFFERS || wc.status != WC_SUCCESS {
            return None;
        }
        let len = (wc.byte_len as usize).min(SLOT);
        let mut bytes = vec![0u8; len];
        // SAFETY: `index` < BUFFERS and `len` ≤ SLOT: inside the mapping; the device wrote
        // it before the completion that was just polled.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buffers.base.as_ptr().add(index * SLOT),
                bytes.as_mut_ptr(),
                len,
            );
        }
        if let Err(e) = self.post(qp, index) {
            log::debug!("rdma path: a UD buffer could not be posted again: {e}");
        }
        if len < 40 {
            return None;
        }
        let (sgid, dgid) = addresses(&bytes[..40]);
        Some(HostDatagram {
            sgid,
            dgid,
            src_qp: wc.src_qp,
            imm: (wc.wc_flags & WC_WITH_IMM != 0).then_some(wc.imm_data),
            payload: bytes[40..].into(),
        })
    }

    /// The address handle for `dgid` from the GID at `sgid_index`, made at first use.
    pub fn ah(
        &mut self,
        pd: &Arc<HostPd>,
        port: u8,
        sgid_index: u8,
        dgid: Gid,
    ) -> Result<u64, HostError> {
        if let Some(ah) = self.ahs.get(&(sgid_index, dgid)) {
            return Ok(ah.address());
        }
        if self.ahs.len() >= MAX_AHS {
            return Err(HostError {
                call: "ibv_create_ah",
                reason: format!("the QP keeps {MAX_AHS} destinations already"),
            });
        }
        let ah = pd.create_ah(port, sgid_index, dgid)?;
        let address = ah.address();
        self.ahs.insert((sgid_index, dgid), ah);
        Ok(address)
    }
}

/// The source and destination GIDs in the 40 bytes the device writes before a datagram: an
/// IPv6 GRH, or for RoCE v2 over IPv4, the IPv4 header in its last 20 bytes.
fn addresses(grh: &[u8]) -> (Gid, Gid) {
    let mut sgid = [0u8; 16];
    let mut dgid = [0u8; 16];
    if grh[0] >> 4 == 6 {
        sgid.copy_from_slice(&grh[8..24]);
        dgid.copy_from_slice(&grh[24..40]);
    } else {
        sgid[10] = 0xff;
        sgid[11] = 0xff;
        dgid[10] = 0xff;
        dgid[11] = 0xff;
        sgid[12..].copy_from_slice(&grh[32..36]);
        dgid[12..].copy_from_slice(&grh[36..40]);
    }
    (sgid, dgid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_addresses_come_from_an_ipv6_grh_or_a_roce_v2_ipv4_header() {
        let mut grh = [0u8; 40];
        grh[0] = 0x60;
        grh[8..24].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        grh[24..40].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9]);
        let (s, d) = addresses(&grh);
        assert_eq!(s[8..], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(d[8..], [9; 8]);

        let mut v4 = [0u8; 40];
        v4[20] = 0x45;
        v4[32..36].copy_from_slice(&[127, 0, 0, 11]);
        v4[36..40].copy_from_slice(&[127, 0, 0, 12]);
        let (s, d) = addresses(&v4);
        assert_eq!(std::net::Ipv6Addr::from(s).to_string(), "::ffff:127.0.0.11");
        assert_eq!(std::net::Ipv6Addr::from(d).to_string(), "::ffff:127.0.0.12");
    }
}
