//! The data path (device-abi §6.4–§6.8, §7.3, §9): send and receive WQEs turned into operations between
//! two QPs, their completions and notifications, every error status the device produces,
//! receiver-not-ready waits, the memory protection between guests, and random hostile WQEs.
//!
//! Every scenario runs twice: with both QPs on one device behind the `InProcessBus`
//! (loopback: the device answers requests for its own GIDs; any other GID is unreachable),
//! and with the QPs on two devices, each with its own guest RAM at the same guest-physical
//! addresses, joined by the memcpy fabric as the server joins them (`driver::fabric_bus`).

mod driver;

/// The profiler's stage timing covers work the device completes itself, so its exact
/// clock-read tests run on the memcpy topologies only.
macro_rules! memcpy_topologies {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            $(#[$attr])*
            fn loopback() {
                super::$name(crate::harness::Net::loopback());
            }

            #[test]
            $(#[$attr])*
            fn two_devices() {
                super::$name(crate::harness::Net::two_devices());
            }
        }
    )*};
}

/// Runs each scenario `fn name<B: Bus>(net: Net<B>)` on one device (`name::loopback`) and
/// across two devices of one fabric (`name::two_devices`) and of two hosts joined by the TCP
/// transport's protocol (`name::over_tcp`, `driver::tcp_bus`). Attributes (e.g. `#[ignore]`) apply to both.
macro_rules! both_topologies {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            $(#[$attr])*
            fn loopback() {
                super::$name(crate::harness::Net::loopback());
            }

            #[test]
            $(#[$attr])*
            fn two_devices() {
                super::$name(crate::harness::Net::two_devices());
            }

            #[test]
            $(#[$attr])*
            fn over_tcp() {
                super::$name(crate::harness::Net::over_tcp());
            }
        }
    )*};
}

#[path = "datapath/errors.rs"]
mod errors;
#[path = "datapath/gid_ownership.rs"]
mod gid_ownership;
#[path = "datapath/harness.rs"]
mod harness;
#[path = "datapath/hostile.rs"]
mod hostile;
#[path = "datapath/memory_ext.rs"]
mod memory_ext;
#[path = "datapath/operations.rs"]
mod operations;
#[path = "datapath/profiler.rs"]
mod profiler;
#[path = "datapath/protection.rs"]
mod protection;
#[path = "datapath/rnr.rs"]
mod rnr;
