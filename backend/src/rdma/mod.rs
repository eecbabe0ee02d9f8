//! The rdma-core transport: guest verbs carried by the host's RDMA device
//! (docs/rdma-transport.md).
//!
//! * [`carrier`] — the host QPs and registrations behind guest QPs and MRs, and their
//!   completions;
//! * [`datagrams`] — a host UD QP's receive buffers and address handles;
//! * [`abi`] — the structures and constants used, declared by hand and checked against
//!   rdma-core's headers by `tests/rdma_abi.rs`;
//! * [`verbs`] — libibverbs, loaded at run time, and the calls looked up in it;
//! * [`devices`] — the host's RDMA devices, their ports and GID tables;
//! * [`host`] — an open device and the MRs, CQs and QPs made on it, as owned objects;
//! * [`loopback`] — one SEND between two QPs of a host port, to prove the device and the calls;
//! * [`view`] — a guest MR's scattered pages mapped again as one range, for registration.

pub mod abi;
pub mod carrier;
pub mod datagrams;
pub mod devices;
pub mod host;
pub mod loopback;
pub mod verbs;
pub mod view;

pub use devices::{DeviceError, GidEntry, GidKind, HostDevice, LinkLayer, Port};
pub use verbs::{LoadError, Verbs};
