//! BatchNormalization, InstanceNormalization, LayerNormalization, GroupNormalization, LRN.

use cnnc_ir::{BinaryFn, Op, PoolAttrs, PoolKind, ReduceKind, Tensor, TensorType, UnaryFn, ValueId};

use super::compose::{binary, drop_axes, reduce_keep, require_f32, unary};
use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axis, unsupported};

/// A BatchNormalization parameter laid out to broadcast against x [N, C, *spatial]: a [C]
/// vector becomes [C, 1, ..., 1]; opset 6-8's per-activation form (spatial=0) already has
/// x's trailing shape [C, *spatial].
fn channel_param(ctx: &mut NodeCtx, v: ValueId, x_shape: &[usize], what: &str) -> LowerResult<ValueId> {
    let shape = ctx.shape(v);
    let channels = x_shape[1];
    if shape == [channels] {
        let mut target = vec![channels];
        target.extend(std::iter::repeat_n(1, x_shape.len() - 2));
        return ctx.reshape(v, target);
    }
    if shape.as_slice() == &x_shape[1..] {
        return Ok(v);
    }
    Err(invalid(format!("{what} has shape {shape:?}; expected [{channels}] for input {x_shape:?}")))
}

/// Which statistics a BatchNormalization in training mode (opset 14+, training_mode=1)
/// normalises with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchStatistics {
    /// The operator's own semantics: the batch's mean and variance, with updated running
    /// statistics as outputs 1 and 2 (what the ONNX backend tests check).
    AsTheOperatorSays,
    /// Always the running statistics, as an inference compile of a model exported in
    /// training mode wants; outputs 1 and 2 pass the running statistics through unchanged.
    Running,
}

/// y = x·scale' + shift' with scale' = s / sqrt(var + ε) and shift' = b − mean·scale'. With
/// `training_mode` (opset 14+) the batch's own mean and biased variance normalise instead,
/// and the running statistics come out as outputs 1 and 2.
pub fn batch_normalization(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let statistics = if ctx.inference { BatchStatistics::Running } else { BatchStatistics::AsTheOperatorSays };
    batch_normalization_with(ctx, statistics)
}

/// BatchNormalization with the choice of statistics for training-mode nodes made by the
/// caller (the dispatch has no load option to make it from yet).
pub fn batch_normalization_with(ctx: &mut NodeCtx, statistics: BatchStatistics) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let x_shape = ctx.shape(x);
    if x_shape.len() < 2 {
        return Err(invalid(format!("input must be [N, C, ...], got {x_shape:?}")));
    }
    require_f32(ctx, x, "BatchNormalization")?;
    let epsilon = ctx.attr_float("epsilon", 1e-5)? as f64;
    let training = ctx.opset >= 14 && ctx.attr_int("training_mode", 0)? != 0;
    if training && statistics == BatchStatistics::AsTheOperatorSays {
        return batch_normalization_training(ctx, x, &x_shape, epsilon);
    }
    // Opset 6-13 list optional batch-statistics outputs used only in training; inference has none.
    if !training && let Some(i) = (1..ctx.node.output.len()).find(|&i| !ctx.node.output[i].is_empty()) {
        return Err(unsupported(format!(
            "output {i} ('{}'): the training-only statistics outputs of BatchNormalization opset {} are not supported",
            ctx.node.output[i], ctx.opset
        )));
    }
    let mut outputs = vec![batch_normalization_inference(ctx, x, &x_shape, epsilon)?];
    if training {
        outputs.extend([ctx.input(3)?, ctx.input(4)?]);
    }
    Ok(outputs)
}

/// Normalisation with the running statistics (inputs 3 and 4).
fn batch_normalization_inference(ctx: &mut NodeCtx, x: ValueId, x_shape: &[usize], epsilon: f64) -> LowerResult<ValueId> {
    let [s, b, mean, var] = [ctx.input(1)?, ctx.input(2)?, ctx.input(3)?, ctx.input(4)?];
    let folded = [s, b, mean, var].map(|v| ctx.constant_value(v));
    if let [Some(s), Some(b), Some(mean), Some(var)] = &folded
        && let Some((scale, shift)) = folded_affine(s, b, mean, var, epsilon)
    {
        let scale = ctx.constant(scale);
        let shift = ctx.constant(shift);
        let scale = channel_param(ctx, scale, x_shape, "scale")?;
        let shift = channel_param(ctx, shift, x_shape, "B")?;
        let scaled = binary(ctx, BinaryFn::Mul, x, scale)?;
        return binary(ctx, BinaryFn::Add, scaled, shift);
    }
    let s = channel_param(ctx, s, x_shape, "scale")?;
    let b = channel_param(ctx, b, x_shape, "B")?;
    let mean = channel_param(ctx, mean, x_shape, "mean")?;
    let var = channel_param(ctx, var, x_shape, "var")?;
    let var_eps = unary(ctx, UnaryFn::Affine { scale: 1.0, shift: epsilon as f32 }, var)?;
    let std = unary(ctx, UnaryFn::Sqrt, var_eps)?;
    let scale = binary(ctx, BinaryFn::Div, s, std)?;
    let mean_scaled = binary(ctx, BinaryFn::Mul, mean, scale)?;
    let shift = binary(ctx, BinaryFn::Sub, b, mean_scaled)?;
    let scaled = binary(ctx, BinaryFn::Mul, x, scale)?;
    binary(ctx, BinaryFn::Add, scaled, shift)
}

/// scale' and shift' computed in f64 from constant parameters of equal shape; None when
/// they are not all f32 of one shape (then the graph computes them).
fn folded_affine(s: &Tensor, b: &Tensor, mean: &Tensor, var: &Tensor, epsilon: f64) -> Option<(Tensor, Tensor)> {
    let shape = &s.shape;
    if [&b.shape, &mean.shape, &var.shape].iter().any(|other| *other != shape) {
        return None;
    }
    let (s, b, mean, var) = (s.data.as_f32()?, b.data.as_f32()?, mean.data.as_f32()?, var.data.as_f32()?);
    let scale: Vec<f64> = s.iter().zip(var).map(|(&s, &v)| s as f64 / (v as f64 + epsilon).sqrt()).collect();
    let shift: Vec<f32> = b.iter().zip(mean).zip(&scale).map(|((&b, &m), &k)| (b as f64 - m as f64 * k) as f32).collect();
    let scale: Vec<f32> = scale.into_iter().map(|k| k as f32).collect();
    Some((Tensor::f32(shape.clone(), scale), Tensor::f32(shape.clone(), shift)))
}

/// The ONNX operator's training mode: normalise with the batch mean and biased variance
/// over every axis but 1; running_mean = mean·momentum + batch_mean·(1 − momentum), and the
/// same for the variance.
fn batch_normalization_training(ctx: &mut NodeCtx, x: ValueId, x_shape: &[usize], epsilon: f64) -> LowerResult<Vec<ValueId>> {
    let momentum = ctx.attr_float("momentum", 0.9)? as f64;
    let [s, b, running_mean, running_var] = [ctx.input(1)?, ctx.input(2)?, ctx.input(3)?, ctx.input(4)?];
    for (v, what) in [(s, "scale"), (b, "B"), (running_mean, "input_mean"), (running_var, "input_var")] {
        if ctx.shape(v) != [x_shape[1]] {
            return Err(invalid(format!("{what} has shape {:?}; expected [{}]", ctx.shape(v), x_shape[1])));
        }
    }
    let axes: Vec<usize> = (0..x_shape.len()).filter(|&a| a != 1).collect();
    let Standardized { normalized, mean, var, .. } = standardize(ctx, x, &axes, epsilon as f32)?;
    let s = channel_param(ctx, s, x_shape, "scale")?;
    let b = channel_param(ctx, b, x_shape, "B")?;
    let scaled = binary(ctx, BinaryFn::Mul, normalized, s)?;
    let y = binary(ctx, BinaryFn::Add, scaled, b)?;
    let mut outputs = vec![y];
    if ctx.node.output.len() > 1 {
        let batch_mean = drop_axes(ctx, mean, &axes)?;
        let batch_var = drop_axes(ctx, var, &axes)?;
        for (running, batch) in [(running_mean, batch_mean), (running_var, batch_var)] {
            let kept = unary(ctx, UnaryFn::Affine { scale: momentum as f32, shift: 0.0 }, running)?;
            let fresh = unary(ctx, UnaryFn::Affine { scale: (1.0 - momentum) as f32, shift: 0.0 }, batch)?;
            outputs.push(binary(ctx, BinaryFn::Add, kept, fresh)?);
        }
    }
    Ok(outputs)
}

/// x standardised over `axes`: (x − mean) / sqrt(var + ε), with the (biased) statistics
/// kept as extent-1 axes.
struct Standardized {
    normalized: ValueId,
    mean: ValueId,
    var: ValueId,
    std: ValueId,
}

fn standardize(ctx: &mut NodeCtx, x: ValueId, axes: &[usize], epsilon: f32) -> LowerResult<Standardized> {
    let mean = reduce_keep(ctx, ReduceKind::Mean, x, axes)?;
    let centered = binary(ctx, BinaryFn::Sub, x, mean)?;
    let squared = binary(ctx, BinaryFn::Mul, centered, centered)?;
    let var = reduce_keep(ctx, ReduceKind::Mean, squared, axes)?;
    let var_eps = unary(ctx, UnaryFn::Affine { scale: 1.0, shift: epsilon }, var)?;
    let std = unary(ctx, UnaryFn::Sqrt, var_eps)?;
    let normalized = binary(ctx, BinaryFn::Div, centered, std)?;
    Ok(Standardized { normalized, mean, var, std })
}

/// y = s·(x − mean) / sqrt(var + ε) + b with mean and (biased) variance over the spatial
/// axes of each (n, c).
pub fn instance_normalization(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let x_shape = ctx.shape(x);
    if x_shape.len() < 3 {
        return Err(invalid(format!("input must be [N, C, spatial...], got {x_shape:?}")));
    }
    require_f32(ctx, x, "InstanceNormalization")?;
    let epsilon = ctx.attr_float("epsilon", 1e-5)?;
    let (s, b) = (ctx.input(1)?, ctx.input(2)?);
    for (v, what) in [(s, "scale"), (b, "B")] {
        if ctx.shape(v) != [x_shape[1]] {
            return Err(invalid(format!("{what} has shape {:?}; expected [{}]", ctx.shape(v), x_shape[1])));
        }
    }
    let axes: Vec<usize> = (2..x_shape.len()).collect();
    let normalized = standardize(ctx, x, &axes, epsilon)?.normalized;
    let s = channel_param(ctx, s, &x_shape, "scale")?;
    let b = channel_param(ctx, b, &x_shape, "B")?;
    let scaled = binary(ctx, BinaryFn::Mul, normalized, s)?;
    Ok(vec![binary(ctx, BinaryFn::Add, scaled, b)?])
}

/// y = x / (bias + alpha/size · Σ x²)^beta, the sum over channels
/// [c − ⌊(size−1)/2⌋, c + ⌈(size−1)/2⌉] clipped to the valid ones. The windowed sum is an
/// average pool (counting padding, so the divisor is always `size`) over x² viewed as
/// [N, 1, C, H·W...] with an (size, 1) window.
pub fn lrn(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let x_shape = ctx.shape(x);
    if x_shape.len() < 2 {
        return Err(invalid(format!("input must be [N, C, ...], got {x_shape:?}")));
    }
    require_f32(ctx, x, "LRN")?;
    let size = ctx.attr_int_opt("size")?;
    let size = ctx.required("size", size)?;
    let size = usize::try_from(size).ok().filter(|&s| s > 0).ok_or_else(|| invalid(format!("size must be positive, got {size}")))?;
    let alpha = ctx.attr_float("alpha", 1e-4)?;
    let beta = ctx.attr_float("beta", 0.75)?;
    let bias = ctx.attr_float("bias", 1.0)?;
    let (n, c) = (x_shape[0], x_shape[1]);
    let plane: usize = x_shape[2..].iter().product();
    let squared = binary(ctx, BinaryFn::Mul, x, x)?;
    let as_image = ctx.reshape(squared, vec![n, 1, c, plane])?;
    let window = PoolAttrs {
        kind: PoolKind::Avg { count_include_pad: true },
        kernel: vec![size, 1],
        strides: vec![1, 1],
        dilations: vec![1, 1],
        pads_begin: vec![(size - 1) / 2, 0],
        pads_end: vec![(size - 1).div_ceil(2), 0],
    };
    let averaged = ctx.push_typed(Op::Pool(window), &[as_image], TensorType::f32(vec![n, 1, c, plane]))?;
    let averaged = ctx.reshape(averaged, x_shape)?;
    let base = unary(ctx, UnaryFn::Affine { scale: alpha, shift: bias }, averaged)?;
    let denominator = if beta == 1.0 { base } else { unary(ctx, UnaryFn::PowConst { exponent: beta }, base)? };
    Ok(vec![binary(ctx, BinaryFn::Div, x, denominator)?])
}

/// LayerNormalization (opset 17): x standardised over axes [axis, rank), times Scale, plus B
/// (both broadcast against those axes); optional outputs Mean and InvStdDev with the
/// normalised axes kept as 1.
pub fn layer_normalization(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let x_shape = ctx.shape(x);
    require_f32(ctx, x, "LayerNormalization")?;
    let axis = normalize_axis(ctx.attr_int("axis", -1)?, x_shape.len())?;
    let epsilon = ctx.attr_float("epsilon", 1e-5)?;
    let axes: Vec<usize> = (axis..x_shape.len()).collect();
    let Standardized { normalized, mean, std, .. } = standardize(ctx, x, &axes, epsilon)?;
    let scale = ctx.input(1)?;
    let mut y = binary(ctx, BinaryFn::Mul, normalized, scale)?;
    if let Some(b) = ctx.opt_input(2) {
        y = binary(ctx, BinaryFn::Add, y, b)?;
    }
    if ctx.shape(y) != x_shape {
        return Err(invalid(format!("Scale/B do not broadcast to the normalised axes of {x_shape:?} without changing its shape")));
    }
    let mut outputs = vec![y, mean];
    if ctx.node.output.len() > 2 {
        outputs.push(unary(ctx, UnaryFn::Reciprocal, std)?);
    }
    Ok(outputs)
}

/// GroupNormalization: x [N, C, *spatial] standardised over each group of C/num_groups
/// channels (and all spatial positions), then scaled and shifted per channel. Opset 18-20
/// gave scale and bias one entry per group, opset 21 one per channel; either shape is
/// accepted.
pub fn group_normalization(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let x_shape = ctx.shape(x);
    if x_shape.len() < 2 {
        return Err(invalid(format!("input must be [N, C, ...], got {x_shape:?}")));
    }
    require_f32(ctx, x, "GroupNormalization")?;
    let epsilon = ctx.attr_float("epsilon", 1e-5)?;
    let groups = ctx.attr_int_opt("num_groups")?;
    let groups = ctx.required("num_groups", groups)?;
    let (n, c) = (x_shape[0], x_shape[1]);
    let groups = usize::try_from(groups)
        .ok()
        .filter(|&g| g > 0 && c % g == 0)
        .ok_or_else(|| invalid(format!("num_groups {groups} must be a positive divisor of the {c} channels")))?;
    let per_group: usize = x_shape[2..].iter().product::<usize>() * (c / groups);
    let grouped = ctx.reshape(x, vec![n, groups, per_group])?;
    let normalized = standardize(ctx, grouped, &[2], epsilon)?.normalized;
    let normalized = ctx.reshape(normalized, x_shape.clone())?;
    let mut y = normalized;
    for (i, what, op) in [(1, "scale", BinaryFn::Mul), (2, "bias", BinaryFn::Add)] {
        let param = ctx.input(i)?;
        let per_channel = match ctx.shape(param).as_slice() {
            [len] if *len == c => param,
            [len] if *len == groups => {
                // One value per group: repeat it for each of the group's channels.
                let column = ctx.reshape(param, vec![groups, 1])?;
                let spread = super::layout::broadcast_to(ctx, column, vec![groups, c / groups])?;
                ctx.reshape(spread, vec![c])?
            }
            other => return Err(invalid(format!("{what} has shape {other:?}; expected [{c}] or [{groups}]"))),
        };
        let per_channel = channel_param(ctx, per_channel, &x_shape, what)?;
        y = binary(ctx, op, y, per_channel)?;
    }
    Ok(vec![y])
}
