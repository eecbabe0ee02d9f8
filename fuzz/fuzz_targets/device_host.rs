#![no_main]
//! libFuzzer's entry point for `vfio_user_pvrdma_fuzz::device_host` (docs/fuzzing.md).

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_user_pvrdma_fuzz::device_host::run(data));
