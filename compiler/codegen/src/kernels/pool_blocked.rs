//! Pooling over blocked activations (NCHWc8, [N, C/8, H, W, 8]).
//!
//! Global average (and sum) pooling: `Op::Reduce` Mean/Sum over the spatial axes
//! [2, 3] of a rank-4 f32 value with schedule layout Blocked{8}. The result
//! [N, C, 1, 1] has the same bytes in both layouts (layout-free), so it is written as
//! [N][C/8][8]: each channel block's plane is summed position by position, 8 channels
//! at a time (two f32x4 halves, two positions per trip in independent accumulators),
//! then scaled once. Portable Cranelift code: no target requirement.

use cnnc_ir::{DType, Graph, Layout, Node, Op, ReduceKind};
use cranelift_codegen::ir::InstBuilder;
use cranelift_codegen::ir::types::F32X4;

use super::compute::{counted_loop, load, splat_f32, store, vector_flags, weight};
use super::{CodegenError, KernelCtx};

/// Channels per block.
pub const BLOCK: usize = 8;

/// Whether `node` (given a Blocked{8} schedule) runs on [`emit_global_reduce`]: a
/// Mean or Sum over axes [2, 3] of a rank-4 f32 value whose channels are a multiple of
/// 8. Ignores the node's current schedule.
pub fn supports_global_reduce(g: &Graph, node: &Node) -> bool {
    global_reduce_shape(g, node).is_ok()
}

/// (images, channel blocks, positions per plane, mean).
fn global_reduce_shape(g: &Graph, node: &Node) -> Result<(usize, usize, usize, bool), String> {
    let Op::Reduce { kind, axes } = &node.op else {
        return Err("not a reduction".into());
    };
    let mean = match kind {
        ReduceKind::Mean => true,
        ReduceKind::Sum => false,
        other => return Err(format!("{other:?} has no blocked kernel (Mean and Sum do)")),
    };
    if axes != &[2, 3] || node.inputs.len() != 1 || node.outputs.len() != 1 {
        return Err(format!("axes {axes:?}: only the spatial axes [2, 3] of one input"));
    }
    let x = g.ty(node.inputs[0]);
    let y = g.ty(node.outputs[0]);
    if x.dtype != DType::F32 || x.shape.len() != 4 || y.dtype != DType::F32 {
        return Err(format!("input {x}: only rank-4 f32"));
    }
    let (n, c, hw) = (x.shape[0], x.shape[1], x.shape[2] * x.shape[3]);
    if y.shape != [n, c, 1, 1] {
        return Err(format!("output {y} is not [{n}, {c}, 1, 1]"));
    }
    if c % BLOCK != 0 || hw == 0 {
        return Err(format!("{c} channels (a multiple of {BLOCK}) over {hw} positions (at least 1)"));
    }
    Ok((n, c / BLOCK, hw, mean))
}

/// The spatial Mean/Sum of a blocked value (see the module docs).
pub fn emit_global_reduce(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let blocked = Layout::Blocked { block: BLOCK as u32 };
    if k.node.schedule.layout_in != blocked {
        return Err(CodegenError(format!(
            "reduce node '{}': layout {:?}; the blocked reduction reads Blocked{{8}}",
            k.node.name, k.node.schedule.layout_in
        )));
    }
    let (images, blocks, positions, mean) = global_reduce_shape(k.graph, k.node)
        .map_err(|why| CodegenError(format!("blocked reduce node '{}': {why}", k.node.name)))?;
    if k.inputs.len() != 1 || k.outputs.len() != 1 {
        return Err(CodegenError(format!("reduce node '{}': expects one input and one output", k.node.name)));
    }
    let (x, y) = (k.inputs[0], k.outputs[0]);
    let b = &mut *k.b;
    let vector_bytes = (BLOCK * 4) as i64;
    let flags = weight(vector_flags());
    let scale = if mean { 1.0 / positions as f32 } else { 1.0 };
    counted_loop(b, images * blocks, vec![x, y], |b, _, c| {
        let (plane, out) = (c[0], c[1]);
        let zero = splat_f32(b, 0.0);
        // Accumulators: (low, high) halves of two positions.
        let pairs = positions / 2;
        let mut acc = counted_loop(b, pairs, vec![plane, zero, zero, zero, zero], |b, _, a| {
            let at = a[0];
            let mut next = vec![b.ins().iadd_imm_s(at, 2 * vector_bytes)];
            for (j, &sum) in a[1..].iter().enumerate() {
                let v = load(b, F32X4, flags, at, 16 * j as i64);
                next.push(b.ins().fadd(sum, v));
            }
            next
        });
        if positions % 2 == 1 {
            for j in 0..2 {
                let v = load(b, F32X4, flags, acc[0], 16 * j as i64);
                acc[1 + j] = b.ins().fadd(acc[1 + j], v);
            }
        }
        let low = b.ins().fadd(acc[1], acc[3]);
        let high = b.ins().fadd(acc[2], acc[4]);
        let (low, high) = if mean {
            let s = splat_f32(b, scale);
            (b.ins().fmul(low, s), b.ins().fmul(high, s))
        } else {
            (low, high)
        };
        store(b, vector_flags(), low, out, 0);
        store(b, vector_flags(), high, out, 16);
        let plane_bytes = positions as i64 * vector_bytes;
        vec![b.ins().iadd_imm_s(plane, plane_bytes), b.ins().iadd_imm_s(out, vector_bytes)]
    });
    Ok(())
}
