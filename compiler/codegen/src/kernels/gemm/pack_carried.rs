//! Packing of B for convolutions that carry their input's last axis through unchanged:
//! kernel extent 1, stride 1 and no padding along it, the same extent in the input and
//! the output, a whole number of panels. These are the weight-gradient correlations of
//! training graphs (`train/rules_window.rs`: x channels-last as one image
//! `[1, N, *in, C]`, dy as the weight, output `[1, M, *k, C]`), whose reduction index is
//! (tap, image) and whose positions are (filter tap, input channel).
//!
//! A reduction row (one tap of dy, one image) is then, for each filter tap, one
//! contiguous run of C input channels, which fills C / `width` panels. The general
//! packing (`pack::emit_pack_panel`) goes panel by panel with the images innermost, so
//! consecutive reads hit the same pixel of every image, a plane apart (a multiple of
//! 4 KiB: one L1 set for all of them). Here the rows are outermost: a row reads a few
//! neighbouring pixels of one image and writes one line into each panel.
//! Only for blocks of every position (`schedule-weight-gradients` makes them).

use cranelift_codegen::ir::types::F32X4;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use super::pack::PackShape;
use super::{below, repeat, unflatten};
use crate::kernels::compute::{LANES, counted_loop, vector_flags};

const F32_BYTES: i64 = 4;

/// Filter taps (output positions along the leading axes) up to which the per-row code
/// is unrolled over them.
const MAX_ROWS: usize = 64;

/// Whether `s` carries its last axis (see the module comment) and the block holds every
/// position (`whole_block`).
pub fn applies(s: &PackShape, whole_block: bool) -> bool {
    let sp = s.spatial;
    let rank = sp.output.len();
    if rank < 2 || !whole_block || s.width == 0 || !s.width.is_multiple_of(LANES) {
        return false;
    }
    let last = rank - 1;
    let carried = sp.output[last];
    sp.kernel[last] == 1
        && sp.strides[last] == 1
        && sp.pads[last] == 0
        && sp.input[last] == carried
        && carried.is_multiple_of(s.width)
        && s.positions / carried <= MAX_ROWS
}

/// Packs the whole block (all positions, `panel_bytes` apart from `dst`) for reduction
/// indices `k0..k0 + kc` from the group's input `x_group`.
pub fn emit_pack_block(
    b: &mut FunctionBuilder,
    s: &PackShape,
    x_group: Value,
    k0: Value,
    kc: Value,
    dst: Value,
    panel_bytes: i64,
) {
    let sp = s.spatial;
    let rank = sp.output.len();
    let last = rank - 1;
    let carried = sp.output[last];
    let leading_out = &sp.output[..last];
    let leading_kernel = &sp.kernel[..last];
    let rows: usize = leading_out.iter().product();
    let chunks = carried / s.width;
    let in_strides = cnnc_ir::strides(&sp.input);
    let plane_bytes = s.in_plane as i64 * F32_BYTES;
    let row_bytes = s.width as i64 * F32_BYTES;
    let chunk_dst_bytes = panel_bytes;
    let chunk_src_bytes = s.width as i64 * F32_BYTES;
    let channels = s.channels as i64;
    let zero_vector = {
        let zero = b.ins().f32const(0.0);
        b.ins().splat(F32X4, zero)
    };
    repeat(b, kc, &[k0, dst], |b, at| {
        let (k, dst_row) = (at[0], at[1]);
        let tap = b.ins().udiv_imm_u(k, channels);
        let image = b.ins().urem_imm_u(k, channels);
        let tap_coords = unflatten(b, tap, leading_kernel);
        let tap_offsets: Vec<Value> = (0..last)
            .map(|a| b.ins().imul_imm_s(tap_coords[a], sp.dilations[a] as i64))
            .collect();
        let src_image = super::scaled(b, x_group, image, plane_bytes);
        for row in 0..rows {
            // The filter tap's coordinates are compile-time constants.
            let mut rest = row;
            let mut out_coords = vec![0usize; last];
            for a in (0..last).rev() {
                out_coords[a] = rest % leading_out[a];
                rest /= leading_out[a];
            }
            let mut inside = b.ins().iconst(cranelift_codegen::ir::types::I8, 1);
            let mut src = src_image;
            for a in 0..last {
                let origin = (out_coords[a] * sp.strides[a]) as i64 - sp.pads[a] as i64;
                let coord = b.ins().iadd_imm_s(tap_offsets[a], origin);
                let ok = below(b, coord, sp.input[a]);
                inside = b.ins().band(inside, ok);
                src = super::scaled(b, src, coord, in_strides[a] as i64 * F32_BYTES);
            }
            let row_dst = b.ins().iadd_imm_s(dst_row, (row * chunks) as i64 * panel_bytes);
            let copy = b.create_block();
            let zeros = b.create_block();
            let done = b.create_block();
            b.ins().brif(inside, copy, &[], zeros, &[]);

            b.switch_to_block(copy);
            b.seal_block(copy);
            counted_loop(b, chunks, vec![src, row_dst], |b, _, ptrs| {
                let values: Vec<Value> = (0..s.width / LANES)
                    .map(|q| b.ins().load(F32X4, vector_flags(), ptrs[0], (q * LANES) as i32 * F32_BYTES as i32))
                    .collect();
                for (q, v) in values.into_iter().enumerate() {
                    b.ins()
                        .store(vector_flags(), v, ptrs[1], (q * LANES) as i32 * F32_BYTES as i32);
                }
                vec![
                    b.ins().iadd_imm_s(ptrs[0], chunk_src_bytes),
                    b.ins().iadd_imm_s(ptrs[1], chunk_dst_bytes),
                ]
            });
            b.ins().jump(done, &[]);

            b.switch_to_block(zeros);
            b.seal_block(zeros);
            counted_loop(b, chunks, vec![row_dst], |b, _, ptrs| {
                for q in 0..s.width / LANES {
                    b.ins()
                        .store(vector_flags(), zero_vector, ptrs[0], (q * LANES) as i32 * F32_BYTES as i32);
                }
                vec![b.ins().iadd_imm_s(ptrs[0], chunk_dst_bytes)]
            });
            b.ins().jump(done, &[]);

            b.switch_to_block(done);
            b.seal_block(done);
        }
        vec![b.ins().iadd_imm_s(k, 1), b.ins().iadd_imm_s(dst_row, row_bytes)]
    });
}
