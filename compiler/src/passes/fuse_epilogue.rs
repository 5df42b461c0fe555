//! Moves elementwise work that follows a Conv, ConvTranspose or MatMul into that
//! node's epilogue, so the result is transformed while it is still in registers
//! instead of in extra passes over memory: activations (relu, clip, swish, ...),
//! a bias or scale that did not fold into the weights, a residual `add`, a
//! squeeze-and-excite `mul` by [N,C,1,1]. f32 elementwise ops and concatenations are
//! anchors too: a chain of elementwise ops becomes one node (one pass over memory).
//!
//! First, `x * sigmoid(x)` becomes `swish(alpha=1)` and `x * hard_sigmoid(x)` with
//! ONNX HardSwish's constants becomes `hard_swish`, which makes SiLU networks fusable.
//!
//! Then, walking the nodes in order, an elementwise node joins the producer of one of
//! its inputs (the "anchor") when:
//! - the anchor (see `is_anchor`) has one output, read only by this node and not a
//!   graph output (so nobody observes the value before the step);
//! - the node has no epilogue of its own and its result has the anchor's output type
//!   (a binary step's other operand broadcasts to it, never the other way);
//! - a binary step reads the anchor's value as its left operand, or the function is
//!   commutative (add, mul, max, min); comparisons and logic change the dtype and
//!   never fuse;
//! - the other operand is defined before the anchor (a graph input, an earlier node,
//!   or a constant, whose node is then moved before the anchor). When both operands
//!   are anchors (the residual sum of two convolutions), the later one takes the step.
//!
//! The other operand is appended to the anchor's inputs and the step names its index
//! (`cnnc_ir::verify::op_input_count` tells the op's own inputs from such operands).

use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Op, UnaryFn, ValueId};

use super::edit::{NodeEdits, use_counts};
use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "fuse-epilogue",
    summary: "fold activations, bias, residual and scale ops into conv/matmul epilogues",
    run,
};

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    recognise_swish(g);
    fuse_into_anchors(g);
    Ok(())
}

/// Rewrites `mul(x, sigmoid(x))` to `swish(x)` and `mul(x, hard_sigmoid(x))` (ONNX
/// HardSwish's alpha = 1/6, beta = 1/2) to `hard_swish(x)` when the gate has no
/// other reader.
fn recognise_swish(g: &mut Graph) {
    let uses = use_counts(g);
    let producer = g.producers();
    let mut edits = NodeEdits::new(g);
    let mut changed = false;
    for i in 0..g.nodes.len() {
        let node = &g.nodes[i];
        if node.op != Op::Binary(BinaryFn::Mul) || !node.epilogue.is_empty() || node.inputs.len() != 2 {
            continue;
        }
        for side in [0, 1] {
            let (x, gate) = (node.inputs[side], node.inputs[1 - side]);
            let Some(j) = producer[gate.index()] else { continue };
            let gate_node = &g.nodes[j];
            if gate_node.inputs != [x]
                || !gate_node.epilogue.is_empty()
                || uses[gate.index()] != 1
                || edits.is_removed(j)
            {
                continue;
            }
            let fused = match gate_node.op {
                Op::Unary(UnaryFn::Sigmoid) => UnaryFn::Swish { alpha: 1.0 },
                Op::Unary(UnaryFn::HardSigmoid { alpha, beta }) if is_hard_swish_gate(alpha, beta) => {
                    UnaryFn::HardSwish
                }
                _ => continue,
            };
            let node = &mut g.nodes[i];
            node.op = Op::Unary(fused);
            node.inputs = vec![x];
            edits.remove(j);
            changed = true;
            break;
        }
    }
    if changed {
        edits.apply(g);
    }
}

/// HardSwish(x) = x·max(0, min(1, x/6 + 1/2)); exporters write 1/6 in f32.
fn is_hard_swish_gate(alpha: f32, beta: f32) -> bool {
    (alpha - 1.0 / 6.0).abs() <= 1e-6 && beta == 0.5
}

/// Nodes whose kernels apply an epilogue while the value is in registers: the compute
/// ops, and f32 elementwise ops and concatenations, so that chains such as DenseNet's
/// concat -> batch-norm scale -> shift -> relu make one pass over memory instead of four.
fn is_anchor(g: &Graph, node: &cnnc_ir::Node) -> bool {
    let f32_out = || node.outputs.first().is_some_and(|&v| g.ty(v).dtype == DType::F32);
    match node.op {
        Op::Conv(_) | Op::ConvTranspose(_) | Op::MatMul => true,
        Op::Unary(f) => f != UnaryFn::Not && f32_out(),
        Op::Binary(f) => !f.is_comparison() && f32_out(),
        Op::Concat { .. } => f32_out(),
        _ => false,
    }
}

/// Which input positions of a binary node may be the anchor's value: the step always
/// computes `f(anchor value, operand)`.
fn anchor_sides(func: BinaryFn) -> &'static [usize] {
    use BinaryFn::*;
    match func {
        Add | Mul | Max | Min => &[0, 1],
        Sub | Div | Pow | PRelu => &[0],
        Less | LessOrEqual | Greater | GreaterOrEqual | Equal | And | Or | Xor => &[],
    }
}

/// What joins an anchor: the step and, for a binary step, the operand to append.
struct Fusion {
    anchor: usize,
    step: Step,
}

enum Step {
    Unary(UnaryFn),
    Binary { func: BinaryFn, operand: ValueId, operand_producer: Option<usize> },
}

fn fuse_into_anchors(g: &mut Graph) {
    let uses = use_counts(g);
    let mut producer = g.producers();
    let mut edits = NodeEdits::new(g);
    let mut changed = false;
    for i in 0..g.nodes.len() {
        let Some(fusion) = match_fusion(g, i, &uses, &producer) else { continue };
        let a = fusion.anchor;
        let step = match fusion.step {
            Step::Unary(f) => EpilogueStep::Unary(f),
            Step::Binary { func, operand, operand_producer } => {
                if let Some(p) = operand_producer
                    && matches!(g.nodes[p].op, Op::Constant(_))
                {
                    edits.move_constant_before(p, a);
                }
                g.nodes[a].inputs.push(operand);
                EpilogueStep::Binary { func, operand: g.nodes[a].inputs.len() - 1 }
            }
        };
        g.nodes[a].epilogue.push(step);
        // The anchor now defines the fused node's result; its own old output is orphaned
        // and dropped by `apply`.
        let result = g.nodes[i].outputs[0];
        g.nodes[a].outputs[0] = result;
        producer[result.index()] = Some(a);
        edits.remove(i);
        changed = true;
    }
    if changed {
        edits.apply(g);
    }
}

fn match_fusion(g: &Graph, i: usize, uses: &[usize], producer: &[Option<usize>]) -> Option<Fusion> {
    let node = &g.nodes[i];
    if !node.epilogue.is_empty() || node.outputs.len() != 1 {
        return None;
    }
    let fusable_anchor = |v: ValueId| -> Option<usize> {
        let a = producer[v.index()]?;
        let anchor = &g.nodes[a];
        let ok = is_anchor(g, anchor)
            && anchor.outputs.len() == 1
            && anchor.outputs[0] == v
            && uses[v.index()] == 1
            && !g.outputs.contains(&v)
            && g.ty(node.outputs[0]) == g.ty(v);
        ok.then_some(a)
    };
    match node.op {
        Op::Unary(f) if node.inputs.len() == 1 && f != UnaryFn::Not => {
            let anchor = fusable_anchor(node.inputs[0])?;
            Some(Fusion { anchor, step: Step::Unary(f) })
        }
        Op::Binary(func) if node.inputs.len() == 2 => {
            // The later anchor first: the other side is then more likely defined before it.
            let mut candidates: Vec<(usize, usize)> = anchor_sides(func)
                .iter()
                .filter_map(|&side| fusable_anchor(node.inputs[side]).map(|a| (a, side)))
                .collect();
            candidates.sort_by_key(|&(anchor, _)| std::cmp::Reverse(anchor));
            candidates.into_iter().find_map(|(anchor, side)| {
                let operand = node.inputs[1 - side];
                let operand_producer = producer[operand.index()];
                let available = match operand_producer {
                    None => true,
                    Some(p) => p < anchor || matches!(g.nodes[p].op, Op::Constant(_)),
                };
                available.then_some(Fusion { anchor, step: Step::Binary { func, operand, operand_producer } })
            })
        }
        _ => None,
    }
}
