//! Service NAT building blocks: the TIME_WAIT-safe SNAT port allocator, Maglev backend
//! selection, the bounded ClientIP affinity table and the translations of fragmented
//! datagrams. (DNAT/SNAT rewriting in the pipeline and
//! the Service tables build on these.)

pub mod affinity;
pub mod fragments;
pub mod maglev;
pub mod seqadj;
pub mod service;
pub mod snat;
