//! Max pooling's input gradient (`Op::PoolGrad`), f32, one or two spatial axes.
//!
//! One plane (batch × channel) at a time: the plane of dx is zeroed, then every window
//! (in row-major order, as the interpreter) finds its first maximum among the taps
//! inside x and adds its dy there. Each spatial axis is split into window segments
//! (`compute::window`), so the taps a window visits are compile-time constants: no
//! bounds tests, the tap walk unrolled as compares and blends of a value and its byte
//! offset, four windows at a time.
//!
//! 2x2 windows of stride 2 that tile the input exactly (LeNet's and most CNNs' max
//! pooling) take `Pairs` instead: windows do not overlap, so each dx element is written
//! once (no zeroing pass, no scatter): per output row and 4 windows, two rows of 8 inputs
//! are split into the windows' four taps (even/odd lanes), the first maximum is found as a
//! one-hot mask, and dy or 0 goes to each tap, interleaved back and stored.

use cnnc_ir::{Op, Scalar};
use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, Value,
    condcodes::FloatCC,
    types::{F32, F32X4, I32, I32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::{AxisWindow, Segment};
use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, load, load_f32x4_strided, offset_ptr,
    scalar_flags, shuffle_f32x4, store, tiled_loop, vector_flags,
};
use super::movement::emit_fill;
use super::compute::{f32_input_gradient_operands, misrouted};
use super::{CodegenError, KernelCtx};

/// Code-size bound: window bodies one node may emit (3x3 windows with padding need 9).
const MAX_WINDOW_BODIES: usize = 4_096;

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::PoolGrad(attrs) = &k.node.op else {
        return Err(misrouted(k, "pool_grad"));
    };
    let (x, dy, dx) = f32_input_gradient_operands(k)?;
    let fail = |msg: String| CodegenError(format!("pool_grad node '{}': {msg}", k.node.name));
    let spatial = x.rank().saturating_sub(2);
    if !(1..=2).contains(&spatial) || dy.rank() != x.rank() || dx.shape != x.shape {
        return Err(fail(format!(
            "input {x}, gradient {dy} and output {dx} must be one- or two-dimensional maps of one shape"
        )));
    }
    if let Some(plan) = Pairs::of(attrs, &x.shape, &dy.shape) {
        plan.emit(k.b, k.inputs[0], k.inputs[1], k.outputs[0]);
        return Ok(());
    }
    let mut axes = AxisWindow::pool_axes(attrs, &x.shape, &dy.shape);
    if spatial == 1 {
        let single = AxisWindow { input: 1, output: 1, kernel: 1, stride: 1, dilation: 1, pad_begin: 0, pad_end: 0 };
        axes.insert(0, single);
    }
    if axes.iter().any(|a| a.kernel == 0 || a.stride == 0 || a.dilation == 0) {
        return Err(fail("zero kernel size, stride or dilation".into()));
    }
    let (rows, cols) = (axes[0].segments(), axes[1].segments());
    if rows.len() * cols.len() > MAX_WINDOW_BODIES {
        return Err(fail(format!(
            "padding and window of {x} -> {dy} would need {} specialised window bodies (limit {MAX_WINDOW_BODIES})",
            rows.len() * cols.len()
        )));
    }
    let plan = PoolGradPlan {
        planes: x.shape[0] * x.shape[1],
        width: axes[1].input,
        in_plane: axes[0].input * axes[1].input,
        out_width: axes[1].output,
        out_plane: axes[0].output * axes[1].output,
        axes: [axes[0], axes[1]],
        rows,
        cols,
    };
    plan.emit(k.b, k.inputs[0], k.inputs[1], k.outputs[0]);
    Ok(())
}

struct PoolGradPlan {
    planes: usize,
    width: usize,
    in_plane: usize,
    out_width: usize,
    out_plane: usize,
    axes: [AxisWindow; 2],
    rows: Vec<Segment>,
    cols: Vec<Segment>,
}

fn bytes(elements: usize) -> i64 {
    elements as i64 * F32_BYTES
}

impl PoolGradPlan {
    fn emit(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dx: Value) {
        counted_loop(b, self.planes, vec![], |b, p, _| {
            let xp = index_ptr(b, x, p, bytes(self.in_plane));
            let dyp = index_ptr(b, dy, p, bytes(self.out_plane));
            let dxp = index_ptr(b, dx, p, bytes(self.in_plane));
            emit_fill(b, dxp, self.in_plane, Scalar::F32(0.0));
            self.emit_rows(b, xp, dyp, dxp);
            vec![]
        });
    }

    fn emit_rows(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dx: Value) {
        let [vertical, horizontal] = self.axes;
        let row_bytes = bytes(self.width);
        let out_row_bytes = bytes(self.out_width);
        for row_seg in &self.rows {
            if row_seg.taps() == 0 {
                continue;
            }
            let origin = vertical.origin(row_seg.start) * row_bytes;
            let x0 = offset_ptr(b, x, origin);
            let dx0 = offset_ptr(b, dx, origin);
            let dy0 = offset_ptr(b, dy, row_seg.start as i64 * out_row_bytes);
            counted_loop(b, row_seg.count, vec![x0, dx0, dy0], |b, _, row| {
                for col_seg in &self.cols {
                    if col_seg.taps() == 0 {
                        continue;
                    }
                    let origin = bytes(1) * horizontal.origin(col_seg.start);
                    let x1 = offset_ptr(b, row[0], origin);
                    let dx1 = offset_ptr(b, row[1], origin);
                    let dy1 = offset_ptr(b, row[2], bytes(col_seg.start));
                    let mut cursors = vec![x1, dx1, dy1];
                    let mut left = col_seg.count;
                    for lanes in [LANES, 1] {
                        let (c, rest) = tiled_loop(b, left, lanes, cursors, |b, _, at| {
                            self.emit_tile(b, lanes, row_seg, col_seg, at[0], at[1], at[2]);
                            vec![
                                b.ins().iadd_imm_s(at[0], bytes(lanes * horizontal.stride)),
                                b.ins().iadd_imm_s(at[1], bytes(lanes * horizontal.stride)),
                                b.ins().iadd_imm_s(at[2], bytes(lanes)),
                            ]
                        });
                        cursors = c;
                        left = rest;
                    }
                }
                vec![
                    b.ins().iadd_imm_s(row[0], vertical.stride as i64 * row_bytes),
                    b.ins().iadd_imm_s(row[1], vertical.stride as i64 * row_bytes),
                    b.ins().iadd_imm_s(row[2], out_row_bytes),
                ]
            });
        }
    }

    /// `lanes` (4 or 1) consecutive windows, the first with its origin at `x` (and
    /// `dx`): each lane's first maximum over the taps of the two segments as a value and
    /// a byte offset, found with vector compares and blends (no branches: which tap wins
    /// is data-dependent and would mispredict), then dx[there] += dy lane by lane, in
    /// window order.
    #[allow(clippy::too_many_arguments)]
    fn emit_tile(
        &self,
        b: &mut FunctionBuilder,
        lanes: usize,
        rows: &Segment,
        cols: &Segment,
        x: Value,
        dx: Value,
        dy: Value,
    ) {
        let [vertical, horizontal] = self.axes;
        let offsets: Vec<i64> = (rows.tap_begin..rows.tap_end)
            .flat_map(|r| {
                (cols.tap_begin..cols.tap_end)
                    .map(move |c| bytes(r * vertical.dilation * self.width + c * horizontal.dilation))
            })
            .collect();
        let load_taps = |b: &mut FunctionBuilder, offset: i64| {
            if lanes == LANES {
                load_f32x4_strided(b, vector_flags(), x, offset, horizontal.stride)
            } else {
                let v = load(b, F32, scalar_flags(), x, offset);
                b.ins().scalar_to_vector(F32X4, v)
            }
        };
        let offset_vector = |b: &mut FunctionBuilder, offset: i64| {
            let o = b.ins().iconst(I32, offset);
            b.ins().splat(I32X4, o)
        };
        let mut best = load_taps(b, offsets[0]);
        let mut best_offset = offset_vector(b, offsets[0]);
        let flags = MemFlagsData::new();
        for &offset in &offsets[1..] {
            let v = load_taps(b, offset);
            // A later tap wins when it is greater or NaN, unless the best so far is NaN.
            let greater_or_nan = b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, v, best);
            let best_is_number = b.ins().fcmp(FloatCC::Ordered, best, best);
            let wins = b.ins().band(greater_or_nan, best_is_number);
            let wins_f32 = b.ins().bitcast(F32X4, flags, wins);
            best = b.ins().bitselect(wins_f32, v, best);
            let here = offset_vector(b, offset);
            best_offset = b.ins().bitselect(wins, here, best_offset);
        }
        for lane in 0..lanes {
            let offset = b.ins().extractlane(best_offset, lane as u8);
            let offset = b.ins().sextend(I64, offset);
            let target = b.ins().iadd(dx, offset);
            let lane_bytes = bytes(lane * horizontal.stride);
            let g = load(b, F32, scalar_flags(), dy, bytes(lane));
            let old = load(b, F32, scalar_flags(), target, lane_bytes);
            let sum = b.ins().fadd(old, g);
            store(b, scalar_flags(), sum, target, lane_bytes);
        }
    }
}

/// Max pooling 2x2, stride 2, no padding or dilation, input exactly twice the output.
struct Pairs {
    planes: usize,
    out_h: usize,
    out_w: usize,
}

/// Which of a window's four taps is its first maximum, row-major (the interpreter's
/// order): a later tap wins when it is greater or NaN, unless the best so far is NaN.
fn first_maximum(b: &mut FunctionBuilder, taps: [Value; 4]) -> [Value; 4] {
    let vector = b.func.dfg.value_type(taps[0]) == F32X4;
    let flags = MemFlagsData::new();
    let mut best = taps[0];
    let mut wins_so_far: Vec<Value> = Vec::new();
    for &v in &taps[1..] {
        let greater_or_nan = b.ins().fcmp(FloatCC::UnorderedOrGreaterThan, v, best);
        let best_is_number = b.ins().fcmp(FloatCC::Ordered, best, best);
        let wins = b.ins().band(greater_or_nan, best_is_number);
        best = if vector {
            let mask = b.ins().bitcast(F32X4, flags, wins);
            b.ins().bitselect(mask, v, best)
        } else {
            b.ins().select(wins, v, best)
        };
        wins_so_far.push(wins);
    }
    // Tap t is the winner when it won its step and no later tap did.
    let mut winner = Vec::with_capacity(4);
    for t in 0..4 {
        let mut is = if t == 0 { None } else { Some(wins_so_far[t - 1]) };
        for later in wins_so_far.iter().skip(t) {
            // Scalar compares give 0 or 1 (bnot would leave 1 nonzero); vector lanes all ones or zeros.
            let lost_later = if vector { b.ins().bnot(*later) } else { b.ins().bxor_imm_u(*later, 1) };
            is = Some(match is {
                Some(w) => b.ins().band(w, lost_later),
                None => lost_later,
            });
        }
        winner.push(is.expect("tap 3 won its own step"));
    }
    [winner[0], winner[1], winner[2], winner[3]]
}

impl Pairs {
    fn of(attrs: &cnnc_ir::PoolAttrs, x: &[usize], dy: &[usize]) -> Option<Pairs> {
        let two = |v: &[usize]| v == [2, 2];
        let zero = |v: &[usize]| v == [0, 0];
        let one = |v: &[usize]| v == [1, 1];
        let exact = x.len() == 4 && dy.len() == 4 && x[..2] == dy[..2] && x[2] == 2 * dy[2] && x[3] == 2 * dy[3];
        (two(&attrs.kernel) && two(&attrs.strides) && one(&attrs.dilations) && zero(&attrs.pads_begin) && zero(&attrs.pads_end) && exact)
            .then(|| Pairs { planes: x[0] * x[1], out_h: dy[2], out_w: dy[3] })
    }

    /// Four windows from `xc` (their outputs in dy at `dyc`, their taps in dx at `dxc`);
    /// `below`: the bytes from one input row to the next.
    fn emit_vector_group(b: &mut FunctionBuilder, xc: Value, dyc: Value, dxc: Value, below: i64) {
        let t0 = load(b, F32X4, vector_flags(), xc, 0);
        let t1 = load(b, F32X4, vector_flags(), xc, bytes(LANES));
        let u0 = load(b, F32X4, vector_flags(), xc, below);
        let u1 = load(b, F32X4, vector_flags(), xc, below + bytes(LANES));
        let taps = [
            shuffle_f32x4(b, t0, t1, [0, 2, 4, 6]),
            shuffle_f32x4(b, t0, t1, [1, 3, 5, 7]),
            shuffle_f32x4(b, u0, u1, [0, 2, 4, 6]),
            shuffle_f32x4(b, u0, u1, [1, 3, 5, 7]),
        ];
        let winner = first_maximum(b, taps);
        // 0 + dy, as the interpreter's accumulation into a zeroed dx gives it.
        let zero = super::compute::splat_f32(b, 0.0);
        let g = load(b, F32X4, vector_flags(), dyc, 0);
        let g = b.ins().fadd(zero, g);
        let flags = MemFlagsData::new();
        let out: Vec<Value> = winner
            .iter()
            .map(|&w| {
                let mask = b.ins().bitcast(F32X4, flags, w);
                b.ins().bitselect(mask, g, zero)
            })
            .collect();
        let stores = [
            (shuffle_f32x4(b, out[0], out[1], [0, 4, 1, 5]), 0),
            (shuffle_f32x4(b, out[0], out[1], [2, 6, 3, 7]), bytes(LANES)),
            (shuffle_f32x4(b, out[2], out[3], [0, 4, 1, 5]), below),
            (shuffle_f32x4(b, out[2], out[3], [2, 6, 3, 7]), below + bytes(LANES)),
        ];
        for (v, offset) in stores {
            store(b, vector_flags(), v, dxc, offset);
        }
    }

    fn emit(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dx: Value) {
        let in_w = 2 * self.out_w;
        let rows = self.planes * self.out_h;
        counted_loop(b, rows, vec![x, dy, dx], |b, _, at| {
            let (x_row, dy_row, dx_row) = (at[0], at[1], at[2]);
            let below = bytes(in_w);
            let (cursors, rest) = tiled_loop(b, self.out_w, LANES, vec![x_row, dy_row, dx_row], |b, _, c| {
                Self::emit_vector_group(b, c[0], c[1], c[2], below);
                vec![
                    b.ins().iadd_imm_s(c[0], bytes(2 * LANES)),
                    b.ins().iadd_imm_s(c[1], bytes(LANES)),
                    b.ins().iadd_imm_s(c[2], bytes(2 * LANES)),
                ]
            });
            // A remainder of windows: the last four windows again (the overlap is written
            // twice with the same values), where the row has four.
            let rest = if rest > 0 && self.out_w >= LANES {
                let back = (LANES - rest) as i64;
                let xc = b.ins().iadd_imm_s(cursors[0], -bytes(2) * back);
                let dyc = b.ins().iadd_imm_s(cursors[1], -bytes(1) * back);
                let dxc = b.ins().iadd_imm_s(cursors[2], -bytes(2) * back);
                Self::emit_vector_group(b, xc, dyc, dxc, below);
                0
            } else {
                rest
            };
            counted_loop(b, rest, cursors, |b, _, c| {
                let (xc, dyc, dxc) = (c[0], c[1], c[2]);
                let offsets = [0, bytes(1), below, below + bytes(1)];
                let taps = offsets.map(|o| load(b, F32, scalar_flags(), xc, o));
                let winner = first_maximum(b, taps);
                let zero = b.ins().f32const(0.0);
                let g = load(b, F32, scalar_flags(), dyc, 0);
                let g = b.ins().fadd(zero, g);
                for (w, o) in winner.into_iter().zip(offsets) {
                    let v = b.ins().select(w, g, zero);
                    store(b, scalar_flags(), v, dxc, o);
                }
                vec![
                    b.ins().iadd_imm_s(xc, bytes(2)),
                    b.ins().iadd_imm_s(dyc, bytes(1)),
                    b.ins().iadd_imm_s(dxc, bytes(2)),
                ]
            });
            vec![
                b.ins().iadd_imm_s(x_row, 2 * below),
                b.ins().iadd_imm_s(dy_row, bytes(self.out_w)),
                b.ins().iadd_imm_s(dx_row, 2 * below),
            ]
        });
    }
}
