//! The GEMM microkernel in Cranelift IR over f32x4, for targets without AVX2+FMA
//! (x86-64 up to v2, aarch64). Same contract as the machine-code kernels (see
//! [`super`]); only the tile differs.
//!
//! Tiles: x86-64 has 16 xmm registers, so 4x8 = 8 accumulators + 2 B vectors + the
//! broadcast A value + a product temporary stay in registers (6x8 would fit on
//! paper, but Cranelift hoists the six A loads and spills); aarch64 has 32 vector
//! registers, so 8x8 = 16 accumulators fit.

use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{BlockArg, InstBuilder, MemFlagsData, Signature, UserFuncName, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Module};
use target_lexicon::Architecture;

use crate::kernels::CodegenError;
use crate::target::TargetSpec;

const LANES: usize = 4;
/// k steps per loop trip. 1 measured best on x86-64: with 2, Cranelift schedules the
/// panel loads of both steps first and spills accumulators.
const K_UNROLL: usize = 1;

/// The register tile `(mr, nr)` for `target`.
pub fn tile(target: &TargetSpec) -> (usize, usize) {
    match target.triple.architecture {
        Architecture::Aarch64(_) => (8, 8),
        _ => (4, 8),
    }
}

/// Defines the kernel body for `func` (declared with `sig`). `fma` selects `fma`
/// over `fmul` + `fadd`; [`super::GemmKernelKind::for_target`] asks for it on aarch64
/// only: `fmla` accumulates in place there, while x86's `vfmadd213ps` ties the result
/// to a multiplicand, which costs two register copies per FMA in this loop.
pub fn define<M: Module>(
    module: &mut M,
    func: FuncId,
    sig: &Signature,
    target: &TargetSpec,
    fma: bool,
) -> Result<(), CodegenError> {
    let (mr, nr) = tile(target);
    let vectors_per_row = nr / LANES;
    let accumulators = mr * vectors_per_row;
    // A and B are packed by the caller and never written during the call; B is 32-byte
    // aligned, A 4-byte aligned, and A's elements are loaded one at a time.
    let panel = MemFlagsData::trusted().with_readonly();
    // C rows may start anywhere: no `aligned`, or x86 could fold the access into an
    // SSE memory operand that faults on unaligned addresses.
    let c_flags = MemFlagsData::new().with_notrap();

    let mut ctx = module.make_context();
    ctx.func.signature = sig.clone();
    ctx.func.name = UserFuncName::user(0, func.as_u32());
    let mut fb_ctx = FunctionBuilderContext::new();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb_ctx);
        let entry = b.create_block();
        let k_loop = b.create_block();
        let k_tail = b.create_block();
        let k_last = b.create_block();
        let after_loop = b.create_block();
        let add_old_c = b.create_block();
        let write_c = b.create_block();
        b.append_block_params_for_function_params(entry);
        for (block, pointers_and_counter) in [(k_loop, 3), (k_tail, 2), (k_last, 3)] {
            for _ in 0..pointers_and_counter {
                b.append_block_param(block, I64);
            }
        }
        for block in [k_loop, k_tail, k_last, after_loop, add_old_c, write_c] {
            for _ in 0..accumulators {
                b.append_block_param(block, F32X4);
            }
        }
        let args = |values: &[Value]| -> Vec<BlockArg> { values.iter().map(|&v| BlockArg::Value(v)).collect() };

        // acc += A[.., kk] * B[kk, ..] for kk at `step` rows past the panel pointers.
        let k_step = |b: &mut FunctionBuilder, a_ptr: Value, b_ptr: Value, step: usize, acc: &mut [Value]| {
            let b_row: Vec<Value> = (0..vectors_per_row)
                .map(|v| b.ins().load(F32X4, panel, b_ptr, ((step * nr + v * LANES) * 4) as i32))
                .collect();
            for row in 0..mr {
                let a_elem = b.ins().load(F32, panel, a_ptr, ((step * mr + row) * 4) as i32);
                let a_splat = b.ins().splat(F32X4, a_elem);
                for (v, &b_vec) in b_row.iter().enumerate() {
                    let slot = row * vectors_per_row + v;
                    acc[slot] = if fma {
                        b.ins().fma(a_splat, b_vec, acc[slot])
                    } else {
                        let product = b.ins().fmul(a_splat, b_vec);
                        b.ins().fadd(acc[slot], product)
                    };
                }
            }
        };

        // entry: zero the accumulators; K_UNROLL steps per trip of k_loop, then the
        // k % K_UNROLL leftover steps one by one in k_last.
        b.switch_to_block(entry);
        let &[k, a, b_panel, c, ldc, accumulate] = b.block_params(entry) else {
            return Err(CodegenError(
                "internal: GEMM kernel signature must have 6 parameters".into(),
            ));
        };
        let row_bytes = b.ins().ishl_imm_u(ldc, 2);
        let zero_scalar = b.ins().f32const(0.0);
        let zero = b.ins().splat(F32X4, zero_scalar);
        let zeros = vec![zero; accumulators];
        let trips = b.ins().ushr_imm_u(k, K_UNROLL.trailing_zeros() as i64);
        let leftover = b.ins().band_imm_u(k, (K_UNROLL - 1) as i64);
        let loop_args = args(&[&[a, b_panel, trips][..], &zeros].concat());
        let tail_args = args(&[&[a, b_panel][..], &zeros].concat());
        b.ins().brif(trips, k_loop, &loop_args, k_tail, &tail_args);

        b.switch_to_block(k_loop);
        let params = b.block_params(k_loop).to_vec();
        let (a_ptr, b_ptr, remaining) = (params[0], params[1], params[2]);
        let mut acc: Vec<Value> = params[3..].to_vec();
        for step in 0..K_UNROLL {
            k_step(&mut b, a_ptr, b_ptr, step, &mut acc);
        }
        let a_next = b.ins().iadd_imm_s(a_ptr, (K_UNROLL * mr * 4) as i64);
        let b_next = b.ins().iadd_imm_s(b_ptr, (K_UNROLL * nr * 4) as i64);
        let remaining_next = b.ins().iadd_imm_s(remaining, -1);
        let next_args = args(&[&[a_next, b_next, remaining_next][..], &acc].concat());
        let tail_args = args(&[&[a_next, b_next][..], &acc].concat());
        b.ins().brif(remaining_next, k_loop, &next_args, k_tail, &tail_args);

        b.switch_to_block(k_tail);
        let params = b.block_params(k_tail).to_vec();
        let last_args = args(&[&params[..2], &[leftover][..], &params[2..]].concat());
        b.ins()
            .brif(leftover, k_last, &last_args, after_loop, &args(&params[2..]));

        b.switch_to_block(k_last);
        let params = b.block_params(k_last).to_vec();
        let (a_ptr, b_ptr, remaining) = (params[0], params[1], params[2]);
        let mut acc: Vec<Value> = params[3..].to_vec();
        k_step(&mut b, a_ptr, b_ptr, 0, &mut acc);
        let a_next = b.ins().iadd_imm_s(a_ptr, (mr * 4) as i64);
        let b_next = b.ins().iadd_imm_s(b_ptr, (nr * 4) as i64);
        let remaining_next = b.ins().iadd_imm_s(remaining, -1);
        let next_args = args(&[&[a_next, b_next, remaining_next][..], &acc].concat());
        b.ins()
            .brif(remaining_next, k_last, &next_args, after_loop, &args(&acc));

        let row_addresses = |b: &mut FunctionBuilder| -> Vec<Value> {
            let mut rows = vec![c];
            for _ in 1..mr {
                let previous = rows[rows.len() - 1];
                rows.push(b.ins().iadd(previous, row_bytes));
            }
            rows
        };

        b.switch_to_block(after_loop);
        let sums = args(b.block_params(after_loop));
        b.ins().brif(accumulate, add_old_c, &sums, write_c, &sums);

        b.switch_to_block(add_old_c);
        let mut totals = b.block_params(add_old_c).to_vec();
        let rows = row_addresses(&mut b);
        for (row, &row_ptr) in rows.iter().enumerate() {
            for v in 0..vectors_per_row {
                let old = b.ins().load(F32X4, c_flags, row_ptr, (v * LANES * 4) as i32);
                let slot = row * vectors_per_row + v;
                totals[slot] = b.ins().fadd(totals[slot], old);
            }
        }
        b.ins().jump(write_c, &args(&totals));

        b.switch_to_block(write_c);
        let results = b.block_params(write_c).to_vec();
        let rows = row_addresses(&mut b);
        for (row, &row_ptr) in rows.iter().enumerate() {
            for v in 0..vectors_per_row {
                b.ins().store(
                    c_flags,
                    results[row * vectors_per_row + v],
                    row_ptr,
                    (v * LANES * 4) as i32,
                );
            }
        }
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    // CNNC_DISASM=1 prints the machine code, as for every other kernel.
    let disasm = std::env::var_os("CNNC_DISASM").is_some();
    ctx.set_disasm(disasm);
    let result = module.define_function(func, &mut ctx);
    if disasm && let Some(code) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
        eprintln!("; portable GEMM kernel {mr}x{nr} for {}\n{code}", target.triple);
    }
    result.map_err(|e| {
        CodegenError(format!(
            "defining the portable GEMM kernel for {}: {e:?}",
            target.triple
        ))
    })
}
