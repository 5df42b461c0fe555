//! cnnc: the compiler driver -- passes, the pipeline, and the command line.
//! Frontends live in `cnnc-onnx`, code generation in `cnnc-codegen`, the IR in
//! `cnnc-ir`, the ABI and loader in `cnnc-runtime`.

pub mod cli;
pub use cnnc_ir::compare;
pub mod driver;
pub mod header;
pub mod passes;
pub mod train;
pub mod verify;
