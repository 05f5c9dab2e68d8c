//! Property tests of quiesce's untrusted inputs, by a time-bounded mutation fuzzer: backup
//! manifests, scenario files, QMP and agent lines, and VHD and VHDX allocation tables. See `engine` for the budget
//! (`QUIESCE_FUZZ_SECS`) and how to replay a failure.

mod bat;
mod engine;
mod manifest;
mod scenario;
mod wire;

#[global_allocator]
static ALLOC: engine::Counting = engine::Counting;
