//! Pieces of the GEMM-based convolution (`conv_gemm.rs`) that are plain code emitters:
//! the task loop nests of the two orientations (`channel_rows`, `position_rows`) and
//! of 3x3 convolutions by Winograd's F(2x2, 3x3) (`winograd`),
//! im2col packing of panels (`pack`), the work done on a finished output tile
//! (`tile`: edge-tile merging and the fused epilogue), and run-time loops.

pub mod channel_rows;
pub mod pack;
pub mod pack_carried;
pub mod pack_rows;
pub mod position_rows;
pub mod tile;
pub mod weight_grad_rows;
pub mod winograd;

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{BlockArg, InstBuilder, Type, Value};
use cranelift_frontend::FunctionBuilder;

/// Emits `for _ in 0..count { carried = body(carried) }` for a run-time `count` (which
/// may be 0) and returns the carried values after the loop. Bottom-tested: one
/// compare and branch per iteration.
pub fn repeat(
    b: &mut FunctionBuilder,
    count: Value,
    carried: &[Value],
    mut body: impl FnMut(&mut FunctionBuilder, &[Value]) -> Vec<Value>,
) -> Vec<Value> {
    let types: Vec<Type> = carried.iter().map(|&v| b.func.dfg.value_type(v)).collect();
    let loop_block = b.create_block();
    let exit = b.create_block();
    let remaining = b.append_block_param(loop_block, I64);
    let params: Vec<Value> = types.iter().map(|&t| b.append_block_param(loop_block, t)).collect();
    let results: Vec<Value> = types.iter().map(|&t| b.append_block_param(exit, t)).collect();

    let args = |count: Value, values: &[Value]| -> Vec<BlockArg> {
        std::iter::once(count)
            .chain(values.iter().copied())
            .map(BlockArg::from)
            .collect()
    };
    let exit_args: Vec<BlockArg> = carried.iter().map(|&v| BlockArg::from(v)).collect();
    b.ins().brif(count, loop_block, &args(count, carried), exit, &exit_args);

    b.switch_to_block(loop_block);
    let next = body(b, &params);
    debug_assert_eq!(next.len(), types.len(), "repeat body changed the carried arity");
    let left = b.ins().iadd_imm_s(remaining, -1);
    let exit_args: Vec<BlockArg> = next.iter().map(|&v| BlockArg::from(v)).collect();
    b.ins().brif(left, loop_block, &args(left, &next), exit, &exit_args);
    b.seal_block(loop_block);

    b.switch_to_block(exit);
    b.seal_block(exit);
    results
}

/// `for i in start..end { body(i) }` with run-time bounds (signed; empty when
/// `start >= end`).
pub fn for_range(b: &mut FunctionBuilder, start: Value, end: Value, body: impl FnMut(&mut FunctionBuilder, Value)) {
    crate::loops::for_range(b, start, end, body)
}

/// Row-major coordinates of flat index `index` in `shape` (compile-time extents, so
/// the divisions become multiplications). The first coordinate is not reduced: an
/// index past the end yields a first coordinate past its extent.
pub fn unflatten(b: &mut FunctionBuilder, index: Value, shape: &[usize]) -> Vec<Value> {
    let mut coords = vec![index; shape.len()];
    let mut rest = index;
    for axis in (1..shape.len()).rev() {
        let extent = shape[axis] as i64;
        coords[axis] = b.ins().urem_imm_u(rest, extent);
        rest = b.ins().udiv_imm_u(rest, extent);
    }
    if let Some(first) = coords.first_mut() {
        *first = rest;
    }
    coords
}

/// `x < bound` as an unsigned comparison: also false for negative `x`.
pub fn below(b: &mut FunctionBuilder, x: Value, bound: usize) -> Value {
    b.ins().icmp_imm_u(IntCC::UnsignedLessThan, x, bound as i64)
}

/// An i64 constant.
pub fn int(b: &mut FunctionBuilder, v: i64) -> Value {
    b.ins().iconst(I64, v)
}

/// `ptr + index * scale`.
pub fn scaled(b: &mut FunctionBuilder, ptr: Value, index: Value, scale: i64) -> Value {
    match scale {
        0 => ptr,
        1 => b.ins().iadd(ptr, index),
        _ => {
            let offset = b.ins().imul_imm_s(index, scale);
            b.ins().iadd(ptr, offset)
        }
    }
}
