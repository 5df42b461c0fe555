//! Reductions (`Op::Reduce`) and arg-reductions (`Op::ArgReduce`).
//!
//! Reduce first drops extent-1 axes and merges neighbouring axes of the same kind
//! (kept or reduced), so any axis set becomes an alternation like
//! [kept, reduced, kept]. When the innermost merged axis is kept, tiles of
//! consecutive outputs are vectorised across it (f32x4) and the reduced axes loop
//! around them; when it is reduced, each output accumulates the contiguous run in
//! four (short runs: two) f32x4 accumulators (runs of 8192+ elements: one per
//! quarter of the run) and folds them at the end. i32/i64 run the same loops with
//! scalar lanes. Semantics follow `ir/src/interp/reduce.rs`: Max/Min propagate NaN,
//! an empty Mean is NaN (integers: 0), integer arithmetic wraps.
//!
//! ArgReduce keeps the best value and its index per output, vectorised over four
//! neighbouring outputs for f32 when the axis is not innermost; NaN beats every
//! number, ties go to the first index (or the last with `select_last_index`).

use cnnc_ir::{ArgKind, DType, Op, ReduceKind};
use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, Type, Value,
    condcodes::{FloatCC, IntCC},
    types::{F32, F32X4, I32, I32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::{
    LANES, counted_loop, float_minmax_nan, index_ptr, load, offset_ptr, require_buffers,
    require_plain_layout, scalar_flags, store, tiled_loop, vector_flags,
};
use super::{CodegenError, KernelCtx};

fn element_type(k: &KernelCtx, dtype: DType) -> Result<Type, CodegenError> {
    match dtype {
        DType::F32 => Ok(F32),
        DType::I32 => Ok(I32),
        DType::I64 => Ok(I64),
        other => Err(CodegenError(format!(
            "{} node '{}': dtype {other} is not supported (f32, i32 and i64 are)",
            k.node.op.mnemonic(),
            k.node.name
        ))),
    }
}

// ------------------------------------------------------------------ Reduce

/// One merged axis: extent and element strides in the input and (kept axes) output.
#[derive(Clone, Copy, Debug)]
struct Axis {
    extent: usize,
    in_stride: usize,
    out_stride: usize,
}

/// Vector accumulators of a long reduced innermost run.
const WIDE_ACCUMULATORS: usize = 4;

/// Reduced runs from this many elements are read as four quarters side by side, one per
/// accumulator: one stream of loads from memory leaves it idle between the prefetcher's
/// requests, four keep more in flight. Per-channel sums over 16xCxHxW, best of 5, same
/// run: 112x112 planes 6.15 vs 8.19 ms (four neighbouring vectors); 56x56 2.53 vs 2.31,
/// 28x28 and 16x16 no difference, so shorter runs keep neighbouring vectors.
const MIN_STREAMED_RUN: usize = 8192;

pub fn emit_reduce(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::Reduce { kind, axes } = &k.node.op else {
        return Err(CodegenError(format!(
            "reduce::emit_reduce called on a {} node '{}'",
            k.node.op.mnemonic(),
            k.node.name
        )));
    };
    if k.node.schedule.layout_in != cnnc_ir::Layout::Plain {
        // Global pooling over NCHWc blocks.
        return super::pool_blocked::emit_global_reduce(k);
    }
    require_plain_layout(k)?;
    require_buffers(k, 1, 1, 1)?;
    let x = k.graph.ty(k.node.inputs[0]);
    let y = k.graph.ty(k.node.outputs[0]);
    let elem = element_type(k, x.dtype)?;
    let fail = |msg: String| CodegenError(format!("reduce node '{}': {msg}", k.node.name));
    if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= x.rank()) {
        return Err(fail(format!(
            "axes {axes:?} must be sorted, unique and < {}",
            x.rank()
        )));
    }
    let mut want = x.shape.clone();
    axes.iter().for_each(|&a| want[a] = 1);
    if y.shape != want || y.dtype != x.dtype {
        return Err(fail(format!(
            "output {y} does not match input {x} reduced over {axes:?}"
        )));
    }
    if y.numel() == 0 {
        return Ok(());
    }
    let plan = ReducePlan {
        kind: *kind,
        elem,
        count: axes.iter().map(|&a| x.shape[a]).product(),
    };
    let (x_ptr, y_ptr) = (k.inputs[0], k.outputs[0]);
    let b = &mut *k.b;
    if plan.count == 0 {
        plan.fill_identity(b, y_ptr, y.numel());
        return Ok(());
    }
    // Merge axes: drop extent 1, join neighbours of the same kind.
    let mut merged: Vec<(usize, bool)> = Vec::new();
    for (d, &extent) in x.shape.iter().enumerate() {
        let reduced = axes.contains(&d);
        match merged.last_mut() {
            _ if extent == 1 => {}
            Some((e, r)) if *r == reduced => *e *= extent,
            _ => merged.push((extent, reduced)),
        }
    }
    let extents: Vec<usize> = merged.iter().map(|m| m.0).collect();
    let in_strides = cnnc_ir::strides(&extents);
    let kept_extents: Vec<usize> = merged.iter().filter(|m| !m.1).map(|m| m.0).collect();
    let out_strides = cnnc_ir::strides(&kept_extents);
    let (mut kept, mut reduced) = (Vec::new(), Vec::new());
    for (i, &(extent, is_reduced)) in merged.iter().enumerate() {
        if is_reduced {
            reduced.push(Axis {
                extent,
                in_stride: in_strides[i],
                out_stride: 0,
            });
        } else {
            kept.push(Axis {
                extent,
                in_stride: in_strides[i],
                out_stride: out_strides[kept.len()],
            });
        }
    }
    let inner_kept = merged.last().is_some_and(|m| !m.1);
    if inner_kept {
        let inner = kept.pop().expect("inner kept axis");
        plan.emit_outer(b, &kept, x_ptr, y_ptr, &mut |b, x, y| {
            plan.emit_across(b, inner, &reduced, x, y)
        });
    } else {
        plan.emit_outer(b, &kept, x_ptr, y_ptr, &mut |b, x, y| {
            plan.emit_along(b, &reduced, x, y)
        });
    }
    Ok(())
}

struct ReducePlan {
    kind: ReduceKind,
    elem: Type,
    /// Elements reduced into each output.
    count: usize,
}

type PtrBody<'a> = dyn FnMut(&mut FunctionBuilder, Value, Value) + 'a;

/// Per element position of a reduction: (builder, address, accumulators) -> accumulators.
type StepBody<'a> = dyn FnMut(&mut FunctionBuilder, Value, Vec<Value>) -> Vec<Value> + 'a;

impl ReducePlan {
    fn size(&self) -> i64 {
        self.elem.bytes() as i64
    }

    fn is_float(&self) -> bool {
        self.elem == F32
    }

    /// Vectors only for f32.
    fn lanes(&self) -> usize {
        if self.is_float() { LANES } else { 1 }
    }

    fn vector_type(&self) -> Type {
        if self.is_float() { F32X4 } else { self.elem }
    }

    fn identity(&self, b: &mut FunctionBuilder, ty: Type) -> Value {
        let scalar = if self.is_float() {
            let v = match self.kind {
                ReduceKind::Sum | ReduceKind::Mean => 0.0,
                ReduceKind::Prod => 1.0,
                ReduceKind::Max => f32::NEG_INFINITY,
                ReduceKind::Min => f32::INFINITY,
            };
            b.ins().f32const(v)
        } else {
            let (min, max) = if self.elem == I32 {
                (i32::MIN as i64, i32::MAX as i64)
            } else {
                (i64::MIN, i64::MAX)
            };
            let v = match self.kind {
                ReduceKind::Sum | ReduceKind::Mean => 0,
                ReduceKind::Prod => 1,
                ReduceKind::Max => min,
                ReduceKind::Min => max,
            };
            b.ins().iconst(self.elem, v)
        };
        if ty.is_vector() {
            b.ins().splat(ty, scalar)
        } else {
            scalar
        }
    }

    fn combine(&self, b: &mut FunctionBuilder, acc: Value, x: Value) -> Value {
        match (self.kind, self.is_float()) {
            (ReduceKind::Sum | ReduceKind::Mean, true) => b.ins().fadd(acc, x),
            (ReduceKind::Sum | ReduceKind::Mean, false) => b.ins().iadd(acc, x),
            (ReduceKind::Prod, true) => b.ins().fmul(acc, x),
            (ReduceKind::Prod, false) => b.ins().imul(acc, x),
            (ReduceKind::Max, true) => float_minmax_nan(b, acc, x, true),
            (ReduceKind::Max, false) => b.ins().smax(acc, x),
            (ReduceKind::Min, true) => float_minmax_nan(b, acc, x, false),
            (ReduceKind::Min, false) => b.ins().smin(acc, x),
        }
    }

    /// Mean's division (by a positive count); other kinds pass through.
    fn finish(&self, b: &mut FunctionBuilder, acc: Value) -> Value {
        if self.kind != ReduceKind::Mean {
            return acc;
        }
        let ty = b.func.dfg.value_type(acc);
        if self.is_float() {
            let mut d = b.ins().f32const(self.count as f32);
            if ty.is_vector() {
                d = b.ins().splat(ty, d);
            }
            b.ins().fdiv(acc, d)
        } else {
            let d = b.ins().iconst(self.elem, self.count as i64);
            b.ins().sdiv(acc, d)
        }
    }

    /// Every output of an empty reduction: the identity, NaN (f32) or 0 (ints) for Mean.
    fn fill_identity(&self, b: &mut FunctionBuilder, y: Value, n: usize) {
        let value = match (self.kind, self.is_float()) {
            (ReduceKind::Mean, true) => b.ins().f32const(f32::NAN),
            (ReduceKind::Mean, false) => b.ins().iconst(self.elem, 0),
            _ => self.identity(b, self.elem),
        };
        let size = self.size();
        counted_loop(b, n, vec![y], |b, _, c| {
            store(b, scalar_flags(), value, c[0], 0);
            vec![b.ins().iadd_imm_s(c[0], size)]
        });
    }

    /// Loops over the kept axes `kept` (input and output cursors), calling `body` per
    /// combination.
    fn emit_outer(
        &self,
        b: &mut FunctionBuilder,
        kept: &[Axis],
        x: Value,
        y: Value,
        body: &mut PtrBody,
    ) {
        let Some((axis, rest)) = kept.split_first() else {
            body(b, x, y);
            return;
        };
        let size = self.size();
        counted_loop(b, axis.extent, vec![], |b, i, _| {
            let xi = index_ptr(b, x, i, axis.in_stride as i64 * size);
            let yi = index_ptr(b, y, i, axis.out_stride as i64 * size);
            self.emit_outer(b, rest, xi, yi, body);
            vec![]
        });
    }

    /// Accumulates over the reduced axes `reduced`, calling `step(ptr, accs)` per element
    /// position and threading the accumulators.
    fn reduce_loops(
        &self,
        b: &mut FunctionBuilder,
        reduced: &[Axis],
        x: Value,
        accs: Vec<Value>,
        step: &mut StepBody,
    ) -> Vec<Value> {
        let Some((axis, rest)) = reduced.split_first() else {
            return step(b, x, accs);
        };
        let advance = axis.in_stride as i64 * self.size();
        let mut carried = vec![x];
        carried.extend(accs);
        let done = counted_loop(b, axis.extent, carried, |b, _, c| {
            let accs = self.reduce_loops(b, rest, c[0], c[1..].to_vec(), step);
            let mut next = vec![b.ins().iadd_imm_s(c[0], advance)];
            next.extend(accs);
            next
        });
        done[1..].to_vec()
    }

    /// Innermost axis kept: tiles of consecutive outputs, each reducing over `reduced`.
    fn emit_across(
        &self,
        b: &mut FunctionBuilder,
        inner: Axis,
        reduced: &[Axis],
        x: Value,
        y: Value,
    ) {
        let size = self.size();
        let lanes = self.lanes();
        // (accumulators, lanes each): two vectors, one vector, then single elements.
        let tiles: Vec<(usize, usize)> = if lanes > 1 {
            vec![(2, lanes), (1, lanes), (1, 1)]
        } else {
            vec![(4, 1), (1, 1)]
        };
        let mut cursors = vec![x, y];
        let mut left = inner.extent;
        for (count, width) in tiles {
            let step = count * width;
            let (c, rest) = tiled_loop(b, left, step, cursors, |b, _, c| {
                let ty = if width > 1 {
                    self.vector_type()
                } else {
                    self.elem
                };
                let flags = if width > 1 {
                    vector_flags()
                } else {
                    scalar_flags()
                };
                let init: Vec<Value> = (0..count).map(|_| self.identity(b, ty)).collect();
                let accs = self.reduce_loops(b, reduced, c[0], init, &mut |b, p, accs| {
                    accs.into_iter()
                        .enumerate()
                        .map(|(v, acc)| {
                            let e = load(b, ty, flags, p, (v * width) as i64 * size);
                            self.combine(b, acc, e)
                        })
                        .collect()
                });
                for (v, acc) in accs.into_iter().enumerate() {
                    let r = self.finish(b, acc);
                    store(b, flags, r, c[1], (v * width) as i64 * size);
                }
                vec![
                    b.ins().iadd_imm_s(c[0], step as i64 * size),
                    b.ins().iadd_imm_s(c[1], step as i64 * size),
                ]
            });
            cursors = c;
            left = rest;
        }
    }

    /// Innermost axis reduced (or no axes left): one output, accumulated along the
    /// contiguous innermost run in vectors, the outer reduced axes looping around it.
    fn emit_along(&self, b: &mut FunctionBuilder, reduced: &[Axis], x: Value, y: Value) {
        let size = self.size();
        let Some((inner, outer)) = reduced.split_last() else {
            // Nothing reduced (all extents 1): out = finish(identity ∘ x).
            let id = self.identity(b, self.elem);
            let e = load(b, self.elem, scalar_flags(), x, 0);
            let acc = self.combine(b, id, e);
            let r = self.finish(b, acc);
            store(b, scalar_flags(), r, y, 0);
            return;
        };
        let lanes = self.lanes();
        // Independent accumulators hide the add latency: four once a run has four
        // vectors (global average pools over 56x56 and larger maps), else two.
        let vectors = match lanes {
            1 => 0,
            _ if inner.extent >= WIDE_ACCUMULATORS * lanes => WIDE_ACCUMULATORS,
            _ if inner.extent >= lanes => 2,
            _ => 0,
        };
        let mut init: Vec<Value> = (0..vectors)
            .map(|_| self.identity(b, self.vector_type()))
            .collect();
        init.push(self.identity(b, self.elem));
        // Runs of MIN_STREAMED_RUN+ elements: the four accumulators read four quarters of
        // the run side by side (see the constant).
        let streams = if vectors == WIDE_ACCUMULATORS && inner.extent >= MIN_STREAMED_RUN { inner.extent / (WIDE_ACCUMULATORS * lanes) } else { 0 };
        let accs = self.reduce_loops(b, outer, x, init, &mut |b, p, accs| {
            let mut cursors = vec![p];
            cursors.extend(accs);
            let mut left = inner.extent;
            if streams > 0 {
                let quarter = (streams * lanes) as i64 * size;
                cursors = counted_loop(b, streams, cursors, |b, _, c| {
                    let mut accs = c[1..].to_vec();
                    for (v, acc) in accs.iter_mut().take(WIDE_ACCUMULATORS).enumerate() {
                        let e = load(b, self.vector_type(), vector_flags(), c[0], v as i64 * quarter);
                        *acc = self.combine(b, *acc, e);
                    }
                    let mut next = vec![b.ins().iadd_imm_s(c[0], lanes as i64 * size)];
                    next.extend(accs);
                    next
                });
                cursors[0] = b.ins().iadd_imm_s(cursors[0], (WIDE_ACCUMULATORS as i64 - 1) * quarter);
                left -= WIDE_ACCUMULATORS * streams * lanes;
            }
            // One vector per accumulator per step, then one, then scalars.
            let steps: Vec<(usize, usize)> = if vectors > 0 {
                vec![(vectors, lanes), (1, lanes), (1, 1)]
            } else {
                vec![(1, 1)]
            };
            for (count, width) in steps {
                let step = count * width;
                let (c, rest) = tiled_loop(b, left, step, cursors, |b, _, c| {
                    let mut accs = c[1..].to_vec();
                    for v in 0..count {
                        let (ty, flags, slot) = if width > 1 {
                            (self.vector_type(), vector_flags(), v)
                        } else {
                            (self.elem, scalar_flags(), accs.len() - 1)
                        };
                        let e = load(b, ty, flags, c[0], (v * width) as i64 * size);
                        accs[slot] = self.combine(b, accs[slot], e);
                    }
                    let mut next = vec![b.ins().iadd_imm_s(c[0], step as i64 * size)];
                    next.extend(accs);
                    next
                });
                cursors = c;
                left = rest;
            }
            cursors[1..].to_vec()
        });
        let (vector_accs, scalar) = accs.split_at(vectors);
        let mut total = scalar[0];
        if vectors > 0 {
            let mut partial = vector_accs.to_vec();
            while partial.len() > 1 {
                let half = partial.len() / 2;
                partial = (0..half).map(|i| self.combine(b, partial[i], partial[i + half])).collect();
            }
            let joined = partial[0];
            for lane in 0..lanes {
                let e = b.ins().extractlane(joined, lane as u8);
                total = self.combine(b, total, e);
            }
        }
        let r = self.finish(b, total);
        store(b, scalar_flags(), r, y, 0);
    }
}

// ------------------------------------------------------------------ ArgReduce

pub fn emit_arg_reduce(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::ArgReduce {
        kind,
        axis,
        select_last_index,
    } = k.node.op
    else {
        return Err(CodegenError(format!(
            "reduce::emit_arg_reduce called on a {} node '{}'",
            k.node.op.mnemonic(),
            k.node.name
        )));
    };
    require_plain_layout(k)?;
    require_buffers(k, 1, 1, 1)?;
    let x = k.graph.ty(k.node.inputs[0]);
    let y = k.graph.ty(k.node.outputs[0]);
    let elem = element_type(k, x.dtype)?;
    let fail = |msg: String| CodegenError(format!("arg_reduce node '{}': {msg}", k.node.name));
    if axis >= x.rank() || x.shape[axis] == 0 {
        return Err(fail(format!(
            "axis {axis} is out of range or empty for {x}"
        )));
    }
    let mut want = x.shape.clone();
    want[axis] = 1;
    if y.shape != want || y.dtype != DType::I64 {
        return Err(fail(format!("output {y} must be i64{want:?}")));
    }
    if x.shape[axis] > i32::MAX as usize {
        return Err(fail(format!(
            "axis extent {} exceeds the 32-bit index lanes",
            x.shape[axis]
        )));
    }
    let plan = ArgPlan {
        kind,
        last: select_last_index,
        elem,
        outer: x.shape[..axis].iter().product(),
        extent: x.shape[axis],
        inner: x.shape[axis + 1..].iter().product(),
    };
    if y.numel() > 0 {
        plan.emit(k.b, k.inputs[0], k.outputs[0]);
    }
    Ok(())
}

struct ArgPlan {
    kind: ArgKind,
    last: bool,
    elem: Type,
    outer: usize,
    extent: usize,
    inner: usize,
}

impl ArgPlan {
    fn size(&self) -> i64 {
        self.elem.bytes() as i64
    }

    fn emit(&self, b: &mut FunctionBuilder, x: Value, y: Value) {
        let size = self.size();
        let row = (self.extent * self.inner) as i64;
        counted_loop(b, self.outer, vec![], |b, o, _| {
            let xo = index_ptr(b, x, o, row * size);
            let yo = index_ptr(b, y, o, self.inner as i64 * 8);
            let mut cursors = vec![xo, yo];
            let mut left = self.inner;
            let widths: &[usize] = if self.elem == F32 { &[LANES, 1] } else { &[1] };
            for &width in widths {
                let (c, rest) = tiled_loop(b, left, width, cursors, |b, _, c| {
                    self.emit_column(b, width, c[0], c[1]);
                    vec![
                        b.ins().iadd_imm_s(c[0], width as i64 * size),
                        b.ins().iadd_imm_s(c[1], width as i64 * 8),
                    ]
                });
                cursors = c;
                left = rest;
            }
            vec![]
        });
    }

    /// Whether `v` replaces `best` (mask per lane, or an i8 flag for scalars).
    fn beats(&self, b: &mut FunctionBuilder, v: Value, best: Value) -> Value {
        if self.elem != F32 {
            let cc = match (self.kind, self.last) {
                (ArgKind::Max, false) => IntCC::SignedGreaterThan,
                (ArgKind::Max, true) => IntCC::SignedGreaterThanOrEqual,
                (ArgKind::Min, false) => IntCC::SignedLessThan,
                (ArgKind::Min, true) => IntCC::SignedLessThanOrEqual,
            };
            return b.ins().icmp(cc, v, best);
        }
        let cc = match (self.kind, self.last) {
            (ArgKind::Max, false) => FloatCC::GreaterThan,
            (ArgKind::Max, true) => FloatCC::GreaterThanOrEqual,
            (ArgKind::Min, false) => FloatCC::LessThan,
            (ArgKind::Min, true) => FloatCC::LessThanOrEqual,
        };
        // Ordered compares are false with a NaN; a NaN element wins over a number,
        // and over an earlier NaN only with select_last_index.
        let ordered = b.ins().fcmp(cc, v, best);
        let v_nan = b.ins().fcmp(FloatCC::Unordered, v, v);
        let nan_wins = if self.last {
            v_nan
        } else {
            let best_number = b.ins().fcmp(FloatCC::Ordered, best, best);
            b.ins().band(v_nan, best_number)
        };
        b.ins().bor(ordered, nan_wins)
    }

    /// `width` neighbouring outputs (4 as vectors, or 1).
    fn emit_column(&self, b: &mut FunctionBuilder, width: usize, x: Value, y: Value) {
        let size = self.size();
        let step = self.inner as i64 * size;
        let vector = width > 1;
        let (value_ty, flags) = if vector {
            (F32X4, vector_flags())
        } else {
            (self.elem, scalar_flags())
        };
        let first = load(b, value_ty, flags, x, 0);
        let zero = if vector {
            let z = b.ins().iconst(I32, 0);
            b.ins().splat(I32X4, z)
        } else {
            b.ins().iconst(I64, 0)
        };
        let x1 = offset_ptr(b, x, step);
        let done = counted_loop(b, self.extent - 1, vec![x1, first, zero], |b, j, c| {
            let (p, best, best_index) = (c[0], c[1], c[2]);
            let v = load(b, value_ty, flags, p, 0);
            let wins = self.beats(b, v, best);
            let index = b.ins().iadd_imm_s(j, 1);
            let (best, best_index) = if vector {
                let index32 = b.ins().ireduce(I32, index);
                let index_lanes = b.ins().splat(I32X4, index32);
                let value_mask = b.ins().bitcast(F32X4, MemFlagsData::new(), wins);
                (
                    b.ins().bitselect(value_mask, v, best),
                    b.ins().bitselect(wins, index_lanes, best_index),
                )
            } else {
                (
                    b.ins().select(wins, v, best),
                    b.ins().select(wins, index, best_index),
                )
            };
            vec![b.ins().iadd_imm_s(p, step), best, best_index]
        });
        let best_index = done[2];
        if vector {
            for lane in 0..LANES {
                let i = b.ins().extractlane(best_index, lane as u8);
                let wide = b.ins().sextend(I64, i);
                store(b, scalar_flags(), wide, y, lane as i64 * 8);
            }
        } else {
            store(b, scalar_flags(), best_index, y, 0);
        }
    }
}
