//! Weight gradients of stride-1 2-D convolutions without im2col: the channels-last
//! correlations of training graphs (`train/rules_window.rs`: x as one image
//! `[1, N, H, W, C]`, dy as the weight `[M, N, KH, KW, 1]`, output `[1, M, FH, FW, C]`,
//! padding on the two spatial axes only) on the AVX2 6x16 microkernel that reads B rows
//! in place.
//!
//! `dW[m][fh][fw][c] = Σ_n Σ_(kh,kw) dy[m][n][kh][kw] · xp[n][fh + kh][fw + kw][c]`
//! with `xp` the zero-padded input (`Hp x Wp` pixels). Per image and filter tap, that
//! is a GEMM whose reduction runs over dy's pixels: A = dy (M x K, packed in 6-row
//! panels), B = xp's pixels (K x C, 16 channels per panel). Letting the reduction index
//! run over whole padded rows, `q = kh·Wp + kw` with dy zero for `kw >= KW`, B's row q
//! for tap (fh, fw) is the pixel `q + fh·Wp + fw` of `xp`: every tap reads the same
//! padded copy at a constant offset, rows `C` floats apart, with no gather at all.
//! The general path (`pack_carried`) instead packs `FH·FW·C` values per reduction index
//! (9x the input), which took as long as the products at 16-32 channels.
//!
//! Work per image: copy x into the padded buffer (its border zeroed once per task),
//! pack dy into A panels (4x4 transposes), then for each block of dy rows (A and B of
//! the block stay in L1 across the taps) one microkernel call per (tap, channel
//! panel, dy panel), accumulating into the task's `[panels·6][FH·FW·C]` tile array.
//! Tasks take shares of the images; the node kernel sums their arrays into the output
//! (whose first M rows have the same layout).

use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::{int, scaled};
use crate::kernels::compute::{LANES, counted_loop, shuffle_f32x4, transpose4, vector_flags};

const F32_BYTES: i64 = 4;
/// The microkernel's tile: rows of dy (output channels) x input channels.
const MR: usize = 6;
const NR: usize = 16;
/// Tasks at most (each has its own buffers and accumulators).
pub const MAX_TASKS: usize = 4;
/// Cost of packing one value, in multiply-adds of the microkernel: ~13 measured (perf,
/// resnet_tiny's training step at batch 64, one thread: the 16-channel weight gradient
/// at 32x32 took ~7.6 ms on im2col, which packs 9.4 M values for 170 M multiply-adds
/// that run at ~39 G/s here). With it the estimate keeps im2col for the 64-channel
/// gradient at 8x8 (padded rows cost 25% more multiply-adds; measured ~30% slower on
/// this path) and for resnet18's 512-channel ones at 7x7.
const PACKED_VALUE_MACS: usize = 13;
/// Bytes of A and B rows one block of dy rows should stay under (L1d is 32-48 KiB).
const BLOCK_BYTES: usize = 32 * 1024;

/// The geometry of one weight gradient this path computes.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightGradRows {
    /// Images (the correlation's input channels).
    pub images: usize,
    pub in_h: usize,
    pub in_w: usize,
    /// Input channels (carried through as the output's last axis).
    pub channels: usize,
    /// dy's extents (the correlation's kernel).
    pub dy_h: usize,
    pub dy_w: usize,
    /// dy's channels (the correlation's output channels).
    pub out_channels: usize,
    /// The filter's extents (the correlation's output positions).
    pub filter_h: usize,
    pub filter_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    /// dy rows per block of the reduction.
    pub rows_per_block: usize,
}

impl WeightGradRows {
    /// The path's geometry for a correlation with `input` `[H, W, C]`, `kernel`
    /// `[KH, KW, 1]`, `output` `[FH, FW, C]`, or None when it does not apply.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: &[usize],
        kernel: &[usize],
        output: &[usize],
        strides: &[usize],
        dilations: &[usize],
        pads: &[usize],
        images: usize,
        out_channels: usize,
    ) -> Option<WeightGradRows> {
        if input.len() != 3 || kernel.len() != 3 || output.len() != 3 || pads.len() != 3 {
            return None;
        }
        let channels = input[2];
        let unit = |v: &[usize]| v.iter().all(|&s| s == 1);
        if !unit(strides) || !unit(dilations) || kernel[2] != 1 || pads[2] != 0 || output[2] != channels {
            return None;
        }
        if channels == 0 || !channels.is_multiple_of(NR) || images == 0 || out_channels == 0 {
            return None;
        }
        let (in_h, in_w, dy_h, dy_w, filter_h, filter_w) = (input[0], input[1], kernel[0], kernel[1], output[0], output[1]);
        if [in_h, in_w, dy_h, dy_w, filter_h, filter_w].contains(&0) {
            return None;
        }
        let mut plan = WeightGradRows {
            images,
            in_h,
            in_w,
            channels,
            dy_h,
            dy_w,
            out_channels,
            filter_h,
            filter_w,
            pad_top: pads[0],
            pad_left: pads[1],
            rows_per_block: 1,
        };
        // The padded image holds the input where the pads put it.
        if plan.pad_top + in_h > plan.padded_h() || plan.pad_left + in_w > plan.padded_w() {
            return None;
        }
        let row_bytes = plan.padded_w() * (plan.panels() * MR + channels) * 4;
        let fit = (BLOCK_BYTES / row_bytes.max(1)).clamp(1, dy_h);
        let blocks = dy_h.div_ceil(fit);
        plan.rows_per_block = dy_h.div_ceil(blocks);
        Some(plan)
    }

    pub fn padded_h(&self) -> usize {
        self.filter_h + self.dy_h - 1
    }
    pub fn padded_w(&self) -> usize {
        self.filter_w + self.dy_w - 1
    }
    pub fn panels(&self) -> usize {
        self.out_channels.div_ceil(MR)
    }
    fn taps(&self) -> usize {
        self.filter_h * self.filter_w
    }
    /// Floats per accumulator row: one output channel's gradient, `[FH][FW][C]`.
    fn acc_row(&self) -> usize {
        self.taps() * self.channels
    }
    fn acc_bytes(&self) -> usize {
        align(self.panels() * MR * self.acc_row() * 4)
    }
    /// Pixels of the padded copy: the last tap's last reduction row reads `FW - 1`
    /// pixels past the padded image (dy is zero there; the pixels must be finite).
    fn padded_pixels(&self) -> usize {
        self.padded_h() * self.padded_w() + self.filter_w - 1
    }
    fn padded_bytes(&self) -> usize {
        align(self.padded_pixels() * self.channels * 4)
    }
    /// Reduction rows of one A panel: dy's rows, each `Wp` long.
    fn reduction(&self) -> usize {
        self.dy_h * self.padded_w()
    }
    fn a_panel_bytes(&self) -> usize {
        self.reduction() * MR * 4
    }
    fn a_bytes(&self) -> usize {
        align(self.panels() * self.a_panel_bytes())
    }
    /// One task's buffers: accumulators, padded image, A panels.
    pub fn task_bytes(&self) -> usize {
        self.acc_bytes() + self.padded_bytes() + self.a_bytes()
    }
    pub fn scratch_bytes(&self) -> usize {
        MAX_TASKS * self.task_bytes()
    }
    /// Multiply-adds of the microkernel calls (padded), for cost comparisons.
    pub fn padded_macs(&self) -> usize {
        self.images * self.taps() * self.panels() * MR * self.channels * self.reduction()
    }

    /// Whether this path is estimated cheaper than im2col (`im2col_macs` padded
    /// multiply-adds, `packed_values` values packed into its B panels): multiply-adds
    /// plus packing at `PACKED_VALUE_MACS` each (this path packs only dy, once per
    /// image), this path's multiply-adds charged 1/8 more: B rows strided through L2
    /// instead of packed panels in L1. Measured (perf, resnet18's training step at batch
    /// 16, one thread, against the start of the session): the 128-channel gradients at
    /// 28x28 ~8% slower on this path (kept on im2col by the 1/8), the 64-channel ones at
    /// 56x56 ~6% faster.
    pub fn cheaper_than_im2col(&self, im2col_macs: usize, packed_values: usize) -> bool {
        let packed_dy = self.images * self.panels() * MR * self.reduction();
        let rows = self.padded_macs() * 9 / 8 + packed_dy * PACKED_VALUE_MACS;
        let im2col = im2col_macs + packed_values * PACKED_VALUE_MACS;
        rows < im2col
    }
}

fn align(bytes: usize) -> usize {
    bytes.div_ceil(64) * 64
}

/// One task: images `first..end` into the accumulators of task `index`.
/// `kernel` is the strided-B microkernel `(k, a, b, c, ldc, accumulate, ldb)`.
#[allow(clippy::too_many_arguments)]
pub fn emit_task(
    b: &mut FunctionBuilder,
    p: &WeightGradRows,
    kernel: FuncRef,
    x: Value,
    dy: Value,
    scratch: Value,
    index: Value,
    first: Value,
    end: Value,
) {
    let base = scaled(b, scratch, index, p.task_bytes() as i64);
    let acc = base;
    let padded = b.ins().iadd_imm_s(base, p.acc_bytes() as i64);
    let a = b.ins().iadd_imm_s(padded, p.padded_bytes() as i64);
    // Everything this task never writes later must be zero: the accumulators, the
    // padded image's border, A's rows past M and columns past KW.
    fill_zero(b, base, p.task_bytes());

    let image_count = b.ins().isub(end, first);
    let x_image_bytes = (p.in_h * p.in_w * p.channels) as i64 * F32_BYTES;
    let x_first = scaled(b, x, first, x_image_bytes);
    let dy_image_bytes = (p.dy_h * p.dy_w) as i64 * F32_BYTES;
    let dy_first = scaled(b, dy, first, dy_image_bytes);
    super::repeat(b, image_count, &[x_first, dy_first], |b, at| {
        let (x_image, dy_image) = (at[0], at[1]);
        copy_padded(b, p, x_image, padded);
        pack_dy(b, p, dy_image, a);
        products(b, p, kernel, a, padded, acc);
        vec![
            b.ins().iadd_imm_s(x_image, x_image_bytes),
            b.ins().iadd_imm_s(dy_image, dy_image_bytes),
        ]
    });
}

/// After the tasks: `out = Σ_task acc_task[0..M·FH·FW·C]` over the first `tasks`
/// task buffers.
pub fn emit_sum(b: &mut FunctionBuilder, p: &WeightGradRows, scratch: Value, tasks: Value, out: Value) {
    let vectors = p.out_channels * p.acc_row() / LANES;
    let task_bytes = p.task_bytes() as i64;
    counted_loop(b, vectors, vec![scratch, out], |b, _, ptrs| {
        let first = b.ins().load(F32X4, vector_flags(), ptrs[0], 0);
        let rest = b.ins().iadd_imm_s(tasks, -1);
        let next_task = b.ins().iadd_imm_s(ptrs[0], task_bytes);
        let sum = super::repeat(b, rest, &[next_task, first], |b, at| {
            let v = b.ins().load(F32X4, vector_flags(), at[0], 0);
            vec![b.ins().iadd_imm_s(at[0], task_bytes), b.ins().fadd(at[1], v)]
        });
        b.ins().store(vector_flags(), sum[1], ptrs[1], 0);
        let step = (LANES as i64) * F32_BYTES;
        vec![b.ins().iadd_imm_s(ptrs[0], step), b.ins().iadd_imm_s(ptrs[1], step)]
    });
}

fn fill_zero(b: &mut FunctionBuilder, dst: Value, bytes: usize) {
    let zero = b.ins().f32const(0.0);
    let zero = b.ins().splat(F32X4, zero);
    let step = (LANES as i64) * F32_BYTES;
    counted_loop(b, bytes / step as usize, vec![dst], |b, _, ptrs| {
        b.ins().store(vector_flags(), zero, ptrs[0], 0);
        vec![b.ins().iadd_imm_s(ptrs[0], step)]
    });
}

/// The image's rows into the padded buffer's interior.
fn copy_padded(b: &mut FunctionBuilder, p: &WeightGradRows, x_image: Value, padded: Value) {
    let row_floats = p.in_w * p.channels;
    let src_row_bytes = row_floats as i64 * F32_BYTES;
    let dst_row_bytes = (p.padded_w() * p.channels) as i64 * F32_BYTES;
    let interior = ((p.pad_top * p.padded_w() + p.pad_left) * p.channels) as i64 * F32_BYTES;
    let dst = b.ins().iadd_imm_s(padded, interior);
    // Rows are whole multiples of 16 floats (C is).
    const UNROLL: usize = 4;
    counted_loop(b, p.in_h, vec![x_image, dst], |b, _, rows| {
        let step = (UNROLL * LANES) as i64 * F32_BYTES;
        counted_loop(b, row_floats / (UNROLL * LANES), rows.to_vec(), |b, _, ptrs| {
            let values: Vec<Value> = (0..UNROLL)
                .map(|u| b.ins().load(F32X4, vector_flags(), ptrs[0], (u * LANES * 4) as i32))
                .collect();
            for (u, v) in values.into_iter().enumerate() {
                b.ins().store(vector_flags(), v, ptrs[1], (u * LANES * 4) as i32);
            }
            vec![b.ins().iadd_imm_s(ptrs[0], step), b.ins().iadd_imm_s(ptrs[1], step)]
        });
        vec![
            b.ins().iadd_imm_s(rows[0], src_row_bytes),
            b.ins().iadd_imm_s(rows[1], dst_row_bytes),
        ]
    });
}

/// dy of one image into A panels `[panel][q = kh·Wp + kw][6]` (columns past KW and rows
/// past M stay zero). `dy_image` points at dy[0][n].
fn pack_dy(b: &mut FunctionBuilder, p: &WeightGradRows, dy_image: Value, a: Value) {
    let full_panels = p.out_channels / MR;
    let channel_bytes = (p.images * p.dy_h * p.dy_w) as i64 * F32_BYTES;
    let panel_src_bytes = MR as i64 * channel_bytes;
    let panel_dst_bytes = p.a_panel_bytes() as i64;
    counted_loop(b, full_panels, vec![dy_image, a], |b, _, ptrs| {
        pack_panel(b, p, ptrs[0], ptrs[1], MR, channel_bytes);
        vec![
            b.ins().iadd_imm_s(ptrs[0], panel_src_bytes),
            b.ins().iadd_imm_s(ptrs[1], panel_dst_bytes),
        ]
    });
    let rows = p.out_channels % MR;
    if rows > 0 {
        let src = b.ins().iadd_imm_s(dy_image, full_panels as i64 * panel_src_bytes);
        let dst = b.ins().iadd_imm_s(a, full_panels as i64 * panel_dst_bytes);
        pack_panel(b, p, src, dst, rows, channel_bytes);
    }
}

/// One panel of `rows` (<= 6) output channels, `channel_bytes` apart in dy.
fn pack_panel(b: &mut FunctionBuilder, p: &WeightGradRows, src: Value, dst: Value, rows: usize, channel_bytes: i64) {
    let (dy_w, wp) = (p.dy_w, p.padded_w());
    let src_row_bytes = dy_w as i64 * F32_BYTES;
    let dst_row_bytes = (wp * MR) as i64 * F32_BYTES;
    let quads = dy_w / LANES;
    let zero = {
        let z = b.ins().f32const(0.0);
        b.ins().splat(F32X4, z)
    };
    counted_loop(b, p.dy_h, vec![src, dst], |b, _, at| {
        let (src_row, dst_row) = (at[0], at[1]);
        // Four dy columns of every row, transposed into four A rows of 6.
        let quad_step_src = (LANES as i64) * F32_BYTES;
        let quad_step_dst = (LANES * MR) as i64 * F32_BYTES;
        counted_loop(b, quads, vec![src_row, dst_row], |b, _, q| {
            let r: Vec<Value> = (0..MR)
                .map(|i| {
                    if i < rows {
                        b.ins().load(F32X4, vector_flags(), q[0], (i as i64 * channel_bytes) as i32)
                    } else {
                        zero
                    }
                })
                .collect();
            let columns = transpose4(b, &r[..4]);
            let pairs = [
                shuffle_f32x4(b, r[4], r[5], [0, 4, 1, 5]),
                shuffle_f32x4(b, r[4], r[5], [2, 6, 3, 7]),
            ];
            for (j, column) in columns.into_iter().enumerate() {
                let offset = (j * MR) as i32 * F32_BYTES as i32;
                b.ins().store(vector_flags(), column, q[1], offset);
                for lane in 0..2 {
                    let v = b.ins().extractlane(pairs[j / 2], ((j % 2) * 2 + lane) as u8);
                    b.ins().store(scalar(), v, q[1], offset + (4 + lane as i32) * F32_BYTES as i32);
                }
            }
            vec![
                b.ins().iadd_imm_s(q[0], quad_step_src),
                b.ins().iadd_imm_s(q[1], quad_step_dst),
            ]
        });
        // Columns past the last quad, one at a time.
        for kw in quads * LANES..dy_w {
            for i in 0..rows {
                let offset = i as i64 * channel_bytes + kw as i64 * F32_BYTES;
                let v = b.ins().load(F32, scalar(), src_row, offset as i32);
                b.ins()
                    .store(scalar(), v, dst_row, ((kw * MR + i) as i64 * F32_BYTES) as i32);
            }
        }
        vec![
            b.ins().iadd_imm_s(src_row, src_row_bytes),
            b.ins().iadd_imm_s(dst_row, dst_row_bytes),
        ]
    });
}

fn scalar() -> MemFlagsData {
    MemFlagsData::trusted()
}

/// The microkernel calls of one image: per block of dy rows, per tap, channel panel
/// and dy panel.
fn products(b: &mut FunctionBuilder, p: &WeightGradRows, kernel: FuncRef, a: Value, padded: Value, acc: Value) {
    let wp = p.padded_w();
    let c = p.channels;
    let ldc = int(b, p.acc_row() as i64);
    let accumulate = int(b, 1);
    let ldb = int(b, c as i64 * F32_BYTES);
    let chunks = c / NR;
    let mut row0 = 0;
    while row0 < p.dy_h {
        let rows = p.rows_per_block.min(p.dy_h - row0);
        let q0 = row0 * wp;
        let k = int(b, (rows * wp) as i64);
        let a_block = b.ins().iadd_imm_s(a, (q0 * MR) as i64 * F32_BYTES);
        let b_block = b.ins().iadd_imm_s(padded, (q0 * c) as i64 * F32_BYTES);
        counted_loop(b, p.taps(), vec![], |b, tap, _| {
            let fh = b.ins().udiv_imm_u(tap, p.filter_w as i64);
            let fw = b.ins().urem_imm_u(tap, p.filter_w as i64);
            let shift = b.ins().imul_imm_s(fh, wp as i64);
            let shift = b.ins().iadd(shift, fw);
            let b_tap = scaled(b, b_block, shift, c as i64 * F32_BYTES);
            let c_tap = scaled(b, acc, tap, c as i64 * F32_BYTES);
            counted_loop(b, chunks, vec![b_tap, c_tap], |b, _, bc| {
                counted_loop(b, p.panels(), vec![a_block, bc[1]], |b, _, ac| {
                    b.ins().call(kernel, &[k, ac[0], bc[0], ac[1], ldc, accumulate, ldb]);
                    vec![
                        b.ins().iadd_imm_s(ac[0], p.a_panel_bytes() as i64),
                        b.ins().iadd_imm_s(ac[1], (MR * p.acc_row()) as i64 * F32_BYTES),
                    ]
                });
                let step = NR as i64 * F32_BYTES;
                vec![b.ins().iadd_imm_s(bc[0], step), b.ins().iadd_imm_s(bc[1], step)]
            });
            vec![]
        });
        row0 += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet_tiny_first_stage_geometry() {
        // x [1, 64, 32, 32, 16], dy [16, 64, 32, 32, 1], pads 1: output [1, 16, 3, 3, 16].
        let p = WeightGradRows::new(&[32, 32, 16], &[32, 32, 1], &[3, 3, 16], &[1; 3], &[1; 3], &[1, 1, 0], 64, 16)
            .unwrap();
        assert_eq!((p.padded_h(), p.padded_w(), p.panels()), (34, 34, 3));
        assert!(p.rows_per_block >= 1 && p.rows_per_block <= 32);
        let block = p.rows_per_block * p.padded_w() * (p.panels() * MR + p.channels) * 4;
        assert!(block <= BLOCK_BYTES);
        // Strided (dilated) correlations and channel counts off the panel width do not apply.
        assert!(WeightGradRows::new(&[32, 32, 16], &[16, 16, 1], &[3, 3, 16], &[1; 3], &[2, 2, 1], &[1, 1, 0], 64, 16).is_none());
        assert!(WeightGradRows::new(&[32, 32, 8], &[32, 32, 1], &[3, 3, 8], &[1; 3], &[1; 3], &[1, 1, 0], 64, 16).is_none());
    }

    /// im2col's cost as `conv_gemm::plan` gives it: channel rows, padded.
    fn cheaper(h: usize, c: usize, m: usize, images: usize) -> bool {
        let p = WeightGradRows::new(&[h, h, c], &[h, h, 1], &[3, 3, c], &[1; 3], &[1; 3], &[1, 1, 0], images, m).unwrap();
        let (positions, depth) = (9 * c, images * h * h);
        p.cheaper_than_im2col(m.div_ceil(6) * 6 * positions.div_ceil(16) * 16 * depth, positions * depth)
    }

    #[test]
    fn the_estimate_takes_few_channels_and_leaves_many() {
        assert!(cheaper(32, 16, 16, 64), "resnet_tiny, 16 channels at 32x32");
        assert!(cheaper(56, 64, 64, 16), "resnet18, 64 channels at 56x56");
        assert!(!cheaper(8, 64, 64, 64), "resnet_tiny, 64 channels at 8x8");
        assert!(!cheaper(28, 128, 128, 16), "resnet18, 128 channels at 28x28");
    }
}
