//! Splitting a kernel over the host's threads, and the per-thread floating-point state.
//!
//! A parallel kernel is two functions: the node's kernel `fn(host, buffers)` and a task
//! `fn(ctx, index)` with the C calling convention (`abi::TaskFn`). The kernel fills a
//! small context on its stack, then either lends the task to
//! `host->parallel_for(host->user, n, task, ctx)` or, without a host or with one
//! thread, calls it for every index itself.
//!
//! Tasks may run concurrently in any order, so none may write memory another reads.
//! Packing buffers come from *slots* in the node's scratch memory: a task claims a free
//! slot with an atomic compare-and-swap on the slot's flag and frees it at the end.
//! At most one task per thread runs at a time, so with no more threads than slots a
//! claim never waits; with more, a task spins until another finishes. Everything lives
//! in the caller's workspace: no global state, no allocation.
//!
//! Denormals: convolutions over tiny activations can fill the FMA pipes with denormal
//! operands, which cost ~100x on many x86 cores. GEMM tasks therefore run with MXCSR's
//! flush-to-zero and denormals-are-zero bits set and restore the MXCSR they found on
//! exit (each pool thread has its own). A convolution's result moves by less than the
//! smallest normal float, inside the tolerance. The whole call (`cnnc_infer`) is left
//! alone on purpose: the element functions promise exact results for denormals (exp
//! down to the last denormal unit, sqrt of a negative denormal is NaN, a denormal cast
//! to bool is true), which either bit would break. Cranelift has no MXCSR
//! instructions, so the helpers are a few bytes of machine code.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{AbiParam, BlockArg, FuncRef, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Value};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::FunctionBuilder;
use cranelift_module::{FuncId, Linkage, Module};
use iced_x86::code_asm::*;
use target_lexicon::Architecture;

use super::CodegenError;
use crate::target::TargetSpec;

/// Packing slots per parallel node: the most threads that run its tasks without waiting.
pub const MAX_SLOTS: usize = 16;

/// Bytes of slot flags at the start of a parallel node's scratch (one i32 per slot,
/// padded so the slots themselves stay 64-byte aligned).
pub const SLOT_FLAGS_BYTES: usize = 64;

// Field offsets of `abi::Host` (checked against the Rust declaration in the tests).
const HOST_USER: i32 = 0;
const HOST_PARALLEL_FOR: i32 = 8;
const HOST_NUM_THREADS: i32 = 16;

/// The signature of a task, `void task(void* ctx, uint64_t index)`.
pub fn task_signature<M: Module>(module: &M) -> Signature {
    let mut sig = Signature::new(module.isa().default_call_conv());
    sig.params.push(AbiParam::new(I64));
    sig.params.push(AbiParam::new(I64));
    sig
}

fn parallel_for_signature(call_conv: CallConv) -> Signature {
    let mut sig = Signature::new(call_conv);
    for _ in 0..4 {
        sig.params.push(AbiParam::new(I64));
    }
    sig
}

/// The number of threads `host` spreads a loop over: 1 when `host` or its
/// `parallel_for` is null.
pub fn emit_host_threads(b: &mut FunctionBuilder, host: Value) -> Value {
    let has_host = b.create_block();
    let done = b.create_block();
    let threads = b.append_block_param(done, I64);
    let one = b.ins().iconst(I64, 1);
    b.ins().brif(host, has_host, &[], done, &[one.into()]);

    b.switch_to_block(has_host);
    b.seal_block(has_host);
    let flags = MemFlagsData::trusted().with_readonly();
    let parallel_for = b.ins().load(I64, flags, host, HOST_PARALLEL_FOR);
    let count = b.ins().load(I32, flags, host, HOST_NUM_THREADS);
    let count = b.ins().uextend(I64, count);
    let count = b.ins().umax(count, one);
    let threads_if_lent = b.ins().select(parallel_for, count, one);
    b.ins().jump(done, &[threads_if_lent.into()]);

    b.switch_to_block(done);
    b.seal_block(done);
    threads
}

/// Where the context of [`emit_dispatch_up_to`] holds the kernel's buffer array and the
/// number of tasks (which each task needs to find its share of the work).
pub const TASK_CTX_BUFFERS: i32 = 0;
pub const TASK_CTX_TASKS: i32 = 8;

/// Runs `task(ctx, i)` for `i in 0..n` with n = min(host threads, `max_tasks`), where
/// `ctx` holds `bufs` and n at [`TASK_CTX_BUFFERS`] and [`TASK_CTX_TASKS`].
pub fn emit_dispatch_up_to<M: Module>(
    module: &mut M,
    b: &mut FunctionBuilder,
    host: Value,
    bufs: Value,
    task: FuncId,
    max_tasks: usize,
) {
    let task_ref = module.declare_func_in_func(task, b.func);
    let call_conv = module.isa().default_call_conv();
    let threads = emit_host_threads(b, host);
    let limit = b.ins().iconst(I64, max_tasks as i64);
    let n_tasks = b.ins().umin(threads, limit);
    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 16, 3));
    b.ins().stack_store(I64, bufs, slot, TASK_CTX_BUFFERS);
    b.ins().stack_store(I64, n_tasks, slot, TASK_CTX_TASKS);
    let task_ctx = b.ins().stack_addr(I64, slot, 0);
    emit_dispatch(b, host, threads, n_tasks, task_ref, task_ctx, call_conv);
}

/// What a task of [`emit_dispatch_up_to`] reads from its context: the kernel's buffer
/// array and its share `[first, end)` of `units` work items, `[index·units / n,
/// (index+1)·units / n)` for n tasks (shares differ by at most one item).
pub struct TaskShare {
    pub bufs: Value,
    pub first: Value,
    pub end: Value,
}

pub fn emit_task_share(b: &mut FunctionBuilder, task_ctx: Value, index: Value, units: usize) -> TaskShare {
    let flags = MemFlagsData::trusted().with_readonly().with_can_move();
    let bufs = b.ins().load(I64, flags, task_ctx, TASK_CTX_BUFFERS);
    let n_tasks = b.ins().load(I64, flags, task_ctx, TASK_CTX_TASKS);
    let first = b.ins().imul_imm_s(index, units as i64);
    let first = b.ins().udiv(first, n_tasks);
    let next = b.ins().iadd_imm_s(index, 1);
    let end = b.ins().imul_imm_s(next, units as i64);
    let end = b.ins().udiv(end, n_tasks);
    TaskShare { bufs, first, end }
}

/// Runs `task(ctx, i)` for `i in 0..n_tasks` (a compile-time count) where `ctx` points
/// at the kernel's buffer array `bufs`: the dispatch of tasks that need nothing else.
pub fn emit_dispatch_over_buffers<M: Module>(
    module: &mut M,
    b: &mut FunctionBuilder,
    host: Value,
    bufs: Value,
    task: FuncId,
    n_tasks: usize,
) {
    let task_ref = module.declare_func_in_func(task, b.func);
    let call_conv = module.isa().default_call_conv();
    let threads = emit_host_threads(b, host);
    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 8, 3));
    b.ins().stack_store(I64, bufs, slot, 0);
    let task_ctx = b.ins().stack_addr(I64, slot, 0);
    let n_tasks = b.ins().iconst(I64, n_tasks as i64);
    emit_dispatch(b, host, threads, n_tasks, task_ref, task_ctx, call_conv);
}

/// Runs `task(ctx, i)` for `i in 0..n_tasks`: through `host->parallel_for` when
/// `threads > 1` (see [`emit_host_threads`]) and there is more than one task,
/// otherwise on the calling thread.
pub fn emit_dispatch(
    b: &mut FunctionBuilder,
    host: Value,
    threads: Value,
    n_tasks: Value,
    task: FuncRef,
    ctx: Value,
    call_conv: CallConv,
) {
    let parallel = b.create_block();
    let serial = b.create_block();
    let done = b.create_block();
    let many_threads = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, threads, 1);
    let many_tasks = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, n_tasks, 1);
    let go_parallel = b.ins().band(many_threads, many_tasks);
    b.ins().brif(go_parallel, parallel, &[], serial, &[]);

    b.switch_to_block(parallel);
    b.seal_block(parallel);
    let flags = MemFlagsData::trusted().with_readonly();
    let user = b.ins().load(I64, flags, host, HOST_USER);
    let parallel_for = b.ins().load(I64, flags, host, HOST_PARALLEL_FOR);
    let task_addr = b.ins().func_addr(I64, task);
    let sig = b.import_signature(parallel_for_signature(call_conv));
    b.ins()
        .call_indirect(sig, parallel_for, &[user, n_tasks, task_addr, ctx]);
    b.ins().jump(done, &[]);

    b.switch_to_block(serial);
    b.seal_block(serial);
    let zero = b.ins().iconst(I64, 0);
    crate::loops::for_range(b, zero, n_tasks, |b, i| {
        b.ins().call(task, &[ctx, i]);
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(done);
    b.seal_block(done);
}

/// Thread counts [`emit_by_threads`] tables cover; more threads use the last entry.
pub const SPLIT_TABLE_THREADS: usize = 16;

/// Work (in multiply-adds) every task pays besides its share: the call through the
/// pool and the claim of a slot, ~1 µs.
const TASK_FIXED_MACS: usize = 1 << 14;

/// Into how many parts to split each of `outer` equal tasks for `threads` threads, when
/// a task's `work` divides between its parts but every part repeats `repeated` (work
/// in multiply-adds; parts at most `max_parts`).
///
/// Tasks are claimed one at a time, so the estimated time is the rounds of tasks each
/// thread runs times a task's length, plus a quarter task of tail: threads do not run
/// in lockstep (other processes, frequency, cache misses), and the last tasks to finish
/// leave the others idle. Repacking the same input for every part (`repeated`) is what
/// stops the split: with packing a third of a task, splitting one task into eight parts
/// for two threads would do the packing eight times.
pub fn choose_parts(outer: usize, threads: usize, work: usize, repeated: usize, max_parts: usize) -> usize {
    let (outer, threads) = (outer.max(1), threads.max(1));
    if threads == 1 {
        return 1;
    }
    let estimate = |parts: usize| -> f64 {
        let task = work as f64 / parts as f64 + (repeated + TASK_FIXED_MACS) as f64;
        let rounds = (outer * parts).div_ceil(threads) as f64;
        rounds * task + task / 4.0
    };
    let mut best = 1;
    for parts in 2..=max_parts.max(1) {
        if estimate(parts) < estimate(best) {
            best = parts;
        }
    }
    best
}

/// `table[threads - 1]` for the run-time `threads` (at least 1); the last entry past the
/// table's end. `table` must not be empty.
pub fn emit_by_threads(b: &mut FunctionBuilder, threads: Value, table: &[usize]) -> Value {
    let last = table.len().max(1) - 1;
    let mut value = b.ins().iconst(I64, table.get(last).copied().unwrap_or(1) as i64);
    for (i, &entry) in table.iter().enumerate().take(last).rev() {
        if entry == table[last] {
            continue;
        }
        let is_count = b.ins().icmp_imm_u(IntCC::Equal, threads, (i + 1) as i64);
        let entry = b.ins().iconst(I64, entry as i64);
        value = b.ins().select(is_count, entry, value);
    }
    value
}

/// Marks all `slots` free (the kernel does this before its tasks start).
pub fn emit_reset_slots(b: &mut FunctionBuilder, flags_base: Value, slots: usize) {
    let zero = b.ins().iconst(I64, 0);
    for pair in 0..slots.div_ceil(2) {
        b.ins()
            .store(MemFlagsData::trusted(), zero, flags_base, (pair * 8) as i32);
    }
}

/// Claims a free slot among `slots` (flags at `flags_base`) and returns its index.
pub fn emit_claim_slot(b: &mut FunctionBuilder, flags_base: Value, slots: usize) -> Value {
    let try_slot = b.create_block();
    let next = b.create_block();
    let claimed = b.create_block();
    let slot = b.append_block_param(try_slot, I64);
    let won = b.append_block_param(claimed, I64);
    let zero = b.ins().iconst(I64, 0);
    b.ins().jump(try_slot, &[zero.into()]);

    b.switch_to_block(try_slot);
    let flag = b.ins().imul_imm_s(slot, 4);
    let flag = b.ins().iadd(flags_base, flag);
    let free = b.ins().iconst(I32, 0);
    let busy = b.ins().iconst(I32, 1);
    let old = b.ins().atomic_cas(MemFlagsData::trusted(), flag, free, busy);
    let was_free = b.ins().icmp_imm_s(IntCC::Equal, old, 0);
    b.ins().brif(was_free, claimed, &[BlockArg::from(slot)], next, &[]);

    b.switch_to_block(next);
    b.seal_block(next);
    let following = b.ins().iadd_imm_s(slot, 1);
    let wrap = b
        .ins()
        .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, following, slots as i64);
    let following = b.ins().select(wrap, zero, following);
    b.ins().jump(try_slot, &[following.into()]);
    b.seal_block(try_slot);

    b.switch_to_block(claimed);
    b.seal_block(claimed);
    won
}

/// Frees a slot claimed by [`emit_claim_slot`].
pub fn emit_release_slot(b: &mut FunctionBuilder, flags_base: Value, slot: Value) {
    let flag = b.ins().imul_imm_s(slot, 4);
    let flag = b.ins().iadd(flags_base, flag);
    let free = b.ins().iconst(I32, 0);
    b.ins().atomic_store(MemFlagsData::trusted(), free, flag);
}

/// The MXCSR helpers of one module (x86-64 only, SystemV): `enter() -> old` sets
/// flush-to-zero and denormals-are-zero and returns the previous MXCSR;
/// `restore(old)` puts it back.
#[derive(Clone, Copy, Debug)]
pub struct FloatEnv {
    pub enter: FuncId,
    pub restore: FuncId,
}

/// MXCSR bits: flush-to-zero (15) and denormals-are-zero (6).
const MXCSR_FTZ_DAZ: u32 = 0x8040;

impl FloatEnv {
    /// Defines the helpers in `module`; `None` on targets other than x86-64 (AArch64's
    /// FPCR has the same switch; left for when an aarch64 kernel needs it).
    pub fn define<M: Module>(module: &mut M, target: &TargetSpec) -> Result<Option<FloatEnv>, CodegenError> {
        if target.triple.architecture != Architecture::X86_64 {
            return Ok(None);
        }
        let asm_err = |e: IcedError| CodegenError(format!("assembling the MXCSR helpers: {e}"));
        let enter_code = assemble_enter(MXCSR_FTZ_DAZ).map_err(asm_err)?;
        let restore_code = assemble_restore().map_err(asm_err)?;
        let mut enter_sig = Signature::new(CallConv::SystemV);
        enter_sig.returns.push(AbiParam::new(I32));
        let mut restore_sig = Signature::new(CallConv::SystemV);
        restore_sig.params.push(AbiParam::new(I32));
        let mut define = |name: &str, sig: &Signature, code: &[u8]| -> Result<FuncId, CodegenError> {
            let id = module
                .declare_function(name, Linkage::Local, sig)
                .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
            module
                .define_function_bytes(id, 16, code, &[])
                .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
            Ok(id)
        };
        Ok(Some(FloatEnv {
            enter: define("cnnc_mxcsr_enter", &enter_sig, &enter_code)?,
            restore: define("cnnc_mxcsr_restore", &restore_sig, &restore_code)?,
        }))
    }

    /// Calls `enter` in the function being built; returns the saved MXCSR.
    pub fn emit_enter<M: Module>(&self, module: &mut M, b: &mut FunctionBuilder) -> Value {
        let f = module.declare_func_in_func(self.enter, b.func);
        let call = b.ins().call(f, &[]);
        b.inst_results(call)[0]
    }

    /// Calls `restore(saved)`.
    pub fn emit_restore<M: Module>(&self, module: &mut M, b: &mut FunctionBuilder, saved: Value) {
        let f = module.declare_func_in_func(self.restore, b.func);
        b.ins().call(f, &[saved]);
    }
}

/// `enter`: returns the old MXCSR in eax after or-ing `bits` into it. The helpers go
/// through a stack dword: `stmxcsr`/`ldmxcsr` take only memory operands.
fn assemble_enter(bits: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.sub(rsp, 8)?;
    a.stmxcsr(dword_ptr(rsp))?;
    a.mov(eax, dword_ptr(rsp))?;
    a.mov(ecx, eax)?;
    a.or(ecx, bits as i32)?;
    a.mov(dword_ptr(rsp), ecx)?;
    a.ldmxcsr(dword_ptr(rsp))?;
    a.add(rsp, 8)?;
    a.ret()?;
    a.assemble(0)
}

/// `restore(edi)`: loads MXCSR from the argument.
fn assemble_restore() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.sub(rsp, 8)?;
    a.mov(dword_ptr(rsp), edi)?;
    a.ldmxcsr(dword_ptr(rsp))?;
    a.add(rsp, 8)?;
    a.ret()?;
    a.assemble(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_runtime::abi;
    use std::mem::offset_of;

    #[test]
    fn host_layout_matches_the_abi() {
        assert_eq!(offset_of!(abi::Host, user), HOST_USER as usize);
        assert_eq!(offset_of!(abi::Host, parallel_for), HOST_PARALLEL_FOR as usize);
        assert_eq!(offset_of!(abi::Host, num_threads), HOST_NUM_THREADS as usize);
    }

    #[test]
    fn mxcsr_helpers_assemble() {
        let enter = assemble_enter(MXCSR_FTZ_DAZ).unwrap();
        let restore = assemble_restore().unwrap();
        assert_eq!(enter.last(), Some(&0xc3), "ends with ret");
        assert_eq!(restore.last(), Some(&0xc3));
    }

    #[test]
    fn one_thread_never_splits() {
        assert_eq!(choose_parts(1, 1, 1 << 30, 0, 64), 1);
    }

    #[test]
    fn cheap_repeats_split_finely_and_costly_ones_just_enough() {
        // One outer task, two threads: cheap repeated work leaves room for balance...
        let cheap = choose_parts(1, 2, 100 << 20, 0, 64);
        assert!(cheap >= 4, "{cheap}");
        // ...packing a third of the task again per part stops at one part per thread.
        assert_eq!(choose_parts(1, 2, 100 << 20, 40 << 20, 64), 2);
        // Enough outer tasks already: no split.
        assert_eq!(choose_parts(16, 2, 100 << 20, 40 << 20, 64), 1);
        // Never past the limit.
        assert_eq!(choose_parts(1, 8, 100 << 20, 0, 3), 3);
    }

    /// One i32 flag per slot fits the flag area.
    const _: () = assert!(SLOT_FLAGS_BYTES >= MAX_SLOTS * 4);
}
