//! Depthwise 2-D convolutions (`Op::Conv` with groups == C_in == C_out, weights
//! [C, 1, kh, kw]), f32, plain layout: each output channel reads one input channel, so
//! there is no reduction over channels and the whole work is a small stencil per plane.
//!
//! Loop nest: image, channel, output rows, tiles of output columns. Per channel the
//! weights of kernels up to 3x3 are splatted once and stay in registers; larger
//! kernels splat each tap from memory (Cranelift hoists them to the channel as well
//! and spills what does not fit). A tile holds up to `vectors` f32x4 accumulators of
//! consecutive output columns; every tap is one unaligned vector load per
//! accumulator (stride 2: two loads and a `shufps`, see `load_f32x4_strided`).
//!
//! Window edges are resolved at compile time (`compute::window`): output rows are
//! split into segments with a fixed range of valid kernel rows, and each row into
//! edge tiles at known columns around one loop of interior tiles, which reads no
//! padding and tests no bounds. In an edge tile, every lane knows at compile time
//! whether a tap reads the input or padding; its input vector is one or two
//! in-row loads shuffled into place with the padding lanes masked to zero. The last
//! vector of a row whose width is not a multiple of 4 overlaps the previous one
//! (recomputing a few outputs) instead of storing lane by lane.
//!
//! The bias and the node's epilogue are applied to the accumulators before the store
//! (operands read per vector: of the output's positions, or one value per channel
//! or image). An epilogue whose operands cannot be addressed that way (broadcast
//! along one spatial axis) runs afterwards over the output (`emit_epilogue`), the
//! bias still in registers.
//!
//! Input loads are marked read-only and movable: within a node's kernel function
//! nothing writes the inputs (outputs never alias them), and movable loads let
//! Cranelift place each load next to its multiply instead of issuing all of a tile's
//! loads first, which would spill.
//!
//! Dispatch (`handles`): nodes whose schedule kernel is "depthwise" (chosen by
//! choose-schedule) or unset (unoptimised graphs, tests), with horizontal stride 1
//! or 2, any vertical stride, dilations and padding, up to `MAX_TAPS` taps. Anything
//! else runs on the generic direct kernel (`conv.rs`).

use cnnc_ir::{BinaryFn, DType, EpilogueStep, Graph, Layout, Node, Op, UnaryFn};
use cranelift_codegen::ir::{
    Endianness, FuncRef, InstBuilder, MemFlagsData, Value,
    types::{F32, F32X4, F64, F64X2, I8X16, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::AxisWindow;
use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, load, load_f32x4_strided, offset_ptr, scalar_flags, shuffle_f32x4,
    splat_f32, store, vector_flags, weight,
};
use super::elementwise::{binary_lane, check_binary, check_unary, unary_lane};
use super::{CodegenError, KernelCtx};
use crate::microkernel::activation::{self, ActivationSpec};

/// Kernels with more taps run on the generic direct kernel (code size: every tap is
/// unrolled in every tile).
pub const MAX_TAPS: usize = 64;

/// Kernels up to this many taps keep all their weight splats in registers.
const MAX_PRELOADED_TAPS: usize = 9;

/// Padded rows up to this many floats are copied into a zero-padded buffer (see
/// `PaddedRows`); wider rows, whose edges are a small part, use edge tiles.
const MAX_PADDED_ROW: usize = 64;

/// Bytes of the padded channel buffer at most (it lives on the stack).
const MAX_PADDED_PLANE_BYTES: usize = 64 << 10;

/// Whether `node` runs on this kernel (see the module docs).
pub fn handles(g: &Graph, node: &Node) -> bool {
    DepthwisePlan::new(g, node).is_some()
}

/// Emits the convolution of `k.node`, its bias and its whole epilogue.
pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let plan = DepthwisePlan::new(k.graph, k.node).ok_or_else(|| {
        CodegenError(format!(
            "node '{}' is not a depthwise convolution this kernel supports",
            k.node.name
        ))
    })?;
    let op_inputs = cnnc_ir::verify::op_input_count(k.node);
    if k.inputs.len() != k.node.inputs.len() || k.outputs.len() != 1 || op_inputs < 2 {
        return Err(CodegenError(format!(
            "depthwise node '{}': got {} input and {} output buffers",
            k.node.name,
            k.inputs.len(),
            k.outputs.len()
        )));
    }
    let steps = epilogue_steps(k.graph, k.node, &plan);
    let in_registers = steps.is_some();
    let steps = steps.unwrap_or_default();
    // An all-unary epilogue the AVX2 functions implement runs over each finished
    // channel plane instead of per f32x4 accumulator (the bias is in the accumulators).
    let activation = activation_function(k.b, &steps);
    let steps = if activation.is_some() { Vec::new() } else { steps };
    let buffers = Buffers {
        x: k.inputs[0],
        w: k.inputs[1],
        bias: (op_inputs > 2).then(|| k.inputs[2]),
        y: k.outputs[0],
        operands: steps
            .iter()
            .map(|s| match s {
                Step::Binary { input, .. } => Some(k.inputs[*input]),
                Step::Unary(_) => None,
            })
            .collect(),
    };
    let mut failure = None;
    plan.emit(k.b, &buffers, &steps, activation, &mut failure);
    if let Some(e) = failure {
        return Err(e);
    }
    if !in_registers {
        super::elementwise::emit_epilogue(k)?;
    }
    Ok(())
}

/// Geometry of one depthwise convolution, and how its rows are tiled.
#[derive(Clone, Debug)]
struct DepthwisePlan {
    batch: usize,
    channels: usize,
    rows: AxisWindow,
    /// The columns as the tiles read them: the input's, or the padded buffer's.
    cols: AxisWindow,
    /// Width of the input's rows.
    src_width: usize,
    padded: Option<PaddedRows>,
    /// Accumulators of an interior tile.
    vectors: usize,
    pieces: Vec<RowPiece>,
}

/// Narrow rows are copied per channel into a stack buffer with the horizontal padding
/// as real zeros, so every tile reads whole vectors without lane checks or masks (the
/// copy costs one load and store per input element; edge tiles of narrow rows cost
/// far more). Vertical padding still goes by row segments.
#[derive(Clone, Copy, Debug)]
struct PaddedRows {
    /// Zero columns before each copied row.
    pad_left: usize,
    /// Floats per buffer row (>= pad_left + input width + right padding).
    width: usize,
}

/// A run of output columns of one row.
#[derive(Clone, Debug, PartialEq)]
enum RowPiece {
    /// One tile of vectors starting at these columns (compile-time lane checks).
    Edge(Vec<usize>),
    /// `tiles` interior tiles of `vectors` vectors from column `start`, in a loop.
    Interior { start: usize, tiles: usize },
}

/// What one lane of an edge vector gets from one tap.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lane {
    /// The input element at this index of the row.
    Load(i64),
    /// Padding: zero.
    Zero,
    /// A lane past the row's last output (only in rows narrower than a vector).
    Ignored,
}

/// One epilogue step as applied to a vector of accumulators.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Unary(UnaryFn),
    Binary {
        func: BinaryFn,
        /// The operand's index among the node's buffers.
        input: usize,
        image_stride: i64,
        channel_stride: i64,
        /// The operand has the output's positions (else one value per channel/image).
        per_position: bool,
    },
}

/// The kernel's buffers and how the weights may be read.
struct Buffers {
    x: Value,
    w: Value,
    bias: Option<Value>,
    y: Value,
    /// Per epilogue step, the operand's base address.
    operands: Vec<Option<Value>>,
}

/// Where one channel's data is while its rows are emitted.
struct ChannelData {
    /// Weight splats of kernels up to `MAX_PRELOADED_TAPS` taps.
    splats: Vec<Value>,
    w: Value,
    w_flags: MemFlagsData,
    bias: Option<Value>,
    /// Per step: the operand's address minus the output's (per-position operands), or
    /// the address of the channel's value.
    operands: Vec<OperandAt>,
}

#[derive(Clone, Copy)]
enum OperandAt {
    None,
    /// Operand address = output address + this.
    Delta(Value),
    /// One value for the whole channel, at this address.
    Scalar(Value),
}

/// The stack buffer of `PaddedRows`, zeroed once per call.
struct PaddedBuffer {
    /// Holds the buffer's address, reloaded after every fill (see `fill`).
    address: cranelift_codegen::ir::StackSlot,
}

impl PaddedBuffer {
    fn new(b: &mut FunctionBuilder, floats: usize) -> PaddedBuffer {
        use cranelift_codegen::ir::{StackSlotData, StackSlotKind, types::I64};
        let size = (floats * F32_BYTES as usize) as u32;
        let data = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
        let address = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 8, 3));
        let base = b.ins().stack_addr(I64, data, 0);
        b.ins().stack_store(I64, base, address, 0);
        let zero = splat_f32(b, 0.0);
        let vectors = floats / LANES;
        counted_loop(b, vectors, vec![base], |b, _, c| {
            store(b, vector_flags(), zero, c[0], 0);
            vec![b.ins().iadd_imm_s(c[0], bytes(LANES as i64))]
        });
        let zero_scalar = b.ins().f32const(0.0);
        for e in vectors * LANES..floats {
            store(b, scalar_flags(), zero_scalar, base, bytes(e as i64));
        }
        PaddedBuffer { address }
    }

    /// Copies the `rows` x `width` plane at `x` into the buffer, `p.pad_left` columns
    /// in, and returns the buffer's address. The address is reloaded from a stack slot
    /// after the copy's stores: the tiles' loads are movable (pure for Cranelift), and
    /// an address computed after the stores is what keeps them after the copy.
    fn fill(&self, b: &mut FunctionBuilder, x: Value, rows: usize, width: usize, p: PaddedRows) -> Value {
        use cranelift_codegen::ir::types::I64;
        let base = b.ins().stack_load(I64, I64, self.address, 0);
        let dst = offset_ptr(b, base, bytes(p.pad_left as i64));
        let full = width / LANES;
        counted_loop(b, rows, vec![x, dst], |b, _, c| {
            let (src, dst) = (c[0], c[1]);
            let mut offsets: Vec<usize> = (0..full).map(|v| v * LANES).collect();
            if !width.is_multiple_of(LANES) && width >= LANES {
                offsets.push(width - LANES);
            }
            for &o in &offsets {
                let v = load(b, F32X4, input_load_flags(), src, bytes(o as i64));
                store(b, vector_flags(), v, dst, bytes(o as i64));
            }
            if width < LANES {
                for e in 0..width {
                    let v = load(b, F32, input_scalar_flags(), src, bytes(e as i64));
                    store(b, scalar_flags(), v, dst, bytes(e as i64));
                }
            }
            vec![
                b.ins().iadd_imm_s(src, bytes(width as i64)),
                b.ins().iadd_imm_s(dst, bytes(p.width as i64)),
            ]
        });
        b.ins().stack_load(I64, I64, self.address, 0)
    }
}

/// Loads of inputs that nothing writes during the kernel (see the module docs).
fn input_load_flags() -> MemFlagsData {
    weight(vector_flags())
}

fn input_scalar_flags() -> MemFlagsData {
    weight(scalar_flags())
}

fn bytes(elements: i64) -> i64 {
    elements * F32_BYTES
}

impl DepthwisePlan {
    fn new(g: &Graph, node: &Node) -> Option<DepthwisePlan> {
        let Op::Conv(geometry) = &node.op else {
            return None;
        };
        let s = &node.schedule;
        if s.layout_in != Layout::Plain || s.layout_out != Layout::Plain {
            return None;
        }
        if !matches!(s.kernel.as_str(), "depthwise" | "") || node.outputs.len() != 1 {
            return None;
        }
        let op_inputs = cnnc_ir::verify::op_input_count(node);
        if !(2..=3).contains(&op_inputs) || node.inputs.len() < op_inputs {
            return None;
        }
        let x = g.ty(node.inputs[0]);
        let w = g.ty(node.inputs[1]);
        let y = g.ty(node.outputs[0]);
        if [x, w, y].iter().any(|t| t.dtype != DType::F32 || t.shape.len() != 4) {
            return None;
        }
        let channels = x.shape[1];
        if geometry.groups != channels
            || w.shape[..2] != [channels, 1]
            || y.shape[..2] != [x.shape[0], channels]
            || y.numel() == 0
        {
            return None;
        }
        if op_inputs == 3 {
            let bias = g.ty(node.inputs[2]);
            if bias.dtype != DType::F32 || bias.shape != [channels] {
                return None;
            }
        }
        if [
            &geometry.strides,
            &geometry.dilations,
            &geometry.pads_begin,
            &geometry.pads_end,
        ]
        .iter()
        .any(|v| v.len() != 2)
        {
            return None;
        }
        let axis = |a: usize| AxisWindow::conv_axis(geometry, &x.shape, &w.shape, &y.shape, a);
        let (rows, cols) = (axis(0), axis(1));
        if [rows, cols]
            .iter()
            .any(|a| a.kernel == 0 || a.stride == 0 || a.dilation == 0)
            || !matches!(cols.stride, 1 | 2)
            || rows.kernel * cols.kernel > MAX_TAPS
        {
            return None;
        }
        let taps = rows.kernel * cols.kernel;
        // Accumulators plus the weight splats (3x3) or one splat and the stride-2
        // temporaries within x86's 16 xmm registers.
        let vectors = match (taps <= MAX_PRELOADED_TAPS, cols.stride) {
            (true, 1) => 3,
            (true, _) => 2,
            (false, _) => 4,
        };
        let src_width = cols.input;
        // The buffer row holds the padded row, and at least one vector's window.
        let padded_width = (src_width + cols.pad_begin + cols.pad_end)
            .max((LANES - 1) * cols.stride + (cols.kernel - 1) * cols.dilation + 1);
        let pads = cols.pad_begin + cols.pad_end > 0;
        let padded = (pads
            && padded_width <= MAX_PADDED_ROW
            && rows.input * padded_width * F32_BYTES as usize <= MAX_PADDED_PLANE_BYTES)
            .then_some(PaddedRows {
                pad_left: cols.pad_begin,
                width: padded_width,
            });
        let cols = match padded {
            Some(p) => AxisWindow {
                input: p.width,
                pad_begin: 0,
                pad_end: 0,
                ..cols
            },
            None => cols,
        };
        let pieces = row_pieces(&cols, vectors);
        Some(DepthwisePlan {
            batch: x.shape[0],
            channels,
            rows,
            cols,
            src_width,
            padded,
            vectors,
            pieces,
        })
    }

    fn in_plane(&self) -> i64 {
        (self.rows.input * self.src_width) as i64
    }

    fn out_plane(&self) -> i64 {
        (self.rows.output * self.cols.output) as i64
    }

    fn taps(&self) -> usize {
        self.rows.kernel * self.cols.kernel
    }

    /// Whether products accumulate by fused multiply-adds (see `Sum`): when the target
    /// has FMA (`math::fused_multiply_add`, set for the module being compiled).
    fn fused(&self) -> bool {
        self.taps() <= MAX_PRELOADED_TAPS && crate::math::fused_multiply_add()
    }

    fn emit(
        &self,
        b: &mut FunctionBuilder,
        buf: &Buffers,
        steps: &[Step],
        activation: Option<FuncRef>,
        failure: &mut Option<CodegenError>,
    ) {
        let channels = self.channels as i64;
        let taps = self.taps() as i64;
        let padded = self
            .padded
            .map(|p| (p, PaddedBuffer::new(b, self.rows.input * p.width)));
        counted_loop(b, self.batch, vec![], |b, n, _| {
            let x_n = index_ptr(b, buf.x, n, bytes(channels * self.in_plane()));
            let y_n = index_ptr(b, buf.y, n, bytes(channels * self.out_plane()));
            let operands_n: Vec<Option<Value>> = steps
                .iter()
                .zip(&buf.operands)
                .map(|(s, base)| match (s, base) {
                    (Step::Binary { image_stride, .. }, Some(p)) => Some(index_ptr(b, *p, n, bytes(*image_stride))),
                    _ => None,
                })
                .collect();
            counted_loop(b, self.channels, vec![], |b, c, _| {
                let x_c = index_ptr(b, x_n, c, bytes(self.in_plane()));
                let y_c = index_ptr(b, y_n, c, bytes(self.out_plane()));
                let w = index_ptr(b, buf.w, c, bytes(taps));
                let w_flags = input_scalar_flags();
                let splats = if self.taps() <= MAX_PRELOADED_TAPS {
                    (0..self.taps())
                        .map(|t| {
                            let v = load(b, F32, w_flags, w, bytes(t as i64));
                            b.ins().splat(F32X4, v)
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let bias = buf.bias.map(|p| index_ptr(b, p, c, F32_BYTES));
                let operands = steps
                    .iter()
                    .zip(&operands_n)
                    .map(|(s, base)| match (s, base) {
                        (
                            Step::Binary {
                                channel_stride,
                                per_position,
                                ..
                            },
                            Some(p),
                        ) => {
                            let at = index_ptr(b, *p, c, bytes(*channel_stride));
                            if *per_position {
                                OperandAt::Delta(b.ins().isub(at, y_c))
                            } else {
                                OperandAt::Scalar(at)
                            }
                        }
                        _ => OperandAt::None,
                    })
                    .collect();
                let ch = ChannelData {
                    splats,
                    w,
                    w_flags,
                    bias,
                    operands,
                };
                let x_c = match &padded {
                    Some((p, buffer)) => buffer.fill(b, x_c, self.rows.input, self.src_width, *p),
                    None => x_c,
                };
                self.emit_channel(b, &ch, steps, x_c, y_c, failure);
                if let Some(function) = activation {
                    // The plane as one row: it was just written, so it is in L1 or L2.
                    let one = b.ins().iconst(I64, 1);
                    let floats = b.ins().iconst(I64, self.out_plane());
                    let no_bias = b.ins().iconst(I64, 0);
                    b.ins().call(function, &[y_c, one, floats, floats, no_bias]);
                }
                vec![]
            });
            vec![]
        });
    }

    /// The rows of one channel, segment by segment (each with its valid kernel rows).
    fn emit_channel(
        &self,
        b: &mut FunctionBuilder,
        ch: &ChannelData,
        steps: &[Step],
        x_c: Value,
        y_c: Value,
        failure: &mut Option<CodegenError>,
    ) {
        let in_w = self.cols.input as i64;
        let out_w = self.cols.output as i64;
        for seg in self.rows.segments() {
            let x0 = offset_ptr(b, x_c, bytes(self.rows.origin(seg.start) * in_w));
            let y0 = offset_ptr(b, y_c, bytes(seg.start as i64 * out_w));
            let kernel_rows = seg.tap_begin..seg.tap_end;
            counted_loop(b, seg.count, vec![x0, y0], |b, _, c| {
                self.emit_row(b, ch, steps, c[0], c[1], kernel_rows.clone(), failure);
                vec![
                    b.ins().iadd_imm_s(c[0], bytes(self.rows.stride as i64 * in_w)),
                    b.ins().iadd_imm_s(c[1], bytes(out_w)),
                ]
            });
        }
    }

    /// One output row: `x_row` is the input row of kernel row 0 (column 0; it may lie
    /// outside the plane, never read there), `y_row` the output row.
    #[allow(clippy::too_many_arguments)]
    fn emit_row(
        &self,
        b: &mut FunctionBuilder,
        ch: &ChannelData,
        steps: &[Step],
        x_row: Value,
        y_row: Value,
        kernel_rows: std::ops::Range<usize>,
        failure: &mut Option<CodegenError>,
    ) {
        for piece in &self.pieces {
            match piece {
                RowPiece::Edge(starts) => {
                    let accs = self.edge_tile(b, ch, x_row, starts, kernel_rows.clone());
                    for (&q, acc) in starts.iter().zip(accs) {
                        let lanes = (self.cols.output - q).min(LANES);
                        let y = offset_ptr(b, y_row, bytes(q as i64));
                        finish(b, ch, steps, acc, y, lanes, failure);
                    }
                }
                &RowPiece::Interior { start, tiles } => {
                    let xp = offset_ptr(b, x_row, bytes(self.cols.origin(start)));
                    let yp = offset_ptr(b, y_row, bytes(start as i64));
                    let width = (self.vectors * LANES) as i64;
                    counted_loop(b, tiles, vec![xp, yp], |b, _, c| {
                        let accs = self.interior_tile(b, ch, c[0], kernel_rows.clone());
                        for (v, acc) in accs.into_iter().enumerate() {
                            let y = offset_ptr(b, c[1], bytes((v * LANES) as i64));
                            finish(b, ch, steps, acc, y, LANES, failure);
                        }
                        vec![
                            b.ins().iadd_imm_s(c[0], bytes(width * self.cols.stride as i64)),
                            b.ins().iadd_imm_s(c[1], bytes(width)),
                        ]
                    });
                }
            }
        }
    }

    /// The weight of tap (ky, kx), splatted.
    fn weight(&self, b: &mut FunctionBuilder, ch: &ChannelData, ky: usize, kx: usize) -> Value {
        let t = ky * self.cols.kernel + kx;
        match ch.splats.get(t) {
            Some(&v) => v,
            None => {
                let v = load(b, F32, ch.w_flags, ch.w, bytes(t as i64));
                b.ins().splat(F32X4, v)
            }
        }
    }

    fn initial_accumulator(&self, b: &mut FunctionBuilder, ch: &ChannelData) -> Value {
        match ch.bias {
            Some(p) => {
                let v = load(b, F32, ch.w_flags, p, 0);
                b.ins().splat(F32X4, v)
            }
            None => splat_f32(b, 0.0),
        }
    }

    /// `vectors` accumulators of consecutive outputs whose windows lie inside the row;
    /// `x` is the window origin of the first.
    fn interior_tile(
        &self,
        b: &mut FunctionBuilder,
        ch: &ChannelData,
        x: Value,
        kernel_rows: std::ops::Range<usize>,
    ) -> Vec<Value> {
        let init = self.initial_accumulator(b, ch);
        if ch.splats.is_empty() && kernel_rows.len() > 1 {
            let origins: Vec<i64> = (0..self.vectors)
                .map(|v| (v * LANES * self.cols.stride) as i64)
                .collect();
            return self.tile_by_rows(b, ch, x, &origins, kernel_rows, init);
        }
        let mut sums: Vec<Sum> = (0..self.vectors).map(|_| Sum::new(init, self.fused())).collect();
        let stride = self.cols.stride;
        let three_wide_stride_two = stride == 2 && self.cols.kernel == 3 && self.cols.dilation == 1;
        for ky in kernel_rows {
            let row = (ky * self.rows.dilation * self.cols.input) as i64;
            if three_wide_stride_two {
                let weights = [0, 1, 2].map(|kx| self.weight(b, ch, ky, kx));
                for (v, sum) in sums.iter_mut().enumerate() {
                    let taps = stride_two_taps(b, x, bytes(row + (v * LANES * 2) as i64));
                    for (input, &wv) in taps.into_iter().zip(&weights) {
                        sum.add_product(b, input, wv);
                    }
                }
                sums.iter_mut().for_each(Sum::end_row);
                continue;
            }
            for kx in 0..self.cols.kernel {
                let wv = self.weight(b, ch, ky, kx);
                let tap = row + (kx * self.cols.dilation) as i64;
                for (v, sum) in sums.iter_mut().enumerate() {
                    let offset = bytes(tap + (v * LANES * stride) as i64);
                    let input = load_f32x4_strided(b, input_load_flags(), x, offset, stride);
                    sum.add_product(b, input, wv);
                }
            }
            sums.iter_mut().for_each(Sum::end_row);
        }
        sums.into_iter().map(|s| s.finish(b)).collect()
    }

    /// A tile for kernels whose weights do not stay in registers: a loop over the
    /// kernel rows with the accumulators carried, so only one row's weights are live
    /// (unrolled, Cranelift would hoist every tap's splat to the channel and spill them).
    /// `origins`: per vector, the input column of its first lane's window, relative to
    /// `x`; every lane must read inside the row.
    fn tile_by_rows(
        &self,
        b: &mut FunctionBuilder,
        ch: &ChannelData,
        x: Value,
        origins: &[i64],
        kernel_rows: std::ops::Range<usize>,
        init: Value,
    ) -> Vec<Value> {
        let row_pitch = bytes((self.rows.dilation * self.cols.input) as i64);
        let kw = self.cols.kernel;
        let stride = self.cols.stride;
        let mut carried = vec![
            offset_ptr(b, x, kernel_rows.start as i64 * row_pitch),
            offset_ptr(b, ch.w, bytes((kernel_rows.start * kw) as i64)),
        ];
        carried.extend(std::iter::repeat_n(init, origins.len()));
        let done = counted_loop(b, kernel_rows.len(), carried, |b, _, c| {
            let (x_row, w_row) = (c[0], c[1]);
            let weights: Vec<Value> = (0..kw)
                .map(|kx| {
                    let v = load(b, F32, ch.w_flags, w_row, bytes(kx as i64));
                    b.ins().splat(F32X4, v)
                })
                .collect();
            let mut next = vec![
                b.ins().iadd_imm_s(x_row, row_pitch),
                b.ins().iadd_imm_s(w_row, bytes(kw as i64)),
            ];
            for (&origin, &acc) in origins.iter().zip(&c[2..]) {
                let mut sum = Sum::new(acc, false);
                for (kx, &wv) in weights.iter().enumerate() {
                    let offset = bytes((kx * self.cols.dilation) as i64 + origin);
                    let input = load_f32x4_strided(b, input_load_flags(), x_row, offset, stride);
                    sum.add_product(b, input, wv);
                }
                next.push(sum.finish(b));
            }
            next
        });
        done[2..].to_vec()
    }

    /// Accumulators for the vectors at output columns `starts` of the row at `x_row`,
    /// every lane's taps checked at compile time.
    fn edge_tile(
        &self,
        b: &mut FunctionBuilder,
        ch: &ChannelData,
        x_row: Value,
        starts: &[usize],
        kernel_rows: std::ops::Range<usize>,
    ) -> Vec<Value> {
        let init = self.initial_accumulator(b, ch);
        let inside = starts.iter().all(|&q| {
            (0..LANES).all(|e| (0..self.cols.kernel).all(|kx| matches!(self.lane(q + e, kx), Lane::Load(_))))
        });
        if inside && ch.splats.is_empty() && kernel_rows.len() > 1 {
            let origins: Vec<i64> = starts.iter().map(|&q| self.cols.origin(q)).collect();
            return self.tile_by_rows(b, ch, x_row, &origins, kernel_rows, init);
        }
        let mut sums: Vec<Sum> = starts.iter().map(|_| Sum::new(init, self.fused())).collect();
        for ky in kernel_rows {
            let row = offset_ptr(b, x_row, bytes((ky * self.rows.dilation * self.cols.input) as i64));
            for kx in 0..self.cols.kernel {
                let inputs: Vec<Option<Value>> = starts
                    .iter()
                    .map(|&q| {
                        let lanes: [Lane; LANES] = std::array::from_fn(|e| self.lane(q + e, kx));
                        self.edge_input(b, row, &lanes)
                    })
                    .collect();
                if inputs.iter().all(Option::is_none) {
                    continue;
                }
                let wv = self.weight(b, ch, ky, kx);
                for (sum, input) in sums.iter_mut().zip(inputs) {
                    if let Some(input) = input {
                        sum.add_product(b, input, wv);
                    }
                }
            }
            sums.iter_mut().for_each(Sum::end_row);
        }
        sums.into_iter().map(|s| s.finish(b)).collect()
    }

    /// What output column `q` reads for kernel column `kx`.
    fn lane(&self, q: usize, kx: usize) -> Lane {
        if q >= self.cols.output {
            return Lane::Ignored;
        }
        let i = self.cols.origin(q) + (kx * self.cols.dilation) as i64;
        if i >= 0 && i < self.cols.input as i64 {
            Lane::Load(i)
        } else {
            Lane::Zero
        }
    }

    /// The input vector of one edge vector and tap (None when every lane reads padding).
    /// Loads only whole vectors inside the row: one (or, for stride 2, two) windows
    /// shuffled into the lanes, padding lanes masked to zero; rows narrower than a
    /// vector gather lane by lane.
    fn edge_input(&self, b: &mut FunctionBuilder, row: Value, lanes: &[Lane; LANES]) -> Option<Value> {
        let loads: Vec<(usize, i64)> = lanes
            .iter()
            .enumerate()
            .filter_map(|(e, l)| match l {
                Lane::Load(i) => Some((e, *i)),
                _ => None,
            })
            .collect();
        let (&(_, first), &(_, last)) = (loads.first()?, loads.last()?);
        let width = self.cols.input as i64;
        let all_load = loads.len() == LANES;
        if all_load && self.cols.stride <= 2 {
            // Every lane in the row: the plain (strided) load of the interior.
            return Some(load_f32x4_strided(
                b,
                input_load_flags(),
                row,
                bytes(first),
                self.cols.stride,
            ));
        }
        let lanes_n = LANES as i64;
        if width >= lanes_n {
            let a = first.min(width - lanes_n);
            let c = (last - (lanes_n - 1)).max(0);
            let covered = |i: i64| (a..a + lanes_n).contains(&i) || (c..c + lanes_n).contains(&i);
            if loads.iter().all(|&(_, i)| covered(i)) {
                let wa = load(b, F32X4, input_load_flags(), row, bytes(a));
                let wc = if c == a {
                    wa
                } else {
                    load(b, F32X4, input_load_flags(), row, bytes(c))
                };
                let select: [u8; LANES] = std::array::from_fn(|e| match lanes[e] {
                    Lane::Load(i) if (a..a + lanes_n).contains(&i) => (i - a) as u8,
                    Lane::Load(i) => (LANES as i64 + i - c) as u8,
                    _ => e as u8,
                });
                let identity = select == [0, 1, 2, 3];
                let v = if identity {
                    wa
                } else {
                    super::compute::shuffle_f32x4(b, wa, wc, select)
                };
                let keep: [bool; LANES] = std::array::from_fn(|e| lanes[e] != Lane::Zero);
                return Some(if keep.iter().all(|&k| k) {
                    v
                } else {
                    mask_lanes(b, v, keep)
                });
            }
        }
        let mut v = splat_f32(b, 0.0);
        for &(e, i) in &loads {
            let s = load(b, F32, input_scalar_flags(), row, bytes(i));
            v = b.ins().insertlane(v, s, e as u8);
        }
        Some(v)
    }
}

/// One accumulator's sum of products. By default every product is a term of one
/// balanced tree (`sum_tree`); with `fused` each kernel row is one chain of fused
/// multiply-adds and the rows' chains are the tree's terms: half the instructions,
/// chains no longer than a kernel row. Measured faster for 3x3 kernels, slower for
/// 5x5 (x86 `vfmadd213ps` ties its result to an operand: a copy per tap, and longer
/// latency chains), so `DepthwisePlan::fused` allows it up to `MAX_PRELOADED_TAPS`.
struct Sum {
    terms: Vec<Value>,
    row: Option<Value>,
    fused: bool,
}

impl Sum {
    fn new(init: Value, fused: bool) -> Sum {
        Sum {
            terms: vec![init],
            row: None,
            fused,
        }
    }

    fn add_product(&mut self, b: &mut FunctionBuilder, x: Value, w: Value) {
        if !self.fused {
            self.terms.push(b.ins().fmul(x, w));
            return;
        }
        self.row = Some(match self.row {
            None => b.ins().fmul(x, w),
            Some(acc) => b.ins().fma(x, w, acc),
        });
    }

    fn end_row(&mut self) {
        self.terms.extend(self.row.take());
    }

    fn finish(mut self, b: &mut FunctionBuilder) -> Value {
        self.end_row();
        sum_tree(b, self.terms)
    }
}

/// The sum of `terms` (at least one) as a balanced tree: a tile's accumulators would
/// otherwise be one dependent chain of adds per vector, and Cranelift emits each
/// vector's chain whole before the next, which leaves the adds waiting on latency.
fn sum_tree(b: &mut FunctionBuilder, mut terms: Vec<Value>) -> Value {
    while terms.len() > 1 {
        terms = terms
            .chunks(2)
            .map(|pair| match *pair {
                [x, y] => b.ins().fadd(x, y),
                [x] => x,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    terms[0]
}

/// `v` with the lanes not kept set to +0.0.
fn mask_lanes(b: &mut FunctionBuilder, v: Value, keep: [bool; LANES]) -> Value {
    let bytes: Vec<u8> = keep.iter().flat_map(|&k| [if k { 0xff } else { 0 }; 4]).collect();
    let constant = b.func.dfg.constants.insert(bytes.into());
    let mask = b.ins().vconst(I8X16, constant);
    let flags = MemFlagsData::new().with_endianness(Endianness::Little);
    let mask = b.ins().bitcast(F32X4, flags, mask);
    b.ins().band(v, mask)
}

/// The AVX2+FMA function of an all-unary epilogue (see `microkernel::activation`), when
/// the graph being compiled has one.
fn activation_function(b: &mut FunctionBuilder, steps: &[Step]) -> Option<FuncRef> {
    let unary: Vec<UnaryFn> = steps
        .iter()
        .map(|s| match s {
            Step::Unary(f) => Some(*f),
            Step::Binary { .. } => None,
        })
        .collect::<Option<_>>()?;
    let spec = ActivationSpec::new(false, &unary)?;
    activation::import(b.func, &spec)
}

/// Applies the epilogue to an accumulator vector and stores its first `lanes` lanes
/// at `y`.
fn finish(
    b: &mut FunctionBuilder,
    ch: &ChannelData,
    steps: &[Step],
    mut acc: Value,
    y: Value,
    lanes: usize,
    failure: &mut Option<CodegenError>,
) {
    for (step, at) in steps.iter().zip(&ch.operands) {
        let result = match step {
            Step::Unary(f) => unary_lane(b, *f, DType::F32, acc),
            Step::Binary { func, .. } => {
                let operand = match *at {
                    OperandAt::Delta(delta) => {
                        let p = b.ins().iadd(y, delta);
                        if lanes == LANES {
                            load(b, F32X4, input_load_flags(), p, 0)
                        } else {
                            let mut v = splat_f32(b, 0.0);
                            for e in 0..lanes {
                                let s = load(b, F32, input_scalar_flags(), p, bytes(e as i64));
                                v = b.ins().insertlane(v, s, e as u8);
                            }
                            v
                        }
                    }
                    OperandAt::Scalar(p) => {
                        let s = load(b, F32, input_scalar_flags(), p, 0);
                        b.ins().splat(F32X4, s)
                    }
                    OperandAt::None => {
                        *failure = Some(CodegenError("internal: depthwise epilogue operand missing".into()));
                        return;
                    }
                };
                binary_lane(b, *func, DType::F32, acc, operand)
            }
        };
        match result {
            Ok(v) => acc = v,
            Err(e) => {
                *failure = Some(e);
                return;
            }
        }
    }
    store_lanes(b, acc, y, lanes);
}

/// Stores the first `lanes` lanes of `v` at `y`.
fn store_lanes(b: &mut FunctionBuilder, v: Value, y: Value, lanes: usize) {
    if lanes >= LANES {
        store(b, vector_flags(), v, y, 0);
        return;
    }
    let mut e = 0;
    if lanes >= 2 {
        let flags = MemFlagsData::new().with_endianness(Endianness::Little);
        let pair = b.ins().bitcast(F64X2, flags, v);
        let low = b.ins().extractlane(pair, 0);
        store(b, scalar_flags(), low, y, 0);
        debug_assert_eq!(b.func.dfg.value_type(low), F64);
        e = 2;
    }
    while e < lanes {
        let s = b.ins().extractlane(v, e as u8);
        store(b, scalar_flags(), s, y, bytes(e as i64));
        e += 1;
    }
}

/// The pieces of one output row: edge vectors before the interior (columns whose
/// windows reach into the left padding), a loop of interior tiles, then the rest,
/// whose last vector ends at the row's end (overlapping its neighbour when the width
/// is not a multiple of 4).
fn row_pieces(cols: &AxisWindow, vectors: usize) -> Vec<RowPiece> {
    let out = cols.output;
    let (lo, hi) = cols
        .segments()
        .iter()
        .find(|s| s.tap_begin == 0 && s.tap_end == cols.kernel)
        .map_or((out, out), |s| (s.start, s.start + s.count));
    let vector_at = |p: usize| {
        if p + LANES > out && out >= LANES {
            out - LANES
        } else {
            p
        }
    };
    let mut left = Vec::new();
    let mut p = 0;
    while p < lo.min(out) {
        left.push(vector_at(p));
        p += LANES;
    }
    let width = vectors * LANES;
    let tiles = if hi > p { (hi - p) / width } else { 0 };
    let interior_start = p;
    p += tiles * width;
    let mut right = Vec::new();
    while p < out {
        right.push(vector_at(p));
        p += LANES;
    }
    let mut pieces = Vec::new();
    let mut push_edges = |starts: Vec<usize>| {
        for chunk in starts.chunks(vectors) {
            pieces.push(RowPiece::Edge(chunk.to_vec()));
        }
    };
    if tiles == 0 {
        left.extend(right);
        push_edges(left);
    } else {
        push_edges(left);
        pieces.push(RowPiece::Interior {
            start: interior_start,
            tiles,
        });
        let mut rest = Vec::new();
        for chunk in right.chunks(vectors) {
            rest.push(RowPiece::Edge(chunk.to_vec()));
        }
        pieces.extend(rest);
    }
    pieces
}

/// The node's epilogue as per-vector steps, or None when an operand is not addressable
/// per vector of output positions (nor constant along them).
fn epilogue_steps(g: &Graph, node: &Node, plan: &DepthwisePlan) -> Option<Vec<Step>> {
    let out_shape = g.ty(node.outputs[0]).shape.clone();
    let natural = [plan.cols.output as i64, 1];
    let mut steps = Vec::with_capacity(node.epilogue.len());
    for step in &node.epilogue {
        steps.push(match *step {
            EpilogueStep::Unary(f) => {
                check_unary(f, DType::F32).ok()?;
                Step::Unary(f)
            }
            EpilogueStep::Binary { func, operand } => {
                let ty = g.ty(*node.inputs.get(operand)?);
                if ty.dtype != DType::F32 || func.is_comparison() || func.is_logical() {
                    return None;
                }
                check_binary(func, DType::F32).ok()?;
                let strides = super::map::broadcast_strides(&ty.shape, &out_shape).ok()?;
                let along: Vec<(i64, i64)> = out_shape[2..]
                    .iter()
                    .zip(&strides[2..])
                    .zip(natural)
                    .filter(|((extent, _), _)| **extent > 1)
                    .map(|((_, &s), n)| (n, s))
                    .collect();
                let per_position = if along.iter().all(|&(_, s)| s == 0) {
                    false
                } else if along.iter().all(|&(n, s)| s == n) {
                    true
                } else {
                    return None;
                };
                Step::Binary {
                    func,
                    input: operand,
                    image_stride: strides[0],
                    channel_stride: strides[1],
                    per_position,
                }
            }
        });
    }
    Some(steps)
}

/// The inputs of the three taps of a 3-wide, stride-2 window row for four consecutive
/// outputs whose first window starts at `offset` bytes from `x`: elements 0,2,4,6 /
/// 1,3,5,7 / 2,4,6,8. Three loads (elements 0..4, 4..8, 5..9: no further than the last
/// tap reads) and three `shufps`, where one strided load per tap takes six loads.
fn stride_two_taps(b: &mut FunctionBuilder, x: Value, offset: i64) -> [Value; 3] {
    let low = load(b, F32X4, input_load_flags(), x, offset);
    let high = load(b, F32X4, input_load_flags(), x, offset + bytes(4));
    let last = load(b, F32X4, input_load_flags(), x, offset + bytes(5));
    let even = shuffle_f32x4(b, low, high, [0, 2, 4, 6]);
    let odd = shuffle_f32x4(b, low, high, [1, 3, 5, 7]);
    let shifted = shuffle_f32x4(b, even, last, [1, 2, 5, 7]);
    [even, odd, shifted]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(input: usize, kernel: usize, stride: usize, pad_begin: usize, pad_end: usize) -> AxisWindow {
        let output = (input + pad_begin + pad_end - kernel) / stride + 1;
        AxisWindow {
            input,
            output,
            kernel,
            stride,
            dilation: 1,
            pad_begin,
            pad_end,
        }
    }

    fn covered(pieces: &[RowPiece], vectors: usize, out: usize) -> Vec<bool> {
        let mut seen = vec![false; out];
        for piece in pieces {
            let starts: Vec<usize> = match piece {
                RowPiece::Edge(s) => s.clone(),
                RowPiece::Interior { start, tiles } => (0..tiles * vectors).map(|v| start + v * LANES).collect(),
            };
            for s in starts {
                seen[s..(s + LANES).min(out)].fill(true);
            }
        }
        seen
    }

    #[test]
    fn row_pieces_cover_every_column_with_the_interior_in_one_loop() {
        for input in 1..40 {
            for kernel in [1, 3, 5] {
                for stride in [1, 2] {
                    for pads in [(0, 0), (1, 1), (2, 2), (0, 3), (4, 1)] {
                        if input + pads.0 + pads.1 < kernel {
                            continue;
                        }
                        let a = cols(input, kernel, stride, pads.0, pads.1);
                        let pieces = row_pieces(&a, 3);
                        assert!(covered(&pieces, 3, a.output).iter().all(|&s| s), "{a:?}: {pieces:?}");
                        assert!(
                            pieces.iter().filter(|p| matches!(p, RowPiece::Interior { .. })).count() <= 1,
                            "{a:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wide_rows_run_mostly_in_the_interior_loop() {
        let a = cols(112, 3, 1, 1, 1);
        let pieces = row_pieces(&a, 3);
        let interior: usize = pieces
            .iter()
            .map(|p| match p {
                RowPiece::Interior { tiles, .. } => tiles * 12,
                RowPiece::Edge(_) => 0,
            })
            .sum();
        assert!(interior >= 96, "{pieces:?}");
        assert_eq!(pieces.first(), Some(&RowPiece::Edge(vec![0])));
    }
}
