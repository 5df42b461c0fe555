//! Small graph-building steps shared by lowerings that become several IR ops (normalization,
//! softmax, reductions, losses): scalar constants, elementwise steps, keep-dims reductions
//! and dropping reduced axes.

use cnnc_ir::{BinaryFn, DType, Op, ReduceKind, Scalar, Tensor, TensorData, UnaryFn, ValueId};

use crate::ctx::{LowerResult, NodeCtx, unsupported};

/// A rank-0 constant of `dtype` holding `value` (converted as ONNX Cast would).
pub fn scalar(ctx: &mut NodeCtx, dtype: DType, value: f64) -> ValueId {
    let value = match dtype {
        DType::F32 => Scalar::F32(value as f32),
        DType::I64 => Scalar::I64(value as i64),
        DType::I32 => Scalar::I32(value as i32),
        DType::Bool => Scalar::Bool(value != 0.0),
    };
    ctx.constant(Tensor::new(Vec::<usize>::new(), TensorData::splat(value, 1)))
}

pub fn unary(ctx: &mut NodeCtx, f: UnaryFn, x: ValueId) -> LowerResult<ValueId> {
    ctx.push(Op::Unary(f), &[x])
}

pub fn binary(ctx: &mut NodeCtx, f: BinaryFn, a: ValueId, b: ValueId) -> LowerResult<ValueId> {
    ctx.push(Op::Binary(f), &[a, b])
}

/// `x · factor`, no node when the factor is 1.
pub fn scale_by(ctx: &mut NodeCtx, x: ValueId, factor: f64) -> LowerResult<ValueId> {
    if factor == 1.0 {
        return Ok(x);
    }
    let dtype = ctx.dtype(x);
    if dtype == DType::F32 {
        return unary(ctx, UnaryFn::Affine { scale: factor as f32, shift: 0.0 }, x);
    }
    let k = scalar(ctx, dtype, factor);
    binary(ctx, BinaryFn::Mul, x, k)
}

/// Reduction over `axes` keeping them as extent 1; `x` itself for no axes.
pub fn reduce_keep(ctx: &mut NodeCtx, kind: ReduceKind, x: ValueId, axes: &[usize]) -> LowerResult<ValueId> {
    if axes.is_empty() {
        return Ok(x);
    }
    let mut axes = axes.to_vec();
    axes.sort_unstable();
    axes.dedup();
    ctx.push(Op::Reduce { kind, axes }, &[x])
}

/// `x` with the listed axes (each of extent 1) removed.
pub fn drop_axes(ctx: &mut NodeCtx, x: ValueId, axes: &[usize]) -> LowerResult<ValueId> {
    let shape: Vec<usize> =
        ctx.shape(x).into_iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, d)| d).collect();
    ctx.reshape(x, shape)
}

/// `x` reshaped to `[len, 1, ..., 1]` with `trailing` ones: a per-channel vector laid out
/// to broadcast against `[N, C, *spatial]`.
pub fn per_channel(ctx: &mut NodeCtx, x: ValueId, trailing: usize) -> LowerResult<ValueId> {
    let len = ctx.shape(x).iter().product();
    let mut shape = vec![len];
    shape.extend(std::iter::repeat_n(1, trailing));
    ctx.reshape(x, shape)
}

/// Fails with an unsupported-feature error unless `x` is f32 (the ops built from IR Pool,
/// Conv and Resample compute in f32 only).
pub fn require_f32(ctx: &NodeCtx, x: ValueId, what: &str) -> LowerResult<()> {
    let dtype = ctx.dtype(x);
    if dtype != DType::F32 {
        return Err(unsupported(format!("{what} on {dtype} tensors (cnnc computes it in f32 only)")));
    }
    Ok(())
}
