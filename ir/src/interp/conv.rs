//! Conv and ConvTranspose over any number (>= 1) of spatial axes.
//!
//! Both are sums of "one kernel tap times one shifted plane": for tap t, iterated
//! position a and strided position b = a·stride + t·dilation − pad_begin (per axis),
//! Conv does out[a] += x[b]·w[t] and ConvTranspose does out[b] += x[a]·w[t]. A `TapPlan`
//! lists, once per tap, which rows (all axes but the last) of the two planes meet and
//! which span of the last axis stays inside, so the inner loops are bound-check-free
//! runs over contiguous memory. Each output element accumulates in f32 in the order
//! (input channel, kernel tap), then the bias is added.

use super::elem::typed;
use crate::op::ConvGeometry;
use crate::types::{Tensor, TensorData, strides};

/// Where one kernel tap reads and writes.
struct TapPlan {
    /// Valid span [lo, hi) of the iterated plane's last axis.
    lo: usize,
    hi: usize,
    /// For each row of the iterated plane that meets the strided plane: the row's flat
    /// start in the iterated plane, and the strided plane's flat offset of position
    /// 0 along the last axis (negative when that position lies in the padding).
    rows: Vec<(usize, isize)>,
}

/// Number of a in [0, a_extent) with 0 <= a·stride + offset < b_extent, as a span.
fn valid_span(a_extent: usize, b_extent: usize, stride: usize, offset: isize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if offset >= 0 { 0 } else { ((-offset) + s - 1) / s };
    let last_b = b_extent as isize - 1 - offset;
    let hi = if last_b < 0 { 0 } else { (last_b / s + 1).min(a_extent as isize) };
    let lo = (lo as usize).min(a_extent);
    (lo, (hi as usize).max(lo))
}

/// Plans for every tap of a kernel of extent `kernel`, iterating plane `a_shape` and
/// addressing plane `b_shape` (spatial shapes only).
fn plan_taps(a_shape: &[usize], b_shape: &[usize], kernel: &[usize], g: &ConvGeometry) -> Vec<TapPlan> {
    let rank = a_shape.len();
    let last = rank - 1;
    let a_strides = strides(a_shape);
    let b_strides = strides(b_shape);
    let tap_count: usize = kernel.iter().product();
    let row_count: usize = a_shape[..last].iter().product();
    let mut plans = Vec::with_capacity(tap_count);
    let mut tap = vec![0usize; rank];
    let mut row = vec![0usize; last];
    for _ in 0..tap_count {
        let offset = |d: usize| (tap[d] * g.dilations[d]) as isize - g.pads_begin[d] as isize;
        let (lo, hi) = valid_span(a_shape[last], b_shape[last], g.strides[last], offset(last));
        let mut rows = Vec::new();
        if lo < hi {
            row.iter_mut().for_each(|r| *r = 0);
            for _ in 0..row_count {
                let mut a_start = 0;
                let mut b_start = offset(last);
                let mut inside = true;
                for d in 0..last {
                    let b = (row[d] * g.strides[d]) as isize + offset(d);
                    inside &= b >= 0 && b < b_shape[d] as isize;
                    a_start += row[d] * a_strides[d];
                    b_start += b * b_strides[d] as isize;
                }
                if inside {
                    rows.push((a_start, b_start));
                }
                advance(&mut row, &a_shape[..last]);
            }
        }
        plans.push(TapPlan { lo, hi, rows });
        advance(&mut tap, kernel);
    }
    plans
}

/// Steps a row-major multi-index; wraps to all zeros after the last one.
fn advance(index: &mut [usize], shape: &[usize]) {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < shape[d] {
            return;
        }
        index[d] = 0;
    }
}

/// Conv: out[a] += x[a·stride + offset]·w for every planned row.
fn gather_tap(out: &mut [f32], x: &[f32], plan: &TapPlan, stride: usize, w: f32) {
    let (lo, hi) = (plan.lo, plan.hi);
    for &(a_start, b_base) in &plan.rows {
        let dst = &mut out[a_start + lo..a_start + hi];
        let first = (b_base + (lo * stride) as isize) as usize;
        if stride == 1 {
            for (o, &v) in dst.iter_mut().zip(&x[first..first + (hi - lo)]) {
                *o += v * w;
            }
        } else {
            for (o, &v) in dst.iter_mut().zip(x[first..].iter().step_by(stride)) {
                *o += v * w;
            }
        }
    }
}

/// ConvTranspose: out[a·stride + offset] += x[a]·w for every planned row.
fn scatter_tap(out: &mut [f32], x: &[f32], plan: &TapPlan, stride: usize, w: f32) {
    let (lo, hi) = (plan.lo, plan.hi);
    for &(a_start, b_base) in &plan.rows {
        let src = &x[a_start + lo..a_start + hi];
        let first = (b_base + (lo * stride) as isize) as usize;
        for (o, &v) in out[first..].iter_mut().step_by(stride).zip(src) {
            *o += v * w;
        }
    }
}

struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    bias: Option<&'a [f32]>,
}

fn operands<'a>(what: &str, inputs: &[&'a Tensor]) -> Result<Operands<'a>, String> {
    let x = typed::<f32>(&inputs[0].data, &format!("{what} input"))?;
    let w = typed::<f32>(&inputs[1].data, &format!("{what} weight"))?;
    let bias = match inputs.get(2) {
        Some(b) => Some(typed::<f32>(&b.data, &format!("{what} bias"))?),
        None => None,
    };
    Ok(Operands { x, w, bias })
}

fn add_bias(plane: &mut [f32], bias: Option<&[f32]>, channel: usize) {
    if let Some(b) = bias {
        plane.iter_mut().for_each(|v| *v += b[channel]);
    }
}

/// (x [N, C, *in], w [M, C/groups, *k], bias [M]?) -> [N, M, *out].
pub(crate) fn conv(g: &ConvGeometry, inputs: &[&Tensor], out_shape: &[usize]) -> Result<Tensor, String> {
    let Operands { x, w, bias } = operands("conv", inputs)?;
    let (x_shape, w_shape) = (&inputs[0].shape, &inputs[1].shape);
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], w_shape[0]);
    let (in_group, out_group) = (channels / g.groups, outputs / g.groups);
    let in_plane: usize = x_shape[2..].iter().product();
    let out_plane: usize = out_shape[2..].iter().product();
    let taps: usize = w_shape[2..].iter().product();
    let last_stride = *g.strides.last().expect("conv has a spatial axis");
    let plans = plan_taps(&out_shape[2..], &x_shape[2..], &w_shape[2..], g);
    let mut out = vec![0f32; batch * outputs * out_plane];
    for n in 0..batch {
        for m in 0..outputs {
            let group = m / out_group;
            let dst = &mut out[(n * outputs + m) * out_plane..][..out_plane];
            for ci in 0..in_group {
                let c = group * in_group + ci;
                let src = &x[(n * channels + c) * in_plane..][..in_plane];
                let kernel = &w[(m * in_group + ci) * taps..][..taps];
                for (plan, &wv) in plans.iter().zip(kernel) {
                    gather_tap(dst, src, plan, last_stride, wv);
                }
            }
            add_bias(dst, bias, m);
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: TensorData::F32(out) })
}

/// (x [N, C, *in], w [C, M/groups, *k], bias [M]?) -> [N, M, *out]; output positions
/// no input reaches hold just the bias.
pub(crate) fn conv_transpose(g: &ConvGeometry, inputs: &[&Tensor], out_shape: &[usize]) -> Result<Tensor, String> {
    let Operands { x, w, bias } = operands("conv_transpose", inputs)?;
    let (x_shape, w_shape) = (&inputs[0].shape, &inputs[1].shape);
    let (batch, channels, outputs) = (x_shape[0], x_shape[1], out_shape[1]);
    let (in_group, out_group) = (channels / g.groups, w_shape[1]);
    let in_plane: usize = x_shape[2..].iter().product();
    let out_plane: usize = out_shape[2..].iter().product();
    let taps: usize = w_shape[2..].iter().product();
    let last_stride = *g.strides.last().expect("conv_transpose has a spatial axis");
    let plans = plan_taps(&x_shape[2..], &out_shape[2..], &w_shape[2..], g);
    let mut out = vec![0f32; batch * outputs * out_plane];
    for n in 0..batch {
        for m in 0..outputs {
            let (group, mo) = (m / out_group, m % out_group);
            let dst = &mut out[(n * outputs + m) * out_plane..][..out_plane];
            for ci in 0..in_group {
                let c = group * in_group + ci;
                let src = &x[(n * channels + c) * in_plane..][..in_plane];
                let kernel = &w[(c * out_group + mo) * taps..][..taps];
                for (plan, &wv) in plans.iter().zip(kernel) {
                    scatter_tap(dst, src, plan, last_stride, wv);
                }
            }
            add_bias(dst, bias, m);
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: TensorData::F32(out) })
}
