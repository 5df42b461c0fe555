//! Pooling over blocked activations (NCHWc8, [N, C/8, H, W, 8]).
//!
//! Global average (and sum) pooling: `Op::Reduce` Mean/Sum over the spatial axes
//! [2, 3] of a rank-4 f32 value with schedule layout Blocked{8}. The result
//! [N, C, 1, 1] has the same bytes in both layouts (layout-free), so it is written as
//! [N][C/8][8]: each channel block's plane is summed position by position, 8 channels
//! at a time (two f32x4 halves, two positions per trip in independent accumulators),
//! then scaled once.
//!
//! Windowed pooling: `Op::Pool` Max or Avg over 2-D windows (any kernel, stride,
//! dilation, padding) of a blocked value, output blocked too. Output rows and columns
//! are cut into segments with fixed ranges of taps inside the input
//! (`AxisWindow::segments`), so each output position is its taps unrolled, 8 channels
//! per tap, with no bounds tests and a compile-time divisor. Max propagates NaN and an
//! all-padding window is -inf; Avg divides by the divisor of `PoolKind::Avg` (NaN
//! when it is 0), as the interpreter does.
//!
//! Portable Cranelift code (f32x4 pairs): no target requirement. On x86-64 with AVX2 a
//! max pool without an epilogue runs machine code instead ([`define_max_pool`], reached
//! through `conv_blocked::plan`): the same segments, one ymm per tap.

use cnnc_ir::{DType, EpilogueStep, Graph, Layout, Node, Op, PoolAttrs, PoolKind, ReduceKind};
use cranelift_codegen::ir::types::F32X4;
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::{AxisWindow, Segment};
use super::compute::{counted_loop, float_max, float_minmax_nan, load, splat_f32, store, vector_flags, weight};
use super::{CodegenError, KernelCtx};

/// Channels per block.
pub const BLOCK: usize = 8;

/// Whether `node` (given a Blocked{8} schedule) runs on [`emit_global_reduce`]: a
/// Mean or Sum over axes [2, 3] of a rank-4 f32 value whose channels are a multiple of
/// 8. Ignores the node's current schedule.
pub fn supports_global_reduce(g: &Graph, node: &Node) -> bool {
    global_reduce_shape(g, node).is_ok()
}

/// (images, channel blocks, positions per plane, mean).
fn global_reduce_shape(g: &Graph, node: &Node) -> Result<(usize, usize, usize, bool), String> {
    let Op::Reduce { kind, axes } = &node.op else {
        return Err("not a reduction".into());
    };
    let mean = match kind {
        ReduceKind::Mean => true,
        ReduceKind::Sum => false,
        other => return Err(format!("{other:?} has no blocked kernel (Mean and Sum do)")),
    };
    if axes != &[2, 3] || node.inputs.len() != 1 || node.outputs.len() != 1 {
        return Err(format!("axes {axes:?}: only the spatial axes [2, 3] of one input"));
    }
    let x = g.ty(node.inputs[0]);
    let y = g.ty(node.outputs[0]);
    if x.dtype != DType::F32 || x.shape.len() != 4 || y.dtype != DType::F32 {
        return Err(format!("input {x}: only rank-4 f32"));
    }
    let (n, c, hw) = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]);
    if y.shape != [n, c, 1, 1] {
        return Err(format!("output {y} is not [{n}, {c}, 1, 1]"));
    }
    if !c.is_multiple_of(BLOCK) || hw == 0 {
        return Err(format!("{c} channels (a multiple of {BLOCK}) over {hw} positions (at least 1)"));
    }
    Ok((n, c / BLOCK, hw, mean))
}

/// The spatial Mean/Sum of a blocked value (see the module docs).
pub fn emit_global_reduce(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let blocked = Layout::Blocked { block: BLOCK as u32 };
    if k.node.schedule.layout_in != blocked {
        return Err(CodegenError(format!(
            "reduce node '{}': layout {:?}; the blocked reduction reads Blocked{{8}}",
            k.node.name, k.node.schedule.layout_in
        )));
    }
    let (images, blocks, positions, mean) = global_reduce_shape(k.graph, k.node)
        .map_err(|why| CodegenError(format!("blocked reduce node '{}': {why}", k.node.name)))?;
    if k.inputs.len() != 1 || k.outputs.len() != 1 {
        return Err(CodegenError(format!("reduce node '{}': expects one input and one output", k.node.name)));
    }
    let (x, y) = (k.inputs[0], k.outputs[0]);
    let b = &mut *k.b;
    let vector_bytes = (BLOCK * 4) as i64;
    let flags = weight(vector_flags());
    let scale = if mean { 1.0 / positions as f32 } else { 1.0 };
    counted_loop(b, images * blocks, vec![x, y], |b, _, c| {
        let (plane, out) = (c[0], c[1]);
        let zero = splat_f32(b, 0.0);
        // Accumulators: (low, high) halves of two positions.
        let pairs = positions / 2;
        let mut acc = counted_loop(b, pairs, vec![plane, zero, zero, zero, zero], |b, _, a| {
            let at = a[0];
            let mut next = vec![b.ins().iadd_imm_s(at, 2 * vector_bytes)];
            for (j, &sum) in a[1..].iter().enumerate() {
                let v = load(b, F32X4, flags, at, 16 * j as i64);
                next.push(b.ins().fadd(sum, v));
            }
            next
        });
        if positions % 2 == 1 {
            for j in 0..2 {
                let v = load(b, F32X4, flags, acc[0], 16 * j as i64);
                acc[1 + j] = b.ins().fadd(acc[1 + j], v);
            }
        }
        let low = b.ins().fadd(acc[1], acc[3]);
        let high = b.ins().fadd(acc[2], acc[4]);
        let (low, high) = if mean {
            let s = splat_f32(b, scale);
            (b.ins().fmul(low, s), b.ins().fmul(high, s))
        } else {
            (low, high)
        };
        store(b, vector_flags(), low, out, 0);
        store(b, vector_flags(), high, out, 16);
        let plane_bytes = positions as i64 * vector_bytes;
        vec![b.ins().iadd_imm_s(plane, plane_bytes), b.ins().iadd_imm_s(out, vector_bytes)]
    });
    Ok(())
}

/// Pools with more taps are left to the plain layout (every tap is unrolled).
pub const MAX_POOL_TAPS: usize = 64;

/// Whether `node` (given a Blocked{8} schedule) runs on [`emit_pool`]: a 2-D Max or
/// Avg pool of a rank-4 f32 value whose channels are a multiple of 8, up to
/// `MAX_POOL_TAPS` taps. Ignores the node's current schedule.
pub fn supports_pool(g: &Graph, node: &Node) -> bool {
    // The epilogue runs over the output as flat memory afterwards (`emit_node`):
    // operands must have the output's shape (and so its layout).
    let flat = node.epilogue.iter().all(|s| match s {
        EpilogueStep::Unary(_) => true,
        EpilogueStep::Binary { operand, .. } => node
            .inputs
            .get(*operand)
            .is_some_and(|&v| node.outputs.first().is_some_and(|&y| g.ty(v).shape == g.ty(y).shape)),
    });
    flat && pool_geometry(g, node).is_ok()
}

/// (attrs, images x channel blocks, rows, cols).
fn pool_geometry<'n>(g: &Graph, node: &'n Node) -> Result<(&'n PoolAttrs, usize, AxisWindow, AxisWindow), String> {
    let Op::Pool(attrs) = &node.op else {
        return Err("not a pool".into());
    };
    if node.inputs.is_empty() || node.outputs.len() != 1 {
        return Err("needs an input and one output".into());
    }
    let x = g.ty(node.inputs[0]);
    let y = g.ty(node.outputs[0]);
    if x.dtype != DType::F32 || y.dtype != DType::F32 || x.shape.len() != 4 || y.shape.len() != 4 {
        return Err(format!("input {x}, output {y}: only rank-4 f32"));
    }
    if x.shape[..2] != y.shape[..2] || !x.shape[1].is_multiple_of(BLOCK) {
        return Err(format!("input {x}, output {y}: channels must match and be a multiple of {BLOCK}"));
    }
    let axes = AxisWindow::pool_axes(attrs, &x.shape, &y.shape);
    if axes.len() != 2 || [&attrs.kernel, &attrs.strides, &attrs.dilations, &attrs.pads_begin, &attrs.pads_end]
        .iter()
        .any(|v| v.len() != 2)
    {
        return Err("only 2-D windows".into());
    }
    if axes.iter().any(|a| a.kernel == 0 || a.stride == 0 || a.dilation == 0) {
        return Err("zero kernel, stride or dilation".into());
    }
    if axes[0].kernel * axes[1].kernel > MAX_POOL_TAPS {
        return Err(format!("{} taps (at most {MAX_POOL_TAPS})", axes[0].kernel * axes[1].kernel));
    }
    if y.numel() == 0 {
        return Err("empty output".into());
    }
    Ok((attrs, x.shape[0] * x.shape[1] / BLOCK, axes[0], axes[1]))
}

/// The pool of a blocked value (see the module docs).
pub fn emit_pool(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let blocked = Layout::Blocked { block: BLOCK as u32 };
    let s = &k.node.schedule;
    if s.layout_in != blocked || s.layout_out != blocked {
        return Err(CodegenError(format!(
            "pool node '{}': layouts {:?} -> {:?}; the blocked pool runs Blocked{{8}} -> Blocked{{8}}",
            k.node.name, s.layout_in, s.layout_out
        )));
    }
    let (attrs, planes, rows, cols) = pool_geometry(k.graph, k.node)
        .map_err(|why| CodegenError(format!("blocked pool node '{}': {why}", k.node.name)))?;
    if k.inputs.len() != 1 || k.outputs.len() != 1 {
        return Err(CodegenError(format!("pool node '{}': expects one input and one output", k.node.name)));
    }
    let kind = attrs.kind;
    let (x, y) = (k.inputs[0], k.outputs[0]);
    let b = &mut *k.b;
    let vector = (BLOCK * 4) as i64;
    let in_row = cols.input as i64 * vector;
    let out_row = cols.output as i64 * vector;
    let in_plane = rows.input as i64 * in_row;
    let out_plane = rows.output as i64 * out_row;
    let (row_segments, col_segments) = (rows.segments(), cols.segments());
    counted_loop(b, planes, vec![x, y], |b, _, p| {
        let (plane_in, plane_out) = (p[0], p[1]);
        for rs in &row_segments {
            // Window origins may lie in the padding (never read there).
            let x_row = b.ins().iadd_imm_s(plane_in, rows.origin(rs.start) * in_row);
            let y_row = b.ins().iadd_imm_s(plane_out, rs.start as i64 * out_row);
            counted_loop(b, rs.count, vec![x_row, y_row], |b, _, r| {
                let (x_row, y_row) = (r[0], r[1]);
                for cs in &col_segments {
                    let x_at = b.ins().iadd_imm_s(x_row, cols.origin(cs.start) * vector);
                    let y_at = b.ins().iadd_imm_s(y_row, cs.start as i64 * vector);
                    counted_loop(b, cs.count, vec![x_at, y_at], |b, _, c| {
                        let (x_at, y_at) = (c[0], c[1]);
                        for half in 0..2 {
                            let v = window_value(b, kind, x_at, half * 16, rs, cs, &rows, &cols, in_row);
                            store(b, vector_flags(), v, y_at, half * 16);
                        }
                        vec![
                            b.ins().iadd_imm_s(x_at, cols.stride as i64 * vector),
                            b.ins().iadd_imm_s(y_at, vector),
                        ]
                    });
                }
                vec![
                    b.ins().iadd_imm_s(x_row, rows.stride as i64 * in_row),
                    b.ins().iadd_imm_s(y_row, out_row),
                ]
            });
        }
        vec![b.ins().iadd_imm_s(plane_in, in_plane), b.ins().iadd_imm_s(plane_out, out_plane)]
    });
    Ok(())
}

/// The maximum of `taps` (f32x4), NaN when any is: one `maxps` per tap, and whether any
/// tap is NaN from one unordered compare per pair of taps (the NaN-propagating max per
/// tap costs four or five instructions; the pool's windows have up to 9 taps).
fn window_max(b: &mut FunctionBuilder, taps: &[Value]) -> Value {
    let Some((&first, rest)) = taps.split_first() else {
        return splat_f32(b, f32::NEG_INFINITY);
    };
    let max = rest.iter().fold(first, |m, &x| float_max(b, x, m));
    let mut any_nan: Option<Value> = None;
    for pair in taps.chunks(2) {
        let (x, y) = (pair[0], *pair.get(1).unwrap_or(&pair[0]));
        let unordered = b.ins().fcmp(FloatCC::Unordered, x, y);
        any_nan = Some(match any_nan {
            Some(a) => b.ins().bor(a, unordered),
            None => unordered,
        });
    }
    let mask = b.ins().bitcast(F32X4, MemFlagsData::new(), any_nan.unwrap_or(max));
    let nan = splat_f32(b, f32::NAN);
    b.ins().bitselect(mask, nan, max)
}

/// Four channels of one output position: the window's taps inside the input, reduced.
#[allow(clippy::too_many_arguments)]
fn window_value(
    b: &mut FunctionBuilder,
    kind: PoolKind,
    origin: Value,
    lane_bytes: i64,
    rs: &Segment,
    cs: &Segment,
    rows: &AxisWindow,
    cols: &AxisWindow,
    in_row: i64,
) -> Value {
    let flags = weight(vector_flags());
    let vector = (BLOCK * 4) as i64;
    if kind == PoolKind::Max {
        let mut taps = Vec::new();
        for r in rs.tap_begin..rs.tap_end {
            for c in cs.tap_begin..cs.tap_end {
                let at = (r * rows.dilation) as i64 * in_row + (c * cols.dilation) as i64 * vector + lane_bytes;
                taps.push(load(b, F32X4, flags, origin, at));
            }
        }
        return window_max(b, &taps);
    }
    let mut acc: Option<Value> = None;
    for r in rs.tap_begin..rs.tap_end {
        for c in cs.tap_begin..cs.tap_end {
            let at = (r * rows.dilation) as i64 * in_row + (c * cols.dilation) as i64 * vector + lane_bytes;
            let v = load(b, F32X4, flags, origin, at);
            acc = Some(match (acc, kind) {
                (None, _) => v,
                (Some(a), PoolKind::Max) => float_minmax_nan(b, a, v, true),
                (Some(a), PoolKind::Avg { .. }) => b.ins().fadd(a, v),
            });
        }
    }
    match kind {
        PoolKind::Max => acc.unwrap_or_else(|| splat_f32(b, f32::NEG_INFINITY)),
        PoolKind::Avg { count_include_pad } => {
            let divisor = if count_include_pad {
                rs.padded_taps * cs.padded_taps
            } else {
                rs.taps() * cs.taps()
            };
            let sum = acc.unwrap_or_else(|| splat_f32(b, 0.0));
            let d = splat_f32(b, divisor as f32);
            b.ins().fdiv(sum, d)
        }
    }
}

/// Max pooling on x86-64 with AVX2: the same segments as [`emit_pool`], each run of
/// output positions a machine-code function over whole 8-channel blocks (one ymm per
/// tap, not two f32x4 halves: half the instructions of the portable code, which
/// SqueezeNet's 55x55 and 27x27 pools spent their time executing).
#[derive(Clone, Debug, PartialEq)]
pub struct MaxPoolPlan {
    planes: usize,
    rows: AxisWindow,
    cols: AxisWindow,
}

/// The machine-code plan when `node` is a blocked max pool without an epilogue on a
/// target with AVX2 (others run [`emit_pool`]).
pub fn max_pool_plan(g: &Graph, node: &Node, target: &crate::target::TargetSpec) -> Option<MaxPoolPlan> {
    let blocked = Layout::Blocked { block: BLOCK as u32 };
    if node.schedule.layout_in != blocked || node.schedule.layout_out != blocked || !node.epilogue.is_empty() {
        return None;
    }
    if !super::conv_blocked::runs_on(target) || node.inputs.len() != 1 {
        return None;
    }
    let (attrs, planes, rows, cols) = pool_geometry(g, node).ok()?;
    if attrs.kind != PoolKind::Max {
        return None;
    }
    // 32-bit displacements for every tap.
    let in_row = cols.input * BLOCK * 4;
    let reach = (rows.kernel * rows.dilation + 1) * in_row + (cols.kernel * cols.dilation + 1) * BLOCK * 4;
    (reach < i32::MAX as usize / 2).then_some(MaxPoolPlan { planes, rows, cols })
}

mod max_x86 {
    use iced_x86::code_asm::*;

    use crate::kernels::CodegenError;

    fn asm_error(e: IcedError) -> CodegenError {
        CodegenError(format!("assembling the blocked max pool: {e}"))
    }

    /// `run(x, y, count)`, SystemV: for `count` >= 1 output positions, 8 channels each
    /// at `y + 32·i`, the maximum of the taps at `x + x_step·i + taps[t]` (NaN when any
    /// tap is NaN; -inf without taps). Touches rdi, rsi, rdx, rax, ymm0-ymm4, ymm15;
    /// ends with `vzeroupper`.
    pub fn assemble(taps: &[i32], x_step: i32) -> Result<Vec<u8>, CodegenError> {
        let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
        emit(&mut asm, taps, x_step).map_err(asm_error)?;
        let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
        Ok(result.inner.code_buffer)
    }

    fn emit(asm: &mut CodeAssembler, taps: &[i32], x_step: i32) -> Result<(), IcedError> {
        let (x, y, count) = (rdi, rsi, rdx);
        let (max, unordered, nan) = (ymm0, ymm1, ymm15);
        let fill = if taps.is_empty() { f32::NEG_INFINITY } else { f32::NAN };
        asm.mov(eax, fill.to_bits())?;
        asm.vmovd(xmm15, eax)?;
        asm.vbroadcastss(nan, xmm15)?;
        let mut lp = asm.create_label();
        asm.set_label(&mut lp)?;
        match taps {
            [] => asm.vmovaps(max, nan)?,
            [only] => {
                asm.vmovups(max, ymmword_ptr(x + *only))?;
            }
            [first, second, rest @ ..] => {
                asm.vmovups(max, ymmword_ptr(x + *first))?;
                asm.vmovups(ymm2, ymmword_ptr(x + *second))?;
                asm.vcmpunordps(unordered, max, ymm2)?;
                asm.vmaxps(max, ymm2, max)?;
                for pair in rest.chunks(2) {
                    asm.vmovups(ymm2, ymmword_ptr(x + pair[0]))?;
                    match pair.get(1) {
                        Some(&b) => {
                            asm.vmovups(ymm3, ymmword_ptr(x + b))?;
                            asm.vcmpunordps(ymm4, ymm2, ymm3)?;
                            asm.vmaxps(max, ymm3, max)?;
                        }
                        None => asm.vcmpunordps(ymm4, ymm2, ymm2)?,
                    }
                    asm.vorps(unordered, unordered, ymm4)?;
                    asm.vmaxps(max, ymm2, max)?;
                }
                // NaN where any tap was.
                asm.vblendvps(max, max, nan, unordered)?;
            }
        }
        asm.vmovups(ymmword_ptr(y), max)?;
        asm.add(x, x_step)?;
        asm.add(y, 32)?;
        asm.dec(count)?;
        asm.jnz(lp)?;
        asm.vzeroupper()?;
        asm.ret()
    }
}

/// Defines the machine code (one function per pair of row and column segment kinds),
/// the task and the kernel of a [`MaxPoolPlan`]; returns the kernel.
#[allow(clippy::too_many_arguments)]
pub fn define_max_pool<M: cranelift_module::Module>(
    module: &mut M,
    node: &Node,
    node_index: usize,
    plan: &MaxPoolPlan,
    kernel_sig: &cranelift_codegen::ir::Signature,
    ctx: &mut cranelift_codegen::Context,
    fb_ctx: &mut cranelift_frontend::FunctionBuilderContext,
) -> Result<cranelift_module::FuncId, CodegenError> {
    use cranelift_codegen::ir::types::I64;
    use cranelift_module::Linkage;
    use std::collections::BTreeMap;

    let what = format!("blocked max pool '{}'", node.name);
    let (rows, cols) = (plan.rows, plan.cols);
    let vector = BLOCK * 4;
    let in_row = (cols.input * vector) as i64;
    let out_row = (cols.output * vector) as i64;
    let in_plane = rows.input as i64 * in_row;
    let out_plane = rows.output as i64 * out_row;
    let (row_segments, col_segments) = (rows.segments(), cols.segments());
    let signature = crate::microkernel::registry::sysv_i64_signature(3);
    // One function per (row taps, column taps).
    let mut codes: BTreeMap<(usize, usize, usize, usize), cranelift_module::FuncId> = BTreeMap::new();
    for rs in &row_segments {
        for cs in &col_segments {
            let key = (rs.tap_begin, rs.tap_end, cs.tap_begin, cs.tap_end);
            if codes.contains_key(&key) {
                continue;
            }
            let mut taps = Vec::new();
            for r in rs.tap_begin..rs.tap_end {
                for c in cs.tap_begin..cs.tap_end {
                    taps.push(((r * rows.dilation) as i64 * in_row + (c * cols.dilation * vector) as i64) as i32);
                }
            }
            let code = max_x86::assemble(&taps, (cols.stride * vector) as i32)?;
            let name = format!("cnnc_k{node_index}_maxpool8_{}", codes.len());
            let id = module
                .declare_function(&name, Linkage::Local, &signature)
                .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
            module
                .define_function_bytes(id, crate::microkernel::x86::CODE_ALIGN, &code, &[])
                .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
            codes.insert(key, id);
        }
    }
    let output_slot = node.inputs.len();
    let units = plan.planes;
    // A plane's pool is ~10-100 µs: worth a task each.
    let max_tasks = units.max(1);
    let task_name = format!("cnnc_k{node_index}_maxpool8_task");
    let task_sig = super::parallel::task_signature(module);
    let task = crate::module::define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, module, params| {
        let (task_ctx, index) = (params[0], params[1]);
        let flags = MemFlagsData::trusted().with_readonly().with_can_move();
        let super::parallel::TaskShare { bufs, first, end } = super::parallel::emit_task_share(b, task_ctx, index, units);
        let x = b.ins().load(I64, flags, bufs, 0);
        let y = b.ins().load(I64, flags, bufs, (8 * output_slot) as i32);
        let refs: BTreeMap<(usize, usize, usize, usize), cranelift_codegen::ir::FuncRef> =
            codes.iter().map(|(key, &id)| (*key, module.declare_func_in_func(id, b.func))).collect();
        let sig = b.import_signature(signature.clone());
        super::gemm::for_range(b, first, end, |b, plane| {
            let plane_in = super::gemm::scaled(b, x, plane, in_plane);
            let plane_out = super::gemm::scaled(b, y, plane, out_plane);
            for rs in &row_segments {
                crate::loops::for_count(b, rs.count, |b, r| {
                    let oy = b.ins().iadd_imm_s(r, rs.start as i64);
                    // Window origins may lie in the padding (never read there).
                    let x_row = super::gemm::scaled(b, plane_in, oy, rows.stride as i64 * in_row);
                    let x_row = b.ins().iadd_imm_s(x_row, -(rows.pad_begin as i64) * in_row);
                    let y_row = super::gemm::scaled(b, plane_out, oy, out_row);
                    for cs in &col_segments {
                        let code = refs[&(rs.tap_begin, rs.tap_end, cs.tap_begin, cs.tap_end)];
                        let x_at = b.ins().iadd_imm_s(x_row, cols.origin(cs.start) * vector as i64);
                        let y_at = b.ins().iadd_imm_s(y_row, (cs.start * vector) as i64);
                        let count = b.ins().iconst(I64, cs.count as i64);
                        let code = b.ins().func_addr(I64, code);
                        b.ins().call_indirect(sig, code, &[x_at, y_at, count]);
                    }
                });
            }
        });
        Ok(())
    })?;
    let name = format!("cnnc_k{node_index}_maxpool8");
    crate::module::define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        super::parallel::emit_dispatch_up_to(module, b, host, bufs, task, max_tasks);
        Ok(())
    })
}
