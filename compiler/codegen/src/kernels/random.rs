//! `Op::RandomUniform`: the counter-based generator of `cnnc_ir::op::random_uniform`,
//! element by element in 64-bit integer arithmetic, so compiled code and interpreter
//! draw the same numbers.

use cnnc_ir::{DType, Op};
use cranelift_codegen::ir::types::{F32, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use super::compute::{F32_BYTES, counted_loop, require_buffers, require_dtype, scalar_flags};
use super::compute::misrouted;
use super::{CodegenError, KernelCtx};

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::RandomUniform { seed } = k.node.op else {
        return Err(misrouted(k, "random"));
    };
    require_buffers(k, 2, 2, 1)?;
    let step_ty = k.graph.ty(k.node.inputs[1]);
    let out_ty = k.graph.ty(k.node.outputs[0]);
    require_dtype(k, "step", step_ty, DType::F32)?;
    require_dtype(k, "output", out_ty, DType::F32)?;
    let n = out_ty.numel();
    let (step_ptr, out) = (k.inputs[1], k.outputs[0]);
    let b = &mut *k.b;
    let step = b.ins().load(F32, scalar_flags().with_readonly(), step_ptr, 0);
    // Saturating, NaN -> 0: Rust's `f32 as u64`, which the interpreter uses.
    let step = b.ins().fcvt_to_uint_sat(I64, step);
    let step_mixed = b.ins().imul_imm_s(step, 0x9E37_79B9_7F4A_7C15u64 as i64);
    let stream = b.ins().bxor_imm_s(step_mixed, seed as i64);
    counted_loop(b, n, vec![], |b, i, _| {
        let z = draw(b, stream, i);
        let at = b.ins().imul_imm_s(i, F32_BYTES);
        let at = b.ins().iadd(out, at);
        b.ins().store(scalar_flags(), z, at, 0);
        vec![]
    });
    Ok(())
}

/// random_uniform(seed, step, i) given `stream` = seed ^ step·φ.
fn draw(b: &mut FunctionBuilder, stream: Value, i: Value) -> Value {
    let index_mixed = b.ins().imul_imm_s(i, 0xD1B5_4A32_D192_ED03u64 as i64);
    let mut z = b.ins().bxor(stream, index_mixed);
    for (shift, multiplier) in [(30, 0xBF58_476D_1CE4_E5B9u64), (27, 0x94D0_49BB_1331_11EB)] {
        let s = b.ins().ushr_imm_u(z, shift);
        let x = b.ins().bxor(z, s);
        z = b.ins().imul_imm_s(x, multiplier as i64);
    }
    let s = b.ins().ushr_imm_u(z, 31);
    z = b.ins().bxor(z, s);
    let top = b.ins().ushr_imm_u(z, 40);
    let f = b.ins().fcvt_from_uint(F32, top);
    let scale = b.ins().f32const(1.0 / (1u64 << 24) as f32);
    b.ins().fmul(f, scale)
}
