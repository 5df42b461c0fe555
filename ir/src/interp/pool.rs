//! Max and average pooling over any number (>= 1) of spatial axes.

use super::elem::typed;
use crate::op::{PoolAttrs, PoolKind};
use crate::types::{Tensor, TensorData, strides};

/// Along one axis, for one output position: the taps whose input position lies in
/// [0, in) form the span [first, end); `padded` counts taps inside the padded extent
/// [-pad_begin, in + pad_end).
#[derive(Clone, Copy)]
struct AxisWindow {
    start: isize,
    first: usize,
    end: usize,
    padded: usize,
}

fn axis_windows(p: &PoolAttrs, axis: usize, in_extent: usize, out_extent: usize) -> Vec<AxisWindow> {
    let (kernel, stride, dilation) = (p.kernel[axis], p.strides[axis], p.dilations[axis]);
    let (pad_begin, pad_end) = (p.pads_begin[axis] as isize, p.pads_end[axis] as isize);
    (0..out_extent)
        .map(|o| {
            let start = (o * stride) as isize - pad_begin;
            let position = |t: usize| start + (t * dilation) as isize;
            let inside: Vec<usize> = (0..kernel).filter(|&t| (0..in_extent as isize).contains(&position(t))).collect();
            let padded =
                (0..kernel).filter(|&t| (-pad_begin..in_extent as isize + pad_end).contains(&position(t))).count();
            match (inside.first(), inside.last()) {
                (Some(&first), Some(&last)) => AxisWindow { start, first, end: last + 1, padded },
                _ => AxisWindow { start, first: 0, end: 0, padded },
            }
        })
        .collect()
}

/// (x [N, C, *in]) -> [N, C, *out]. Max: padding never wins (an all-padding window is
/// -inf) and NaN propagates. Avg: the sum of the taps inside the input over the divisor
/// of `PoolKind::Avg` (an empty divisor gives NaN).
pub(crate) fn pool(p: &PoolAttrs, x: &Tensor, out_shape: &[usize]) -> Result<Tensor, String> {
    let values = typed::<f32>(&x.data, "pool input")?;
    let rank = x.shape.len() - 2;
    if [&p.kernel, &p.strides, &p.dilations].iter().any(|v| v.contains(&0)) {
        return Err(format!(
            "pool: kernel {:?}, strides {:?} and dilations {:?} must be positive",
            p.kernel, p.strides, p.dilations
        ));
    }
    let in_spatial = &x.shape[2..];
    let out_spatial = &out_shape[2..];
    let in_strides = strides(in_spatial);
    let windows: Vec<Vec<AxisWindow>> = (0..rank).map(|d| axis_windows(p, d, in_spatial[d], out_spatial[d])).collect();
    let in_plane: usize = in_spatial.iter().product();
    let out_plane: usize = out_spatial.iter().product();
    let planes = x.shape[0] * x.shape[1];
    let mut out = Vec::with_capacity(planes * out_plane);
    let mut position = vec![0usize; rank];
    let mut tap = vec![0usize; rank];
    let mut axis = vec![AxisWindow { start: 0, first: 0, end: 0, padded: 0 }; rank];
    for plane in 0..planes {
        let src = &values[plane * in_plane..][..in_plane];
        position.iter_mut().for_each(|v| *v = 0);
        for _ in 0..out_plane {
            for d in 0..rank {
                axis[d] = windows[d][position[d]];
                tap[d] = axis[d].first;
            }
            let empty = axis.iter().any(|a| a.first >= a.end);
            let mut acc = match p.kind {
                PoolKind::Max => f32::NEG_INFINITY,
                PoolKind::Avg { .. } => 0.0,
            };
            if !empty {
                loop {
                    let offset: isize = (0..rank)
                        .map(|d| (axis[d].start + (tap[d] * p.dilations[d]) as isize) * in_strides[d] as isize)
                        .sum();
                    let v = src[offset as usize];
                    acc = match p.kind {
                        PoolKind::Max if v.is_nan() || acc.is_nan() => f32::NAN,
                        PoolKind::Max => acc.max(v),
                        PoolKind::Avg { .. } => acc + v,
                    };
                    if !next_tap(&mut tap, &axis) {
                        break;
                    }
                }
            }
            out.push(match p.kind {
                PoolKind::Max => acc,
                PoolKind::Avg { count_include_pad } => {
                    let divisor: usize = if count_include_pad {
                        axis.iter().map(|a| a.padded).product()
                    } else {
                        axis.iter().map(|a| a.end - a.first).product()
                    };
                    acc / divisor as f32
                }
            });
            step(&mut position, out_spatial);
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: TensorData::F32(out) })
}

/// Advances the tap multi-index within each axis's span; false after the last tap.
fn next_tap(tap: &mut [usize], axis: &[AxisWindow]) -> bool {
    for d in (0..tap.len()).rev() {
        tap[d] += 1;
        if tap[d] < axis[d].end {
            return true;
        }
        tap[d] = axis[d].first;
    }
    false
}

fn step(index: &mut [usize], shape: &[usize]) {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < shape[d] {
            return;
        }
        index[d] = 0;
    }
}
