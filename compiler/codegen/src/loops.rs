//! Loop scaffolding shared by every kernel emitter.

use cranelift_codegen::ir::{InstBuilder, Value, condcodes::IntCC, types::I64};
use cranelift_frontend::FunctionBuilder;

/// Emits `for i in start..end { body(i) }` over i64 counters and leaves the builder
/// positioned after the loop. `body` may emit nested loops.
pub fn for_range(b: &mut FunctionBuilder, start: Value, end: Value, mut body: impl FnMut(&mut FunctionBuilder, Value)) {
    let header = b.create_block();
    let body_block = b.create_block();
    let exit = b.create_block();
    b.append_block_param(header, I64);
    b.ins().jump(header, &[start.into()]);

    b.switch_to_block(header);
    let i = b.block_params(header)[0];
    let more = b.ins().icmp(IntCC::SignedLessThan, i, end);
    b.ins().brif(more, body_block, &[], exit, &[]);

    b.switch_to_block(body_block);
    b.seal_block(body_block);
    body(b, i);
    let next = b.ins().iadd_imm_s(i, 1);
    b.ins().jump(header, &[next.into()]);
    b.seal_block(header);

    b.switch_to_block(exit);
    b.seal_block(exit);
}

/// `for i in 0..n` with a compile-time trip count; emits nothing when `n == 0`.
pub fn for_count(b: &mut FunctionBuilder, n: usize, body: impl FnMut(&mut FunctionBuilder, Value)) {
    if n == 0 {
        return;
    }
    let start = b.ins().iconst(I64, 0);
    let end = b.ins().iconst(I64, n as i64);
    for_range(b, start, end, body);
}

/// Nested loops over `dims` (outermost first), advancing one pointer per buffer by its
/// byte stride per axis (`byte_strides[buffer][axis]`, compile-time constants), and
/// calling `body` with the pointers of each iteration. Emits nothing if an extent is 0;
/// calls `body` once for an empty `dims`.
pub fn for_nest(
    b: &mut FunctionBuilder,
    dims: &[usize],
    byte_strides: &[Vec<i64>],
    bases: &[Value],
    body: &mut dyn FnMut(&mut FunctionBuilder, &[Value]),
) {
    if dims.is_empty() {
        body(b, bases);
        return;
    }
    for_count(b, dims[0], |b, i| {
        let next: Vec<Value> = bases
            .iter()
            .zip(byte_strides)
            .map(|(&p, s)| match s[0] {
                0 => p,
                stride => {
                    let off = b.ins().imul_imm_s(i, stride);
                    b.ins().iadd(p, off)
                }
            })
            .collect();
        let rest: Vec<Vec<i64>> = byte_strides.iter().map(|s| s[1..].to_vec()).collect();
        for_nest(b, &dims[1..], &rest, &next, body);
    });
}
