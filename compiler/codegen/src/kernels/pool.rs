//! Max and average pooling (`Op::Pool`) over any number of spatial axes, f32.
//!
//! One plane (batch × channel) at a time; each spatial axis is split into window
//! segments (`compute::window`), so tap ranges, and with them the average's divisor,
//! are compile-time constants and no bounds are tested. Along the innermost axis a
//! tile holds two f32x4 accumulators (8 consecutive outputs), then one, then
//! scalars. The first tap starts the accumulator (no reduction with the identity).
//! 2-D windows whose columns overlap are separable: per output row, the columns are
//! reduced over the vertical taps into a stack buffer, which is then pooled along the
//! row. Max propagates NaN; an empty window yields -inf (max) or 0/divisor (average;
//! NaN when nothing counts).

use cnnc_ir::{DType, Op, PoolKind};
use cranelift_codegen::ir::{
    InstBuilder, StackSlotData, StackSlotKind, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::{AxisWindow, Segment};
use super::compute::{
    F32_BYTES, LANES, counted_loop, float_minmax_nan, index_ptr, load, load_f32x4_strided,
    offset_ptr, require_buffers, require_dtype, require_plain_layout, scalar_flags, store,
    tiled_loop, vector_flags,
};
use super::compute::misrouted;
use super::{CodegenError, KernelCtx};

/// Innermost kernel axes up to this many taps are unrolled; longer ones loop.
const UNROLL_TAPS: usize = 8;

/// Code-size bound: tiles one pool may emit (ordinary layers need < 50).
const MAX_TILE_BODIES: usize = 20_000;

/// f32x4 accumulators in the widest tile.
const TILE_VECTORS: usize = 2;

/// Widest input row (bytes) whose column reductions the separable 2-D path keeps in a
/// stack buffer.
const MAX_ROW_BUFFER_BYTES: usize = 64 << 10;

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::Pool(attrs) = &k.node.op else {
        return Err(misrouted(k, "pool"));
    };
    require_plain_layout(k)?;
    require_buffers(k, 1, 1, 1)?;
    let x = k.graph.ty(k.node.inputs[0]);
    let y = k.graph.ty(k.node.outputs[0]);
    require_dtype(k, "input", x, DType::F32)?;
    require_dtype(k, "output", y, DType::F32)?;
    let fail = |msg: String| CodegenError(format!("pool node '{}': {msg}", k.node.name));
    let rank = x.rank();
    if rank < 3 || y.rank() != rank || x.shape[..2] != y.shape[..2] {
        return Err(fail(format!(
            "input {x} and output {y} must share batch, channels and a rank >= 3"
        )));
    }
    let spatial = rank - 2;
    if [
        attrs.kernel.len(),
        attrs.strides.len(),
        attrs.dilations.len(),
        attrs.pads_begin.len(),
        attrs.pads_end.len(),
    ] != [spatial; 5]
    {
        return Err(fail(format!("attributes must each have {spatial} entries")));
    }
    let axes = AxisWindow::pool_axes(attrs, &x.shape, &y.shape);
    if axes
        .iter()
        .any(|a| a.kernel == 0 || a.stride == 0 || a.dilation == 0)
    {
        return Err(fail("zero kernel size, stride or dilation".into()));
    }
    let bodies = axes
        .iter()
        .map(|a| a.segments().len())
        .fold(3usize, usize::saturating_mul);
    if bodies > MAX_TILE_BODIES {
        return Err(fail(format!(
            "padding and window of {x} -> {y} would need {bodies} specialised tiles (limit {MAX_TILE_BODIES}); \
             this geometry is not supported"
        )));
    }
    let plan = PoolPlan {
        kind: attrs.kind,
        planes: x.shape[0] * x.shape[1],
        segments: axes.iter().map(AxisWindow::segments).collect(),
        in_strides: cnnc_ir::strides(&x.shape[2..]),
        out_strides: cnnc_ir::strides(&y.shape[2..]),
        in_plane: x.shape[2..].iter().product(),
        out_plane: y.shape[2..].iter().product(),
        // Column reductions pay when horizontally adjacent windows share columns;
        // without overlap (2x2 stride 2) the one-pass tiles are as fast.
        separable: spatial == 2
            && axes[0].kernel >= 2
            && axes[1].kernel > axes[1].stride
            && bytes(axes[1].input) as usize <= MAX_ROW_BUFFER_BYTES,
        axes,
    };
    plan.emit(k.b, k.inputs[0], k.outputs[0]);
    Ok(())
}

struct PoolPlan {
    kind: PoolKind,
    planes: usize,
    axes: Vec<AxisWindow>,
    segments: Vec<Vec<Segment>>,
    in_strides: Vec<usize>,
    out_strides: Vec<usize>,
    in_plane: usize,
    out_plane: usize,
    /// 2-D windows reduced in two passes per output row: each input column over the
    /// row's vertical taps into a stack buffer, then that buffer along the row. A 3x3
    /// stride-2 max pool then does 6 reductions per 4 outputs (2 for each of two column
    /// vectors, 2 along the row) instead of 8, and 3 strided loads instead of 9.
    separable: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Width {
    Vectors(usize),
    Scalar,
}

fn bytes(elements: usize) -> i64 {
    elements as i64 * F32_BYTES
}

impl PoolPlan {
    fn emit(&self, b: &mut FunctionBuilder, x: Value, y: Value) {
        let row_buffer = self.separable.then(|| {
            let size = bytes(self.axes[1].input) as u32;
            let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, size, 4));
            b.ins().stack_addr(I64, slot, 0)
        });
        counted_loop(b, self.planes, vec![], |b, p, _| {
            let xp = index_ptr(b, x, p, bytes(self.in_plane));
            let yp = index_ptr(b, y, p, bytes(self.out_plane));
            match row_buffer {
                Some(buffer) => self.emit_separable_rows(b, buffer, xp, yp),
                None => self.emit_positions(b, 0, xp, yp, &mut Vec::new()),
            }
            vec![]
        });
    }

    /// Per output row: the column reductions over the row's vertical taps into
    /// `buffer`, then the 1-D pool of `buffer` along the row (taps of axis 1 only; the
    /// average's divisor still counts both axes' taps).
    fn emit_separable_rows(&self, b: &mut FunctionBuilder, buffer: Value, x: Value, y: Value) {
        let rows = self.axes[0];
        let row_bytes = bytes(self.in_strides[0]);
        let out_row_bytes = bytes(self.out_strides[0]);
        for seg in &self.segments[0] {
            let x0 = offset_ptr(b, x, rows.origin(seg.start) * row_bytes);
            let y0 = offset_ptr(b, y, seg.start as i64 * out_row_bytes);
            counted_loop(b, seg.count, vec![x0, y0], |b, _, c| {
                self.emit_column_reductions(b, seg, c[0], buffer);
                self.emit_positions(b, 1, buffer, c[1], &mut vec![*seg]);
                vec![
                    b.ins().iadd_imm_s(c[0], rows.stride as i64 * row_bytes),
                    b.ins().iadd_imm_s(c[1], out_row_bytes),
                ]
            });
        }
    }

    /// `buffer[j]` = the reduction of input column `j` over the vertical taps of `seg`
    /// (rows `x + t·dilation` for t in the segment's tap range; the identity when none).
    fn emit_column_reductions(&self, b: &mut FunctionBuilder, seg: &Segment, x: Value, buffer: Value) {
        let rows = self.axes[0];
        let tap = bytes(rows.dilation * self.in_strides[0]);
        let x = offset_ptr(b, x, seg.tap_begin as i64 * tap);
        let taps = seg.taps();
        let mut cursors = vec![x, buffer];
        let mut left = self.axes[1].input;
        for width in [Width::Vectors(TILE_VECTORS), Width::Vectors(1), Width::Scalar] {
            let (count, step) = match width {
                Width::Vectors(n) => (n, n * LANES),
                Width::Scalar => (1, 1),
            };
            let (c, rest) = tiled_loop(b, left, step, cursors, |b, _, c| {
                let init = self.identity(b, width);
                let accs = if taps <= UNROLL_TAPS {
                    (0..taps).fold(vec![init; count], |accs, t| {
                        self.emit_tap(b, width, c[0], t as i64 * tap, accs, 1, t == 0)
                    })
                } else {
                    let mut carried = vec![c[0]];
                    carried.extend(vec![init; count]);
                    let done = counted_loop(b, taps, carried, |b, _, l| {
                        let mut next = vec![b.ins().iadd_imm_s(l[0], tap)];
                        next.extend(self.emit_tap(b, width, l[0], 0, l[1..].to_vec(), 1, false));
                        next
                    });
                    done[1..].to_vec()
                };
                let flags = if width == Width::Scalar { scalar_flags() } else { vector_flags() };
                for (v, acc) in accs.into_iter().enumerate() {
                    store(b, flags, acc, c[1], bytes(v * LANES));
                }
                vec![b.ins().iadd_imm_s(c[0], bytes(step)), b.ins().iadd_imm_s(c[1], bytes(step))]
            });
            cursors = c;
            left = rest;
        }
    }

    /// The accumulator's starting value: -inf (max: padding never wins) or 0.
    fn identity(&self, b: &mut FunctionBuilder, width: Width) -> Value {
        let init = match self.kind {
            PoolKind::Max => f32::NEG_INFINITY,
            PoolKind::Avg { .. } => 0.0,
        };
        let acc = b.ins().f32const(init);
        if width == Width::Scalar { acc } else { b.ins().splat(F32X4, acc) }
    }

    /// Outputs of axis `axis` and inside; `chosen` holds the segments of the outer axes.
    fn emit_positions(
        &self,
        b: &mut FunctionBuilder,
        axis: usize,
        x_origin: Value,
        y: Value,
        chosen: &mut Vec<Segment>,
    ) {
        let a = self.axes[axis];
        let in_stride = bytes(self.in_strides[axis]);
        let out_stride = bytes(self.out_strides[axis]);
        let innermost = axis + 1 == self.axes.len();
        for seg in &self.segments[axis] {
            let x0 = offset_ptr(b, x_origin, a.origin(seg.start) * in_stride);
            let y0 = offset_ptr(b, y, seg.start as i64 * out_stride);
            chosen.push(*seg);
            if !innermost {
                counted_loop(b, seg.count, vec![x0, y0], |b, _, c| {
                    self.emit_positions(b, axis + 1, c[0], c[1], chosen);
                    vec![
                        b.ins().iadd_imm_s(c[0], a.stride as i64 * in_stride),
                        b.ins().iadd_imm_s(c[1], out_stride),
                    ]
                });
            } else {
                let mut cursors = vec![x0, y0];
                let mut left = seg.count;
                for width in [
                    Width::Vectors(TILE_VECTORS),
                    Width::Vectors(1),
                    Width::Scalar,
                ] {
                    let step = match width {
                        Width::Vectors(n) => n * LANES,
                        Width::Scalar => 1,
                    };
                    let (c, rest) = tiled_loop(b, left, step, cursors, |b, _, c| {
                        self.emit_tile(b, width, c[0], c[1], chosen);
                        vec![
                            b.ins().iadd_imm_s(c[0], bytes(step * a.stride)),
                            b.ins().iadd_imm_s(c[1], bytes(step)),
                        ]
                    });
                    cursors = c;
                    left = rest;
                }
            }
            chosen.pop();
        }
    }

    fn emit_tile(
        &self,
        b: &mut FunctionBuilder,
        width: Width,
        x_origin: Value,
        y: Value,
        segs: &[Segment],
    ) {
        let count = match width {
            Width::Vectors(n) => n,
            Width::Scalar => 1,
        };
        let acc = self.identity(b, width);
        // The separable path reduced the vertical taps into its row buffer already.
        let first = usize::from(self.separable);
        let accs = self.emit_taps(b, width, first, x_origin, vec![acc; count], segs, true);
        let accs: Vec<Value> = match self.kind {
            PoolKind::Max => accs,
            PoolKind::Avg { count_include_pad } => {
                let divisor: usize = segs
                    .iter()
                    .map(|s| {
                        if count_include_pad {
                            s.padded_taps
                        } else {
                            s.taps()
                        }
                    })
                    .product();
                let mut d = b.ins().f32const(divisor as f32);
                if width != Width::Scalar {
                    d = b.ins().splat(F32X4, d);
                }
                accs.into_iter().map(|a| b.ins().fdiv(a, d)).collect()
            }
        };
        for (v, acc) in accs.into_iter().enumerate() {
            let flags = if width == Width::Scalar {
                scalar_flags()
            } else {
                vector_flags()
            };
            store(b, flags, acc, y, bytes(v * LANES));
        }
    }

    fn emit_taps(
        &self,
        b: &mut FunctionBuilder,
        width: Width,
        axis: usize,
        x: Value,
        accs: Vec<Value>,
        segs: &[Segment],
        fresh: bool,
    ) -> Vec<Value> {
        let a = self.axes[axis];
        let (begin, end) = (segs[axis].tap_begin, segs[axis].tap_end);
        let tap = bytes(a.dilation * self.in_strides[axis]);
        let innermost = axis + 1 == self.axes.len();
        if innermost && end - begin <= UNROLL_TAPS {
            return (begin..end).fold(accs, |accs, t| {
                self.emit_tap(b, width, x, t as i64 * tap, accs, a.stride, fresh && t == begin)
            });
        }
        let mut carried = vec![offset_ptr(b, x, begin as i64 * tap)];
        carried.extend(accs);
        let done = counted_loop(b, end - begin, carried, |b, _, c| {
            let accs = if innermost {
                self.emit_tap(b, width, c[0], 0, c[1..].to_vec(), a.stride, false)
            } else {
                self.emit_taps(b, width, axis + 1, c[0], c[1..].to_vec(), segs, false)
            };
            let mut next = vec![b.ins().iadd_imm_s(c[0], tap)];
            next.extend(accs);
            next
        });
        done[1..].to_vec()
    }

    fn emit_tap(
        &self,
        b: &mut FunctionBuilder,
        width: Width,
        x: Value,
        offset: i64,
        accs: Vec<Value>,
        stride: usize,
        fresh: bool,
    ) -> Vec<Value> {
        accs.into_iter()
            .enumerate()
            .map(|(v, acc)| {
                let input = match width {
                    Width::Vectors(_) => load_f32x4_strided(
                        b,
                        vector_flags(),
                        x,
                        offset + bytes(v * LANES * stride),
                        stride,
                    ),
                    Width::Scalar => load(b, F32, scalar_flags(), x, offset),
                };
                match self.kind {
                    // The identity combined with x is x (NaN included): one reduction fewer.
                    _ if fresh => input,
                    PoolKind::Max => float_minmax_nan(b, acc, input, true),
                    PoolKind::Avg { .. } => b.ins().fadd(acc, input),
                }
            })
            .collect()
    }
}
