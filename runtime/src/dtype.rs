//! Element types as the runtime sees them. The runtime keeps its own enum (rather than
//! the IR's) so that it does not depend on the compiler.

use std::fmt;

use crate::abi;

/// The element type of a model tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I64,
    I32,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    pub const ALL: [DType; 4] = [DType::F32, DType::I64, DType::I32, DType::Bool];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }

    /// The ABI code (ONNX's TensorProto.DataType number).
    pub fn abi_code(self) -> u32 {
        match self {
            DType::F32 => abi::DTYPE_F32,
            DType::I64 => abi::DTYPE_I64,
            DType::I32 => abi::DTYPE_I32,
            DType::Bool => abi::DTYPE_BOOL,
        }
    }

    /// The dtype for an ABI code, or `None` for a code this runtime does not know.
    pub fn from_abi_code(code: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.abi_code() == code)
    }

    /// Lower-case name as in the IR's text format ("f32", "i64", "i32", "bool").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_abi_code(d.abi_code()), Some(d));
        }
        assert_eq!(DType::from_abi_code(0), None);
        assert_eq!(DType::from_abi_code(10), None);
    }

    #[test]
    fn sizes_match_onnx() {
        assert_eq!(DType::F32.size(), 4);
        assert_eq!(DType::I64.size(), 8);
        assert_eq!(DType::I32.size(), 4);
        assert_eq!(DType::Bool.size(), 1);
    }
}
