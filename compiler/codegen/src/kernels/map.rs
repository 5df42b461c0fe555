//! The elementwise loop engine: `out[i] = f(a[i], b[i], …)` over an output shape,
//! each operand read through its own strides (0 on broadcast axes).
//!
//! Axes are first collapsed wherever every operand is contiguous across them, so a
//! broadcast bias over [N, C, H, W] becomes a loop over N·C rows of H·W elements.
//! The innermost run is vectorised with f32x4 when the element function allows it
//! and every operand's innermost stride is 0 or 1; a scalar loop does the remainder.

use cnnc_ir::DType;
use cranelift_codegen::ir::types::{F32, F32X4, I8, I32, I64};
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

/// The element function: gets one lane value per operand (F32X4 lanes in the vector
/// loop, scalars otherwise) and returns the output lane.
pub type ElemFn<'c> = dyn Fn(&mut FunctionBuilder, &[Value]) -> Result<Value, CodegenError> + 'c;

/// Emits `out[i] = f(operands…[i])` over `shape`; `out` is dense row-major.
/// `vectorize` says `f` also accepts F32X4 lanes (all operands and the output must
/// then be f32).
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
    let vectorize = vectorize && out_dtype == DType::F32 && operands.iter().all(|o| o.dtype == DType::F32);
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
    operands: &'p [Operand],
    vectorize: bool,
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
        let unit_or_zero = inner_strides[1..].iter().all(|&s| s == 0 || s == 4);
        let vector_chunks = if self.vectorize && unit_or_zero { n / 4 } else { 0 };
        if vector_chunks > 0 {
            // Broadcast operands are loaded once, outside the loop.
            let mut splats: Vec<Option<Value>> = vec![None; self.operands.len()];
            for (k, o) in self.operands.iter().enumerate() {
                if inner_strides[k + 1] == 0 {
                    let s = b.ins().load(F32, o.flags, bases[k + 1], 0);
                    splats[k] = Some(b.ins().splat(F32X4, s));
                }
            }
            // `count` vectors from vector `first` on, each loop iteration doing `unroll`
            // of them: Cranelift rematerialises constants in every block that uses them,
            // so the element function's constants (a dozen per exp) are loaded once per
            // iteration; more vectors per iteration share them and give the core
            // independent chains to overlap.
            let mut vector_loop = |b: &mut FunctionBuilder, first: usize, count: usize, unroll: usize| {
                for_count(b, count, |b, c| {
                    let block_byte = b.ins().imul_imm_s(c, 16 * unroll as i64);
                    let block_byte = b.ins().iadd_imm_s(block_byte, 16 * first as i64);
                    for u in 0..unroll {
                        let byte = b.ins().iadd_imm_s(block_byte, 16 * u as i64);
                        let mut lanes = Vec::with_capacity(self.operands.len());
                        for (k, o) in self.operands.iter().enumerate() {
                            lanes.push(match splats[k] {
                                Some(v) => v,
                                None => {
                                    let addr = b.ins().iadd(bases[k + 1], byte);
                                    b.ins().load(F32X4, o.flags, addr, 0)
                                }
                            });
                        }
                        match f(b, &lanes) {
                            Ok(v) => {
                                let addr = b.ins().iadd(bases[0], byte);
                                b.ins().store(rw_flags(), v, addr, 0);
                            }
                            Err(e) => {
                                err.get_or_insert(e);
                            }
                        }
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
