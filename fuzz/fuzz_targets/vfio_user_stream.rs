#![no_main]
//! libFuzzer's entry point for `vfio_user_pvrdma_fuzz::vfio_user_stream` (docs/fuzzing.md).

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfio_user_pvrdma_fuzz::vfio_user_stream::run(data));
