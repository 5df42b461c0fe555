//! Unary, Binary, Where, Cast and node epilogues: element functions run by the map
//! engine (`map.rs`). f32 functions work on scalars and f32x4 lanes alike.
//!
//! Semantics follow `cnnc_ir::interp`: integer arithmetic wraps, integer division by
//! zero gives 0 (and MIN / −1 gives MIN, never a trap), float Max/Min propagate NaN,
//! every unary function maps NaN to NaN (PowConst follows C `pow`), Cast saturates
//! float to int with NaN → 0.

use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Node, UnaryFn};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{self, I8, I32, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::map::{Operand, broadcast_strides, emit_map, readonly_flags, rw_flags};
use super::{CodegenError, KernelCtx};
use crate::math::Fx;

fn err<T>(msg: String) -> Result<T, CodegenError> {
    Err(CodegenError(msg))
}

fn input_operand(k: &KernelCtx, i: usize, space: &Space) -> Result<Operand, CodegenError> {
    let ty = k.graph.ty(k.node.inputs[i]);
    Ok(Operand {
        ptr: k.inputs[i],
        dtype: ty.dtype,
        strides: space.strides(&ty.shape)?,
        flags: readonly_flags(),
    })
}

/// The iteration space of an elementwise node's output in its physical layout: the
/// logical shape when Plain; [N, C/b, H, W, b] when Blocked{b}, where operands of the
/// output's shape are blocked too (the node's data operands) and every other operand
/// is a Plain broadcast (a per-channel [1, C, 1, 1] is then read one b-lane vector per
/// channel block: c = cb·b + lane).
pub struct Space {
    logical: Vec<usize>,
    physical: Vec<usize>,
    block: Option<usize>,
}

impl Space {
    pub fn new(node: &cnnc_ir::Node, out: &cnnc_ir::TensorType) -> Result<Space, CodegenError> {
        let s = &node.schedule;
        if s.layout_in != s.layout_out {
            return err(format!(
                "{} node '{}' changes the layout ({:?} -> {:?}); only a reorder may",
                node.op.mnemonic(),
                node.name,
                s.layout_in,
                s.layout_out
            ));
        }
        let block = super::reorder::check_blockable(node, out, s.layout_out)?;
        let logical = out.shape.clone();
        let physical = match block {
            None => logical.clone(),
            Some(b) => vec![logical[0], logical[1] / b, logical[2], logical[3], b],
        };
        Ok(Space { logical, physical, block })
    }

    /// The extents the map iterates (dense row-major output).
    pub fn shape(&self) -> &[usize] {
        &self.physical
    }

    /// Element strides over `shape()` of an operand of logical `shape`.
    pub fn strides(&self, shape: &[usize]) -> Result<Vec<i64>, CodegenError> {
        let Some(b) = self.block else { return broadcast_strides(shape, &self.logical) };
        if shape == self.logical.as_slice() {
            return Ok(cnnc_ir::strides(&self.physical).iter().map(|&x| x as i64).collect());
        }
        let s = broadcast_strides(shape, &self.logical)?;
        Ok(vec![s[0], s[1] * b as i64, s[2], s[3], s[1]])
    }
}

fn out_type(k: &KernelCtx) -> cnnc_ir::TensorType {
    k.graph.ty(k.node.outputs[0]).clone()
}

/// Unary op, then the node's epilogue on each element while it is in registers.
pub fn emit_unary(k: &mut KernelCtx, f: UnaryFn) -> Result<(), CodegenError> {
    let out = out_type(k);
    let space = Space::new(k.node, &out)?;
    let x = input_operand(k, 0, &space)?;
    let dtype = x.dtype;
    check_unary(f, dtype)?;
    let mut ops = vec![x];
    let epilogue = Epilogue::new(k, &out, &mut ops)?;
    emit_map(k.b, space.shape(), k.outputs[0], out.dtype, &ops, true, &|b, v| {
        let y = unary_lane(b, f, dtype, v[0])?;
        epilogue.apply(b, y, v)
    })
}

/// Binary op, then the node's epilogue on each element while it is in registers.
pub fn emit_binary(k: &mut KernelCtx, f: BinaryFn) -> Result<(), CodegenError> {
    let out = out_type(k);
    let space = Space::new(k.node, &out)?;
    let a = input_operand(k, 0, &space)?;
    let c = input_operand(k, 1, &space)?;
    let dtype = a.dtype;
    check_binary(f, dtype)?;
    let mut ops = vec![a, c];
    let epilogue = Epilogue::new(k, &out, &mut ops)?;
    emit_map(k.b, space.shape(), k.outputs[0], out.dtype, &ops, true, &|b, v| {
        let y = binary_lane(b, f, dtype, v[0], v[1])?;
        epilogue.apply(b, y, v)
    })
}

/// A node's epilogue steps, with the operand slot (in a map's operand list) each binary
/// step reads.
pub struct Epilogue {
    steps: Vec<EpilogueStep>,
    slots: Vec<usize>,
    dtype: DType,
}

impl Epilogue {
    /// Appends the operands of `k.node`'s epilogue steps to `ops`, addressed over `out`
    /// in the node's output layout (`Space`).
    pub fn new(k: &KernelCtx, out: &cnnc_ir::TensorType, ops: &mut Vec<Operand>) -> Result<Epilogue, CodegenError> {
        let space = Space::new(k.node, out)?;
        let steps = k.node.epilogue.clone();
        let mut slots = Vec::with_capacity(steps.len());
        for step in &steps {
            match *step {
                EpilogueStep::Unary(f) => {
                    check_unary(f, out.dtype)?;
                    slots.push(0);
                }
                EpilogueStep::Binary { func, operand } => {
                    if operand >= k.inputs.len() {
                        return err(format!("epilogue operand {operand} of node '{}' does not exist", k.node.name));
                    }
                    let o = input_operand(k, operand, &space)?;
                    if o.dtype != out.dtype || func.is_comparison() {
                        return err(format!(
                            "epilogue step {func:?} of node '{}' would change the dtype {}",
                            k.node.name, out.dtype
                        ));
                    }
                    check_binary(func, out.dtype)?;
                    slots.push(ops.len());
                    ops.push(o);
                }
            }
        }
        Ok(Epilogue { steps, slots, dtype: out.dtype })
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps applied to `y`; `v` holds the map's operand lanes.
    pub fn apply(&self, b: &mut FunctionBuilder, mut y: Value, v: &[Value]) -> Result<Value, CodegenError> {
        for (step, &s) in self.steps.iter().zip(&self.slots) {
            y = match *step {
                EpilogueStep::Unary(f) => unary_lane(b, f, self.dtype, y)?,
                EpilogueStep::Binary { func, .. } => binary_lane(b, func, self.dtype, y, v[s])?,
            };
        }
        Ok(y)
    }
}

pub fn emit_where(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let out = out_type(k);
    let space = Space::new(k.node, &out)?;
    let ops = (0..3)
        .map(|i| input_operand(k, i, &space))
        .collect::<Result<Vec<_>, _>>()?;
    if ops[0].dtype != DType::Bool {
        return err("where: the condition must be bool".into());
    }
    emit_map(k.b, space.shape(), k.outputs[0], out.dtype, &ops, true, &|b, v| {
        if b.func.dfg.value_type(v[0]).is_vector() {
            // The chosen lanes are f32x4, or masks themselves when choosing between bools.
            let lanes = b.func.dfg.value_type(v[1]);
            let mask = if lanes == types::I32X4 {
                v[0]
            } else {
                b.ins().bitcast(lanes, cranelift_codegen::ir::MemFlagsData::new(), v[0])
            };
            Ok(b.ins().bitselect(mask, v[1], v[2]))
        } else {
            Ok(b.ins().select(v[0], v[1], v[2]))
        }
    })
}

pub fn emit_cast(k: &mut KernelCtx, to: DType) -> Result<(), CodegenError> {
    let out = out_type(k);
    let space = Space::new(k.node, &out)?;
    let x = input_operand(k, 0, &space)?;
    let from = x.dtype;
    emit_map(k.b, space.shape(), k.outputs[0], to, &[x], from == to, &|b, v| {
        Ok(cast_lane(b, v[0], from, to))
    })
}

/// Applies `steps` of the node's epilogue to output 0 in place, reading the node's buffer
/// pointers from `bufs` (the kernel's pointer array: inputs, then the output): for kernels
/// whose tasks applied the rest of the epilogue in registers.
pub fn emit_epilogue_steps_from_buffers(
    b: &mut FunctionBuilder,
    graph: &Graph,
    node: &Node,
    steps: &[EpilogueStep],
    bufs: Value,
) -> Result<(), CodegenError> {
    if steps.is_empty() {
        return Ok(());
    }
    let flags = MemFlagsData::trusted().with_readonly().with_can_move();
    let mut inputs: Vec<Value> = (0..=node.inputs.len()).map(|i| b.ins().load(I64, flags, bufs, (8 * i) as i32)).collect();
    let outputs = inputs.split_off(node.inputs.len());
    let mut rest = node.clone();
    rest.epilogue = steps.to_vec();
    emit_epilogue(&mut KernelCtx { b, graph, node: &rest, inputs, outputs })
}

/// Applies the node's epilogue to output 0 in place, in one pass over the output (for
/// kernels that cannot apply it in registers).
pub fn emit_epilogue(k: &mut KernelCtx) -> Result<(), CodegenError> {
    if k.node.epilogue.is_empty() {
        return Ok(());
    }
    let out = out_type(k);
    let space = Space::new(k.node, &out)?;
    let mut ops = vec![Operand {
        ptr: k.outputs[0],
        dtype: out.dtype,
        strides: space.strides(&out.shape)?,
        flags: rw_flags(),
    }];
    let epilogue = Epilogue::new(k, &out, &mut ops)?;
    emit_map(k.b, space.shape(), k.outputs[0], out.dtype, &ops, true, &|b, v| epilogue.apply(b, v[0], v))
}

pub fn check_unary(f: UnaryFn, dtype: DType) -> Result<(), CodegenError> {
    let ok = match f {
        UnaryFn::Not => dtype == DType::Bool,
        UnaryFn::Neg | UnaryFn::Abs | UnaryFn::Relu | UnaryFn::Clip { .. } => dtype != DType::Bool,
        _ => dtype == DType::F32,
    };
    if ok {
        Ok(())
    } else {
        err(format!("unary {f:?} is not defined on {dtype}"))
    }
}

pub fn check_binary(f: BinaryFn, dtype: DType) -> Result<(), CodegenError> {
    let ok = match dtype {
        DType::Bool => f.is_logical() || f == BinaryFn::Equal,
        _ => !f.is_logical(),
    };
    if ok {
        Ok(())
    } else {
        err(format!("binary {f:?} is not defined on {dtype}"))
    }
}

pub fn scalar_const(b: &mut FunctionBuilder, v: cnnc_ir::Scalar) -> Value {
    match v {
        cnnc_ir::Scalar::F32(x) => b.ins().f32const(x),
        cnnc_ir::Scalar::I64(x) => b.ins().iconst(I64, x),
        cnnc_ir::Scalar::I32(x) => b.ins().iconst(I32, x as i64),
        cnnc_ir::Scalar::Bool(x) => b.ins().iconst(I8, x as i64),
    }
}

/// Converts one element; float to int saturates (NaN → 0), anything to bool is != 0.
pub fn cast_lane(b: &mut FunctionBuilder, x: Value, from: DType, to: DType) -> Value {
    use DType::*;
    match (from, to) {
        _ if from == to => x,
        (F32, I64 | I32) => b.ins().fcvt_to_sint_sat(super::map::elem_type(to), x),
        (F32, Bool) => {
            let zero = b.ins().f32const(0.0);
            b.ins().fcmp(FloatCC::NotEqual, x, zero)
        }
        (I64 | I32, F32) => b.ins().fcvt_from_sint(types::F32, x),
        (I64, I32) => b.ins().ireduce(types::I32, x),
        (I32, I64) => b.ins().sextend(types::I64, x),
        (I64 | I32, Bool) => b.ins().icmp_imm_s(IntCC::NotEqual, x, 0),
        (Bool, F32) => {
            let w = b.ins().uextend(types::I32, x);
            b.ins().fcvt_from_sint(types::F32, w)
        }
        (Bool, I64 | I32) => b.ins().uextend(super::map::elem_type(to), x),
        _ => x,
    }
}

/// One lane of a unary function. `x` is F32 / F32X4 for f32, an integer or I8 otherwise.
pub fn unary_lane(b: &mut FunctionBuilder, f: UnaryFn, dtype: DType, x: Value) -> Result<Value, CodegenError> {
    match dtype {
        DType::F32 => Ok(unary_f32(&mut Fx::of(b, x), f, x)),
        DType::Bool => match f {
            // A vector lane is a mask (all ones for true), a scalar one is 0 or 1.
            UnaryFn::Not if b.func.dfg.value_type(x).is_vector() => Ok(b.ins().bnot(x)),
            UnaryFn::Not => Ok(b.ins().bxor_imm_s(x, 1)),
            _ => err(format!("unary {f:?} is not defined on bool")),
        },
        DType::I64 | DType::I32 => unary_int(b, f, dtype, x),
    }
}

fn unary_int(b: &mut FunctionBuilder, f: UnaryFn, dtype: DType, x: Value) -> Result<Value, CodegenError> {
    let ty = super::map::elem_type(dtype);
    Ok(match f {
        UnaryFn::Neg => b.ins().ineg(x),
        UnaryFn::Abs => {
            // Wrapping: |MIN| = MIN.
            let n = b.ins().ineg(x);
            let neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, x, 0);
            b.ins().select(neg, n, x)
        }
        UnaryFn::Relu => {
            let zero = b.ins().iconst(ty, 0);
            b.ins().smax(x, zero)
        }
        UnaryFn::Clip { min, max } => {
            // Float bounds rounded inward to integers, saturating at the type's range.
            let (lo, hi) = if dtype == DType::I64 {
                ((min as f64).ceil() as i64, (max as f64).floor() as i64)
            } else {
                ((min as f64).ceil() as i32 as i64, (max as f64).floor() as i32 as i64)
            };
            let lo = b.ins().iconst(ty, lo);
            let hi = b.ins().iconst(ty, hi);
            let raised = b.ins().smax(x, lo);
            b.ins().smin(raised, hi)
        }
        _ => return err(format!("unary {f:?} is not defined on {dtype}")),
    })
}

fn unary_f32(m: &mut Fx, f: UnaryFn, x: Value) -> Value {
    match f {
        UnaryFn::Neg => m.neg(x),
        UnaryFn::Abs => m.abs(x),
        UnaryFn::Sqrt => m.b.ins().sqrt(x),
        UnaryFn::Exp => m.exp(x),
        UnaryFn::Log => m.log(x),
        UnaryFn::Reciprocal => {
            let one = m.c(1.0);
            m.div(one, x)
        }
        UnaryFn::Floor => m.b.ins().floor(x),
        UnaryFn::Ceil => m.b.ins().ceil(x),
        UnaryFn::Relu => m.maxc(x, 0.0),
        UnaryFn::Sigmoid => m.sigmoid(x),
        UnaryFn::Tanh => m.tanh(x),
        UnaryFn::Erf => m.erf(x),
        UnaryFn::Softplus => m.softplus(x),
        UnaryFn::Softsign => {
            let a = m.abs(x);
            let d = m.addc(a, 1.0);
            m.div(x, d)
        }
        UnaryFn::Mish => {
            let s = m.softplus(x);
            let t = m.tanh(s);
            m.mul(x, t)
        }
        UnaryFn::HardSwish => {
            let t = m.mulc(x, 1.0 / 6.0);
            let t = m.addc(t, 0.5);
            let t = m.minc(t, 1.0);
            let t = m.maxc(t, 0.0);
            m.mul(x, t)
        }
        UnaryFn::GeluErf => {
            // 0.5·x·erfc(−x/√2) keeps relative accuracy for negative x.
            let t = m.mulc(x, -std::f32::consts::FRAC_1_SQRT_2);
            let e = m.erfc(t);
            let h = m.mulc(x, 0.5);
            m.mul(h, e)
        }
        UnaryFn::GeluTanh => {
            // 0.5·(1 + tanh u) = sigmoid(2u): no cancellation for negative x.
            let x3 = m.mul(x, x);
            let x3 = m.mul(x3, x);
            let inner = m.mulc(x3, 0.044715);
            let inner = m.add(inner, x);
            let two_u = m.mulc(inner, 2.0 * (2.0 / std::f32::consts::PI).sqrt());
            let s = m.sigmoid(two_u);
            let y = m.mul(x, s);
            // The formula as written (and every reference) loses 1 + tanh u below the
            // f64 epsilon, giving exactly 0 where this would give |x|·1e-17.
            let negligible = m.cmpc(FloatCC::LessThan, two_u, -36.7);
            let ax = m.abs(x);
            let finite = m.cmpc(FloatCC::LessThan, ax, f32::INFINITY);
            let flush = m.and(negligible, finite);
            m.selc(flush, 0.0, y)
        }
        UnaryFn::Not => x,
        UnaryFn::LeakyRelu { alpha } => {
            let neg = m.cmpc(FloatCC::LessThan, x, 0.0);
            let scaled = m.mulc(x, alpha);
            m.sel(neg, scaled, x)
        }
        UnaryFn::Elu { alpha } => {
            let neg = m.cmpc(FloatCC::LessThan, x, 0.0);
            let e = m.expm1(x);
            let scaled = m.mulc(e, alpha);
            m.sel(neg, scaled, x)
        }
        UnaryFn::Selu { alpha, gamma } => {
            // α·eˣ − α as ONNX writes it (and the interpreter computes it), not
            // α·expm1(x): tiny negative inputs give 0 like every reference does.
            let pos = m.cmpc(FloatCC::GreaterThan, x, 0.0);
            let e = m.exp(x);
            let scaled = m.mulc(e, alpha);
            let scaled = m.addc(scaled, -alpha);
            let y = m.sel(pos, x, scaled);
            m.mulc(y, gamma)
        }
        UnaryFn::Celu { alpha } => {
            let inv = m.mulc(x, 1.0 / alpha);
            let e = m.expm1(inv);
            let e = m.mulc(e, alpha);
            let neg_part = m.minc(e, 0.0);
            let pos_part = m.maxc(x, 0.0);
            m.add(pos_part, neg_part)
        }
        UnaryFn::HardSigmoid { alpha, beta } => {
            let t = m.mulc(x, alpha);
            let t = m.addc(t, beta);
            let t = m.minc(t, 1.0);
            m.maxc(t, 0.0)
        }
        UnaryFn::Swish { alpha } => m.swish(x, alpha),
        UnaryFn::Clip { min, max } => {
            let t = m.maxc(x, min);
            m.minc(t, max)
        }
        UnaryFn::Affine { scale, shift } => {
            let t = m.mulc(x, scale);
            m.addc(t, shift)
        }
        UnaryFn::PowConst { exponent } => pow_const(m, x, exponent),
    }
}

/// x^e: small integer exponents by multiplication, ½ by sqrt, the rest by `pow`.
fn pow_const(m: &mut Fx, x: Value, e: f32) -> Value {
    if e == 0.0 {
        return m.c(1.0);
    }
    if e == 0.5 {
        // C pow(−inf, ½) is +inf where sqrt gives NaN.
        let r = m.b.ins().sqrt(x);
        let minus_inf = m.cmpc(FloatCC::Equal, x, f32::NEG_INFINITY);
        return m.selc(minus_inf, f32::INFINITY, r);
    }
    if e.fract() == 0.0 && e.abs() <= 16.0 {
        let mut n = e.abs() as u32;
        let mut result: Option<Value> = None;
        let mut base = x;
        while n > 0 {
            if n & 1 == 1 {
                result = Some(match result {
                    Some(r) => m.mul(r, base),
                    None => base,
                });
            }
            n >>= 1;
            if n > 0 {
                base = m.mul(base, base);
            }
        }
        let r = result.unwrap_or(x);
        if e < 0.0 {
            let one = m.c(1.0);
            return m.div(one, r);
        }
        return r;
    }
    let y = m.c(e);
    m.pow(x, y)
}

/// One lane of a binary function (both operands of `dtype`; comparisons give I8, or an
/// I32X4 mask for vector lanes).
pub fn binary_lane(
    b: &mut FunctionBuilder,
    f: BinaryFn,
    dtype: DType,
    x: Value,
    y: Value,
) -> Result<Value, CodegenError> {
    match dtype {
        DType::F32 => Ok(binary_f32(&mut Fx::of(b, x), f, x, y)),
        DType::Bool => Ok(match f {
            BinaryFn::And => b.ins().band(x, y),
            BinaryFn::Or => b.ins().bor(x, y),
            BinaryFn::Xor => b.ins().bxor(x, y),
            BinaryFn::Equal => b.ins().icmp(IntCC::Equal, x, y),
            _ => return err(format!("binary {f:?} is not defined on bool")),
        }),
        DType::I64 | DType::I32 => binary_int(b, f, dtype, x, y),
    }
}

fn binary_f32(m: &mut Fx, f: BinaryFn, x: Value, y: Value) -> Value {
    let compare = |m: &mut Fx, cc| m.b.ins().fcmp(cc, x, y);
    match f {
        BinaryFn::Add => m.add(x, y),
        BinaryFn::Sub => m.sub(x, y),
        BinaryFn::Mul => m.mul(x, y),
        BinaryFn::Div => m.div(x, y),
        BinaryFn::Pow => m.pow(x, y),
        BinaryFn::Max => m.max(x, y),
        BinaryFn::Min => m.min(x, y),
        BinaryFn::PRelu => {
            let nonneg = m.cmpc(FloatCC::GreaterThanOrEqual, x, 0.0);
            let scaled = m.mul(y, x);
            m.sel(nonneg, x, scaled)
        }
        BinaryFn::Less => compare(m, FloatCC::LessThan),
        BinaryFn::LessOrEqual => compare(m, FloatCC::LessThanOrEqual),
        BinaryFn::Greater => compare(m, FloatCC::GreaterThan),
        BinaryFn::GreaterOrEqual => compare(m, FloatCC::GreaterThanOrEqual),
        BinaryFn::Equal => compare(m, FloatCC::Equal),
        // Rejected by check_binary.
        BinaryFn::And | BinaryFn::Or | BinaryFn::Xor => x,
    }
}

fn binary_int(b: &mut FunctionBuilder, f: BinaryFn, dtype: DType, x: Value, y: Value) -> Result<Value, CodegenError> {
    let ty = super::map::elem_type(dtype);
    Ok(match f {
        BinaryFn::Add => b.ins().iadd(x, y),
        BinaryFn::Sub => b.ins().isub(x, y),
        BinaryFn::Mul => b.ins().imul(x, y),
        BinaryFn::Div => {
            // sdiv traps on /0 and MIN/−1: divide by a safe divisor, then pick.
            let is_zero = b.ins().icmp_imm_s(IntCC::Equal, y, 0);
            let is_minus_one = b.ins().icmp_imm_s(IntCC::Equal, y, -1);
            let unsafe_divisor = b.ins().bor(is_zero, is_minus_one);
            let one = b.ins().iconst(ty, 1);
            let d = b.ins().select(unsafe_divisor, one, y);
            let q = b.ins().sdiv(x, d);
            let negated = b.ins().ineg(x);
            let q = b.ins().select(is_minus_one, negated, q);
            let zero = b.ins().iconst(ty, 0);
            b.ins().select(is_zero, zero, q)
        }
        BinaryFn::Pow => int_pow(b, ty, x, y),
        BinaryFn::Max => b.ins().smax(x, y),
        BinaryFn::Min => b.ins().smin(x, y),
        BinaryFn::PRelu => {
            let nonneg = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, x, 0);
            let scaled = b.ins().imul(y, x);
            b.ins().select(nonneg, x, scaled)
        }
        BinaryFn::Less => b.ins().icmp(IntCC::SignedLessThan, x, y),
        BinaryFn::LessOrEqual => b.ins().icmp(IntCC::SignedLessThanOrEqual, x, y),
        BinaryFn::Greater => b.ins().icmp(IntCC::SignedGreaterThan, x, y),
        BinaryFn::GreaterOrEqual => b.ins().icmp(IntCC::SignedGreaterThanOrEqual, x, y),
        BinaryFn::Equal => b.ins().icmp(IntCC::Equal, x, y),
        BinaryFn::And | BinaryFn::Or | BinaryFn::Xor => {
            return err(format!("binary {f:?} is not defined on {dtype}"));
        }
    })
}

/// Wrapping integer power by squaring (fully unrolled over the exponent's bits);
/// negative exponents truncate 1/xⁿ toward zero: 1 → 1, −1 → ±1, else 0.
fn int_pow(b: &mut FunctionBuilder, ty: cranelift_codegen::ir::Type, x: Value, e: Value) -> Value {
    let bits = ty.bits();
    let mut result = b.ins().iconst(ty, 1);
    let mut base = x;
    let mut rest = e;
    for _ in 0..bits - 1 {
        let bit = b.ins().band_imm_s(rest, 1);
        let times = b.ins().imul(result, base);
        result = b.ins().select(bit, times, result);
        base = b.ins().imul(base, base);
        rest = b.ins().ushr_imm_u(rest, 1);
    }
    // Negative exponent.
    let odd = b.ins().band_imm_s(e, 1);
    let one = b.ins().iconst(ty, 1);
    let minus_one = b.ins().iconst(ty, -1);
    let zero = b.ins().iconst(ty, 0);
    let sign = b.ins().select(odd, minus_one, one);
    let x_is_one = b.ins().icmp_imm_s(IntCC::Equal, x, 1);
    let x_is_minus_one = b.ins().icmp_imm_s(IntCC::Equal, x, -1);
    let neg = b.ins().select(x_is_minus_one, sign, zero);
    let neg = b.ins().select(x_is_one, one, neg);
    let e_neg = b.ins().icmp_imm_s(IntCC::SignedLessThan, e, 0);
    b.ins().select(e_neg, neg, result)
}
