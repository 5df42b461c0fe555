//! Resize (opsets 10-19+) and Upsample (7, 9): one `Resample` per resized axis, its index
//! and weight tables computed here from the ONNX coordinate rules (in f64, as the ONNX
//! reference does). Nearest resizes of non-f32 data become a `Gather` with the same indices.

use cnnc_ir::{DType, Op, Tensor, TensorData, ValueId};

use crate::ctx::{LowerResult, NodeCtx, invalid, normalize_axes, unsupported};

/// How an output position maps back to a source coordinate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coordinates {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNn,
    HalfPixelSymmetric,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nearest {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
    /// Resize-10 and Upsample (ONNX Runtime's rule): floor when enlarging, ceil when shrinking.
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interpolation {
    Nearest(Nearest),
    Linear,
}

/// One resized axis: its input and output extents and the scale the coordinates use.
#[derive(Clone, Copy, Debug)]
struct AxisResize {
    axis: usize,
    input: usize,
    output: usize,
    scale: f64,
}

/// The interpolation tables of one axis: out[i] = x[lo[i]]·(1 − w[i]) + x[hi[i]]·w[i].
#[derive(Clone, Debug, PartialEq)]
struct Tables {
    lo: Vec<usize>,
    hi: Vec<usize>,
    weight_hi: Vec<f32>,
}

/// The source coordinate of output position `y`. As in the ONNX reference, align_corners and
/// pytorch_half_pixel use the unrounded output length in·scale (so a 0.6 scale of 4 aligns
/// the corners of a 2.4-long output).
fn source_coordinate(mode: Coordinates, y: usize, r: &AxisResize) -> f64 {
    let (y, input, scale) = (y as f64, r.input as f64, r.scale);
    let length = input * scale;
    let single = (length - 1.0).abs() < 1e-9;
    match mode {
        Coordinates::HalfPixel => (y + 0.5) / scale - 0.5,
        Coordinates::PytorchHalfPixel if single => -0.5,
        Coordinates::PytorchHalfPixel => (y + 0.5) / scale - 0.5,
        Coordinates::AlignCorners if single => 0.0,
        Coordinates::AlignCorners => y * (input - 1.0) / (length - 1.0),
        Coordinates::Asymmetric => y / scale,
        Coordinates::TfHalfPixelForNn => (y + 0.5) / scale,
        Coordinates::HalfPixelSymmetric => {
            let adjustment = r.output as f64 / (scale * input);
            let offset = input / 2.0 * (1.0 - adjustment);
            offset + (y + 0.5) / scale - 0.5
        }
    }
}

fn axis_tables(interpolation: Interpolation, mode: Coordinates, r: &AxisResize) -> Tables {
    let last = r.input as f64 - 1.0;
    let clamp = |i: f64| i.clamp(0.0, last) as usize;
    let mut tables = Tables { lo: Vec::with_capacity(r.output), hi: Vec::with_capacity(r.output), weight_hi: Vec::new() };
    for y in 0..r.output {
        let x = source_coordinate(mode, y, r);
        let floor = x.floor();
        let fraction = x - floor;
        let (lo, hi, weight) = match interpolation {
            Interpolation::Linear if fraction == 0.0 => (clamp(x), clamp(x), 0.0),
            Interpolation::Linear => {
                let (lo, hi) = (clamp(floor), clamp(floor + 1.0));
                (lo, hi, if lo == hi { 0.0 } else { fraction as f32 })
            }
            Interpolation::Nearest(rule) => {
                let up = match rule {
                    _ if fraction == 0.0 => false,
                    Nearest::RoundPreferFloor => fraction > 0.5,
                    Nearest::RoundPreferCeil => fraction >= 0.5,
                    Nearest::Floor => false,
                    Nearest::Ceil => true,
                    Nearest::Legacy => r.scale < 1.0,
                };
                let index = clamp(if up { floor + 1.0 } else { floor });
                (index, index, 0.0)
            }
        };
        tables.lo.push(lo);
        tables.hi.push(hi);
        tables.weight_hi.push(weight);
    }
    tables
}

/// Applies the tables axis by axis.
fn resample(ctx: &mut NodeCtx, x: ValueId, interpolation: Interpolation, mode: Coordinates, axes: &[AxisResize]) -> LowerResult<ValueId> {
    let dtype = ctx.dtype(x);
    if dtype != DType::F32 && interpolation == Interpolation::Linear {
        return Err(unsupported(format!("linear resizing of {dtype} tensors (cnnc interpolates f32 only)")));
    }
    let mut y = x;
    for r in axes {
        let tables = axis_tables(interpolation, mode, r);
        y = if dtype == DType::F32 {
            ctx.push(Op::Resample { axis: r.axis, lo: tables.lo, hi: tables.hi, weight_hi: tables.weight_hi }, &[y])?
        } else {
            let indices: Vec<i64> = tables.lo.iter().map(|&i| i as i64).collect();
            let indices = ctx.constant(Tensor::new(vec![indices.len()], TensorData::I64(indices)));
            ctx.push(Op::Gather { axis: r.axis }, &[y, indices])?
        };
    }
    Ok(y)
}

/// Per-axis plans from constant scales: output extent floor(in·scale).
fn from_scales(shape: &[usize], axes: &[usize], scales: &[f32]) -> LowerResult<Vec<AxisResize>> {
    if scales.len() != axes.len() {
        return Err(invalid(format!("scales {scales:?} must have one entry per resized axis ({})", axes.len())));
    }
    let mut plans = Vec::new();
    for (&axis, &scale) in axes.iter().zip(scales) {
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(invalid(format!("scale {scale} of axis {axis} must be positive and finite")));
        }
        let scale = scale as f64;
        let output = (shape[axis] as f64 * scale).floor() as usize;
        plans.push(AxisResize { axis, input: shape[axis], output, scale });
    }
    Ok(plans)
}

/// Per-axis plans from constant output sizes; `not_larger`/`not_smaller` (opset 18) apply one
/// scale, the smallest or largest of the per-axis ones, to every resized axis.
fn from_sizes(shape: &[usize], axes: &[usize], sizes: &[i64], policy: &str) -> LowerResult<Vec<AxisResize>> {
    if sizes.len() != axes.len() {
        return Err(invalid(format!("sizes {sizes:?} must have one entry per resized axis ({})", axes.len())));
    }
    let mut plans = Vec::new();
    for (&axis, &size) in axes.iter().zip(sizes) {
        let output = usize::try_from(size).map_err(|_| invalid(format!("size {size} of axis {axis} must be non-negative")))?;
        if shape[axis] == 0 {
            return Err(invalid(format!("cannot resize axis {axis}: it is empty")));
        }
        plans.push(AxisResize { axis, input: shape[axis], output, scale: output as f64 / shape[axis] as f64 });
    }
    let common = match policy {
        "stretch" => return Ok(plans),
        "not_larger" => plans.iter().map(|p| p.scale).fold(f64::INFINITY, f64::min),
        "not_smaller" => plans.iter().map(|p| p.scale).fold(0.0, f64::max),
        other => return Err(invalid(format!("keep_aspect_ratio_policy must be stretch, not_larger or not_smaller, got '{other}'"))),
    };
    for p in &mut plans {
        p.scale = common;
        p.output = (common * p.input as f64 + 0.5).floor() as usize;
    }
    Ok(plans)
}

/// Tables larger than this (per axis) are refused: they come from absurd scales or sizes.
const MAX_EXTENT: usize = 1 << 28;

/// Drops axes that stay as they are (scale 1, same extent); refuses absurd extents.
fn resized_only(plans: Vec<AxisResize>) -> LowerResult<Vec<AxisResize>> {
    if let Some(p) = plans.iter().find(|p| p.output > MAX_EXTENT) {
        return Err(unsupported(format!("an output extent of {} on axis {} (at most {MAX_EXTENT})", p.output, p.axis)));
    }
    Ok(plans.into_iter().filter(|p| !((p.scale - 1.0).abs() <= 1e-9 && p.output == p.input)).collect())
}

fn coordinates(name: &str) -> LowerResult<Coordinates> {
    Ok(match name {
        "half_pixel" => Coordinates::HalfPixel,
        "pytorch_half_pixel" => Coordinates::PytorchHalfPixel,
        "align_corners" => Coordinates::AlignCorners,
        "asymmetric" => Coordinates::Asymmetric,
        "tf_half_pixel_for_nn" => Coordinates::TfHalfPixelForNn,
        "half_pixel_symmetric" => Coordinates::HalfPixelSymmetric,
        "tf_crop_and_resize" => {
            return Err(unsupported("coordinate_transformation_mode tf_crop_and_resize (region of interest with extrapolation)"));
        }
        other => return Err(invalid(format!("unknown coordinate_transformation_mode '{other}'"))),
    })
}

fn nearest_rule(name: &str) -> LowerResult<Nearest> {
    Ok(match name {
        "round_prefer_floor" => Nearest::RoundPreferFloor,
        "round_prefer_ceil" => Nearest::RoundPreferCeil,
        "floor" => Nearest::Floor,
        "ceil" => Nearest::Ceil,
        other => return Err(invalid(format!("unknown nearest_mode '{other}'"))),
    })
}

/// Nearest or linear (ONNX before opset 11 also says "bilinear"/"trilinear" in some
/// exporters); cubic is refused.
fn interpolation(mode: &str, nearest: Nearest) -> LowerResult<Interpolation> {
    match mode {
        "nearest" => Ok(Interpolation::Nearest(nearest)),
        "linear" | "bilinear" | "trilinear" => Ok(Interpolation::Linear),
        "cubic" => Err(unsupported("mode cubic (bicubic interpolation)")),
        other => Err(invalid(format!("mode must be nearest, linear or cubic, got '{other}'"))),
    }
}

/// A constant float tensor operand, None when absent or empty (Resize-11 passes an empty
/// `scales` when `sizes` is given).
fn const_floats(ctx: &NodeCtx, i: usize) -> LowerResult<Option<Vec<f32>>> {
    match ctx.const_input(i)? {
        None => Ok(None),
        Some(t) if t.numel() == 0 => Ok(None),
        Some(t) => match t.data.cast(DType::F32) {
            TensorData::F32(v) => Ok(Some(v)),
            _ => Err(invalid(format!("input {i} must be a float tensor"))),
        },
    }
}

pub fn resize(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let rank = shape.len();
    let mode_name = ctx.attr_string("mode", "nearest")?;
    let (coordinate_mode, nearest) = if ctx.opset < 11 {
        (Coordinates::Asymmetric, Nearest::Legacy)
    } else {
        (
            coordinates(&ctx.attr_string("coordinate_transformation_mode", "half_pixel")?)?,
            nearest_rule(&ctx.attr_string("nearest_mode", "round_prefer_floor")?)?,
        )
    };
    let interpolation = interpolation(&mode_name, nearest)?;
    let axes = match ctx.attr_ints("axes")? {
        Some(axes) if ctx.opset >= 18 => normalize_axes(&axes, rank)?,
        _ => (0..rank).collect(),
    };
    let (scales, sizes) = if ctx.opset < 11 {
        (const_floats(ctx, 1)?, None)
    } else {
        (const_floats(ctx, 2)?, ctx.const_ints(3)?.filter(|s| !s.is_empty()))
    };
    let plans = match (scales, sizes) {
        (Some(scales), None) => from_scales(&shape, &axes, &scales)?,
        (None, Some(sizes)) => {
            let policy = if ctx.opset >= 18 { ctx.attr_string("keep_aspect_ratio_policy", "stretch")? } else { "stretch".to_string() };
            from_sizes(&shape, &axes, &sizes, &policy)?
        }
        (Some(_), Some(_)) => return Err(invalid("only one of scales and sizes may be given")),
        (None, None) => return Err(invalid("one of scales and sizes must be given")),
    };
    let plans = resized_only(plans)?;
    if ctx.attr_int("antialias", 0)? != 0 && plans.iter().any(|p| p.scale < 1.0) {
        return Err(unsupported("antialias=1 when downsampling (an antialiasing filter wider than the interpolation)"));
    }
    Ok(vec![resample(ctx, x, interpolation, coordinate_mode, &plans)?])
}

/// Upsample: scales from the attribute (opset 7) or the constant input 1 (opset 9);
/// asymmetric coordinates.
pub fn upsample(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let x = ctx.input(0)?;
    let shape = ctx.shape(x);
    let scales = if ctx.opset < 9 {
        let scales = ctx.attr_floats("scales")?;
        ctx.required("scales", scales)?
    } else {
        const_floats(ctx, 1)?.ok_or_else(|| invalid("input 1 (scales) is required"))?
    };
    let interpolation = interpolation(&ctx.attr_string("mode", "nearest")?, Nearest::Legacy)?;
    let axes: Vec<usize> = (0..shape.len()).collect();
    let plans = resized_only(from_scales(&shape, &axes, &scales)?)?;
    Ok(vec![resample(ctx, x, interpolation, Coordinates::Asymmetric, &plans)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(input: usize, output: usize, scale: f64) -> AxisResize {
        AxisResize { axis: 0, input, output, scale }
    }

    #[test]
    fn linear_half_pixel_upsampling_by_two() {
        let t = axis_tables(Interpolation::Linear, Coordinates::HalfPixel, &plan(2, 4, 2.0));
        // Source coordinates -0.25, 0.25, 0.75, 1.25: the ends clamp to the edge.
        assert_eq!(t.lo, vec![0, 0, 0, 1]);
        assert_eq!(t.hi, vec![0, 1, 1, 1]);
        assert_eq!(t.weight_hi, vec![0.0, 0.25, 0.75, 0.0]);
    }

    #[test]
    fn nearest_rules_differ_only_on_ties() {
        // asymmetric, scale 2/3 reversed: coordinates 0, 1.5, 3.
        let r = plan(4, 3, 2.0 / 3.0);
        let index = |rule| axis_tables(Interpolation::Nearest(rule), Coordinates::Asymmetric, &r).lo;
        assert_eq!(index(Nearest::RoundPreferFloor), vec![0, 1, 3]);
        assert_eq!(index(Nearest::RoundPreferCeil), vec![0, 2, 3]);
        assert_eq!(index(Nearest::Floor), vec![0, 1, 3]);
        assert_eq!(index(Nearest::Ceil), vec![0, 2, 3]);
        assert_eq!(index(Nearest::Legacy), vec![0, 2, 3]);
    }

    #[test]
    fn align_corners_maps_ends_to_ends() {
        let t = axis_tables(Interpolation::Linear, Coordinates::AlignCorners, &plan(3, 5, 5.0 / 3.0));
        assert_eq!(t.lo, vec![0, 0, 1, 1, 2]);
        assert_eq!(t.weight_hi, vec![0.0, 0.5, 0.0, 0.5, 0.0]);
    }
}
