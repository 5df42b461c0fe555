//! The IR's text form, written. `crate::parse` reads it back: `parse(&print(&g)) == Ok(g)`
//! for every graph whose value ids are all in range.
//!
//! # Text form
//!
//! ```text
//! graph "lenet"
//! inputs:
//!   %0 "x": f32[1,1,28,28]
//! constants:
//!   @0 "conv1.w": f32[6,1,5,5] = dense elided(150 x f32, fp=0x3a9d15c2)
//!   @1 "conv1.b": f32[6] = splat 0.0
//!   @2 "shape": i64[2] = dense [1, 864]
//! nodes:
//!   %1 "conv1.w": f32[6,1,5,5] = constant @0 "conv1.w"
//!   %2 "conv1.b": f32[6] = constant @1 "conv1.b"
//!   %3: f32[1,6,24,24] = conv %0, %1, %2 strides=[1,1] dilations=[1,1] pads_begin=[0,0] pads_end=[0,0] groups=1 epilogue=[relu] "conv1"
//!   %4: f32[1,6,12,12] = pool max %3 kernel=[2,2] strides=[2,2] dilations=[1,1] pads_begin=[0,0] pads_end=[0,0] schedule={vector_width=4, tiles=["ow"=6]} "pool1"
//!   %5 "y": f32[1,864] = reshape %4
//! outputs: %5
//! ```
//!
//! - The header names the graph; then come sections `inputs:`, `constants:`, `nodes:`,
//!   `values:` (only for values that are neither graph inputs nor node outputs, which
//!   a valid graph does not have) and `outputs:`. Empty sections are left out.
//! - A value is declared as `%N "name": type` wherever it is defined (the name is left
//!   out when empty); operands are just `%N`. Constants are `@N`.
//! - A node is one line: its outputs (or `()` for none), `=`, the op mnemonic, the
//!   op's function or kind where it has one (`unary leaky_relu(alpha=0.01)`,
//!   `binary add`, `reduce mean`, `arg_reduce max`, `pool avg(count_include_pad=true)`),
//!   the operands, every attribute as `key=value`, then `epilogue=[...]` and
//!   `schedule={...}` when not empty / not default, then the node name when not empty.
//!   Epilogue steps are unary functions (`relu`) or binary ones naming the node input
//!   that is their second operand (`add(input=3)`).
//! - Floats print as Rust's shortest round-tripping decimal (`0.01`, `-0.0`, `inf`,
//!   `-inf`, `NaN`); a NaN other than the canonical one prints as its bit pattern
//!   (`0x7fc00001`). Strings are double-quoted with `\"`, `\\`, `\n`, `\t`, `\r` and
//!   `\u{..}` escapes.
//! - With `elide_constant_data`, dense constants of more than `ELIDE_ABOVE` elements
//!   show their element count, dtype and a fingerprint of their bytes instead of the
//!   data; splats always print their value. Such text does not parse back.
//! - A newline inside brackets or parentheses is whitespace (long dense data wraps);
//!   `#` starts a comment that runs to the end of the line.

use std::fmt::Write;

use crate::graph::{ConstValue, Constant, Graph, Node, ValueId};
use crate::op::{ArgKind, BinaryFn, EpilogueStep, Op, PadMode, PoolKind, ReduceKind, UnaryFn};
use crate::schedule::{Layout, Schedule};
use crate::types::{Scalar, TensorData};

/// How much of the graph to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrintOptions {
    /// Replace dense constant payloads of more than `ELIDE_ABOVE` elements by a
    /// fingerprint (for dumps and snapshots; the result no longer parses).
    pub elide_constant_data: bool,
}

/// Dense constants up to this many elements are printed in full even when eliding:
/// shape vectors and tiny tables are worth seeing.
pub const ELIDE_ABOVE: usize = 16;

/// Dense data is wrapped to this many elements per line.
const ELEMENTS_PER_LINE: usize = 16;

/// The full text form, including all constant data; `crate::parse::parse` reads it back.
pub fn print(g: &Graph) -> String {
    print_with(g, &PrintOptions::default())
}

pub fn print_with(g: &Graph, opts: &PrintOptions) -> String {
    let mut out = String::new();
    writeln!(out, "graph {}", quote(&g.name)).unwrap();
    if !g.inputs.is_empty() {
        out.push_str("inputs:\n");
        for &v in &g.inputs {
            writeln!(out, "  {}", value_decl(g, v)).unwrap();
        }
    }
    if !g.constants.is_empty() {
        out.push_str("constants:\n");
        for (i, c) in g.constants.iter().enumerate() {
            write_constant(&mut out, i, c, opts);
        }
    }
    if !g.nodes.is_empty() {
        out.push_str("nodes:\n");
        for node in &g.nodes {
            out.push_str("  ");
            write_node(&mut out, g, node);
            out.push('\n');
        }
    }
    let orphans = undefined_values(g);
    if !orphans.is_empty() {
        out.push_str("values:\n");
        for v in orphans {
            writeln!(out, "  {}", value_decl(g, v)).unwrap();
        }
    }
    if !g.outputs.is_empty() {
        let outs: Vec<String> = g.outputs.iter().map(|v| v.to_string()).collect();
        writeln!(out, "outputs: {}", outs.join(", ")).unwrap();
    }
    out
}

/// Values that neither a graph input nor a node output declares; printing them in a
/// section of their own keeps even an unfinished graph's value table intact.
fn undefined_values(g: &Graph) -> Vec<ValueId> {
    let mut declared = vec![false; g.values.len()];
    let defs = g.inputs.iter().chain(g.nodes.iter().flat_map(|n| n.outputs.iter()));
    for v in defs {
        if let Some(d) = declared.get_mut(v.index()) {
            *d = true;
        }
    }
    (0..g.values.len()).filter(|&i| !declared[i]).map(|i| ValueId(i as u32)).collect()
}

fn value_decl(g: &Graph, v: ValueId) -> String {
    match g.values.get(v.index()) {
        Some(value) if value.name.is_empty() => format!("{v}: {}", value.ty),
        Some(value) => format!("{v} {}: {}", quote(&value.name), value.ty),
        None => format!("{v}: <out of range>"),
    }
}

fn write_constant(out: &mut String, index: usize, c: &Constant, opts: &PrintOptions) {
    write!(out, "  @{index}").unwrap();
    if !c.name.is_empty() {
        write!(out, " {}", quote(&c.name)).unwrap();
    }
    write!(out, ": {} = ", c.ty).unwrap();
    match &c.value {
        ConstValue::Splat(s) => {
            out.push_str("splat ");
            if s.dtype() != c.ty.dtype {
                write!(out, "{} ", s.dtype()).unwrap();
            }
            out.push_str(&scalar_literal(*s));
        }
        ConstValue::Dense(data) => {
            out.push_str("dense ");
            if data.dtype() != c.ty.dtype {
                write!(out, "{} ", data.dtype()).unwrap();
            }
            if opts.elide_constant_data && data.len() > ELIDE_ABOVE {
                write!(out, "elided({} x {}, fp=0x{:08x})", data.len(), data.dtype(), fingerprint(data)).unwrap();
            } else {
                write_dense(out, data);
            }
        }
    }
    out.push('\n');
}

fn write_dense(out: &mut String, data: &TensorData) {
    out.push('[');
    for i in 0..data.len() {
        if i > 0 {
            out.push(',');
            out.push_str(if i % ELEMENTS_PER_LINE == 0 { "\n      " } else { " " });
        }
        write_scalar(out, data.get(i));
    }
    out.push(']');
}

/// FNV-1a over the little-endian bytes, folded to 32 bits: enough to tell in a
/// diff whether two dumps hold the same weights.
fn fingerprint(data: &TensorData) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.to_le_bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32
}

fn write_node(out: &mut String, g: &Graph, node: &Node) {
    if node.outputs.is_empty() {
        out.push_str("()");
    } else {
        let decls: Vec<String> = node.outputs.iter().map(|&v| value_decl(g, v)).collect();
        out.push_str(&decls.join(", "));
    }
    write!(out, " = {}", node.op.mnemonic()).unwrap();
    match &node.op {
        Op::Unary(f) => write!(out, " {}", unary_text(*f)).unwrap(),
        Op::Binary(f) => write!(out, " {}", binary_name(*f)).unwrap(),
        Op::Reduce { kind, .. } => write!(out, " {}", reduce_name(*kind)).unwrap(),
        Op::ArgReduce { kind, .. } => write!(out, " {}", arg_name(*kind)).unwrap(),
        Op::Pool(p) | Op::PoolGrad(p) => match p.kind {
            PoolKind::Max => out.push_str(" max"),
            PoolKind::Avg { count_include_pad } => {
                write!(out, " avg(count_include_pad={count_include_pad})").unwrap()
            }
        },
        _ => {}
    }
    if let Op::Constant(c) = &node.op {
        write!(out, " {c}").unwrap();
    }
    if !node.inputs.is_empty() {
        let operands: Vec<String> = node.inputs.iter().map(|v| v.to_string()).collect();
        write!(out, " {}", operands.join(", ")).unwrap();
    }
    write_attributes(out, &node.op);
    if !node.epilogue.is_empty() {
        let steps: Vec<String> = node.epilogue.iter().map(epilogue_step_text).collect();
        write!(out, " epilogue=[{}]", steps.join(", ")).unwrap();
    }
    if !node.schedule.is_default() {
        write!(out, " schedule={{{}}}", schedule_text(&node.schedule)).unwrap();
    }
    if !node.name.is_empty() {
        write!(out, " {}", quote(&node.name)).unwrap();
    }
}

fn write_attributes(out: &mut String, op: &Op) {
    let mut attr = |key: &str, value: String| write!(out, " {key}={value}").unwrap();
    match op {
        Op::Constant(_)
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Where
        | Op::MatMul
        | Op::Reshape
        | Op::Reorder
        | Op::Broadcast => {}
        Op::Cast { to } => attr("to", to.to_string()),
        Op::Conv(geometry) | Op::ConvTranspose(geometry) | Op::ConvWeightGrad(geometry) => {
            attr("strides", list(&geometry.strides));
            attr("dilations", list(&geometry.dilations));
            attr("pads_begin", list(&geometry.pads_begin));
            attr("pads_end", list(&geometry.pads_end));
            attr("groups", geometry.groups.to_string());
        }
        Op::Pool(p) | Op::PoolGrad(p) => {
            attr("kernel", list(&p.kernel));
            attr("strides", list(&p.strides));
            attr("dilations", list(&p.dilations));
            attr("pads_begin", list(&p.pads_begin));
            attr("pads_end", list(&p.pads_end));
        }
        Op::Reduce { axes, .. } => attr("axes", list(axes)),
        Op::ArgReduce { axis, select_last_index, .. } => {
            attr("axis", axis.to_string());
            attr("select_last_index", select_last_index.to_string());
        }
        Op::Transpose { perm } => attr("perm", list(perm)),
        Op::RandomUniform { seed } => attr("seed", seed.to_string()),
        Op::Slice { starts, steps } => {
            attr("starts", list(starts));
            attr("steps", list(steps));
        }
        Op::Pad { begins, ends, mode } => {
            attr("begins", list(begins));
            attr("ends", list(ends));
            attr("mode", pad_mode_text(*mode));
        }
        Op::Concat { axis } | Op::Gather { axis } | Op::GatherElements { axis } => {
            attr("axis", axis.to_string())
        }
        Op::Resample { axis, lo, hi, weight_hi } => {
            attr("axis", axis.to_string());
            attr("lo", list(lo));
            attr("hi", list(hi));
            let weights: Vec<String> = weight_hi.iter().map(|&w| f32_literal(w)).collect();
            attr("weight_hi", format!("[{}]", weights.join(", ")));
        }
    }
}

fn list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(","))
}

fn pad_mode_text(mode: PadMode) -> String {
    match mode {
        PadMode::Constant(v) => format!("constant({} {})", v.dtype(), scalar_literal(v)),
        PadMode::Reflect => "reflect".into(),
        PadMode::Edge => "edge".into(),
        PadMode::Wrap => "wrap".into(),
    }
}

fn epilogue_step_text(step: &EpilogueStep) -> String {
    match step {
        EpilogueStep::Unary(f) => unary_text(*f),
        EpilogueStep::Binary { func, operand } => format!("{}(input={operand})", binary_name(*func)),
    }
}

fn schedule_text(s: &Schedule) -> String {
    let mut fields = Vec::new();
    if s.layout_in != Layout::Plain {
        fields.push(format!("layout_in={}", layout_text(s.layout_in)));
    }
    if s.layout_out != Layout::Plain {
        fields.push(format!("layout_out={}", layout_text(s.layout_out)));
    }
    if s.vector_width != 0 {
        fields.push(format!("vector_width={}", s.vector_width));
    }
    if !s.tiles.is_empty() {
        let tiles: Vec<String> = s.tiles.iter().map(|(name, size)| format!("{}={size}", quote(name))).collect();
        fields.push(format!("tiles=[{}]", tiles.join(", ")));
    }
    if !s.kernel.is_empty() {
        fields.push(format!("kernel={}", quote(&s.kernel)));
    }
    fields.join(", ")
}

fn layout_text(layout: Layout) -> String {
    match layout {
        Layout::Plain => "plain".into(),
        Layout::Blocked { block } => format!("blocked({block})"),
    }
}

/// `relu`, `leaky_relu(alpha=0.01)`: the function's name and its parameters.
pub(crate) fn unary_text(f: UnaryFn) -> String {
    let (name, params) = unary_parts(f);
    if params.is_empty() {
        return name.to_string();
    }
    let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", f32_literal(*v))).collect();
    format!("{name}({})", params.join(", "))
}

/// The text name of a unary function and its parameters in declaration order;
/// `parse` inverts this.
pub(crate) fn unary_parts(f: UnaryFn) -> (&'static str, Vec<(&'static str, f32)>) {
    use UnaryFn::*;
    match f {
        Neg => ("neg", vec![]),
        Abs => ("abs", vec![]),
        Sqrt => ("sqrt", vec![]),
        Exp => ("exp", vec![]),
        Log => ("log", vec![]),
        Reciprocal => ("reciprocal", vec![]),
        Floor => ("floor", vec![]),
        Ceil => ("ceil", vec![]),
        Relu => ("relu", vec![]),
        Sigmoid => ("sigmoid", vec![]),
        Tanh => ("tanh", vec![]),
        Erf => ("erf", vec![]),
        Softplus => ("softplus", vec![]),
        Softsign => ("softsign", vec![]),
        Mish => ("mish", vec![]),
        HardSwish => ("hard_swish", vec![]),
        GeluErf => ("gelu_erf", vec![]),
        GeluTanh => ("gelu_tanh", vec![]),
        Not => ("not", vec![]),
        LeakyRelu { alpha } => ("leaky_relu", vec![("alpha", alpha)]),
        Elu { alpha } => ("elu", vec![("alpha", alpha)]),
        Selu { alpha, gamma } => ("selu", vec![("alpha", alpha), ("gamma", gamma)]),
        Celu { alpha } => ("celu", vec![("alpha", alpha)]),
        HardSigmoid { alpha, beta } => ("hard_sigmoid", vec![("alpha", alpha), ("beta", beta)]),
        Swish { alpha } => ("swish", vec![("alpha", alpha)]),
        Clip { min, max } => ("clip", vec![("min", min), ("max", max)]),
        Affine { scale, shift } => ("affine", vec![("scale", scale), ("shift", shift)]),
        PowConst { exponent } => ("pow_const", vec![("exponent", exponent)]),
    }
}

pub(crate) const ALL_BINARY_FNS: [BinaryFn; 16] = {
    use BinaryFn::*;
    [Add, Sub, Mul, Div, Pow, Max, Min, PRelu, Less, LessOrEqual, Greater, GreaterOrEqual, Equal, And, Or, Xor]
};

pub(crate) fn binary_name(f: BinaryFn) -> &'static str {
    use BinaryFn::*;
    match f {
        Add => "add",
        Sub => "sub",
        Mul => "mul",
        Div => "div",
        Pow => "pow",
        Max => "max",
        Min => "min",
        PRelu => "prelu",
        Less => "less",
        LessOrEqual => "less_or_equal",
        Greater => "greater",
        GreaterOrEqual => "greater_or_equal",
        Equal => "equal",
        And => "and",
        Or => "or",
        Xor => "xor",
    }
}

pub(crate) const ALL_REDUCE_KINDS: [ReduceKind; 5] =
    [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max, ReduceKind::Min, ReduceKind::Prod];

pub(crate) fn reduce_name(kind: ReduceKind) -> &'static str {
    match kind {
        ReduceKind::Sum => "sum",
        ReduceKind::Mean => "mean",
        ReduceKind::Max => "max",
        ReduceKind::Min => "min",
        ReduceKind::Prod => "prod",
    }
}

pub(crate) fn arg_name(kind: ArgKind) -> &'static str {
    match kind {
        ArgKind::Max => "max",
        ArgKind::Min => "min",
    }
}

/// A scalar in its own dtype's notation: `0.5`, `-3`, `true`.
pub(crate) fn scalar_literal(s: Scalar) -> String {
    let mut out = String::new();
    write_scalar(&mut out, s);
    out
}

/// Floats are exact: Rust's `{:?}` prints the shortest decimal that parses back to the
/// same bits and covers `inf`/`-inf`/`-0.0`; only NaN payloads and signs need the bit
/// pattern. Appends without a temporary string: a full print writes every weight here.
fn write_scalar(out: &mut String, s: Scalar) {
    match s {
        Scalar::F32(v) if v.is_nan() && v.to_bits() != CANONICAL_NAN_BITS => write!(out, "0x{:08x}", v.to_bits()),
        Scalar::F32(v) => write!(out, "{v:?}"),
        Scalar::I64(v) => write!(out, "{v}"),
        Scalar::I32(v) => write!(out, "{v}"),
        Scalar::Bool(v) => write!(out, "{v}"),
    }
    .unwrap()
}

/// The one NaN written `NaN` (`f32::NAN`); every other NaN is written as its bit pattern.
pub(crate) const CANONICAL_NAN_BITS: u32 = 0x7fc0_0000;

pub(crate) fn f32_literal(v: f32) -> String {
    scalar_literal(Scalar::F32(v))
}

pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => write!(out, "\\u{{{:x}}}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
