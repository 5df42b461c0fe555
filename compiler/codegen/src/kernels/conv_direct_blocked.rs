//! KxK (and padded 1x1) ungrouped convolution from a blocked (NCHWc8) input to a
//! blocked output as a direct convolution: no im2col, each call of the machine code
//! (`microkernel::conv_direct_x86`) accumulates up to six consecutive output positions
//! of one output row x 16 output channels over every tap and input block, reading the
//! taps at compile-time displacements.
//!
//! Borders need no padded copy: an output row runs only the kernel rows that fall
//! inside the image (per row, a table gives the first one and how many), and a row's
//! tiles (at most six positions, balanced sizes: 55 = 5 x 6 + 5 x 5) at the left and
//! right edges run functions assembled without the FMAs of their positions' outside
//! kernel columns; equal interior tiles run in a loop. Weights are packed at compile
//! time per 16 output channels (8 for a last odd block): kernel row, input block, kernel
//! column, lane, then the 16 weights. The leading bias/ReLU/clip/residual steps of the
//! epilogue are applied in registers; the rest runs as one pass over the output. Tasks
//! over (image, output row, panel of 16 channels) go through the host's `parallel_for`;
//! the panel is the outer coordinate when the weights outweigh the input (each panel
//! then runs every row while its weights are in cache).

use std::collections::BTreeMap;

use cnnc_ir::{DType, EpilogueStep, Graph, Node, Op};
use cranelift_codegen::Context;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};

use super::parallel::FloatEnv;
use super::{CodegenError, parallel};
use crate::microkernel::conv_direct_x86::{self as machine, BLOCK, DirectSpec, MAX_ROWS};
use crate::microkernel::store_epilogue::{self, StoreStep};
use crate::module::{define_bytes, define_local};

/// Multiply-adds below which a task is not worth its dispatch (~1 µs).
const MIN_TASK_MACS: usize = 1 << 16;
/// Weights over this many times an image's input run panel by panel.
const PANELS_OUTER_WEIGHT_RATIO: usize = 4;
/// Kinds of tiles along a row (each its own function) beyond which the convolution
/// stays plain: only huge paddings reach it.
const MAX_PIECES: usize = 12;

/// A run of equal tiles along every output row: `tiles` tiles of `positions` output
/// columns from column `x`, position `i` running kernel columns `columns[i]`.
#[derive(Clone, Debug, PartialEq)]
struct Piece {
    x: usize,
    tiles: usize,
    positions: usize,
    columns: Vec<Vec<usize>>,
}
/// How one blocked direct convolution runs.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectPlan {
    /// The input is plain NCHW with at most 8 channels (a stem), read as one block whose
    /// lanes are the channel planes; the output is blocked all the same.
    plain_input: bool,
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads_begin: [usize; 2],
    /// Per output row: the first kernel row inside the image and how many are.
    kernel_rows: Vec<(usize, usize)>,
    pieces: Vec<Piece>,
    weights: Vec<f32>,
    bias: Option<Vec<f32>>,
    steps: Vec<StoreStep>,
    /// Epilogue steps left for a pass over the output.
    rest: Vec<EpilogueStep>,
}

impl DirectPlan {
    fn k_blocks(&self) -> usize {
        if self.plain_input { 1 } else { self.in_channels / BLOCK }
    }
    /// Input channels per block.
    fn lanes(&self) -> usize {
        if self.plain_input { self.in_channels } else { BLOCK }
    }
    /// Input bytes per position (of one block).
    fn in_position_bytes(&self) -> usize {
        if self.plain_input { 4 } else { BLOCK * 4 }
    }
    fn full_panels(&self) -> usize {
        self.out_channels / (2 * BLOCK)
    }
    fn has_half_panel(&self) -> bool {
        self.out_channels % (2 * BLOCK) != 0
    }
    /// Bytes of one kernel row of a panel `blocks` output blocks wide.
    fn kernel_row_bytes(&self, blocks: usize) -> usize {
        self.k_blocks() * self.kernel[1] * self.lanes() * blocks * BLOCK * 4
    }
    fn panel_bytes(&self, blocks: usize) -> usize {
        self.kernel[0] * self.kernel_row_bytes(blocks)
    }
    /// Whether units run panel by panel (all rows of a panel, then the next), not row
    /// by row: when the weights outweigh an image's input several times, so re-reading
    /// the input per panel costs less than streaming every panel per row. Measured
    /// (same profile, samples): SqueezeNet's 13x13 expands (weights 13x the input) 3-4%
    /// faster panel by panel, its 55x55 and 27x27 ones (weights 0.2-1.6x) 2-3% slower.
    fn panels_outer(&self) -> bool {
        let weights = self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1];
        let input = self.in_channels * self.in_h * self.in_w;
        weights > PANELS_OUTER_WEIGHT_RATIO * input
    }
    fn in_plane_bytes(&self) -> usize {
        self.in_h * self.in_w * self.in_position_bytes()
    }
    fn out_plane_bytes(&self) -> usize {
        self.out_h * self.out_w * BLOCK * 4
    }

    fn spec(&self, rows: usize, blocks: usize, columns: Vec<Vec<usize>>) -> DirectSpec {
        DirectSpec {
            rows,
            blocks,
            k_blocks: self.k_blocks(),
            lanes: self.lanes(),
            a_lane_bytes: if self.plain_input { (self.in_h * self.in_w * 4) as i32 } else { 4 },
            kernel_w: self.kernel[1],
            columns,
            a_position_bytes: (self.strides[1] * self.in_position_bytes()) as i32,
            a_tap_bytes: (self.dilations[1] * self.in_position_bytes()) as i32,
            a_block_bytes: self.in_plane_bytes() as i32,
            a_row_bytes: (self.dilations[0] * self.in_w * self.in_position_bytes()) as i32,
            c_block_bytes: self.out_plane_bytes() as i32,
            bias: self.bias.is_some(),
            steps: self.steps.clone(),
        }
    }

    /// Weights [M, K, KH, KW] as panels of 16 (then 8) output channels:
    /// `[KH][K/8][KW][8][width]` each.
    fn pack(&self) -> Vec<u8> {
        let (m, k) = (self.out_channels, self.in_channels);
        let [kh, kw] = self.kernel;
        let mut out = Vec::with_capacity(m * k * kh * kw * 4);
        let mut m0 = 0;
        while m0 < m {
            let width = (m - m0).min(2 * BLOCK);
            for ky in 0..kh {
                for kb in 0..self.k_blocks() {
                    for kx in 0..kw {
                        for lane in 0..self.lanes() {
                            let c = kb * self.lanes() + lane;
                            for j in 0..width {
                                let w = self.weights[(((m0 + j) * k + c) * kh + ky) * kw + kx];
                                out.extend_from_slice(&w.to_le_bytes());
                            }
                        }
                    }
                }
            }
            m0 += width;
        }
        out
    }

    /// Per output row: input byte offset of its first kernel row (block 0, column 0),
    /// weight byte offsets of that kernel row in a 16- and an 8-wide panel, kernel rows.
    fn row_table(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.out_h * 32);
        for (oy, &(first, count)) in self.kernel_rows.iter().enumerate() {
            let in_row = oy * self.strides[0] + first * self.dilations[0] - self.pads_begin[0];
            let entries = [
                (in_row * self.in_w * self.in_position_bytes()) as i64,
                (first * self.kernel_row_bytes(2)) as i64,
                (first * self.kernel_row_bytes(1)) as i64,
                count as i64,
            ];
            for e in entries {
                out.extend_from_slice(&e.to_le_bytes());
            }
        }
        out
    }
}

/// The valid taps of one output coordinate along an axis: kernel indices `t` with
/// `0 <= o·stride - pad + t·dilation < size`, a contiguous range.
fn valid_taps(o: usize, stride: usize, pad: usize, dilation: usize, kernel: usize, size: usize) -> Vec<usize> {
    (0..kernel)
        .filter(|&t| {
            let at = (o * stride + t * dilation) as i64 - pad as i64;
            at >= 0 && at < size as i64
        })
        .collect()
}

/// Whether this kernel runs `node` once its layouts are Blocked{8}.
pub fn supports_node(g: &Graph, node: &Node) -> bool {
    analyse(g, node, false).is_ok()
}

/// Whether this kernel runs `node` reading its input plain (at most 8 channels) and
/// writing Blocked{8}: a network's stem, without a reorder after it.
pub fn supports_plain_input(g: &Graph, node: &Node) -> bool {
    analyse(g, node, true).is_ok()
}

pub(crate) fn analyse(g: &Graph, node: &Node, plain_input: bool) -> Result<DirectPlan, String> {
    let Op::Conv(geometry) = &node.op else { return Err("not a convolution".into()) };
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    let (Some(&x), Some(&w), [y]) = (node.inputs.first(), node.inputs.get(1), node.outputs.as_slice()) else {
        return Err("needs an input, a weight and one output".into());
    };
    let (xt, wt, yt) = (g.ty(x), g.ty(w), g.ty(*y));
    if [xt, wt, yt].iter().any(|t| t.dtype != DType::F32 || t.rank() != 4) {
        return Err("needs rank-4 f32 tensors".into());
    }
    let (k, m) = (xt.shape[1], yt.shape[1]);
    if geometry.groups != 1 {
        return Err(format!("only ungrouped convolutions (groups {})", geometry.groups));
    }
    if plain_input && (k > BLOCK || m % BLOCK != 0 || k == 0 || m == 0) {
        return Err(format!("channels {k} -> {m}: a plain input has at most {BLOCK}, the output a multiple of {BLOCK}"));
    }
    if !plain_input && (k % BLOCK != 0 || m % BLOCK != 0 || k == 0 || m == 0) {
        return Err(format!("channels {k} -> {m} must be multiples of {BLOCK}"));
    }
    let weights = super::conv_blocked::constant_input(g, node, 1).ok_or("the weights must be a constant")?;
    let bias = if op_inputs > 2 {
        Some(super::conv_blocked::constant_input(g, node, 2).ok_or("the bias must be a constant")?)
    } else {
        None
    };
    let (in_h, in_w, out_h, out_w) = (xt.shape[2], xt.shape[3], yt.shape[2], yt.shape[3]);
    let kernel = [wt.shape[2], wt.shape[3]];
    let strides = [geometry.strides[0], geometry.strides[1]];
    let dilations = [geometry.dilations[0], geometry.dilations[1]];
    let pads_begin = [geometry.pads_begin[0], geometry.pads_begin[1]];
    if xt.shape[0] == 0 || out_h == 0 || out_w == 0 || kernel.contains(&0) {
        return Err("empty convolution".into());
    }
    let plane = in_h * in_w * BLOCK * 4;
    if plane.max(out_h * out_w * BLOCK * 4) * 2 > i32::MAX as usize / 2 || k / BLOCK * plane > i32::MAX as usize / 2 {
        return Err("planes too large for 32-bit displacements".into());
    }
    let mut kernel_rows = Vec::with_capacity(out_h);
    for oy in 0..out_h {
        let taps = valid_taps(oy, strides[0], pads_begin[0], dilations[0], kernel[0], in_h);
        let Some(&first) = taps.first() else {
            return Err(format!("output row {oy} lies entirely in the padding"));
        };
        kernel_rows.push((first, taps.len()));
    }
    let columns: Vec<Vec<usize>> =
        (0..out_w).map(|ox| valid_taps(ox, strides[1], pads_begin[1], dilations[1], kernel[1], in_w)).collect();
    if columns.iter().any(|c| c.is_empty()) {
        return Err("an output column lies entirely in the padding".into());
    }
    // Rows in tiles of at most six, of balanced sizes (a tile of one position would run
    // at a sixth of the speed); equal neighbours form one piece (a loop).
    let tiles = out_w.div_ceil(MAX_ROWS);
    let mut pieces: Vec<Piece> = Vec::new();
    let mut x = 0;
    for t in 0..tiles {
        let positions = out_w / tiles + usize::from(t < out_w % tiles);
        let cols = columns[x..x + positions].to_vec();
        match pieces.last_mut() {
            Some(last) if last.positions == positions && last.columns == cols => last.tiles += 1,
            _ => pieces.push(Piece { x, tiles: 1, positions, columns: cols }),
        }
        x += positions;
    }
    if pieces.len() > MAX_PIECES {
        return Err(format!("{} kinds of tiles along a row (at most {MAX_PIECES})", pieces.len()));
    }
    // The leading steps the machine code applies, the rest after.
    let mut steps = Vec::new();
    let mut taken = 0;
    for step in &node.epilogue {
        let next: Option<Vec<StoreStep>> = match *step {
            EpilogueStep::Unary(f) => store_epilogue::unary_store_steps(f)
                .filter(|s| s.iter().all(|s| matches!(s, StoreStep::Max(_) | StoreStep::Min(_)))),
            EpilogueStep::Binary { func, operand } => store_epilogue::binary_store_step(func)
                .filter(|_| node.inputs.get(operand).is_some_and(|&v| g.ty(v).shape == yt.shape))
                .map(|s| vec![s]),
        };
        let Some(next) = next else { break };
        let mut candidate = steps.clone();
        candidate.extend(next);
        if !machine::takes_steps(&candidate) {
            break;
        }
        steps = candidate;
        taken += 1;
    }
    if plain_input && taken < node.epilogue.len() {
        // The pass after the tiles runs over one layout; this node has two.
        return Err("a plain-input convolution applies its whole epilogue in registers".into());
    }
    Ok(DirectPlan {
        plain_input,
        batch: xt.shape[0],
        in_channels: k,
        out_channels: m,
        in_h,
        in_w,
        out_h,
        out_w,
        kernel,
        strides,
        dilations,
        pads_begin,
        kernel_rows,
        pieces,
        weights,
        bias,
        steps,
        rest: node.epilogue[taken..].to_vec(),
    })
}

/// `(a, b, c, residual, kernel_rows, bias)`, all i64, SystemV.
fn machine_code_signature() -> Signature {
    crate::microkernel::registry::sysv_i64_signature(6)
}

/// Defines the node's machine code (one function per piece shape and panel width),
/// packed weights, row table, task and kernel; returns the kernel.
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &DirectPlan,
    float_env: Option<FloatEnv>,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let what = format!("blocked direct convolution '{}'", node.name);
    let packed = define_bytes(module, &format!("cnnc_w{node_index}_direct8"), plan.pack())?;
    let table = define_bytes(module, &format!("cnnc_t{node_index}_direct8_rows"), plan.row_table())?;
    let bias_bytes: Vec<u8> = match &plan.bias {
        Some(bias) => bias.iter().flat_map(|v| v.to_le_bytes()).collect(),
        None => vec![0; 4],
    };
    let bias_data = define_bytes(module, &format!("cnnc_b{node_index}_direct8"), bias_bytes)?;

    // One function per (positions, kernel columns, panel blocks).
    let shape_of = |piece: &Piece| (piece.positions, piece.columns.clone());
    let widths: Vec<usize> = [(2, plan.full_panels() > 0), (1, plan.has_half_panel())]
        .into_iter()
        .filter_map(|(blocks, needed)| needed.then_some(blocks))
        .collect();
    let mut codes: BTreeMap<(usize, Vec<Vec<usize>>, usize), FuncId> = BTreeMap::new();
    for piece in &plan.pieces {
        let (rows, columns) = shape_of(piece);
        for &blocks in &widths {
            let key = (rows, columns.clone(), blocks);
            if codes.contains_key(&key) {
                continue;
            }
            let code = machine::assemble(&plan.spec(rows, blocks, columns.clone()))?;
            let name = format!("cnnc_k{node_index}_direct8_{}", codes.len());
            let id = module
                .declare_function(&name, Linkage::Local, &machine_code_signature())
                .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
            module
                .define_function_bytes(id, crate::microkernel::x86::CODE_ALIGN, &code, &[])
                .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
            codes.insert(key, id);
        }
    }
    let residual = store_epilogue::residual_operand(&node.epilogue, &plan.steps);
    let output_slot = node.inputs.len();
    // Units: (image, output row, panel), so two threads share even 13-row maps evenly.
    // When the weights outweigh the input, the panel is the outer coordinate: a panel's
    // weights then stay in cache over every row, not only one row's tiles.
    let panel_count = plan.full_panels() + usize::from(plan.has_half_panel());
    let panels_outer = plan.panels_outer();
    let units = plan.batch * plan.out_h * panel_count;
    let macs_per_unit = plan.out_w * 2 * BLOCK * plan.in_channels * plan.kernel[0] * plan.kernel[1];
    let max_tasks = (units * macs_per_unit / MIN_TASK_MACS).clamp(1, units.max(1));

    let task_name = format!("cnnc_k{node_index}_conv_direct8_task");
    let task_sig = parallel::task_signature(module);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, module, params| {
        let (task_ctx, index) = (params[0], params[1]);
        // Like the GEMM tasks: denormal activations must not slow the FMA chains down.
        let saved_fp = float_env.map(|f| f.emit_enter(module, b));
        let flags = MemFlagsData::trusted().with_readonly().with_can_move();
        let parallel::TaskShare { bufs, first, end } = parallel::emit_task_share(b, task_ctx, index, units);
        let x = b.ins().load(I64, flags, bufs, 0);
        let y = b.ins().load(I64, flags, bufs, (8 * output_slot) as i32);
        let r = match residual {
            Some(i) => b.ins().load(I64, flags, bufs, (8 * i) as i32),
            None => b.ins().iconst(I64, 0),
        };
        let gv = module.declare_data_in_func(packed, b.func);
        let panels = b.ins().symbol_value(I64, gv);
        let gv = module.declare_data_in_func(table, b.func);
        let rows_table = b.ins().symbol_value(I64, gv);
        let gv = module.declare_data_in_func(bias_data, b.func);
        let bias = b.ins().symbol_value(I64, gv);
        let refs: BTreeMap<(usize, Vec<Vec<usize>>, usize), FuncRef> =
            codes.iter().map(|(key, &id)| (key.clone(), module.declare_func_in_func(id, b.func))).collect();
        let sig = b.import_signature(machine_code_signature());
        super::gemm::for_range(b, first, end, |b, unit| {
            let (image, oy, panel) = if panels_outer {
                let coords = super::gemm::unflatten(b, unit, &[panel_count, plan.batch, plan.out_h]);
                (coords[1], coords[2], coords[0])
            } else {
                let coords = super::gemm::unflatten(b, unit, &[plan.batch, plan.out_h, panel_count]);
                (coords[0], coords[1], coords[2])
            };
            let entry = super::gemm::scaled(b, rows_table, oy, 32);
            let a_offset = b.ins().load(I64, flags, entry, 0);
            let b_offsets = [b.ins().load(I64, flags, entry, 8), b.ins().load(I64, flags, entry, 16)];
            let kernel_rows = b.ins().load(I64, flags, entry, 24);
            let in_image = (plan.in_channels * plan.in_h * plan.in_w * 4) as i64;
            let out_image = (plan.out_channels * plan.out_h * plan.out_w * 4) as i64;
            let a_row = super::gemm::scaled(b, x, image, in_image);
            let a_row = b.ins().iadd(a_row, a_offset);
            let out_offset = b.ins().imul_imm_s(image, out_image);
            let out_offset = super::gemm::scaled(b, out_offset, oy, (plan.out_w * BLOCK * 4) as i64);
            let c_row = b.ins().iadd(y, out_offset);
            let r_row = b.ins().iadd(r, out_offset);
            let row = Row { a: a_row, c: c_row, residual: r_row, kernel_rows, b_offsets, panels, bias, sig };
            for piece in &plan.pieces {
                let (rows, columns) = shape_of(piece);
                let code = |blocks: usize| refs.get(&(rows, columns.clone(), blocks)).copied();
                let code = [code(2), code(1)];
                if piece.tiles == 1 {
                    let at = b.ins().iconst(I64, piece.x as i64);
                    row.call_panel(b, plan, code, at, panel);
                } else {
                    crate::loops::for_count(b, piece.tiles, |b, t| {
                        let at = b.ins().imul_imm_s(t, piece.positions as i64);
                        let at = b.ins().iadd_imm_s(at, piece.x as i64);
                        row.call_panel(b, plan, code, at, panel);
                    });
                }
            }
        });
        if let (Some(f), Some(saved)) = (float_env, saved_fp) {
            f.emit_restore(module, b, saved);
        }
        Ok(())
    })?;

    let rest_after = plan.rest.clone();
    let name = format!("cnnc_k{node_index}_conv_direct8");
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_up_to(module, b, host, bufs, task, max_tasks);
        super::elementwise::emit_epilogue_steps_from_buffers(b, g, node, &rest_after, bufs)?;
        Ok(())
    })
}

/// One output row of one image: where its calls read and write.
struct Row {
    /// Input block 0 at the row's first kernel row inside the image, column 0.
    a: Value,
    c: Value,
    residual: Value,
    kernel_rows: Value,
    /// Weight offsets of the first kernel row in 16- and 8-wide panels.
    b_offsets: [Value; 2],
    panels: Value,
    bias: Value,
    sig: cranelift_codegen::ir::SigRef,
}

impl Row {
    /// Panel `panel` of output channels (16 channels; the last 8 when the channels are an
    /// odd number of blocks) over the tile starting at output column `x`.
    fn call_panel(&self, b: &mut FunctionBuilder, plan: &DirectPlan, code: [Option<FuncRef>; 2], x: Value, panel: Value) {
        let a = super::gemm::scaled(b, self.a, x, (plan.strides[1] * plan.in_position_bytes()) as i64);
        let a = b.ins().iadd_imm_s(a, -((plan.pads_begin[1] * plan.in_position_bytes()) as i64));
        let c = super::gemm::scaled(b, self.c, x, (BLOCK * 4) as i64);
        let residual = super::gemm::scaled(b, self.residual, x, (BLOCK * 4) as i64);
        let pair_bytes = (2 * plan.out_plane_bytes()) as i64;
        let cj = super::gemm::scaled(b, c, panel, pair_bytes);
        let rj = super::gemm::scaled(b, residual, panel, pair_bytes);
        let bias = super::gemm::scaled(b, self.bias, panel, (2 * BLOCK * 4) as i64);
        // Panel j < full panels starts at j 16-wide panels; the 8-wide one after them all.
        let full_weights = super::gemm::scaled(b, self.panels, panel, plan.panel_bytes(2) as i64);
        let full_weights = b.ins().iadd(full_weights, self.b_offsets[0]);
        let (code, weights) = match code {
            [Some(full), None] => (b.ins().func_addr(I64, full), full_weights),
            [None, Some(half)] => {
                let w = b.ins().iadd(self.panels, self.b_offsets[1]);
                (b.ins().func_addr(I64, half), w)
            }
            [Some(full), Some(half)] => {
                let half_weights = b.ins().iadd_imm_s(self.panels, (plan.full_panels() * plan.panel_bytes(2)) as i64);
                let half_weights = b.ins().iadd(half_weights, self.b_offsets[1]);
                let is_half = b.ins().icmp_imm_u(IntCC::Equal, panel, plan.full_panels() as i64);
                let (full, half) = (b.ins().func_addr(I64, full), b.ins().func_addr(I64, half));
                (b.ins().select(is_half, half, full), b.ins().select(is_half, half_weights, full_weights))
            }
            [None, None] => return,
        };
        b.ins().call_indirect(self.sig, code, &[a, weights, cj, rj, self.kernel_rows, bias]);
    }
}
