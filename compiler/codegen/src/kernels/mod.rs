//! One emitter per op family. Each writes the body of a node's kernel into an open
//! block of a Cranelift function; shapes are compile-time constants.

use cnnc_ir::{Graph, Node};
use cranelift_codegen::ir::Value;
use cranelift_frontend::FunctionBuilder;

pub mod conv;
pub mod conv_transpose;
pub mod matmul;
pub mod pool;
pub mod reduce;

/// What a kernel emitter gets: the node, its graph (for types and constants), and the
/// base addresses (i64 pointers) of its input and output buffers, in node order.
/// Buffers are dense row-major with the value's dtype; outputs never alias inputs.
/// The emitter leaves the builder in an open, unterminated block.
pub struct KernelCtx<'a, 'f> {
    pub b: &'a mut FunctionBuilder<'f>,
    pub graph: &'a Graph,
    pub node: &'a Node,
    pub inputs: Vec<Value>,
    pub outputs: Vec<Value>,
}

/// A node the code generator cannot compile (an internal limitation, reported, not panicked).
#[derive(Debug, Clone, PartialEq)]
pub struct CodegenError(pub String);

impl std::fmt::Display for CodegenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodegenError {}
