//! GatherElements.

use cnnc_ir::{Op, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axis};

/// out[i] = data[i with `axis` replaced by indices[i]]; negative indices count from the end.
pub fn gather_elements(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (data, indices) = (ctx.input(0)?, ctx.input(1)?);
    let (data_shape, index_shape) = (ctx.shape(data), ctx.shape(indices));
    if data_shape.is_empty() || index_shape.len() != data_shape.len() {
        return Err(invalid(format!("indices {index_shape:?} must have the rank of data {data_shape:?} (at least 1)")));
    }
    let axis = normalize_axis(ctx.attr_int("axis", 0)?, data_shape.len())?;
    if let Some(d) = (0..data_shape.len()).find(|&d| d != axis && index_shape[d] > data_shape[d]) {
        return Err(invalid(format!("indices {index_shape:?} exceed data {data_shape:?} on axis {d}")));
    }
    let extent = data_shape[axis] as i64;
    if let Some(t) = ctx.constant_value(indices)
        && let Some(bad) = t.data.to_i64_vec().and_then(|v| v.into_iter().find(|&i| i < -extent || i >= extent))
    {
        return Err(invalid(format!("index {bad} is out of range for axis {axis} of extent {extent}")));
    }
    Ok(vec![ctx.push(Op::GatherElements { axis }, &[data, indices])?])
}
