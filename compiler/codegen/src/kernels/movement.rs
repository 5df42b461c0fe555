//! Data movement: Reshape (a copy), Transpose, Slice, Pad (every mode), Concat,
//! Broadcast, and the fill used for splat constants. All of them reduce to
//! `copy_nd`, a strided n-dimensional copy whose innermost contiguous runs become
//! block copies.

use cnnc_ir::{DType, Op, PadMode, Scalar};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I32X4, I64, I64X2};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use cranelift_codegen::isa::TargetFrontendConfig;
use cranelift_frontend::FunctionBuilder;
use target_lexicon::PointerWidth;

use super::compute::{LANES, load_f32x4_strided, shuffle_f32x4};
use super::elementwise::scalar_const;
use super::map::{advance, collapse, readonly_flags, rw_flags};
use super::{CodegenError, KernelCtx};
use crate::loops::{for_count, for_range};

fn err<T>(msg: String) -> Result<T, CodegenError> {
    Err(CodegenError(msg))
}

/// Runs of at least this many bytes are copied by calling `memcpy`.
const MEMCPY_THRESHOLD: usize = 512;

fn frontend_config(b: &FunctionBuilder) -> TargetFrontendConfig {
    TargetFrontendConfig {
        default_call_conv: b.func.signature.call_conv,
        pointer_width: PointerWidth::U64,
        page_size_align_log2: 12,
    }
}

/// 16-byte chunks a copy below `MEMCPY_THRESHOLD` emits without a loop.
const MAX_UNROLLED_CHUNKS: usize = MEMCPY_THRESHOLD / 16;

/// Copies `bytes` contiguous bytes (a compile-time size) from `src` to `dst`; the
/// ranges do not overlap.
pub fn copy_bytes(b: &mut FunctionBuilder, dst: Value, src: Value, bytes: usize, src_flags: MemFlagsData) {
    if bytes == 0 {
        return;
    }
    if bytes >= MEMCPY_THRESHOLD {
        let size = b.ins().iconst(I64, bytes as i64);
        let cfg = frontend_config(b);
        b.call_memcpy(cfg, dst, src, size);
        return;
    }
    let chunks = bytes / 16;
    // Runs below the memcpy threshold (at most 31 chunks) are straight-line code: the
    // rows of tap slices (28 to 56 floats) would otherwise pay a loop iteration per chunk.
    if chunks > MAX_UNROLLED_CHUNKS {
        for_count(b, chunks, |b, i| {
            let off = b.ins().imul_imm_s(i, 16);
            let s = b.ins().iadd(src, off);
            let d = b.ins().iadd(dst, off);
            let v = b.ins().load(I8X16, src_flags, s, 0);
            b.ins().store(rw_flags(), v, d, 0);
        });
    } else {
        for c in 0..chunks {
            let v = b.ins().load(I8X16, src_flags, src, (c * 16) as i32);
            b.ins().store(rw_flags(), v, dst, (c * 16) as i32);
        }
    }
    let mut at = chunks * 16;
    for (size, ty) in [
        (8, I64),
        (4, cranelift_codegen::ir::types::I32),
        (2, cranelift_codegen::ir::types::I16),
        (1, cranelift_codegen::ir::types::I8),
    ] {
        while bytes - at >= size {
            let v = b.ins().load(ty, src_flags, src, at as i32);
            b.ins().store(rw_flags(), v, dst, at as i32);
            at += size;
        }
    }
}

/// `dst[Σ iₖ·dst_strides[k]] = src[Σ iₖ·src_strides[k]]` over `shape`, strides in
/// elements of `esize` bytes (may be zero or negative for the source).
#[allow(clippy::too_many_arguments)]
pub fn copy_nd(
    b: &mut FunctionBuilder,
    shape: &[usize],
    esize: usize,
    dst: Value,
    dst_strides: &[i64],
    src: Value,
    src_strides: &[i64],
    src_flags: MemFlagsData,
) {
    if shape.contains(&0) {
        return;
    }
    let (dims, strides) = collapse(shape, &[dst_strides.to_vec(), src_strides.to_vec()]);
    let (dims, strides) = source_axis_inward(dims, strides);
    let e = esize as i64;
    let ds: Vec<i64> = strides[0].iter().map(|s| s * e).collect();
    let ss: Vec<i64> = strides[1].iter().map(|s| s * e).collect();
    copy_level(b, &dims, &ds, &ss, esize, 0, dst, src, src_flags);
}

/// Elements of the source's densest axis a transposing copy reads per visit (one cache
/// line of f32).
const SOURCE_BLOCK: usize = 16;

/// Reorders a collapsed copy (`strides[0]` destination, `strides[1]` source) whose
/// destination-innermost axis reads the source far apart (a transpose moving the
/// source's dense axis outwards, as the weight gradients' [T, C, M] -> [M, C, T]): the
/// axis with the smallest source stride is split into blocks of `SOURCE_BLOCK` and the
/// block moved next to the innermost axis. Each visit then reads whole cache lines and
/// touches a few pages; in the original order every element read can be a TLB miss.
/// Element order within the destination is unchanged (it is addressed by strides).
fn source_axis_inward(dims: Vec<usize>, strides: Vec<Vec<i64>>) -> (Vec<usize>, Vec<Vec<i64>>) {
    let n = dims.len();
    if n < 3 {
        return (dims, strides);
    }
    let last = n - 1;
    let src = &strides[1];
    let Some(dense) = (0..last).min_by_key(|&a| src[a].unsigned_abs()) else {
        return (dims, strides);
    };
    // Worth it only when the dense axis sits outside axes that read farther apart, and
    // reads nearer than the innermost axis does.
    let farther_inside = (dense + 1..last).any(|a| src[a].unsigned_abs() > src[dense].unsigned_abs());
    if !farther_inside || src[dense].unsigned_abs() >= src[last].unsigned_abs() || src[dense] == 0 {
        return (dims, strides);
    }
    let block = if dims[dense] <= SOURCE_BLOCK {
        dims[dense]
    } else {
        match [SOURCE_BLOCK, SOURCE_BLOCK / 2, SOURCE_BLOCK / 4].into_iter().find(|&b| dims[dense].is_multiple_of(b)) {
            Some(b) => b,
            None => return (dims, strides),
        }
    };
    let outer = dims[dense] / block;
    let mut new_dims = Vec::with_capacity(n + 1);
    let mut new_strides: Vec<Vec<i64>> = vec![Vec::with_capacity(n + 1); strides.len()];
    for a in 0..last {
        if a == dense {
            if outer == 1 {
                continue;
            }
            new_dims.push(outer);
            for (ns, s) in new_strides.iter_mut().zip(&strides) {
                ns.push(s[a] * block as i64);
            }
        } else {
            new_dims.push(dims[a]);
            for (ns, s) in new_strides.iter_mut().zip(&strides) {
                ns.push(s[a]);
            }
        }
    }
    new_dims.push(block);
    new_dims.push(dims[last]);
    for (ns, s) in new_strides.iter_mut().zip(&strides) {
        ns.push(s[dense]);
        ns.push(s[last]);
    }
    (new_dims, new_strides)
}

#[allow(clippy::too_many_arguments)]
fn copy_level(
    b: &mut FunctionBuilder,
    dims: &[usize],
    ds: &[i64],
    ss: &[i64],
    esize: usize,
    d: usize,
    dst: Value,
    src: Value,
    flags: MemFlagsData,
) {
    let last = dims.len() - 1;
    let contiguous_rows = ds[last] == esize as i64 && ss[last] == esize as i64;
    if d + 1 == last && esize == 4 && transposes_in_quads(&dims[d..], &ds[d..], &ss[d..]) {
        copy_transposed_quads(b, dims[d], dims[last], dst, ds[d], src, ss[last], flags);
        return;
    }
    if !contiguous_rows && copy_unrolled(b, &dims[d..], &ds[d..], &ss[d..], esize, dst, src, flags) {
        return;
    }
    if d == last {
        let n = dims[d];
        if contiguous_rows {
            copy_bytes(b, dst, src, n * esize, flags);
            return;
        }
        if esize == 4 && ss[d] == 8 && ds[d] == 4 && n >= 2 * LANES {
            copy_every_second_f32(b, n, dst, src, flags);
            return;
        }
        let ty = elem_type_of_size(esize);
        for_count(b, n, |b, i| {
            let s = advance(b, src, i, ss[d]);
            let t = advance(b, dst, i, ds[d]);
            let v = b.ins().load(ty, flags, s, 0);
            b.ins().store(rw_flags(), v, t, 0);
        });
        return;
    }
    for_count(b, dims[d], |b, i| {
        let s = advance(b, src, i, ss[d]);
        let t = advance(b, dst, i, ds[d]);
        copy_level(b, dims, ds, ss, esize, d + 1, t, s, flags);
    });
}

/// Whether the two innermost levels `dims` (rows, columns of the destination) are an f32
/// transpose that `copy_transposed_quads` takes: contiguous destination columns,
/// contiguous source rows, both extents multiples of 4 (the channels-last copies of
/// activations: [N, C, P] -> [N, P, C]).
fn transposes_in_quads(dims: &[usize], ds: &[i64], ss: &[i64]) -> bool {
    let [rows, cols] = dims[..] else { return false };
    ds[1] == 4 && ss[0] == 4 && ss[1] != 4 && rows.is_multiple_of(LANES) && cols.is_multiple_of(LANES) && rows * cols > UNROLLED_BLOCK
}

/// `dst[r·dst_row + c] = src[r + c·src_col]` (byte strides) for a `rows` x `cols` f32
/// block, by 4x4 tiles: four vector loads along the source's rows, a transpose in
/// registers (unpack low/high, then move low/high halves), four vector stores.
#[allow(clippy::too_many_arguments)]
fn copy_transposed_quads(
    b: &mut FunctionBuilder,
    rows: usize,
    cols: usize,
    dst: Value,
    dst_row: i64,
    src: Value,
    src_col: i64,
    flags: MemFlagsData,
) {
    for_count(b, rows / LANES, |b, r| {
        let src_rows = advance(b, src, r, (LANES * 4) as i64);
        let dst_rows = advance(b, dst, r, LANES as i64 * dst_row);
        for_count(b, cols / LANES, |b, c| {
            let s = advance(b, src_rows, c, LANES as i64 * src_col);
            let t = advance(b, dst_rows, c, (LANES * 4) as i64);
            let v: Vec<Value> = (0..LANES)
                .map(|j| {
                    let p = b.ins().iadd_imm_s(s, j as i64 * src_col);
                    b.ins().load(F32X4, flags, p, 0)
                })
                .collect();
            let lo01 = shuffle_f32x4(b, v[0], v[1], [0, 4, 1, 5]);
            let hi01 = shuffle_f32x4(b, v[0], v[1], [2, 6, 3, 7]);
            let lo23 = shuffle_f32x4(b, v[2], v[3], [0, 4, 1, 5]);
            let hi23 = shuffle_f32x4(b, v[2], v[3], [2, 6, 3, 7]);
            let out = [
                shuffle_f32x4(b, lo01, lo23, [0, 1, 4, 5]),
                shuffle_f32x4(b, lo01, lo23, [2, 3, 6, 7]),
                shuffle_f32x4(b, hi01, hi23, [0, 1, 4, 5]),
                shuffle_f32x4(b, hi01, hi23, [2, 3, 6, 7]),
            ];
            for (i, &o) in out.iter().enumerate() {
                let p = b.ins().iadd_imm_s(t, i as i64 * dst_row);
                b.ins().store(rw_flags(), o, p, 0);
            }
        });
    });
}

/// `dst[i] = src[2·i]` for `i < n` (f32): four elements per two vector loads and a
/// shuffle (stride-2 slices: max-pool windows, strided convolutions' taps). Reads no
/// element past `src[2·(n − 1)]`.
fn copy_every_second_f32(b: &mut FunctionBuilder, n: usize, dst: Value, src: Value, flags: MemFlagsData) {
    const PAIRS: usize = 2;
    let step = PAIRS * LANES;
    let groups = n / step;
    for_count(b, groups, |b, i| {
        let s = advance(b, src, i, (2 * step * 4) as i64);
        let t = advance(b, dst, i, (step * 4) as i64);
        for p in 0..PAIRS {
            let v = load_f32x4_strided(b, flags, s, (p * 2 * LANES * 4) as i64, 2);
            b.ins().store(rw_flags(), v, t, (p * LANES * 4) as i32);
        }
    });
    let done = groups * step;
    let s = b.ins().iadd_imm_s(src, (2 * done * 4) as i64);
    let t = b.ins().iadd_imm_s(dst, (done * 4) as i64);
    let mut at = 0;
    if n - done >= LANES {
        let v = load_f32x4_strided(b, flags, s, 0, 2);
        b.ins().store(rw_flags(), v, t, 0);
        at = LANES;
    }
    for k in at..n - done {
        let v = b.ins().load(F32, flags, s, (2 * k * 4) as i32);
        b.ins().store(rw_flags(), v, t, (k * 4) as i32);
    }
}

/// Blocks of at most this many strided elements are copied by straight-line code: the
/// small innermost extents of transposes (a pooling window's taps, a few channels) and
/// strided slices would otherwise spend most of each loop iteration on its control.
const UNROLLED_BLOCK: usize = 16;

/// Copies the block `dims` (innermost levels of a `copy_nd`) element by element at
/// constant offsets, if it is small enough and its offsets fit an i32; returns whether
/// it did.
#[allow(clippy::too_many_arguments)]
fn copy_unrolled(
    b: &mut FunctionBuilder,
    dims: &[usize],
    ds: &[i64],
    ss: &[i64],
    esize: usize,
    dst: Value,
    src: Value,
    flags: MemFlagsData,
) -> bool {
    let count: usize = dims.iter().product();
    if count > UNROLLED_BLOCK {
        return false;
    }
    let mut offsets = Vec::with_capacity(count);
    for flat in 0..count {
        let (mut from, mut to, mut rest) = (0i64, 0i64, flat);
        for k in (0..dims.len()).rev() {
            let i = (rest % dims[k]) as i64;
            rest /= dims[k];
            from += i * ss[k];
            to += i * ds[k];
        }
        match (i32::try_from(from), i32::try_from(to)) {
            (Ok(from), Ok(to)) => offsets.push((from, to)),
            _ => return false,
        }
    }
    let ty = elem_type_of_size(esize);
    for (from, to) in offsets {
        let v = b.ins().load(ty, flags, src, from);
        b.ins().store(rw_flags(), v, dst, to);
    }
    true
}

fn elem_type_of_size(esize: usize) -> cranelift_codegen::ir::Type {
    match esize {
        8 => I64,
        4 => cranelift_codegen::ir::types::I32,
        2 => cranelift_codegen::ir::types::I16,
        _ => cranelift_codegen::ir::types::I8,
    }
}

/// Fills `count` elements at `out` with `value`: 16 bytes per store, then the tail.
pub fn emit_fill(b: &mut FunctionBuilder, out: Value, count: usize, value: Scalar) {
    let esize = value.dtype().size();
    let bytes = count * esize;
    if bytes == 0 {
        return;
    }
    let lanes_ty = match value.dtype() {
        DType::F32 => F32X4,
        DType::I32 => I32X4,
        DType::I64 => I64X2,
        DType::Bool => I8X16,
    };
    let chunks = bytes / 16;
    if chunks > 0 {
        let s = scalar_const(b, value);
        let v = b.ins().splat(lanes_ty, s);
        for_count(b, chunks, |b, i| {
            let off = b.ins().imul_imm_s(i, 16);
            let p = b.ins().iadd(out, off);
            b.ins().store(rw_flags(), v, p, 0);
        });
    }
    let done = chunks * 16 / esize;
    if done < count {
        // The tail is under 16 bytes; address it from its own base so offsets stay
        // small whatever the tensor size.
        let s = scalar_const(b, value);
        let tail = b.ins().iadd_imm_s(out, (done * esize) as i64);
        for k in 0..count - done {
            b.ins().store(rw_flags(), s, tail, (k * esize) as i32);
        }
    }
}

fn natural_strides(shape: &[usize]) -> Vec<i64> {
    cnnc_ir::strides(shape).iter().map(|&s| s as i64).collect()
}

pub fn emit_reshape(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let bytes = k.graph.ty(k.node.outputs[0]).byte_size();
    if k.graph.ty(k.node.inputs[0]).byte_size() != bytes {
        return err(format!("reshape '{}': element counts differ", k.node.name));
    }
    copy_bytes(k.b, k.outputs[0], k.inputs[0], bytes, readonly_flags());
    Ok(())
}

pub fn emit_transpose(k: &mut KernelCtx, perm: &[usize]) -> Result<(), CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]).clone();
    let out = k.graph.ty(k.node.outputs[0]).clone();
    if perm.len() != x.rank() || perm.iter().any(|&p| p >= x.rank()) {
        return err(format!("transpose '{}': bad permutation {perm:?}", k.node.name));
    }
    let in_strides = natural_strides(&x.shape);
    let src_strides: Vec<i64> = perm.iter().map(|&p| in_strides[p]).collect();
    let dst_strides = natural_strides(&out.shape);
    copy_nd(
        k.b,
        &out.shape,
        x.dtype.size(),
        k.outputs[0],
        &dst_strides,
        k.inputs[0],
        &src_strides,
        readonly_flags(),
    );
    Ok(())
}

pub fn emit_slice(k: &mut KernelCtx, starts: &[usize], steps: &[i64]) -> Result<(), CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]).clone();
    let out = k.graph.ty(k.node.outputs[0]).clone();
    if starts.len() != x.rank() || steps.len() != x.rank() || out.rank() != x.rank() {
        return err(format!("slice '{}': attributes do not fit {x}", k.node.name));
    }
    if out.numel() == 0 {
        return Ok(());
    }
    let in_strides = natural_strides(&x.shape);
    let mut base = 0i64;
    for d in 0..x.rank() {
        let last = starts[d] as i64 + (out.shape[d] as i64 - 1) * steps[d];
        if starts[d] >= x.shape[d] || last < 0 || last >= x.shape[d] as i64 {
            return err(format!("slice '{}': axis {d} reads outside {x}", k.node.name));
        }
        base += starts[d] as i64 * in_strides[d];
    }
    let src_strides: Vec<i64> = (0..x.rank()).map(|d| steps[d] * in_strides[d]).collect();
    let esize = x.dtype.size();
    let src = k.b.ins().iadd_imm_s(k.inputs[0], base * esize as i64);
    copy_nd(
        k.b,
        &out.shape,
        esize,
        k.outputs[0],
        &natural_strides(&out.shape),
        src,
        &src_strides,
        readonly_flags(),
    );
    Ok(())
}

pub fn emit_broadcast(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]).clone();
    let out = k.graph.ty(k.node.outputs[0]).clone();
    let src_strides = super::map::broadcast_strides(&x.shape, &out.shape)?;
    copy_nd(
        k.b,
        &out.shape,
        x.dtype.size(),
        k.outputs[0],
        &natural_strides(&out.shape),
        k.inputs[0],
        &src_strides,
        readonly_flags(),
    );
    Ok(())
}

/// Whether `emit_concat` applies the node's epilogue while copying: every input then
/// lands in one contiguous block of the output (all axes before `axis` have extent 1,
/// as in a batch-1 channel concatenation), so each copy is an elementwise map.
pub fn concat_applies_epilogue(g: &cnnc_ir::Graph, node: &cnnc_ir::Node) -> bool {
    let Op::Concat { axis } = node.op else { return false };
    let out = g.ty(node.outputs[0]);
    // Blocked: the copy, then the in-place epilogue pass reads per-channel operands by block.
    let plain = node.schedule.layout_out == cnnc_ir::Layout::Plain;
    plain && axis < out.rank() && out.shape[..axis].iter().all(|&d| d == 1)
}

/// Whether a concat runs on blocked (NCHWc) values: along channels, every piece a whole
/// number of blocks, so each image's output is each piece's bytes in turn -- the plain
/// copy writes exactly that.
pub fn supports_blocked_concat(g: &cnnc_ir::Graph, node: &cnnc_ir::Node) -> bool {
    // Plain: whether it could run blocked by 8 (what the layout pass asks).
    let block = match node.schedule.layout_out {
        cnnc_ir::Layout::Blocked { block } => block as usize,
        cnnc_ir::Layout::Plain => 8,
    };
    blocked_concat_fits(g, node, block)
}

fn blocked_concat_fits(g: &cnnc_ir::Graph, node: &cnnc_ir::Node, block: usize) -> bool {
    let Op::Concat { axis: 1 } = node.op else { return false };
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    node.inputs[..op_inputs].iter().chain(&node.outputs).all(|&v| {
        let t = g.ty(v);
        t.dtype == cnnc_ir::DType::F32 && t.rank() == 4 && block > 0 && t.shape[1] % block == 0
    })
}

pub fn emit_concat(k: &mut KernelCtx, axis: usize) -> Result<(), CodegenError> {
    let out = k.graph.ty(k.node.outputs[0]).clone();
    if axis >= out.rank() {
        return err(format!("concat '{}': axis {axis} out of range", k.node.name));
    }
    if !k.node.epilogue.is_empty() && concat_applies_epilogue(k.graph, k.node) {
        return emit_concat_with_epilogue(k, axis, &out);
    }
    if interleaves_pairs(k, axis, &out) {
        let pairs = out.numel() / 2;
        interleave_f32_pairs(k.b, pairs, k.outputs[0], k.inputs[0], k.inputs[1]);
        return Ok(());
    }
    let out_strides = natural_strides(&out.shape);
    let esize = out.dtype.size();
    let mut offset = 0usize;
    for i in 0..k.inputs.len() {
        let x = k.graph.ty(k.node.inputs[i]).clone();
        if x.rank() != out.rank() {
            return err(format!("concat '{}': input {i} has rank {}", k.node.name, x.rank()));
        }
        let dst =
            k.b.ins()
                .iadd_imm_s(k.outputs[0], (offset * out_strides[axis] as usize * esize) as i64);
        copy_nd(
            k.b,
            &x.shape,
            esize,
            dst,
            &out_strides,
            k.inputs[i],
            &natural_strides(&x.shape),
            readonly_flags(),
        );
        offset += x.shape[axis];
    }
    if offset != out.shape[axis] {
        return err(format!(
            "concat '{}': inputs cover {offset} of {} along axis {axis}",
            k.node.name, out.shape[axis]
        ));
    }
    Ok(())
}

/// Whether the concat zips two f32 tensors element by element: along the innermost axis,
/// one element from each (the phases of a strided convolution's input gradient, put back
/// between each other). `copy_nd` would write each piece with stride 2, one scalar at a
/// time.
fn interleaves_pairs(k: &KernelCtx, axis: usize, out: &cnnc_ir::TensorType) -> bool {
    let pieces: Vec<&cnnc_ir::TensorType> = k.node.inputs.iter().map(|&v| k.graph.ty(v)).collect();
    out.dtype == cnnc_ir::DType::F32
        && axis + 1 == out.rank()
        && pieces.len() == 2
        && pieces.iter().all(|t| t.dtype == out.dtype && t.rank() == out.rank() && t.shape[axis] == 1)
        && out.numel() >= 2 * LANES
}

/// `dst[2·i] = a[i]`, `dst[2·i + 1] = b[i]` for `i < pairs` (f32): per four pairs, one
/// vector load from each source, unpack low and high, two vector stores.
fn interleave_f32_pairs(b: &mut FunctionBuilder, pairs: usize, dst: Value, a: Value, second: Value) {
    let quads = pairs / LANES;
    let flags = readonly_flags();
    for_count(b, quads, |b, i| {
        let from_a = advance(b, a, i, (LANES * 4) as i64);
        let from_b = advance(b, second, i, (LANES * 4) as i64);
        let to = advance(b, dst, i, (2 * LANES * 4) as i64);
        let va = b.ins().load(F32X4, flags, from_a, 0);
        let vb = b.ins().load(F32X4, flags, from_b, 0);
        let low = shuffle_f32x4(b, va, vb, [0, 4, 1, 5]);
        let high = shuffle_f32x4(b, va, vb, [2, 6, 3, 7]);
        b.ins().store(rw_flags(), low, to, 0);
        b.ins().store(rw_flags(), high, to, (LANES * 4) as i32);
    });
    for j in quads * LANES..pairs {
        for (source, lane) in [(a, 0), (second, 1)] {
            let v = b.ins().load(F32, flags, source, (j * 4) as i32);
            b.ins().store(rw_flags(), v, dst, ((2 * j + lane) * 4) as i32);
        }
    }
}

/// Each input is mapped through the epilogue into its block of the output; the epilogue's
/// operands are addressed over the whole output and offset to the block.
fn emit_concat_with_epilogue(k: &mut KernelCtx, axis: usize, out: &cnnc_ir::TensorType) -> Result<(), CodegenError> {
    let op_inputs = cnnc_ir::verify::op_input_count(k.node);
    let esize = out.dtype.size() as i64;
    let axis_stride = natural_strides(&out.shape)[axis];
    let mut template = Vec::new();
    let epilogue = super::elementwise::Epilogue::new(k, out, &mut template)?;
    let mut offset = 0usize;
    for i in 0..op_inputs {
        let x = k.graph.ty(k.node.inputs[i]).clone();
        if x.rank() != out.rank() || x.dtype != out.dtype {
            return err(format!("concat '{}': input {i} is {x}, the output {out}", k.node.name));
        }
        let mut ops = vec![super::map::Operand {
            ptr: k.inputs[i],
            dtype: x.dtype,
            strides: natural_strides(&x.shape),
            flags: readonly_flags(),
        }];
        for o in &template {
            let bytes = offset as i64 * o.strides[axis] * o.dtype.size() as i64;
            let ptr = if bytes == 0 { o.ptr } else { k.b.ins().iadd_imm_s(o.ptr, bytes) };
            ops.push(super::map::Operand { ptr, ..o.clone() });
        }
        // The template's slots count from 0; here input i's lanes come first.
        let dst = k.b.ins().iadd_imm_s(k.outputs[0], offset as i64 * axis_stride * esize);
        super::map::emit_map(k.b, &x.shape, dst, out.dtype, &ops, true, &|b, v| epilogue.apply(b, v[0], &v[1..]))?;
        offset += x.shape[axis];
    }
    if offset != out.shape[axis] {
        return err(format!("concat '{}': inputs cover {offset} of {} along axis {axis}", k.node.name, out.shape[axis]));
    }
    Ok(())
}

/// One axis of a pad: negative pads crop first, positive pads then extend the kept
/// range (the interpreter's order).
#[derive(Clone, Copy, Debug)]
struct PadAxis {
    crop_begin: usize,
    kept: usize,
    pad_begin: usize,
    out: usize,
}

fn pad_axes(k: &KernelCtx, begins: &[i64], ends: &[i64]) -> Result<Vec<PadAxis>, CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]);
    if begins.len() != x.rank() || ends.len() != x.rank() {
        return err(format!("pad '{}': one begin and end per axis of {x}", k.node.name));
    }
    let mut axes = Vec::new();
    for d in 0..x.rank() {
        let crop_begin = (-begins[d]).max(0) as usize;
        let crop_end = (-ends[d]).max(0) as usize;
        if crop_begin + crop_end > x.shape[d] {
            return err(format!(
                "pad '{}': crops {crop_begin}+{crop_end} exceed axis {d} of {x}",
                k.node.name
            ));
        }
        let kept = x.shape[d] - crop_begin - crop_end;
        let pad_begin = begins[d].max(0) as usize;
        let out = kept + pad_begin + ends[d].max(0) as usize;
        axes.push(PadAxis {
            crop_begin,
            kept,
            pad_begin,
            out,
        });
    }
    Ok(axes)
}

pub fn emit_pad(k: &mut KernelCtx, begins: &[i64], ends: &[i64], mode: PadMode) -> Result<(), CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]).clone();
    let out = k.graph.ty(k.node.outputs[0]).clone();
    let axes = pad_axes(k, begins, ends)?;
    if axes.iter().map(|a| a.out).collect::<Vec<_>>() != out.shape {
        return err(format!("pad '{}': output {out} does not match the pads", k.node.name));
    }
    if out.numel() == 0 {
        return Ok(());
    }
    let esize = x.dtype.size();
    let in_strides = natural_strides(&x.shape);
    let out_strides = natural_strides(&out.shape);
    if let PadMode::Constant(value) = mode {
        if value.dtype() != x.dtype {
            return err(format!("pad '{}': pad value {value:?} is not {}", k.node.name, x.dtype));
        }
        let interior: Vec<usize> = axes.iter().map(|a| a.kept).collect();
        if interior != out.shape {
            emit_fill(k.b, k.outputs[0], out.numel(), value);
        }
        let src_off: i64 = axes.iter().zip(&in_strides).map(|(a, s)| a.crop_begin as i64 * s).sum();
        let dst_off: i64 = axes.iter().zip(&out_strides).map(|(a, s)| a.pad_begin as i64 * s).sum();
        let src = k.b.ins().iadd_imm_s(k.inputs[0], src_off * esize as i64);
        let dst = k.b.ins().iadd_imm_s(k.outputs[0], dst_off * esize as i64);
        copy_nd(
            k.b,
            &interior,
            esize,
            dst,
            &out_strides,
            src,
            &in_strides,
            readonly_flags(),
        );
        return Ok(());
    }
    if axes.iter().any(|a| a.kept == 0) {
        return err(format!(
            "pad '{}': cannot {mode:?}-pad an axis with no elements",
            k.node.name
        ));
    }
    let ctx = PadLoops {
        axes: &axes,
        mode,
        in_strides: &in_strides,
        out_strides: &out_strides,
        esize,
    };
    ctx.level(k.b, 0, k.outputs[0], k.inputs[0]);
    Ok(())
}

struct PadLoops<'p> {
    axes: &'p [PadAxis],
    mode: PadMode,
    in_strides: &'p [i64],
    out_strides: &'p [i64],
    esize: usize,
}

impl PadLoops<'_> {
    /// Source index along an axis for output position `j` (a runtime value).
    fn source(&self, b: &mut FunctionBuilder, a: PadAxis, j: Value) -> Value {
        let t = b.ins().iadd_imm_s(j, -(a.pad_begin as i64));
        let kept = a.kept as i64;
        let inside = match self.mode {
            PadMode::Edge => {
                let zero = b.ins().iconst(I64, 0);
                let top = b.ins().iconst(I64, kept - 1);
                let lo = b.ins().smax(t, zero);
                b.ins().smin(lo, top)
            }
            PadMode::Wrap => {
                // t >= −pad_begin, so adding a multiple of kept past that makes it positive.
                let lift = (a.pad_begin as i64 + kept - 1) / kept * kept;
                let pos = b.ins().iadd_imm_s(t, lift);
                b.ins().urem_imm_u(pos, kept)
            }
            PadMode::Reflect if kept == 1 => b.ins().iconst(I64, 0),
            PadMode::Reflect => {
                let period = 2 * (kept - 1);
                let lift = (a.pad_begin as i64 + period - 1) / period * period;
                let pos = b.ins().iadd_imm_s(t, lift);
                let r = b.ins().urem_imm_u(pos, period);
                let p = b.ins().iconst(I64, period);
                let mirrored = b.ins().isub(p, r);
                let inside = b.ins().icmp_imm_s(IntCC::SignedLessThan, r, kept);
                b.ins().select(inside, r, mirrored)
            }
            PadMode::Constant(_) => t,
        };
        b.ins().iadd_imm_s(inside, a.crop_begin as i64)
    }

    fn level(&self, b: &mut FunctionBuilder, d: usize, dst: Value, src: Value) {
        let a = self.axes[d];
        let e = self.esize as i64;
        let (os, is) = (self.out_strides[d] * e, self.in_strides[d] * e);
        let last = d + 1 == self.axes.len();
        // Positions in the kept range map linearly; the pads go through `source`.
        let interior = |b: &mut FunctionBuilder, this: &Self| {
            let dst0 = b.ins().iadd_imm_s(dst, a.pad_begin as i64 * os);
            let src0 = b.ins().iadd_imm_s(src, a.crop_begin as i64 * is);
            if last {
                copy_bytes(b, dst0, src0, a.kept * this.esize, readonly_flags());
            } else {
                for_count(b, a.kept, |b, i| {
                    let t = advance(b, dst0, i, os);
                    let s = advance(b, src0, i, is);
                    this.level(b, d + 1, t, s);
                });
            }
        };
        let padded = |b: &mut FunctionBuilder, this: &Self, from: usize, to: usize| {
            if from >= to {
                return;
            }
            let start = b.ins().iconst(I64, from as i64);
            let end = b.ins().iconst(I64, to as i64);
            for_range(b, start, end, |b, j| {
                let s_idx = this.source(b, a, j);
                let t = advance(b, dst, j, os);
                let s = advance(b, src, s_idx, is);
                if last {
                    let ty = elem_type_of_size(this.esize);
                    let v = b.ins().load(ty, readonly_flags(), s, 0);
                    b.ins().store(rw_flags(), v, t, 0);
                } else {
                    this.level(b, d + 1, t, s);
                }
            });
        };
        padded(b, self, 0, a.pad_begin);
        interior(b, self);
        padded(b, self, a.pad_begin + a.kept, a.out);
    }
}

/// Dispatches the movement ops.
pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    match k.node.op.clone() {
        Op::Reshape => emit_reshape(k),
        Op::Transpose { perm } => emit_transpose(k, &perm),
        Op::Slice { starts, steps } => emit_slice(k, &starts, &steps),
        Op::Pad { begins, ends, mode } => emit_pad(k, &begins, &ends, mode),
        Op::Concat { axis } => emit_concat(k, axis),
        Op::Broadcast => emit_broadcast(k),
        other => err(format!("movement: {} is not a movement op", other.mnemonic())),
    }
}
