//! Helpers for vxnat's integration tests. Integration tests live in `tests/tests/`.

pub mod netns;
pub mod pods;

pub mod worker;
