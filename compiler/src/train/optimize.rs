//! The optimisation pipeline of a fused training graph (`fused.rs`): the inference passes
//! that stay valid when the graph also computes gradients and updates, run with the
//! verifier after each (`passes::run_pipeline`).
//!
//! Why each pass is safe here, and why the others are left out:
//! - fold-constants: evaluates only nodes whose inputs are all constants; parameters are
//!   graph inputs, so nothing trained is folded.
//! - merge-reshapes: value-preserving; the intermediate reshape stays while backward reads it.
//! - fuse-epilogue: fuses a node into its producer only when the producer's value has no
//!   other reader and is not a graph output, so a pre-activation value that a gradient rule
//!   reads (ReLU's mask, BatchNorm's normalised value) keeps its buffer.
//! - matmul-as-conv: value-preserving (reshapes and a 1x1 convolution computing the same
//!   product); it is what puts the weight gradients (one MatMul over stacked taps) on the
//!   GEMM microkernel.
//! - choose-schedule: data only (kernel family and tiles).
//! - eliminate-dead-code: keeps every graph input and output (the ABI's state, data, labels
//!   and hyper-parameters), so the state layout is unchanged.
//! - fold-batchnorm is left out: in training, BatchNorm normalises with batch statistics,
//!   which are not per-channel constants after the convolution.

use cnnc_ir::Graph;

use crate::passes::{self, Pass, PassContext, PassError};

/// The training pipeline, in order (fusion before scheduling, dead code last, as in
/// `passes::inference_pipeline`).
pub fn training_pipeline() -> Vec<Pass> {
    vec![
        passes::fold_constants::PASS,
        SHARE_COMMON_SUBEXPRESSIONS,
        passes::merge_reshapes::PASS,
        passes::fuse_epilogue::PASS,
        passes::matmul_as_conv::PASS,
        passes::choose_schedule::PASS,
        passes::eliminate_dead_code::PASS,
    ]
}

/// The training graph computes some values twice: the running statistics' batch mean and
/// variance repeat the forward normalisation's nodes (`model.rs` builds them apart from the
/// frontend's lowering), and gradient rules rebuild transposes and masks of one value.
pub const SHARE_COMMON_SUBEXPRESSIONS: Pass = Pass {
    name: "share-common-subexpressions",
    summary: "a node identical to an earlier one (op, inputs, epilogue, types) reads the earlier one's outputs",
    run: share_common_subexpressions,
};

/// Nodes whose outputs are graph outputs stay (their values carry the interface's names);
/// the duplicates left without readers go in dead-code elimination.
fn share_common_subexpressions(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    use std::collections::HashMap;
    let is_output: Vec<bool> = {
        let mut v = vec![false; g.values.len()];
        for &o in &g.outputs {
            v[o.index()] = true;
        }
        v
    };
    let mut renamed: Vec<cnnc_ir::ValueId> = (0..g.values.len()).map(|i| cnnc_ir::ValueId(i as u32)).collect();
    let mut seen: HashMap<String, Vec<cnnc_ir::ValueId>> = HashMap::new();
    for i in 0..g.nodes.len() {
        for k in 0..g.nodes[i].inputs.len() {
            let v = g.nodes[i].inputs[k];
            g.nodes[i].inputs[k] = renamed[v.index()];
        }
        let node = &g.nodes[i];
        if matches!(node.op, cnnc_ir::Op::Constant(_)) || node.outputs.is_empty() {
            continue;
        }
        // Debug text is exact for the attributes (floats print round-trippably, -0 and NaN
        // distinctly), and node names are left out on purpose.
        let types: Vec<&cnnc_ir::TensorType> = node.outputs.iter().map(|&o| g.ty(o)).collect();
        let key = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}",
            node.op, node.inputs, node.epilogue, node.schedule, types
        );
        match seen.get(&key) {
            Some(earlier) if !node.outputs.iter().any(|o| is_output[o.index()]) => {
                for (&o, &e) in node.outputs.iter().zip(earlier) {
                    renamed[o.index()] = e;
                }
            }
            Some(_) => {}
            None => {
                seen.insert(key, node.outputs.clone());
            }
        }
    }
    for o in &mut g.outputs {
        *o = renamed[o.index()];
    }
    Ok(())
}

/// Runs `training_pipeline` on `g` (a fused training step) for the host-independent
/// description in `ctx`. Graph inputs and outputs keep their order, types and names.
pub fn optimize_training_graph(g: &mut Graph, ctx: &PassContext) -> Result<(), PassError> {
    let (inputs, outputs) = (interface(g, &g.inputs), interface(g, &g.outputs));
    passes::run_pipeline(g, &training_pipeline(), ctx, |_, _| {})?;
    if interface(g, &g.inputs) != inputs || interface(g, &g.outputs) != outputs {
        return Err(PassError {
            pass: "training pipeline",
            message: "the graph's inputs or outputs changed".into(),
        });
    }
    Ok(())
}

/// The (name, type) of each of `values`: what the state layout and the ABI see.
fn interface(g: &Graph, values: &[cnnc_ir::ValueId]) -> Vec<(String, cnnc_ir::TensorType)> {
    values
        .iter()
        .map(|&v| (g.values[v.index()].name.clone(), g.ty(v).clone()))
        .collect()
}

/// `optimize_training_graph` for code generation on `target`. When the environment
/// variable `CNNC_DUMP_TRAIN_GRAPH` names a file, the optimised graph is printed there
/// (node i is kernel `cnnc_k<i>_*` in profiles).
pub fn optimize_for_target(g: &mut Graph, target: &cnnc_codegen::TargetSpec) -> Result<(), String> {
    let ctx = PassContext {
        target: passes::TargetDesc::from_target(target),
    };
    optimize_training_graph(g, &ctx).map_err(|e| e.to_string())?;
    if let Some(path) = std::env::var_os("CNNC_DUMP_TRAIN_GRAPH") {
        std::fs::write(
            &path,
            cnnc_ir::print_with(
                g,
                &cnnc_ir::PrintOptions {
                    elide_constant_data: true,
                },
            ),
        )
        .map_err(|e| format!("writing the training graph to {}: {e}", path.to_string_lossy()))?;
    }
    Ok(())
}
