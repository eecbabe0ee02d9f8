//! Glue between the PVRDMA function and the vfio-user client.
//!
//! * [`protocol`] — our vfio-user server: message loop, wire formats and
//!   the [`protocol::DeviceBackend`] trait (docs/vfio-user-server.md).
//! * [`regions`] — the region and IRQ tables advertised to the client.
//! * [`dma`] — the client's DMA windows (guest memory it shared with us).
//! * [`memory_fault`] — a window whose file shrinks fails its device, not the process.
//! * [`irqs`] — decoding of `SET_IRQS` and the MSI-X eventfd table.
//! * [`backend`] — the `DeviceBackend` that routes requests to the function.
//! * [`listener`] — socket creation and the accept-serve-accept loop.
//! * [`uar`] and [`poller`] — exit-free doorbells: BAR2 shared with the client, and the
//!   thread that polls it.
//!
//! Errors returned by the backend become error replies carrying their
//! errno, so the values chosen here are what QEMU sees.

pub mod backend;
pub mod dma;
pub mod fabric;
pub mod guest_ram;
pub mod irqs;
pub mod listener;
#[allow(unsafe_code)] // The SIGBUS handler; see the module docs.
pub mod memory_fault;
pub mod poller;
pub mod protocol;
pub mod regions;
pub mod remote;
pub mod rnr_timer;
pub mod uar;

pub use backend::PciFunctionBackend;
