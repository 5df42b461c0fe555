//! Reduce and ArgReduce.

use super::elem::{Elem, Num, max_nan, min_nan, strided_offsets, typed, with_num};
use crate::op::{ArgKind, ReduceKind};
use crate::types::{Tensor, TensorData, strides};

/// (x) -> x reduced over `axes`, kept as extent 1. Elements combine in row-major
/// order starting from the identity (0, 1, -inf/MIN, +inf/MAX); Mean is the f32 (or
/// truncated integer) quotient of the sum by the count, so an empty Mean is NaN
/// (integers: 0). Max and Min propagate NaN.
pub(crate) fn reduce(kind: ReduceKind, axes: &[usize], x: &Tensor) -> Result<Tensor, String> {
    if let Some(&bad) = axes.iter().find(|&&a| a >= x.shape.len()) {
        return Err(format!("reduce: axis {bad} out of range for rank {}", x.shape.len()));
    }
    let mut out_shape = x.shape.clone();
    for &a in axes {
        out_shape[a] = 1;
    }
    let out_strides = strides(&out_shape);
    let steps: Vec<isize> =
        (0..x.shape.len()).map(|d| if axes.contains(&d) { 0 } else { out_strides[d] as isize }).collect();
    let destination = strided_offsets(&x.shape, 0, &steps);
    let out_count: usize = out_shape.iter().product();
    let reduced_count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let data = with_num!(x.data.dtype(), "reduce", T => {
        let values = typed::<T>(&x.data, "reduce")?;
        let (identity, combine): (T, fn(T, T) -> T) = match kind {
            ReduceKind::Sum | ReduceKind::Mean => (T::ZERO, T::add),
            ReduceKind::Prod => (T::ONE, T::mul),
            ReduceKind::Max => (T::LOWEST, max_nan),
            ReduceKind::Min => (T::HIGHEST, min_nan),
        };
        let mut acc = vec![identity; out_count];
        for (&v, &o) in values.iter().zip(&destination) {
            acc[o] = combine(acc[o], v);
        }
        if kind == ReduceKind::Mean {
            let count = T::from_count(reduced_count);
            acc.iter_mut().for_each(|a| *a = a.div(count));
        }
        Ok(T::wrap(acc))
    })?;
    Ok(Tensor { shape: out_shape, data })
}

/// (x) -> i64 index of the max/min along `axis` (kept as 1). Ties go to the first
/// index, or the last with `select_last_index`; NaN beats every number (as numpy's
/// argmax/argmin), ties among NaNs following the same rule.
pub(crate) fn arg_reduce(kind: ArgKind, axis: usize, select_last_index: bool, x: &Tensor) -> Result<Tensor, String> {
    if axis >= x.shape.len() || x.shape[axis] == 0 {
        return Err(format!("arg_reduce: axis {axis} is out of range or empty for shape {:?}", x.shape));
    }
    let extent = x.shape[axis];
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let indices = with_num!(x.data.dtype(), "arg_reduce", T => {
        let values = typed::<T>(&x.data, "arg_reduce")?;
        let beats = |v: T, best: T| -> bool {
            if v.is_nan() || best.is_nan() {
                return v.is_nan() && (!best.is_nan() || select_last_index);
            }
            let strictly = match kind {
                ArgKind::Max => v > best,
                ArgKind::Min => v < best,
            };
            strictly || (select_last_index && v == best)
        };
        let mut indices = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                let at = |j: usize| values[(o * extent + j) * inner + i];
                let mut best = 0;
                for j in 1..extent {
                    if beats(at(j), at(best)) {
                        best = j;
                    }
                }
                indices.push(best as i64);
            }
        }
        Ok(indices)
    })?;
    let mut shape = x.shape.clone();
    shape[axis] = 1;
    Ok(Tensor { shape, data: TensorData::I64(indices) })
}
