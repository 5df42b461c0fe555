//! Sliding-window attributes shared by Conv, ConvTranspose and the pools: per-axis ints with
//! defaults, and padding from `pads` or `auto_pad`.

use crate::ctx::{LowerResult, NodeCtx, invalid, to_sizes};

/// How the node asks for padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit `pads` (default zeros).
    NotSet,
    Valid,
    /// Output extent ceil(in / stride); an odd total padding puts the extra at the end.
    SameUpper,
    /// As SameUpper, with the extra padding at the beginning.
    SameLower,
}

pub fn auto_pad(ctx: &NodeCtx) -> LowerResult<AutoPad> {
    match ctx.attr_string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" | "" => Ok(AutoPad::NotSet),
        "VALID" => Ok(AutoPad::Valid),
        "SAME_UPPER" => Ok(AutoPad::SameUpper),
        "SAME_LOWER" => Ok(AutoPad::SameLower),
        other => Err(invalid(format!("auto_pad must be NOTSET, VALID, SAME_UPPER or SAME_LOWER, got '{other}'"))),
    }
}

/// A per-spatial-axis attribute (strides, dilations...): `spatial` positive values, or
/// `default` for each axis when absent.
pub fn axis_ints(ctx: &NodeCtx, name: &str, spatial: usize, default: usize) -> LowerResult<Vec<usize>> {
    match ctx.attr_ints(name)? {
        None => Ok(vec![default; spatial]),
        Some(values) => {
            if values.len() != spatial {
                return Err(invalid(format!("{name} {values:?} must have one entry per spatial axis ({spatial})")));
            }
            let sizes = to_sizes(&values, name)?;
            if sizes.contains(&0) {
                return Err(invalid(format!("{name} {values:?} must be positive")));
            }
            Ok(sizes)
        }
    }
}

/// The `kernel_shape` attribute, checked against the kernel extents the weight implies.
pub fn check_kernel_shape(ctx: &NodeCtx, kernel: &[usize]) -> LowerResult<()> {
    if let Some(attr) = ctx.attr_ints("kernel_shape")?
        && (attr.len() != kernel.len() || attr.iter().zip(kernel).any(|(&a, &k)| a != k as i64))
    {
        return Err(invalid(format!("kernel_shape {attr:?} disagrees with the weight's kernel extents {kernel:?}")));
    }
    Ok(())
}

/// The explicit `pads` attribute as (begins, ends), zeros when absent.
pub fn explicit_pads(ctx: &NodeCtx, spatial: usize) -> LowerResult<(Vec<usize>, Vec<usize>)> {
    match ctx.attr_ints("pads")? {
        None => Ok((vec![0; spatial], vec![0; spatial])),
        Some(pads) => {
            if pads.len() != 2 * spatial {
                return Err(invalid(format!("pads {pads:?} must have 2 entries per spatial axis ({spatial})")));
            }
            let pads = to_sizes(&pads, "pads")?;
            Ok((pads[..spatial].to_vec(), pads[spatial..].to_vec()))
        }
    }
}

/// Padding (begins, ends) of a forward window (Conv, pools) over `input` extents.
pub fn forward_pads(
    ctx: &NodeCtx,
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
) -> LowerResult<(Vec<usize>, Vec<usize>)> {
    let spatial = input.len();
    let mode = auto_pad(ctx)?;
    match mode {
        AutoPad::NotSet => explicit_pads(ctx, spatial),
        AutoPad::Valid => Ok((vec![0; spatial], vec![0; spatial])),
        AutoPad::SameUpper | AutoPad::SameLower => {
            let mut begins = Vec::with_capacity(spatial);
            let mut ends = Vec::with_capacity(spatial);
            for i in 0..spatial {
                let out = input[i].div_ceil(strides[i]);
                let span = (kernel[i] - 1) * dilations[i] + 1;
                let total = ((out.max(1) - 1) * strides[i] + span).saturating_sub(input[i]);
                let (small, large) = (total / 2, total - total / 2);
                if mode == AutoPad::SameUpper {
                    begins.push(small);
                    ends.push(large);
                } else {
                    begins.push(large);
                    ends.push(small);
                }
            }
            Ok((begins, ends))
        }
    }
}

/// Output extent of a forward window: floor (or ceil) of (padded − span) / stride, plus one;
/// in ceil mode the last window must start inside the input or its leading padding.
pub fn window_out_extent(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    pad_end: usize,
    ceil_mode: bool,
) -> LowerResult<usize> {
    let span = (kernel - 1) * dilation + 1;
    let padded = input + pad_begin + pad_end;
    if padded < span {
        return Err(invalid(format!(
            "a window of extent {span} (kernel {kernel}, dilation {dilation}) does not fit the padded input extent {padded}"
        )));
    }
    let room = padded - span;
    if !ceil_mode {
        return Ok(room / stride + 1);
    }
    let mut out = room.div_ceil(stride) + 1;
    if (out - 1) * stride >= input + pad_begin {
        out -= 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::window_out_extent;

    #[test]
    fn output_extents_follow_the_onnx_rules() {
        // floor((5 + 0 - 2) / 2) + 1 = 2; ceil gives 3.
        assert_eq!(window_out_extent(5, 2, 2, 1, 0, 0, false).unwrap(), 2);
        assert_eq!(window_out_extent(5, 2, 2, 1, 0, 0, true).unwrap(), 3);
        // Ceil mode whose last window would start past the input loses it.
        assert_eq!(window_out_extent(2, 1, 2, 1, 0, 0, true).unwrap(), 1);
        assert_eq!(window_out_extent(5, 1, 2, 1, 0, 1, true).unwrap(), 3);
        assert_eq!(window_out_extent(5, 1, 2, 1, 0, 1, false).unwrap(), 3);
        // Dilation widens the window: span 5 over 7 -> 3.
        assert_eq!(window_out_extent(7, 3, 1, 2, 0, 0, false).unwrap(), 3);
        assert!(window_out_extent(2, 3, 1, 1, 0, 0, false).is_err());
    }
}
