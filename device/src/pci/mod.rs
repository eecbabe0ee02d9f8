//! The PVRDMA PCI function, independent of any transport.
//!
//! [`ids`] holds every device-specific number (IDs, BAR layout, MSI-X vector
//! count) so later modules take them from one place; [`regs`] holds the
//! generic PCI 3.0 register layout; [`config_space`] is the 256-byte
//! configuration space built from both.

pub mod config_space;
pub mod ids;
pub mod regs;

pub use config_space::ConfigSpace;
