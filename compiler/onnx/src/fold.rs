//! Compile-time evaluation of nodes whose inputs are all constants, by the reference
//! interpreter: Shape -> Gather -> Concat -> Reshape chains, Slice/Pad/Clip parameters and
//! any arithmetic on initializers become constants.

use cnnc_ir::{Constant, Op, Tensor, TensorType};

/// The outputs of `op` on constant `inputs`, or None when the op is not evaluated at
/// compile time.
pub fn evaluate(
    op: &Op,
    inputs: &[&Tensor],
    output_types: &[TensorType],
    constants: &[Constant],
) -> Option<Result<Vec<Tensor>, String>> {
    if matches!(op, Op::Constant(_)) {
        return None;
    }
    Some(cnnc_ir::interp::eval(op, inputs, output_types, constants))
}
