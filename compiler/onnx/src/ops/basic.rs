//! Ops that pass values through or produce constants: Identity, Dropout, Constant, Shape,
//! Size, ConstantOfShape, Cast, CastLike.

use cnnc_ir::{DType, Scalar, Tensor, TensorData, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, to_sizes, unsupported};
use crate::tensor::dtype_from_onnx;

pub fn identity(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    Ok(vec![ctx.input(0)?])
}

/// Inference-mode dropout: the identity, and an all-true mask when one is asked for.
pub fn dropout(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    if ctx.opset < 7 && ctx.attr_int("is_test", 0)? == 0 && !ctx.inference {
        return Err(unsupported("training-mode dropout (is_test=0) is random; cnnc compiles inference"));
    }
    if ctx.opset >= 12
        && !ctx.inference
        && let Some(training) = ctx.const_input(2)?
        && training.data.get(0).as_f64() != 0.0
    {
        return Err(unsupported("training-mode dropout (training_mode=true) is random; cnnc compiles inference"));
    }
    let mut outputs = vec![x];
    if ctx.wants_output(1) {
        let shape = ctx.shape(x);
        outputs.push(ctx.splat(shape, Scalar::Bool(true))?);
    }
    Ok(outputs)
}

pub fn constant(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let value = if let Some(t) = ctx.attr_tensor("value")? {
        t
    } else if let Some(f) = ctx.attr_float_opt("value_float")? {
        Tensor::f32([], vec![f])
    } else if let Some(fs) = ctx.attr_floats("value_floats")? {
        Tensor::f32([fs.len()], fs)
    } else if let Some(i) = ctx.attr_int_opt("value_int")? {
        Tensor::new([], TensorData::I64(vec![i]))
    } else if let Some(is) = ctx.attr_ints("value_ints")? {
        Tensor::new([is.len()], TensorData::I64(is))
    } else if ctx.has_attr("sparse_value") {
        return Err(unsupported("sparse constants"));
    } else if ctx.has_attr("value_string") || ctx.has_attr("value_strings") {
        return Err(unsupported("string constants"));
    } else {
        return Err(invalid("Constant has no value attribute"));
    };
    Ok(vec![ctx.constant(value)])
}

/// Clamps a Shape start/end attribute (negative counts from the end) into [0, rank].
fn clamp_dim_index(i: i64, rank: usize) -> usize {
    let r = rank as i64;
    (if i < 0 { i + r } else { i }).clamp(0, r) as usize
}

pub fn shape(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let dims = ctx.shape(ctx.input(0)?);
    let start = clamp_dim_index(ctx.attr_int("start", 0)?, dims.len());
    let end = clamp_dim_index(ctx.attr_int("end", dims.len() as i64)?, dims.len()).max(start);
    let values: Vec<i64> = dims[start..end].iter().map(|&d| d as i64).collect();
    Ok(vec![ctx.constant(Tensor::new([values.len()], TensorData::I64(values)))])
}

pub fn size(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let n = ctx.shape(ctx.input(0)?).iter().product::<usize>() as i64;
    Ok(vec![ctx.constant(Tensor::new([], TensorData::I64(vec![n])))])
}

pub fn constant_of_shape(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let dims = ctx.const_ints(0)?.ok_or_else(|| invalid("input 0 (shape) is required"))?;
    let shape = to_sizes(&dims, "ConstantOfShape dims")?;
    let value = match ctx.attr_tensor("value")? {
        Some(t) if t.numel() == 1 => t.data.get(0),
        Some(t) => return Err(invalid(format!("attribute 'value' must hold one element, has {}", t.numel()))),
        None => Scalar::F32(0.0),
    };
    Ok(vec![ctx.splat(shape, value)?])
}

fn cast_target(elem_type: i64) -> LowerResult<DType> {
    let elem_type =
        i32::try_from(elem_type).map_err(|_| invalid(format!("'to' {elem_type} is not an element type")))?;
    dtype_from_onnx(elem_type).map_err(|e| unsupported(format!("cast to {e}")))
}

pub fn cast(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let to = ctx.attr_int_opt("to")?;
    let to = cast_target(ctx.required("to", to)?)?;
    // `saturate` (opset 19) only concerns float8 targets, which cast_target refuses.
    Ok(vec![ctx.cast(x, to)?])
}

pub fn cast_like(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let to = ctx.dtype(ctx.input(1)?);
    Ok(vec![ctx.cast(x, to)?])
}
