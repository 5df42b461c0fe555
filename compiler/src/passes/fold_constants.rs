//! Evaluates nodes whose inputs are all constants at compile time, with the
//! reference interpreter, so the artifact computes only what depends on its inputs.

use cnnc_ir::{Graph, Node, Op, Tensor, interp};

use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "fold-constants",
    summary: "evaluate nodes whose inputs are all constants",
    run,
};

/// Folding a node that expands a small constant into a huge one (a Broadcast of a
/// scalar to an activation-sized tensor) would bloat the artifact; such results are
/// kept only when they stay splats or small.
const MAX_FOLDED_DENSE_ELEMENTS: usize = 1 << 20;

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    let mut const_value: Vec<Option<Tensor>> = vec![None; g.values.len()];
    let mut rewritten = Vec::with_capacity(g.nodes.len());
    let nodes = std::mem::take(&mut g.nodes);
    for node in nodes {
        if let Op::Constant(c) = node.op {
            const_value[node.outputs[0].index()] = Some(g.constant(c).to_tensor());
            rewritten.push(node);
            continue;
        }
        let inputs: Option<Vec<&Tensor>> = node.inputs.iter().map(|v| const_value[v.index()].as_ref()).collect();
        let Some(inputs) = inputs.filter(|_| !node.outputs.is_empty()) else {
            rewritten.push(node);
            continue;
        };
        let out_types: Vec<_> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
        // Trailing inputs beyond the op's own are epilogue operands.
        let own = cnnc_ir::verify::op_input_count(&node);
        let mut results = interp::eval(&node.op, &inputs[..own], &out_types, &g.constants)
            .map_err(|e| format!("folding node `{}`: {e}", node.name))?;
        if !node.epilogue.is_empty() {
            interp::apply_epilogue(&mut results[0], &node.epilogue, &inputs)
                .map_err(|e| format!("folding node `{}`: {e}", node.name))?;
        }
        let too_big = results
            .iter()
            .any(|t| t.data.as_splat().is_none() && t.numel() > MAX_FOLDED_DENSE_ELEMENTS && t.numel() > inputs.iter().map(|i| i.numel()).sum());
        if too_big {
            rewritten.push(node);
            continue;
        }
        for (&out, t) in node.outputs.iter().zip(results) {
            rewritten.push(constant_node(g, &node, out, t.clone()));
            const_value[out.index()] = Some(t);
        }
    }
    g.nodes = rewritten;
    Ok(())
}

fn constant_node(g: &mut Graph, from: &Node, out: cnnc_ir::ValueId, t: Tensor) -> Node {
    let name = if from.name.is_empty() { format!("folded{}", out.0) } else { from.name.clone() };
    g.constants.push(cnnc_ir::Constant::from_tensor(name.clone(), t));
    let id = cnnc_ir::ConstId((g.constants.len() - 1) as u32);
    Node {
        name,
        op: Op::Constant(id),
        inputs: vec![],
        outputs: vec![out],
        epilogue: vec![],
        schedule: Default::default(),
    }
}
