//! Element types, tensor types and tensor data: the vocabulary every other IR file uses.

use std::fmt;

/// Element type of a tensor. Float32 carries the network; int64 and bool exist for
/// shapes, indices, labels and masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    I64,
    I32,
    Bool,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::I64, DType::I32, DType::Bool];

    /// Bytes per element as stored in buffers (bool is one byte, 0 or 1).
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    pub fn is_float(self) -> bool {
        self == DType::F32
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I64 | DType::I32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A statically known tensor type: every dimension is a concrete size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        TensorType { dtype, shape: shape.into() }
    }

    pub fn f32(shape: impl Into<Vec<usize>>) -> Self {
        TensorType::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_size(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

impl fmt::Display for TensorType {
    /// `f32[1,3,224,224]`; a scalar is `f32[]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// Row-major (C order) element strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy-style multidirectional broadcasting of two shapes, or None if incompatible.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

/// One scalar of any dtype (splat constants, pad values, attribute values).
#[derive(Clone, Copy, Debug)]
pub enum Scalar {
    F32(f32),
    I64(i64),
    I32(i32),
    Bool(bool),
}

impl Scalar {
    pub fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::I64(_) => DType::I64,
            Scalar::I32(_) => DType::I32,
            Scalar::Bool(_) => DType::Bool,
        }
    }

    pub fn as_f64(self) -> f64 {
        match self {
            Scalar::F32(v) => v as f64,
            Scalar::I64(v) => v as f64,
            Scalar::I32(v) => v as f64,
            Scalar::Bool(v) => v as u8 as f64,
        }
    }

    /// Converts with the C-style semantics of ONNX Cast (float to int truncates).
    pub fn cast(self, to: DType) -> Scalar {
        match (self, to) {
            (Scalar::F32(v), DType::F32) => Scalar::F32(v),
            (Scalar::F32(v), DType::I64) => Scalar::I64(v as i64),
            (Scalar::F32(v), DType::I32) => Scalar::I32(v as i32),
            (Scalar::F32(v), DType::Bool) => Scalar::Bool(v != 0.0),
            (Scalar::I64(v), DType::F32) => Scalar::F32(v as f32),
            (Scalar::I64(v), DType::I64) => Scalar::I64(v),
            (Scalar::I64(v), DType::I32) => Scalar::I32(v as i32),
            (Scalar::I64(v), DType::Bool) => Scalar::Bool(v != 0),
            (Scalar::I32(v), DType::F32) => Scalar::F32(v as f32),
            (Scalar::I32(v), DType::I64) => Scalar::I64(v as i64),
            (Scalar::I32(v), DType::I32) => Scalar::I32(v),
            (Scalar::I32(v), DType::Bool) => Scalar::Bool(v != 0),
            (Scalar::Bool(v), DType::F32) => Scalar::F32(v as u8 as f32),
            (Scalar::Bool(v), DType::I64) => Scalar::I64(v as i64),
            (Scalar::Bool(v), DType::I32) => Scalar::I32(v as i32),
            (Scalar::Bool(v), DType::Bool) => Scalar::Bool(v),
        }
    }
}

/// Bitwise equality, so that NaN payloads and -0.0 round-trip exactly.
impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Scalar::F32(a), Scalar::F32(b)) => a.to_bits() == b.to_bits(),
            (Scalar::I64(a), Scalar::I64(b)) => a == b,
            (Scalar::I32(a), Scalar::I32(b)) => a == b,
            (Scalar::Bool(a), Scalar::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// Dense tensor elements in row-major order.
#[derive(Clone, Debug)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

impl TensorData {
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> Scalar {
        match self {
            TensorData::F32(v) => Scalar::F32(v[i]),
            TensorData::I64(v) => Scalar::I64(v[i]),
            TensorData::I32(v) => Scalar::I32(v[i]),
            TensorData::Bool(v) => Scalar::Bool(v[i]),
        }
    }

    /// `n` copies of `value`.
    pub fn splat(value: Scalar, n: usize) -> TensorData {
        match value {
            Scalar::F32(v) => TensorData::F32(vec![v; n]),
            Scalar::I64(v) => TensorData::I64(vec![v; n]),
            Scalar::I32(v) => TensorData::I32(vec![v; n]),
            Scalar::Bool(v) => TensorData::Bool(vec![v; n]),
        }
    }

    pub fn zeros(dtype: DType, n: usize) -> TensorData {
        TensorData::splat(Scalar::F32(0.0).cast(dtype), n)
    }

    /// Little-endian bytes as laid out in a cnnc buffer (bool as one byte).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        }
    }

    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> TensorData {
        match dtype {
            DType::F32 => TensorData::F32(
                bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            DType::I64 => TensorData::I64(
                bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            DType::I32 => TensorData::I32(
                bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        }
    }

    /// The single repeated value, if every element is the same (bitwise) and there is at least one.
    pub fn as_splat(&self) -> Option<Scalar> {
        if self.is_empty() {
            return None;
        }
        let first = self.get(0);
        (1..self.len()).all(|i| self.get(i) == first).then_some(first)
    }

    pub fn cast(&self, to: DType) -> TensorData {
        if self.dtype() == to {
            return self.clone();
        }
        let mut out = TensorData::zeros(to, self.len());
        for i in 0..self.len() {
            out.set(i, self.get(i).cast(to));
        }
        out
    }

    /// Stores `value` (which must already have this tensor's dtype).
    pub fn set(&mut self, i: usize, value: Scalar) {
        match (self, value) {
            (TensorData::F32(v), Scalar::F32(x)) => v[i] = x,
            (TensorData::I64(v), Scalar::I64(x)) => v[i] = x,
            (TensorData::I32(v), Scalar::I32(x)) => v[i] = x,
            (TensorData::Bool(v), Scalar::Bool(x)) => v[i] = x,
            (d, s) => panic!("TensorData::set: {} value into {} tensor", s.dtype(), d.dtype()),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Integer view widened to i64 (shapes, axes, indices).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        match self {
            TensorData::I64(v) => Some(v.clone()),
            TensorData::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }
}

/// Bitwise equality (see `Scalar`).
impl PartialEq for TensorData {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TensorData::F32(a), TensorData::F32(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            (TensorData::I64(a), TensorData::I64(b)) => a == b,
            (TensorData::I32(a), TensorData::I32(b)) => a == b,
            (TensorData::Bool(a), TensorData::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// A tensor value with its shape: what the interpreter computes and constants hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn new(shape: impl Into<Vec<usize>>, data: TensorData) -> Tensor {
        let shape = shape.into();
        assert_eq!(shape.iter().product::<usize>(), data.len(), "Tensor::new: shape and data disagree");
        Tensor { shape, data }
    }

    pub fn f32(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Tensor {
        Tensor::new(shape, TensorData::F32(data))
    }

    pub fn ty(&self) -> TensorType {
        TensorType::new(self.data.dtype(), self.shape.clone())
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
