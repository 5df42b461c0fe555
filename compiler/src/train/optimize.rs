//! The optimisation pipeline of a fused training graph (`fused.rs`): the inference passes
//! that stay valid when the graph also computes gradients and updates, run with the
//! verifier after each (`passes::run_pipeline`).
//!
//! Why each pass is safe here, and why the others are left out:
//! - fold-constants: evaluates only nodes whose inputs are all constants; parameters are
//!   graph inputs, so nothing trained is folded.
//! - merge-reshapes: value-preserving; the intermediate reshape stays while backward reads it.
//! - fold-padded-gradient-sums: value-preserving up to the order of one addition per
//!   element (see the pass).
//! - fuse-epilogue: fuses a node into its producer only when the producer's value has no
//!   other reader and is not a graph output, so a pre-activation value that a gradient rule
//!   reads (ReLU's mask, BatchNorm's normalised value) keeps its buffer.
//! - matmul-as-conv: value-preserving (reshapes and a 1x1 convolution computing the same
//!   product); it is what puts the weight gradients (one MatMul over stacked taps) on the
//!   GEMM microkernel.
//! - choose-schedule: data only (kernel family and tiles); schedule-weight-gradients
//!   then retiles the weight-gradient correlations (data only as well).
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
        FOLD_PADDED_GRADIENT_SUMS,
        passes::fuse_epilogue::PASS,
        passes::matmul_as_conv::PASS,
        passes::choose_schedule::PASS,
        SCHEDULE_WEIGHT_GRADIENTS,
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

/// A strided 1x1 convolution's input gradient (a ResNet downsample) is its one phase
/// zero-padded to the input's extent, `reshape(pad(c))`; summed with the gradient of a
/// strided 3x3 convolution over the same input, which interleaves its phases by concats,
/// the padding writes a tensor of mostly zeros and the sum reads both again. Where the
/// padded region of `c` is exactly the first concat piece (pads only at the end, every
/// concat on the way into it single-reader), `c` is added to that piece instead (which
/// fuse-epilogue then makes the phase convolution's residual epilogue) and the sum
/// becomes the interleaved tensor. Each element is still the same two terms added.
pub const FOLD_PADDED_GRADIENT_SUMS: Pass = Pass {
    name: "fold-padded-gradient-sums",
    summary: "add a zero-padded gradient into the matching concat piece of the other term instead of summing whole tensors",
    run: fold_padded_gradient_sums,
};

/// One sum to fold: the add node, the concat that reads the first piece, that piece,
/// the unpadded term, and the interleaved term that replaces the sum.
struct PaddedSum {
    add: usize,
    concat: usize,
    piece: cnnc_ir::ValueId,
    unpadded: cnnc_ir::ValueId,
    interleaved: cnnc_ir::ValueId,
}

fn fold_padded_gradient_sums(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    while let Some(sum) = find_padded_sum(g) {
        fold_padded_sum(g, sum);
    }
    Ok(())
}

fn find_padded_sum(g: &Graph) -> Option<PaddedSum> {
    use cnnc_ir::{BinaryFn, Op, PadMode, Scalar};
    let producers = g.producers();
    let users = g.users();
    let outputs: std::collections::HashSet<cnnc_ir::ValueId> = g.outputs.iter().copied().collect();
    let only_reader = |v: cnnc_ir::ValueId| users[v.index()].len() == 1 && !outputs.contains(&v);
    let producer = |v: cnnc_ir::ValueId| producers[v.index()].map(|i| (i, &g.nodes[i]));
    for (add, node) in g.nodes.iter().enumerate() {
        if node.op != Op::Binary(BinaryFn::Add) || !node.epilogue.is_empty() || node.inputs.len() != 2 {
            continue;
        }
        for (padded, other) in [(node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])] {
            if g.ty(padded) != g.ty(other) || !only_reader(padded) || !only_reader(other) {
                continue;
            }
            let Some((_, Op::Reshape)) = producer(padded).map(|(i, n)| (i, &n.op)) else { continue };
            let pad_out = producer(padded)?.1.inputs[0];
            let Some((_, pad)) = producer(pad_out) else { continue };
            let Op::Pad { begins, mode: PadMode::Constant(Scalar::F32(zero)), .. } = &pad.op else { continue };
            if *zero != 0.0 || zero.is_sign_negative() || begins.iter().any(|&b| b != 0) || !only_reader(pad_out) || !pad.epilogue.is_empty() {
                continue;
            }
            let unpadded = pad.inputs[0];
            let Some((_, Op::Reshape)) = producer(other).map(|(i, n)| (i, &n.op)) else { continue };
            let interleaved_source = producer(other)?.1.inputs[0];
            if g.ty(interleaved_source) != g.ty(pad_out) || !only_reader(interleaved_source) {
                continue;
            }
            // Into the first piece of each concat until the unpadded term's shape.
            let mut current = interleaved_source;
            let mut innermost = None;
            while g.ty(current).shape != g.ty(unpadded).shape {
                let Some((i, concat)) = producer(current) else { break };
                if !matches!(concat.op, Op::Concat { .. }) || !concat.epilogue.is_empty() || !only_reader(current) {
                    break;
                }
                innermost = Some(i);
                current = concat.inputs[0];
            }
            let Some(concat) = innermost else { continue };
            let defined_before = producers[unpadded.index()].is_none_or(|p| p < concat);
            if g.ty(current) != g.ty(unpadded) || !only_reader(current) || !defined_before {
                continue;
            }
            return Some(PaddedSum { add, concat, piece: current, unpadded, interleaved: other });
        }
    }
    None
}

fn fold_padded_sum(g: &mut Graph, sum: PaddedSum) {
    use cnnc_ir::{BinaryFn, Node, Op};
    let producers = g.producers();
    let reshape_of = |g: &Graph, v: cnnc_ir::ValueId| {
        producers[v.index()].filter(|&i| g.nodes[i].op == Op::Reshape && g.nodes[i].epilogue.is_empty())
    };
    let defined_before = |v: cnnc_ir::ValueId, at: usize| producers[v.index()].is_none_or(|p| p < at);
    // Add before the reshapes to the unit-axis form when both sides have one (the
    // piece's reshape then reads the sum), so that the sum can become the producing
    // convolution's epilogue; else add the unit-axis forms right before the concat.
    let (at, a, b, reader) = match (reshape_of(g, sum.piece), reshape_of(g, sum.unpadded)) {
        (Some(r), Some(u)) => {
            let (a, b) = (g.nodes[r].inputs[0], g.nodes[u].inputs[0]);
            if g.ty(a) == g.ty(b) && defined_before(b, r) { (r, a, b, r) } else { (sum.concat, sum.piece, sum.unpadded, sum.concat) }
        }
        _ => (sum.concat, sum.piece, sum.unpadded, sum.concat),
    };
    let output = g.add_value(g.ty(a).clone(), "grad.folded_sum");
    let summed = Node {
        name: "grad.folded_sum".to_string(),
        op: Op::Binary(BinaryFn::Add),
        inputs: vec![a, b],
        outputs: vec![output],
        epilogue: vec![],
        schedule: Default::default(),
    };
    for input in g.nodes[reader].inputs.iter_mut().filter(|v| **v == a) {
        *input = output;
    }
    // The sum (after the concat that reads the interleaved term) becomes a reshape of it;
    // the pad and its reshape are left to dead-code elimination.
    let add = &mut g.nodes[sum.add];
    add.op = Op::Reshape;
    add.inputs = vec![sum.interleaved];
    g.nodes.insert(at, summed);
}

/// The weight-gradient correlations of `rules_window::channels_last_weight_gradient`
/// (x channels-last as one image [1, N, *in, C] with dy as the weight [M, N, *out, 1],
/// giving [1, M, *k, C]) have few output positions (taps x input channels: 576 to 4608
/// in ResNet-18) and a reduction over the whole batch (N·*out: 784 to 50176 deep), the
/// opposite of a forward convolution, for which choose-schedule's tiles are made. With
/// the positions split into blocks the dy panels are streamed once per block, and each
/// block's im2col gathers from all N images again; one block of every position is
/// cheaper. Measured (perf samples of the weight-gradient convolutions over those of
/// the forward convolutions of the same layers, batch 16, one thread; 64 channels at
/// 56x56: 1.29 -> 1.20 with one block, 1.15 with it and kc 92 (48: 1.13, 368: 1.22);
/// 128 at 28x28: 1.26 -> 1.12 (kc 92: 1.11, 48: 1.13); 256 at 14x14: 1.07 -> 1.01
/// (kc 96: 1.05); 512 at 7x7 within noise (0.83-0.89 either way).
pub const SCHEDULE_WEIGHT_GRADIENTS: Pass = Pass {
    name: "schedule-weight-gradients",
    summary: "one block of every output position for the GEMM weight-gradient correlations (kc halved below 1024 positions)",
    run: schedule_weight_gradients,
};

/// Positions up to which a weight-gradient correlation is packed as one block (the
/// slot then holds kc·positions floats: 3.4 MB at kc 184).
const MAX_ONE_BLOCK_POSITIONS: usize = 4608;

/// Below this many positions the reduction blocks are halved (see the measurements above).
const HALF_DEPTH_BELOW_POSITIONS: usize = 1024;

fn schedule_weight_gradients(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    for i in 0..g.nodes.len() {
        let Some(positions) = weight_gradient_positions(g, &g.nodes[i]) else { continue };
        if g.nodes[i].schedule.kernel != "gemm" || positions > MAX_ONE_BLOCK_POSITIONS {
            continue;
        }
        for (name, value) in g.nodes[i].schedule.tiles.iter_mut() {
            match name.as_str() {
                "nc" => *value = positions,
                "kc" if positions < HALF_DEPTH_BELOW_POSITIONS => *value = (*value / 2).max(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// The output positions of `node` if it is a weight-gradient correlation: an ungrouped
/// convolution of one image whose weight has a one-tap innermost axis along which the
/// image and the output agree (the input channels, carried through as positions).
fn weight_gradient_positions(g: &Graph, node: &cnnc_ir::Node) -> Option<usize> {
    let cnnc_ir::Op::Conv(geometry) = &node.op else { return None };
    let (x, w, y) = (g.ty(*node.inputs.first()?), g.ty(*node.inputs.get(1)?), g.ty(*node.outputs.first()?));
    let rank = y.shape.len();
    let carried = rank >= 4
        && geometry.groups == 1
        && x.shape.len() == rank
        && w.shape.len() == rank
        && x.shape[0] == 1
        && w.shape[rank - 1] == 1
        && x.shape[rank - 1] == y.shape[rank - 1]
        && geometry.strides.last() == Some(&1);
    carried.then(|| y.shape[2..].iter().product())
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

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{ConvGeometry, Op, TensorType};

    /// A convolution and its weight gradient (the channels-last correlation), optimised.
    fn conv_with_weight_gradient(channels: usize, size: usize) -> Graph {
        let mut g = Graph::new("f");
        let x = g.add_input(TensorType::f32(vec![2, channels, size, size]), "x");
        let w = g.add_input(TensorType::f32(vec![8, channels, 3, 3]), "w");
        let geometry = ConvGeometry { strides: vec![1, 1], dilations: vec![1, 1], pads_begin: vec![1, 1], pads_end: vec![1, 1], groups: 1 };
        let y = g.push1("conv", Op::Conv(geometry), &[x, w]).unwrap();
        let seed = g.add_input(g.ty(y).clone(), "seed");
        let grads = crate::train::backward(&mut g, &[(y, seed)], &[w]).unwrap();
        g.outputs = vec![y, grads[0]];
        optimize_training_graph(&mut g, &PassContext { target: passes::TargetDesc::fixed_for_tests() }).unwrap();
        g
    }

    /// The input gradient of a strided 3x3 convolution and a strided 1x1 convolution
    /// (a ResNet block with its downsample) reading the same x.
    fn strided_pair_input_gradient() -> (Graph, Vec<cnnc_ir::Tensor>) {
        let mut g = Graph::new("f");
        let x = g.add_input(TensorType::f32(vec![2, 16, 8, 6]), "x");
        let w3 = g.add_input(TensorType::f32(vec![16, 16, 3, 3]), "w3");
        let w1 = g.add_input(TensorType::f32(vec![16, 16, 1, 1]), "w1");
        let strided = |k: usize| ConvGeometry { strides: vec![2, 2], dilations: vec![1, 1], pads_begin: vec![k / 2; 2], pads_end: vec![k / 2; 2], groups: 1 };
        let y3 = g.push1("conv3", Op::Conv(strided(3)), &[x, w3]).unwrap();
        let y1 = g.push1("conv1", Op::Conv(strided(1)), &[x, w1]).unwrap();
        let (s3, s1) = (g.add_input(g.ty(y3).clone(), "seed3"), g.add_input(g.ty(y1).clone(), "seed1"));
        let grads = crate::train::backward(&mut g, &[(y3, s3), (y1, s1)], &[x]).unwrap();
        g.outputs = grads;
        let mut state = 7u64;
        let inputs = g
            .inputs
            .iter()
            .map(|&v| {
                let shape = g.ty(v).shape.clone();
                let n = shape.iter().product();
                cnnc_ir::Tensor::f32(shape, (0..n).map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                }).collect())
            })
            .collect();
        (g, inputs)
    }

    #[test]
    fn padded_downsample_gradient_joins_the_first_phase() {
        let (g, inputs) = strided_pair_input_gradient();
        let count = |g: &Graph, f: &dyn Fn(&Op) -> bool| g.nodes.iter().filter(|n| f(&n.op)).count();
        assert_eq!(count(&g, &|op| matches!(op, Op::Pad { .. })), 1, "the 1x1 gradient is no longer a padded phase");
        let mut optimized = g.clone();
        optimize_training_graph(&mut optimized, &PassContext { target: passes::TargetDesc::fixed_for_tests() }).unwrap();
        assert_eq!(count(&optimized, &|op| matches!(op, Op::Pad { .. })), 0);
        // The sum is the first phase convolution's residual epilogue.
        assert!(optimized.nodes.iter().any(|n| matches!(n.op, Op::Conv(_)) && n.epilogue.len() == 1 && n.inputs.len() == 3));
        let want = cnnc_ir::interp::run(&g, &inputs).unwrap();
        let got = cnnc_codegen::jit::JitModel::compile(&optimized).unwrap().run(&inputs).unwrap();
        let (got, want) = (got[0].data.as_f32().unwrap(), want[0].data.as_f32().unwrap());
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * scale, "element {i}: compiled {a}, interpreter {b}");
        }
    }

    fn tile(node: &cnnc_ir::Node, name: &str) -> usize {
        node.schedule.tiles.iter().find(|(n, _)| n == name).map(|&(_, v)| v).unwrap()
    }

    #[test]
    fn weight_gradient_correlations_pack_every_position_in_one_block() {
        let g = conv_with_weight_gradient(64, 12);
        let convs: Vec<&cnnc_ir::Node> = g.nodes.iter().filter(|n| matches!(n.op, Op::Conv(_))).collect();
        let (gradients, forward): (Vec<_>, Vec<_>) = convs.into_iter().partition(|n| weight_gradient_positions(&g, n).is_some());
        assert_eq!((gradients.len(), forward.len()), (1, 1));
        let correlation = gradients[0];
        // [1, 8, 3, 3, 64]: 576 positions; the depth 2·12·12 = 288 caps kc first.
        assert_eq!(g.ty(correlation.outputs[0]).shape, vec![1, 8, 3, 3, 64]);
        assert_eq!(tile(correlation, "nc"), 576);
        let default = passes::choose_schedule::conv_schedule(
            &passes::choose_schedule::ConvShape { in_channels: 2, out_channels: 8, groups: 1, reduction: 2 * 12 * 12, positions: 576 },
            &passes::TargetDesc::fixed_for_tests(),
        );
        let default_kc = default.tiles.iter().find(|(n, _)| n == "kc").unwrap().1;
        assert_eq!(tile(correlation, "kc"), default_kc / 2);
        // The forward convolution keeps choose-schedule's tiles.
        let forward_shape = passes::choose_schedule::ConvShape { in_channels: 64, out_channels: 8, groups: 1, reduction: 64 * 9, positions: 144 };
        assert_eq!(forward[0].schedule, passes::choose_schedule::conv_schedule(&forward_shape, &passes::TargetDesc::fixed_for_tests()));
    }

    #[test]
    fn many_positions_keep_their_blocks() {
        // A 3x3 kernel over 1024 channels: 9216 positions, more than one block holds.
        let g = conv_with_weight_gradient(1024, 6);
        let correlation = g.nodes.iter().find(|n| weight_gradient_positions(&g, n).is_some()).unwrap();
        assert_eq!(correlation.schedule.kernel, "gemm");
        assert_eq!(weight_gradient_positions(&g, correlation), Some(9216));
        assert!(tile(correlation, "nc") < 9216);
    }
}
