//! Gemm and MatMul.

use cnnc_ir::{BinaryFn, Op, ValueId};

use super::compose::{binary, scale_by};
use crate::ctx::{LowerResult, NodeCtx, invalid};

fn transpose_2d(ctx: &mut NodeCtx, x: ValueId) -> LowerResult<ValueId> {
    ctx.push(Op::Transpose { perm: vec![1, 0] }, &[x])
}

/// Y = alpha·A'·B' + beta·C, A' = transA ? Aᵀ : A (likewise B); C broadcasts to [M, N]
/// (opset 6's `broadcast` attribute only allowed what numpy broadcasting covers).
pub fn gemm(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    for (v, what) in [(a, "A"), (b, "B")] {
        if ctx.shape(v).len() != 2 {
            return Err(invalid(format!("{what} must be a matrix, has shape {:?}", ctx.shape(v))));
        }
    }
    let alpha = ctx.attr_float("alpha", 1.0)? as f64;
    let beta = ctx.attr_float("beta", 1.0)? as f64;
    let a = if ctx.attr_int("transA", 0)? != 0 { transpose_2d(ctx, a)? } else { a };
    let b = if ctx.attr_int("transB", 0)? != 0 { transpose_2d(ctx, b)? } else { b };
    let product = ctx.push(Op::MatMul, &[a, b])?;
    let product = scale_by(ctx, product, alpha)?;
    let Some(c) = ctx.opt_input(2) else { return Ok(vec![product]) };
    if beta == 0.0 {
        return Ok(vec![product]);
    }
    let c = scale_by(ctx, c, beta)?;
    Ok(vec![binary(ctx, BinaryFn::Add, product, c)?])
}

/// numpy matmul: a 1-D first operand becomes a row [1, K] and a 1-D second operand a column
/// [K, 1], the added axis removed from the result; batch axes broadcast.
pub fn matmul(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (a, b) = (ctx.input(0)?, ctx.input(1)?);
    let (a_shape, b_shape) = (ctx.shape(a), ctx.shape(b));
    if a_shape.is_empty() || b_shape.is_empty() {
        return Err(invalid(format!("MatMul operands must not be scalars, got {a_shape:?} and {b_shape:?}")));
    }
    let a_vector = a_shape.len() == 1;
    let b_vector = b_shape.len() == 1;
    let a = if a_vector { ctx.reshape(a, vec![1, a_shape[0]])? } else { a };
    let b = if b_vector { ctx.reshape(b, vec![b_shape[0], 1])? } else { b };
    let product = ctx.push(Op::MatMul, &[a, b])?;
    let mut shape = ctx.shape(product);
    let rank = shape.len();
    if b_vector {
        shape.remove(rank - 1);
    }
    if a_vector {
        shape.remove(rank - 2);
    }
    Ok(vec![ctx.reshape(product, shape)?])
}
