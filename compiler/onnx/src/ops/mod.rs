//! Op lowerings, one file per op family (`<family>.rs`, each function lowering one ONNX op).
//! `lookup` is the dispatch: one line per default-domain op_type. To add an op, write its
//! function in the family's file and add its line here; a new family also needs a `mod` line.

use cnnc_ir::ValueId;

use crate::ctx::{LowerResult, NodeCtx};

pub mod basic;
pub mod elementwise;
pub mod layout;
pub mod slicing;

/// Lowers one node; returns the IR value of each ONNX output, by position (trailing optional
/// outputs the node does not ask for may be left out).
pub type Lowering = fn(&mut NodeCtx) -> LowerResult<Vec<ValueId>>;

/// The lowering of a default-domain op, if cnnc has one.
pub fn lookup(op_type: &str) -> Option<Lowering> {
    let lowering: Lowering = match op_type {
        // basic.rs
        "Identity" => basic::identity,
        "Dropout" => basic::dropout,
        "Constant" => basic::constant,
        "Shape" => basic::shape,
        "Size" => basic::size,
        "ConstantOfShape" => basic::constant_of_shape,
        "Cast" => basic::cast,
        "CastLike" => basic::cast_like,
        // elementwise.rs
        "Relu" => elementwise::relu,
        "Sigmoid" => elementwise::sigmoid,
        "Tanh" => elementwise::tanh,
        "Erf" => elementwise::erf,
        "Softplus" => elementwise::softplus,
        "Softsign" => elementwise::softsign,
        "Mish" => elementwise::mish,
        "HardSwish" => elementwise::hard_swish,
        "Sqrt" => elementwise::sqrt,
        "Exp" => elementwise::exp,
        "Log" => elementwise::log,
        "Neg" => elementwise::neg,
        "Abs" => elementwise::abs,
        "Reciprocal" => elementwise::reciprocal,
        "Floor" => elementwise::floor,
        "Ceil" => elementwise::ceil,
        "Not" => elementwise::not,
        "LeakyRelu" => elementwise::leaky_relu,
        "Elu" => elementwise::elu,
        "Selu" => elementwise::selu,
        "Celu" => elementwise::celu,
        "HardSigmoid" => elementwise::hard_sigmoid,
        "Swish" => elementwise::swish,
        "Gelu" => elementwise::gelu,
        "Clip" => elementwise::clip,
        "PRelu" => elementwise::prelu,
        "Add" => elementwise::add,
        "Sub" => elementwise::sub,
        "Mul" => elementwise::mul,
        "Div" => elementwise::div,
        "Pow" => elementwise::pow,
        "Less" => elementwise::less,
        "LessOrEqual" => elementwise::less_or_equal,
        "Greater" => elementwise::greater,
        "GreaterOrEqual" => elementwise::greater_or_equal,
        "Equal" => elementwise::equal,
        "And" => elementwise::and,
        "Or" => elementwise::or,
        "Xor" => elementwise::xor,
        "Sum" => elementwise::sum,
        "Mean" => elementwise::mean,
        "Max" => elementwise::max,
        "Min" => elementwise::min,
        "Where" => elementwise::where_,
        // layout.rs
        "Reshape" => layout::reshape,
        "Flatten" => layout::flatten,
        "Squeeze" => layout::squeeze,
        "Unsqueeze" => layout::unsqueeze,
        "Transpose" => layout::transpose,
        "Expand" => layout::expand,
        "Tile" => layout::tile,
        "DepthToSpace" => layout::depth_to_space,
        "SpaceToDepth" => layout::space_to_depth,
        // slicing.rs
        "Concat" => slicing::concat,
        "Split" => slicing::split,
        "Slice" => slicing::slice,
        "Pad" => slicing::pad,
        "Gather" => slicing::gather,
        _ => return None,
    };
    Some(lowering)
}
