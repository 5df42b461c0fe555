//! Cranelift code generation for cnnc IR graphs.

pub mod kernels;
pub mod loops;
