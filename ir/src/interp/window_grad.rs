//! The gradients of window ops that training graphs compute directly: max pooling's
//! input gradient (`PoolGrad`) and a convolution's weight gradient (`ConvWeightGrad`),
//! over any number (>= 1) of spatial axes.

use super::elem::typed;
use crate::op::{ConvGeometry, PoolAttrs};
use crate::types::{Tensor, TensorData, strides};

/// Steps a row-major multi-index; false (and all zeros) after the last one.
fn step(index: &mut [usize], shape: &[usize]) -> bool {
    for d in (0..index.len()).rev() {
        index[d] += 1;
        if index[d] < shape[d] {
            return true;
        }
        index[d] = 0;
    }
    false
}

/// Flat offset in a plane of `extent` of the window position `o·stride − pad + tap·dilation`,
/// or None when it falls outside.
fn window_offset(
    out_pos: &[usize],
    tap: &[usize],
    extent: &[usize],
    plane_strides: &[usize],
    stride: &[usize],
    dilation: &[usize],
    pad_begin: &[usize],
) -> Option<usize> {
    let mut offset = 0;
    for d in 0..extent.len() {
        let p = (out_pos[d] * stride[d] + tap[d] * dilation[d]) as isize - pad_begin[d] as isize;
        if p < 0 || p >= extent[d] as isize {
            return None;
        }
        offset += p as usize * plane_strides[d];
    }
    Some(offset)
}

/// (x [N, C, *in], dy [N, C, *out]) -> dx: each window's dy goes to its first maximum.
pub(crate) fn pool_grad(p: &PoolAttrs, x: &Tensor, dy: &Tensor) -> Result<Tensor, String> {
    let values = typed::<f32>(&x.data, "pool_grad input")?;
    let grads = typed::<f32>(&dy.data, "pool_grad gradient")?;
    let in_spatial = &x.shape[2..];
    let out_spatial = &dy.shape[2..];
    let in_strides = strides(in_spatial);
    let in_plane: usize = in_spatial.iter().product();
    let out_plane: usize = out_spatial.iter().product();
    let planes = x.shape[0] * x.shape[1];
    let rank = in_spatial.len();
    let mut dx = vec![0f32; planes * in_plane];
    let mut position = vec![0usize; rank];
    let mut tap = vec![0usize; rank];
    for plane in 0..planes {
        let src = &values[plane * in_plane..][..in_plane];
        let dst = &mut dx[plane * in_plane..][..in_plane];
        for o in 0..out_plane {
            let mut best: Option<(usize, f32)> = None;
            loop {
                if let Some(at) =
                    window_offset(&position, &tap, in_spatial, &in_strides, &p.strides, &p.dilations, &p.pads_begin)
                {
                    let v = src[at];
                    let wins = match best {
                        None => true,
                        Some((_, b)) => !b.is_nan() && (v.is_nan() || v > b),
                    };
                    if wins {
                        best = Some((at, v));
                    }
                }
                if !step(&mut tap, &p.kernel) {
                    break;
                }
            }
            if let Some((at, _)) = best {
                dst[at] += grads[plane * out_plane + o];
            }
            step(&mut position, out_spatial);
        }
    }
    Ok(Tensor { shape: x.shape.clone(), data: TensorData::F32(dx) })
}

/// (x [N, C, *in], dy [N, M, *out]) -> dw [M, C/groups, *k].
pub(crate) fn conv_weight_grad(g: &ConvGeometry, x: &Tensor, dy: &Tensor, out_shape: &[usize]) -> Result<Tensor, String> {
    let values = typed::<f32>(&x.data, "conv_weight_grad input")?;
    let grads = typed::<f32>(&dy.data, "conv_weight_grad gradient")?;
    let (batch, channels, maps) = (x.shape[0], x.shape[1], dy.shape[1]);
    let channels_per_group = channels / g.groups;
    let maps_per_group = maps / g.groups;
    let in_spatial = &x.shape[2..];
    let out_spatial = &dy.shape[2..];
    let kernel = &out_shape[2..];
    let in_strides = strides(in_spatial);
    let in_plane: usize = in_spatial.iter().product();
    let out_plane: usize = out_spatial.iter().product();
    let taps: usize = kernel.iter().product();
    let rank = in_spatial.len();
    let mut dw = vec![0f32; maps * channels_per_group * taps];
    let mut tap = vec![0usize; rank];
    let mut position = vec![0usize; rank];
    for m in 0..maps {
        let group = m / maps_per_group;
        for c in 0..channels_per_group {
            let channel = group * channels_per_group + c;
            for t in 0..taps {
                let mut acc = 0f32;
                for n in 0..batch {
                    let src = &values[(n * channels + channel) * in_plane..][..in_plane];
                    let grad = &grads[(n * maps + m) * out_plane..][..out_plane];
                    for &dy_value in grad {
                        if let Some(at) =
                            window_offset(&position, &tap, in_spatial, &in_strides, &g.strides, &g.dilations, &g.pads_begin)
                        {
                            acc += dy_value * src[at];
                        }
                        step(&mut position, out_spatial);
                    }
                }
                dw[(m * channels_per_group + c) * taps + t] = acc;
                step(&mut tap, kernel);
            }
        }
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: TensorData::F32(dw) })
}
