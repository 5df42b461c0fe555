//! Matrix product (`Op::MatMul`) with numpy batch broadcasting.
//!
//! Each batch is a row-major GEMM C[M,N] = A[M,K]·B[K,N]. f32 uses a register tile of
//! 4 rows × 8 columns (eight f32x4 accumulators, two B vectors and one broadcast A
//! element: 11 of x86's 16 xmm registers) held across the whole K loop; leftover
//! columns use a 4-wide and then a scalar tile. Leftover rows (and M < 4, as in a
//! batch-1 classifier) use wider tiles of fewer rows. i32/i64 run scalar 2×2 tiles. When B has no batch of its own and A's
//! batches are dense, the batches fold into M: one GEMM instead of many.
//!
//! Large f32 products never get here in compiled pipelines: the matmul-as-conv pass
//! (`cnnc::passes::matmul_as_conv`) runs them as 1x1 convolutions on the packed, cache-
//! blocked GEMM microkernel (`conv_gemm.rs`), and few-row products by a constant B run
//! on `gemv.rs`. This kernel keeps small and integer products, batched B, and products
//! with few columns of an A too large to pack profitably.

use cnnc_ir::{DType, Op};
use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, Type, Value,
    types::{F32, F32X4, I32, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::{
    LANES, counted_loop, index_ptr, input_flags, load, offset_ptr, require_buffers,
    require_plain_layout, scalar_flags, store, tiled_loop, vector_flags,
};
use super::compute::misrouted;
use super::{CodegenError, KernelCtx};

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    if k.node.op != Op::MatMul {
        return Err(misrouted(k, "matmul"));
    }
    require_plain_layout(k)?;
    require_buffers(k, 2, 2, 1)?;
    let a = k.graph.ty(k.node.inputs[0]);
    let bt = k.graph.ty(k.node.inputs[1]);
    let c = k.graph.ty(k.node.outputs[0]);
    let fail = |msg: String| CodegenError(format!("matmul node '{}': {msg}", k.node.name));
    let elem = match a.dtype {
        DType::F32 => F32,
        DType::I32 => I32,
        DType::I64 => I64,
        other => {
            return Err(fail(format!(
                "dtype {other} is not supported (f32, i32 and i64 are)"
            )));
        }
    };
    if bt.dtype != a.dtype || c.dtype != a.dtype {
        return Err(fail(format!(
            "operands {a} x {bt} -> {c} must share one dtype"
        )));
    }
    if a.rank() < 2 || bt.rank() < 2 || c.rank() != a.rank().max(bt.rank()) {
        return Err(fail(format!(
            "operands {a} x {bt} -> {c} must have rank >= 2 and the output the larger rank"
        )));
    }
    let (m, kk) = (a.shape[a.rank() - 2], a.shape[a.rank() - 1]);
    let (k2, n) = (bt.shape[bt.rank() - 2], bt.shape[bt.rank() - 1]);
    let batch_rank = c.rank() - 2;
    if kk != k2 || c.shape[batch_rank] != m || c.shape[batch_rank + 1] != n {
        return Err(fail(format!("shapes {a} x {bt} -> {c} do not multiply")));
    }
    let out_batch = &c.shape[..batch_rank];
    let a_batch = broadcast_strides(&a.shape[..a.rank() - 2], out_batch, m * kk).map_err(&fail)?;
    let b_batch =
        broadcast_strides(&bt.shape[..bt.rank() - 2], out_batch, kk * n).map_err(&fail)?;
    let c_batch = cnnc_ir::strides(out_batch)
        .iter()
        .map(|s| s * m * n)
        .collect::<Vec<_>>();

    let batches: usize = out_batch.iter().product();
    let dense = cnnc_ir::strides(out_batch);
    let a_dense = (0..batch_rank).all(|d| out_batch[d] == 1 || a_batch[d] == dense[d] * m * kk);
    let gemm = Gemm {
        m,
        n,
        k: kk,
        lda: kk,
        accumulate: false,
        elem,
        b_scalar: input_flags(k, 1, scalar_flags()),
        b_vector: input_flags(k, 1, vector_flags()),
    };
    let (x, w, y) = (k.inputs[0], k.inputs[1], k.outputs[0]);
    if batches > 1 && b_batch.iter().all(|&s| s == 0) && a_dense && m * n > 0 {
        Gemm {
            m: m * batches,
            ..gemm
        }
        .emit(k.b, x, w, y);
    } else {
        emit_batches(k.b, &gemm, out_batch, &a_batch, &b_batch, &c_batch, x, w, y);
    }
    Ok(())
}

/// Element strides of an operand's batch axes over the output's batch axes (0 where
/// the operand is broadcast), scaled by its matrix size.
fn broadcast_strides(
    operand: &[usize],
    out: &[usize],
    matrix: usize,
) -> Result<Vec<usize>, String> {
    let lead = out.len() - operand.len();
    let own = cnnc_ir::strides(operand);
    (0..out.len())
        .map(|d| {
            if d < lead {
                return Ok(0);
            }
            let extent = operand[d - lead];
            match extent {
                e if e == out[d] && e != 1 => Ok(own[d - lead] * matrix),
                1 => Ok(0),
                e => Err(format!("batch extent {e} does not broadcast to {}", out[d])),
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn emit_batches(
    b: &mut FunctionBuilder,
    gemm: &Gemm,
    out_batch: &[usize],
    a_strides: &[usize],
    b_strides: &[usize],
    c_strides: &[usize],
    x: Value,
    w: Value,
    y: Value,
) {
    let Some((&extent, rest)) = out_batch.split_first() else {
        gemm.emit(b, x, w, y);
        return;
    };
    let size = gemm.elem.bytes() as i64;
    let (sa, sb, sc) = (
        a_strides[0] as i64 * size,
        b_strides[0] as i64 * size,
        c_strides[0] as i64 * size,
    );
    counted_loop(b, extent, vec![], |b, i, _| {
        let xa = index_ptr(b, x, i, sa);
        let wb = index_ptr(b, w, i, sb);
        let yc = index_ptr(b, y, i, sc);
        emit_batches(
            b,
            gemm,
            rest,
            &a_strides[1..],
            &b_strides[1..],
            &c_strides[1..],
            xa,
            wb,
            yc,
        );
        vec![]
    });
}

/// Bytes of B one block of the reduction reads (f32): it stays in L1/L2 while every
/// row block of A passes over it.
const B_BLOCK_BYTES: usize = 64 * 1024;

/// B sizes above which the reduction is cut into blocks when A has more than one row
/// block: unblocked, every row block streams all of B from memory again. Training's
/// weight gradients over stacked taps (resnet_tiny's stem: 27 x 65536 x 16, B 4 MiB)
/// read B seven times.
const BLOCKED_B_MIN_BYTES: usize = 256 * 1024;

/// One row-major GEMM of compile-time size.
#[derive(Clone, Copy)]
struct Gemm {
    m: usize,
    n: usize,
    /// Reduction depth of this product.
    k: usize,
    /// Elements per row of A (the whole reduction when `k` is one block of it).
    lda: usize,
    /// Adds to C instead of overwriting it.
    accumulate: bool,
    elem: Type,
    /// Load flags for B (movable when immutable during the call).
    b_scalar: MemFlagsData,
    b_vector: MemFlagsData,
}

/// Columns a tile covers: f32x4 vectors or single elements.
#[derive(Clone, Copy, PartialEq)]
enum Cols {
    Vectors(usize),
    Scalars(usize),
}

impl Cols {
    fn count(self) -> usize {
        match self {
            Cols::Vectors(v) => v * LANES,
            Cols::Scalars(s) => s,
        }
    }
}

impl Gemm {
    fn size(&self) -> i64 {
        self.elem.bytes() as i64
    }

    /// Row tile height.
    fn rows(&self) -> usize {
        if self.elem == F32 { 4 } else { 2 }
    }

    /// Column tiles for `rows` rows, widest first. Fewer rows get wider tiles so that
    /// enough independent accumulators hide the add latency (a single row, as in a
    /// batch-1 classifier, would otherwise wait on two dependency chains).
    fn col_tiles(&self, rows: usize) -> Vec<Cols> {
        if self.elem != F32 {
            return vec![Cols::Scalars(2), Cols::Scalars(1)];
        }
        // Accumulators + B vectors + one broadcast A element within 16 xmm registers.
        let vectors = match rows {
            4 => 2,
            3 => 3,
            2 => 4,
            _ => 6,
        };
        vec![Cols::Vectors(vectors), Cols::Vectors(1), Cols::Scalars(1)]
    }

    /// The reduction in blocks of `B_BLOCK_BYTES` of B (f32, B over `BLOCKED_B_MIN_BYTES`,
    /// several row blocks), each block over every row block of A, C accumulated.
    fn emit(&self, b: &mut FunctionBuilder, a: Value, w: Value, c: Value) {
        let b_bytes = self.k * self.n * self.elem.bytes() as usize;
        if self.elem != F32 || self.accumulate || b_bytes <= BLOCKED_B_MIN_BYTES || self.m <= self.rows() {
            self.emit_block(b, a, w, c);
            return;
        }
        let kc = (B_BLOCK_BYTES / (self.n * 4)).max(LANES) / LANES * LANES;
        let size = self.size();
        let mut k0 = 0;
        while k0 < self.k {
            let block = Gemm {
                k: kc.min(self.k - k0),
                accumulate: k0 > 0,
                ..*self
            };
            let a_block = offset_ptr(b, a, k0 as i64 * size);
            let b_block = offset_ptr(b, w, (k0 * self.n) as i64 * size);
            block.emit_block(b, a_block, b_block, c);
            k0 += block.k;
        }
    }

    fn emit_block(&self, b: &mut FunctionBuilder, a: Value, w: Value, c: Value) {
        let size = self.size();
        let rows = self.rows();
        let (_, rest) = tiled_loop(b, self.m, rows, vec![], |b, i, _| {
            let a_rows = index_ptr(b, a, i, rows as i64 * self.lda as i64 * size);
            let c_rows = index_ptr(b, c, i, rows as i64 * self.n as i64 * size);
            self.emit_row_block(b, rows, a_rows, w, c_rows);
            vec![]
        });
        if rest > 0 {
            let first = (self.m - rest) as i64;
            let a_rows = offset_ptr(b, a, first * self.lda as i64 * size);
            let c_rows = offset_ptr(b, c, first * self.n as i64 * size);
            self.emit_row_block(b, rest, a_rows, w, c_rows);
        }
    }

    /// All columns of `rows` consecutive rows.
    fn emit_row_block(&self, b: &mut FunctionBuilder, rows: usize, a: Value, w: Value, c: Value) {
        let size = self.size();
        let col_tiles = self.col_tiles(rows);
        let mut cursors = vec![w, c];
        let mut left = self.n;
        for cols in col_tiles {
            let step = cols.count() as i64 * size;
            let (next, rest) = tiled_loop(b, left, cols.count(), cursors, |b, _, p| {
                self.emit_tile(b, rows, cols, a, p[0], p[1]);
                vec![
                    b.ins().iadd_imm_s(p[0], step),
                    b.ins().iadd_imm_s(p[1], step),
                ]
            });
            cursors = next;
            left = rest;
        }
    }

    /// `rows × cols` outputs at `c`, reading rows of A at `a` and columns of B at `w`.
    fn emit_tile(
        &self,
        b: &mut FunctionBuilder,
        rows: usize,
        cols: Cols,
        a: Value,
        w: Value,
        c: Value,
    ) {
        let size = self.size();
        let per_row = match cols {
            Cols::Vectors(v) => v,
            Cols::Scalars(s) => s,
        };
        let zero = match cols {
            Cols::Vectors(_) => {
                let z = b.ins().f32const(0.0);
                b.ins().splat(F32X4, z)
            }
            Cols::Scalars(_) if self.elem == F32 => b.ins().f32const(0.0),
            Cols::Scalars(_) => b.ins().iconst(self.elem, 0),
        };
        let a_row = self.lda as i64 * size;
        let b_row = self.n as i64 * size;
        let c_offset = |r: usize, j: usize| {
            r as i64 * b_row
                + match cols {
                    Cols::Vectors(_) => (j * LANES) as i64 * size,
                    Cols::Scalars(_) => j as i64 * size,
                }
        };
        let (c_type, c_flags) = match cols {
            Cols::Vectors(_) => (F32X4, vector_flags()),
            Cols::Scalars(_) => (self.elem, scalar_flags()),
        };
        let mut carried = vec![a, w];
        for r in 0..rows {
            for j in 0..per_row {
                carried.push(if self.accumulate {
                    load(b, c_type, c_flags, c, c_offset(r, j))
                } else {
                    zero
                });
            }
        }
        let done = counted_loop(b, self.k, carried, |b, _, p| {
            let (ak, bk) = (p[0], p[1]);
            let mut accs = p[2..].to_vec();
            let b_elems: Vec<Value> = (0..per_row)
                .map(|j| match cols {
                    Cols::Vectors(_) => {
                        load(b, F32X4, self.b_vector, bk, (j * LANES) as i64 * size)
                    }
                    Cols::Scalars(_) => load(b, self.elem, self.b_scalar, bk, j as i64 * size),
                })
                .collect();
            for r in 0..rows {
                let mut a_elem = load(b, self.elem, scalar_flags(), ak, r as i64 * a_row);
                if matches!(cols, Cols::Vectors(_)) {
                    a_elem = b.ins().splat(F32X4, a_elem);
                }
                for (j, &be) in b_elems.iter().enumerate() {
                    let acc = &mut accs[r * per_row + j];
                    *acc = mul_add(b, *acc, a_elem, be);
                }
            }
            let mut next = vec![b.ins().iadd_imm_s(ak, size), b.ins().iadd_imm_s(bk, b_row)];
            next.extend(accs);
            next
        });
        for r in 0..rows {
            for j in 0..per_row {
                store(b, c_flags, done[2 + r * per_row + j], c, c_offset(r, j));
            }
        }
    }
}

/// acc + x·y for f32 (vector or scalar) and integers (wrapping).
fn mul_add(b: &mut FunctionBuilder, acc: Value, x: Value, y: Value) -> Value {
    let ty = b.func.dfg.value_type(acc);
    if ty.lane_type() == F32 {
        super::compute::mul_add(b, acc, x, y)
    } else {
        let p = b.ins().imul(x, y);
        b.ins().iadd(acc, p)
    }
}
