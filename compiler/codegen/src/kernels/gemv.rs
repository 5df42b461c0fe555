//! Matrix products with a constant B and few rows: the classifier layer of a batch-1
//! convnet (ONNX Gemm lowered to `MatMul` with constant [K, N] weights, bias and
//! activation fused as the node's epilogue).
//!
//! Such a product reads each weight once, so it runs at the speed B streams in from
//! memory. Row-major B would be walked a short run per row, 4·N bytes apart (page
//! crossings, prefetchers that never lock on); instead B is re-laid out at compile
//! time into column *panels*: panel p holds columns [p·W, p·W + W) for k = 0..K,
//! contiguous, as read-only data. The inner loop then streams W floats per k into
//! `rows × W/4` independent f32x4 accumulators, with FMA where the target has it. One
//! row (batch 1) sums four quarters of K at once, each its own stream through the
//! panel (W = 8, 8 accumulators): more misses in flight than one stream, which is
//! what a product that reads its weights from memory is bound by. The last panel
//! holds the remaining N mod W columns, padded to whole vectors with zeros.
//!
//! Panels are split over the host's threads (`parallel`): task t of T takes panels
//! [t·P/T, (t+1)·P/T), a contiguous range of the packed data. The node's epilogue
//! runs over the whole output after the tasks (N elements per row: negligible).
//!
//! The original B is not emitted: `module.rs` passes a null address for it, which
//! this kernel never reads.

use cnnc_ir::{ConstValue, DType, Graph, Layout, Node, Op, Scalar, TensorData};
use cranelift_codegen::Context;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I64};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataId, FuncId, Module};

use crate::module::define_local;

use super::compute::{counted_loop, load, offset_ptr, store};
use super::{CodegenError, parallel};

/// Rows (M, batches folded in) up to which a constant-B product takes this path. The
/// register tiles hold at most 4 rows; more rows re-read each panel from cache.
pub const MAX_ROWS: usize = 64;
/// Multiply-adds per task below which more tasks do not pay for their dispatch.
const MIN_TASK_MACS: usize = 1 << 16;
const LANES: usize = 4;

/// How one constant-B product runs.
#[derive(Clone, Debug, PartialEq)]
pub struct GemvPlan {
    /// Rows of A and C (all batches of A folded in).
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// Rows per register tile (1..=4).
    pub row_tile: usize,
    /// Columns of a full panel (a multiple of 4).
    pub width: usize,
    /// Ranges of k summed at the same time (1 or 4), each streaming its own part of
    /// the panel: several streams keep more cache misses in flight than one.
    pub k_streams: usize,
}

impl GemvPlan {
    fn full_panels(&self) -> usize {
        self.n / self.width
    }

    /// Columns of the last, narrower panel (0: none).
    fn tail_columns(&self) -> usize {
        self.n % self.width
    }

    pub fn panels(&self) -> usize {
        self.full_panels() + usize::from(self.tail_columns() > 0)
    }

    /// The most tasks worth running (the run-time thread count caps them further).
    fn max_tasks(&self) -> usize {
        let macs = self.rows * self.k * self.n;
        (macs / MIN_TASK_MACS).clamp(1, self.panels())
    }

    /// B ([K, N] row-major) as panels: full panels of `width` columns, then the tail
    /// panel with its columns rounded up to whole vectors (zeros past N).
    pub fn pack(&self, b: &[f32]) -> Vec<u8> {
        let tail_width = self.tail_columns().div_ceil(LANES) * LANES;
        let mut packed = Vec::with_capacity((self.full_panels() * self.width + tail_width) * self.k * 4);
        let mut put_panel = |first: usize, width: usize| {
            for kk in 0..self.k {
                for j in first..first + width {
                    let v = if j < self.n { b[kk * self.n + j] } else { 0.0 };
                    packed.extend_from_slice(&v.to_le_bytes());
                }
            }
        };
        for p in 0..self.full_panels() {
            put_panel(p * self.width, self.width);
        }
        if tail_width > 0 {
            put_panel(self.full_panels() * self.width, tail_width);
        }
        packed
    }
}

/// The plan for `node`, or None when it is not an f32 `MatMul` of at most `MAX_ROWS`
/// rows by a constant B without batches of its own.
pub fn plan(g: &Graph, node: &Node) -> Option<GemvPlan> {
    if node.op != Op::MatMul
        || node.outputs.len() != 1
        || cnnc_ir::verify::op_input_count(node) != 2
        || node.schedule.layout_in != Layout::Plain
        || node.schedule.layout_out != Layout::Plain
    {
        return None;
    }
    let a = g.ty(*node.inputs.first()?);
    let bt = g.ty(*node.inputs.get(1)?);
    let c = g.ty(node.outputs[0]);
    if [a.dtype, bt.dtype, c.dtype].iter().any(|&d| d != DType::F32) || a.rank() < 2 || bt.rank() < 2 {
        return None;
    }
    let k = a.shape[a.rank() - 1];
    let n = bt.shape[bt.rank() - 1];
    let m = a.shape[a.rank() - 2];
    if bt.shape[bt.rank() - 2] != k || bt.shape[..bt.rank() - 2].iter().any(|&e| e != 1) {
        return None;
    }
    // B has no batches, so C's batches are A's (with leading 1s where B has more axes)
    // and A's rows fold into one [rows, K] matrix.
    let rows = a.numel().checked_div(k)?;
    let c_rank = c.rank();
    if c_rank != a.rank().max(bt.rank())
        || c.shape[c_rank - 2] != m
        || c.shape[c_rank - 1] != n
        || c.numel() != rows * n
    {
        return None;
    }
    if rows == 0 || n == 0 || rows > MAX_ROWS || !constant_b(g, node) {
        return None;
    }
    let row_tile = rows.min(4);
    // Accumulators (row_tile × vectors) within x86's 16 xmm registers, leaving room
    // for the loaded B vectors and the broadcast A element.
    // One row: four k streams of 2 vectors. A batch-1 classifier reads its weights
    // from memory: 65 MB of them took 4.9 ms this way, 5.2 ms with two streams of 4
    // vectors and 6.2 ms with one stream of 8 (ORT: 5.0 ms).
    let (vectors, k_streams) = match row_tile {
        1 if k >= 4 => (2, 4),
        1 => (8, 1),
        2 => (4, 1),
        3 => (3, 1),
        _ => (2, 1),
    };
    Some(GemvPlan {
        rows,
        k,
        n,
        row_tile,
        width: vectors * LANES,
        k_streams,
    })
}

/// Whether B is the output of a constant node with f32 data.
fn constant_b(g: &Graph, node: &Node) -> bool {
    let w = node.inputs[1];
    let Some(producer) = g.nodes.iter().find(|m| m.outputs.contains(&w)) else {
        return false;
    };
    let Op::Constant(c) = producer.op else {
        return false;
    };
    match g.constants.get(c.index()).map(|k| &k.value) {
        Some(ConstValue::Dense(TensorData::F32(v))) => v.len() == g.ty(w).numel(),
        Some(ConstValue::Splat(Scalar::F32(_))) => true,
        _ => false,
    }
}

/// Defines the packed B, the task and the node's kernel; returns the kernel (module
/// node-kernel signature `kernel_sig`). The buffers are the node's inputs then its
/// output.
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &GemvPlan,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let what = format!("matmul '{}' by constant panels", node.name);
    let weights = super::conv_gemm::constant_weights(g, node)
        .ok_or_else(|| CodegenError(format!("{what}: B is not a constant")))?;
    let packed = crate::module::define_bytes(module, &format!("cnnc_panels{node_index}"), plan.pack(&weights))?;
    let fma = crate::math::isa_has_fma(module.isa());

    let task_name = format!("cnnc_k{node_index}_matmul_task");
    let task_sig = parallel::task_signature(module);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, module, params| {
        emit_task(module, b, node, plan, packed, fma, params[0], params[1]);
        Ok(())
    })?;

    let name = format!("cnnc_k{node_index}_matmul_panels");
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_up_to(module, b, host, bufs, task, plan.max_tasks());
        super::elementwise::emit_epilogue_steps_from_buffers(b, g, node, &node.epilogue, bufs)?;
        Ok(())
    })
}

/// Task `index` of the context's task count: its range of panels, every row.
#[allow(clippy::too_many_arguments)]
fn emit_task<M: Module>(
    module: &mut M,
    b: &mut FunctionBuilder,
    node: &Node,
    plan: &GemvPlan,
    packed: DataId,
    fma: bool,
    task_ctx: Value,
    index: Value,
) {
    let flags = MemFlagsData::trusted().with_readonly().with_can_move();
    // Panels [first, end): this task's share.
    let parallel::TaskShare { bufs, first, end } = parallel::emit_task_share(b, task_ctx, index, plan.panels());
    let a = b.ins().load(I64, flags, bufs, 0);
    let c = b.ins().load(I64, flags, bufs, (8 * node.inputs.len()) as i32);
    let gv = module.declare_data_in_func(packed, b.func);
    let panels_base = b.ins().symbol_value(I64, gv);


    let tile = Tile {
        plan,
        fma,
        a_row: plan.k as i64 * 4,
        c_row: plan.n as i64 * 4,
    };
    let full = plan.full_panels();
    let panel_bytes = (plan.k * plan.width * 4) as i64;
    let full_end = b.ins().iconst(I64, full as i64);
    let full_end = b.ins().umin(end, full_end);
    super::gemm::for_range(b, first, full_end, |b, p| {
        let panel = super::gemm::scaled(b, panels_base, p, panel_bytes);
        let c_cols = super::gemm::scaled(b, c, p, plan.width as i64 * 4);
        tile.emit_rows(b, plan.width, a, panel, c_cols);
    });
    let tail = plan.tail_columns();
    if tail > 0 {
        // The task whose range ends at the last panel also runs the tail panel.
        let has_tail = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThan, end, full as i64);
        let tail_block = b.create_block();
        let done = b.create_block();
        b.ins().brif(has_tail, tail_block, &[], done, &[]);
        b.switch_to_block(tail_block);
        b.seal_block(tail_block);
        let panel = offset_ptr(b, panels_base, full as i64 * panel_bytes);
        let c_cols = offset_ptr(b, c, (full * plan.width * 4) as i64);
        tile.emit_rows(b, tail, a, panel, c_cols);
        b.ins().jump(done, &[]);
        b.switch_to_block(done);
        b.seal_block(done);
    }
}

/// Code for one panel over all rows.
struct Tile<'p> {
    plan: &'p GemvPlan,
    fma: bool,
    /// Bytes between rows of A and of C.
    a_row: i64,
    c_row: i64,
}

impl Tile<'_> {
    /// All rows of the panel at `panel` (`columns` valid columns, stored at `c`).
    fn emit_rows(&self, b: &mut FunctionBuilder, columns: usize, a: Value, panel: Value, c: Value) {
        let tile = self.plan.row_tile;
        let blocks = self.plan.rows / tile;
        counted_loop(b, blocks, vec![], |b, i, _| {
            let a_rows = super::gemm::scaled(b, a, i, tile as i64 * self.a_row);
            let c_rows = super::gemm::scaled(b, c, i, tile as i64 * self.c_row);
            self.emit_tile(b, tile, columns, a_rows, panel, c_rows);
            vec![]
        });
        let rest = self.plan.rows % tile;
        if rest > 0 {
            let first = (blocks * tile) as i64;
            let a_rows = offset_ptr(b, a, first * self.a_row);
            let c_rows = offset_ptr(b, c, first * self.c_row);
            self.emit_tile(b, rest, columns, a_rows, panel, c_rows);
        }
    }

    /// `rows` × `columns` outputs: the K loop over the panel with the accumulators in
    /// registers (per k stream: stream s sums k in [s·K/S, (s+1)·K/S), the last stream
    /// also an odd k left over), then the stores (lane by lane past the last whole
    /// vector).
    fn emit_tile(&self, b: &mut FunctionBuilder, rows: usize, columns: usize, a: Value, panel: Value, c: Value) {
        let vectors = columns.div_ceil(LANES);
        let panel_row = (vectors * LANES * 4) as i64;
        let streams = self.plan.k_streams;
        let steps = self.plan.k / streams;
        let zero = b.ins().f32const(0.0);
        let zero = b.ins().splat(F32X4, zero);
        let mut carried = vec![a, panel];
        carried.extend(std::iter::repeat_n(zero, streams * rows * vectors));
        let a_stream = steps as i64 * 4;
        let b_stream = steps as i64 * panel_row;
        let done = counted_loop(b, steps, carried, |b, _, p| {
            let (ak, bk) = (p[0], p[1]);
            let mut accs = p[2..].to_vec();
            for s in 0..streams {
                let at = s * rows * vectors;
                self.emit_k_step(
                    b,
                    rows,
                    vectors,
                    ak,
                    bk,
                    s as i64 * a_stream,
                    s as i64 * b_stream,
                    &mut accs[at..at + rows * vectors],
                );
            }
            let mut next = vec![b.ins().iadd_imm_s(ak, 4), b.ins().iadd_imm_s(bk, panel_row)];
            next.extend(accs);
            next
        });
        let mut accs = done[2..].to_vec();
        let left = self.plan.k - steps * streams;
        for extra in 0..left as i64 {
            // Past the last stream's range: k = S·steps + extra.
            let last = (streams - 1) * rows * vectors;
            self.emit_k_step(
                b,
                rows,
                vectors,
                done[0],
                done[1],
                (streams - 1) as i64 * a_stream + extra * 4,
                (streams - 1) as i64 * b_stream + extra * panel_row,
                &mut accs[last..last + rows * vectors],
            );
        }
        let tile = rows * vectors;
        for s in 1..streams {
            for i in 0..tile {
                accs[i] = b.ins().fadd(accs[i], accs[s * tile + i]);
            }
        }
        let done: Vec<Value> = [done[0], done[1]].into_iter().chain(accs).collect();
        let write = MemFlagsData::new().with_notrap();
        for r in 0..rows {
            for j in 0..vectors {
                let acc = done[2 + r * vectors + j];
                let offset = r as i64 * self.c_row + (j * LANES * 4) as i64;
                let valid = (columns - j * LANES).min(LANES);
                if valid == LANES {
                    store(b, write, acc, c, offset);
                } else {
                    for lane in 0..valid {
                        let x = b.ins().extractlane(acc, lane as u8);
                        store(b, write, x, c, offset + lane as i64 * 4);
                    }
                }
            }
        }
    }

    /// One k of the tile: `accs[r·vectors + j] += A[r, k]·B[k, 4j..4j+4]`, A's element
    /// at `ak + a_offset` (rows `a_row` apart), B's vectors at `bk + b_offset`.
    #[allow(clippy::too_many_arguments)]
    fn emit_k_step(
        &self,
        b: &mut FunctionBuilder,
        rows: usize,
        vectors: usize,
        ak: Value,
        bk: Value,
        a_offset: i64,
        b_offset: i64,
        accs: &mut [Value],
    ) {
        let read = MemFlagsData::new().with_notrap().with_readonly().with_can_move();
        let b_vectors: Vec<Value> = (0..vectors)
            .map(|j| load(b, F32X4, read, bk, b_offset + (j * LANES * 4) as i64))
            .collect();
        for r in 0..rows {
            let x = load(b, F32, read, ak, a_offset + r as i64 * self.a_row);
            let x = b.ins().splat(F32X4, x);
            for (j, &w) in b_vectors.iter().enumerate() {
                let acc = &mut accs[r * vectors + j];
                *acc = if self.fma {
                    b.ins().fma(x, w, *acc)
                } else {
                    let prod = b.ins().fmul(x, w);
                    b.ins().fadd(*acc, prod)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{Tensor, TensorType};

    fn classifier(rows: usize, k: usize, n: usize) -> Graph {
        let mut g = Graph::new("fc");
        let x = g.add_input(TensorType::f32([rows, k]), "x");
        let w = g.add_constant("w", Tensor::f32([k, n], (0..k * n).map(|i| i as f32).collect()));
        let y = g.push1("fc", Op::MatMul, &[x, w]).unwrap();
        g.outputs.push(y);
        g
    }

    #[test]
    fn one_row_takes_four_k_streams_of_two_vector_panels() {
        let g = classifier(1, 9, 37);
        let node = g.nodes.iter().find(|n| n.op == Op::MatMul).unwrap();
        let p = plan(&g, node).unwrap();
        assert_eq!((p.rows, p.row_tile, p.width, p.k_streams, p.panels()), (1, 1, 8, 4, 5));
        let g = classifier(2, 9, 37);
        let p = plan(&g, g.nodes.iter().find(|n| n.op == Op::MatMul).unwrap()).unwrap();
        assert_eq!((p.row_tile, p.width, p.k_streams), (2, 16, 1));
    }

    #[test]
    fn one_row_with_short_k_takes_eight_vector_panels_and_packs_the_tail() {
        let g = classifier(1, 3, 37);
        let node = g.nodes.iter().find(|n| n.op == Op::MatMul).unwrap();
        let p = plan(&g, node).unwrap();
        assert_eq!((p.rows, p.row_tile, p.width, p.k_streams, p.panels()), (1, 1, 32, 1, 2));
        let packed = p.pack(&(0..3 * 37).map(|i| i as f32).collect::<Vec<_>>());
        let floats: Vec<f32> = packed
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // 32 columns x 3 rows, then the 5 tail columns rounded to 8.
        assert_eq!(floats.len(), 3 * 32 + 3 * 8);
        assert_eq!(floats[32], 37.0, "row 1 of panel 0 starts at B[1, 0]");
        assert_eq!(&floats[96..104], &[32.0, 33.0, 34.0, 35.0, 36.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn many_rows_or_variable_b_stay_on_the_general_kernel() {
        let g = classifier(MAX_ROWS + 1, 8, 8);
        assert!(plan(&g, &g.nodes[1]).is_none());
        let mut g = Graph::new("vv");
        let x = g.add_input(TensorType::f32([1, 8]), "x");
        let w = g.add_input(TensorType::f32([8, 8]), "w");
        let y = g.push1("mm", Op::MatMul, &[x, w]).unwrap();
        g.outputs.push(y);
        assert!(plan(&g, &g.nodes[0]).is_none());
    }
}
