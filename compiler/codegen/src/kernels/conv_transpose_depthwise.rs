//! Depthwise stride-2 transposed convolution, 2-D, f32 (the input gradient of
//! MobileNet's and EfficientNet's strided depthwise layers), in gather form by phases.
//!
//! With stride 2, an output column of parity r gets exactly the taps kx ≡ r + pad (mod 2),
//! from input column i + (r + pad − kx)/2 where the output is 2i + r; rows likewise. So per
//! output row of parity r and 4 consecutive i, the even and the odd outputs are each a short
//! sum of per-tap weights times unaligned 4-wide loads of the input rows, then interleaved
//! (unpack low/high) into 8 consecutive outputs and stored once. The scatter form
//! (`conv_transpose.rs`) re-read and re-wrote every output once per tap through strided
//! scalar lanes. Each input plane is first copied into a zero-margined buffer on the stack
//! (margins zeroed once), so no load needs a bounds test.

use std::collections::HashMap;

use cnnc_ir::{DType, Graph, Layout, Node, Op};
use cranelift_codegen::ir::{
    InstBuilder, StackSlotData, StackSlotKind, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, load, offset_ptr, scalar_flags, shuffle_f32x4, splat_f32, store, tiled_loop,
    vector_flags,
};

/// Largest padded plane copied to the stack.
const MAX_PADDED_BYTES: usize = 128 * 1024;
/// Outputs per group: 4 inputs' even and odd outputs.
const GROUP: usize = 2 * LANES;

/// One node's geometry, all compile-time constants.
#[derive(Clone, Debug)]
pub struct StridedDepthwise {
    batch: usize,
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    k_h: usize,
    k_w: usize,
    /// Per output parity: (tap, input offset d) with input index = output index / 2 + d.
    row_taps: [Vec<(usize, isize)>; 2],
    col_taps: [Vec<(usize, isize)>; 2],
    top: usize,
    left: usize,
    padded_h: usize,
    padded_w: usize,
}

fn phase_taps(kernel: usize, pad: usize) -> [Vec<(usize, isize)>; 2] {
    std::array::from_fn(|r| {
        (0..kernel)
            .filter(|&k| (r as isize + pad as isize - k as isize).rem_euclid(2) == 0)
            .map(|k| (k, (r as isize + pad as isize - k as isize) / 2))
            .collect()
    })
}

/// (margin before, padded extent) of one axis: `count` output positions per parity read
/// input `j + d` for `j < count`, `d` over the taps; the copy holds all `input` positions.
fn padded_axis(taps: &[Vec<(usize, isize)>; 2], count: usize, input: usize) -> (usize, usize) {
    let ds = taps.iter().flatten().map(|&(_, d)| d);
    let (low, high) = ds.fold((0isize, 0isize), |(lo, hi), d| (lo.min(d), hi.max(d)));
    let before = (-low) as usize;
    let reach = (count as isize + high).max(input as isize) as usize;
    (before, before + reach)
}

impl StridedDepthwise {
    /// The plan of a depthwise (one channel per group), stride-2, undilated 2-D f32
    /// ConvTranspose in plain layout whose padded plane fits the stack budget.
    pub fn of_node(g: &Graph, node: &Node) -> Option<StridedDepthwise> {
        let Op::ConvTranspose(geometry) = &node.op else { return None };
        if node.schedule.layout_in != Layout::Plain || node.schedule.layout_out != Layout::Plain {
            return None;
        }
        let op_inputs = cnnc_ir::verify::op_input_count(node);
        if !(2..=3).contains(&op_inputs) || node.inputs.len() < op_inputs || node.outputs.len() != 1 {
            return None;
        }
        let (x, w, y) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        if [x.dtype, w.dtype, y.dtype] != [DType::F32; 3] || x.rank() != 4 || w.rank() != 4 || y.rank() != 4 {
            return None;
        }
        if op_inputs == 3 && g.ty(node.inputs[2]).dtype != DType::F32 {
            return None;
        }
        let channels = x.shape[1];
        let depthwise = geometry.groups == channels && w.shape[0] == channels && w.shape[1] == 1 && y.shape[1] == channels;
        if !depthwise || geometry.strides != [2, 2] || geometry.dilations != [1, 1] || geometry.pads_begin.len() != 2 {
            return None;
        }
        if x.shape.contains(&0) || y.shape.contains(&0) || w.shape.contains(&0) || y.shape[0] != x.shape[0] {
            return None;
        }
        let (out_h, out_w) = (y.shape[2], y.shape[3]);
        let row_taps = phase_taps(w.shape[2], geometry.pads_begin[0]);
        let col_taps = phase_taps(w.shape[3], geometry.pads_begin[1]);
        let (top, padded_h) = padded_axis(&row_taps, out_h.div_ceil(2), x.shape[2]);
        let (left, padded_w) = padded_axis(&col_taps, out_w.div_ceil(GROUP) * LANES + LANES, x.shape[3]);
        if padded_h * padded_w * 4 > MAX_PADDED_BYTES {
            return None;
        }
        Some(StridedDepthwise {
            batch: x.shape[0],
            channels,
            in_h: x.shape[2],
            in_w: x.shape[3],
            out_h,
            out_w,
            k_h: w.shape[2],
            k_w: w.shape[3],
            row_taps,
            col_taps,
            top,
            left,
            padded_h,
            padded_w,
        })
    }

    fn bytes(elements: usize) -> i64 {
        elements as i64 * F32_BYTES
    }

    pub fn emit(&self, b: &mut FunctionBuilder, x: Value, w: Value, bias: Option<Value>, y: Value) {
        let padded_bytes = self.padded_h * self.padded_w * 4;
        let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, padded_bytes as u32, 4));
        let pad = b.ins().stack_addr(I64, slot, 0);
        let zero = splat_f32(b, 0.0);
        let zero_scalar = b.ins().f32const(0.0);
        let (tail, rest) = tiled_loop(b, padded_bytes / 4, LANES, vec![pad], |b, _, p| {
            store(b, vector_flags(), zero, p[0], 0);
            vec![b.ins().iadd_imm_s(p[0], Self::bytes(LANES))]
        });
        counted_loop(b, rest, tail, |b, _, p| {
            store(b, scalar_flags(), zero_scalar, p[0], 0);
            vec![b.ins().iadd_imm_s(p[0], F32_BYTES)]
        });
        let in_plane = self.in_h * self.in_w;
        let out_plane = self.out_h * self.out_w;
        let taps = self.k_h * self.k_w;
        let interior = offset_ptr(b, pad, Self::bytes(self.top * self.padded_w + self.left));
        counted_loop(b, self.batch * self.channels, vec![], |b, plane, _| {
            let x_plane = index_ptr(b, x, plane, Self::bytes(in_plane));
            let y_plane = index_ptr(b, y, plane, Self::bytes(out_plane));
            let channel = b.ins().urem_imm_u(plane, self.channels as i64);
            self.emit_copy(b, x_plane, interior);
            let w_channel = index_ptr(b, w, channel, Self::bytes(taps));
            let weights: Vec<Value> = (0..taps)
                .map(|t| {
                    let s = load(b, F32, scalar_flags(), w_channel, Self::bytes(t));
                    b.ins().splat(F32X4, s)
                })
                .collect();
            let init = match bias {
                Some(p) => {
                    let at = index_ptr(b, p, channel, F32_BYTES);
                    let s = load(b, F32, scalar_flags(), at, 0);
                    b.ins().splat(F32X4, s)
                }
                None => splat_f32(b, 0.0),
            };
            let pairs = self.out_h / 2;
            counted_loop(b, pairs, vec![], |b, j, _| {
                for parity in 0..2 {
                    self.emit_row(b, interior, y_plane, j, parity, &weights, init);
                }
                vec![]
            });
            if self.out_h % 2 == 1 {
                let j = b.ins().iconst(I64, pairs as i64);
                self.emit_row(b, interior, y_plane, j, 0, &weights, init);
            }
            vec![]
        });
    }

    /// The input plane into the padded buffer's interior (its margins stay zero).
    fn emit_copy(&self, b: &mut FunctionBuilder, x_plane: Value, interior: Value) {
        counted_loop(b, self.in_h, vec![x_plane, interior], |b, _, rows| {
            let (at, rest) = tiled_loop(b, self.in_w, LANES, rows.to_vec(), |b, _, c| {
                let v = load(b, F32X4, vector_flags(), c[0], 0);
                store(b, vector_flags(), v, c[1], 0);
                vec![b.ins().iadd_imm_s(c[0], Self::bytes(LANES)), b.ins().iadd_imm_s(c[1], Self::bytes(LANES))]
            });
            counted_loop(b, rest, at, |b, _, c| {
                let v = load(b, F32, scalar_flags(), c[0], 0);
                store(b, scalar_flags(), v, c[1], 0);
                vec![b.ins().iadd_imm_s(c[0], F32_BYTES), b.ins().iadd_imm_s(c[1], F32_BYTES)]
            });
            vec![
                b.ins().iadd_imm_s(rows[0], Self::bytes(self.in_w)),
                b.ins().iadd_imm_s(rows[1], Self::bytes(self.padded_w)),
            ]
        });
    }

    /// Output row 2j + parity.
    #[allow(clippy::too_many_arguments)]
    fn emit_row(
        &self,
        b: &mut FunctionBuilder,
        interior: Value,
        y_plane: Value,
        j: Value,
        parity: usize,
        weights: &[Value],
        init: Value,
    ) {
        let input_row = index_ptr(b, interior, j, Self::bytes(self.padded_w));
        let out_row = b.ins().imul_imm_s(j, 2);
        let out_row = b.ins().iadd_imm_s(out_row, parity as i64);
        let out_row = index_ptr(b, y_plane, out_row, Self::bytes(self.out_w));
        let groups = self.out_w / GROUP;
        let (cursors, _) = tiled_loop(b, groups * GROUP, GROUP, vec![input_row, out_row], |b, _, c| {
            let (low, high) = self.emit_group(b, c[0], parity, weights, init);
            store(b, vector_flags(), low, c[1], 0);
            store(b, vector_flags(), high, c[1], Self::bytes(LANES));
            vec![b.ins().iadd_imm_s(c[0], Self::bytes(LANES)), b.ins().iadd_imm_s(c[1], Self::bytes(GROUP))]
        });
        let rest = self.out_w % GROUP;
        if rest > 0 {
            let (low, high) = self.emit_group(b, cursors[0], parity, weights, init);
            for e in 0..rest {
                let v = if e < LANES { low } else { high };
                let s = b.ins().extractlane(v, (e % LANES) as u8);
                store(b, scalar_flags(), s, cursors[1], Self::bytes(e));
            }
        }
    }

    /// Outputs 2i .. 2i + 8 of one row for the 4 inputs from `input` (column i of row j in
    /// the padded plane): the even and the odd sums, interleaved.
    fn emit_group(&self, b: &mut FunctionBuilder, input: Value, parity: usize, weights: &[Value], init: Value) -> (Value, Value) {
        let fused = crate::math::fused_multiply_add();
        let mut loaded: HashMap<(isize, isize), Value> = HashMap::new();
        let mut phase = |b: &mut FunctionBuilder, col_parity: usize| {
            let mut acc = init;
            for &(ky, dr) in &self.row_taps[parity] {
                for &(kx, dc) in &self.col_taps[col_parity] {
                    let v = *loaded.entry((dr, dc)).or_insert_with(|| {
                        let offset = dr as i64 * Self::bytes(self.padded_w) + dc as i64 * F32_BYTES;
                        load(b, F32X4, vector_flags(), input, offset)
                    });
                    let wv = weights[ky * self.k_w + kx];
                    acc = if fused {
                        b.ins().fma(v, wv, acc)
                    } else {
                        let p = b.ins().fmul(v, wv);
                        b.ins().fadd(acc, p)
                    };
                }
            }
            acc
        };
        let even = phase(b, 0);
        let odd = phase(b, 1);
        (shuffle_f32x4(b, even, odd, [0, 4, 1, 5]), shuffle_f32x4(b, even, odd, [2, 6, 3, 7]))
    }
}
