//! Unary, Binary, Where and Cast: elementwise ops with numpy broadcasting.

use super::elem::{Elem, Num, at, broadcast_offsets, max_nan, min_nan, typed, with_elem};
use super::math::unary_f32;
use crate::op::{BinaryFn, UnaryFn};
use crate::types::{DType, Tensor, TensorData, broadcast_shapes};

/// The integer unary functions (Neg and Abs wrap at the minimum value; Clip's float
/// bounds are rounded inward to the nearest integers), or None for the others.
macro_rules! int_unary {
    ($f:expr, $v:expr, $t:ty) => {{
        let v: &[$t] = $v;
        match $f {
            UnaryFn::Neg => Some(v.iter().map(|x| x.wrapping_neg()).collect::<Vec<$t>>()),
            UnaryFn::Abs => Some(v.iter().map(|x| x.wrapping_abs()).collect()),
            UnaryFn::Relu => Some(v.iter().map(|&x| x.max(0)).collect()),
            UnaryFn::Clip { min, max } => {
                let (lo, hi) = (min as f64, max as f64);
                Some(
                    v.iter()
                        .map(|&x| {
                            let raised = if (x as f64) < lo { lo.ceil() as $t } else { x };
                            if (raised as f64) > hi { hi.floor() as $t } else { raised }
                        })
                        .collect(),
                )
            }
            _ => None,
        }
    }};
}

pub(crate) fn unary(f: UnaryFn, x: &Tensor) -> Result<Tensor, String> {
    let undefined = || format!("unary {f:?} is not defined on {}", x.data.dtype());
    let data = match &x.data {
        TensorData::F32(v) if f != UnaryFn::Not => TensorData::F32(v.iter().map(|&e| unary_f32(f, e)).collect()),
        TensorData::I64(v) => TensorData::I64(int_unary!(f, v, i64).ok_or_else(undefined)?),
        TensorData::I32(v) => TensorData::I32(int_unary!(f, v, i32).ok_or_else(undefined)?),
        TensorData::Bool(v) if f == UnaryFn::Not => TensorData::Bool(v.iter().map(|&b| !b).collect()),
        _ => return Err(undefined()),
    };
    Ok(Tensor { shape: x.shape.clone(), data })
}

pub(crate) fn binary(f: BinaryFn, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let shape = broadcast_shapes(&a.shape, &b.shape)
        .ok_or_else(|| format!("binary {f:?}: shapes {:?} and {:?} do not broadcast", a.shape, b.shape))?;
    let count: usize = shape.iter().product();
    let a_offsets = broadcast_offsets(&a.shape, &shape)?;
    let b_offsets = broadcast_offsets(&b.shape, &shape)?;
    let (ia, ib) = (a_offsets.as_deref(), b_offsets.as_deref());
    let data = match (&a.data, &b.data) {
        (TensorData::F32(x), TensorData::F32(y)) => numeric_binary(f, x, ia, y, ib, count)?,
        (TensorData::I64(x), TensorData::I64(y)) => numeric_binary(f, x, ia, y, ib, count)?,
        (TensorData::I32(x), TensorData::I32(y)) => numeric_binary(f, x, ia, y, ib, count)?,
        (TensorData::Bool(x), TensorData::Bool(y)) => {
            let logic = |op: fn(bool, bool) -> bool| (0..count).map(|i| op(at(x, ia, i), at(y, ib, i))).collect();
            TensorData::Bool(match f {
                BinaryFn::And => logic(|p, q| p & q),
                BinaryFn::Or => logic(|p, q| p | q),
                BinaryFn::Xor => logic(|p, q| p ^ q),
                BinaryFn::Equal => logic(|p, q| p == q),
                _ => return Err(format!("binary {f:?} is not defined on bool")),
            })
        }
        _ => {
            return Err(format!("binary {f:?}: operand dtypes differ ({} vs {})", a.data.dtype(), b.data.dtype()));
        }
    };
    Ok(Tensor { shape, data })
}

fn map2<T: Copy, R>(
    x: &[T],
    ia: Option<&[usize]>,
    y: &[T],
    ib: Option<&[usize]>,
    count: usize,
    op: impl Fn(T, T) -> R,
) -> Vec<R> {
    (0..count).map(|i| op(at(x, ia, i), at(y, ib, i))).collect()
}

fn numeric_binary<T: Num>(
    f: BinaryFn,
    x: &[T],
    ia: Option<&[usize]>,
    y: &[T],
    ib: Option<&[usize]>,
    count: usize,
) -> Result<TensorData, String> {
    let arith = |op: fn(T, T) -> T| T::wrap(map2(x, ia, y, ib, count, op));
    let compare = |op: fn(T, T) -> bool| TensorData::Bool(map2(x, ia, y, ib, count, op));
    Ok(match f {
        BinaryFn::Add => arith(T::add),
        BinaryFn::Sub => arith(T::sub),
        BinaryFn::Mul => arith(T::mul),
        BinaryFn::Div => arith(T::div),
        BinaryFn::Pow => arith(T::pow),
        BinaryFn::Max => arith(max_nan),
        BinaryFn::Min => arith(min_nan),
        BinaryFn::PRelu => arith(|v, slope| if v >= T::ZERO { v } else { slope.mul(v) }),
        BinaryFn::Less => compare(|p, q| p < q),
        BinaryFn::LessOrEqual => compare(|p, q| p <= q),
        BinaryFn::Greater => compare(|p, q| p > q),
        BinaryFn::GreaterOrEqual => compare(|p, q| p >= q),
        BinaryFn::Equal => compare(|p, q| p == q),
        BinaryFn::And | BinaryFn::Or | BinaryFn::Xor => {
            return Err(format!("binary {f:?} is not defined on {}", T::DTYPE));
        }
    })
}

pub(crate) fn where_(cond: &Tensor, x: &Tensor, y: &Tensor) -> Result<Tensor, String> {
    let shape = broadcast_shapes(&cond.shape, &x.shape)
        .and_then(|s| broadcast_shapes(&s, &y.shape))
        .ok_or_else(|| format!("where: shapes {:?}, {:?}, {:?} do not broadcast", cond.shape, x.shape, y.shape))?;
    let count: usize = shape.iter().product();
    let flags = typed::<bool>(&cond.data, "where condition")?;
    let ic = broadcast_offsets(&cond.shape, &shape)?;
    let ix = broadcast_offsets(&x.shape, &shape)?;
    let iy = broadcast_offsets(&y.shape, &shape)?;
    let data = with_elem!(x.data.dtype(), T => {
        let xs = typed::<T>(&x.data, "where")?;
        let ys = typed::<T>(&y.data, "where")?;
        T::wrap(
            (0..count)
                .map(|i| if at(flags, ic.as_deref(), i) { at(xs, ix.as_deref(), i) } else { at(ys, iy.as_deref(), i) })
                .collect(),
        )
    });
    Ok(Tensor { shape, data })
}

/// Float to integer truncates toward zero, saturates out of range and maps NaN to 0;
/// anything to bool is `!= 0` (so NaN is true).
pub(crate) fn cast(x: &Tensor, to: DType) -> Tensor {
    Tensor { shape: x.shape.clone(), data: x.data.cast(to) }
}
