//! Data movement: Reshape, Transpose, Slice, Pad, Concat, Broadcast, Gather,
//! GatherElements and Resample. Most build the source offset of every output element
//! and then copy (`take`), which keeps each op's index rule in one visible place.

use super::elem::{Elem, FILL, broadcast_offsets, strided_offsets, take, take_or_fill, typed, with_elem};
use crate::op::PadMode;
use crate::types::{Tensor, TensorData, strides};

pub(crate) fn reshape(x: &Tensor, out_shape: &[usize]) -> Result<Tensor, String> {
    if out_shape.iter().product::<usize>() != x.numel() {
        return Err(format!(
            "reshape: {:?} has {} elements, {:?} needs a different count",
            x.shape,
            x.numel(),
            out_shape
        ));
    }
    Ok(Tensor { shape: out_shape.to_vec(), data: x.data.clone() })
}

/// Output axis d is input axis perm[d].
pub(crate) fn transpose(perm: &[usize], x: &Tensor) -> Result<Tensor, String> {
    let rank = x.shape.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
        return Err(format!("transpose: {perm:?} is not a permutation of {rank} axes"));
    }
    let in_strides = strides(&x.shape);
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let steps: Vec<isize> = perm.iter().map(|&p| in_strides[p] as isize).collect();
    let data = take(&x.data, &strided_offsets(&shape, 0, &steps));
    Ok(Tensor { shape, data })
}

/// out[i] = x[start + i·step] per axis; the caller has checked the reads stay inside.
pub(crate) fn slice(starts: &[usize], steps: &[i64], x: &Tensor, out_shape: &[usize]) -> Result<Tensor, String> {
    let in_strides = strides(&x.shape);
    let base: isize = starts.iter().zip(&in_strides).map(|(&s, &st)| (s * st) as isize).sum();
    let moves: Vec<isize> = steps.iter().zip(&in_strides).map(|(&s, &st)| s as isize * st as isize).collect();
    let data = take(&x.data, &strided_offsets(out_shape, base, &moves));
    Ok(Tensor { shape: out_shape.to_vec(), data })
}

/// Per output position of one axis, the source position or `FILL`. Negative pads crop
/// first and positive pads then extend the cropped axis (ONNX Runtime's order), so
/// Reflect, Edge and Wrap read the cropped data. Reflect is numpy's 'reflect' (the
/// edge element is not repeated), applied repeatedly when the pad exceeds the extent.
fn pad_axis(extent: usize, begin: i64, end: i64, mode: &PadMode) -> Result<Vec<usize>, String> {
    let crop_begin = (-begin).max(0) as usize;
    let crop_end = (-end).max(0) as usize;
    if crop_begin + crop_end > extent {
        return Err(format!("pad: crops {crop_begin}+{crop_end} exceed the extent {extent}"));
    }
    let kept = (extent - crop_begin - crop_end) as i64;
    let (pad_begin, pad_end) = (begin.max(0), end.max(0));
    if kept == 0 && pad_begin + pad_end > 0 && !matches!(mode, PadMode::Constant(_)) {
        return Err(format!("pad: cannot {mode:?}-pad an axis with no elements"));
    }
    let source = |j: i64| -> usize {
        let inside = match mode {
            _ if (0..kept).contains(&j) => j,
            PadMode::Constant(_) => return FILL,
            PadMode::Edge => j.clamp(0, kept - 1),
            PadMode::Wrap => j.rem_euclid(kept),
            PadMode::Reflect if kept == 1 => 0,
            PadMode::Reflect => {
                let period = 2 * (kept - 1);
                let r = j.rem_euclid(period);
                if r < kept { r } else { period - r }
            }
        };
        crop_begin + inside as usize
    };
    Ok((-pad_begin..kept + pad_end).map(source).collect())
}

pub(crate) fn pad(begins: &[i64], ends: &[i64], mode: &PadMode, x: &Tensor) -> Result<Tensor, String> {
    let rank = x.shape.len();
    if begins.len() != rank || ends.len() != rank {
        return Err(format!("pad: {} begins and {} ends for rank {rank}", begins.len(), ends.len()));
    }
    let maps: Vec<Vec<usize>> =
        (0..rank).map(|d| pad_axis(x.shape[d], begins[d], ends[d], mode)).collect::<Result<_, _>>()?;
    let shape: Vec<usize> = maps.iter().map(Vec::len).collect();
    let in_strides = strides(&x.shape);
    let count: usize = shape.iter().product();
    let mut offsets = Vec::with_capacity(count);
    let mut index = vec![0usize; rank];
    for _ in 0..count {
        let mut offset = 0;
        for d in 0..rank {
            let p = maps[d][index[d]];
            if p == FILL {
                offset = FILL;
                break;
            }
            offset += p * in_strides[d];
        }
        offsets.push(offset);
        for d in (0..rank).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let data = match mode {
        PadMode::Constant(value) => take_or_fill(&x.data, &offsets, *value)?,
        _ => take(&x.data, &offsets),
    };
    Ok(Tensor { shape, data })
}

pub(crate) fn concat(axis: usize, parts: &[&Tensor]) -> Result<Tensor, String> {
    let first = parts.first().ok_or("concat needs at least one input")?;
    if axis >= first.shape.len() {
        return Err(format!("concat: axis {axis} out of range for rank {}", first.shape.len()));
    }
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for p in parts {
        let matches =
            p.shape.len() == first.shape.len() && (0..shape.len()).all(|d| d == axis || p.shape[d] == first.shape[d]);
        if !matches {
            return Err(format!("concat: {:?} does not match {:?} off axis {axis}", p.shape, first.shape));
        }
        shape[axis] += p.shape[axis];
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let data = with_elem!(first.data.dtype(), T => {
        let sources: Vec<&[T]> = parts.iter().map(|p| typed::<T>(&p.data, "concat")).collect::<Result<_, _>>()?;
        let mut out: Vec<T> = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for (src, p) in sources.iter().zip(parts) {
                let block = p.shape[axis] * inner;
                out.extend_from_slice(&src[o * block..][..block]);
            }
        }
        T::wrap(out)
    });
    Ok(Tensor { shape, data })
}

pub(crate) fn broadcast(x: &Tensor, out_shape: &[usize]) -> Result<Tensor, String> {
    let data = match broadcast_offsets(&x.shape, out_shape)? {
        Some(offsets) => take(&x.data, &offsets),
        None => x.data.clone(),
    };
    Ok(Tensor { shape: out_shape.to_vec(), data })
}

/// Resolves a possibly negative index against `extent`.
fn resolve_index(what: &str, index: i64, extent: usize, axis: usize) -> Result<usize, String> {
    let resolved = if index < 0 { index + extent as i64 } else { index };
    if resolved < 0 || resolved >= extent as i64 {
        return Err(format!("{what}: index {index} is out of range for axis {axis} of extent {extent}"));
    }
    Ok(resolved as usize)
}

fn index_values(indices: &Tensor, what: &str) -> Result<Vec<i64>, String> {
    indices.data.to_i64_vec().ok_or_else(|| format!("{what}: indices must be i64 or i32, got {}", indices.data.dtype()))
}

/// out = data[..axis] ++ indices ++ data[axis+1..].
pub(crate) fn gather(axis: usize, data: &Tensor, indices: &Tensor) -> Result<Tensor, String> {
    if axis >= data.shape.len() {
        return Err(format!("gather: axis {axis} out of range for rank {}", data.shape.len()));
    }
    let extent = data.shape[axis];
    let rows: Vec<usize> = index_values(indices, "gather")?
        .into_iter()
        .map(|i| resolve_index("gather", i, extent, axis))
        .collect::<Result<_, _>>()?;
    let outer: usize = data.shape[..axis].iter().product();
    let inner: usize = data.shape[axis + 1..].iter().product();
    let mut offsets = Vec::with_capacity(outer * rows.len() * inner);
    for o in 0..outer {
        for &r in &rows {
            offsets.extend((0..inner).map(|i| (o * extent + r) * inner + i));
        }
    }
    let mut shape = data.shape[..axis].to_vec();
    shape.extend_from_slice(&indices.shape);
    shape.extend_from_slice(&data.shape[axis + 1..]);
    Ok(Tensor { shape, data: take(&data.data, &offsets) })
}

/// out[i] = data[i with axis replaced by indices[i]]; indices may be smaller than data
/// on the other axes.
pub(crate) fn gather_elements(axis: usize, data: &Tensor, indices: &Tensor) -> Result<Tensor, String> {
    let rank = data.shape.len();
    if axis >= rank || indices.shape.len() != rank {
        return Err(format!(
            "gather_elements: axis {axis} or indices {:?} do not fit data {:?}",
            indices.shape, data.shape
        ));
    }
    if let Some(d) = (0..rank).find(|&d| d != axis && indices.shape[d] > data.shape[d]) {
        return Err(format!("gather_elements: indices {:?} exceed data {:?} on axis {d}", indices.shape, data.shape));
    }
    let data_strides = strides(&data.shape);
    let steps: Vec<isize> = (0..rank).map(|d| if d == axis { 0 } else { data_strides[d] as isize }).collect();
    let mut offsets = strided_offsets(&indices.shape, 0, &steps);
    for (offset, index) in offsets.iter_mut().zip(index_values(indices, "gather_elements")?) {
        *offset += resolve_index("gather_elements", index, data.shape[axis], axis)? * data_strides[axis];
    }
    Ok(Tensor { shape: indices.shape.clone(), data: take(&data.data, &offsets) })
}

/// out[..i..] = x[..lo[i]..]·(1 − w[i]) + x[..hi[i]..]·w[i]. A weight of exactly 0 or 1
/// copies one tap, so an infinity in the unused tap cannot turn the result into NaN.
pub(crate) fn resample(
    axis: usize,
    lo: &[usize],
    hi: &[usize],
    weight_hi: &[f32],
    x: &Tensor,
) -> Result<Tensor, String> {
    let values = typed::<f32>(&x.data, "resample")?;
    if axis >= x.shape.len() || lo.len() != hi.len() || lo.len() != weight_hi.len() {
        return Err(format!("resample: axis {axis} or table lengths do not fit {:?}", x.shape));
    }
    let extent = x.shape[axis];
    if let Some(&bad) = lo.iter().chain(hi).find(|&&i| i >= extent) {
        return Err(format!("resample: table index {bad} out of range for extent {extent}"));
    }
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * lo.len() * inner);
    for o in 0..outer {
        for ((&l, &h), &w) in lo.iter().zip(hi).zip(weight_hi) {
            let low = &values[(o * extent + l) * inner..][..inner];
            let high = &values[(o * extent + h) * inner..][..inner];
            if w == 0.0 {
                out.extend_from_slice(low);
            } else if w == 1.0 {
                out.extend_from_slice(high);
            } else {
                out.extend(low.iter().zip(high).map(|(&a, &b)| a * (1.0 - w) + b * w));
            }
        }
    }
    let mut shape = x.shape.clone();
    shape[axis] = lo.len();
    Ok(Tensor { shape, data: TensorData::F32(out) })
}
