//! Building blocks shared by the compute kernels (conv, conv_transpose, matmul, pool,
//! reduce): counted loops that thread values through block parameters, addressed
//! loads and stores, f32x4 helpers, and the per-axis window segmentation that lets
//! sliding-window kernels run without bounds checks.

pub mod window;

use cnnc_ir::{DType, Layout};
use cranelift_codegen::ir::{
    BlockArg, Endianness, Immediate, InstBuilder, MemFlagsData, Type, Value,
    condcodes::{FloatCC, IntCC},
    types::{F32, F32X4, I8X16, I32, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::{CodegenError, KernelCtx};

/// f32 lanes in one SIMD register (Cranelift x86-64 vectors are 128 bits).
pub const LANES: usize = 4;

/// Bytes per f32.
pub const F32_BYTES: i64 = 4;

/// Flags for scalar reads of activations: in bounds and naturally aligned.
pub fn scalar_flags() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// Flags for f32x4 accesses to activations. Never `aligned`: on x86 an aligned load
/// may be folded into an SSE memory operand, which faults on a 4-byte aligned address.
pub fn vector_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Adds the read-only, movable marks that let the optimiser hoist and merge weight
/// loads. Only for memory nothing writes during the whole call (see `input_flags`):
/// a movable load may be merged with an identical load anywhere in the function.
pub fn weight(flags: MemFlagsData) -> MemFlagsData {
    flags.with_readonly().with_can_move()
}

/// `base`, marked read-only and movable when node input `input` is immutable for the
/// whole call: a graph input or a constant. An activation (say MatMul's second
/// operand in attention) was written earlier in the same function, so its loads must
/// stay ordered after those stores.
pub fn input_flags(k: &KernelCtx, input: usize, base: MemFlagsData) -> MemFlagsData {
    let Some(&value) = k.node.inputs.get(input) else {
        return base;
    };
    let immutable = k.graph.inputs.contains(&value)
        || k.graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, cnnc_ir::Op::Constant(_)) && n.outputs.contains(&value));
    if immutable { weight(base) } else { base }
}

/// The error of an emitter handed a node of another op (a dispatch bug, not bad input).
pub fn misrouted(k: &KernelCtx, emitter: &str) -> CodegenError {
    CodegenError(format!("{emitter}::emit called on a {} node '{}'", k.node.op.mnemonic(), k.node.name))
}

/// The operands of a training op that maps a forward input and its output's gradient to
/// one f32 result (`pool_grad`, `conv_weight_grad`): plain layout, two inputs, one output,
/// all f32. Returns the (input, gradient, output) types.
pub fn f32_input_gradient_operands<'a>(
    k: &'a KernelCtx,
) -> Result<(&'a cnnc_ir::TensorType, &'a cnnc_ir::TensorType, &'a cnnc_ir::TensorType), CodegenError> {
    require_plain_layout(k)?;
    require_buffers(k, 2, 2, 1)?;
    let x = k.graph.ty(k.node.inputs[0]);
    let dy = k.graph.ty(k.node.inputs[1]);
    let out = k.graph.ty(k.node.outputs[0]);
    require_dtype(k, "input", x, DType::F32)?;
    require_dtype(k, "gradient", dy, DType::F32)?;
    require_dtype(k, "output", out, DType::F32)?;
    Ok((x, dy, out))
}

/// Fails unless the node runs on dense row-major buffers: blocked layouts are
/// chosen by passes this kernel does not implement.
pub fn require_plain_layout(k: &KernelCtx) -> Result<(), CodegenError> {
    let s = &k.node.schedule;
    if s.layout_in != Layout::Plain || s.layout_out != Layout::Plain {
        return Err(CodegenError(format!(
            "{} node '{}': blocked layouts are not supported by this kernel (in {:?}, out {:?})",
            k.node.op.mnemonic(),
            k.node.name,
            s.layout_in,
            s.layout_out
        )));
    }
    Ok(())
}

/// Checks the number of buffers the emitter receives against what the op needs.
pub fn require_buffers(
    k: &KernelCtx,
    min_inputs: usize,
    max_inputs: usize,
    outputs: usize,
) -> Result<(), CodegenError> {
    let (ni, no) = (k.inputs.len(), k.outputs.len());
    if ni < min_inputs
        || ni > max_inputs
        || no != outputs
        || k.node.inputs.len() != ni
        || k.node.outputs.len() != no
    {
        return Err(CodegenError(format!(
            "{} node '{}': expected {min_inputs}..={max_inputs} input and {outputs} output buffer(s), got {ni} and {no} \
             (node lists {} and {})",
            k.node.op.mnemonic(),
            k.node.name,
            k.node.inputs.len(),
            k.node.outputs.len()
        )));
    }
    Ok(())
}

/// Fails unless every listed value of the node has dtype `want`.
pub fn require_dtype(
    k: &KernelCtx,
    what: &str,
    ty: &cnnc_ir::TensorType,
    want: DType,
) -> Result<(), CodegenError> {
    if ty.dtype != want {
        return Err(CodegenError(format!(
            "{} node '{}': {what} has dtype {}, this kernel supports only {want}",
            k.node.op.mnemonic(),
            k.node.name,
            ty.dtype
        )));
    }
    Ok(())
}

/// Byte offset that must fit the 32-bit displacement of a load or store; larger
/// offsets are folded into the address instead.
fn split_offset(b: &mut FunctionBuilder, ptr: Value, byte_offset: i64) -> (Value, i32) {
    match i32::try_from(byte_offset) {
        Ok(off) => (ptr, off),
        Err(_) => (b.ins().iadd_imm_s(ptr, byte_offset), 0),
    }
}

/// Loads a `ty` at `ptr + byte_offset`.
pub fn load(
    b: &mut FunctionBuilder,
    ty: Type,
    flags: MemFlagsData,
    ptr: Value,
    byte_offset: i64,
) -> Value {
    let (p, off) = split_offset(b, ptr, byte_offset);
    b.ins().load(ty, flags, p, off)
}

/// Stores `value` at `ptr + byte_offset`.
pub fn store(
    b: &mut FunctionBuilder,
    flags: MemFlagsData,
    value: Value,
    ptr: Value,
    byte_offset: i64,
) {
    let (p, off) = split_offset(b, ptr, byte_offset);
    b.ins().store(flags, value, p, off);
}

/// `ptr + bytes`, emitting nothing for zero.
pub fn offset_ptr(b: &mut FunctionBuilder, ptr: Value, bytes: i64) -> Value {
    if bytes == 0 {
        ptr
    } else {
        b.ins().iadd_imm_s(ptr, bytes)
    }
}

/// `ptr + index * scale` for a runtime index (a loop counter).
pub fn index_ptr(b: &mut FunctionBuilder, ptr: Value, index: Value, scale: i64) -> Value {
    if scale == 0 {
        return ptr;
    }
    let scaled = b.ins().imul_imm_s(index, scale);
    b.ins().iadd(ptr, scaled)
}

/// Emits `for i in 0..n { carried = body(i, carried) }` for a compile-time `n` and
/// returns the carried values after the last iteration. The loop is bottom-tested
/// (one branch per iteration); `n == 1` emits the body inline and `n == 0` nothing.
/// `body` may emit nested loops and must return values of the same types it got.
pub fn counted_loop(
    b: &mut FunctionBuilder,
    n: usize,
    carried: Vec<Value>,
    mut body: impl FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    match n {
        0 => return carried,
        1 => {
            let zero = b.ins().iconst(I64, 0);
            return body(b, zero, &carried);
        }
        _ => {}
    }
    let types: Vec<Type> = carried.iter().map(|&v| b.func.dfg.value_type(v)).collect();
    let loop_block = b.create_block();
    let exit = b.create_block();
    let counter = b.append_block_param(loop_block, I64);
    let params: Vec<Value> = types
        .iter()
        .map(|&t| b.append_block_param(loop_block, t))
        .collect();
    let results: Vec<Value> = types
        .iter()
        .map(|&t| b.append_block_param(exit, t))
        .collect();

    let zero = b.ins().iconst(I64, 0);
    let mut entry_args: Vec<BlockArg> = vec![zero.into()];
    entry_args.extend(carried.iter().map(|&v| BlockArg::from(v)));
    b.ins().jump(loop_block, &entry_args);

    b.switch_to_block(loop_block);
    let next = body(b, counter, &params);
    debug_assert_eq!(
        next.len(),
        types.len(),
        "counted_loop body changed the carried arity"
    );
    let next_counter = b.ins().iadd_imm_s(counter, 1);
    let more = b
        .ins()
        .icmp_imm_s(IntCC::SignedLessThan, next_counter, n as i64);
    let mut back_args: Vec<BlockArg> = vec![next_counter.into()];
    back_args.extend(next.iter().map(|&v| BlockArg::from(v)));
    let exit_args: Vec<BlockArg> = next.iter().map(|&v| BlockArg::from(v)).collect();
    b.ins().brif(more, loop_block, &back_args, exit, &exit_args);
    b.seal_block(loop_block);

    b.switch_to_block(exit);
    b.seal_block(exit);
    results
}

/// A `counted_loop` over the `count / tile` whole tiles of `count` items; returns the
/// carried values and the number of leftover items (`count % tile`) for the caller's
/// narrower tiles.
pub fn tiled_loop(
    b: &mut FunctionBuilder,
    count: usize,
    tile: usize,
    carried: Vec<Value>,
    body: impl FnMut(&mut FunctionBuilder, Value, &[Value]) -> Vec<Value>,
) -> (Vec<Value>, usize) {
    let full = count / tile;
    (counted_loop(b, full, carried, body), count - full * tile)
}

/// `value` in every lane of an f32x4.
pub fn splat_f32(b: &mut FunctionBuilder, value: f32) -> Value {
    let s = b.ins().f32const(value);
    b.ins().splat(F32X4, s)
}

/// Loads 4 f32 at `ptr + byte_offset + e·stride·4` for e in 0..4. Unit stride is one
/// vector load; stride 2 two overlapping loads and a `shufps` (no element past the
/// last one needed is touched); other strides gather lane by lane.
pub fn load_f32x4_strided(
    b: &mut FunctionBuilder,
    flags: MemFlagsData,
    ptr: Value,
    byte_offset: i64,
    stride: usize,
) -> Value {
    match stride {
        1 => load(b, F32X4, flags, ptr, byte_offset),
        2 => {
            // Elements 0,2 from [0..4) and 4,6 from [3..7): lanes 0,2 of the first
            // load and 1,3 of the second, which x86 lowers to a single shufps.
            let lo = load(b, F32X4, flags, ptr, byte_offset);
            let hi = load(b, F32X4, flags, ptr, byte_offset + 3 * F32_BYTES);
            shuffle_f32x4(b, lo, hi, [0, 2, 5, 7])
        }
        _ => {
            let scalar_flags = scalar_flags_like(flags);
            let first = load(b, F32, scalar_flags, ptr, byte_offset);
            let mut v = b.ins().scalar_to_vector(F32X4, first);
            for e in 1..LANES {
                let x = load(
                    b,
                    F32,
                    scalar_flags,
                    ptr,
                    byte_offset + (e * stride) as i64 * F32_BYTES,
                );
                v = b.ins().insertlane(v, x, e as u8);
            }
            v
        }
    }
}

/// The scalar counterpart of vector flags (scalars are naturally aligned).
pub fn scalar_flags_like(flags: MemFlagsData) -> MemFlagsData {
    flags.with_aligned()
}

/// Selects f32 lanes from two vectors: indices 0..4 name `a`'s lanes, 4..8 `b`'s.
pub fn shuffle_f32x4(b: &mut FunctionBuilder, x: Value, y: Value, lanes: [u8; 4]) -> Value {
    let bytes: Vec<u8> = lanes
        .iter()
        .flat_map(|&l| (0..4).map(move |i| l * 4 + i))
        .collect();
    let mask: Immediate = b.func.dfg.immediates.push(bytes.into());
    let flags = MemFlagsData::new().with_endianness(Endianness::Little);
    let xb = b.ins().bitcast(I8X16, flags, x);
    let yb = b.ins().bitcast(I8X16, flags, y);
    let s = b.ins().shuffle(xb, yb, mask);
    b.ins().bitcast(F32X4, flags, s)
}

/// The 4x4 transpose of four f32x4 rows: result `t` holds lane `t` of each row, in row
/// order.
pub fn transpose4(b: &mut FunctionBuilder, rows: &[Value]) -> [Value; 4] {
    let low_ab = shuffle_f32x4(b, rows[0], rows[1], [0, 4, 1, 5]);
    let high_ab = shuffle_f32x4(b, rows[0], rows[1], [2, 6, 3, 7]);
    let low_cd = shuffle_f32x4(b, rows[2], rows[3], [0, 4, 1, 5]);
    let high_cd = shuffle_f32x4(b, rows[2], rows[3], [2, 6, 3, 7]);
    [
        shuffle_f32x4(b, low_ab, low_cd, [0, 1, 4, 5]),
        shuffle_f32x4(b, low_ab, low_cd, [2, 3, 6, 7]),
        shuffle_f32x4(b, high_ab, high_cd, [0, 1, 4, 5]),
        shuffle_f32x4(b, high_ab, high_cd, [2, 3, 6, 7]),
    ]
}

/// Stores the 4 lanes of an f32x4 at `ptr + byte_offset + e·stride·4`.
pub fn store_f32x4_strided(
    b: &mut FunctionBuilder,
    value: Value,
    ptr: Value,
    byte_offset: i64,
    stride: usize,
) {
    if stride == 1 {
        store(b, vector_flags(), value, ptr, byte_offset);
        return;
    }
    for e in 0..LANES {
        let x = b.ins().extractlane(value, e as u8);
        store(
            b,
            scalar_flags(),
            x,
            ptr,
            byte_offset + (e * stride) as i64 * F32_BYTES,
        );
    }
}

/// `a·b + acc`, as separate multiply and add: the kernels do not know whether the
/// target has FMA, and without it Cranelift would call a library routine per lane.
pub fn mul_add(b: &mut FunctionBuilder, acc: Value, x: Value, y: Value) -> Value {
    let p = b.ins().fmul(x, y);
    b.ins().fadd(acc, p)
}

/// max(x, y) as one x86 `maxps`/`maxss`; NaNs are not propagated reliably (see
/// `float_minmax_nan` for that).
pub fn float_max(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    pseudo_minmax(b, x, y, true)
}

/// min(a, b) as x86 `minps`/`minss`.
pub fn float_min(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    pseudo_minmax(b, x, y, false)
}

/// `y < x ? x : y` (max) or `x < y ? x : y` (min): the "pseudo" min/max that x86
/// implements in one instruction. A NaN in `x` yields `y` and a NaN in `y` yields `y`.
fn pseudo_minmax(b: &mut FunctionBuilder, x: Value, y: Value, is_max: bool) -> Value {
    let ty = b.func.dfg.value_type(x);
    let cmp = if is_max {
        b.ins().fcmp(FloatCC::LessThan, y, x)
    } else {
        b.ins().fcmp(FloatCC::LessThan, x, y)
    };
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), cmp);
        b.ins().bitselect(mask, x, y)
    } else {
        b.ins().select(cmp, x, y)
    }
}

/// NaN-propagating max/min of an accumulator and a new element: NaN when either is
/// NaN (the pseudo version already keeps a NaN accumulator; a NaN element is patched
/// in with one compare and blend).
pub fn float_minmax_nan(b: &mut FunctionBuilder, acc: Value, x: Value, is_max: bool) -> Value {
    let ty = b.func.dfg.value_type(x);
    let m = pseudo_minmax(b, x, acc, is_max);
    let x_nan = b.ins().fcmp(FloatCC::Unordered, x, x);
    if ty.is_vector() {
        let mask = b.ins().bitcast(ty, MemFlagsData::new(), x_nan);
        b.ins().bitselect(mask, x, m)
    } else {
        b.ins().select(x_nan, x, m)
    }
}

/// An i64 constant.
pub fn iconst(b: &mut FunctionBuilder, v: i64) -> Value {
    b.ins().iconst(I64, v)
}

/// An i32 constant.
pub fn iconst32(b: &mut FunctionBuilder, v: i32) -> Value {
    b.ins().iconst(I32, v as i64)
}
