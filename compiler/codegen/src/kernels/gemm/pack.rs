//! Packing one B panel of a convolution run as GEMM: im2col on the fly.
//!
//! The panel holds, for reduction indices `kk` in `k0..k0 + kc` and `width` consecutive
//! output positions starting at `p0`, the input value each position reads for `kk`:
//! `width` floats per `kk` (the microkernel's B layout with `width = nr`, or its A
//! layout with `width = mr` when positions are the rows of the product). The reduction index is
//! tap-major, `kk = tap · C_in/group + ic` (the weights are laid out to match), so for
//! one tap the panel rows of consecutive input channels are consecutive, and each
//! position's source address only moves by a channel plane per row.
//!
//! Positions go in quads (one f32x4). Per (tap, quad) the emitted code decides at run
//! time whether the quad is *regular*: its four positions lie in one output row and
//! all read inside the input. A regular quad is one vector load per channel (unit
//! stride; stride 2 is two loads and a shuffle; larger strides gather); when every
//! quad of the panel is regular one loop over the channels copies them all. Other
//! quads (row ends, padding, positions past the last), and the positions of a width
//! that is not a multiple of 4, go position by position, reading or writing zeros per
//! channel. 1x1 convolutions without stride or padding arrive
//! here as a single flat axis, so every quad but those past the end is regular.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, F64X2, I8};
use cranelift_codegen::ir::{Endianness, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::{below, int, repeat, scaled, unflatten};
use crate::kernels::compute::{
    LANES, counted_loop, load_f32x4_strided, scalar_flags, shuffle_f32x4, transpose4, vector_flags,
};
use crate::kernels::conv_gemm::{ConvGemmPlan, Spatial};

const F32_BYTES: i64 = 4;

/// What packing needs to know about the convolution.
pub struct PackShape<'a> {
    pub spatial: &'a Spatial,
    /// Input channels per group.
    pub channels: usize,
    /// Elements of one input channel plane.
    pub in_plane: usize,
    /// Output positions (the product of `spatial.output`).
    pub positions: usize,
    /// Positions per panel, which is also the panel's floats per reduction index.
    pub width: usize,
}

/// Per position, what does not depend on the tap (hoisted out of the tap loop: with
/// many taps and few channels, as in weight-gradient convolutions, the per-position
/// decoding would otherwise dominate).
struct Lane {
    /// The position is one of the convolution's (not past the last).
    valid: Value,
    /// Per axis, `out · stride − pad`.
    origin: Vec<Value>,
}

/// Per quad, what does not depend on the tap.
struct Quad {
    /// The four positions share one output row (so consecutive input addresses).
    one_row: Value,
    /// Per axis, `out · stride − pad` (the input coordinate of tap 0).
    origin: Vec<Value>,
}

/// Reduction depths up to this many rows get the unrolled interior copy
/// (`emit_interior_panel`): shallow convolutions such as a network's first 3x3 over 3
/// channels, where the per-tap decisions of the general packing cost more than the copy.
/// 160 takes in the 7x7 stride-2 stems over 3 channels (depth 147: ResNet, GoogLeNet,
/// DenseNet), whose packing time halved (resnet18's stem task 7.0% -> 3.6% of the GEMM
/// microkernel's perf samples, same run).
const MAX_UNROLLED_DEPTH: usize = 160;

/// Emits the packing of the panel at `dst` (32-byte aligned) from the group's input
/// `x_group`, for positions `p0..p0 + width` and reduction indices `k0..k0 + kc`
/// (`kc >= 1`, run-time values).
pub fn emit_pack_panel(
    b: &mut FunctionBuilder,
    s: &PackShape,
    x_group: Value,
    p0: Value,
    k0: Value,
    kc: Value,
    dst: Value,
) {
    let Some(origin) = interior_origin(b, s, p0, k0, kc) else {
        emit_pack_panel_general(b, s, x_group, p0, k0, kc, dst);
        return;
    };
    let (inside, ih0, iw0) = origin;
    let fast = b.create_block();
    let general = b.create_block();
    let done = b.create_block();
    b.ins().brif(inside, fast, &[], general, &[]);
    b.switch_to_block(fast);
    b.seal_block(fast);
    emit_interior_panel(b, s, x_group, ih0, iw0, dst);
    b.ins().jump(done, &[]);
    b.switch_to_block(general);
    b.seal_block(general);
    emit_pack_panel_general(b, s, x_group, p0, k0, kc, dst);
    b.ins().jump(done, &[]);
    b.switch_to_block(done);
    b.seal_block(done);
}

/// For 2-D convolutions shallow enough to unroll (depth <= `MAX_UNROLLED_DEPTH`, unit or
/// 2 column stride, whole quads): whether the panel can take `emit_interior_panel` (the
/// block is the whole reduction, the panel's positions lie in one output row and every
/// tap of every position reads inside the input), with the input row and column of its
/// first position's first tap. None when the shape never qualifies.
fn interior_origin(
    b: &mut FunctionBuilder,
    s: &PackShape,
    p0: Value,
    k0: Value,
    kc: Value,
) -> Option<(Value, Value, Value)> {
    let sp = s.spatial;
    let taps: usize = sp.kernel.iter().product();
    let depth = taps * s.channels;
    let shape_ok = sp.output.len() == 2
        && depth <= MAX_UNROLLED_DEPTH
        && s.width.is_multiple_of(LANES)
        && matches!(sp.strides[1], 1 | 2)
        && s.width <= sp.output[1];
    if !shape_ok {
        return None;
    }
    let row_len = sp.output[1] as i64;
    let oh = b.ins().udiv_imm_u(p0, row_len);
    let ow0 = b.ins().urem_imm_u(p0, row_len);
    // One output row: the last position's column is in the row.
    let mut inside = b
        .ins()
        .icmp_imm_s(IntCC::SignedLessThanOrEqual, ow0, row_len - s.width as i64);
    let whole_depth = b.ins().icmp_imm_s(IntCC::Equal, kc, depth as i64);
    let from_first = b.ins().icmp_imm_s(IntCC::Equal, k0, 0);
    inside = b.ins().band(inside, whole_depth);
    inside = b.ins().band(inside, from_first);
    // Rows: oh·sh − ph .. + (kh−1)·dh inside [0, H).
    let ih0 = b.ins().imul_imm_s(oh, sp.strides[0] as i64);
    let ih0 = b.ins().iadd_imm_s(ih0, -(sp.pads[0] as i64));
    let last_ih = b.ins().iadd_imm_s(ih0, ((sp.kernel[0] - 1) * sp.dilations[0]) as i64);
    let rows_in = below(b, last_ih, sp.input[0]);
    let rows_from = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, ih0, 0);
    // Columns: the first position's first tap to the last position's last tap.
    let iw0 = b.ins().imul_imm_s(ow0, sp.strides[1] as i64);
    let iw0 = b.ins().iadd_imm_s(iw0, -(sp.pads[1] as i64));
    let span = (s.width - 1) * sp.strides[1] + (sp.kernel[1] - 1) * sp.dilations[1];
    let last_iw = b.ins().iadd_imm_s(iw0, span as i64);
    let cols_in = below(b, last_iw, sp.input[1]);
    let cols_from = b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, iw0, 0);
    for ok in [rows_in, rows_from, cols_in, cols_from] {
        inside = b.ins().band(inside, ok);
    }
    Some((inside, ih0, iw0))
}

/// The whole panel of a shallow 2-D convolution whose taps all read inside the input
/// (`interior_origin`), unrolled: every (tap, channel, quad) is one load (stride 2:
/// two loads and a shuffle) and one store at offsets known at compile time.
fn emit_interior_panel(b: &mut FunctionBuilder, s: &PackShape, x_group: Value, ih0: Value, iw0: Value, dst: Value) {
    let sp = s.spatial;
    let in_w = sp.input[1];
    let origin = b.ins().imul_imm_s(ih0, in_w as i64);
    let origin = b.ins().iadd(origin, iw0);
    let base = scaled(b, x_group, origin, F32_BYTES);
    let (kh, kw) = (sp.kernel[0], sp.kernel[1]);
    let stride = sp.strides[1];
    for ky in 0..kh {
        for kx in 0..kw {
            let tap = ky * kw + kx;
            let tap_offset = ky * sp.dilations[0] * in_w + kx * sp.dilations[1];
            for ic in 0..s.channels {
                let row = tap * s.channels + ic;
                let src_row = (ic * s.in_plane + tap_offset) as i64;
                for q in 0..s.width / LANES {
                    let src = (src_row + (q * LANES * stride) as i64) * F32_BYTES;
                    let v = load_f32x4_strided(b, vector_flags(), base, src, stride);
                    let at = ((row * s.width + q * LANES) as i64 * F32_BYTES) as i32;
                    b.ins().store(vector_flags(), v, dst, at);
                }
            }
        }
    }
}

/// `emit_pack_panel` for any panel: per tap, quad by quad.
fn emit_pack_panel_general(
    b: &mut FunctionBuilder,
    s: &PackShape,
    x_group: Value,
    p0: Value,
    k0: Value,
    kc: Value,
    dst: Value,
) {
    let sp = s.spatial;
    let rank = sp.output.len();
    let last = rank - 1;
    let row_len = sp.output[last];
    let in_strides = cnnc_ir::strides(&sp.input);
    let plane_bytes = s.in_plane as i64 * F32_BYTES;
    let row_bytes = s.width as i64 * F32_BYTES;
    let quads: Vec<Quad> = (0..s.width / LANES)
        .map(|q| {
            let first = b.ins().iadd_imm_s(p0, (q * LANES) as i64);
            let coords = unflatten(b, first, &sp.output);
            let one_row = if row_len >= LANES {
                b.ins()
                    .icmp_imm_u(IntCC::UnsignedLessThanOrEqual, coords[last], (row_len - LANES) as i64)
            } else {
                b.ins().iconst(I8, 0)
            };
            let origin = (0..rank)
                .map(|a| {
                    let scaled_out = b.ins().imul_imm_s(coords[a], sp.strides[a] as i64);
                    b.ins().iadd_imm_s(scaled_out, -(sp.pads[a] as i64))
                })
                .collect();
            Quad { one_row, origin }
        })
        .collect();
    let lanes: Vec<Lane> = (0..s.width)
        .map(|lane| {
            let position = b.ins().iadd_imm_s(p0, lane as i64);
            let valid = below(b, position, s.positions);
            let coords = unflatten(b, position, &sp.output);
            let origin = (0..rank)
                .map(|a| {
                    let scaled_out = b.ins().imul_imm_s(coords[a], sp.strides[a] as i64);
                    b.ins().iadd_imm_s(scaled_out, -(sp.pads[a] as i64))
                })
                .collect();
            Lane { valid, origin }
        })
        .collect();

    let channels = s.channels as i64;
    let first_tap = b.ins().udiv_imm_u(k0, channels);
    let k_end = b.ins().iadd(k0, kc);
    let last_k = b.ins().iadd_imm_s(k_end, -1);
    let last_tap = b.ins().udiv_imm_u(last_k, channels);
    let tap_end = b.ins().iadd_imm_s(last_tap, 1);
    super::for_range(b, first_tap, tap_end, |b, tap| {
        let kernel_coords = unflatten(b, tap, &sp.kernel);
        let tap_offset: Vec<Value> = (0..rank)
            .map(|a| b.ins().imul_imm_s(kernel_coords[a], sp.dilations[a] as i64))
            .collect();
        // The channels of this tap inside k0..k_end.
        let tap_k = b.ins().imul_imm_s(tap, channels);
        let zero = int(b, 0);
        let from_start = b.ins().isub(k0, tap_k);
        let ic_lo = b.ins().smax(from_start, zero);
        let to_end = b.ins().isub(k_end, tap_k);
        let all = int(b, channels);
        let ic_hi = b.ins().smin(to_end, all);
        let count = b.ins().isub(ic_hi, ic_lo);
        let row_index = b.ins().iadd(tap_k, ic_lo);
        let row_index = b.ins().isub(row_index, k0);
        let dst_tap = scaled(b, dst, row_index, row_bytes);
        let src_tap = scaled(b, x_group, ic_lo, plane_bytes);

        // Per quad: regular? and where it reads.
        let mut regular = Vec::new();
        let mut sources = Vec::new();
        for quad in &quads {
            let coords: Vec<Value> = (0..rank).map(|a| b.ins().iadd(quad.origin[a], tap_offset[a])).collect();
            let mut ok = quad.one_row;
            for (&c, &extent) in coords.iter().zip(&sp.input) {
                let inside = below(b, c, extent);
                ok = b.ins().band(ok, inside);
            }
            let far_end = b.ins().iadd_imm_s(coords[last], (3 * sp.strides[last]) as i64);
            let far_inside = below(b, far_end, sp.input[last]);
            ok = b.ins().band(ok, far_inside);
            regular.push(ok);
            sources.push(element_address(b, src_tap, &coords, &in_strides));
        }
        // Positions past the last whole quad go one by one.
        for (lane, at) in lanes.iter().enumerate().skip(quads.len() * LANES) {
            let dst_lane = b.ins().iadd_imm_s(dst_tap, (lane * 4) as i64);
            emit_position(b, s, at, &tap_offset, src_tap, dst_lane, count, &in_strides);
        }
        let Some(&first_regular) = regular.first() else {
            return;
        };
        let mut all_regular = first_regular;
        for &r in &regular[1..] {
            all_regular = b.ins().band(all_regular, r);
        }
        let every_quad = b.create_block();
        let quad_by_quad = b.create_block();
        let done = b.create_block();
        b.ins().brif(all_regular, every_quad, &[], quad_by_quad, &[]);

        b.switch_to_block(every_quad);
        b.seal_block(every_quad);
        let mut carried = sources.clone();
        carried.push(dst_tap);
        repeat(b, count, &carried, |b, ptrs| {
            let (srcs, dst) = ptrs.split_at(ptrs.len() - 1);
            let mut next = Vec::with_capacity(ptrs.len());
            for (q, &src) in srcs.iter().enumerate() {
                let v = load_f32x4_strided(b, vector_flags(), src, 0, sp.strides[last]);
                b.ins().store(vector_flags(), v, dst[0], (q * LANES * 4) as i32);
                next.push(b.ins().iadd_imm_s(src, plane_bytes));
            }
            next.push(b.ins().iadd_imm_s(dst[0], row_bytes));
            next
        });
        b.ins().jump(done, &[]);

        b.switch_to_block(quad_by_quad);
        b.seal_block(quad_by_quad);
        for q in 0..quads.len() {
            let fast = b.create_block();
            let slow = b.create_block();
            let quad_done = b.create_block();
            let dst_quad = b.ins().iadd_imm_s(dst_tap, (q * LANES * 4) as i64);
            b.ins().brif(regular[q], fast, &[], slow, &[]);

            b.switch_to_block(fast);
            b.seal_block(fast);
            repeat(b, count, &[sources[q], dst_quad], |b, ptrs| {
                let v = load_f32x4_strided(b, vector_flags(), ptrs[0], 0, sp.strides[last]);
                b.ins().store(vector_flags(), v, ptrs[1], 0);
                vec![
                    b.ins().iadd_imm_s(ptrs[0], plane_bytes),
                    b.ins().iadd_imm_s(ptrs[1], row_bytes),
                ]
            });
            b.ins().jump(quad_done, &[]);

            b.switch_to_block(slow);
            b.seal_block(slow);
            for lane in 0..LANES {
                let dst_lane = b.ins().iadd_imm_s(dst_quad, (lane * 4) as i64);
                emit_position(
                    b,
                    s,
                    &lanes[q * LANES + lane],
                    &tap_offset,
                    src_tap,
                    dst_lane,
                    count,
                    &in_strides,
                );
            }
            b.ins().jump(quad_done, &[]);

            b.switch_to_block(quad_done);
            b.seal_block(quad_done);
        }
        b.ins().jump(done, &[]);

        b.switch_to_block(done);
        b.seal_block(done);
    });
}

/// `base + Σ coords[a]·strides[a]` floats.
fn element_address(b: &mut FunctionBuilder, base: Value, coords: &[Value], strides: &[usize]) -> Value {
    let mut offset = int(b, 0);
    for (&c, &stride) in coords.iter().zip(strides) {
        let term = b.ins().imul_imm_s(c, stride as i64);
        offset = b.ins().iadd(offset, term);
    }
    scaled(b, base, offset, F32_BYTES)
}

/// One position of an irregular quad: `count` channel rows of its column, read from
/// the input or zero (padding, or a position past the last).
#[allow(clippy::too_many_arguments)]
fn emit_position(
    b: &mut FunctionBuilder,
    s: &PackShape,
    lane: &Lane,
    tap_offset: &[Value],
    src_tap: Value,
    dst: Value,
    count: Value,
    in_strides: &[usize],
) {
    let sp = s.spatial;
    let mut inside = lane.valid;
    let mut coords = Vec::with_capacity(lane.origin.len());
    for (a, &origin) in lane.origin.iter().enumerate() {
        let c = b.ins().iadd(origin, tap_offset[a]);
        let ok = below(b, c, sp.input[a]);
        inside = b.ins().band(inside, ok);
        coords.push(c);
    }
    let plane_bytes = s.in_plane as i64 * F32_BYTES;
    let row_bytes = s.width as i64 * F32_BYTES;
    let copy = b.create_block();
    let zero = b.create_block();
    let done = b.create_block();
    b.ins().brif(inside, copy, &[], zero, &[]);

    b.switch_to_block(copy);
    b.seal_block(copy);
    let src = element_address(b, src_tap, &coords, in_strides);
    repeat(b, count, &[src, dst], |b, ptrs| {
        let v = b.ins().load(F32, scalar_flags(), ptrs[0], 0);
        b.ins().store(scalar_flags(), v, ptrs[1], 0);
        vec![
            b.ins().iadd_imm_s(ptrs[0], plane_bytes),
            b.ins().iadd_imm_s(ptrs[1], row_bytes),
        ]
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(zero);
    b.seal_block(zero);
    let z = b.ins().f32const(0.0);
    repeat(b, count, &[dst], |b, ptrs| {
        b.ins().store(MemFlagsData::trusted(), z, ptrs[0], 0);
        vec![b.ins().iadd_imm_s(ptrs[0], row_bytes)]
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(done);
    b.seal_block(done);
}

/// Whether `emit_pack_block` can copy the input as it lies: a 1x1 convolution without
/// stride or padding (collapsed to one flat axis), whose input `[C, P]` already is the
/// K x N matrix, with panels of whole quads.
pub fn is_flat(s: &PackShape) -> bool {
    let sp = s.spatial;
    sp.output.len() == 1
        && sp.kernel == [1]
        && sp.strides == [1]
        && sp.pads == [0]
        && sp.input == sp.output
        && s.width.is_multiple_of(LANES)
}

/// Packs `p_panels` consecutive panels (`panel_bytes` apart from `dst`) for positions from
/// `p_start` and reduction indices `k0..k0 + kc`. For flat convolutions (`is_flat`) the
/// copy runs channel by channel: each reduction row is one sequential read of the input
/// plane (one prefetch stream; panel by panel it would be `kc` streams at once), its
/// `width`-float pieces scattered to the panels, which stay in L2. A last panel that
/// runs past the positions goes through `emit_pack_panel` (zero filling). Other
/// convolutions pack panel by panel.
#[allow(clippy::too_many_arguments)]
pub fn emit_pack_block(
    b: &mut FunctionBuilder,
    s: &PackShape,
    x_group: Value,
    p_start: Value,
    p_panels: Value,
    k0: Value,
    kc: Value,
    dst: Value,
    panel_bytes: i64,
) {
    let width = s.width as i64;
    if !is_flat(s) {
        let zero = int(b, 0);
        super::for_range(b, zero, p_panels, |b, pp| {
            let p0 = b.ins().imul_imm_s(pp, width);
            let p0 = b.ins().iadd(p_start, p0);
            let panel = scaled(b, dst, pp, panel_bytes);
            emit_pack_panel(b, s, x_group, p0, k0, kc, panel);
        });
        return;
    }
    // Panels wholly inside the positions (p_start < positions: blocks are never empty).
    let all_positions = int(b, s.positions as i64);
    let left = b.ins().isub(all_positions, p_start);
    let whole = b.ins().udiv_imm_u(left, width);
    let whole = b.ins().umin(whole, p_panels);

    let plane_bytes = s.in_plane as i64 * F32_BYTES;
    let row_bytes = width * F32_BYTES;
    let first_row = b.ins().imul_imm_s(k0, plane_bytes);
    let src = b.ins().iadd(x_group, first_row);
    let src = scaled(b, src, p_start, F32_BYTES);
    repeat(b, kc, &[src, dst], |b, rows| {
        repeat(b, whole, rows, |b, ptrs| {
            let values: Vec<Value> = (0..s.width / LANES)
                .map(|q| {
                    b.ins()
                        .load(F32X4, vector_flags(), ptrs[0], (q * LANES) as i32 * F32_BYTES as i32)
                })
                .collect();
            for (q, v) in values.into_iter().enumerate() {
                b.ins()
                    .store(vector_flags(), v, ptrs[1], (q * LANES) as i32 * F32_BYTES as i32);
            }
            vec![
                b.ins().iadd_imm_s(ptrs[0], row_bytes),
                b.ins().iadd_imm_s(ptrs[1], panel_bytes),
            ]
        });
        vec![
            b.ins().iadd_imm_s(rows[0], plane_bytes),
            b.ins().iadd_imm_s(rows[1], row_bytes),
        ]
    });

    emit_pack_ragged_panel(b, s, x_group, p_start, p_panels, k0, kc, dst, panel_bytes);
}

/// For B read in place (`ConvGemmPlan::in_place_b`: flat convolutions, whose whole
/// panels the microkernel reads from the input rows): packs only the block's last panel
/// when it runs past the positions (zero-filled), at its place among the `p_panels`
/// panels from `dst`; nothing otherwise.
#[allow(clippy::too_many_arguments)]
pub fn emit_pack_ragged_panel(
    b: &mut FunctionBuilder,
    s: &PackShape,
    x_group: Value,
    p_start: Value,
    p_panels: Value,
    k0: Value,
    kc: Value,
    dst: Value,
    panel_bytes: i64,
) {
    if s.positions.is_multiple_of(s.width) {
        return;
    }
    let width = s.width as i64;
    let all_positions = int(b, s.positions as i64);
    let left = b.ins().isub(all_positions, p_start);
    let whole = b.ins().udiv_imm_u(left, width);
    let tail = b.create_block();
    let done = b.create_block();
    let ragged = b.ins().icmp(IntCC::UnsignedLessThan, whole, p_panels);
    b.ins().brif(ragged, tail, &[], done, &[]);
    b.switch_to_block(tail);
    b.seal_block(tail);
    let p0 = b.ins().imul_imm_s(whole, width);
    let p0 = b.ins().iadd(p_start, p0);
    let panel = scaled(b, dst, whole, panel_bytes);
    emit_pack_panel(b, s, x_group, p0, k0, kc, panel);
    b.ins().jump(done, &[]);
    b.switch_to_block(done);
    b.seal_block(done);
}

/// Packs weights computed at run time, `w` in the ONNX layout `[M, C/g, *k]`, into `dst`
/// (`ConvGemmPlan::packed_weight_bytes`) in the layout `ConvGemmPlan::pack_weights` gives
/// constant weights: `[group][panel][kk][channel_tile]`, `kk = tap · C/g + ic`, channels
/// past the group's last zero. Source rows (one output channel, one input channel: its
/// taps) are read in order. Whole panels of a width that is a multiple of 4 (or 4q + 2,
/// the last two channels then as pairs of one 8-byte store per tap) go 4 taps x
/// 4 channels at a time (a 4x4 transpose in registers, so each store writes 4 channels
/// of one `kk`: the scattered single-float stores otherwise dominate, as in
/// weight-gradient convolutions with thousands of taps); other channels one by one.
pub fn emit_pack_weights(b: &mut FunctionBuilder, plan: &ConvGemmPlan, w: Value, dst: Value) {
    if super::pack_rows::emit_pack_one_tap_weights(b, plan, w, dst) {
        return;
    }
    let width = plan.channel_tile();
    let (channels, taps, depth) = (plan.in_channels, plan.taps, plan.depth);
    let out_channels = plan.out_channels;
    let kk_bytes = width as i64 * F32_BYTES;
    let panel_bytes = depth as i64 * kk_bytes;
    let group_bytes = plan.panels() as i64 * panel_bytes;
    let tap_bytes = channels as i64 * kk_bytes;
    let row_bytes = (channels * taps) as i64 * F32_BYTES;
    // (Immediate offsets reach `width` rows down.)
    let offsets_fit = width as i64 * row_bytes <= i64::from(i32::MAX);
    // A width of 4q + 2 (the AVX2 kernel's 6 rows) takes its last two channels as pairs.
    let pair_row = (width % LANES == 2).then_some(width - 2);
    let vector_panels = if (width.is_multiple_of(LANES) || pair_row.is_some()) && taps >= LANES && offsets_fit {
        out_channels / width
    } else {
        0
    };
    counted_loop(b, plan.groups, vec![], |b, group, _| {
        let group_dst = scaled(b, dst, group, group_bytes);
        let group_src = scaled(b, w, group, out_channels as i64 * row_bytes);
        counted_loop(b, vector_panels, vec![], |b, panel, _| {
            let panel_src = scaled(b, group_src, panel, width as i64 * row_bytes);
            let panel_dst = scaled(b, group_dst, panel, panel_bytes);
            counted_loop(b, channels, vec![], |b, ic, _| {
                let src = scaled(b, panel_src, ic, taps as i64 * F32_BYTES);
                let column = scaled(b, panel_dst, ic, kk_bytes);
                let after = counted_loop(b, taps / LANES, vec![src, column], |b, _, at| {
                    for quad in 0..width / LANES {
                        let rows: Vec<Value> = (0..LANES)
                            .map(|r| {
                                let offset = ((quad * LANES + r) as i64 * row_bytes) as i32;
                                b.ins().load(F32X4, vector_flags(), at[0], offset)
                            })
                            .collect();
                        for (t, by_channel) in transpose4(b, &rows).into_iter().enumerate() {
                            let offset = (t as i64 * tap_bytes + (quad * LANES) as i64 * F32_BYTES) as i32;
                            b.ins().store(vector_flags(), by_channel, at[1], offset);
                        }
                    }
                    if let Some(r) = pair_row {
                        let load_row = |b: &mut FunctionBuilder, r: usize| {
                            b.ins().load(F32X4, vector_flags(), at[0], (r as i64 * row_bytes) as i32)
                        };
                        let (first, second) = (load_row(b, r), load_row(b, r + 1));
                        // (first[t], second[t]) for taps t = 0, 1 and then 2, 3.
                        let low = shuffle_f32x4(b, first, second, [0, 4, 1, 5]);
                        let high = shuffle_f32x4(b, first, second, [2, 6, 3, 7]);
                        let flags = MemFlagsData::new().with_endianness(Endianness::Little);
                        for (half, v) in [low, high].into_iter().enumerate() {
                            let pairs = b.ins().bitcast(F64X2, flags, v);
                            for lane in 0..2 {
                                let pair = b.ins().extractlane(pairs, lane as u8);
                                let t = 2 * half + lane;
                                let offset = (t as i64 * tap_bytes + r as i64 * F32_BYTES) as i32;
                                b.ins().store(MemFlagsData::trusted(), pair, at[1], offset);
                            }
                        }
                    }
                    vec![
                        b.ins().iadd_imm_s(at[0], LANES as i64 * F32_BYTES),
                        b.ins().iadd_imm_s(at[1], LANES as i64 * tap_bytes),
                    ]
                });
                // The taps past the last quad.
                for t in 0..taps % LANES {
                    for r in 0..width {
                        let v = b.ins().load(
                            F32,
                            scalar_flags(),
                            after[0],
                            (r as i64 * row_bytes + t as i64 * 4) as i32,
                        );
                        let offset = (t as i64 * tap_bytes + r as i64 * F32_BYTES) as i32;
                        b.ins().store(MemFlagsData::trusted(), v, after[1], offset);
                    }
                }
                vec![]
            });
            vec![]
        });
        let first = vector_panels * width;
        let src = scaled_const(b, group_src, first as i64 * row_bytes);
        counted_loop(b, out_channels - first, vec![src], |b, index, carried| {
            let oc = b.ins().iadd_imm_s(index, first as i64);
            let panel = b.ins().udiv_imm_u(oc, width as i64);
            let row = b.ins().urem_imm_u(oc, width as i64);
            let column = scaled(b, group_dst, panel, panel_bytes);
            let column = scaled(b, column, row, F32_BYTES);
            let after = counted_loop(b, channels, vec![carried[0], column], |b, _, ptrs| {
                let after_taps = counted_loop(b, taps, vec![ptrs[0], ptrs[1]], |b, _, at| {
                    let v = b.ins().load(F32, scalar_flags(), at[0], 0);
                    b.ins().store(MemFlagsData::trusted(), v, at[1], 0);
                    vec![
                        b.ins().iadd_imm_s(at[0], F32_BYTES),
                        b.ins().iadd_imm_s(at[1], tap_bytes),
                    ]
                });
                vec![after_taps[0], b.ins().iadd_imm_s(ptrs[1], kk_bytes)]
            });
            vec![after[0]]
        });
        let used = out_channels % width;
        if used != 0 {
            let last_panel = b.ins().iadd_imm_s(group_dst, (plan.panels() as i64 - 1) * panel_bytes);
            let zero = b.ins().f32const(0.0);
            counted_loop(b, depth, vec![last_panel], |b, _, at| {
                for r in used..width {
                    b.ins().store(MemFlagsData::trusted(), zero, at[0], (r * 4) as i32);
                }
                vec![b.ins().iadd_imm_s(at[0], kk_bytes)]
            });
        }
        vec![]
    });
}

/// `ptr + bytes` for a compile-time byte offset.
fn scaled_const(b: &mut FunctionBuilder, ptr: Value, bytes: i64) -> Value {
    if bytes == 0 {
        ptr
    } else {
        b.ins().iadd_imm_s(ptr, bytes)
    }
}

