//! Resample: one-axis interpolation `out[..i..] = x[..lo[i]..]·(1 − w[i]) + x[..hi[i]..]·w[i]`.
//! The lo/hi/w tables are a read-only data object (see `tables`), read per output
//! position; the run of elements after the axis is vectorised with f32x4.
//! A weight of exactly 0 or 1 copies one tap, as the interpreter does, so an
//! infinity in the unused tap cannot produce NaN.

use cnnc_ir::{DType, Op};
use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use super::map::{readonly_flags, rw_flags};
use super::{CodegenError, KernelCtx};
use crate::loops::{for_count, for_nest, for_range};
use crate::math::Fx;

struct Geometry {
    outer: usize,
    extent: usize,
    inner: usize,
    out_extent: usize,
}

fn geometry(k: &KernelCtx) -> Result<Geometry, CodegenError> {
    let Op::Resample {
        axis,
        lo,
        hi,
        weight_hi,
    } = &k.node.op
    else {
        return Err(CodegenError(format!(
            "resample: node '{}' is not a resample",
            k.node.name
        )));
    };
    let x = k.graph.ty(k.node.inputs[0]);
    if x.dtype != DType::F32 || *axis >= x.rank() || lo.len() != hi.len() || lo.len() != weight_hi.len() {
        return Err(CodegenError(format!(
            "resample '{}': bad axis, tables or dtype for {x}",
            k.node.name
        )));
    }
    let extent = x.shape[*axis];
    if let Some(bad) = lo.iter().chain(hi).find(|&&i| i >= extent) {
        return Err(CodegenError(format!(
            "resample '{}': table index {bad} outside extent {extent}",
            k.node.name
        )));
    }
    let g = Geometry {
        outer: x.shape[..*axis].iter().product(),
        extent,
        inner: x.shape[axis + 1..].iter().product(),
        out_extent: lo.len(),
    };
    Ok(g)
}

/// The table blob: byte offsets of the lo rows (i64 each), of the hi rows, then the
/// f32 weights.
pub fn tables(k_graph: &cnnc_ir::Graph, node: &cnnc_ir::Node) -> Option<Vec<u8>> {
    let Op::Resample {
        axis,
        lo,
        hi,
        weight_hi,
    } = &node.op
    else {
        return None;
    };
    let x = k_graph.ty(*node.inputs.first()?);
    let inner: usize = x.shape.get(axis + 1..)?.iter().product();
    let row = (inner * 4) as i64;
    let mut blob = Vec::with_capacity(lo.len() * 20);
    for &l in lo {
        blob.extend_from_slice(&(l as i64 * row).to_le_bytes());
    }
    for &h in hi {
        blob.extend_from_slice(&(h as i64 * row).to_le_bytes());
    }
    for &w in weight_hi {
        blob.extend_from_slice(&w.to_le_bytes());
    }
    Some(blob)
}

/// `a·(1 − w) + b·w`, or exactly a / b when w is 0 / 1.
fn blend(m: &mut Fx, a: Value, b: Value, w: Value, one_minus_w: Value) -> Value {
    let x = m.mul(a, one_minus_w);
    let y = m.mul(b, w);
    let r = m.add(x, y);
    let w0 = m.cmpc(FloatCC::Equal, w, 0.0);
    let w1 = m.cmpc(FloatCC::Equal, w, 1.0);
    let r = m.sel(w0, a, r);
    m.sel(w1, b, r)
}

pub fn emit(k: &mut KernelCtx, table: Value) -> Result<(), CodegenError> {
    let g = geometry(k)?;
    if g.outer * g.out_extent * g.inner == 0 {
        return Ok(());
    }
    let row = (g.inner * 4) as i64;
    let n = g.out_extent as i64;
    let dims = [g.outer, g.out_extent];
    let strides = vec![
        vec![g.out_extent as i64 * row, row],
        vec![g.extent as i64 * row, 0],
        vec![0, 8],
        vec![0, 4],
    ];
    let inner = g.inner;
    let weights = k.b.ins().iadd_imm_s(table, 16 * n);
    for_nest(
        k.b,
        &dims,
        &strides,
        &[k.outputs[0], k.inputs[0], table, weights],
        &mut |b, p| {
            let (dst, src, entry, w_ptr) = (p[0], p[1], p[2], p[3]);
            let lo_off = b.ins().load(I64, readonly_flags(), entry, 0);
            let hi_off = b.ins().load(I64, readonly_flags(), entry, (n * 8) as i32);
            let w = b.ins().load(F32, readonly_flags(), w_ptr, 0);
            let a_row = b.ins().iadd(src, lo_off);
            let b_row = b.ins().iadd(src, hi_off);
            row_blend(b, dst, a_row, b_row, w, inner);
        },
    );
    Ok(())
}

fn row_blend(b: &mut FunctionBuilder, dst: Value, a_row: Value, b_row: Value, w: Value, inner: usize) {
    let one = b.ins().f32const(1.0);
    let omw = b.ins().fsub(one, w);
    let chunks = inner / 4;
    if chunks > 0 {
        let wv = b.ins().splat(F32X4, w);
        let omwv = b.ins().splat(F32X4, omw);
        for_count(b, chunks, |b, c| {
            let off = b.ins().imul_imm_s(c, 16);
            let pa = b.ins().iadd(a_row, off);
            let pb = b.ins().iadd(b_row, off);
            let va = b.ins().load(F32X4, readonly_flags(), pa, 0);
            let vb = b.ins().load(F32X4, readonly_flags(), pb, 0);
            let r = blend(&mut Fx::new(b, F32X4), va, vb, wv, omwv);
            let pd = b.ins().iadd(dst, off);
            b.ins().store(rw_flags(), r, pd, 0);
        });
    }
    if chunks * 4 < inner {
        let start = b.ins().iconst(I64, (chunks * 4) as i64);
        let end = b.ins().iconst(I64, inner as i64);
        for_range(b, start, end, |b, i| {
            let off = b.ins().imul_imm_s(i, 4);
            let pa = b.ins().iadd(a_row, off);
            let pb = b.ins().iadd(b_row, off);
            let va = b.ins().load(F32, readonly_flags(), pa, 0);
            let vb = b.ins().load(F32, readonly_flags(), pb, 0);
            let r = blend(&mut Fx::new(b, F32), va, vb, w, omw);
            let pd = b.ins().iadd(dst, off);
            b.ins().store(rw_flags(), r, pd, 0);
        });
    }
}
