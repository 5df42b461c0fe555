//! The loop nest of a GEMM convolution task with output channels as the rows of the
//! microkernel's tile (`Orientation::ChannelRows`): A = packed weights (compile time),
//! B = im2col panels of `nr` positions (packed here), tiles written in place.
//!
//! Per k-block: pack the block's B panels into the slot, then for each channel panel
//! and position panel call the microkernel. Full tiles accumulate straight into the
//! output (`ldc` = positions); an edge tile (the group's last channels, the last
//! positions) is computed into a temporary tile whose valid part is copied or added.
//! After the last k-block each tile gets the epilogue while it is in L1.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{I8, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use super::pack::{emit_pack_block, emit_pack_ragged_panel};
use super::pack_carried;
use super::tile::emit_merge;
use super::{for_range, int, scaled};
use crate::kernels::CodegenError;
use crate::kernels::conv_gemm::TaskFrame;

const F32_BYTES: i64 = 4;

/// Scratch of one slot: the packed B block, then the temporary edge tile.
pub fn slot_bytes(kc: usize, nc: usize, mr: usize, nr: usize) -> usize {
    (kc * nc + mr * nr) * 4
}

pub fn emit(b: &mut FunctionBuilder, f: &TaskFrame) -> Result<(), CodegenError> {
    let plan = f.plan;
    let (mr, nr, kc) = (plan.mr as i64, plan.nr as i64, plan.kc as i64);
    let positions = plan.positions as i64;
    let depth = plan.depth as i64;
    let k_blocks = plan.k_blocks();
    let edge_rows = plan.out_channels % plan.mr;
    let ragged_positions = !plan.positions.is_multiple_of(plan.nr);
    let panel_bytes = kc * nr * F32_BYTES;
    let in_plane_bytes = plan.in_plane as i64 * F32_BYTES;
    let packed = f.scratch;
    let tmp_tile = b.ins().iadd_imm_s(packed, (plan.kc * plan.nc * 4) as i64);
    let pack_shape = f.pack_shape(plan.nr);
    let epilogue = &f.epilogue;
    let carried = pack_carried::applies(&pack_shape, plan.nc >= plan.positions);
    let mut failure: Option<CodegenError> = None;
    crate::kernels::compute::counted_loop(b, k_blocks, vec![], |b, kb, _| {
        let k0 = b.ins().imul_imm_s(kb, kc);
        let depth_v = int(b, depth);
        let rest = b.ins().isub(depth_v, k0);
        let kc_v = int(b, kc);
        let kcb = b.ins().umin(rest, kc_v);
        // With B in place, whole panels are read from the input rows: only a ragged
        // last panel is packed, and every call goes to the strided kernel (a packed
        // panel is B with rows `nr` floats apart).
        let in_place = f.strided_kernel.map(|_| {
            emit_pack_ragged_panel(
                b,
                &pack_shape,
                f.x_group,
                f.p_start,
                f.p_panels,
                k0,
                kcb,
                packed,
                panel_bytes,
            );
            let first_row = b.ins().imul_imm_s(k0, in_plane_bytes);
            b.ins().iadd(f.x_group, first_row)
        });
        if in_place.is_none() && carried {
            pack_carried::emit_pack_block(b, &pack_shape, f.x_group, k0, kcb, packed, panel_bytes);
        } else if in_place.is_none() {
            emit_pack_block(
                b,
                &pack_shape,
                f.x_group,
                f.p_start,
                f.p_panels,
                k0,
                kcb,
                packed,
                panel_bytes,
            );
        }
        let accumulate = b.ins().icmp_imm_s(IntCC::NotEqual, kb, 0);
        let accumulate = b.ins().uextend(I64, accumulate);
        let is_last = b.ins().icmp_imm_s(IntCC::Equal, kb, (k_blocks - 1) as i64);
        for_range(b, f.panel_lo, f.panel_hi, |b, panel| {
            let a_offset = b.ins().imul_imm_s(panel, depth);
            let a_offset = b.ins().iadd(a_offset, k0);
            let a = scaled(b, f.weights_group, a_offset, mr * F32_BYTES);
            let oc0 = b.ins().imul_imm_s(panel, mr);
            let c_rows = scaled(b, f.out_group, oc0, positions * F32_BYTES);
            let channel = b.ins().iadd(f.group_channel, oc0);
            let rows_full = if edge_rows == 0 {
                b.ins().iconst(I8, 1)
            } else {
                b.ins().icmp_imm_s(IntCC::NotEqual, panel, plan.panels() as i64 - 1)
            };
            let zero = int(b, 0);
            for_range(b, zero, f.p_panels, |b, pp| {
                let p_in_block = b.ins().imul_imm_s(pp, nr);
                let p0 = b.ins().iadd(f.p_start, p_in_block);
                let packed_panel = scaled(b, packed, pp, panel_bytes);
                let c = scaled(b, c_rows, p0, F32_BYTES);
                let cols_full = if ragged_positions {
                    let end = b.ins().iadd_imm_s(p0, nr);
                    b.ins().icmp_imm_s(IntCC::SignedLessThanOrEqual, end, positions)
                } else {
                    b.ins().iconst(I8, 1)
                };
                let full = b.ins().band(rows_full, cols_full);
                // (B panel, its row stride in bytes) for the strided kernel.
                let strided_b = in_place.map(|rows_k0| {
                    let in_place_panel = scaled(b, rows_k0, p0, F32_BYTES);
                    let panel = b.ins().select(cols_full, in_place_panel, packed_panel);
                    let plane = int(b, in_plane_bytes);
                    let packed_row = int(b, nr * F32_BYTES);
                    let ldb = b.ins().select(cols_full, plane, packed_row);
                    (panel, ldb)
                });
                let call_kernel = |b: &mut FunctionBuilder, c: Value, ldc: Value, accumulate: Value| match (
                    f.strided_kernel,
                    strided_b,
                ) {
                    (Some(kernel), Some((panel, ldb))) => {
                        b.ins().call(kernel, &[kcb, a, panel, c, ldc, accumulate, ldb]);
                    }
                    _ => {
                        b.ins().call(f.kernel, &[kcb, a, packed_panel, c, ldc, accumulate]);
                    }
                };
                let full_block = b.create_block();
                let edge_block = b.create_block();
                let next = b.create_block();
                b.ins().brif(full, full_block, &[], edge_block, &[]);

                b.switch_to_block(full_block);
                b.seal_block(full_block);
                let ldc = int(b, positions);
                if let Some(fused) = &f.fused_store {
                    // The last k-block's tile gets the epilogue in registers.
                    let fused_block = b.create_block();
                    if k_blocks == 1 {
                        b.ins().jump(fused_block, &[]);
                    } else {
                        let plain_block = b.create_block();
                        b.ins().brif(is_last, fused_block, &[], plain_block, &[]);
                        b.switch_to_block(plain_block);
                        b.seal_block(plain_block);
                        call_kernel(b, c, ldc, accumulate);
                        b.ins().jump(next, &[]);
                    }
                    b.switch_to_block(fused_block);
                    b.seal_block(fused_block);
                    let (panel, ldb) = match strided_b {
                        Some(in_place) => in_place,
                        None => (packed_panel, int(b, 0)),
                    };
                    let bias = match epilogue.bias {
                        Some(base) => scaled(b, base, channel, F32_BYTES),
                        None => int(b, 0),
                    };
                    let residual = match fused.residual_step {
                        Some(s) => epilogue.operand_address(b, s, f.image, channel, p0),
                        None => int(b, 0),
                    };
                    b.ins()
                        .call(fused.kernel, &[kcb, a, panel, c, ldc, accumulate, ldb, bias, residual]);
                } else {
                    call_kernel(b, c, ldc, accumulate);
                }
                if f.fused_store.is_none() && !epilogue.is_empty() {
                    let epilogue_block = b.create_block();
                    b.ins().brif(is_last, epilogue_block, &[], next, &[]);
                    b.switch_to_block(epilogue_block);
                    b.seal_block(epilogue_block);
                    let all_rows = int(b, mr);
                    if let Err(e) = epilogue.emit_rows(b, c, f.image, channel, p0, all_rows, plan.nr) {
                        failure = Some(e);
                    }
                }
                b.ins().jump(next, &[]);

                b.switch_to_block(edge_block);
                b.seal_block(edge_block);
                let tmp_ldc = int(b, nr);
                let fresh = int(b, 0);
                call_kernel(b, tmp_tile, tmp_ldc, fresh);
                let all_rows = int(b, mr);
                let rows = if edge_rows == 0 {
                    all_rows
                } else {
                    let few = int(b, edge_rows as i64);
                    b.ins().select(rows_full, all_rows, few)
                };
                let all_positions = int(b, positions);
                let cols_left = b.ins().isub(all_positions, p0);
                let nr_v = int(b, nr);
                let cols = b.ins().umin(cols_left, nr_v);
                emit_merge(b, tmp_tile, nr, c, positions, rows, cols, plan.nr, accumulate);
                if !epilogue.is_empty() {
                    let epilogue_block = b.create_block();
                    b.ins().brif(is_last, epilogue_block, &[], next, &[]);
                    b.switch_to_block(epilogue_block);
                    b.seal_block(epilogue_block);
                    // Whole rows (an edge of channels) still go as vectors.
                    let whole_rows = b.create_block();
                    let part_rows = b.create_block();
                    let whole = b.ins().icmp_imm_s(IntCC::Equal, cols, nr);
                    b.ins().brif(whole, whole_rows, &[], part_rows, &[]);
                    b.switch_to_block(whole_rows);
                    b.seal_block(whole_rows);
                    if let Err(e) = epilogue.emit_rows(b, c, f.image, channel, p0, rows, plan.nr) {
                        failure = Some(e);
                    }
                    b.ins().jump(next, &[]);
                    b.switch_to_block(part_rows);
                    b.seal_block(part_rows);
                    if let Err(e) = epilogue.emit_region(b, c, rows, cols, f.image, channel, p0) {
                        failure = Some(e);
                    }
                }
                b.ins().jump(next, &[]);

                b.switch_to_block(next);
                b.seal_block(next);
            });
        });
        vec![]
    });
    failure.map_or(Ok(()), Err)
}
