//! Large f32 matrix products as 1x1 convolutions, so that they run on the GEMM
//! microkernel with packing and cache blocking (`kernels/conv_gemm.rs`) instead of the
//! unpacked register tile of `kernels/matmul.rs`.
//!
//! C[M, N] = A[M, K] · B[K, N] is a 1-D convolution of an image of K channels and N
//! positions (B read as [1, K, N]) with M filters of one tap (A read as [M, K, 1]),
//! whose output [1, M, N] is C:
//!
//! ```text
//!   matmul a, b  ->  conv(reshape(b) [1, K, N], reshape(a) [M, K, 1]) [1, M, N]  ->  reshape
//! ```
//!
//! Reshapes cost nothing (the memory plan aliases them); a constant operand is re-typed
//! instead, so constant weights are still packed at compile time. Batches of A fold
//! into M when B has none (A's batches are dense rows). The node's epilogue moves to
//! the convolution when its operands address the same elements there: always without
//! batches ([M, N] and [1, M, N] broadcast alike), with batches only for operands that
//! vary along N alone (a bias).
//!
//! Left alone: other dtypes, batched B, products that `kernels/gemv.rs` takes (a
//! constant B with few rows streams B once, faster than any packing), and products too
//! small for packing to pay or too narrow for a register tile (`THRESHOLDS`).
//! The weight gradients of convolutions in training graphs (`train/rules_window.rs`:
//! stacked taps [T·C, N·P] times dy [N·P, M]) are the products this is for.

use cnnc_ir::{ConvGeometry, DType, EpilogueStep, Graph, Node, Op, Schedule, TensorType, ValueId};

use super::edit::NodeEdits;
use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "matmul-as-conv",
    summary: "large f32 matmuls (B without batches) -> reshape, 1x1 conv on the GEMM microkernel, reshape",
    run,
};

/// When a product is worth rewriting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Multiply-adds below which a product stays on `kernels/matmul.rs`: packing both
    /// operands and dispatching tasks costs more than the faster tile saves.
    pub min_macs: usize,
    /// Rows and columns below which a product stays on `kernels/matmul.rs`: a 6x16
    /// tile would be mostly padding.
    pub min_side: usize,
}

/// What the pipelines use.
pub const THRESHOLDS: Thresholds = Thresholds { min_macs: 1 << 18, min_side: 4 };

/// The shapes of a product this pass rewrites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// Rows of C with A's batches folded in.
    pub rows: usize,
    pub depth: usize,
    pub columns: usize,
}

/// Whether (and as which shapes) `node` runs as a convolution.
pub fn rewrite_of(g: &Graph, node: &Node, limits: &Thresholds) -> Option<Rewrite> {
    if node.op != Op::MatMul || node.outputs.len() != 1 || node.inputs.len() < 2 || !node.schedule.is_default() {
        return None;
    }
    let (a, b, c) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
    if [a, b, c].iter().any(|t| t.dtype != DType::F32 || t.rank() < 2) {
        return None;
    }
    let (m, depth) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
    let columns = b.shape[b.rank() - 1];
    if b.shape[b.rank() - 2] != depth || b.shape[..b.rank() - 2].iter().any(|&e| e != 1) {
        return None;
    }
    let rows = a.shape[..a.rank() - 1].iter().product::<usize>();
    if c.numel() != rows * columns || c.shape[c.rank() - 2] != m || c.shape[c.rank() - 1] != columns {
        return None;
    }
    let batched = rows != m;
    if rows < limits.min_side || columns < limits.min_side || depth == 0 || rows * depth * columns < limits.min_macs {
        return None;
    }
    if cnnc_codegen::kernels::gemv::plan(g, node).is_some() {
        return None;
    }
    if batched && !epilogue_varies_along_columns_only(g, node) {
        return None;
    }
    Some(Rewrite { rows, depth, columns })
}

/// Every binary step's operand, leading 1s aside, has at most the last axis.
fn epilogue_varies_along_columns_only(g: &Graph, node: &Node) -> bool {
    node.epilogue.iter().all(|step| match step {
        EpilogueStep::Unary(_) => true,
        EpilogueStep::Binary { operand, .. } => {
            let shape = &g.ty(node.inputs[*operand]).shape;
            shape.iter().skip_while(|&&e| e == 1).count() <= 1
        }
    })
}

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    rewrite_matmuls(g, &THRESHOLDS);
    Ok(())
}

/// Rewrites every product `rewrite_of` accepts under `limits`; returns how many.
pub fn rewrite_matmuls(g: &mut Graph, limits: &Thresholds) -> usize {
    let producers = g.producers();
    let mut edits = NodeEdits::new(g);
    let mut rewritten = 0;
    for i in 0..g.nodes.len() {
        let Some(shapes) = rewrite_of(g, &g.nodes[i], limits) else { continue };
        rewritten += 1;
        let node = g.nodes[i].clone();
        let constant_of = |v: ValueId| producers[v.index()].and_then(|p| match g.nodes[p].op {
            Op::Constant(c) => Some(c),
            _ => None,
        });
        let (a_constant, b_constant) = (constant_of(node.inputs[0]), constant_of(node.inputs[1]));
        let mut as_shape = |g: &mut Graph, v: ValueId, constant, shape: Vec<usize>, role: &str| -> ValueId {
            let name = format!("{}.{role}", node.name);
            let ty = TensorType::f32(shape);
            match constant {
                // A constant is re-typed (same elements in the same order): the
                // convolution sees a Constant producer and packs it at compile time.
                Some(c) => {
                    let mut retyped = g.constant(c).clone();
                    retyped.ty = ty.clone();
                    retyped.name = name.clone();
                    g.constants.push(retyped);
                    let id = cnnc_ir::ConstId((g.constants.len() - 1) as u32);
                    let value = g.add_value(ty, String::new());
                    edits.insert_before(i, plain_node(name, Op::Constant(id), vec![], value));
                    value
                }
                None => {
                    let value = g.add_value(ty, String::new());
                    edits.insert_before(i, plain_node(name, Op::Reshape, vec![v], value));
                    value
                }
            }
        };
        let image = as_shape(g, node.inputs[1], b_constant, vec![1, shapes.depth, shapes.columns], "image");
        let filters = as_shape(g, node.inputs[0], a_constant, vec![shapes.rows, shapes.depth, 1], "filters");
        let conv_ty = TensorType::f32(vec![1, shapes.rows, shapes.columns]);
        let product = g.add_value(conv_ty, String::new());
        let geometry = ConvGeometry { strides: vec![1], dilations: vec![1], pads_begin: vec![0], pads_end: vec![0], groups: 1 };
        let mut inputs = vec![image, filters];
        inputs.extend_from_slice(&node.inputs[2..]);
        let mut conv = plain_node(format!("{}.conv", node.name), Op::Conv(geometry), inputs, product);
        conv.epilogue = node.epilogue.clone();
        edits.insert_before(i, conv);
        edits.insert_before(i, plain_node(node.name.clone(), Op::Reshape, vec![product], node.outputs[0]));
        edits.remove(i);
    }
    edits.apply(g);
    rewritten
}

fn plain_node(name: String, op: Op, inputs: Vec<ValueId>, output: ValueId) -> Node {
    Node { name, op, inputs, outputs: vec![output], epilogue: vec![], schedule: Schedule::default() }
}
