//! The closed set of IR operations. Data only: semantics live in `infer.rs` (types),
//! `interp.rs` (values) and the compiler's code generators.
//!
//! Conventions shared by every op:
//! - Tensors are dense and row-major; a layout other than that is recorded in the
//!   node's `Schedule`, never implied by the op.
//! - Reductions keep reduced axes (size 1); dropping them is a separate `Reshape`.
//! - Where an output shape cannot be derived from the inputs alone (`Reshape`,
//!   `Broadcast`, `Pool`, `ConvTranspose`), the output value's type is the source of
//!   truth and the verifier checks it for consistency.

use crate::graph::ConstId;
use crate::types::{DType, Scalar};

/// Elementwise functions of one tensor. Parameters are attributes, not inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryFn {
    Neg,
    Abs,
    Sqrt,
    Exp,
    Log,
    Reciprocal,
    Floor,
    Ceil,
    Relu,
    Sigmoid,
    Tanh,
    Erf,
    Softplus,
    Softsign,
    Mish,
    HardSwish,
    /// 0.5·x·(1 + erf(x/√2))
    GeluErf,
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    GeluTanh,
    /// Logical not (bool only).
    Not,
    LeakyRelu { alpha: f32 },
    Elu { alpha: f32 },
    Selu { alpha: f32, gamma: f32 },
    Celu { alpha: f32 },
    /// max(0, min(1, alpha·x + beta))
    HardSigmoid { alpha: f32, beta: f32 },
    /// x·sigmoid(alpha·x)
    Swish { alpha: f32 },
    /// min(max(x, min), max); ±inf for an absent bound.
    Clip { min: f32, max: f32 },
    /// x·scale + shift, a cheap form constant folding and fusion produce.
    Affine { scale: f32, shift: f32 },
    /// x^exponent for a constant exponent (LRN, Pow by a constant).
    PowConst { exponent: f32 },
}

/// Elementwise functions of two tensors with numpy broadcasting. Both operands have
/// the same dtype; comparisons produce bool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryFn {
    Add,
    Sub,
    Mul,
    /// Integer division truncates toward zero, as in C.
    Div,
    Pow,
    Max,
    Min,
    /// x if x >= 0 else slope·x (operands: x, slope).
    PRelu,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Equal,
    And,
    Or,
    Xor,
}

impl BinaryFn {
    pub fn is_comparison(self) -> bool {
        use BinaryFn::*;
        matches!(self, Less | LessOrEqual | Greater | GreaterOrEqual | Equal)
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinaryFn::And | BinaryFn::Or | BinaryFn::Xor)
    }
}

/// Geometry of a convolution (also the transposed one) over `k` spatial axes.
/// Kernel sizes come from the weight's shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<usize>,
    pub pads_end: Vec<usize>,
    pub groups: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Max,
    /// Divisor: with `count_include_pad`, the window taps inside the padded extent
    /// `[-pads_begin, in + pads_end)`; without, the taps inside `[0, in)`. Taps that
    /// fall past the padded extent (ceil mode) never count.
    Avg { count_include_pad: bool },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolAttrs {
    pub kind: PoolKind,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads_begin: Vec<usize>,
    pub pads_end: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArgKind {
    Max,
    Min,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadMode {
    Constant(Scalar),
    Reflect,
    Edge,
    Wrap,
}

/// One operation. Inputs are listed per variant; optional trailing inputs may be absent.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// No inputs; produces graph constant `ConstId`.
    Constant(ConstId),
    /// (x) -> f(x)
    Unary(UnaryFn),
    /// (a, b) -> f(a, b), broadcast.
    Binary(BinaryFn),
    /// (cond: bool, x, y) -> cond ? x : y, broadcast.
    Where,
    /// (x) -> x converted to `to` (float to int truncates toward zero).
    Cast { to: DType },
    /// (a [..., M, K], b [..., K, N]) -> [..., M, N]; batch dims broadcast; both rank >= 2.
    MatMul,
    /// (x [N, C, *in], w [M, C/groups, *k], bias [M]?) -> [N, M, *out]
    /// out[o] = Σ x[o·stride − pad_begin + k·dilation]·w[k] (+ bias), zero padding.
    Conv(ConvGeometry),
    /// (x [N, C, *in], w [C, M/groups, *k], bias [M]?) -> [N, M, *out] (out from the type)
    /// out[i·stride − pad_begin + k·dilation] += x[i]·w[k] (+ bias)
    ConvTranspose(ConvGeometry),
    /// (x [N, C, *in]) -> [N, C, *out] (out from the type).
    Pool(PoolAttrs),
    /// (x) -> x reduced over `axes` (sorted, unique), reduced axes kept as 1.
    /// An empty reduction yields the identity (0, 1, -inf, +inf; Mean of nothing is NaN).
    Reduce { kind: ReduceKind, axes: Vec<usize> },
    /// (x) -> i64 index of the max/min along `axis` (kept as 1); first index on ties
    /// unless `select_last_index`.
    ArgReduce { kind: ArgKind, axis: usize, select_last_index: bool },
    /// (x) -> same elements in the output type's shape.
    Reshape,
    /// (x) -> out[i_0..i_n] = x[i_perm⁻¹...]: output axis d is input axis perm[d].
    Transpose { perm: Vec<usize> },
    /// (x) -> out[i] = x[start + i·step] per axis (output extent from the type).
    Slice { starts: Vec<usize>, steps: Vec<i64> },
    /// (x) -> padded per axis; negative pads crop.
    Pad { begins: Vec<i64>, ends: Vec<i64>, mode: PadMode },
    /// (x_1, ..., x_n) -> concatenation along `axis`.
    Concat { axis: usize },
    /// (x) -> x broadcast (numpy rules) to the output type's shape.
    Broadcast,
    /// (data, indices: i64|i32) -> data indexed along `axis`; out shape =
    /// data[..axis] ++ indices ++ data[axis+1..]; negative indices count from the end.
    Gather { axis: usize },
    /// (data, indices: same rank) -> out[i] = data[i with axis replaced by indices[i]].
    GatherElements { axis: usize },
    /// (x) -> one-axis resampling: out[..i..] = x[..lo[i]..]·(1 − w[i]) + x[..hi[i]..]·w[i].
    /// Nearest-neighbour resizes have lo == hi and w == 0. Tables have the output extent.
    Resample { axis: usize, lo: Vec<usize>, hi: Vec<usize>, weight_hi: Vec<f32> },
    /// (x, step: f32 scalar) -> f32 with x's shape: element i is
    /// `random_uniform(seed, step as u64, i)`, a counter-based pseudo-random number in
    /// [0, 1), the same in the interpreter and on every target. Only x's shape is read;
    /// `step` (saturated to an integer) gives each call its own stream, as a training
    /// step counter does (training-mode Dropout). Not differentiable.
    RandomUniform { seed: u64 },
    /// (x [N, C, *in], dy [N, C, *out]) -> dx with x's type: max pooling's input
    /// gradient. `kind` must be `Max`. For each window (output position o, in row-major
    /// order) the first tap in row-major tap order whose input position lies inside x
    /// and holds the window's maximum (a NaN counts as the maximum; the first NaN wins)
    /// receives dy[o]: dx[that position] += dy[o]. Padding never receives anything, and
    /// a window with no tap inside x routes nowhere.
    PoolGrad(PoolAttrs),
    /// (x [N, C, *in], dy [N, M, *out]) -> dw [M, C/groups, *k] (k from the type): a
    /// convolution's weight gradient, dw[m, c, k] = Σ_n Σ_o dy[n, m, o] ·
    /// x[n, group(m)·C/groups + c, o·stride − pad_begin + k·dilation] with zero padding,
    /// where group(m) = m / (M/groups) and out = the conv's output extent. Sums
    /// accumulate in f32 over (n, o) in row-major order.
    ConvWeightGrad(ConvGeometry),
    /// (x) -> x: the identity on values. Only the bytes move: the node's
    /// `schedule.layout_in` is x's physical layout and `layout_out` the result's
    /// (they differ), e.g. Plain [N, C, H, W] <-> Blocked{b} [N, C/b, H, W, b].
    /// The interpreter copies; a pass inserts it where a blocked region meets plain
    /// producers or consumers.
    Reorder,
}

/// The number `Op::RandomUniform` draws for element `index`: SplitMix64's finaliser
/// over the seed, step and index, its top 24 bits as a fraction (exact in f32).
pub fn random_uniform(seed: u64, step: u64, index: u64) -> f32 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

impl Op {
    /// Short lower-case mnemonic used by the text form and in messages.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Constant(_) => "constant",
            Op::Unary(_) => "unary",
            Op::Binary(_) => "binary",
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::MatMul => "matmul",
            Op::Conv(_) => "conv",
            Op::ConvTranspose(_) => "conv_transpose",
            Op::Pool(_) => "pool",
            Op::Reduce { .. } => "reduce",
            Op::ArgReduce { .. } => "arg_reduce",
            Op::Reshape => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Pad { .. } => "pad",
            Op::Concat { .. } => "concat",
            Op::Broadcast => "broadcast",
            Op::RandomUniform { .. } => "random_uniform",
            Op::Gather { .. } => "gather",
            Op::GatherElements { .. } => "gather_elements",
            Op::Resample { .. } => "resample",
            Op::PoolGrad(_) => "pool_grad",
            Op::ConvWeightGrad(_) => "conv_weight_grad",
            Op::Reorder => "reorder",
        }
    }
}

/// Elementwise work applied to a node's result before it is stored: what fusion
/// attaches to a convolution (bias, activation, residual add). `Binary` takes its
/// second operand from `node.inputs[operand]`, broadcast to the output shape.
#[derive(Clone, Debug, PartialEq)]
pub enum EpilogueStep {
    Unary(UnaryFn),
    Binary { func: BinaryFn, operand: usize },
}
