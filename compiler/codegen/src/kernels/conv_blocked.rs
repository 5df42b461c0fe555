//! 1x1 convolution from a blocked (NCHWc8) input to a blocked output: a GEMM with the
//! output positions as rows and output channels as columns, two channel blocks (16
//! channels) per tile, on AVX2+FMA machine code (`microkernel::pointwise_blocked_x86`).
//!
//! Input position p, channel k is at `(k/8)·H·W·8 + p·8 + k%8`, so a tile's A values
//! are broadcast straight from the input (no packing); the weights are packed at
//! compile time into one panel per 16 output channels (8 for a last odd block),
//! `[K][16]` then the bias. Stride 1 runs over the flattened positions; other strides
//! run over output rows (a tile's positions then sit `stride·32` bytes apart in the
//! input). A row is cut into tiles of balanced sizes, at most six (49 positions: 4 x 6
//! and 5 x 5), each size its own machine-code function. When the panels run outside
//! the tiles (more output channels than positions) and a panel holds more than 16 KB
//! of weights, the reduction runs in slices that accumulate in the output, so a slice
//! stays in L1 while the input streams past it.
//!
//! The epilogue's leading bias/ReLU/clip/residual-add steps are applied in registers
//! before the store; the steps from the first other one on run per tile through the
//! AVX2 activation functions (`microkernel::activation`: SiLU, sigmoid...) while the
//! tile is in cache, over all its channel blocks in one call (rows = blocks, row
//! stride = a block plane); anything else (a per-channel multiply...) runs afterwards
//! as one in-place pass over the blocked output (`elementwise::emit_epilogue`). Tasks
//! over position tiles go through the host's `parallel_for`.

use cnnc_ir::{ConstValue, DType, EpilogueStep, Graph, Layout, Node, Op, Scalar, TensorData};
use cranelift_codegen::Context;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};

use super::parallel::FloatEnv;
use super::{CodegenError, parallel};
use crate::microkernel::pointwise_blocked_x86::{self as machine, BLOCK, MAX_ROWS, PointwiseSpec};
use crate::microkernel::activation::{self, ActivationSpec};
use crate::microkernel::store_epilogue::{self, StoreStep};
use crate::module::{define_bytes, define_local};
use crate::target::TargetSpec;

/// Multiply-adds below which a task is not worth its dispatch (~1 µs).
const MIN_TASK_MACS: usize = 1 << 16;

/// How one blocked 1x1 convolution runs.
#[derive(Clone, Debug, PartialEq)]
pub struct PointwisePlan {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    in_positions: usize,
    out_positions: usize,
    /// Rows of positions the tiles run along (1 for stride 1: all positions are one
    /// row) and positions per row.
    rows: usize,
    row_len: usize,
    /// Input bytes from one row's first position to the next row's.
    in_row_step: usize,
    /// Input bytes between a row's consecutive positions.
    in_position_step: usize,
    /// Input blocks per slice of the reduction (all of them unless a panel's weights
    /// would not stay in L1 while the tiles stream past).
    slice_blocks: usize,
    bias: Option<Vec<f32>>,
    steps: Vec<StoreStep>,
    /// Epilogue steps left for a pass over the output (from the first one the machine
    /// code does not apply).
    rest: Vec<EpilogueStep>,
}

/// One slice of the reduction: input blocks `first..first + blocks`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slice {
    first: usize,
    blocks: usize,
    accumulate: bool,
    finish: bool,
}

/// Bytes of a panel's weights a slice of the reduction reads at most: with a tile's
/// streamed input (up to 6 positions x the slice's channels), well inside the 32-48 KB
/// L1 (a whole 512 x 16 panel, 32 KB, was evicted by the input it met: SqueezeNet's
/// 512 -> 1000 classifier ran at ~85% of the FMA peak).
const SLICE_WEIGHT_BYTES: usize = 16 << 10;
/// Inputs from this size on are prefetched ahead of the tiles (beyond a 1 MB L2 with
/// the output and weights beside them).
const PREFETCH_INPUT_BYTES: usize = 512 << 10;
/// Tiles the prefetches run ahead (measured on SqueezeNet's squeezes: 1 no gain, 2
/// ~10% fewer samples, 4 ~5%).
const PREFETCH_TILES: usize = 2;

impl PointwisePlan {
    /// Tiles per row: balanced sizes of at most MAX_ROWS (169 positions: 24 x 6 and
    /// 5 x 5, not 28 x 6 and a single position at a sixth of the speed).
    fn tiles_per_row(&self) -> usize {
        self.row_len.div_ceil(MAX_ROWS)
    }
    /// Positions of the row's first tiles (the long ones) and how many they are.
    fn long_tile(&self) -> (usize, usize) {
        let tiles = self.tiles_per_row();
        let rows = self.row_len.div_ceil(tiles);
        let count = if self.row_len % tiles == 0 { tiles } else { self.row_len % tiles };
        (rows, count)
    }
    /// Positions of the row's other tiles (0: all tiles are long).
    fn short_rows(&self) -> usize {
        if self.row_len % self.tiles_per_row() == 0 { 0 } else { self.row_len / self.tiles_per_row() }
    }
    /// Panels outside the tiles when the weights outweigh the input (MobileNet's and
    /// EfficientNet's late 1x1 convolutions: 49 positions, up to 1152 x 192 weights).
    fn panels_outer(&self) -> bool {
        self.out_channels > self.out_positions
    }
    /// The input bytes the prefetches run ahead of a tile of `rows` positions: two
    /// tiles, when the tiles are the outer loop and the input outgrows L2 (SqueezeNet's
    /// 55x55 squeezes: 8-16 planes of 97 KB, each a stream).
    fn prefetch_ahead(&self, rows: usize) -> i32 {
        let input_bytes = self.in_channels * self.in_positions * 4;
        if self.panels_outer() || input_bytes < PREFETCH_INPUT_BYTES {
            return 0;
        }
        (PREFETCH_TILES * rows * self.in_position_step) as i32
    }
    fn k_blocks(&self) -> usize {
        self.in_channels / BLOCK
    }
    /// The reduction's slices, in order.
    fn slices(&self) -> Vec<Slice> {
        let total = self.k_blocks();
        let count = total.div_ceil(self.slice_blocks);
        let per = total.div_ceil(count);
        (0..count)
            .map(|i| Slice { first: i * per, blocks: per.min(total - i * per), accumulate: i > 0, finish: i + 1 == count })
            .collect()
    }
    fn tiles(&self) -> usize {
        self.batch * self.rows * self.tiles_per_row()
    }
    fn full_panels(&self) -> usize {
        self.out_channels / (2 * BLOCK)
    }
    fn has_half_panel(&self) -> bool {
        self.out_channels % (2 * BLOCK) != 0
    }
    /// Floats of a packed panel of `blocks` output blocks.
    fn panel_floats(&self, blocks: usize) -> usize {
        let width = blocks * BLOCK;
        self.in_channels * width + if self.bias.is_some() { width } else { 0 }
    }

    fn spec(&self, rows: usize, blocks: usize, slice: Slice) -> PointwiseSpec {
        PointwiseSpec {
            rows,
            blocks,
            k_blocks: slice.blocks,
            a_row_bytes: self.in_position_step as i32,
            a_block_bytes: (self.in_positions * BLOCK * 4) as i32,
            c_block_bytes: (self.out_positions * BLOCK * 4) as i32,
            bias: self.bias.is_some(),
            steps: self.steps.clone(),
            accumulate: slice.accumulate,
            finish: slice.finish,
            prefetch_ahead: self.prefetch_ahead(rows),
        }
    }

    /// Weights [M, K, 1, 1] as panels: for each panel, `[K][width]` then the bias.
    fn pack(&self, weights: &[f32]) -> Vec<u8> {
        let (k, m) = (self.in_channels, self.out_channels);
        let mut out = Vec::with_capacity(m * (k + 1) * 4);
        let mut m0 = 0;
        while m0 < m {
            let width = (m - m0).min(2 * BLOCK);
            for kk in 0..k {
                for j in 0..width {
                    out.extend_from_slice(&weights[(m0 + j) * k + kk].to_le_bytes());
                }
            }
            if let Some(bias) = &self.bias {
                for j in 0..width {
                    out.extend_from_slice(&bias[m0 + j].to_le_bytes());
                }
            }
            m0 += width;
        }
        out
    }
}

fn blocked8() -> Layout {
    Layout::Blocked { block: BLOCK as u32 }
}

pub(crate) fn constant_input(g: &Graph, node: &Node, i: usize) -> Option<Vec<f32>> {
    let v = *node.inputs.get(i)?;
    let n = g.ty(v).numel();
    let producer = g.nodes.iter().find(|m| m.outputs.contains(&v))?;
    let Op::Constant(c) = producer.op else { return None };
    match &g.constants.get(c.index())?.value {
        ConstValue::Dense(TensorData::F32(values)) if values.len() == n => Some(values.clone()),
        ConstValue::Splat(Scalar::F32(x)) => Some(vec![*x; n]),
        _ => None,
    }
}

/// Whether the target runs the machine code (x86-64 with AVX2 and FMA).
pub fn runs_on(target: &TargetSpec) -> bool {
    crate::microkernel::activation::available(target)
}

/// Whether this kernel runs `node` once its layouts are Blocked{8} (shapes, constant
/// weights and bias, geometry), whatever its schedule says now: what the layout pass
/// asks before putting a convolution into a blocked region.
pub fn supports_node(g: &Graph, node: &Node) -> bool {
    analyse(g, node).is_ok() || super::conv_direct_blocked::supports_node(g, node)
}

/// Whether `node` would run as a blocked 1x1 convolution (not the direct KxK kernel).
pub fn is_pointwise(g: &Graph, node: &Node) -> bool {
    analyse(g, node).is_ok()
}

/// A blocked convolution: 1x1 here, KxK (or padded) through `conv_direct_blocked`.
#[derive(Clone, Debug, PartialEq)]
pub enum BlockedConvPlan {
    Pointwise(PointwisePlan),
    Direct(super::conv_direct_blocked::DirectPlan),
    /// A blocked max pool (`pool_blocked::define_max_pool`): a machine-code kernel
    /// without weights, defined through the same module hook as the convolutions.
    MaxPool(super::pool_blocked::MaxPoolPlan),
}

/// [`supports_node`] on a target that runs the machine code.
pub fn supports(g: &Graph, node: &Node, target: &TargetSpec) -> bool {
    runs_on(target) && supports_node(g, node)
}

/// The plan when `node` is a convolution with a blocked schedule that is not depthwise
/// (None: someone else's node); an error when it is one this kernel cannot run.
pub fn plan(g: &Graph, node: &Node, target: &TargetSpec) -> Result<Option<BlockedConvPlan>, CodegenError> {
    if let Op::Pool(_) = node.op {
        return Ok(super::pool_blocked::max_pool_plan(g, node, target).map(BlockedConvPlan::MaxPool));
    }
    let Op::Conv(geometry) = &node.op else { return Ok(None) };
    let s = &node.schedule;
    if s.layout_in == Layout::Plain && s.layout_out == Layout::Plain {
        return Ok(None);
    }
    let channels = node.inputs.first().map_or(0, |&x| g.ty(x).shape.get(1).copied().unwrap_or(0));
    if geometry.groups != 1 && geometry.groups == channels {
        return Ok(None); // depthwise: `depthwise_blocked`
    }
    if !runs_on(target) {
        return Err(CodegenError(format!(
            "blocked convolution '{}': the blocked 1x1 kernel needs x86-64 with AVX2 and FMA (the layout pass keeps other targets plain)",
            node.name
        )));
    }
    if s.layout_in == Layout::Plain && s.layout_out == blocked8() {
        // A stem: plain input of few channels, blocked output.
        return super::conv_direct_blocked::analyse(g, node, true)
            .map(|plan| Some(BlockedConvPlan::Direct(plan)))
            .map_err(|why| CodegenError(format!("blocked convolution '{}' from a plain input: {why}", node.name)));
    }
    if s.layout_in != blocked8() || s.layout_out != blocked8() {
        return Err(CodegenError(format!(
            "blocked convolution '{}': layouts {:?} -> {:?}; the kernel runs Blocked{{8}} -> Blocked{{8}}",
            node.name, s.layout_in, s.layout_out
        )));
    }
    match analyse(g, node) {
        Ok(plan) => Ok(Some(BlockedConvPlan::Pointwise(plan))),
        Err(pointwise_why) => match super::conv_direct_blocked::analyse(g, node, false) {
            Ok(plan) => Ok(Some(BlockedConvPlan::Direct(plan))),
            Err(direct_why) => Err(CodegenError(format!(
                "blocked convolution '{}': not a 1x1 one ({pointwise_why}) nor a direct one ({direct_why})",
                node.name
            ))),
        },
    }
}

fn analyse(g: &Graph, node: &Node) -> Result<PointwisePlan, String> {
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
    if geometry.groups != 1 || wt.shape[2..] != [1, 1] {
        return Err(format!("only ungrouped 1x1 convolutions (groups {}, kernel {:?})", geometry.groups, &wt.shape[2..]));
    }
    if k % BLOCK != 0 || m % BLOCK != 0 || k == 0 || m == 0 {
        return Err(format!("channels {k} -> {m} must be multiples of {BLOCK}"));
    }
    if geometry.pads_begin.iter().chain(&geometry.pads_end).any(|&p| p != 0) {
        return Err("padded 1x1 convolutions are not supported".into());
    }
    let weights = constant_input(g, node, 1).ok_or("the weights must be a constant")?;
    let bias = if op_inputs > 2 { Some(constant_input(g, node, 2).ok_or("the bias must be a constant")?) } else { None };
    let (h, w_in) = (xt.shape[2], xt.shape[3]);
    let (oh, ow) = (yt.shape[2], yt.shape[3]);
    let (sh, sw) = (geometry.strides[0], geometry.strides[1]);
    let flat = sh == 1 && sw == 1;
    let (rows, row_len) = if flat { (1, oh * ow) } else { (oh, ow) };
    if row_len == 0 || xt.shape[0] == 0 {
        return Err("empty output".into());
    }
    let in_position_step = if flat { BLOCK * 4 } else { sw * BLOCK * 4 };
    let in_row_step = sh * w_in * BLOCK * 4;
    if h * w_in * BLOCK * 4 > i32::MAX as usize / 2 || oh * ow * BLOCK * 4 * 2 > i32::MAX as usize {
        return Err("planes too large for 32-bit displacements".into());
    }
    let _ = weights;
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
        if !PointwiseSpec::takes_steps(&candidate) {
            break;
        }
        steps = candidate;
        taken += 1;
    }
    let mut plan = PointwisePlan {
        batch: xt.shape[0],
        in_channels: k,
        out_channels: m,
        in_positions: h * w_in,
        out_positions: oh * ow,
        rows,
        row_len,
        in_row_step,
        in_position_step,
        slice_blocks: k / BLOCK,
        bias,
        steps,
        rest: node.epilogue[taken..].to_vec(),
    };
    // Slices store partial sums in the output: not when a residual operand may share
    // its buffer (the last slice reads it).
    if plan.panels_outer() && !plan.steps.contains(&StoreStep::AddResidual) {
        plan.slice_blocks = (SLICE_WEIGHT_BYTES / (2 * BLOCK * BLOCK * 4)).max(1);
    }
    Ok(plan)
}

/// `(a, b, c, residual)`, all i64, SystemV.
fn machine_code_signature() -> Signature {
    crate::microkernel::registry::sysv_i64_signature(4)
}

/// Whether `node`'s weights are read only through this kernel's packed copy.
pub fn packs_weights(g: &Graph, node: &Node, target: &TargetSpec) -> bool {
    matches!(plan(g, node, target), Ok(Some(BlockedConvPlan::Pointwise(_) | BlockedConvPlan::Direct(_))))
}

/// Defines the node's machine code (one function per panel width), packed weights,
/// task and kernel; returns the kernel (module node-kernel signature).
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &BlockedConvPlan,
    float_env: Option<FloatEnv>,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    match plan {
        BlockedConvPlan::Pointwise(plan) => {
            define_pointwise(module, g, node, node_index, plan, float_env, kernel_sig, ctx, fb_ctx)
        }
        BlockedConvPlan::Direct(plan) => {
            super::conv_direct_blocked::define_node(module, g, node, node_index, plan, float_env, kernel_sig, ctx, fb_ctx)
        }
        BlockedConvPlan::MaxPool(plan) => super::pool_blocked::define_max_pool(module, node, node_index, plan, kernel_sig, ctx, fb_ctx),
    }
}

#[allow(clippy::too_many_arguments)]
fn define_pointwise<M: Module>(
    module: &mut M,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &PointwisePlan,
    float_env: Option<FloatEnv>,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let what = format!("blocked 1x1 convolution '{}'", node.name);
    let weights = constant_input(g, node, 1).ok_or_else(|| CodegenError(format!("{what}: the weights are not a constant")))?;
    let packed = define_bytes(module, &format!("cnnc_w{node_index}_pw8"), plan.pack(&weights))?;
    // Per slice of the reduction: [long tiles, short tiles] x [two blocks, one block].
    let slices = plan.slices();
    let mut code_ids = vec![[[None; 2]; 2]; slices.len()];
    for (s, slice) in slices.iter().enumerate() {
        for (r, rows) in [plan.long_tile().0, plan.short_rows()].into_iter().enumerate() {
            for (v, blocks) in [2, 1].into_iter().enumerate() {
                let needed = rows > 0 && if blocks == 2 { plan.full_panels() > 0 } else { plan.has_half_panel() };
                if !needed {
                    continue;
                }
                let code = machine::assemble(&plan.spec(rows, blocks, *slice))?;
                let name = match slices.len() {
                    1 => format!("cnnc_k{node_index}_pw8_{rows}x{blocks}"),
                    _ => format!("cnnc_k{node_index}_pw8_{rows}x{blocks}_s{s}"),
                };
                let id = module
                    .declare_function(&name, Linkage::Local, &machine_code_signature())
                    .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
                module
                    .define_function_bytes(id, crate::microkernel::x86::CODE_ALIGN, &code, &[])
                    .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
                code_ids[s][r][v] = Some(id);
            }
        }
    }
    // The rest of the epilogue per tile when the activation functions take it.
    let tile_activation = match activation::unary_steps(&plan.rest).and_then(|steps| ActivationSpec::new(false, &steps)) {
        Some(spec) => Some(activation::define(module, &spec)?),
        None => None,
    };
    let rest_after = if tile_activation.is_some() { Vec::new() } else { plan.rest.clone() };
    let residual = store_epilogue::residual_operand(&node.epilogue, &plan.steps);
    let output_slot = node.inputs.len();
    let tiles = plan.tiles();
    let macs_per_tile = plan.long_tile().0 * plan.in_channels * plan.out_channels;
    let max_tasks = (tiles * macs_per_tile / MIN_TASK_MACS).clamp(1, tiles.max(1));

    let task_name = format!("cnnc_k{node_index}_conv_pw8_task");
    let task_sig = parallel::task_signature(module);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, module, params| {
        let (task_ctx, index) = (params[0], params[1]);
        // Like the GEMM tasks: denormal activations must not slow the FMA chains down.
        let saved_fp = float_env.map(|f| f.emit_enter(module, b));
        let flags = MemFlagsData::trusted().with_readonly().with_can_move();
        let parallel::TaskShare { bufs, first, end } = parallel::emit_task_share(b, task_ctx, index, tiles);
        let x = b.ins().load(I64, flags, bufs, 0);
        let y = b.ins().load(I64, flags, bufs, (8 * output_slot) as i32);
        let r = match residual {
            Some(i) => b.ins().load(I64, flags, bufs, (8 * i) as i32),
            None => b.ins().iconst(I64, 0),
        };
        let gv = module.declare_data_in_func(packed, b.func);
        let panels = b.ins().symbol_value(I64, gv);
        let refs: Vec<[[Option<FuncRef>; 2]; 2]> = code_ids
            .iter()
            .map(|slice| slice.map(|row| row.map(|id| id.map(|id| module.declare_func_in_func(id, b.func)))))
            .collect();
        let act = tile_activation.map(|id| module.declare_func_in_func(id, b.func));
        let bases = [x, panels, y, r];
        if plan.panels_outer() {
            // Weights larger than the input: each panel (slice) stays in cache while
            // every tile of the task streams past it.
            crate::loops::for_count(b, plan.full_panels(), |b, j| {
                for (slice, refs) in slices.iter().zip(&refs) {
                    super::gemm::for_range(b, first, end, |b, t| {
                        let tile = Tile::at(b, plan, t, bases);
                        tile.call_panel(b, plan, refs, *slice, 0, j, bases[1]);
                    });
                }
            });
            if plan.has_half_panel() {
                for (slice, refs) in slices.iter().zip(&refs) {
                    super::gemm::for_range(b, first, end, |b, t| {
                        let tile = Tile::at(b, plan, t, bases);
                        let j = b.ins().iconst(I64, plan.full_panels() as i64);
                        tile.call_panel(b, plan, refs, *slice, 1, j, bases[1]);
                    });
                }
            }
            if let Some(act) = act {
                super::gemm::for_range(b, first, end, |b, t| {
                    let tile = Tile::at(b, plan, t, bases);
                    tile.activate(b, plan, act);
                });
            }
        } else {
            // The tile's input stays in cache while every panel passes (one slice:
            // tiles are small).
            let (slice, refs) = (slices[0], &refs[0]);
            super::gemm::for_range(b, first, end, |b, t| {
                let tile = Tile::at(b, plan, t, bases);
                crate::loops::for_count(b, plan.full_panels(), |b, j| tile.call_panel(b, plan, refs, slice, 0, j, bases[1]));
                if plan.has_half_panel() {
                    let j = b.ins().iconst(I64, plan.full_panels() as i64);
                    tile.call_panel(b, plan, refs, slice, 1, j, bases[1]);
                }
                if let Some(act) = act {
                    tile.activate(b, plan, act);
                }
            });
        }
        if let (Some(f), Some(saved)) = (float_env, saved_fp) {
            f.emit_restore(module, b, saved);
        }
        Ok(())
    })?;

    let name = format!("cnnc_k{node_index}_conv_pw8");
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_up_to(module, b, host, bufs, task, max_tasks);
        super::elementwise::emit_epilogue_steps_from_buffers(b, g, node, &rest_after, bufs)?;
        Ok(())
    })
}

/// Where tile `t` (flat over images, rows, tiles of a row) reads and writes.
struct Tile {
    tile: Value,
    a: Value,
    c: Value,
    residual: Value,
}

impl Tile {
    fn at(b: &mut FunctionBuilder, plan: &PointwisePlan, t: Value, [x, _, y, r]: [Value; 4]) -> Tile {
        let coords = super::gemm::unflatten(b, t, &[plan.batch, plan.rows, plan.tiles_per_row()]);
        let (image, row, tile) = (coords[0], coords[1], coords[2]);
        // The long tiles first: tile t starts at t·short + min(t, long tiles).
        let tiles = plan.tiles_per_row();
        let start = b.ins().imul_imm_s(tile, (plan.row_len / tiles) as i64);
        let start = match plan.row_len % tiles {
            0 => start,
            long => {
                let long = b.ins().iconst(I64, long as i64);
                let before = b.ins().umin(tile, long);
                b.ins().iadd(start, before)
            }
        };
        let in_image = (plan.in_channels * plan.in_positions * 4) as i64;
        let out_image = (plan.out_channels * plan.out_positions * 4) as i64;
        let a = super::gemm::scaled(b, x, image, in_image);
        let a = super::gemm::scaled(b, a, row, plan.in_row_step as i64);
        let a = super::gemm::scaled(b, a, start, plan.in_position_step as i64);
        // Output position (row · row_len + start), 32 bytes each in a block.
        let position = b.ins().imul_imm_s(row, plan.row_len as i64);
        let position = b.ins().iadd(position, start);
        let c_offset = b.ins().imul_imm_s(position, (BLOCK * 4) as i64);
        let image_offset = b.ins().imul_imm_s(image, out_image);
        let c_offset = b.ins().iadd(c_offset, image_offset);
        let c = b.ins().iadd(y, c_offset);
        let residual = b.ins().iadd(r, c_offset);
        Tile { tile, a, c, residual }
    }

    /// Whether this is one of a row's short tiles (an i8 condition), if rows have them.
    fn is_short(&self, b: &mut FunctionBuilder, plan: &PointwisePlan) -> Option<Value> {
        (plan.short_rows() > 0).then(|| b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, self.tile, plan.long_tile().1 as i64))
    }

    /// Panel `j` of output channels (`width` 0: two blocks, 1: one block) over the tile,
    /// one slice of the reduction (`refs`: its functions).
    #[allow(clippy::too_many_arguments)]
    fn call_panel(
        &self,
        b: &mut FunctionBuilder,
        plan: &PointwisePlan,
        refs: &[[Option<FuncRef>; 2]; 2],
        slice: Slice,
        width: usize,
        j: Value,
        panels: Value,
    ) {
        let Some(long) = refs[0][width] else { return };
        let long = b.ins().func_addr(I64, long);
        let code = match (refs[1][width], self.is_short(b, plan)) {
            (Some(short), Some(is_short)) => {
                let short = b.ins().func_addr(I64, short);
                b.ins().select(is_short, short, long)
            }
            _ => long,
        };
        let panel_bytes = (plan.panel_floats(2) * 4) as i64;
        let block_bytes = (plan.out_positions * BLOCK * 4) as i64;
        let bp = super::gemm::scaled(b, panels, j, panel_bytes);
        // The slice's first weights in a panel of 2 (or 1) blocks.
        let bp = b.ins().iadd_imm_s(bp, (slice.first * BLOCK * (2 - width) * BLOCK * 4) as i64);
        let a = b.ins().iadd_imm_s(self.a, (slice.first * plan.in_positions * BLOCK * 4) as i64);
        let cp = super::gemm::scaled(b, self.c, j, 2 * block_bytes);
        let rp = super::gemm::scaled(b, self.residual, j, 2 * block_bytes);
        let sig = b.import_signature(machine_code_signature());
        b.ins().call_indirect(sig, code, &[a, bp, cp, rp]);
    }

    /// The activation function over the tile: rows = channel blocks (a plane apart),
    /// cols = the tile's positions x 8 lanes.
    fn activate(&self, b: &mut FunctionBuilder, plan: &PointwisePlan, act: FuncRef) {
        let long = b.ins().iconst(I64, (plan.long_tile().0 * BLOCK) as i64);
        let cols = match self.is_short(b, plan) {
            Some(is_short) => {
                let short = b.ins().iconst(I64, (plan.short_rows() * BLOCK) as i64);
                b.ins().select(is_short, short, long)
            }
            None => long,
        };
        let blocks = b.ins().iconst(I64, (plan.out_channels / BLOCK) as i64);
        let stride = b.ins().iconst(I64, (plan.out_positions * BLOCK * 4) as i64);
        let no_bias = b.ins().iconst(I64, 0);
        b.ins().call(act, &[self.c, blocks, cols, stride, no_bias]);
    }
}
