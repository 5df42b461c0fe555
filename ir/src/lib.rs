//! cnnc's tensor IR.
//!
//! - `types`: dtypes, tensor types, tensor data.
//! - `op`: the closed `Op` enum (data only).
//! - `graph`: values, nodes, constants; SSA in topological order.
//! - `schedule`: layout/tiling/vector choices attached to nodes as data.
//! - `infer`: output types of every op (the typing rules).
//! - `verify`: the invariants every pass must keep.
//! - `print` / `parse`: the text form; `parse(print(g)) == g`.
//! - `interp`: the reference interpreter, the test oracle.

pub mod compare;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod op;
pub mod parse;
pub mod print;
pub mod schedule;
pub mod types;
pub mod verify;

pub use graph::{ConstId, ConstValue, Constant, Graph, Node, Value, ValueId};
pub use op::*;
pub use parse::{ParseError, parse};
pub use print::{PrintOptions, print, print_with};
pub use schedule::{Layout, Schedule};
pub use types::{DType, Scalar, Tensor, TensorData, TensorType, broadcast_shapes, strides};
pub use verify::{VerifyError, verify};
