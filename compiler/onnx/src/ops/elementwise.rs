//! Elementwise ops: activations and math functions (one `Unary` node each), arithmetic,
//! comparisons and logic with broadcasting (`Binary`), variadic Sum/Mean/Max/Min, Clip,
//! PRelu, Where.

use cnnc_ir::{BinaryFn, DType, Op, Scalar, Tensor, TensorData, UnaryFn, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, unsupported};

fn unary(ctx: &mut NodeCtx, f: UnaryFn) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    Ok(vec![ctx.push(Op::Unary(f), &[x])?])
}

/// Lowerings that are one parameterless unary function.
macro_rules! unary_lowerings {
    ($($name:ident => $f:expr),* $(,)?) => {
        $(pub fn $name(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> { unary(ctx, $f) })*
    };
}

unary_lowerings! {
    relu => UnaryFn::Relu,
    sigmoid => UnaryFn::Sigmoid,
    tanh => UnaryFn::Tanh,
    erf => UnaryFn::Erf,
    softplus => UnaryFn::Softplus,
    softsign => UnaryFn::Softsign,
    mish => UnaryFn::Mish,
    hard_swish => UnaryFn::HardSwish,
    sqrt => UnaryFn::Sqrt,
    exp => UnaryFn::Exp,
    log => UnaryFn::Log,
    neg => UnaryFn::Neg,
    abs => UnaryFn::Abs,
    reciprocal => UnaryFn::Reciprocal,
    floor => UnaryFn::Floor,
    ceil => UnaryFn::Ceil,
    not => UnaryFn::Not,
}

pub fn leaky_relu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 0.01)?;
    unary(ctx, UnaryFn::LeakyRelu { alpha })
}

pub fn elu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 1.0)?;
    unary(ctx, UnaryFn::Elu { alpha })
}

pub fn selu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 1.673_263_2)?;
    let gamma = ctx.attr_float("gamma", 1.050_701)?;
    unary(ctx, UnaryFn::Selu { alpha, gamma })
}

pub fn celu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 1.0)?;
    if alpha == 0.0 {
        return Err(invalid("Celu alpha must not be 0"));
    }
    unary(ctx, UnaryFn::Celu { alpha })
}

pub fn hard_sigmoid(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 0.2)?;
    let beta = ctx.attr_float("beta", 0.5)?;
    unary(ctx, UnaryFn::HardSigmoid { alpha, beta })
}

pub fn swish(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let alpha = ctx.attr_float("alpha", 1.0)?;
    unary(ctx, UnaryFn::Swish { alpha })
}

pub fn gelu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    match ctx.attr_string("approximate", "none")?.as_str() {
        "none" => unary(ctx, UnaryFn::GeluErf),
        "tanh" => unary(ctx, UnaryFn::GeluTanh),
        other => Err(invalid(format!("Gelu approximate must be 'none' or 'tanh', got '{other}'"))),
    }
}

/// A one-element constant input (Clip bounds) as a scalar, if given.
fn scalar_input(ctx: &NodeCtx, i: usize, what: &str) -> LowerResult<Option<Scalar>> {
    match ctx.const_input(i)? {
        None => Ok(None),
        Some(t) if t.numel() == 1 => Ok(Some(t.data.get(0))),
        Some(t) => Err(invalid(format!("{what} must be a scalar, has shape {:?}", t.shape))),
    }
}

/// Clip: bounds are attributes before opset 11, optional constant inputs from 11 on.
pub fn clip(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let dtype = ctx.dtype(x);
    let (min, max) = if ctx.opset < 11 {
        (ctx.attr_float_opt("min")?.map(Scalar::F32), ctx.attr_float_opt("max")?.map(Scalar::F32))
    } else {
        (scalar_input(ctx, 1, "Clip min")?, scalar_input(ctx, 2, "Clip max")?)
    };
    if dtype == DType::F32 {
        let bound = |s: Option<Scalar>, absent: f32| s.map_or(absent, |s| s.as_f64() as f32);
        let f = UnaryFn::Clip { min: bound(min, f32::NEG_INFINITY), max: bound(max, f32::INFINITY) };
        return Ok(vec![ctx.push(Op::Unary(f), &[x])?]);
    }
    // Integers clip exactly with Max/Min against constants (an f32 bound would round).
    let mut y = x;
    for (bound, f) in [(min, BinaryFn::Max), (max, BinaryFn::Min)] {
        if let Some(b) = bound {
            let c = ctx.constant(Tensor::new([], TensorData::splat(b.cast(dtype), 1)));
            y = ctx.push(Op::Binary(f), &[y, c])?;
        }
    }
    if y == x {
        return Ok(vec![x]);
    }
    Ok(vec![y])
}

pub fn prelu(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let mut slope = ctx.input(1)?;
    let (x_shape, slope_shape) = (ctx.shape(x), ctx.shape(slope));
    // Before opset 7 a 1-D slope is per channel (axis 1), not numpy-aligned to the last axis.
    if ctx.opset < 7 && slope_shape.len() == 1 && x_shape.len() > 2 && x_shape[1] == slope_shape[0] {
        let mut per_channel = vec![1; x_shape.len() - 1];
        per_channel[0] = slope_shape[0];
        slope = ctx.reshape(slope, per_channel)?;
    }
    let y = ctx.push(Op::Binary(BinaryFn::PRelu), &[x, slope])?;
    if ctx.shape(y) != ctx.shape(x) {
        return Err(invalid(format!(
            "slope {} must broadcast to the input {} (unidirectionally)",
            ctx.ty(slope),
            ctx.ty(x)
        )));
    }
    Ok(vec![y])
}

/// Before opset 7, binary ops broadcast only with `broadcast=1`, and then B's dims line up
/// with A's starting at `axis` (default: B aligned to A's trailing dims). Returns B reshaped
/// so that numpy broadcasting gives the same result.
fn legacy_broadcast(ctx: &mut NodeCtx, a: ValueId, b: ValueId) -> LowerResult<ValueId> {
    if ctx.opset >= 7 || ctx.attr_int("broadcast", 0)? == 0 {
        return Ok(b);
    }
    let (a_rank, b_shape) = (ctx.shape(a).len(), ctx.shape(b));
    if b_shape.len() > a_rank {
        return Err(invalid(format!("with broadcast=1, B {:?} must not have more dims than A", b_shape)));
    }
    let axis = match ctx.attr_int_opt("axis")? {
        Some(axis) => crate::ctx::normalize_axis(axis, a_rank)?,
        None => a_rank - b_shape.len(),
    };
    if axis + b_shape.len() > a_rank {
        return Err(invalid(format!("B {:?} placed at axis {axis} runs past A's {a_rank} dims", b_shape)));
    }
    let mut shape = vec![1; axis];
    shape.extend_from_slice(&b_shape);
    shape.resize(a_rank, 1);
    ctx.reshape(b, shape)
}

fn binary(ctx: &mut NodeCtx, f: BinaryFn) -> LowerResult<Vec<ValueId>> {
    let a = ctx.input(0)?;
    let b = ctx.input(1)?;
    let b = legacy_broadcast(ctx, a, b)?;
    Ok(vec![ctx.push(Op::Binary(f), &[a, b])?])
}

/// Lowerings that are one broadcasting binary function.
macro_rules! binary_lowerings {
    ($($name:ident => $f:expr),* $(,)?) => {
        $(pub fn $name(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> { binary(ctx, $f) })*
    };
}

binary_lowerings! {
    add => BinaryFn::Add,
    sub => BinaryFn::Sub,
    mul => BinaryFn::Mul,
    div => BinaryFn::Div,
    less => BinaryFn::Less,
    less_or_equal => BinaryFn::LessOrEqual,
    greater => BinaryFn::Greater,
    greater_or_equal => BinaryFn::GreaterOrEqual,
    equal => BinaryFn::Equal,
    and => BinaryFn::And,
    or => BinaryFn::Or,
    xor => BinaryFn::Xor,
}

/// Pow allows a base and exponent of different types (opset 12); the result has the
/// base's type. A float exponent of an integer base is applied in f32 and truncated back,
/// as ONNX's reference does.
pub fn pow(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let base = ctx.input(0)?;
    let exponent = ctx.input(1)?;
    let exponent = legacy_broadcast(ctx, base, exponent)?;
    let (base_type, exp_type) = (ctx.dtype(base), ctx.dtype(exponent));
    if base_type == DType::Bool || exp_type == DType::Bool {
        return Err(invalid("Pow is not defined on bool"));
    }
    if base_type != DType::F32 && exp_type == DType::F32 {
        let base_f32 = ctx.cast(base, DType::F32)?;
        let y = ctx.push(Op::Binary(BinaryFn::Pow), &[base_f32, exponent])?;
        return Ok(vec![ctx.cast(y, base_type)?]);
    }
    let exponent = ctx.cast(exponent, base_type)?;
    if base_type == DType::F32
        && let Some(Scalar::F32(e)) = ctx.constant_value(exponent).and_then(|t| t.data.as_splat())
    {
        let base_shape = ctx.shape(base);
        if cnnc_ir::broadcast_shapes(&base_shape, &ctx.shape(exponent)).as_ref() == Some(&base_shape) {
            return Ok(vec![ctx.push(Op::Unary(UnaryFn::PowConst { exponent: e }), &[base])?]);
        }
    }
    Ok(vec![ctx.push(Op::Binary(BinaryFn::Pow), &[base, exponent])?])
}

/// Folds a variadic op (Sum, Max, Min) pairwise; one input is the identity.
fn variadic(ctx: &mut NodeCtx, f: BinaryFn) -> LowerResult<ValueId> {
    let inputs = ctx.all_inputs()?;
    let (&first, rest) = inputs.split_first().ok_or_else(|| invalid("needs at least one input"))?;
    let mut acc = first;
    for &x in rest {
        acc = ctx.push(Op::Binary(f), &[acc, x])?;
    }
    Ok(acc)
}

pub fn sum(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    Ok(vec![variadic(ctx, BinaryFn::Add)?])
}

pub fn max(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    Ok(vec![variadic(ctx, BinaryFn::Max)?])
}

pub fn min(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    Ok(vec![variadic(ctx, BinaryFn::Min)?])
}

pub fn mean(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let total = variadic(ctx, BinaryFn::Add)?;
    let n = ctx.num_inputs();
    if n == 1 {
        return Ok(vec![total]);
    }
    if ctx.dtype(total) != DType::F32 {
        return Err(unsupported(format!("Mean of {} (ONNX defines it on floats)", ctx.dtype(total))));
    }
    let divisor = ctx.constant(Tensor::f32([], vec![n as f32]));
    Ok(vec![ctx.push(Op::Binary(BinaryFn::Div), &[total, divisor])?])
}

pub fn where_(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let inputs = [ctx.input(0)?, ctx.input(1)?, ctx.input(2)?];
    Ok(vec![ctx.push(Op::Where, &inputs)?])
}
