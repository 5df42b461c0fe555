//! MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.

use cnnc_ir::{Op, PoolAttrs, PoolKind, ReduceKind, TensorType, ValueId};

use super::compose::{reduce_keep, require_f32};
use super::window::{axis_ints, forward_pads, window_out_extent};
use crate::ctx::{LowerResult, NodeCtx, invalid, to_sizes, unsupported};

/// A windowed pool: kernel_shape (required), strides, dilations, pads/auto_pad, ceil_mode.
fn pool(ctx: &mut NodeCtx, kind: PoolKind) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    if shape.len() < 3 {
        return Err(invalid(format!("input must be [N, C, spatial...] with at least one spatial axis, got {shape:?}")));
    }
    require_f32(ctx, x, &ctx.node.op_type)?;
    let spatial = shape.len() - 2;
    let kernel = ctx.attr_ints("kernel_shape")?;
    let kernel = to_sizes(&ctx.required("kernel_shape", kernel)?, "kernel_shape")?;
    if kernel.len() != spatial || kernel.contains(&0) {
        return Err(invalid(format!("kernel_shape {kernel:?} must have one positive entry per spatial axis ({spatial})")));
    }
    let strides = axis_ints(ctx, "strides", spatial, 1)?;
    let dilations = axis_ints(ctx, "dilations", spatial, 1)?;
    let ceil_mode = ctx.attr_int("ceil_mode", 0)? != 0;
    let (pads_begin, pads_end) = forward_pads(ctx, &shape[2..], &kernel, &strides, &dilations)?;
    let mut out_shape = shape[..2].to_vec();
    for i in 0..spatial {
        out_shape.push(window_out_extent(shape[2 + i], kernel[i], strides[i], dilations[i], pads_begin[i], pads_end[i], ceil_mode)?);
    }
    let attrs = PoolAttrs { kind, kernel, strides, dilations, pads_begin, pads_end };
    Ok(vec![ctx.push_typed(Op::Pool(attrs), &[x], TensorType::f32(out_shape))?])
}

pub fn max_pool(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    if ctx.node.output.get(1).is_some_and(|name| !name.is_empty()) {
        return Err(unsupported("the Indices output of MaxPool (argmax positions) is not supported"));
    }
    pool(ctx, PoolKind::Max)
}

pub fn average_pool(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let count_include_pad = ctx.attr_int("count_include_pad", 0)? != 0;
    pool(ctx, PoolKind::Avg { count_include_pad })
}

/// Global pools are reductions over every spatial axis, kept as extent 1.
fn global(ctx: &mut NodeCtx, kind: ReduceKind) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let rank = ctx.shape(x).len();
    if rank < 3 {
        return Err(invalid(format!("input must be [N, C, spatial...], got rank {rank}")));
    }
    require_f32(ctx, x, &ctx.node.op_type)?;
    let axes: Vec<usize> = (2..rank).collect();
    Ok(vec![reduce_keep(ctx, kind, x, &axes)?])
}

pub fn global_average_pool(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    global(ctx, ReduceKind::Mean)
}

pub fn global_max_pool(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    global(ctx, ReduceKind::Max)
}
