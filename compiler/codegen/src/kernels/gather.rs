//! Gather and GatherElements with indices read at run time (i64 or i32).
//!
//! Negative indices count from the end of the axis. An index still outside the axis
//! after that is the caller's error, which compiled code cannot report: it must
//! neither read nor write out of bounds, so the affected output elements are set to
//! zero (false for bool). The reference interpreter reports such indices as errors.

use cnnc_ir::{DType, Scalar};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use super::map::{collapse, elem_type, readonly_flags, rw_flags};
use super::movement::{copy_bytes, emit_fill};
use super::{CodegenError, KernelCtx};
use crate::loops::for_nest;

fn err<T>(msg: String) -> Result<T, CodegenError> {
    Err(CodegenError(msg))
}

fn zero_of(dtype: DType) -> Scalar {
    Scalar::F32(0.0).cast(dtype)
}

/// Loads an index (i64 or i32) as i64 and wraps a negative one by `extent`.
fn load_index(b: &mut FunctionBuilder, p: Value, dtype: DType, extent: usize) -> Value {
    let raw = b.ins().load(elem_type(dtype), readonly_flags(), p, 0);
    let idx = if dtype == DType::I32 {
        b.ins().sextend(I64, raw)
    } else {
        raw
    };
    let wrapped = b.ins().iadd_imm_s(idx, extent as i64);
    let negative = b.ins().icmp_imm_s(IntCC::SignedLessThan, idx, 0);
    b.ins().select(negative, wrapped, idx)
}

fn index_dtype(k: &KernelCtx) -> Result<DType, CodegenError> {
    let t = k.graph.ty(k.node.inputs[1]).dtype;
    if !t.is_int() {
        return err(format!(
            "{} '{}': indices must be i64 or i32, not {t}",
            k.node.op.mnemonic(),
            k.node.name
        ));
    }
    Ok(t)
}

pub fn emit_gather(k: &mut KernelCtx, axis: usize) -> Result<(), CodegenError> {
    let data = k.graph.ty(k.node.inputs[0]).clone();
    let indices = k.graph.ty(k.node.inputs[1]).clone();
    let idx_dtype = index_dtype(k)?;
    if axis >= data.rank() {
        return err(format!("gather '{}': axis {axis} out of range for {data}", k.node.name));
    }
    let outer: usize = data.shape[..axis].iter().product();
    let extent = data.shape[axis];
    let inner: usize = data.shape[axis + 1..].iter().product();
    let count = indices.numel();
    let esize = data.dtype.size();
    let row = inner * esize;
    if outer * count * inner == 0 {
        return Ok(());
    }
    let (out, src, idx_base) = (k.outputs[0], k.inputs[0], k.inputs[1]);
    let dims = [outer, count];
    let strides = vec![
        vec![(count * row) as i64, row as i64],
        vec![(extent * row) as i64, 0],
        vec![0, idx_dtype.size() as i64],
    ];
    for_nest(k.b, &dims, &strides, &[out, src, idx_base], &mut |b, p| {
        let (dst, src_row0, idx_ptr) = (p[0], p[1], p[2]);
        let idx = load_index(b, idx_ptr, idx_dtype, extent);
        let in_range = b.ins().icmp_imm_s(IntCC::UnsignedLessThan, idx, extent as i64);
        let copy = b.create_block();
        let zero = b.create_block();
        let join = b.create_block();
        b.ins().brif(in_range, copy, &[], zero, &[]);
        b.seal_block(copy);
        b.seal_block(zero);

        b.switch_to_block(copy);
        let off = b.ins().imul_imm_s(idx, row as i64);
        let s = b.ins().iadd(src_row0, off);
        copy_bytes(b, dst, s, row, readonly_flags());
        b.ins().jump(join, &[]);

        b.switch_to_block(zero);
        emit_fill(b, dst, inner, zero_of(data.dtype));
        b.ins().jump(join, &[]);

        b.switch_to_block(join);
        b.seal_block(join);
    });
    Ok(())
}

pub fn emit_gather_elements(k: &mut KernelCtx, axis: usize) -> Result<(), CodegenError> {
    let data = k.graph.ty(k.node.inputs[0]).clone();
    let indices = k.graph.ty(k.node.inputs[1]).clone();
    let idx_dtype = index_dtype(k)?;
    if axis >= data.rank() || indices.rank() != data.rank() {
        return err(format!(
            "gather_elements '{}': axis {axis} or indices {indices} do not fit {data}",
            k.node.name
        ));
    }
    for d in 0..data.rank() {
        if d != axis && indices.shape[d] > data.shape[d] {
            return err(format!(
                "gather_elements '{}': indices {indices} exceed data {data} on axis {d}",
                k.node.name
            ));
        }
    }
    if indices.numel() == 0 {
        return Ok(());
    }
    if data.numel() == 0 {
        emit_fill(k.b, k.outputs[0], indices.numel(), zero_of(data.dtype));
        return Ok(());
    }
    let extent = data.shape[axis];
    let esize = data.dtype.size();
    let data_strides: Vec<i64> = cnnc_ir::strides(&data.shape).iter().map(|&s| s as i64).collect();
    let axis_stride = data_strides[axis] * esize as i64;
    let mut walk = data_strides.clone();
    walk[axis] = 0;
    let natural: Vec<i64> = cnnc_ir::strides(&indices.shape).iter().map(|&s| s as i64).collect();
    // Output and indices advance together (same element strides); the data pointer
    // skips the gathered axis.
    let (dims, s) = collapse(&indices.shape, &[natural, walk]);
    let bytes = |v: &Vec<i64>, e: usize| v.iter().map(|x| x * e as i64).collect::<Vec<_>>();
    let strides = vec![bytes(&s[0], esize), bytes(&s[0], idx_dtype.size()), bytes(&s[1], esize)];
    let ty = elem_type(data.dtype);
    let zero = zero_of(data.dtype);
    for_nest(
        k.b,
        &dims,
        &strides,
        &[k.outputs[0], k.inputs[1], k.inputs[0]],
        &mut |b, p| {
            let (dst, idx_ptr, base) = (p[0], p[1], p[2]);
            let idx = load_index(b, idx_ptr, idx_dtype, extent);
            let in_range = b.ins().icmp_imm_s(IntCC::UnsignedLessThan, idx, extent as i64);
            let zero_idx = b.ins().iconst(I64, 0);
            let safe = b.ins().select(in_range, idx, zero_idx);
            let off = b.ins().imul_imm_s(safe, axis_stride);
            let addr = b.ins().iadd(base, off);
            let v = b.ins().load(ty, readonly_flags(), addr, 0);
            let z = super::elementwise::scalar_const(b, zero);
            let v = b.ins().select(in_range, v, z);
            b.ins().store(rw_flags(), v, dst, 0);
        },
    );
    Ok(())
}
