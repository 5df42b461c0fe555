//! Ops that pass values through or produce constants: Identity, Dropout, Constant, Shape,
//! Size, ConstantOfShape, Cast, CastLike.

use cnnc_ir::{DType, Scalar, Tensor, TensorData, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, to_sizes, unsupported};
use crate::tensor::dtype_from_onnx;

pub fn identity(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    Ok(vec![ctx.input(0)?])
}

/// Inference-mode dropout: the identity, and an all-true mask when one is asked for.
/// Training mode (`LoadOptions::random_dropout`): x · mask with mask = 1/(1 − ratio) where
/// a uniform draw is >= ratio, else 0.
pub fn dropout(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let training = if ctx.opset < 7 {
        ctx.attr_int("is_test", 0)? == 0
    } else if ctx.opset >= 12 {
        match ctx.opt_input(2) {
            None => false,
            Some(_) => match ctx.const_input(2)? {
                Some(t) => t.data.get(0).as_f64() != 0.0,
                None => return Err(unsupported("Dropout's training_mode must be a compile-time constant")),
            },
        }
    } else {
        false
    };
    if training && !ctx.inference {
        let ratio = if ctx.opset >= 12 {
            match ctx.opt_input(1) {
                None => 0.5,
                Some(_) => match ctx.const_input(1)? {
                    Some(t) => t.data.get(0).as_f64() as f32,
                    None => return Err(unsupported("Dropout's ratio must be a compile-time constant")),
                },
            }
        } else {
            ctx.attr_float("ratio", 0.5)?
        };
        if !(0.0..1.0).contains(&ratio) {
            return Err(invalid(format!("Dropout ratio {ratio} is outside [0, 1)")));
        }
        if ratio > 0.0 {
            if !ctx.random_dropout {
                return Err(unsupported("training-mode dropout is random; cnnc compiles it only into training steps"));
            }
            return random_dropout(ctx, x, ratio);
        }
    }
    let mut outputs = vec![x];
    if ctx.wants_output(1) {
        let shape = ctx.shape(x);
        outputs.push(ctx.splat(shape, Scalar::Bool(true))?);
    }
    Ok(outputs)
}

fn random_dropout(ctx: &mut NodeCtx, x: ValueId, ratio: f32) -> LowerResult<Vec<ValueId>> {
    // Without a seed attribute, the node's name keeps streams of different nodes apart.
    let seed = match ctx.attr_int("seed", i64::MIN)? {
        i64::MIN => ctx.name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)),
        s => s as u64,
    };
    let step = ctx.splat(Vec::new(), Scalar::F32(0.0))?;
    let draw = ctx.push(cnnc_ir::Op::RandomUniform { seed }, &[x, step])?;
    let threshold = ctx.splat(Vec::new(), Scalar::F32(ratio))?;
    let keep = ctx.push(cnnc_ir::Op::Binary(cnnc_ir::BinaryFn::GreaterOrEqual), &[draw, threshold])?;
    let scale = ctx.splat(Vec::new(), Scalar::F32(1.0 / (1.0 - ratio)))?;
    let zero = ctx.splat(Vec::new(), Scalar::F32(0.0))?;
    let mask = ctx.push(cnnc_ir::Op::Where, &[keep, scale, zero])?;
    let y = ctx.push(cnnc_ir::Op::Binary(cnnc_ir::BinaryFn::Mul), &[x, mask])?;
    let mut outputs = vec![y];
    if ctx.wants_output(1) {
        outputs.push(keep);
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
