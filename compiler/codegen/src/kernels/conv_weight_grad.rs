//! A convolution's weight gradient (`Op::ConvWeightGrad`), f32, one or two spatial
//! axes, computed directly: for each weight tap, the dot product of dy's plane with
//! x's plane shifted by the tap, over the batch.
//!
//! Meant for few input channels per group (depthwise convolutions, a first layer over
//! one image channel), where the GEMM form (stacked taps times dy) pays for stacking
//! and transposing x and dy and runs a product with very few columns. Per (output map,
//! input channel) pair and image, each tap runs over the rows whose input row is
//! inside x, and along a row over the outputs whose input column is inside x (both
//! ranges compile-time constants, so no bounds tests), four f32x4 accumulators
//! deep; the tap's sum is added into dw once per image.

use cnnc_ir::{Op, Scalar};
use cranelift_codegen::ir::{
    FuncRef, InstBuilder, StackSlotData, StackSlotKind, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::transposed_input_range;
use super::compute::{
    F32_BYTES, LANES, counted_loop, tiled_loop, index_ptr, load, load_f32x4_strided, offset_ptr,
    scalar_flags, store, vector_flags,
};
use super::movement::emit_fill;
use super::compute::{f32_input_gradient_operands, misrouted, transpose4};
use pointwise_weight_grad::PointwisePlan;

// A sibling file, declared here: it is this kernel's pointwise path.
#[path = "pointwise_weight_grad.rs"]
mod pointwise_weight_grad;
use super::{CodegenError, KernelCtx};
use crate::microkernel::conv_weight_grad_x86::{self, WeightGradSpec};

/// Independent vector accumulators per row (hides the add latency).
const ACCUMULATORS: usize = 4;

/// Vectors of a row unrolled; longer rows loop over blocks of `ACCUMULATORS` vectors.
const UNROLLED_VECTORS: usize = 16;

/// Kernel rows up to this wide share the loads of dy between their taps (an
/// accumulator per tap must stay in registers).
const MAX_SHARED_TAPS: usize = 7;

/// Code-size bound on kernel taps (each is its own loop nest).
const MAX_TAPS: usize = 121;

/// One spatial axis: input extent, output extent, kernel extent, stride, dilation, pad.
#[derive(Clone, Copy)]
struct Axis {
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
}

impl Axis {
    /// Outputs whose tap `k` reads inside the input.
    fn valid_outputs(&self, k: usize) -> (usize, usize) {
        transposed_input_range(self.output, self.input, self.stride, self.dilation, self.pad_begin, k)
    }

    /// Input position of output `o` at tap `k` (inside for valid outputs).
    fn input_of(&self, o: usize, k: usize) -> i64 {
        (o * self.stride + k * self.dilation) as i64 - self.pad_begin as i64
    }
}

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::ConvWeightGrad(geometry) = &k.node.op else {
        return Err(misrouted(k, "conv_weight_grad"));
    };
    f32_input_gradient_operands(k)?;
    // Field borrows, so that `k.b` stays free for the machine-code path.
    let (x, dy, dw) = (k.graph.ty(k.node.inputs[0]), k.graph.ty(k.node.inputs[1]), k.graph.ty(k.node.outputs[0]));
    let fail = |msg: String| CodegenError(format!("conv_weight_grad node '{}': {msg}", k.node.name));
    let spatial = x.rank().saturating_sub(2);
    if !(1..=2).contains(&spatial) || dy.rank() != x.rank() || dw.rank() != x.rank() {
        return Err(fail(format!("input {x}, gradient {dy}, weight {dw}: only one or two spatial axes")));
    }
    let mut axes: Vec<Axis> = (0..spatial)
        .map(|d| Axis {
            input: x.shape[2 + d],
            output: dy.shape[2 + d],
            kernel: dw.shape[2 + d],
            stride: geometry.strides[d],
            dilation: geometry.dilations[d],
            pad_begin: geometry.pads_begin[d],
        })
        .collect();
    if spatial == 1 {
        axes.insert(0, Axis { input: 1, output: 1, kernel: 1, stride: 1, dilation: 1, pad_begin: 0 });
    }
    // A pointwise kernel over unpadded planes (a per-channel dot product: BatchNorm's sums
    // of products) reads each plane as one row, so rows of a few vectors do not each pay
    // for a loop and a horizontal sum.
    let pointwise = axes.iter().all(|a| a.kernel == 1 && a.stride == 1 && a.pad_begin == 0 && a.input == a.output);
    if pointwise {
        let plane = axes[0].input * axes[1].input;
        axes[0] = Axis { input: 1, output: 1, kernel: 1, stride: 1, dilation: 1, pad_begin: 0 };
        axes[1] = Axis { input: plane, output: plane, kernel: 1, stride: 1, dilation: 1, pad_begin: 0 };
    }
    let taps = axes[0].kernel * axes[1].kernel;
    if taps > MAX_TAPS {
        return Err(fail(format!("{taps} kernel taps (limit {MAX_TAPS}): use the GEMM form")));
    }
    let groups = geometry.groups;
    let (channels_per_group, maps_per_group) = (x.shape[1] / groups, dy.shape[1] / groups);
    if pointwise && channels_per_group * maps_per_group > 1 {
        let plan = PointwisePlan {
            batch: x.shape[0],
            groups,
            channels_per_group,
            maps_per_group,
            positions: axes[1].input,
            fused: crate::math::fused_multiply_add(),
        };
        plan.emit(k.b, k.inputs[0], k.inputs[1], k.outputs[0]);
        return Ok(());
    }
    if let Some(spec) = WeightGradSpec::of_node(k.graph, k.node)
        && let Some(code) = conv_weight_grad_x86::import(k.b.func, &spec)
    {
        emit_machine_code(k.b, &spec, code, x.shape[0], k.inputs[0], k.inputs[1], k.outputs[0]);
        return Ok(());
    }
    let plan = Plan {
        batch: x.shape[0],
        channels: x.shape[1],
        maps: dy.shape[1],
        groups,
        channels_per_group: x.shape[1] / groups,
        maps_per_group: dy.shape[1] / groups,
        in_plane: axes[0].input * axes[1].input,
        out_plane: axes[0].output * axes[1].output,
        rows: axes[0],
        cols: axes[1],
        fused: crate::math::fused_multiply_add(),
    };
    plan.emit(k.b, k.inputs[0], k.inputs[1], k.outputs[0]);
    Ok(())
}

/// Ungrouped unpadded 2-D weight gradients on AVX2+FMA (`microkernel::conv_weight_grad_x86`):
/// per image, dy is transposed channels-last into a stack buffer (maps padded to whole
/// vectors, the pad lanes zero), then the machine code adds the image's products
/// into running sums dwᵀ [taps, padded maps] on the stack, written out as dw at the end.
#[allow(clippy::too_many_arguments)]
fn emit_machine_code(b: &mut FunctionBuilder, spec: &WeightGradSpec, code: FuncRef, batch: usize, x: Value, dy: Value, dw: Value) {
    let scratch = spec.scratch_bytes();
    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, scratch as u32, 5));
    let dy_t = b.ins().stack_addr(I64, slot, 0);
    let zero = b.ins().f32const(0.0);
    let zeros = b.ins().splat(F32X4, zero);
    let (tail, rest) = tiled_loop(b, scratch / 4, LANES, vec![dy_t], |b, _, p| {
        store(b, vector_flags(), zeros, p[0], 0);
        vec![b.ins().iadd_imm_s(p[0], bytes(LANES))]
    });
    counted_loop(b, rest, tail, |b, _, p| {
        store(b, scalar_flags(), zero, p[0], 0);
        vec![b.ins().iadd_imm_s(p[0], F32_BYTES)]
    });
    let dw_t = offset_ptr(b, dy_t, spec.dy_t_bytes() as i64);
    let (maps, positions, taps, padded) = (spec.maps, spec.positions(), spec.taps(), spec.padded_maps());
    let x_image = bytes(spec.channels * spec.in_h * spec.in_w);
    counted_loop(b, batch, vec![], |b, n, _| {
        let x_n = index_ptr(b, x, n, x_image);
        let dy_n = index_ptr(b, dy, n, bytes(maps * positions));
        // Groups of 4 maps by 4x4 register transposes (maps past the last read as zeros,
        // into pad lanes); positions past the last multiple of 4 one at a time.
        for first in (0..maps).step_by(LANES) {
            let count = (maps - first).min(LANES);
            let src = offset_ptr(b, dy_n, bytes(first * positions));
            let dst = offset_ptr(b, dy_t, bytes(first));
            let (at, rest) = tiled_loop(b, positions, LANES, vec![src, dst], |b, _, c| {
                let rows: Vec<Value> = (0..LANES)
                    .map(|i| if i < count { load(b, F32X4, vector_flags(), c[0], bytes(i * positions)) } else { zeros })
                    .collect();
                let columns = transpose4(b, &rows);
                for (j, column) in columns.into_iter().enumerate() {
                    store(b, vector_flags(), column, c[1], bytes(j * padded));
                }
                vec![b.ins().iadd_imm_s(c[0], bytes(LANES)), b.ins().iadd_imm_s(c[1], bytes(LANES * padded))]
            });
            counted_loop(b, rest, at, |b, _, c| {
                for i in 0..count {
                    let e = load(b, F32, scalar_flags(), c[0], bytes(i * positions));
                    store(b, scalar_flags(), e, c[1], bytes(i));
                }
                vec![b.ins().iadd_imm_s(c[0], F32_BYTES), b.ins().iadd_imm_s(c[1], bytes(padded))]
            });
        }
        b.ins().call(code, &[x_n, dy_t, dw_t]);
        vec![]
    });
    counted_loop(b, maps, vec![dw, dw_t], |b, _, map| {
        counted_loop(b, taps, map.to_vec(), |b, _, c| {
            let e = load(b, F32, scalar_flags(), c[1], 0);
            store(b, scalar_flags(), e, c[0], 0);
            vec![b.ins().iadd_imm_s(c[0], F32_BYTES), b.ins().iadd_imm_s(c[1], bytes(padded))]
        });
        vec![b.ins().iadd_imm_s(map[0], bytes(taps)), b.ins().iadd_imm_s(map[1], F32_BYTES)]
    });
}

struct Plan {
    batch: usize,
    channels: usize,
    maps: usize,
    groups: usize,
    channels_per_group: usize,
    maps_per_group: usize,
    in_plane: usize,
    out_plane: usize,
    rows: Axis,
    cols: Axis,
    fused: bool,
}

fn bytes(elements: usize) -> i64 {
    elements as i64 * F32_BYTES
}

impl Plan {
    fn taps(&self) -> usize {
        self.rows.kernel * self.cols.kernel
    }

    /// Images outermost, so x and dy stream through memory in order (the planes of one
    /// channel are a whole image apart); each image adds its share into dw.
    fn emit(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value) {
        emit_fill(b, dw, self.maps * self.channels_per_group * self.taps(), Scalar::F32(0.0));
        counted_loop(b, self.batch, vec![], |b, image, _| {
            let x_image = index_ptr(b, x, image, bytes(self.channels * self.in_plane));
            let dy_image = index_ptr(b, dy, image, bytes(self.maps * self.out_plane));
            counted_loop(b, self.groups, vec![], |b, group, _| {
                let x_group = index_ptr(b, x_image, group, bytes(self.channels_per_group * self.in_plane));
                let dy_group = index_ptr(b, dy_image, group, bytes(self.maps_per_group * self.out_plane));
                let dw_group =
                    index_ptr(b, dw, group, bytes(self.maps_per_group * self.channels_per_group * self.taps()));
                counted_loop(b, self.maps_per_group, vec![], |b, map, _| {
                    let dy_plane = index_ptr(b, dy_group, map, bytes(self.out_plane));
                    let dw_map = index_ptr(b, dw_group, map, bytes(self.channels_per_group * self.taps()));
                    counted_loop(b, self.channels_per_group, vec![], |b, channel, _| {
                        let x_plane = index_ptr(b, x_group, channel, bytes(self.in_plane));
                        let dw_pair = index_ptr(b, dw_map, channel, bytes(self.taps()));
                        self.emit_taps(b, x_plane, dy_plane, dw_pair);
                        vec![]
                    });
                    vec![]
                });
                vec![]
            });
            vec![]
        });
    }

    /// dw[tap] += Σ over one image's valid outputs of dy · x at the tap.
    fn emit_taps(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value) {
        let (rows, cols) = (self.rows, self.cols);
        for kh in 0..rows.kernel {
            if cols.kernel <= MAX_SHARED_TAPS {
                self.emit_kernel_row(b, x, dy, dw, kh);
                continue;
            }
            let (oh_begin, oh_end) = rows.valid_outputs(kh);
            for kw in 0..cols.kernel {
                let (ow_begin, ow_end) = cols.valid_outputs(kw);
                if oh_begin >= oh_end || ow_begin >= ow_end {
                    continue;
                }
                let x_start = rows.input_of(oh_begin, kh) * bytes(cols.input) + bytes(1) * cols.input_of(ow_begin, kw);
                let x0 = offset_ptr(b, x, x_start);
                let dy0 = offset_ptr(b, dy, bytes(oh_begin * cols.output + ow_begin));
                let zero = b.ins().f32const(0.0);
                let zeros = b.ins().splat(F32X4, zero);
                let mut carried = vec![x0, dy0, zero];
                carried.extend([zeros; ACCUMULATORS]);
                let x_row_step = bytes(rows.stride * cols.input);
                let dy_row_step = bytes(cols.output);
                let done = counted_loop(b, oh_end - oh_begin, carried, |b, _, c| {
                    let (scalar, vectors) = self.emit_row_dot(b, c[0], c[1], ow_end - ow_begin, c[2], &c[3..]);
                    let mut next = vec![b.ins().iadd_imm_s(c[0], x_row_step), b.ins().iadd_imm_s(c[1], dy_row_step), scalar];
                    next.extend(vectors);
                    next
                });
                let total = horizontal_sum(b, done[2], &done[3..]);
                let at = bytes(kh * cols.kernel + kw);
                let old = load(b, F32, scalar_flags(), dw, at);
                let sum = b.ins().fadd(old, total);
                store(b, scalar_flags(), sum, dw, at);
            }
        }
    }

    /// dw[kh, kw] += Σ over one image for every kw at once: along each row, the outputs
    /// every tap reads inside x (the intersection of their ranges) load dy once for all
    /// taps; the few outputs only some taps read (next to padding) run per tap.
    fn emit_kernel_row(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value, kh: usize) {
        let (rows, cols) = (self.rows, self.cols);
        let (oh_begin, oh_end) = rows.valid_outputs(kh);
        let ranges: Vec<(usize, usize)> = (0..cols.kernel).map(|kw| cols.valid_outputs(kw)).collect();
        let taps: Vec<usize> = (0..cols.kernel).filter(|&kw| ranges[kw].0 < ranges[kw].1).collect();
        if oh_begin >= oh_end || taps.is_empty() {
            return;
        }
        let shared_begin = taps.iter().map(|&kw| ranges[kw].0).max().unwrap_or(0);
        let shared_end = taps.iter().map(|&kw| ranges[kw].1).min().unwrap_or(0).max(shared_begin);
        // Several accumulators per tap hide the add latency while the taps are few.
        let per_tap = match taps.len() {
            1 => ACCUMULATORS,
            2..=3 => 2,
            _ => 1,
        };
        let (stride, dilation) = (cols.stride, cols.dilation);
        let x_row0 = offset_ptr(b, x, rows.input_of(oh_begin, kh) * bytes(cols.input));
        let dy_row0 = offset_ptr(b, dy, bytes(oh_begin * cols.output));
        let zero = b.ins().f32const(0.0);
        let zeros = b.ins().splat(F32X4, zero);
        let mut carried = vec![x_row0, dy_row0];
        carried.extend(vec![zeros; taps.len() * per_tap]);
        let done = counted_loop(b, oh_end - oh_begin, carried, |b, _, c| {
            let (x_row, dy_row) = (c[0], c[1]);
            let mut accs = c[2..].to_vec();
            if shared_begin < shared_end {
                let xp = offset_ptr(b, x_row, bytes(1) * cols.input_of(shared_begin, 0));
                let dyp = offset_ptr(b, dy_row, bytes(shared_begin));
                // Few taps: short rows unrolled whole, long ones in blocks of one vector per
                // accumulator. More taps: one vector per iteration (unrolling made
                // Cranelift keep the shared loads of x live and spill; measured 2x slower
                // on lenet5's 5x5 taps).
                let count = shared_end - shared_begin;
                let block = match (per_tap, count / LANES <= UNROLLED_VECTORS) {
                    (1, _) => LANES,
                    (_, true) => count - count % LANES,
                    (_, false) => per_tap * LANES,
                };
                let mut cursors = vec![xp, dyp];
                cursors.extend(accs.iter().copied());
                let (after, rest) = tiled_loop(b, count, block.max(LANES), cursors, |b, _, l| {
                    let mut next_accs = l[2..].to_vec();
                    for v in 0..block / LANES {
                        let g = load(b, F32X4, vector_flags(), l[1], bytes(v * LANES));
                        for (i, &kw) in taps.iter().enumerate() {
                            let at = bytes(v * LANES * stride + kw * dilation);
                            let xv = load_f32x4_strided(b, vector_flags(), l[0], at, stride);
                            let slot = i * per_tap + v % per_tap;
                            next_accs[slot] = self.fma(b, xv, g, next_accs[slot]);
                        }
                    }
                    let mut next = vec![b.ins().iadd_imm_s(l[0], bytes(block * stride)), b.ins().iadd_imm_s(l[1], bytes(block))];
                    next.extend(next_accs);
                    next
                });
                let (xp, dyp) = (after[0], after[1]);
                accs = after[2..].to_vec();
                let element = rest - rest % LANES;
                for v in 0..rest / LANES {
                    let g = load(b, F32X4, vector_flags(), dyp, bytes(v * LANES));
                    for (i, &kw) in taps.iter().enumerate() {
                        let at = bytes(v * LANES * stride + kw * dilation);
                        let xv = load_f32x4_strided(b, vector_flags(), xp, at, stride);
                        let slot = i * per_tap + v % per_tap;
                        accs[slot] = self.fma(b, xv, g, accs[slot]);
                    }
                }
                for e in element..rest {
                    let g = load(b, F32, scalar_flags(), dyp, bytes(e));
                    for (i, &kw) in taps.iter().enumerate() {
                        let xv = load(b, F32, scalar_flags(), xp, bytes(e * stride + kw * dilation));
                        let product = b.ins().fmul(xv, g);
                        let lane0 = b.ins().scalar_to_vector(F32X4, product);
                        accs[i * per_tap] = b.ins().fadd(accs[i * per_tap], lane0);
                    }
                }
            }
            for (i, &kw) in taps.iter().enumerate() {
                let (begin, end) = ranges[kw];
                for (from, to) in [(begin, shared_begin.min(end)), (shared_end.max(begin), end)] {
                    if from >= to {
                        continue;
                    }
                    let xl = offset_ptr(b, x_row, bytes(1) * cols.input_of(from, kw));
                    let dyl = offset_ptr(b, dy_row, bytes(from));
                    let slots = i * per_tap..(i + 1) * per_tap;
                    let (scalar, vectors) = self.emit_row_dot(b, xl, dyl, to - from, zero, &accs[slots.clone()]);
                    accs.splice(slots.clone(), vectors);
                    let lane0 = b.ins().scalar_to_vector(F32X4, scalar);
                    accs[slots.start] = b.ins().fadd(accs[slots.start], lane0);
                }
            }
            let mut next = vec![
                b.ins().iadd_imm_s(x_row, bytes(rows.stride * cols.input)),
                b.ins().iadd_imm_s(dy_row, bytes(cols.output)),
            ];
            next.extend(accs);
            next
        });
        for (i, &kw) in taps.iter().enumerate() {
            let total = horizontal_sum(b, zero, &done[2 + i * per_tap..2 + (i + 1) * per_tap]);
            let at = bytes(kh * cols.kernel + kw);
            let old = load(b, F32, scalar_flags(), dw, at);
            let sum = b.ins().fadd(old, total);
            store(b, scalar_flags(), sum, dw, at);
        }
    }

    /// Adds dy[0..count]·x[0, stride, ..] into the accumulators.
    fn emit_row_dot(
        &self,
        b: &mut FunctionBuilder,
        x: Value,
        dy: Value,
        count: usize,
        scalar: Value,
        vectors: &[Value],
    ) -> (Value, Vec<Value>) {
        let stride = self.cols.stride;
        let mut accs = vectors.to_vec();
        let vector_count = count / LANES;
        let (mut x, mut dy, mut first_vector) = (x, dy, 0);
        if vector_count > UNROLLED_VECTORS {
            let block = accs.len() * LANES;
            let blocks = count / block;
            let mut carried = vec![x, dy];
            carried.extend(accs.iter().copied());
            let done = counted_loop(b, blocks, carried, |b, _, c| {
                let mut next_accs = c[2..].to_vec();
                for (v, acc) in next_accs.iter_mut().enumerate() {
                    *acc = self.multiply_add(b, c[0], c[1], v * LANES, *acc);
                }
                let mut next = vec![b.ins().iadd_imm_s(c[0], bytes(block * stride)), b.ins().iadd_imm_s(c[1], bytes(block))];
                next.extend(next_accs);
                next
            });
            (x, dy) = (done[0], done[1]);
            accs = done[2..].to_vec();
            first_vector = blocks * vectors.len();
        }
        for (i, v) in (first_vector..vector_count).enumerate() {
            let element = (v - first_vector) * LANES;
            let slot = i % accs.len();
            accs[slot] = self.multiply_add(b, x, dy, element, accs[slot]);
        }
        let mut scalar = scalar;
        for e in (vector_count - first_vector) * LANES..count - first_vector * LANES {
            let xv = load(b, F32, scalar_flags(), x, bytes(e * stride));
            let g = load(b, F32, scalar_flags(), dy, bytes(e));
            scalar = self.fma(b, xv, g, scalar);
        }
        (scalar, accs)
    }

    /// acc + dy[element..+4] · x[element·stride..] (strided).
    fn multiply_add(&self, b: &mut FunctionBuilder, x: Value, dy: Value, element: usize, acc: Value) -> Value {
        let xv = load_f32x4_strided(b, vector_flags(), x, bytes(element * self.cols.stride), self.cols.stride);
        let g = load(b, F32X4, vector_flags(), dy, bytes(element));
        self.fma(b, xv, g, acc)
    }

    fn fma(&self, b: &mut FunctionBuilder, x: Value, y: Value, acc: Value) -> Value {
        if self.fused {
            b.ins().fma(x, y, acc)
        } else {
            let p = b.ins().fmul(x, y);
            b.ins().fadd(acc, p)
        }
    }
}

/// scalar + the sum of every lane of `vectors`.
fn horizontal_sum(b: &mut FunctionBuilder, scalar: Value, vectors: &[Value]) -> Value {
    let mut v = vectors[0];
    for &other in &vectors[1..] {
        v = b.ins().fadd(v, other);
    }
    let mut total = scalar;
    for lane in 0..LANES {
        let e = b.ins().extractlane(v, lane as u8);
        total = b.ins().fadd(total, e);
    }
    total
}
