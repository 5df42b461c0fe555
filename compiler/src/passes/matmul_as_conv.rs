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
//! the convolution when its operands address the same elements there: without batches
//! operands of at most [M, N] (which broadcast to [1, M, N] alike), with batches only
//! operands that vary along N alone (a bias); otherwise the product is left alone.
//!
//! Left alone: other dtypes, batched B, products that `kernels/gemv.rs` takes (a
//! constant B with few rows streams B once, faster than any packing), and products too
//! small for packing to pay, too narrow for a register tile, or with so few columns
//! that packing a large A costs more than it saves (`THRESHOLDS`).
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

/// When a product is worth rewriting. Measured single-threaded on Zen 5 (AVX2), each
/// product alone with both operands graph inputs (`cnnc bench` on a one-MatMul model,
/// the direct kernel against this path): 64x64x64 2.0x faster here, 128^3 2.4x,
/// 576x4096x64 1.8x, 1152x12544x128 3.3x, 4608x784x512 4.0x, 16x1024x16 1.35x; but
/// 8x4096x8 4x slower and, with a wide A and 16 columns, 144x65536x16 1.75x slower
/// (packing the 38 MB of A costs more than the 16 uses of each element save);
/// 288x16384x32 about even.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Multiply-adds below which a product stays on `kernels/matmul.rs`: packing both
    /// operands and dispatching tasks costs more than the faster tile saves.
    pub min_macs: usize,
    /// Rows (A's batches folded in) and columns below which a product stays: a 6x16
    /// tile would be mostly padding.
    pub min_rows: usize,
    pub min_columns: usize,
    /// Below this many columns, A is packed for few uses of each element, which pays
    /// only while A stays in the caches: ...
    pub narrow_columns: usize,
    /// ... at most this many elements (rows x depth).
    pub max_narrow_a_elements: usize,
}

/// What the pipelines use.
pub const THRESHOLDS: Thresholds =
    Thresholds { min_macs: 1 << 18, min_rows: 4, min_columns: 16, narrow_columns: 32, max_narrow_a_elements: 1 << 18 };

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
    let narrow_and_wide = columns < limits.narrow_columns && rows * depth > limits.max_narrow_a_elements;
    if rows < limits.min_rows
        || columns < limits.min_columns
        || depth == 0
        || rows * depth * columns < limits.min_macs
        || narrow_and_wide
    {
        return None;
    }
    if cnnc_codegen::kernels::gemv::plan(g, node).is_some() {
        return None;
    }
    // The operands address [rows, columns] from the right, leading 1s aside.
    let operand_axes = if batched { 1 } else { 2 };
    if !epilogue_fits(g, node, operand_axes) {
        return None;
    }
    Some(Rewrite { rows, depth, columns })
}

/// Every binary step's operand, leading 1s aside, has at most `axes` axes: the last
/// ones of C, which the convolution's [1, rows, columns] output has alike (and no more
/// axes than that output in all).
fn epilogue_fits(g: &Graph, node: &Node, axes: usize) -> bool {
    node.epilogue.iter().all(|step| match step {
        EpilogueStep::Unary(_) => true,
        EpilogueStep::Binary { operand, .. } => {
            let shape = &g.ty(node.inputs[*operand]).shape;
            shape.len() <= 3 && shape.iter().skip_while(|&&e| e == 1).count() <= axes
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
        let Some(shapes) = rewrite_of(g, &g.nodes[i], limits) else {
            continue;
        };
        rewritten += 1;
        let node = g.nodes[i].clone();
        let constant_of = |v: ValueId| {
            producers[v.index()].and_then(|p| match g.nodes[p].op {
                Op::Constant(c) => Some(c),
                _ => None,
            })
        };
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
        let geometry =
            ConvGeometry { strides: vec![1], dilations: vec![1], pads_begin: vec![0], pads_end: vec![0], groups: 1 };
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
