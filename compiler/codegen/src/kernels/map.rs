//! The elementwise loop engine: `out[i] = f(a[i], b[i], …)` over an output shape,
//! each operand read through its own strides (0 on broadcast axes).
//!
//! Axes are first collapsed wherever every operand is contiguous across them, so a
//! broadcast bias over [N, C, H, W] becomes a loop over N·C rows of H·W elements.
//! The innermost run is vectorised four elements at a time when the element function
//! allows it and every operand's innermost stride is 0 or 1; a scalar loop does the
//! remainder. In vector form an f32 operand is an f32x4 and a bool operand an i32x4
//! lane mask (all ones for true), so comparisons, logical ops and `where` -- the masks
//! of every activation gradient -- run four lanes at a time too; bool buffers keep one
//! byte (0 or 1) per element.

use cnnc_ir::DType;
use cranelift_codegen::ir::types::{F32, F32X4, I8, I8X16, I32, I32X4, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

use super::CodegenError;
use crate::loops::for_count;

/// Loads for buffers nothing writes during the kernel (weights, graph inputs, the
/// outputs of earlier kernels): read-only and movable, so loads can be hoisted.
/// Not `aligned`: vector accesses start at arbitrary element offsets and the ABI
/// lets callers pass unaligned buffers; an aligned flag would let SSE-only targets
/// fold them into instructions that fault on unaligned addresses.
pub fn readonly_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly().with_can_move()
}

/// Loads and stores of the buffer the kernel writes (not `aligned`, as above).
pub fn rw_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The Cranelift type holding one element of `dtype` (bool is a byte, 0 or 1).
pub fn elem_type(dtype: DType) -> Type {
    match dtype {
        DType::F32 => F32,
        DType::I64 => I64,
        DType::I32 => I32,
        DType::Bool => I8,
    }
}

/// Element strides of a tensor of `in_shape` broadcast (numpy rules) to `out_shape`,
/// one per output axis.
pub fn broadcast_strides(in_shape: &[usize], out_shape: &[usize]) -> Result<Vec<i64>, CodegenError> {
    if in_shape.len() > out_shape.len() {
        return Err(CodegenError(format!("cannot broadcast {in_shape:?} to {out_shape:?}")));
    }
    let lead = out_shape.len() - in_shape.len();
    let own = cnnc_ir::strides(in_shape);
    let mut s = vec![0i64; out_shape.len()];
    for (i, &extent) in in_shape.iter().enumerate() {
        if extent == out_shape[lead + i] {
            s[lead + i] = if extent == 1 { 0 } else { own[i] as i64 };
        } else if extent != 1 {
            return Err(CodegenError(format!("cannot broadcast {in_shape:?} to {out_shape:?}")));
        }
    }
    Ok(s)
}

/// One input of a map.
#[derive(Clone, Debug)]
pub struct Operand {
    pub ptr: Value,
    pub dtype: DType,
    /// Element strides per output axis.
    pub strides: Vec<i64>,
    pub flags: MemFlagsData,
}

/// The element function: gets one lane value per operand (in the vector loop F32X4 for
/// f32 and an I32X4 mask for bool; scalars otherwise, bool as an I8 0 or 1) and returns
/// the output lane in the same form.
pub type ElemFn<'c> = dyn Fn(&mut FunctionBuilder, &[Value]) -> Result<Value, CodegenError> + 'c;

/// Whether the vector loop can hold elements of `dtype` (as F32X4 or an I32X4 mask).
fn vector_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::Bool)
}

/// Emits `out[i] = f(operands…[i])` over `shape`; `out` is dense row-major.
/// `vectorize` says `f` also accepts vector lanes (used when the operands and the output
/// are all f32 or bool).
pub fn emit_map(
    b: &mut FunctionBuilder,
    shape: &[usize],
    out: Value,
    out_dtype: DType,
    operands: &[Operand],
    vectorize: bool,
    f: &ElemFn,
) -> Result<(), CodegenError> {
    if shape.contains(&0) {
        return Ok(());
    }
    let vectorize = vectorize && vector_dtype(out_dtype) && operands.iter().all(|o| vector_dtype(o.dtype));
    let out_strides: Vec<i64> = cnnc_ir::strides(shape).iter().map(|&s| s as i64).collect();
    let mut all: Vec<Vec<i64>> = vec![out_strides];
    all.extend(operands.iter().map(|o| o.strides.clone()));
    let (dims, strides) = collapse(shape, &all);
    let sizes: Vec<i64> = std::iter::once(out_dtype)
        .chain(operands.iter().map(|o| o.dtype))
        .map(|d| d.size() as i64)
        .collect();
    // Byte strides per buffer (output first) per collapsed axis.
    let byte_strides: Vec<Vec<i64>> = strides
        .iter()
        .zip(&sizes)
        .map(|(s, &sz)| s.iter().map(|&x| x * sz).collect())
        .collect();
    let mut bases: Vec<Value> = vec![out];
    bases.extend(operands.iter().map(|o| o.ptr));
    let plan = MapPlan {
        dims: &dims,
        byte_strides: &byte_strides,
        elem_sizes: &sizes,
        out_dtype,
        operands,
        vectorize,
    };
    let mut err = None;
    plan.level(b, 0, &bases, f, &mut err);
    err.map_or(Ok(()), Err)
}

/// Merges adjacent axes across which every stride list is contiguous, and drops
/// extent-1 axes. Returns the new extents and the new strides (per list).
pub fn collapse(shape: &[usize], strides: &[Vec<i64>]) -> (Vec<usize>, Vec<Vec<i64>>) {
    let mut dims: Vec<usize> = Vec::new();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); strides.len()];
    for (d, &extent) in shape.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        let mergeable = !dims.is_empty()
            && strides
                .iter()
                .zip(&out)
                .all(|(s, o)| o[o.len() - 1] == s[d] * extent as i64);
        if mergeable {
            let last = dims.len() - 1;
            dims[last] *= extent;
            for (s, o) in strides.iter().zip(out.iter_mut()) {
                let k = o.len() - 1;
                o[k] = s[d];
            }
        } else {
            dims.push(extent);
            for (s, o) in strides.iter().zip(out.iter_mut()) {
                o.push(s[d]);
            }
        }
    }
    if dims.is_empty() {
        dims.push(1);
        for o in out.iter_mut() {
            o.push(0);
        }
    }
    (dims, out)
}

/// f32x4 vectors per iteration of the vectorised loop.
const VECTOR_UNROLL: usize = 4;

struct MapPlan<'p> {
    dims: &'p [usize],
    byte_strides: &'p [Vec<i64>],
    /// Bytes per element of each buffer, output first.
    elem_sizes: &'p [i64],
    out_dtype: DType,
    operands: &'p [Operand],
    vectorize: bool,
}

/// Four elements of `dtype` from `addr` as vector lanes (F32X4, or an I32X4 mask for bool).
fn load_lanes(b: &mut FunctionBuilder, dtype: DType, flags: MemFlagsData, addr: Value) -> Value {
    if dtype != DType::Bool {
        return b.ins().load(F32X4, flags, addr, 0);
    }
    let word = b.ins().load(I32, flags, addr, 0);
    let v = b.ins().scalar_to_vector(I32X4, word);
    let bytes = b.ins().bitcast(
        I8X16,
        MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little),
        v,
    );
    let halves = b.ins().uwiden_low(bytes);
    let words = b.ins().uwiden_low(halves);
    let zero = b.ins().iconst(I32, 0);
    let zero = b.ins().splat(I32X4, zero);
    b.ins()
        .icmp(cranelift_codegen::ir::condcodes::IntCC::NotEqual, words, zero)
}

/// One element of `dtype` at `addr`, splat over the vector lanes.
fn splat_lanes(b: &mut FunctionBuilder, dtype: DType, flags: MemFlagsData, addr: Value) -> Value {
    if dtype != DType::Bool {
        let s = b.ins().load(F32, flags, addr, 0);
        return b.ins().splat(F32X4, s);
    }
    let byte = b.ins().load(I8, flags, addr, 0);
    let mask = b.ins().bmask(I32, byte);
    b.ins().splat(I32X4, mask)
}

/// Stores four lanes (F32X4, or an I32X4 mask as four bool bytes) at `addr`.
fn store_lanes(b: &mut FunctionBuilder, dtype: DType, v: Value, addr: Value) {
    if dtype != DType::Bool {
        b.ins().store(rw_flags(), v, addr, 0);
        return;
    }
    // Lanes are 0 or -1: saturating narrows keep that, the mask with 1 makes bytes 0/1.
    let halves = b.ins().snarrow(v, v);
    let bytes = b.ins().snarrow(halves, halves);
    let one = b.ins().iconst(I8, 1);
    let ones = b.ins().splat(I8X16, one);
    let bytes = b.ins().band(bytes, ones);
    let words = b.ins().bitcast(
        I32X4,
        MemFlagsData::new().with_endianness(cranelift_codegen::ir::Endianness::Little),
        bytes,
    );
    let word = b.ins().extractlane(words, 0);
    b.ins().store(rw_flags(), word, addr, 0);
}

impl MapPlan<'_> {
    fn level(&self, b: &mut FunctionBuilder, d: usize, bases: &[Value], f: &ElemFn, err: &mut Option<CodegenError>) {
        if d + 1 == self.dims.len() {
            self.inner(b, bases, f, err);
            return;
        }
        for_count(b, self.dims[d], |b, i| {
            let next: Vec<Value> = bases
                .iter()
                .zip(self.byte_strides)
                .map(|(&p, s)| advance(b, p, i, s[d]))
                .collect();
            self.level(b, d + 1, &next, f, err);
        });
    }

    fn inner(&self, b: &mut FunctionBuilder, bases: &[Value], f: &ElemFn, err: &mut Option<CodegenError>) {
        let d = self.dims.len() - 1;
        let n = self.dims[d];
        let inner_strides: Vec<i64> = self.byte_strides.iter().map(|s| s[d]).collect();
        let unit_or_zero = inner_strides[1..]
            .iter()
            .zip(&self.elem_sizes[1..])
            .all(|(&s, &size)| s == 0 || s == size);
        let vector_chunks = if self.vectorize && unit_or_zero { n / 4 } else { 0 };
        if vector_chunks > 0 {
            // Broadcast operands are loaded once, outside the loop.
            let mut splats: Vec<Option<Value>> = vec![None; self.operands.len()];
            for (k, o) in self.operands.iter().enumerate() {
                if inner_strides[k + 1] == 0 {
                    splats[k] = Some(splat_lanes(b, o.dtype, o.flags, bases[k + 1]));
                }
            }
            // The vector whose first lane is element `elem`.
            let mut vector_at = |b: &mut FunctionBuilder, elem: Value| {
                let mut lanes = Vec::with_capacity(self.operands.len());
                for (k, o) in self.operands.iter().enumerate() {
                    lanes.push(match splats[k] {
                        Some(v) => v,
                        None => {
                            let addr = advance(b, bases[k + 1], elem, self.elem_sizes[k + 1]);
                            load_lanes(b, o.dtype, o.flags, addr)
                        }
                    });
                }
                match f(b, &lanes) {
                    Ok(v) => {
                        let addr = advance(b, bases[0], elem, self.elem_sizes[0]);
                        store_lanes(b, self.out_dtype, v, addr);
                    }
                    Err(e) => {
                        err.get_or_insert(e);
                    }
                }
            };
            if n == vector_chunks * 4 && vector_chunks <= VECTOR_UNROLL {
                // A short run (the 8 lanes of a blocked layout's channel block, under a
                // per-channel operand): straight-line vectors, no loop of its own.
                for u in 0..vector_chunks {
                    let elem = b.ins().iconst(I64, 4 * u as i64);
                    vector_at(b, elem);
                }
                return;
            }
            // `count` vectors from vector `first` on, each loop iteration doing `unroll`
            // of them: Cranelift rematerialises constants in every block that uses them,
            // so the element function's constants (a dozen per exp) are loaded once per
            // iteration; more vectors per iteration share them and give the core
            // independent chains to overlap.
            let mut vector_loop = |b: &mut FunctionBuilder, first: usize, count: usize, unroll: usize| {
                for_count(b, count, |b, c| {
                    // Element index of the block's first lane, then bytes per element size.
                    let block_elem = b.ins().imul_imm_s(c, 4 * unroll as i64);
                    let block_elem = b.ins().iadd_imm_s(block_elem, 4 * first as i64);
                    for u in 0..unroll {
                        let elem = b.ins().iadd_imm_s(block_elem, 4 * u as i64);
                        vector_at(b, elem);
                    }
                });
            };
            let blocks = vector_chunks / VECTOR_UNROLL;
            vector_loop(b, 0, blocks, VECTOR_UNROLL);
            vector_loop(b, blocks * VECTOR_UNROLL, vector_chunks % VECTOR_UNROLL, 1);
        }
        let done = vector_chunks * 4;
        if done == n {
            return;
        }
        let start = b.ins().iconst(I64, done as i64);
        let end = b.ins().iconst(I64, n as i64);
        crate::loops::for_range(b, start, end, |b, i| {
            let mut lanes = Vec::with_capacity(self.operands.len());
            for (k, o) in self.operands.iter().enumerate() {
                let addr = advance(b, bases[k + 1], i, inner_strides[k + 1]);
                lanes.push(b.ins().load(elem_type(o.dtype), o.flags, addr, 0));
            }
            match f(b, &lanes) {
                Ok(v) => {
                    let addr = advance(b, bases[0], i, inner_strides[0]);
                    b.ins().store(rw_flags(), v, addr, 0);
                }
                Err(e) => {
                    err.get_or_insert(e);
                }
            }
        });
    }
}

/// `p + i·stride` (stride in bytes, a compile-time constant).
pub fn advance(b: &mut FunctionBuilder, p: Value, i: Value, stride: i64) -> Value {
    match stride {
        0 => p,
        1 => b.ins().iadd(p, i),
        s => {
            let off = b.ins().imul_imm_s(i, s);
            b.ins().iadd(p, off)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_merges_contiguous_axes() {
        // out [2,3,4,5] contiguous, bias [3,1,1] broadcast.
        let out = vec![60, 20, 5, 1];
        let bias = vec![0, 1, 0, 0];
        let (dims, s) = collapse(&[2, 3, 4, 5], &[out, bias]);
        assert_eq!(dims, vec![2, 3, 20]);
        assert_eq!(s, vec![vec![60, 20, 1], vec![0, 1, 0]]);
    }

    #[test]
    fn broadcast_strides_follow_numpy() {
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]).unwrap(), vec![0, 1, 0]);
        assert_eq!(broadcast_strides(&[2, 3, 4], &[2, 3, 4]).unwrap(), vec![12, 4, 1]);
        assert!(broadcast_strides(&[3], &[4]).is_err());
    }
}
