//! Conv and ConvTranspose (1-D, 2-D, 3-D...; groups, dilations, pads or auto_pad).

use cnnc_ir::{ConvGeometry, Op, TensorType, ValueId};

use super::compose::require_f32;
use super::window::{AutoPad, auto_pad, axis_ints, check_kernel_shape, explicit_pads, forward_pads};
use crate::ctx::{LowerResult, NodeCtx, invalid, to_sizes};

/// The shared operand checks: x [N, C, *in] and w [_, _, *k] of the same rank >= 3, in f32.
fn operands(ctx: &NodeCtx) -> LowerResult<(ValueId, ValueId, Option<ValueId>, usize)> {
    let x = ctx.input(0)?;
    let w = ctx.input(1)?;
    let bias = ctx.opt_input(2);
    let (x_shape, w_shape) = (ctx.shape(x), ctx.shape(w));
    if x_shape.len() < 3 {
        return Err(invalid(format!("input must be [N, C, spatial...] with at least one spatial axis, got {x_shape:?}")));
    }
    if w_shape.len() != x_shape.len() {
        return Err(invalid(format!("weight {w_shape:?} must have the input's rank {}", x_shape.len())));
    }
    if x_shape[2..].contains(&0) || w_shape[2..].contains(&0) {
        return Err(invalid(format!("input {x_shape:?} and weight {w_shape:?} must have non-empty spatial axes")));
    }
    require_f32(ctx, x, &ctx.node.op_type)?;
    Ok((x, w, bias, x_shape.len() - 2))
}

fn group_count(ctx: &NodeCtx) -> LowerResult<usize> {
    let group = ctx.attr_int("group", 1)?;
    usize::try_from(group).ok().filter(|&g| g > 0).ok_or_else(|| invalid(format!("group must be positive, got {group}")))
}

pub fn conv(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (x, w, bias, spatial) = operands(ctx)?;
    let (x_shape, w_shape) = (ctx.shape(x), ctx.shape(w));
    let kernel = w_shape[2..].to_vec();
    check_kernel_shape(ctx, &kernel)?;
    let groups = group_count(ctx)?;
    if x_shape[1] != w_shape[1] * groups || w_shape[0] % groups != 0 {
        return Err(invalid(format!(
            "input channels {} and weight {w_shape:?} disagree with group={groups} (need C = weight[1]·group and weight[0] divisible by group)",
            x_shape[1]
        )));
    }
    let strides = axis_ints(ctx, "strides", spatial, 1)?;
    let dilations = axis_ints(ctx, "dilations", spatial, 1)?;
    let (pads_begin, pads_end) = forward_pads(ctx, &x_shape[2..], &kernel, &strides, &dilations)?;
    let geometry = ConvGeometry { strides, dilations, pads_begin, pads_end, groups };
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    Ok(vec![ctx.push(Op::Conv(geometry), &inputs)?])
}

/// ConvTranspose. Output extent per axis: stride·(in − 1) + output_padding + span − pads,
/// where `output_shape` (or SAME auto_pad, which asks for in·stride) fixes the extent and
/// the pads follow from it as the ONNX spec states (odd totals put the extra padding at the
/// beginning, except for SAME_UPPER). A requested extent larger than the unpadded result
/// leaves the extra positions at the end holding just the bias.
pub fn conv_transpose(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (x, w, bias, spatial) = operands(ctx)?;
    let (x_shape, w_shape) = (ctx.shape(x), ctx.shape(w));
    let kernel = w_shape[2..].to_vec();
    check_kernel_shape(ctx, &kernel)?;
    let groups = group_count(ctx)?;
    if x_shape[1] != w_shape[0] || w_shape[0] % groups != 0 {
        return Err(invalid(format!(
            "input channels {} must equal weight[0] of {w_shape:?}, which must be divisible by group={groups}",
            x_shape[1]
        )));
    }
    let out_channels = w_shape[1] * groups;
    let strides = axis_ints(ctx, "strides", spatial, 1)?;
    let dilations = axis_ints(ctx, "dilations", spatial, 1)?;
    let output_padding = match ctx.attr_ints("output_padding")? {
        None => vec![0; spatial],
        Some(p) if p.len() == spatial => to_sizes(&p, "output_padding")?,
        Some(p) => return Err(invalid(format!("output_padding {p:?} must have one entry per spatial axis ({spatial})"))),
    };
    let mode = auto_pad(ctx)?;
    let requested = match ctx.attr_ints("output_shape")? {
        // output_shape may list all dims or just the spatial ones.
        Some(s) if s.len() == spatial + 2 => Some(to_sizes(&s[2..], "output_shape")?),
        Some(s) if s.len() == spatial => Some(to_sizes(&s, "output_shape")?),
        Some(s) => return Err(invalid(format!("output_shape {s:?} must have one entry per spatial axis ({spatial})"))),
        None if matches!(mode, AutoPad::SameUpper | AutoPad::SameLower) => {
            Some(x_shape[2..].iter().zip(&strides).map(|(&i, &s)| i * s).collect())
        }
        None => None,
    };
    // Without any padding: the extent every input position reaches.
    let full: Vec<usize> = (0..spatial)
        .map(|i| strides[i] * (x_shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1)
        .collect();
    let explicit = ctx.has_attr("pads") && mode == AutoPad::NotSet;
    let (pads_begin, out_spatial) = match requested {
        Some(out) if !explicit => {
            let mut begins = Vec::with_capacity(spatial);
            for i in 0..spatial {
                let total = full[i].saturating_sub(out[i]);
                begins.push(if mode == AutoPad::SameUpper { total / 2 } else { total - total / 2 });
            }
            (begins, out)
        }
        _ => {
            let (begins, ends) = if mode == AutoPad::Valid { (vec![0; spatial], vec![0; spatial]) } else { explicit_pads(ctx, spatial)? };
            let mut out = Vec::with_capacity(spatial);
            for i in 0..spatial {
                let extent = full[i].checked_sub(begins[i] + ends[i]).filter(|&e| e > 0).ok_or_else(|| {
                    invalid(format!("pads {} + {} leave no output on spatial axis {i} of extent {}", begins[i], ends[i], full[i]))
                })?;
                out.push(requested.as_ref().map_or(extent, |r| r[i]));
            }
            (begins, out)
        }
    };
    if out_spatial.contains(&0) {
        return Err(invalid(format!("output spatial extents {out_spatial:?} must be positive")));
    }
    let mut out_shape = vec![x_shape[0], out_channels];
    out_shape.extend(&out_spatial);
    let geometry = ConvGeometry { strides, dilations, pads_begin, pads_end: vec![0; spatial], groups };
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    Ok(vec![ctx.push_typed(Op::ConvTranspose(geometry), &inputs, TensorType::f32(out_shape))?])
}
