//! Shared fixtures for the benchmarks live in `vxnat_dataplane::pipeline::fixtures`.
