//! The weight gradient (`Op::ConvWeightGrad`) of a depthwise stride-2 2-D convolution
//! (MobileNet's and EfficientNet's downsampling layers), f32.
//!
//! dw[c, ky, kx] = Σ_n Σ_{oy, ox} dy[n, c, oy, ox]·x[n, c, 2oy − p + ky, 2ox − p + kx]:
//! along a row, tap kx reads every other column of x, which `conv_weight_grad.rs` gathers
//! lane by lane. Here each plane of x is first split into its even and odd columns (two
//! shuffles per 8 inputs) in a zero-margined buffer on the stack, so that tap kx is one
//! contiguous, unaligned 4-wide load at column ox + ⌊(kx − p)/2⌋ of the even or odd half,
//! and rows outside x are zero rows: per tap row and output row, one load of dy feeds
//! `k_w` multiply-adds into per-tap accumulators, with no bounds tests.

use cnnc_ir::{DType, Graph, Layout, Node, Op, Scalar};
use cranelift_codegen::ir::{
    InstBuilder, StackSlotData, StackSlotKind, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, load, offset_ptr, scalar_flags, shuffle_f32x4, splat_f32, store, tiled_loop,
    vector_flags,
};
use super::movement::emit_fill;
use super::{CodegenError, KernelCtx};

/// Largest split plane copied to the stack.
const MAX_SPLIT_BYTES: usize = 128 * 1024;
/// Widest kernel row (one accumulator per tap of a row).
const MAX_KERNEL_WIDTH: usize = 7;

/// One node's geometry, all compile-time constants.
#[derive(Clone, Debug)]
pub struct StridedDepthwiseWeightGrad {
    planes: usize,
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    k_h: usize,
    k_w: usize,
    pad_h: usize,
    /// Per tap column: (odd half, column shift) with x column 2·ox − p + kx at half
    /// column ox + shift.
    taps: Vec<(bool, isize)>,
    /// Split row: even half then odd half, `half_w` floats each, `left` zeros before.
    left: usize,
    half_w: usize,
    padded_h: usize,
}

impl StridedDepthwiseWeightGrad {
    pub fn of_node(g: &Graph, node: &Node) -> Option<StridedDepthwiseWeightGrad> {
        let Op::ConvWeightGrad(geometry) = &node.op else { return None };
        if node.inputs.len() != 2 || node.outputs.len() != 1 || !node.epilogue.is_empty() {
            return None;
        }
        if node.schedule.layout_in != Layout::Plain || node.schedule.layout_out != Layout::Plain {
            return None;
        }
        let (x, dy, dw) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        if [x.dtype, dy.dtype, dw.dtype] != [DType::F32; 3] || x.rank() != 4 || dy.rank() != 4 || dw.rank() != 4 {
            return None;
        }
        let channels = x.shape[1];
        let depthwise = geometry.groups == channels && dy.shape[1] == channels && dw.shape[0] == channels && dw.shape[1] == 1;
        if !depthwise || geometry.strides != [2, 2] || geometry.dilations != [1, 1] || geometry.pads_begin.len() != 2 {
            return None;
        }
        if x.shape.contains(&0) || dy.shape.contains(&0) || dw.shape.contains(&0) || x.shape[0] != dy.shape[0] {
            return None;
        }
        let (k_h, k_w) = (dw.shape[2], dw.shape[3]);
        let (pad_h, pad_w) = (geometry.pads_begin[0], geometry.pads_begin[1]);
        if k_w > MAX_KERNEL_WIDTH {
            return None;
        }
        let (in_h, in_w, out_h, out_w) = (x.shape[2], x.shape[3], dy.shape[2], dy.shape[3]);
        let taps: Vec<(bool, isize)> = (0..k_w)
            .map(|kx| {
                let q = kx as isize - pad_w as isize;
                (q.rem_euclid(2) == 1, q.div_euclid(2))
            })
            .collect();
        let lowest = taps.iter().map(|t| t.1).min().unwrap_or(0);
        let highest = taps.iter().map(|t| t.1).max().unwrap_or(0);
        let left = (-lowest).max(0) as usize;
        // Columns read: ox + shift for ox < out_w rounded up to whole vectors.
        let reach = (out_w.div_ceil(LANES) * LANES) as isize + highest;
        let half_w = left + (reach.max(in_w.div_ceil(2) as isize)) as usize;
        // Split rows iy + pad_h for the x rows iy = 2·oy − pad_h + ky the taps read.
        let padded_h = (2 * (out_h - 1) + k_h).max(pad_h + in_h);
        if padded_h * 2 * half_w * 4 > MAX_SPLIT_BYTES {
            return None;
        }
        Some(StridedDepthwiseWeightGrad {
            planes: x.shape[0] * channels,
            channels,
            in_h,
            in_w,
            out_h,
            out_w,
            k_h,
            k_w,
            pad_h,
            taps,
            left,
            half_w,
            padded_h,
        })
    }

    fn bytes(elements: usize) -> i64 {
        elements as i64 * F32_BYTES
    }

    fn split_row_bytes(&self) -> i64 {
        Self::bytes(2 * self.half_w)
    }

    pub fn emit(&self, k: &mut KernelCtx) -> Result<(), CodegenError> {
        let (b, x, dy, dw) = (&mut *k.b, k.inputs[0], k.inputs[1], k.outputs[0]);
        let split_bytes = self.padded_h * 2 * self.half_w * 4;
        let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, split_bytes as u32, 4));
        let split = b.ins().stack_addr(I64, slot, 0);
        emit_fill(b, split, split_bytes / 4, Scalar::F32(0.0));
        emit_fill(b, dw, self.channels * self.k_h * self.k_w, Scalar::F32(0.0));
        let interior = offset_ptr(b, split, self.pad_h as i64 * self.split_row_bytes() + Self::bytes(self.left));
        let (in_plane, out_plane, taps) = (self.in_h * self.in_w, self.out_h * self.out_w, self.k_h * self.k_w);
        counted_loop(b, self.planes, vec![], |b, plane, _| {
            let x_plane = index_ptr(b, x, plane, Self::bytes(in_plane));
            let dy_plane = index_ptr(b, dy, plane, Self::bytes(out_plane));
            let channel = b.ins().urem_imm_u(plane, self.channels as i64);
            let dw_channel = index_ptr(b, dw, channel, Self::bytes(taps));
            self.emit_split(b, x_plane, interior);
            // Split row of x row -p + ky (row 0 of the buffer).
            let first_row = offset_ptr(b, interior, -(self.pad_h as i64) * self.split_row_bytes());
            for ky in 0..self.k_h {
                let row0 = offset_ptr(b, first_row, ky as i64 * self.split_row_bytes());
                let sums = self.emit_tap_row(b, row0, dy_plane);
                for (kx, sum) in sums.into_iter().enumerate() {
                    let at = Self::bytes(ky * self.k_w + kx);
                    let old = load(b, F32, scalar_flags(), dw_channel, at);
                    let new = b.ins().fadd(old, sum);
                    store(b, scalar_flags(), new, dw_channel, at);
                }
            }
            vec![]
        });
        Ok(())
    }

    /// x's plane into the buffer: row iy's even columns at the interior of split row iy,
    /// its odd columns `half_w` floats later.
    fn emit_split(&self, b: &mut FunctionBuilder, x_plane: Value, interior: Value) {
        let odd = Self::bytes(self.half_w);
        counted_loop(b, self.in_h, vec![x_plane, interior], |b, _, rows| {
            let (at, rest) = tiled_loop(b, self.in_w, 2 * LANES, rows.to_vec(), |b, _, c| {
                let v0 = load(b, F32X4, vector_flags(), c[0], 0);
                let v1 = load(b, F32X4, vector_flags(), c[0], Self::bytes(LANES));
                let even = shuffle_f32x4(b, v0, v1, [0, 2, 4, 6]);
                let odd_lanes = shuffle_f32x4(b, v0, v1, [1, 3, 5, 7]);
                store(b, vector_flags(), even, c[1], 0);
                store(b, vector_flags(), odd_lanes, c[1], odd);
                vec![b.ins().iadd_imm_s(c[0], Self::bytes(2 * LANES)), b.ins().iadd_imm_s(c[1], Self::bytes(LANES))]
            });
            // The row's last (fewer than 8) columns, pairwise.
            for e in 0..rest {
                let v = load(b, F32, scalar_flags(), at[0], Self::bytes(e));
                let to = Self::bytes(e / 2) + if e % 2 == 1 { odd } else { 0 };
                store(b, scalar_flags(), v, at[1], to);
            }
            vec![
                b.ins().iadd_imm_s(rows[0], Self::bytes(self.in_w)),
                b.ins().iadd_imm_s(rows[1], self.split_row_bytes()),
            ]
        });
    }

    /// Σ over the plane's outputs of dy times each tap of one kernel row, whose x row for
    /// output row oy is split row `row0` + 2·oy.
    fn emit_tap_row(&self, b: &mut FunctionBuilder, row0: Value, dy_plane: Value) -> Vec<Value> {
        let fused = crate::math::fused_multiply_add();
        let zero = splat_f32(b, 0.0);
        let zero_scalar = b.ins().f32const(0.0);
        let k_w = self.k_w;
        let tap_offset = |kx: usize, v: usize| -> i64 {
            let (odd, shift) = self.taps[kx];
            let half = if odd { Self::bytes(self.half_w) } else { 0 };
            half + (v * LANES) as i64 * F32_BYTES + shift as i64 * F32_BYTES
        };
        let vectors = self.out_w / LANES;
        let tail = self.out_w % LANES;
        let mut carried = vec![row0, dy_plane];
        carried.extend(vec![zero; k_w]);
        carried.extend(vec![zero_scalar; k_w * usize::from(tail > 0)]);
        let done = counted_loop(b, self.out_h, carried, |b, _, c| {
            let (xr, dyr) = (c[0], c[1]);
            let mut accs = c[2..2 + k_w].to_vec();
            let mut scalars = c[2 + k_w..].to_vec();
            for v in 0..vectors {
                let d = load(b, F32X4, vector_flags(), dyr, Self::bytes(v * LANES));
                for (kx, acc) in accs.iter_mut().enumerate() {
                    let xv = load(b, F32X4, vector_flags(), xr, tap_offset(kx, v));
                    *acc = if fused {
                        b.ins().fma(xv, d, *acc)
                    } else {
                        let p = b.ins().fmul(xv, d);
                        b.ins().fadd(*acc, p)
                    };
                }
            }
            for e in 0..tail {
                let ox = vectors * LANES + e;
                let d = load(b, F32, scalar_flags(), dyr, Self::bytes(ox));
                for (kx, acc) in scalars.iter_mut().enumerate() {
                    let offset = tap_offset(kx, vectors) + Self::bytes(e);
                    let xv = load(b, F32, scalar_flags(), xr, offset);
                    *acc = if fused {
                        b.ins().fma(xv, d, *acc)
                    } else {
                        let p = b.ins().fmul(xv, d);
                        b.ins().fadd(*acc, p)
                    };
                }
            }
            let mut next = vec![b.ins().iadd_imm_s(xr, 2 * self.split_row_bytes()), b.ins().iadd_imm_s(dyr, Self::bytes(self.out_w))];
            next.extend(accs);
            next.extend(scalars);
            next
        });
        (0..k_w)
            .map(|kx| {
                let v = done[2 + kx];
                let mut total = b.ins().extractlane(v, 0);
                for lane in 1..LANES {
                    let e = b.ins().extractlane(v, lane as u8);
                    total = b.ins().fadd(total, e);
                }
                if tail > 0 {
                    total = b.ins().fadd(total, done[2 + k_w + kx]);
                }
                total
            })
            .collect()
    }
}

/// Whether `depthwise_weight_grad` takes the node (else `conv_weight_grad`).
pub fn handles(g: &Graph, node: &Node) -> bool {
    StridedDepthwiseWeightGrad::of_node(g, node).is_some()
}

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    match StridedDepthwiseWeightGrad::of_node(k.graph, k.node) {
        Some(plan) => plan.emit(k),
        None => Err(super::compute::misrouted(k, "depthwise_weight_grad")),
    }
}
