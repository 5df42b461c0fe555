//! Element types as Rust types, so each kernel is written once and instantiated per
//! dtype, plus the index helpers the data-movement ops share.
//!
//! Integer arithmetic wraps (fixed-width hardware semantics); float max/min propagate
//! NaN (ONNX Runtime semantics: if either operand is NaN the result is NaN).

use crate::types::{DType, Scalar, TensorData};

/// A Rust type that is the storage of one `TensorData` variant.
pub(crate) trait Elem: Copy + PartialEq + 'static {
    const DTYPE: DType;
    fn slice(data: &TensorData) -> Option<&[Self]>;
    fn wrap(values: Vec<Self>) -> TensorData;
    fn from_scalar(s: Scalar) -> Option<Self>;
}

macro_rules! impl_elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &TensorData) -> Option<&[Self]> {
                match data {
                    TensorData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(values: Vec<Self>) -> TensorData {
                TensorData::$variant(values)
            }
            fn from_scalar(s: Scalar) -> Option<Self> {
                match s {
                    Scalar::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

impl_elem!(f32, F32);
impl_elem!(i64, I64);
impl_elem!(i32, I32);
impl_elem!(bool, Bool);

/// The typed elements of `data`, or an error naming `what` if the dtype differs.
pub(crate) fn typed<'a, T: Elem>(data: &'a TensorData, what: &str) -> Result<&'a [T], String> {
    T::slice(data).ok_or_else(|| format!("{what}: expected {} data, got {}", T::DTYPE, data.dtype()))
}

/// Runs `$body` with `$T` bound to the Rust element type of `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::types::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::types::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::types::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::types::DType::Bool => {
                type $T = bool;
                $body
            }
        }
    };
}
pub(crate) use with_elem;

/// Runs `$body` with `$T` bound to the numeric element type of `$dtype`; bool is an error.
macro_rules! with_num {
    ($dtype:expr, $what:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::types::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::types::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::types::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::types::DType::Bool => Err(format!("{} is not defined on bool", $what)),
        }
    };
}
pub(crate) use with_num;

/// Arithmetic on f32, i64 and i32.
pub(crate) trait Num: Elem + PartialOrd {
    const ZERO: Self;
    const ONE: Self;
    /// Identity of max: -inf or the smallest integer.
    const LOWEST: Self;
    /// Identity of min: +inf or the largest integer.
    const HIGHEST: Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// Float division; integer division truncating toward zero, with x / 0 = 0.
    fn div(self, other: Self) -> Self;
    /// Float: C `pow`. Integer: exact wrapping power; negative exponents truncate
    /// 1 / x^n toward zero (so only ±1 survive, and 0^-n is 0 like division by zero).
    fn pow(self, other: Self) -> Self;
    fn is_nan(self) -> bool;
    /// `n` as this type (divisor of a mean).
    fn from_count(n: usize) -> Self;
}

impl Num for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const LOWEST: Self = f32::NEG_INFINITY;
    const HIGHEST: Self = f32::INFINITY;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn sub(self, other: Self) -> Self {
        self - other
    }
    fn mul(self, other: Self) -> Self {
        self * other
    }
    fn div(self, other: Self) -> Self {
        self / other
    }
    fn pow(self, other: Self) -> Self {
        // f64 has the same special cases as powf and rounds once, to the nearest f32.
        (self as f64).powf(other as f64) as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn from_count(n: usize) -> Self {
        n as f32
    }
}

macro_rules! impl_int_num {
    ($t:ty) => {
        impl Num for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const LOWEST: Self = <$t>::MIN;
            const HIGHEST: Self = <$t>::MAX;
            fn add(self, other: Self) -> Self {
                self.wrapping_add(other)
            }
            fn sub(self, other: Self) -> Self {
                self.wrapping_sub(other)
            }
            fn mul(self, other: Self) -> Self {
                self.wrapping_mul(other)
            }
            fn div(self, other: Self) -> Self {
                if other == 0 { 0 } else { self.wrapping_div(other) }
            }
            fn pow(self, other: Self) -> Self {
                if other < 0 {
                    return match self {
                        1 => 1,
                        -1 if other % 2 == 0 => 1,
                        -1 => -1,
                        _ => 0,
                    };
                }
                let mut result: $t = 1;
                let mut base = self;
                let mut exponent = other;
                while exponent > 0 {
                    if exponent & 1 == 1 {
                        result = result.wrapping_mul(base);
                    }
                    base = base.wrapping_mul(base);
                    exponent >>= 1;
                }
                result
            }
            fn is_nan(self) -> bool {
                false
            }
            fn from_count(n: usize) -> Self {
                n as $t
            }
        }
    };
}

impl_int_num!(i64);
impl_int_num!(i32);

/// max that returns NaN when either operand is NaN.
pub(crate) fn max_nan<T: Num>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        if a.is_nan() { a } else { b }
    } else if b > a {
        b
    } else {
        a
    }
}

/// min that returns NaN when either operand is NaN.
pub(crate) fn min_nan<T: Num>(a: T, b: T) -> T {
    if a.is_nan() || b.is_nan() {
        if a.is_nan() { a } else { b }
    } else if b < a {
        b
    } else {
        a
    }
}

/// Flat source offsets of every element of `out_shape` (row-major) where moving one
/// step along output axis d moves `steps[d]` elements in the source, starting at `base`.
/// Covers transpose, slice and broadcast (step 0). Callers guarantee the offsets are
/// non-negative and in range.
pub(crate) fn strided_offsets(out_shape: &[usize], base: isize, steps: &[isize]) -> Vec<usize> {
    let count: usize = out_shape.iter().product();
    let mut offsets = Vec::with_capacity(count);
    let mut index = vec![0usize; out_shape.len()];
    let mut cur = base;
    for _ in 0..count {
        offsets.push(cur as usize);
        for d in (0..out_shape.len()).rev() {
            index[d] += 1;
            cur += steps[d];
            if index[d] < out_shape[d] {
                break;
            }
            cur -= steps[d] * out_shape[d] as isize;
            index[d] = 0;
        }
    }
    offsets
}

/// Source offsets reading a tensor of `in_shape` broadcast (numpy rules) to `out_shape`,
/// or None when the shapes are equal and the offsets are the identity.
pub(crate) fn broadcast_offsets(in_shape: &[usize], out_shape: &[usize]) -> Result<Option<Vec<usize>>, String> {
    if in_shape == out_shape {
        return Ok(None);
    }
    if in_shape.len() > out_shape.len() {
        return Err(format!("cannot broadcast shape {in_shape:?} to {out_shape:?}"));
    }
    let lead = out_shape.len() - in_shape.len();
    let in_strides = crate::types::strides(in_shape);
    let mut steps = vec![0isize; out_shape.len()];
    for (i, &extent) in in_shape.iter().enumerate() {
        let out_extent = out_shape[lead + i];
        if extent == out_extent {
            steps[lead + i] = in_strides[i] as isize;
        } else if extent != 1 {
            return Err(format!("cannot broadcast shape {in_shape:?} to {out_shape:?}"));
        }
    }
    Ok(Some(strided_offsets(out_shape, 0, &steps)))
}

/// Element `i` of an output read through optional broadcast offsets.
#[inline]
pub(crate) fn at<T: Copy>(values: &[T], offsets: Option<&[usize]>, i: usize) -> T {
    match offsets {
        Some(o) => values[o[i]],
        None => values[i],
    }
}

/// `out[i] = data[offsets[i]]` for any dtype.
pub(crate) fn take(data: &TensorData, offsets: &[usize]) -> TensorData {
    with_elem!(data.dtype(), T => {
        let src = T::slice(data).expect("dtype matches its variant");
        T::wrap(offsets.iter().map(|&o| src[o]).collect())
    })
}

/// Marks an output element that takes the fill value in `take_or_fill`.
pub(crate) const FILL: usize = usize::MAX;

/// `out[i] = data[offsets[i]]`, or `fill` where the offset is `FILL`.
pub(crate) fn take_or_fill(data: &TensorData, offsets: &[usize], fill: Scalar) -> Result<TensorData, String> {
    with_elem!(data.dtype(), T => {
        let src = T::slice(data).expect("dtype matches its variant");
        let fill = T::from_scalar(fill)
            .ok_or_else(|| format!("fill value {fill:?} does not have the tensor's dtype {}", T::DTYPE))?;
        Ok(T::wrap(offsets.iter().map(|&o| if o == FILL { fill } else { src[o] }).collect()))
    })
}
