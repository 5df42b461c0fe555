//! One emitter per op family. Each writes the body of a node's kernel into an open
//! block of a Cranelift function; shapes are compile-time constants.
//!
//! `emit_node` is the dispatcher: it runs the op's emitter, then applies the node's
//! epilogue in place (emitters ignore `node.epilogue`). Ops that need read-only
//! tables besides their inputs (Resample) get them from `node_tables`, passed to the
//! kernel after its outputs.
//!
//! Convolutions that run as GEMM on the microkernel (`conv_gemm`, with `gemm/` and
//! the thread split of `parallel`) are more than one function body; `module.rs`
//! defines them through `conv_gemm::define_node` instead of `emit_node`. So are large
//! channel-separable nodes (depthwise convolutions, pooling), which `channel_split`
//! cuts into per-chunk tasks that each run `emit_node` on a chunk-sized node.

use cnnc_ir::{ConstValue, Graph, Node, Op};
use cranelift_codegen::ir::Value;
use cranelift_frontend::FunctionBuilder;

pub mod channel_split;
pub mod compute;
pub mod conv;
pub mod conv_blocked;
pub mod conv_direct_blocked;
pub mod conv_gemm;
pub mod conv_transpose;
pub mod conv_transpose_depthwise;
pub mod conv_weight_grad;
pub mod depthwise;
pub mod depthwise_blocked;
pub mod depthwise_weight_grad;
pub mod elementwise;
pub mod gather;
pub mod gemm;
pub mod gemv;
pub mod map;
pub mod matmul;
pub mod movement;
pub mod parallel;
pub mod pool;
pub mod pool_blocked;
pub mod pool_grad;
pub mod random;
pub mod reduce;
pub mod reorder;
pub mod resample;

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

/// Whether the node runs code at all: dense constants are data, nothing else.
pub fn needs_kernel(g: &Graph, node: &Node) -> bool {
    match node.op {
        Op::Constant(c) => !matches!(g.constants.get(c.index()).map(|k| &k.value), Some(ConstValue::Dense(_))),
        _ => true,
    }
}

/// Read-only tables the node's kernel reads besides its inputs, in the order
/// `emit_node` expects their addresses.
pub fn node_tables(g: &Graph, node: &Node) -> Vec<Vec<u8>> {
    match node.op {
        Op::Resample { .. } => resample::tables(g, node).into_iter().collect(),
        _ => Vec::new(),
    }
}

/// Emits the node's whole computation (op, then epilogue). `tables` are the addresses
/// of `node_tables(graph, node)`.
///
/// Inputs past `cnnc_ir::verify::op_input_count` are operands only the epilogue reads
/// (a residual added after a convolution): the op's emitter sees a node without them.
/// The node's declared output type is checked against the typing rules first, so no
/// emitter ever trusts an inconsistent graph with its buffer sizes.
pub fn emit_node(k: &mut KernelCtx, tables: &[Value]) -> Result<(), CodegenError> {
    if k.inputs.len() != k.node.inputs.len() || k.outputs.len() != k.node.outputs.len() || k.outputs.is_empty() {
        return Err(CodegenError(format!(
            "node '{}': kernel got {} inputs / {} outputs for {} / {}",
            k.node.name,
            k.inputs.len(),
            k.outputs.len(),
            k.node.inputs.len(),
            k.node.outputs.len()
        )));
    }
    check_node(k.graph, k.node)?;
    check_layout_supported(k.graph, k.node)?;
    if !k.node.epilogue.is_empty() && applies_own_epilogue(k.graph, k.node) {
        return emit_op(k, tables);
    }
    let op_inputs = cnnc_ir::verify::op_input_count(k.node);
    if op_inputs < k.node.inputs.len() {
        let mut op_node = k.node.clone();
        op_node.inputs.truncate(op_inputs);
        let mut op_ctx = KernelCtx {
            b: &mut *k.b,
            graph: k.graph,
            node: &op_node,
            inputs: k.inputs[..op_inputs].to_vec(),
            outputs: k.outputs.clone(),
        };
        emit_op(&mut op_ctx, tables)?;
    } else {
        emit_op(k, tables)?;
    }
    elementwise::emit_epilogue(k)
}

/// Nodes whose emitter applies the epilogue to each value while it is in registers (it
/// then sees the epilogue operands among its inputs); the others get one more pass over
/// the output (`elementwise::emit_epilogue`).
fn applies_own_epilogue(g: &Graph, node: &Node) -> bool {
    match node.op {
        Op::Unary(_) | Op::Binary(_) => true,
        Op::Concat { .. } => movement::concat_applies_epilogue(g, node),
        Op::Conv(_) => depthwise::handles(g, node) || crate::microkernel::conv_rows_x86::applies_epilogue(g, node),
        _ => false,
    }
}

/// Whether the node's emitter implements its blocked layout (a layout chosen by a pass
/// for an op without a blocked kernel is a codegen error, not a verifier error). Plain
/// nodes always pass.
pub fn blocked_kernel_exists(g: &Graph, node: &Node) -> bool {
    match node.op {
        Op::Reorder | Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } => true,
        Op::Reduce { .. } => pool_blocked::supports_global_reduce(g, node),
        Op::Pool(_) => pool_blocked::supports_pool(g, node),
        Op::Concat { .. } => movement::supports_blocked_concat(g, node),
        _ => false,
    }
}

fn check_layout_supported(g: &Graph, node: &Node) -> Result<(), CodegenError> {
    let s = &node.schedule;
    let plain = s.layout_in == cnnc_ir::Layout::Plain && s.layout_out == cnnc_ir::Layout::Plain;
    if plain || blocked_kernel_exists(g, node) {
        return Ok(());
    }
    Err(CodegenError(format!(
        "{} node '{}': no kernel for layout {:?} -> {:?}",
        node.op.mnemonic(),
        node.name,
        s.layout_in,
        s.layout_out
    )))
}

/// Checks the node's declared output types against the typing rules of its op.
pub fn check_node(g: &Graph, node: &Node) -> Result<(), CodegenError> {
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    let in_types: Vec<&cnnc_ir::TensorType> = node.inputs[..op_inputs].iter().map(|&v| g.ty(v)).collect();
    let declared: Vec<cnnc_ir::TensorType> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
    cnnc_ir::infer::output_types(&node.op, &in_types, &g.constants, Some(&declared))
        .map_err(|e| CodegenError(format!("node '{}' is inconsistent: {e}", node.name)))?;
    Ok(())
}

/// The op alone, by family.
fn emit_op(k: &mut KernelCtx, tables: &[Value]) -> Result<(), CodegenError> {
    match k.node.op.clone() {
        Op::Constant(c) => match k.graph.constants.get(c.index()).map(|x| x.value.clone()) {
            Some(ConstValue::Splat(v)) => {
                let n = k.graph.ty(k.node.outputs[0]).numel();
                movement::emit_fill(k.b, k.outputs[0], n, v);
                Ok(())
            }
            Some(ConstValue::Dense(_)) => Err(CodegenError(format!(
                "constant node '{}' is data and has no kernel",
                k.node.name
            ))),
            None => Err(CodegenError(format!(
                "node '{}' names missing constant {c}",
                k.node.name
            ))),
        },
        Op::Unary(f) => elementwise::emit_unary(k, f),
        Op::Binary(f) => elementwise::emit_binary(k, f),
        Op::Where => elementwise::emit_where(k),
        Op::Cast { to } => elementwise::emit_cast(k, to),
        Op::MatMul => matmul::emit(k),
        // Bias and epilogue in registers.
        Op::Conv(_) if depthwise::handles(k.graph, k.node) => depthwise::emit(k),
        Op::Conv(_) => conv::emit(k),
        Op::ConvTranspose(_) => conv_transpose::emit(k),
        Op::Pool(_) if k.node.schedule.layout_in != cnnc_ir::Layout::Plain => pool_blocked::emit_pool(k),
        Op::Pool(_) => pool::emit(k),
        Op::PoolGrad(_) => pool_grad::emit(k),
        Op::ConvWeightGrad(_) if depthwise_weight_grad::handles(k.graph, k.node) => depthwise_weight_grad::emit(k),
        Op::ConvWeightGrad(_) => conv_weight_grad::emit(k),
        Op::RandomUniform { .. } => random::emit(k),
        Op::Reduce { .. } => reduce::emit_reduce(k),
        Op::ArgReduce { .. } => reduce::emit_arg_reduce(k),
        Op::Reshape | Op::Transpose { .. } | Op::Slice { .. } | Op::Pad { .. } | Op::Concat { .. } | Op::Broadcast => {
            movement::emit(k)
        }
        Op::Reorder => reorder::emit(k),
        Op::Gather { axis } => gather::emit_gather(k, axis),
        Op::GatherElements { axis } => gather::emit_gather_elements(k, axis),
        Op::Resample { .. } => match tables.first() {
            Some(&t) => resample::emit(k, t),
            None => Err(CodegenError(format!("resample '{}' got no table", k.node.name))),
        },
    }
}
