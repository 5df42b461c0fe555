//! MatMul with numpy batch broadcasting.

use super::elem::{Elem, Num, broadcast_offsets, typed, with_num};
use crate::types::{Tensor, broadcast_shapes};

/// (a [..., M, K], b [..., K, N]) -> [..., M, N]. Each output element accumulates
/// a[i, k]·b[k, j] for k = 0, 1, ... in the element type (wrapping for integers).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    if ra < 2 || rb < 2 {
        return Err(format!("matmul: operands {:?} and {:?} must have rank >= 2", a.shape, b.shape));
    }
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let (k2, n) = (b.shape[rb - 2], b.shape[rb - 1]);
    if k != k2 {
        return Err(format!("matmul: inner dimensions of {:?} and {:?} differ", a.shape, b.shape));
    }
    let batch_shape = broadcast_shapes(&a.shape[..ra - 2], &b.shape[..rb - 2])
        .ok_or_else(|| format!("matmul: batch dims of {:?} and {:?} do not broadcast", a.shape, b.shape))?;
    let batches: usize = batch_shape.iter().product();
    let a_batch = broadcast_offsets(&a.shape[..ra - 2], &batch_shape)?;
    let b_batch = broadcast_offsets(&b.shape[..rb - 2], &batch_shape)?;
    let pick = |offsets: &Option<Vec<usize>>, i: usize| offsets.as_ref().map_or(i, |o| o[i]);
    let data = with_num!(a.data.dtype(), "matmul", T => {
        let x = typed::<T>(&a.data, "matmul left operand")?;
        let y = typed::<T>(&b.data, "matmul right operand")?;
        let mut out = vec![T::ZERO; batches * m * n];
        for batch in 0..batches {
            let xa = &x[pick(&a_batch, batch) * m * k..][..m * k];
            let yb = &y[pick(&b_batch, batch) * k * n..][..k * n];
            let ob = &mut out[batch * m * n..][..m * n];
            multiply(xa, yb, ob, m, k, n);
        }
        Ok(T::wrap(out))
    })?;
    let mut shape = batch_shape;
    shape.extend([m, n]);
    Ok(Tensor { shape, data })
}

fn multiply<T: Num>(a: &[T], b: &[T], out: &mut [T], m: usize, k: usize, n: usize) {
    for i in 0..m {
        let row = &mut out[i * n..][..n];
        for kk in 0..k {
            let scale = a[i * k + kk];
            for (o, &v) in row.iter_mut().zip(&b[kk * n..][..n]) {
                *o = o.add(scale.mul(v));
            }
        }
    }
}
