//! Rewrites of the fused training step that take passes over the activations out of the
//! backward graph the gradient rules build, keeping its values:
//!
//! - activation masks: ReLU's `where(y > 0, g, 0)` and ReLU6's `where(y > 0 & y < hi, g, 0)`
//!   (two to four kernels: comparisons into bool buffers, then the select) as ONE
//!   elementwise chain that reads y and g once: `ceil(clip(y, 0, 1))·g`, and
//!   `ceil(clip((hi − y)·y, 0, 1))·g` for hi >= 1 (see `masked_gradient`);
//! - per-channel dot products: Σ over every axis but the channels of a·b (BatchNorm's
//!   Σ g·x̂ in the backward pass, its Σ (x − mean)² in the forward pass), a Mul that
//!   writes the product and a Reduce that reads it back, as one `ConvWeightGrad` of a
//!   1x1 depthwise convolution (dw[c] = Σ_n Σ_o a[n, c, o]·b[n, c, o]), which streams a
//!   and b once and writes nothing of activation size.
//!
//! - normalised values never stored: x̂ = (x − mean)/σ per channel is read only by products
//!   with per-channel factors (BatchNorm's γ·x̂, the input gradient's x̂·(−Σ(g·x̂)/m)) and by
//!   the per-channel sum Σ g·x̂; each reads the centred x − mean instead, the factor (or the
//!   sum) times 1/σ, so the pass writing x̂ goes and no x̂ buffer lives from the forward to
//!   the backward pass (see `read_centered_instead_of_normalized`).
//!
//! Run on the fused graph before the optimisation pipeline; the nodes left without
//! readers go in dead-code elimination.

use cnnc_ir::{BinaryFn, ConstValue, ConvGeometry, DType, EpilogueStep, Graph, Node, Op, ReduceKind, Scalar, TensorType, UnaryFn, ValueId};

/// Applies every rewrite of this module to `g` (in place; values keep their ids).
pub fn lighten_backward(g: &mut Graph) {
    fuse_activation_masks(g);
    dot_reductions_as_weight_gradients(g);
    read_centered_instead_of_normalized(g);
}

/// The f32 value of a splat constant, if a `Constant` node defines `v` as one.
fn splat_of(g: &Graph, producers: &[Option<usize>], v: ValueId) -> Option<f32> {
    let node = &g.nodes[producers.get(v.index()).copied().flatten()?];
    let Op::Constant(c) = node.op else { return None };
    match g.constant(c).value {
        ConstValue::Splat(Scalar::F32(s)) => Some(s),
        _ => None,
    }
}

/// The node defining `v`, if it has no epilogue (the patterns match the rules' plain ops).
fn plain_producer<'g>(g: &'g Graph, producers: &[Option<usize>], v: ValueId) -> Option<&'g Node> {
    let node = &g.nodes[producers.get(v.index()).copied().flatten()?];
    node.epilogue.is_empty().then_some(node)
}

/// The mask of `where(cond, g, 0)` when cond is `y > 0` (`Some(None)`) or `y > 0 & y < hi`
/// (`Some(Some(hi))`), with y an f32 of g's shape.
fn activation_mask(g: &Graph, producers: &[Option<usize>], cond: ValueId, grad_ty: &TensorType) -> Option<(ValueId, Option<f32>)> {
    let positive = |node: &Node| -> Option<ValueId> {
        (node.op == Op::Binary(BinaryFn::Greater) && splat_of(g, producers, node.inputs[1]) == Some(0.0))
            .then_some(node.inputs[0])
    };
    let node = plain_producer(g, producers, cond)?;
    let (y, hi) = if node.op == Op::Binary(BinaryFn::And) {
        let above = plain_producer(g, producers, node.inputs[0])?;
        let below = plain_producer(g, producers, node.inputs[1])?;
        let y = positive(above)?;
        if below.op != Op::Binary(BinaryFn::Less) || below.inputs[0] != y {
            return None;
        }
        let hi = splat_of(g, producers, below.inputs[1])?;
        // (hi − y)·y > 0 exactly when 0 < y < hi needs no product of two small factors to
        // underflow: with hi >= 1, a tiny y meets hi − y >= 1, and y near hi is >= 1/2.
        if !(hi >= 1.0 && hi.is_finite()) {
            return None;
        }
        (y, Some(hi))
    } else {
        (positive(node)?, None)
    };
    (g.ty(y) == grad_ty).then_some((y, hi))
}

/// The elementwise chain replacing `where(mask(y), grad, 0)`. Exact wherever y and grad are
/// not NaN (the mask is 1 or ±0; a NaN or infinite grad under a zero mask gives NaN where
/// the select gave 0, which only a training run already diverged sees):
/// - ReLU: `unary clip(0, 1) y, grad epilogue=[ceil, mul(input=1)]` (y > 0 ⇔ clip(y) ∈ (0, 1]);
/// - ReLU6-like: `binary sub hi, y, grad epilogue=[mul(input=1), clip(0, 1), ceil,
///   mul(input=2)]` ((hi − y)·y > 0 ⇔ 0 < y < hi, see `activation_mask`).
fn masked_gradient(name: String, y: ValueId, grad: ValueId, hi: Option<ValueId>, out: ValueId) -> Node {
    let unit = EpilogueStep::Unary(UnaryFn::Clip { min: 0.0, max: 1.0 });
    let ceil = EpilogueStep::Unary(UnaryFn::Ceil);
    let (op, inputs, epilogue) = match hi {
        None => (
            Op::Unary(UnaryFn::Clip { min: 0.0, max: 1.0 }),
            vec![y, grad],
            vec![ceil, EpilogueStep::Binary { func: BinaryFn::Mul, operand: 1 }],
        ),
        Some(hi) => (
            Op::Binary(BinaryFn::Sub),
            vec![hi, y, grad],
            vec![EpilogueStep::Binary { func: BinaryFn::Mul, operand: 1 }, unit, ceil, EpilogueStep::Binary {
                func: BinaryFn::Mul,
                operand: 2,
            }],
        ),
    };
    Node { name, op, inputs, outputs: vec![out], epilogue, schedule: Default::default() }
}

/// Every `where(mask, g, 0)` of an activation gradient as one chain (`masked_gradient`).
pub fn fuse_activation_masks(g: &mut Graph) {
    let producers = g.producers();
    let mut replaced = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        if node.op != Op::Where || !node.epilogue.is_empty() || node.inputs.len() != 3 {
            continue;
        }
        let [cond, grad, zero] = node.inputs[..] else { continue };
        let out_ty = g.ty(node.outputs[0]);
        if g.ty(grad) != out_ty || out_ty.dtype != DType::F32 || splat_of(g, &producers, zero) != Some(0.0) {
            continue;
        }
        let Some((y, hi)) = activation_mask(g, &producers, cond, out_ty) else { continue };
        // hi is read through the Less node's constant operand, defined before the select.
        let hi_value = hi.and_then(|_| {
            let and = plain_producer(g, &producers, cond)?;
            Some(plain_producer(g, &producers, and.inputs[1])?.inputs[1])
        });
        if hi.is_some() && hi_value.is_none() {
            continue;
        }
        replaced.push((i, masked_gradient(node.name.clone(), y, grad, hi_value, node.outputs[0])));
    }
    for (i, node) in replaced {
        g.nodes[i] = node;
    }
}

/// Every Reduce (Sum or Mean) over all axes but axis 1 of a rank-3 or rank-4 f32 product
/// a·b (same shapes, the product read by nothing else) as a 1x1 depthwise
/// `ConvWeightGrad` [C, 1, 1(, 1)], reshaped to the reduction's [1, C, 1(, 1)] (and scaled
/// by 1/count for a Mean); a Reduce over the spatial axes only (per image and channel: a
/// squeeze-excitation scale's gradient) the same with a and b read as one image of N·C
/// channels. The product's node is left for dead-code elimination.
pub fn dot_reductions_as_weight_gradients(g: &mut Graph) {
    let producers = g.producers();
    let users = g.users();
    let is_output = {
        let mut v = vec![false; g.values.len()];
        for &o in &g.outputs {
            v[o.index()] = true;
        }
        v
    };
    // (reduce node index, a, b, kind, sums per image: over the spatial axes only)
    let mut found = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let Op::Reduce { kind, axes } = &node.op else { continue };
        if !matches!(kind, ReduceKind::Sum | ReduceKind::Mean) || !node.epilogue.is_empty() {
            continue;
        }
        let product = node.inputs[0];
        let ty = g.ty(product);
        let rank = ty.rank();
        let all_but_channels: Vec<usize> = (0..rank).filter(|&a| a != 1).collect();
        let spatial: Vec<usize> = (2..rank).collect();
        let per_image = *axes == spatial;
        if !(3..=4).contains(&rank) || ty.dtype != DType::F32 || !(*axes == all_but_channels || per_image) || ty.numel() == 0 {
            continue;
        }
        if is_output[product.index()] || users[product.index()].len() != 1 {
            continue;
        }
        let Some(mul) = plain_producer(g, &producers, product) else { continue };
        if mul.op != Op::Binary(BinaryFn::Mul) || mul.inputs.len() != 2 {
            continue;
        }
        let (a, b) = (mul.inputs[0], mul.inputs[1]);
        if g.ty(a) != ty || g.ty(b) != ty {
            continue;
        }
        found.push((i, a, b, *kind, per_image));
    }
    // Inserting shifts later nodes: go from the last match back.
    for &(i, a, b, kind, per_image) in found.iter().rev() {
        let node = g.nodes[i].clone();
        let mut shape = g.ty(a).shape.clone();
        let spatial = shape.len() - 2;
        let count = if per_image {
            shape[2..].iter().product::<usize>()
        } else {
            shape.iter().product::<usize>() / shape[1]
        };
        let mut nodes = Vec::new();
        let (a, b) = if per_image {
            // Images as channels of one image: [N, C, *s] -> [1, N·C, *s], one group each.
            shape = [vec![1, shape[0] * shape[1]], shape[2..].to_vec()].concat();
            let mut as_one_image = |v: ValueId, tag: &str| {
                let flat = g.add_value(TensorType::f32(shape.clone()), "");
                nodes.push(Node {
                    name: format!("{}.{tag}", node.name),
                    op: Op::Reshape,
                    inputs: vec![v],
                    outputs: vec![flat],
                    epilogue: Vec::new(),
                    schedule: Default::default(),
                });
                flat
            };
            let flat_a = as_one_image(a, "images_a");
            let flat_b = if b == a { flat_a } else { as_one_image(b, "images_b") };
            (flat_a, flat_b)
        } else {
            (a, b)
        };
        let channels = shape[1];
        let geometry = ConvGeometry {
            strides: vec![1; spatial],
            dilations: vec![1; spatial],
            pads_begin: vec![0; spatial],
            pads_end: vec![0; spatial],
            groups: channels,
        };
        let mut dw_shape = vec![channels, 1];
        dw_shape.extend(std::iter::repeat_n(1, spatial));
        let dw = g.add_value(TensorType::f32(dw_shape), "");
        let out = node.outputs[0];
        let plain = |name: &str, op: Op, inputs: Vec<ValueId>, output: ValueId| Node {
            name: format!("{}.{name}", node.name),
            op,
            inputs,
            outputs: vec![output],
            epilogue: Vec::new(),
            schedule: Default::default(),
        };
        nodes.push(plain("dot", Op::ConvWeightGrad(geometry), vec![a, b], dw));
        match kind {
            ReduceKind::Sum => nodes.push(plain("reshape", Op::Reshape, vec![dw], out)),
            _ => {
                let summed = g.add_value(g.ty(out).clone(), "");
                nodes.push(plain("reshape", Op::Reshape, vec![dw], summed));
                let mean = Op::Unary(UnaryFn::Affine { scale: 1.0 / count as f32, shift: 0.0 });
                nodes.push(plain("mean", mean, vec![summed], out));
            }
        }
        g.nodes.splice(i..i + 1, nodes);
    }
}

/// Whether `shape` broadcast against a tensor of `full` shape (same dtype) varies along
/// axis 1 only: every axis but the channels' is 1 after aligning the shapes at the right.
fn per_channel(shape: &[usize], full: &[usize]) -> bool {
    if shape.len() > full.len() || full.len() < 2 {
        return false;
    }
    let lead = full.len() - shape.len();
    shape.iter().enumerate().all(|(i, &d)| d == 1 || (i + lead == 1 && d == full[1]))
}

/// How a reader of x̂ reads x − mean instead.
enum CenteredReader {
    /// `x̂ · factor` (either order) becomes `(x − mean) · (factor · 1/σ)`.
    Product { node: usize, factor: ValueId },
    /// A 1x1 depthwise `ConvWeightGrad` (Σ a·x̂ per channel) becomes
    /// `ConvWeightGrad(a, x − mean) · 1/σ`.
    ChannelSum { node: usize },
}

/// Every x̂ = Div(x − mean, σ) with σ per channel (BatchNorm in training) whose readers are
/// all per-channel products or per-channel sums (`CenteredReader`): the readers take the
/// centred value and 1/σ folded into their per-channel operand, so x̂ is never computed.
/// Rounding differs from dividing by σ by an ulp or so per element.
pub fn read_centered_instead_of_normalized(g: &mut Graph) {
    let users = g.users();
    let mut is_output = vec![false; g.values.len()];
    for &o in &g.outputs {
        is_output[o.index()] = true;
    }
    // (div node index, centred value, σ, readers)
    let mut found: Vec<(usize, ValueId, ValueId, Vec<CenteredReader>)> = Vec::new();
    for (i, node) in g.nodes.iter().enumerate() {
        if node.op != Op::Binary(BinaryFn::Div) || !node.epilogue.is_empty() || node.inputs.len() != 2 {
            continue;
        }
        let (centered, sigma) = (node.inputs[0], node.inputs[1]);
        let normalized = node.outputs[0];
        let full = g.ty(normalized);
        if full.dtype != DType::F32 || g.ty(centered) != full || g.ty(sigma).rank() != full.rank() || full.numel() == 0 {
            continue;
        }
        if !per_channel(&g.ty(sigma).shape, &full.shape) || is_output[normalized.index()] || users[normalized.index()].is_empty() {
            continue;
        }
        let channels = full.shape[1];
        // Readers left dead by the rewrites above (a product whose sum became a
        // ConvWeightGrad) keep reading x̂ until dead-code elimination removes both.
        let live = |u: &usize| g.nodes[*u].outputs.iter().any(|o| is_output[o.index()] || !users[o.index()].is_empty());
        let readers: Option<Vec<CenteredReader>> = users[normalized.index()]
            .iter()
            .filter(|u| live(u))
            .map(|&u| {
                let reader = &g.nodes[u];
                if !reader.epilogue.is_empty() || reader.inputs.len() != 2 {
                    return None;
                }
                let other = if reader.inputs[0] == normalized { reader.inputs[1] } else { reader.inputs[0] };
                if other == normalized {
                    return None;
                }
                match &reader.op {
                    Op::Binary(BinaryFn::Mul) => {
                        let factor = g.ty(other);
                        (factor.dtype == DType::F32 && per_channel(&factor.shape, &full.shape) && g.ty(reader.outputs[0]) == full)
                            .then_some(CenteredReader::Product { node: u, factor: other })
                    }
                    Op::ConvWeightGrad(geometry) => {
                        let out = &g.ty(reader.outputs[0]).shape;
                        let one_by_one = out.len() == full.rank() && out[0] == channels && out[1..].iter().all(|&d| d == 1);
                        let plain = geometry.groups == channels
                            && geometry.strides.iter().all(|&s| s == 1)
                            && geometry.dilations.iter().all(|&d| d == 1)
                            && geometry.pads_begin.iter().chain(&geometry.pads_end).all(|&p| p == 0);
                        (one_by_one && plain && g.ty(other) == full).then_some(CenteredReader::ChannelSum { node: u })
                    }
                    _ => None,
                }
            })
            .collect();
        if let Some(readers) = readers {
            found.push((i, centered, sigma, readers));
        }
    }
    if found.is_empty() {
        return;
    }
    // New nodes go right before (factors) or right after (sums) the node they serve, and
    // 1/σ right after the Div, which every reader of x̂ follows.
    let mut before: Vec<Vec<Node>> = vec![Vec::new(); g.nodes.len()];
    let mut after: Vec<Vec<Node>> = vec![Vec::new(); g.nodes.len()];
    let plain = |name: String, op: Op, inputs: Vec<ValueId>, output: ValueId| Node {
        name,
        op,
        inputs,
        outputs: vec![output],
        epilogue: Vec::new(),
        schedule: Default::default(),
    };
    for (div, centered, sigma, readers) in found {
        let div_name = g.nodes[div].name.clone();
        let normalized = g.nodes[div].outputs[0];
        let inverse = g.add_value(g.ty(sigma).clone(), "");
        after[div].push(plain(format!("{div_name}.inverse"), Op::Unary(UnaryFn::Reciprocal), vec![sigma], inverse));
        for reader in readers {
            match reader {
                CenteredReader::Product { node, factor } => {
                    let shape = cnnc_ir::broadcast_shapes(&g.ty(factor).shape, &g.ty(inverse).shape)
                        .expect("per-channel shapes of one rank broadcast");
                    let folded = g.add_value(TensorType::f32(shape), "");
                    let name = format!("{}.factor", g.nodes[node].name);
                    before[node].push(plain(name, Op::Binary(BinaryFn::Mul), vec![factor, inverse], folded));
                    let reader = &mut g.nodes[node];
                    reader.inputs = if reader.inputs[0] == normalized { vec![centered, folded] } else { vec![folded, centered] };
                }
                CenteredReader::ChannelSum { node } => {
                    let sum = g.nodes[node].outputs[0];
                    let sum_ty = g.ty(sum).clone();
                    let centered_sum = g.add_value(sum_ty.clone(), "");
                    let inverse_as_sum = g.add_value(sum_ty, "");
                    let name = g.nodes[node].name.clone();
                    let reader = &mut g.nodes[node];
                    for input in &mut reader.inputs {
                        if *input == normalized {
                            *input = centered;
                        }
                    }
                    reader.outputs = vec![centered_sum];
                    after[node].push(plain(format!("{name}.inverse"), Op::Reshape, vec![inverse], inverse_as_sum));
                    after[node].push(plain(format!("{name}.scaled"), Op::Binary(BinaryFn::Mul), vec![centered_sum, inverse_as_sum], sum));
                }
            }
        }
    }
    let old = std::mem::take(&mut g.nodes);
    for ((node, before), after) in old.into_iter().zip(before).zip(after) {
        g.nodes.extend(before);
        g.nodes.push(node);
        g.nodes.extend(after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{Tensor, TensorData, interp, verify};
    use proptest::prelude::*;

    /// Deterministic values in [-scale, scale), with the edges a mask must get right.
    fn values(count: usize, seed: u64, scale: f32, edges: &[f32]) -> Vec<f32> {
        let mut state = seed | 1;
        (0..count)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if !edges.is_empty() && state % 5 == 0 {
                    edges[i % edges.len()]
                } else {
                    ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
                }
            })
            .collect()
    }

    fn f32s(t: &Tensor) -> &[f32] {
        let TensorData::F32(v) = &t.data else { panic!("not f32") };
        v
    }

    /// Runs `g` before and after `rewrite`, checks that the rewrite changed the graph (so
    /// the test exercises it) and returns both results.
    fn before_and_after(mut g: Graph, inputs: &[Tensor], rewrite: fn(&mut Graph)) -> (Vec<Tensor>, Vec<Tensor>) {
        verify(&g).expect("test graph");
        let before = interp::run(&g, inputs).expect("interpreter, before");
        let original = g.clone();
        rewrite(&mut g);
        verify(&g).unwrap_or_else(|e| panic!("rewritten graph: {e}"));
        assert_ne!(g.nodes, original.nodes, "the rewrite did not apply");
        let after = interp::run(&g, inputs).expect("interpreter, after");
        (before, after)
    }

    /// where(y > 0 [& y < hi], g, 0) as the autodiff rules build it.
    fn mask_graph(shape: &[usize], hi: Option<f32>) -> Graph {
        let mut g = Graph::new("mask");
        let y = g.add_input(TensorType::f32(shape.to_vec()), "y");
        let grad = g.add_input(TensorType::f32(shape.to_vec()), "g");
        let scalar = |v: f32| Tensor::f32(Vec::<usize>::new(), vec![v]);
        let zero = g.add_constant("zero", scalar(0.0));
        let above = g.push1("above", Op::Binary(BinaryFn::Greater), &[y, zero]).unwrap();
        let cond = match hi {
            Some(hi) => {
                let hi = g.add_constant("hi", scalar(hi));
                let below = g.push1("below", Op::Binary(BinaryFn::Less), &[y, hi]).unwrap();
                g.push1("inside", Op::Binary(BinaryFn::And), &[above, below]).unwrap()
            }
            None => above,
        };
        let zero_grad = g.add_constant("zero_grad", scalar(0.0));
        let out = g.push1("masked", Op::Where, &[cond, grad, zero_grad]).unwrap();
        g.outputs = vec![out];
        g
    }

    fn check_mask(shape: &[usize], hi: Option<f32>, seed: u64) {
        let count: usize = shape.iter().product();
        let limit = hi.unwrap_or(1.0);
        let tiny = f32::from_bits(1); // the smallest subnormal
        let edges = [0.0, -0.0, tiny, -tiny, limit, limit - limit * f32::EPSILON / 2.0, limit * (1.0 + f32::EPSILON), 1e-30];
        let y = Tensor::f32(shape.to_vec(), values(count, seed, limit * 1.5, &edges));
        let grad = Tensor::f32(shape.to_vec(), values(count, seed ^ 0x9e37, 2.0, &[]));
        let (before, after) = before_and_after(mask_graph(shape, hi), &[y, grad], fuse_activation_masks);
        for (i, (b, a)) in f32s(&before[0]).iter().zip(f32s(&after[0])).enumerate() {
            // Equal as numbers: a zero mask may give -0 where the select gave +0.
            assert!(a == b, "element {i}: {a} after the rewrite, {b} before (hi {hi:?})");
        }
    }

    #[test]
    fn relu6_and_relu_masks_keep_every_value() {
        check_mask(&[2, 3, 5, 7], Some(6.0), 1);
        check_mask(&[2, 3, 5, 7], Some(1.0), 2);
        check_mask(&[4, 33], None, 3);
    }

    #[test]
    fn masks_whose_product_could_underflow_are_left_alone() {
        let mut g = mask_graph(&[8], Some(0.5));
        let original = g.clone();
        fuse_activation_masks(&mut g);
        assert_eq!(g, original);
    }

    /// Reduce kind over all axes but 1 of a·b (or a·a).
    fn dot_graph(shape: &[usize], kind: ReduceKind, square: bool, per_image: bool) -> Graph {
        let mut g = Graph::new("dot");
        let a = g.add_input(TensorType::f32(shape.to_vec()), "a");
        let b = if square { a } else { g.add_input(TensorType::f32(shape.to_vec()), "b") };
        let product = g.push1("product", Op::Binary(BinaryFn::Mul), &[a, b]).unwrap();
        let axes: Vec<usize> = (0..shape.len()).filter(|&x| x != 1 && !(per_image && x == 0)).collect();
        let out = g.push1("sum", Op::Reduce { kind, axes }, &[product]).unwrap();
        g.outputs = vec![out];
        g
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn masks_match_the_select(
            shape in prop::collection::vec(1usize..9, 1..4),
            hi in prop::sample::select(vec![None, Some(1.0f32), Some(6.0), Some(20.0)]),
            seed in any::<u64>(),
        ) {
            check_mask(&shape, hi, seed);
        }

        #[test]
        fn per_channel_dot_products_match_reduce_of_product(
            shape in prop::collection::vec(1usize..7, 3..5),
            mean in any::<bool>(),
            square in any::<bool>(),
            per_image in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let count: usize = shape.iter().product();
            let a = Tensor::f32(shape.clone(), values(count, seed, 1.0, &[]));
            let b = Tensor::f32(shape.clone(), values(count, seed ^ 0x51, 1.0, &[]));
            let inputs = if square { vec![a] } else { vec![a, b] };
            let kind = if mean { ReduceKind::Mean } else { ReduceKind::Sum };
            let (before, after) = before_and_after(dot_graph(&shape, kind, square, per_image), &inputs, dot_reductions_as_weight_gradients);
            prop_assert_eq!(&before[0].shape, &after[0].shape);
            for (x, y) in f32s(&before[0]).iter().zip(f32s(&after[0])) {
                prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{} vs {}", x, y);
            }
        }
    }

    #[test]
    fn dot_products_read_elsewhere_or_over_other_axes_are_left_alone() {
        let mut g = dot_graph(&[2, 3, 4, 4], ReduceKind::Sum, false, false);
        let product = g.nodes[0].outputs[0];
        g.outputs.push(product);
        let original = g.clone();
        dot_reductions_as_weight_gradients(&mut g);
        assert_eq!(g, original);

        let mut g = Graph::new("dot");
        let a = g.add_input(TensorType::f32(vec![2, 3, 4, 4]), "a");
        let product = g.push1("product", Op::Binary(BinaryFn::Mul), &[a, a]).unwrap();
        let out = g.push1("sum", Op::Reduce { kind: ReduceKind::Sum, axes: vec![0, 2] }, &[product]).unwrap();
        g.outputs = vec![out];
        let original = g.clone();
        dot_reductions_as_weight_gradients(&mut g);
        assert_eq!(g, original);
    }

    /// BatchNorm's normalisation x̂ = (x − mean)/σ over [N, C, H, W] and its readers as the
    /// fused step has them: γ·x̂ + β, Σ g·x̂ (as a product and a sum), x̂·k with k per channel.
    /// `extra_reader`: x̂ is also a graph output (the rewrite must then leave it alone).
    fn normalization_graph(shape: &[usize], extra_reader: bool) -> Graph {
        let mut g = Graph::new("normalization");
        let channels = shape[1];
        let x = g.add_input(TensorType::f32(shape.to_vec()), "x");
        let grad = g.add_input(TensorType::f32(shape.to_vec()), "g");
        let gamma = g.add_input(TensorType::f32(vec![channels, 1, 1]), "gamma");
        let k = g.add_input(TensorType::f32(vec![1, channels, 1, 1]), "k");
        let axes = vec![0, 2, 3];
        let mean = g.push1("mean", Op::Reduce { kind: ReduceKind::Mean, axes: axes.clone() }, &[x]).unwrap();
        let centered = g.push1("centered", Op::Binary(BinaryFn::Sub), &[x, mean]).unwrap();
        let square = g.push1("square", Op::Binary(BinaryFn::Mul), &[centered, centered]).unwrap();
        let var = g.push1("var", Op::Reduce { kind: ReduceKind::Mean, axes: axes.clone() }, &[square]).unwrap();
        let shifted = g.push1("eps", Op::Unary(UnaryFn::Affine { scale: 1.0, shift: 1e-5 }), &[var]).unwrap();
        let sigma = g.push1("sigma", Op::Unary(UnaryFn::Sqrt), &[shifted]).unwrap();
        let normalized = g.push1("normalized", Op::Binary(BinaryFn::Div), &[centered, sigma]).unwrap();
        let scaled = g.push1("scaled", Op::Binary(BinaryFn::Mul), &[normalized, gamma]).unwrap();
        let weighted = g.push1("weighted", Op::Binary(BinaryFn::Mul), &[grad, normalized]).unwrap();
        let sum = g.push1("sum", Op::Reduce { kind: ReduceKind::Sum, axes }, &[weighted]).unwrap();
        let projected = g.push1("projected", Op::Binary(BinaryFn::Mul), &[k, normalized]).unwrap();
        g.outputs = vec![scaled, sum, projected];
        if extra_reader {
            g.outputs.push(normalized);
        }
        g
    }

    fn lighten_normalization(g: &mut Graph) {
        dot_reductions_as_weight_gradients(g);
        let before = g.nodes.len();
        read_centered_instead_of_normalized(g);
        assert!(g.nodes.len() > before, "x̂'s readers were not rewritten");
        g.remove_dead();
        assert!(!g.nodes.iter().any(|n| n.op == Op::Binary(BinaryFn::Div) && g.ty(n.outputs[0]).numel() > 1 && n.name == "normalized"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn normalized_readers_match_on_the_centred_value(
            shape in prop::collection::vec(1usize..6, 4..5),
            seed in any::<u64>(),
        ) {
            let count: usize = shape.iter().product();
            let channels = shape[1];
            let inputs = [
                Tensor::f32(shape.clone(), values(count, seed, 3.0, &[])),
                Tensor::f32(shape.clone(), values(count, seed ^ 0x77, 1.0, &[])),
                Tensor::f32(vec![channels, 1, 1], values(channels, seed ^ 0x15, 2.0, &[0.0])),
                Tensor::f32(vec![1, channels, 1, 1], values(channels, seed ^ 0x33, 2.0, &[])),
            ];
            let (before, after) = before_and_after(normalization_graph(&shape, false), &inputs, lighten_normalization);
            for (b, a) in before.iter().zip(&after) {
                prop_assert_eq!(&b.shape, &a.shape);
                for (x, y) in f32s(b).iter().zip(f32s(a)) {
                    prop_assert!((x - y).abs() <= 2e-5 * (1.0 + x.abs()) * (1.0 + count as f32).sqrt(), "{} vs {}", x, y);
                }
            }
        }
    }

    #[test]
    fn a_normalized_value_read_otherwise_is_kept() {
        let mut g = normalization_graph(&[2, 3, 4, 4], true);
        dot_reductions_as_weight_gradients(&mut g);
        let original = g.clone();
        read_centered_instead_of_normalized(&mut g);
        assert_eq!(g, original);
    }
}
