//! Service NAT building blocks: the TIME_WAIT-safe SNAT port allocator and Maglev backend
//! selection. (DNAT/SNAT rewriting in the pipeline and the Service tables build on these.)

pub mod maglev;
pub mod seqadj;
pub mod service;
pub mod snat;
