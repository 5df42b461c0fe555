//! cnnc's runtime: the C ABI shared with the compiler, a loader for compiled models
//! and the host services (workspace, thread pool) a call needs. It does not depend on
//! the compiler.

pub mod abi;
