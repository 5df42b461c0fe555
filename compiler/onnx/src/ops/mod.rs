//! Op lowerings, one file per op family (`<family>.rs`, each function lowering one ONNX op).
//! `lookup` is the dispatch: one line per default-domain op_type. To add an op, write its
//! function in the family's file and add its line here; a new family also needs a `mod` line.

use cnnc_ir::ValueId;

use crate::ctx::{LowerResult, NodeCtx};

pub mod basic;
pub mod elementwise;
pub mod layout;
pub mod slicing;
// Group B families.
pub mod compose;
pub mod conv;
pub mod indexing;
pub mod linalg;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod resize;
pub mod softmax;
pub mod window;

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
        // conv.rs
        "Conv" => conv::conv,
        "ConvTranspose" => conv::conv_transpose,
        // pool.rs
        "MaxPool" => pool::max_pool,
        "AveragePool" => pool::average_pool,
        "GlobalAveragePool" => pool::global_average_pool,
        "GlobalMaxPool" => pool::global_max_pool,
        // norm.rs
        "BatchNormalization" => norm::batch_normalization,
        "InstanceNormalization" => norm::instance_normalization,
        "LayerNormalization" => norm::layer_normalization,
        "GroupNormalization" => norm::group_normalization,
        "LRN" => norm::lrn,
        // linalg.rs
        "Gemm" => linalg::gemm,
        "MatMul" => linalg::matmul,
        // softmax.rs
        "Softmax" => softmax::softmax,
        "LogSoftmax" => softmax::log_softmax,
        // reduce.rs
        "ReduceSum" => reduce::reduce_sum,
        "ReduceMean" => reduce::reduce_mean,
        "ReduceMax" => reduce::reduce_max,
        "ReduceMin" => reduce::reduce_min,
        "ReduceProd" => reduce::reduce_prod,
        "ReduceL1" => reduce::reduce_l1,
        "ReduceL2" => reduce::reduce_l2,
        "ReduceSumSquare" => reduce::reduce_sum_square,
        "ReduceLogSum" => reduce::reduce_log_sum,
        "ReduceLogSumExp" => reduce::reduce_log_sum_exp,
        "ArgMax" => reduce::arg_max,
        "ArgMin" => reduce::arg_min,
        // resize.rs
        "Resize" => resize::resize,
        "Upsample" => resize::upsample,
        // loss.rs
        "NegativeLogLikelihoodLoss" => loss::negative_log_likelihood_loss,
        "SoftmaxCrossEntropyLoss" => loss::softmax_cross_entropy_loss,
        // indexing.rs
        "GatherElements" => indexing::gather_elements,
        _ => return None,
    };
    Some(lowering)
}
