//! Ops that rearrange elements without computing: Reshape, Flatten, Squeeze, Unsqueeze,
//! Transpose, Expand, Tile, DepthToSpace, SpaceToDepth.

use cnnc_ir::{Op, TensorType, ValueId, broadcast_shapes};

use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axes, to_sizes};

/// Resolves a Reshape target: -1 is inferred, 0 copies the input dim (unless `allow_zero`).
pub fn reshape_target(input: &[usize], target: &[i64], allow_zero: bool) -> LowerResult<Vec<usize>> {
    let mut out = Vec::with_capacity(target.len());
    let mut inferred = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if inferred.is_some() => return Err(invalid(format!("shape {target:?} has more than one -1"))),
            -1 => {
                inferred = Some(i);
                out.push(1);
            }
            0 if !allow_zero => {
                let copied = input.get(i).ok_or_else(|| {
                    invalid(format!("shape {target:?} copies dim {i} (0) but the input has rank {}", input.len()))
                })?;
                out.push(*copied);
            }
            d if d < 0 => return Err(invalid(format!("shape {target:?} has a negative dim {d}"))),
            d => out.push(d as usize),
        }
    }
    let total: usize = input.iter().product();
    let known = out.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| invalid("shape overflows"))?;
    match inferred {
        Some(i) => {
            if known == 0 || !total.is_multiple_of(known) {
                return Err(invalid(format!("cannot infer the -1 in {target:?} for {total} elements")));
            }
            out[i] = total / known;
        }
        None if known != total => {
            return Err(invalid(format!("shape {target:?} holds {known} elements, the input {input:?} has {total}")));
        }
        None => {}
    }
    Ok(out)
}

pub fn reshape(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let target = if ctx.opset < 5 {
        let shape = ctx.attr_ints("shape")?;
        ctx.required("shape", shape)?
    } else {
        ctx.const_ints(1)?.ok_or_else(|| invalid("input 1 (shape) is required"))?
    };
    let allow_zero = ctx.opset >= 14 && ctx.attr_int("allowzero", 0)? != 0;
    let shape = reshape_target(&ctx.shape(x), &target, allow_zero)?;
    Ok(vec![ctx.reshape(x, shape)?])
}

pub fn flatten(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let rank = shape.len() as i64;
    let axis = ctx.attr_int("axis", 1)?;
    if axis < -rank || axis > rank {
        return Err(invalid(format!("axis {axis} is out of range for rank {rank}")));
    }
    let axis = if axis < 0 { axis + rank } else { axis } as usize;
    let outer = shape[..axis].iter().product();
    let inner = shape[axis..].iter().product();
    Ok(vec![ctx.reshape(x, vec![outer, inner])?])
}

/// Axes from the `axes` attribute before `input_since`, from input 1 after.
fn axes_operand(ctx: &NodeCtx, input_since: i64) -> LowerResult<Option<Vec<i64>>> {
    if ctx.opset < input_since { ctx.attr_ints("axes") } else { ctx.const_ints(1) }
}

pub fn squeeze(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let axes = match axes_operand(ctx, 13)? {
        Some(axes) => {
            let axes = normalize_axes(&axes, shape.len())?;
            if let Some(&a) = axes.iter().find(|&&a| shape[a] != 1) {
                return Err(invalid(format!("cannot squeeze axis {a} of extent {}", shape[a])));
            }
            axes
        }
        None => (0..shape.len()).filter(|&a| shape[a] == 1).collect(),
    };
    let out = shape.iter().enumerate().filter(|(a, _)| !axes.contains(a)).map(|(_, &d)| d).collect();
    Ok(vec![ctx.reshape(x, out)?])
}

pub fn unsqueeze(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let axes = axes_operand(ctx, 13)?.ok_or_else(|| invalid("axes are required"))?;
    let out_rank = shape.len() + axes.len();
    let axes = normalize_axes(&axes, out_rank)?;
    let mut dims = shape.into_iter();
    let out = (0..out_rank).map(|a| if axes.contains(&a) { 1 } else { dims.next().unwrap_or(1) }).collect();
    Ok(vec![ctx.reshape(x, out)?])
}

pub fn transpose(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let rank = ctx.shape(x).len();
    let perm = match ctx.attr_ints("perm")? {
        Some(p) => to_sizes(&p, "perm")?,
        None => (0..rank).rev().collect(),
    };
    if perm.iter().copied().eq(0..rank) {
        return Ok(vec![x]);
    }
    Ok(vec![ctx.push(Op::Transpose { perm }, &[x])?])
}

/// `x` broadcast to `shape` (which must be a broadcast of x's shape); `x` when unchanged.
pub fn broadcast_to(ctx: &mut NodeCtx, x: ValueId, shape: Vec<usize>) -> LowerResult<ValueId> {
    let ty = ctx.ty(x);
    if ty.shape == shape {
        return Ok(x);
    }
    ctx.push_typed(Op::Broadcast, &[x], TensorType::new(ty.dtype, shape))
}

pub fn expand(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let target = ctx.const_ints(1)?.ok_or_else(|| invalid("input 1 (shape) is required"))?;
    let target = to_sizes(&target, "Expand shape")?;
    let in_shape = ctx.shape(x);
    let out = broadcast_shapes(&in_shape, &target)
        .ok_or_else(|| invalid(format!("cannot expand {in_shape:?} to {target:?}")))?;
    Ok(vec![broadcast_to(ctx, x, out)?])
}

/// Tile as Reshape + Broadcast + Reshape: [d0, d1] -> [1, d0, 1, d1] -> [r0, d0, r1, d1]
/// -> [r0·d0, r1·d1].
pub fn tile(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let repeats = ctx.const_ints(1)?.ok_or_else(|| invalid("input 1 (repeats) is required"))?;
    let repeats = to_sizes(&repeats, "Tile repeats")?;
    let shape = ctx.shape(x);
    if repeats.len() != shape.len() {
        return Err(invalid(format!("repeats {repeats:?} must have one entry per input dim ({})", shape.len())));
    }
    if repeats.iter().all(|&r| r == 1) {
        return Ok(vec![x]);
    }
    let interleaved: Vec<usize> = shape.iter().flat_map(|&d| [1, d]).collect();
    let broadcast: Vec<usize> = shape.iter().zip(&repeats).flat_map(|(&d, &r)| [r, d]).collect();
    let out = shape
        .iter()
        .zip(&repeats)
        .map(|(&d, &r)| {
            d.checked_mul(r).ok_or_else(|| invalid(format!("repeats {repeats:?} overflow the shape {shape:?}")))
        })
        .collect::<LowerResult<Vec<usize>>>()?;
    let spread = ctx.reshape(x, interleaved)?;
    let repeated = broadcast_to(ctx, spread, broadcast)?;
    Ok(vec![ctx.reshape(repeated, out)?])
}

/// Reshape to `split`, permute, reshape to `out`.
fn rearrange(
    ctx: &mut NodeCtx,
    x: ValueId,
    split: Vec<usize>,
    perm: Vec<usize>,
    out: Vec<usize>,
) -> LowerResult<ValueId> {
    let split_value = ctx.reshape(x, split)?;
    let permuted = ctx.push(Op::Transpose { perm }, &[split_value])?;
    ctx.reshape(permuted, out)
}

fn nchw_and_block(ctx: &NodeCtx, x: ValueId) -> LowerResult<([usize; 4], usize)> {
    let shape = ctx.shape(x);
    let dims: [usize; 4] =
        shape.as_slice().try_into().map_err(|_| invalid(format!("input must be 4-D [N, C, H, W], got {shape:?}")))?;
    let block = ctx.attr_int_opt("blocksize")?;
    let block = ctx.required("blocksize", block)?;
    // A block wider than the input could never divide it; the bound also keeps block² exact.
    if block < 1 || block > dims[1].max(dims[2]).max(dims[3]).max(1) as i64 {
        return Err(invalid(format!("blocksize {block} must be positive and at most the input's extents {shape:?}")));
    }
    Ok((dims, block as usize))
}

fn mode(ctx: &NodeCtx) -> LowerResult<String> {
    let mode = ctx.attr_string("mode", "DCR")?;
    if mode != "DCR" && mode != "CRD" {
        return Err(invalid(format!("mode must be DCR or CRD, got '{mode}'")));
    }
    Ok(mode)
}

pub fn depth_to_space(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let ([n, c, h, w], b) = nchw_and_block(ctx, x)?;
    if c % (b * b) != 0 {
        return Err(invalid(format!("channels {c} are not divisible by blocksize² {}", b * b)));
    }
    let c_out = c / (b * b);
    let out = vec![n, c_out, h * b, w * b];
    let y = if mode(ctx)? == "DCR" {
        rearrange(ctx, x, vec![n, b, b, c_out, h, w], vec![0, 3, 4, 1, 5, 2], out)?
    } else {
        rearrange(ctx, x, vec![n, c_out, b, b, h, w], vec![0, 1, 4, 2, 5, 3], out)?
    };
    Ok(vec![y])
}

pub fn space_to_depth(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let ([n, c, h, w], b) = nchw_and_block(ctx, x)?;
    if h % b != 0 || w % b != 0 {
        return Err(invalid(format!("spatial dims {h}x{w} are not divisible by blocksize {b}")));
    }
    let split = vec![n, c, h / b, b, w / b, b];
    let out = vec![n, c * b * b, h / b, w / b];
    let y = if mode(ctx)? == "DCR" {
        rearrange(ctx, x, split, vec![0, 3, 5, 1, 2, 4], out)?
    } else {
        rearrange(ctx, x, split, vec![0, 1, 3, 5, 2, 4], out)?
    };
    Ok(vec![y])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_targets() {
        assert_eq!(reshape_target(&[2, 3, 4], &[0, -1], false).unwrap(), vec![2, 12]);
        assert_eq!(reshape_target(&[2, 3, 4], &[4, 0, 2], false).unwrap(), vec![4, 3, 2]);
        assert_eq!(reshape_target(&[0, 3], &[3, 0], true).unwrap(), vec![3, 0]);
        assert!(reshape_target(&[2, 3], &[-1, -1], false).is_err());
        assert!(reshape_target(&[2, 3], &[4, -1], false).is_err());
        assert!(reshape_target(&[2, 3], &[7], false).is_err());
        assert!(reshape_target(&[2, 3], &[0, 0, 0], false).is_err());
        assert!(reshape_target(&[2, 3], &[-2, 3], false).is_err());
    }
}
