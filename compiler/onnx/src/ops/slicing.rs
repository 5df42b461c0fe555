//! Ops that select, join or pad along axes: Concat, Split, Slice, Pad, Gather.

use cnnc_ir::{Op, PadMode, Scalar, TensorType, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axes, normalize_axis, to_sizes, unsupported};

pub fn concat(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let inputs = ctx.all_inputs()?;
    let first = *inputs.first().ok_or_else(|| invalid("needs at least one input"))?;
    let axis = ctx.attr_int_opt("axis")?;
    let axis = normalize_axis(ctx.required("axis", axis)?, ctx.shape(first).len())?;
    if inputs.len() == 1 {
        return Ok(vec![first]);
    }
    Ok(vec![ctx.push(Op::Concat { axis }, &inputs)?])
}

/// One axis of a Slice, normalized as ONNX specifies: negative indices count from the end,
/// then starts/ends are clamped to the valid range for the step's direction.
/// Returns (first index read, number of elements).
pub fn slice_axis(extent: usize, start: i64, end: i64, step: i64) -> (usize, usize) {
    if extent == 0 {
        return (0, 0);
    }
    let dim = extent as i128;
    let (mut s, mut e, st) = (start as i128, end as i128, step as i128);
    if s < 0 {
        s += dim;
    }
    if e < 0 {
        e += dim;
    }
    let count = if st > 0 {
        s = s.clamp(0, dim);
        e = e.clamp(0, dim);
        if e > s { (e - s + st - 1) / st } else { 0 }
    } else {
        s = s.clamp(0, dim - 1);
        e = e.clamp(-1, dim - 1);
        if s > e { (s - e + (-st) - 1) / (-st) } else { 0 }
    };
    if count == 0 { (0, 0) } else { (s as usize, count as usize) }
}

/// Slices `x` along the given axes; other axes are kept whole.
pub fn slice_axes(
    ctx: &mut NodeCtx,
    x: ValueId,
    axes: &[usize],
    starts: &[i64],
    ends: &[i64],
    steps: &[i64],
) -> LowerResult<ValueId> {
    let ty = ctx.ty(x);
    let rank = ty.rank();
    let mut first = vec![0usize; rank];
    let mut step = vec![1i64; rank];
    let mut shape = ty.shape.clone();
    for (i, &axis) in axes.iter().enumerate() {
        if steps[i] == 0 {
            return Err(invalid("slice step must not be 0"));
        }
        let (s, n) = slice_axis(ty.shape[axis], starts[i], ends[i], steps[i]);
        first[axis] = s;
        step[axis] = steps[i];
        shape[axis] = n;
    }
    if shape == ty.shape && step.iter().all(|&s| s == 1) {
        return Ok(x);
    }
    ctx.push_typed(Op::Slice { starts: first, steps: step }, &[x], TensorType::new(ty.dtype, shape))
}

/// Slice: starts/ends/axes attributes before opset 10; constant inputs (with steps) from 10 on.
pub fn slice(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let rank = ctx.shape(x).len();
    let (starts, ends, axes, steps) = if ctx.opset < 10 {
        let starts = ctx.attr_ints("starts")?;
        let ends = ctx.attr_ints("ends")?;
        (ctx.required("starts", starts)?, ctx.required("ends", ends)?, ctx.attr_ints("axes")?, None)
    } else {
        let starts = ctx.const_ints(1)?.ok_or_else(|| invalid("input 1 (starts) is required"))?;
        let ends = ctx.const_ints(2)?.ok_or_else(|| invalid("input 2 (ends) is required"))?;
        (starts, ends, ctx.const_ints(3)?, ctx.const_ints(4)?)
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(invalid(format!(
            "starts ({}), ends ({}), axes ({}) and steps ({}) must have the same length",
            starts.len(),
            ends.len(),
            axes.len(),
            steps.len()
        )));
    }
    let axes = normalize_axes(&axes, rank)?;
    Ok(vec![slice_axes(ctx, x, &axes, &starts, &ends, &steps)?])
}

/// Split: sizes from the `split` attribute before opset 13, from input 1 after; without them,
/// equal parts (opset 18's `num_outputs`: ceil-sized parts, the last one smaller).
pub fn split(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let axis = normalize_axis(ctx.attr_int("axis", 0)?, shape.len())?;
    let extent = shape[axis];
    let outputs = ctx.node.output.len();
    let sizes = if ctx.opset < 13 { ctx.attr_ints("split")? } else { ctx.const_ints(1)? };
    let sizes = match sizes {
        Some(sizes) => to_sizes(&sizes, "split sizes")?,
        None => {
            let parts = match ctx.attr_int_opt("num_outputs")? {
                Some(n) if ctx.opset >= 18 => {
                    usize::try_from(n).ok().filter(|&n| n > 0 && n == outputs).ok_or_else(|| {
                        invalid(format!("num_outputs {n} must be positive and match the {outputs} outputs"))
                    })?
                }
                _ => outputs,
            };
            if parts == 0 {
                return Err(invalid("Split has no outputs"));
            }
            let chunk = extent.div_ceil(parts);
            if ctx.opset < 18 && !extent.is_multiple_of(parts) {
                return Err(invalid(format!("axis extent {extent} does not split into {parts} equal parts")));
            }
            (0..parts).map(|i| chunk.min(extent.saturating_sub(i * chunk))).collect()
        }
    };
    if sizes.len() != outputs || sizes.iter().sum::<usize>() != extent {
        return Err(invalid(format!("split sizes {sizes:?} must be one per output ({outputs}) and sum to {extent}")));
    }
    let mut begin = 0i64;
    let mut results = Vec::with_capacity(sizes.len());
    for &size in &sizes {
        let end = begin + size as i64;
        results.push(slice_axes(ctx, x, &[axis], &[begin], &[end], &[1])?);
        begin = end;
    }
    Ok(results)
}

/// Pads larger than this cannot describe a tensor that fits in memory.
const MAX_PAD: u64 = 1 << 48;

/// Pad: `pads`/`value` attributes before opset 11; constant inputs pads, constant_value and
/// (opset 18) axes after. Pads list all begins, then all ends.
pub fn pad(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let ty = ctx.ty(x);
    let rank = ty.rank();
    let (pads, value) = if ctx.opset < 11 {
        let pads = ctx.attr_ints("pads")?;
        (ctx.required("pads", pads)?, Scalar::F32(ctx.attr_float("value", 0.0)?))
    } else {
        let pads = ctx.const_ints(1)?.ok_or_else(|| invalid("input 1 (pads) is required"))?;
        let value = match ctx.const_input(2)? {
            Some(t) if t.numel() == 1 => t.data.get(0),
            Some(t) => return Err(invalid(format!("constant_value must be a scalar, has shape {:?}", t.shape))),
            None => Scalar::F32(0.0),
        };
        (pads, value)
    };
    let axes = match if ctx.opset >= 18 { ctx.const_ints(3)? } else { None } {
        Some(axes) => normalize_axes(&axes, rank)?,
        None => (0..rank).collect(),
    };
    if let Some(p) = pads.iter().find(|p| p.unsigned_abs() > MAX_PAD) {
        return Err(invalid(format!("pad {p} is beyond any tensor size")));
    }
    if pads.len() != 2 * axes.len() {
        return Err(invalid(format!("pads {pads:?} must have 2 entries per padded axis ({})", axes.len())));
    }
    let mut begins = vec![0i64; rank];
    let mut ends = vec![0i64; rank];
    for (i, &axis) in axes.iter().enumerate() {
        begins[axis] = pads[i];
        ends[axis] = pads[i + axes.len()];
    }
    let mode = match ctx.attr_string("mode", "constant")?.as_str() {
        "constant" => PadMode::Constant(value.cast(ty.dtype)),
        "reflect" => PadMode::Reflect,
        "edge" => PadMode::Edge,
        "wrap" => PadMode::Wrap,
        other => return Err(unsupported(format!("pad mode '{other}'"))),
    };
    if matches!(mode, PadMode::Reflect)
        && let Some(axis) =
            (0..rank).find(|&a| begins[a].max(ends[a]) >= ty.shape[a] as i64 && (begins[a] > 0 || ends[a] > 0))
    {
        return Err(invalid(format!("reflect pads of axis {axis} must be smaller than its extent {}", ty.shape[axis])));
    }
    if begins.iter().chain(&ends).all(|&p| p == 0) {
        return Ok(vec![x]);
    }
    Ok(vec![ctx.push(Op::Pad { begins, ends, mode }, &[x])?])
}

pub fn gather(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let data = ctx.input(0)?;
    let indices = ctx.input(1)?;
    let axis = normalize_axis(ctx.attr_int("axis", 0)?, ctx.shape(data).len())?;
    let extent = ctx.shape(data)[axis] as i64;
    if let Some(t) = ctx.constant_value(indices)
        && let Some(bad) = t.data.to_i64_vec().and_then(|v| v.into_iter().find(|&i| i < -extent || i >= extent))
    {
        return Err(invalid(format!("index {bad} is out of range for axis {axis} of extent {extent}")));
    }
    Ok(vec![ctx.push(Op::Gather { axis }, &[data, indices])?])
}

#[cfg(test)]
mod tests {
    use super::slice_axis;

    #[test]
    fn slice_axis_follows_onnx_clamping() {
        assert_eq!(slice_axis(10, 0, 3, 1), (0, 3));
        assert_eq!(slice_axis(10, -3, i64::MAX, 1), (7, 3));
        assert_eq!(slice_axis(10, 1, 1000, 3), (1, 3));
        assert_eq!(slice_axis(10, 20, 30, 1), (0, 0));
        assert_eq!(slice_axis(10, -1, i64::MIN, -1), (9, 10));
        assert_eq!(slice_axis(10, 20, 0, -2), (9, 5));
        assert_eq!(slice_axis(10, 5, 5, 1), (0, 0));
        assert_eq!(slice_axis(0, 0, 5, 1), (0, 0));
        assert_eq!(slice_axis(0, -1, i64::MIN, -1), (0, 0));
    }
}
