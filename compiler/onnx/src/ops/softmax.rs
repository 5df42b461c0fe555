//! Softmax and LogSoftmax, numerically stable: the maximum is subtracted before Exp.

use cnnc_ir::{BinaryFn, ReduceKind, UnaryFn, ValueId};

use super::compose::{binary, reduce_keep, unary};
use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axis, unsupported};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Softmax,
    LogSoftmax,
}

/// softmax(x) = e / Σe and log_softmax(x) = d − log Σe, with d = x − max(x) and e = exp(d),
/// along the given axes (several axes act as one flattened axis).
pub fn softmax_along(ctx: &mut NodeCtx, x: ValueId, axes: &[usize], flavor: Flavor) -> LowerResult<ValueId> {
    let max = reduce_keep(ctx, ReduceKind::Max, x, axes)?;
    let shifted = binary(ctx, BinaryFn::Sub, x, max)?;
    let exp = unary(ctx, UnaryFn::Exp, shifted)?;
    let sum = reduce_keep(ctx, ReduceKind::Sum, exp, axes)?;
    match flavor {
        Flavor::Softmax => binary(ctx, BinaryFn::Div, exp, sum),
        Flavor::LogSoftmax => {
            let log_sum = unary(ctx, UnaryFn::Log, sum)?;
            binary(ctx, BinaryFn::Sub, shifted, log_sum)
        }
    }
}

/// Before opset 13 the input is viewed as 2-D [outer, inner] split at `axis` (default 1) and
/// normalised over all of `inner`; from 13 on, along `axis` (default -1) alone.
fn lower(ctx: &mut NodeCtx, flavor: Flavor) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let rank = ctx.shape(x).len();
    if ctx.dtype(x) != cnnc_ir::DType::F32 {
        return Err(unsupported(format!("{} on {} tensors", ctx.node.op_type, ctx.dtype(x))));
    }
    let axes: Vec<usize> = if ctx.opset < 13 {
        let axis = ctx.attr_int("axis", 1)?;
        let r = rank as i64;
        if axis < -r || axis > r || (rank > 0 && axis == r) {
            return Err(invalid(format!("axis {axis} is out of range for rank {rank}")));
        }
        let axis = if axis < 0 { axis + r } else { axis } as usize;
        (axis..rank).collect()
    } else {
        if rank == 0 {
            return Err(invalid("input must have rank >= 1"));
        }
        vec![normalize_axis(ctx.attr_int("axis", -1)?, rank)?]
    };
    Ok(vec![softmax_along(ctx, x, &axes, flavor)?])
}

pub fn softmax(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Flavor::Softmax)
}

pub fn log_softmax(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    lower(ctx, Flavor::LogSoftmax)
}
