//! The fuzz targets' bodies, one module per input the server takes from someone it does not
//! trust (docs/fuzzing.md). Each `run` takes the fuzzer's bytes and drives the real code with
//! them; a panic, a hang or a leak there is a finding. The binaries in `fuzz_targets/` hand
//! libFuzzer's inputs to these functions, and `tests/corpus.rs` replays every checked-in
//! input through them, so a crash found once stays a regression test.

pub mod device_host;
pub mod device_model;
pub mod input;
pub mod seeds;
pub mod tcp_frames;
pub mod vfio_user_stream;
