//! Run-time packing of the weights of a one-tap convolution: a row-major [M, K] matrix
//! (a MatMul's A rewritten as 1x1 filters by the matmul-as-conv pass, where K runs to
//! tens of thousands: the batch times the positions of a weight gradient) into the
//! panels `[group][panel][kk][width]` that `pack::emit_pack_weights` makes.
//!
//! The general packer walks one output channel at a time and stores with a stride of
//! one panel row; with one tap and a large K each panel spans megabytes, so every one of
//! a panel's `width` passes misses the caches again (measured: ~3 ns per element).
//! Here a panel is written once, front to back: per quad of reduction indices, one
//! f32x4 load per panel row, transposed in registers (rows in quads; a width that is
//! not a multiple of 4 stores its last rows lane by lane).

use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::scaled;
use crate::kernels::compute::{LANES, counted_loop, scalar_flags, transpose4, vector_flags};
use crate::kernels::conv_gemm::ConvGemmPlan;

const F32_BYTES: i64 = 4;

/// Emits the packing of `plan`'s weights from `w` into `dst` when the convolution has
/// one tap (and its offsets fit the immediates); returns false, emitting nothing,
/// otherwise.
pub fn emit_pack_one_tap_weights(b: &mut FunctionBuilder, plan: &ConvGemmPlan, w: Value, dst: Value) -> bool {
    let width = plan.channel_tile();
    let depth = plan.depth;
    let row_bytes = depth as i64 * F32_BYTES;
    let kk_bytes = width as i64 * F32_BYTES;
    let fits = |bytes: i64| bytes <= i64::from(i32::MAX);
    if plan.taps != 1 || plan.winograd.is_some() || !fits(width as i64 * row_bytes) || !fits(LANES as i64 * kk_bytes) {
        return false;
    }
    let panel_bytes = depth as i64 * kk_bytes;
    let full_panels = plan.out_channels / width;
    let last_rows = plan.out_channels % width;
    let shape = PanelShape { width, depth, row_bytes, kk_bytes };
    counted_loop(b, plan.groups, vec![], |b, group, _| {
        let group_src = scaled(b, w, group, plan.out_channels as i64 * row_bytes);
        let group_dst = scaled(b, dst, group, plan.panels() as i64 * panel_bytes);
        counted_loop(b, full_panels, vec![], |b, panel, _| {
            let src = scaled(b, group_src, panel, width as i64 * row_bytes);
            let to = scaled(b, group_dst, panel, panel_bytes);
            emit_panel(b, &shape, width, src, to);
            vec![]
        });
        if last_rows > 0 {
            let src = b.ins().iadd_imm_s(group_src, (full_panels * width) as i64 * row_bytes);
            let to = b.ins().iadd_imm_s(group_dst, full_panels as i64 * panel_bytes);
            emit_panel(b, &shape, last_rows, src, to);
        }
        vec![]
    });
    true
}

struct PanelShape {
    width: usize,
    depth: usize,
    row_bytes: i64,
    kk_bytes: i64,
}

/// One panel: `rows` rows of the matrix from `src` (the rest of the panel's `width`
/// zeros) into `[kk][width]` at `dst`.
fn emit_panel(b: &mut FunctionBuilder, s: &PanelShape, rows: usize, src: Value, dst: Value) {
    let quads_of_rows = rows / LANES;
    let after = counted_loop(b, s.depth / LANES, vec![src, dst], |b, _, at| {
        let loaded: Vec<Value> =
            (0..rows).map(|r| b.ins().load(F32X4, vector_flags(), at[0], (r as i64 * s.row_bytes) as i32)).collect();
        for quad in 0..quads_of_rows {
            let by_kk = transpose4(b, &loaded[quad * LANES..quad * LANES + LANES]);
            for (t, v) in by_kk.into_iter().enumerate() {
                let offset = t as i64 * s.kk_bytes + (quad * LANES) as i64 * F32_BYTES;
                b.ins().store(vector_flags(), v, at[1], offset as i32);
            }
        }
        for (r, &row) in loaded.iter().enumerate().skip(quads_of_rows * LANES) {
            for t in 0..LANES {
                let v = b.ins().extractlane(row, t as u8);
                let offset = t as i64 * s.kk_bytes + r as i64 * F32_BYTES;
                b.ins().store(MemFlagsData::trusted(), v, at[1], offset as i32);
            }
        }
        store_zeros(b, s, rows, LANES, at[1]);
        vec![b.ins().iadd_imm_s(at[0], LANES as i64 * F32_BYTES), b.ins().iadd_imm_s(at[1], LANES as i64 * s.kk_bytes)]
    });
    let tail = s.depth % LANES;
    for t in 0..tail {
        for r in 0..rows {
            let v = b.ins().load(F32, scalar_flags(), after[0], (r as i64 * s.row_bytes + t as i64 * F32_BYTES) as i32);
            let offset = t as i64 * s.kk_bytes + r as i64 * F32_BYTES;
            b.ins().store(MemFlagsData::trusted(), v, after[1], offset as i32);
        }
    }
    store_zeros(b, s, rows, tail, after[1]);
}

/// Zeros in rows `rows..width` of `count` consecutive panel rows at `at`.
fn store_zeros(b: &mut FunctionBuilder, s: &PanelShape, rows: usize, count: usize, at: Value) {
    if rows == s.width || count == 0 {
        return;
    }
    let zero = b.ins().f32const(0.0);
    for t in 0..count {
        for r in rows..s.width {
            let offset = t as i64 * s.kk_bytes + r as i64 * F32_BYTES;
            b.ins().store(MemFlagsData::trusted(), zero, at, offset as i32);
        }
    }
}
