//! The loop nest of a GEMM convolution task with output positions as the rows of the
//! microkernel's tile (`Orientation::PositionRows`), for convolutions with few
//! positions: 7x7 = 49 positions fill 4 panels of 16 columns to 77%, but 9 panels of 6
//! rows to 91%, while the channels (a multiple of 16 in most networks) fill the
//! columns exactly.
//!
//! A = im2col panels of `mr` positions (packed here), B = packed weights, `nr`
//! channels per panel (compile time, 32-byte aligned). The tiles (`mr` positions x
//! `nr` channels) accumulate over the k-blocks in the slot; once all blocks are done
//! each tile is stored transposed into the output with the epilogue, element by
//! element (few positions, so few elements for the work behind each).

use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_frontend::FunctionBuilder;

use super::pack::emit_pack_block;
use super::tile::Source;
use super::{for_range, int, scaled};
use crate::kernels::CodegenError;
use crate::kernels::conv_gemm::TaskFrame;

const F32_BYTES: i64 = 4;

/// Scratch of one slot: the packed A block (`kc` x `nc` positions), then a tile per
/// (position panel, channel panel) of the block.
pub fn slot_bytes(kc: usize, nc: usize, channel_panels: usize, nr: usize) -> usize {
    (kc * nc + nc * channel_panels * nr) * 4
}

pub fn emit(b: &mut FunctionBuilder, f: &TaskFrame) -> Result<(), CodegenError> {
    let plan = f.plan;
    let (mr, nr, kc, nc) = (plan.mr as i64, plan.nr as i64, plan.kc as i64, plan.nc as i64);
    let positions = plan.positions as i64;
    let depth = plan.depth as i64;
    let panels = plan.panels() as i64;
    let tile_bytes = mr * nr * F32_BYTES;
    let a_panel_bytes = kc * mr * F32_BYTES;
    let packed = f.scratch;
    let tiles = b.ins().iadd_imm_s(packed, kc * nc * F32_BYTES);
    let pack_shape = f.pack_shape(plan.mr);
    let k_blocks = plan.k_blocks();

    // The tile of (position panel `pp`, channel panel `panel`).
    let tile_of = |b: &mut FunctionBuilder, pp, panel| {
        let local = b.ins().isub(panel, f.panel_lo);
        let index = b.ins().imul_imm_s(pp, panels);
        let index = b.ins().iadd(index, local);
        scaled(b, tiles, index, tile_bytes)
    };

    crate::kernels::compute::counted_loop(b, k_blocks, vec![], |b, kb, _| {
        let k0 = b.ins().imul_imm_s(kb, kc);
        let depth_v = int(b, depth);
        let rest = b.ins().isub(depth_v, k0);
        let kc_v = int(b, kc);
        let kcb = b.ins().umin(rest, kc_v);
        emit_pack_block(
            b,
            &pack_shape,
            f.x_group,
            f.p_start,
            f.p_panels,
            k0,
            kcb,
            packed,
            a_panel_bytes,
        );
        let accumulate = b.ins().icmp_imm_s(IntCC::NotEqual, kb, 0);
        let accumulate = b.ins().uextend(I64, accumulate);
        let ldc = int(b, nr);
        for_range(b, f.panel_lo, f.panel_hi, |b, panel| {
            let b_offset = b.ins().imul_imm_s(panel, depth);
            let b_offset = b.ins().iadd(b_offset, k0);
            let weights = scaled(b, f.weights_group, b_offset, nr * F32_BYTES);
            let zero = int(b, 0);
            for_range(b, zero, f.p_panels, |b, pp| {
                let a = scaled(b, packed, pp, a_panel_bytes);
                let c = tile_of(b, pp, panel);
                match f.strided_kernel {
                    // The first position panel fetches the next channel panel's weights
                    // (same rows, `depth` rows on) while the others reuse these.
                    Some(prefetching) => {
                        let first = b.create_block();
                        let rest = b.create_block();
                        let next = b.create_block();
                        b.ins().brif(pp, rest, &[], first, &[]);
                        b.switch_to_block(first);
                        b.seal_block(first);
                        let ahead = int(b, depth * nr * F32_BYTES);
                        b.ins().call(prefetching, &[kcb, a, weights, c, ldc, accumulate, ahead]);
                        b.ins().jump(next, &[]);
                        b.switch_to_block(rest);
                        b.seal_block(rest);
                        b.ins().call(f.kernel, &[kcb, a, weights, c, ldc, accumulate]);
                        b.ins().jump(next, &[]);
                        b.switch_to_block(next);
                        b.seal_block(next);
                    }
                    None => {
                        b.ins().call(f.kernel, &[kcb, a, weights, c, ldc, accumulate]);
                    }
                }
            });
        });
        vec![]
    });

    // Store: tile element (position i, channel j) goes to out[channel j][position i].
    let mut failure = None;
    for_range(b, f.panel_lo, f.panel_hi, |b, panel| {
        let oc0 = b.ins().imul_imm_s(panel, nr);
        let channel = b.ins().iadd(f.group_channel, oc0);
        let group_channels = int(b, plan.out_channels as i64);
        let left = b.ins().isub(group_channels, oc0);
        let nr_v = int(b, nr);
        let rows = b.ins().umin(left, nr_v);
        let out_rows = scaled(b, f.out_group, oc0, positions * F32_BYTES);
        let zero = int(b, 0);
        for_range(b, zero, f.p_panels, |b, pp| {
            let p0 = b.ins().imul_imm_s(pp, mr);
            let p0 = b.ins().iadd(f.p_start, p0);
            let all_positions = int(b, positions);
            let left = b.ins().isub(all_positions, p0);
            let mr_v = int(b, mr);
            let cols = b.ins().umin(left, mr_v);
            let src = tile_of(b, pp, panel);
            let dst = scaled(b, out_rows, p0, F32_BYTES);
            let from = Source {
                at: src,
                row_bytes: F32_BYTES,
                col_bytes: nr * F32_BYTES,
            };
            if let Err(e) = f
                .epilogue
                .emit_region_from(b, from, dst, rows, cols, f.image, channel, p0)
            {
                failure = Some(e);
            }
        });
    });
    failure.map_or(Ok(()), Err)
}
