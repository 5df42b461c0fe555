//! The numerical acceptance rule of ../shared/DESIGN.md.

use crate::types::{Tensor, TensorData};

/// Checks `actual` against `expected`: shapes and dtypes equal; float elements within
/// `1e-3·|ref| + 1e-4·max|ref|` (NaN where NaN, infinities equal); ints and bools exact.
/// Returns a message naming the first offending element and how many differ.
pub fn compare(actual: &Tensor, expected: &Tensor) -> Result<(), String> {
    if actual.shape != expected.shape {
        return Err(format!("shape {:?}, expected {:?}", actual.shape, expected.shape));
    }
    match (&actual.data, &expected.data) {
        (TensorData::F32(a), TensorData::F32(e)) => {
            let max_ref = e.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
            let mut bad = 0usize;
            let mut first = None;
            for (i, (&y, &r)) in a.iter().zip(e).enumerate() {
                let ok = if r.is_nan() {
                    y.is_nan()
                } else if r.is_infinite() {
                    y == r
                } else {
                    (y - r).abs() <= 1e-3 * r.abs() + 1e-4 * max_ref
                };
                if !ok {
                    bad += 1;
                    first.get_or_insert((i, y, r));
                }
            }
            match first {
                None => Ok(()),
                Some((i, y, r)) => Err(format!(
                    "{bad} of {} elements differ; first at flat index {i}: got {y}, expected {r} (max|ref| = {max_ref})",
                    e.len()
                )),
            }
        }
        (a, e) if a.dtype() == e.dtype() => {
            let n = e.len();
            match (0..n).find(|&i| a.get(i) != e.get(i)) {
                None => Ok(()),
                Some(i) => Err(format!("element {i}: got {:?}, expected {:?}", a.get(i), e.get(i))),
            }
        }
        (a, e) => Err(format!("dtype {}, expected {}", a.dtype(), e.dtype())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_scales_with_reference_and_tensor_max() {
        let e = Tensor::f32([3], vec![1000.0, 1.0, 0.0]);
        // 1e-3·1 + 1e-4·1000 = 0.101 allowed on the second element.
        assert!(compare(&Tensor::f32([3], vec![1000.5, 1.1, 0.05]), &e).is_ok());
        assert!(compare(&Tensor::f32([3], vec![1000.0, 1.2, 0.0]), &e).is_err());
        assert!(compare(&Tensor::f32([3], vec![1002.0, 1.0, 0.0]), &e).is_err());
    }

    #[test]
    fn nan_and_infinity_must_match_exactly() {
        let e = Tensor::f32([2], vec![f32::NAN, f32::INFINITY]);
        assert!(compare(&Tensor::f32([2], vec![f32::NAN, f32::INFINITY]), &e).is_ok());
        assert!(compare(&Tensor::f32([2], vec![0.0, f32::INFINITY]), &e).is_err());
        assert!(compare(&Tensor::f32([2], vec![f32::NAN, f32::NEG_INFINITY]), &e).is_err());
    }

    #[test]
    fn shapes_and_integers_are_exact() {
        let e = Tensor::new([2], TensorData::I64(vec![1, 2]));
        assert!(compare(&Tensor::new([2], TensorData::I64(vec![1, 2])), &e).is_ok());
        assert!(compare(&Tensor::new([2], TensorData::I64(vec![1, 3])), &e).is_err());
        assert!(compare(&Tensor::new([1, 2], TensorData::I64(vec![1, 2])), &e).is_err());
    }
}
