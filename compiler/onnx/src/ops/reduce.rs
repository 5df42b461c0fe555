//! ReduceSum/Mean/Max/Min/Prod/L1/L2/SumSquare/LogSum/LogSumExp, ArgMax, ArgMin.

use cnnc_ir::{ArgKind, BinaryFn, DType, Op, ReduceKind, UnaryFn, ValueId};

use super::compose::{binary, drop_axes, reduce_keep, scalar, unary};
use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axes, normalize_axis, unsupported};

/// What one ONNX reduction computes: an elementwise step before the IR reduction and one
/// after it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    Plain(ReduceKind),
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

/// The opset from which `axes` is an input instead of an attribute.
fn axes_input_since(reduction: Reduction) -> i64 {
    if reduction == Reduction::Plain(ReduceKind::Sum) { 13 } else { 18 }
}

/// The reduced axes: all of them when `axes` is absent or empty, none when it is empty and
/// `noop_with_empty_axes` is set (the elementwise steps still apply).
fn reduced_axes(ctx: &NodeCtx, reduction: Reduction, rank: usize) -> LowerResult<Vec<usize>> {
    let axes = if ctx.opset < axes_input_since(reduction) { ctx.attr_ints("axes")? } else { ctx.const_ints(1)? };
    match axes {
        Some(axes) if !axes.is_empty() => {
            let mut axes = normalize_axes(&axes, rank)?;
            axes.sort_unstable();
            Ok(axes)
        }
        _ if ctx.attr_int("noop_with_empty_axes", 0)? != 0 => Ok(Vec::new()),
        _ => Ok((0..rank).collect()),
    }
}

fn lower(ctx: &mut NodeCtx, reduction: Reduction) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let dtype = ctx.dtype(x);
    let axes = reduced_axes(ctx, reduction, shape.len())?;
    let keepdims = ctx.attr_int("keepdims", 1)? != 0;
    let float_only = !matches!(reduction, Reduction::Plain(_) | Reduction::L1 | Reduction::SumSquare);
    if (float_only && dtype != DType::F32) || (dtype == DType::Bool && !matches!(reduction, Reduction::Plain(ReduceKind::Max | ReduceKind::Min))) {
        return Err(unsupported(format!("{} on {dtype} tensors", ctx.node.op_type)));
    }
    let reduced = match reduction {
        // Boolean max/min are any/all: reduce 0/1 integers and test for a positive result,
        // which also maps the identities of an empty reduction (i32::MIN, i32::MAX) to false
        // and true.
        Reduction::Plain(kind) if dtype == DType::Bool => {
            let ints = ctx.cast(x, DType::I32)?;
            let r = reduce_keep(ctx, kind, ints, &axes)?;
            let zero = scalar(ctx, DType::I32, 0.0);
            binary(ctx, BinaryFn::Greater, r, zero)?
        }
        Reduction::Plain(kind) => reduce_keep(ctx, kind, x, &axes)?,
        Reduction::L1 => {
            let magnitude = unary(ctx, UnaryFn::Abs, x)?;
            reduce_keep(ctx, ReduceKind::Sum, magnitude, &axes)?
        }
        Reduction::SumSquare | Reduction::L2 => {
            let squared = binary(ctx, BinaryFn::Mul, x, x)?;
            let sum = reduce_keep(ctx, ReduceKind::Sum, squared, &axes)?;
            if reduction == Reduction::L2 { unary(ctx, UnaryFn::Sqrt, sum)? } else { sum }
        }
        Reduction::LogSum => {
            let sum = reduce_keep(ctx, ReduceKind::Sum, x, &axes)?;
            unary(ctx, UnaryFn::Log, sum)?
        }
        Reduction::LogSumExp => log_sum_exp(ctx, x, &axes)?,
    };
    Ok(vec![if keepdims { reduced } else { drop_axes(ctx, reduced, &axes)? }])
}

/// log Σ exp(x) = m + log Σ exp(x − m) with m the maximum, replaced by 0 where it is not
/// finite (all -inf, or an inf or NaN present) so that x − m stays meaningful.
fn log_sum_exp(ctx: &mut NodeCtx, x: ValueId, axes: &[usize]) -> LowerResult<ValueId> {
    if axes.is_empty() {
        return Ok(x);
    }
    let max = reduce_keep(ctx, ReduceKind::Max, x, axes)?;
    let magnitude = unary(ctx, UnaryFn::Abs, max)?;
    let infinity = scalar(ctx, DType::F32, f64::INFINITY);
    let finite = binary(ctx, BinaryFn::Less, magnitude, infinity)?;
    let zero = scalar(ctx, DType::F32, 0.0);
    let shift = ctx.push(Op::Where, &[finite, max, zero])?;
    let shifted = binary(ctx, BinaryFn::Sub, x, shift)?;
    let exp = unary(ctx, UnaryFn::Exp, shifted)?;
    let sum = reduce_keep(ctx, ReduceKind::Sum, exp, axes)?;
    let log = unary(ctx, UnaryFn::Log, sum)?;
    binary(ctx, BinaryFn::Add, log, shift)
}

pub fn reduce_sum(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::Plain(ReduceKind::Sum))
}

pub fn reduce_mean(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::Plain(ReduceKind::Mean))
}

pub fn reduce_max(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::Plain(ReduceKind::Max))
}

pub fn reduce_min(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::Plain(ReduceKind::Min))
}

pub fn reduce_prod(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::Plain(ReduceKind::Prod))
}

pub fn reduce_l1(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::L1)
}

pub fn reduce_l2(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::L2)
}

pub fn reduce_sum_square(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::SumSquare)
}

pub fn reduce_log_sum(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::LogSum)
}

pub fn reduce_log_sum_exp(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Reduction::LogSumExp)
}

/// ArgMax/ArgMin: int64 index along `axis` (default 0), kept unless keepdims=0; ties go to
/// the first index unless `select_last_index` (opset 12).
fn arg(ctx: &mut NodeCtx, kind: ArgKind) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    if shape.is_empty() {
        return Err(invalid("input must have rank >= 1"));
    }
    if ctx.dtype(x) == DType::Bool {
        return Err(unsupported(format!("{} on bool tensors", ctx.node.op_type)));
    }
    let axis = normalize_axis(ctx.attr_int("axis", 0)?, shape.len())?;
    if shape[axis] == 0 {
        return Err(invalid(format!("axis {axis} of {shape:?} is empty: there is no index to return")));
    }
    let keepdims = ctx.attr_int("keepdims", 1)? != 0;
    let select_last_index = ctx.attr_int("select_last_index", 0)? != 0;
    let index = ctx.push(Op::ArgReduce { kind, axis, select_last_index }, &[x])?;
    Ok(vec![if keepdims { index } else { drop_axes(ctx, index, &[axis])? }])
}

pub fn arg_max(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    arg(ctx, ArgKind::Max)
}

pub fn arg_min(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    arg(ctx, ArgKind::Min)
}
