//! The guest lab: real Linux guests under QEMU with a vmxnet3 + vfio-user-pci slot, the agent
//! that runs commands inside them, and the fixture that drives both from host-side tests.

pub mod agent;
pub mod lab;
pub mod protocol;
