//! Convolution as matrix product on the GEMM microkernel (`crate::microkernel`).
//!
//! Per image and group, `out[oc][p] = Σ_kk W[oc][kk] · col[kk][p]` with `kk` running
//! over (tap, input channel) -- tap-major, so one tap's rows of `col` are consecutive
//! input channels -- and `p` over output positions.
//!
//! - Weights: re-laid out into panels of output channels (zero-padded to the panel
//!   width), one panel row per `kk`: `[group][panel][kk][width]`. Constant weights are
//!   packed at compile time into read-only data; weights known only at run time (graph
//!   inputs, other nodes' outputs: training graphs, whose weight-gradient convolutions
//!   take activations as weights) are packed by the node kernel into its scratch
//!   before the tasks run (`pack::emit_pack_weights`; Winograd's transform by
//!   `winograd::emit_pack_weights`).
//! - 1x1 convolutions without stride or padding read their input as the K x N matrix
//!   it is: blocks are packed channel row by channel row (`pack::emit_pack_block`).
//! - `col`: packed at run time (`gemm::pack`) per block of `nc` positions and `kc`
//!   reduction indices into a slot of the node's scratch, in panels of positions.
//! - Orientation: normally output channels are the rows of the microkernel's tile
//!   (`mr` channels x `nr` positions, `gemm::channel_rows`: tiles written in place, the
//!   epilogue applied per tile while it is in L1). With few positions (7x7, 14x14
//!   maps) whole 16-wide position panels waste a large share of the work, so the roles
//!   swap (`gemm::position_rows`: `mr` positions x `nr` channels, tiles accumulated in
//!   the slot and stored transposed). A cost model (`orientation_cost`: padded
//!   multiply-adds plus the transposed store) picks one.
//! - 3x3 stride-1 convolutions run as Winograd F(2x2, 3x3) (`gemm::winograd`: 16
//!   products with 2.25x fewer multiply-adds) when that is estimated cheaper, or when
//!   the schedule asks for kernel "winograd".
//! - The epilogue (bias, fused steps) is applied per tile (`gemm::tile`), or, on AVX2
//!   with channels as rows, by the microkernel on its accumulators before the store of
//!   a full tile of the last k-block when it is a bias, ReLU / clip / leaky ReLU and a
//!   residual add (`microkernel::store_epilogue`: no second pass over the tile); an operand
//!   broadcast in a way a tile cannot address is applied over the whole output after
//!   the convolution instead.
//! - Tasks: one per (image, group, p-block, oc-panel group). The number of oc-panel
//!   groups is picked at run time from a per-thread-count table made at compile time
//!   (`parallel::choose_parts`): 1 without threads (no repacking of B), else as many as
//!   balance the threads without packing the same input too often, limited so a task
//!   keeps ~1 M multiply-adds.
//!
//! Convolutions this driver does not take (depthwise and thin grouped ones, other
//! dtypes) stay on the direct kernel (`conv.rs`).

use cnnc_ir::{ConstValue, DType, EpilogueStep, Graph, Layout, Node, Op, Scalar, TensorData, ValueId};
use cranelift_codegen::Context;
use cranelift_codegen::ir::AbiParam;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, Value};
use cranelift_codegen::isa::CallConv;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataId, FuncId, FuncOrDataId, Linkage, Module};

use crate::module::define_local;

use super::gemm::pack::{self, PackShape};
use super::gemm::tile::{TileEpilogue, TileOperand, TileStep};
use super::gemm::weight_grad_rows::{self, WeightGradRows};
use super::gemm::winograd::{self, WinogradShape};
use super::gemm::{channel_rows, int, position_rows, scaled};
use super::parallel::{self, FloatEnv, MAX_SLOTS, SLOT_FLAGS_BYTES};
use super::{CodegenError, KernelCtx};
use crate::microkernel::GemmKernel;
use crate::microkernel::store_epilogue::{StoreEpilogue, binary_store_step, unary_store_steps};

const F32_BYTES: i64 = 4;

/// Multiply-adds below which a task is not split further (~20 µs at ~50 G MAC/s).
const MIN_TASK_MACS: usize = 1 << 20;

/// Scratch bytes one node's slots may take together (Winograd slots run to ~1 MB).
const SCRATCH_BUDGET: usize = 8 << 20;

/// Multiply-adds per output position (out channels x depth) from which a 1x1 convolution
/// packs its input instead of reading B in place. Packing costs about one copy per input
/// element, which the in-place kernel saves; but every channel panel then reads B
/// strided, one row per k step, and from a few hundred channels or a deep reduction
/// that costs more than the copy. Measured (`scripts/conv_layers.py`, 1 thread, one
/// layer, in place vs packed in the same run): 16 -> 64 and 128 -> 16 at 55x55 30-40%
/// faster in place, 32 -> 128 at 27x27 7%, 64 -> 256 at 13x13 1-10%, 384 -> 64 at 13x13
/// and 14x14 6-8%, 384 -> 96 at 14x14 5%; 576 -> 96 at 14x14 even; 96 -> 576 at 28x28 4%
/// faster packed, 512 -> 64 at 13x13 5-10% (below the threshold all the same),
/// 512 -> 1000 at 13x13 (SqueezeNet's classifier) 11-13%, at 16x16 6%.
const IN_PLACE_B_MAX_MACS_PER_POSITION: usize = 48 * 1024;

/// Cache sizes assumed when no schedule chose `kc`/`nc` (see the choose-schedule pass).
const DEFAULT_L1D_BYTES: usize = 32 * 1024;
const DEFAULT_L2_BYTES: usize = 512 * 1024;

/// The spatial geometry the packing sees. 1x1 convolutions without stride or padding
/// are collapsed to one flat axis of all positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Spatial {
    pub input: Vec<usize>,
    pub output: Vec<usize>,
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Padding before each axis.
    pub pads: Vec<usize>,
}

/// Which side of the microkernel's tile the output channels are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    /// Channels are the `mr` rows, positions the `nr` columns.
    ChannelRows,
    /// Positions are the `mr` rows, channels the `nr` columns.
    PositionRows,
}

/// Everything the driver needs, decided at compile time.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvGemmPlan {
    pub batch: usize,
    pub groups: usize,
    /// Input / output channels per group.
    pub in_channels: usize,
    pub out_channels: usize,
    pub spatial: Spatial,
    /// Kernel taps (product of the kernel extents).
    pub taps: usize,
    /// Reduction depth K = taps · in_channels.
    pub depth: usize,
    /// Output positions per image and channel.
    pub positions: usize,
    /// Elements of one input channel plane.
    pub in_plane: usize,
    /// The microkernel's tile.
    pub mr: usize,
    pub nr: usize,
    pub orientation: Orientation,
    /// Reduction indices per block.
    pub kc: usize,
    /// Positions (Winograd: 2x2 tiles) per block, a multiple of `position_tile()`.
    pub nc: usize,
    pub has_bias: bool,
    /// Set when the convolution runs as Winograd F(2x2, 3x3) (`gemm::winograd`); then
    /// blocks (`nc`) count 2x2 output tiles instead of positions, and `kc` is unused.
    pub winograd: Option<WinogradShape>,
    /// Fused steps applied per tile; `None`: applied over the whole output afterwards.
    pub tile_steps: Option<Vec<TileStep>>,
    pub weight: ValueId,
    /// The weights are computed at run time (a graph input or another node's output,
    /// as in training graphs): the node packs them into its scratch, after the slots
    /// (`weights_offset`), before running the tasks.
    pub runtime_weights: bool,
    /// B is read where it lies: a flat 1x1 convolution with channels as rows on the
    /// AVX2 6x16 kernel, whose input `[C, P]` is already the K x N matrix. Whole panels
    /// go to the strided-B microkernel (`STRIDED_B_KERNEL`) straight from the input
    /// rows; only a last panel past the positions is packed (zero-filled).
    pub in_place_b: bool,
    /// Set for the channels-last weight-gradient correlations of stride-1 convolutions
    /// that run without im2col (`gemm::weight_grad_rows`): when estimated cheaper, or
    /// whenever they qualify if the schedule asks for kernel "weight_grad_rows". The
    /// rest of the plan is then unused.
    pub weight_grad_rows: Option<WeightGradRows>,
}

impl ConvGemmPlan {
    /// Output channels per panel.
    pub fn channel_tile(&self) -> usize {
        match self.orientation {
            Orientation::ChannelRows => self.mr,
            Orientation::PositionRows => self.nr,
        }
    }
    /// Positions per panel.
    pub fn position_tile(&self) -> usize {
        match self.orientation {
            Orientation::ChannelRows => self.nr,
            Orientation::PositionRows => self.mr,
        }
    }
    /// Channel panels per group.
    pub fn panels(&self) -> usize {
        self.out_channels.div_ceil(self.channel_tile())
    }
    pub fn k_blocks(&self) -> usize {
        self.depth.div_ceil(self.kc)
    }
    /// What blocks split: output positions, or Winograd tiles.
    pub fn work_items(&self) -> usize {
        self.winograd.as_ref().map_or(self.positions, WinogradShape::tiles)
    }
    pub fn p_blocks(&self) -> usize {
        self.work_items().div_ceil(self.nc)
    }
    /// Tasks before splitting output channels: images x groups x p-blocks.
    pub fn outer_tasks(&self) -> usize {
        self.batch * self.groups * self.p_blocks()
    }
    /// The most oc-panel groups worth splitting one outer task into.
    pub fn max_oc_groups(&self) -> usize {
        (self.outer_task_macs() / MIN_TASK_MACS).clamp(1, self.panels())
    }
    /// Multiply-adds of one outer task.
    fn outer_task_macs(&self) -> usize {
        match &self.winograd {
            Some(w) => 16 * self.out_channels * self.in_channels * self.nc.min(w.tiles()),
            None => self.out_channels * self.depth * self.nc.min(self.positions),
        }
    }
    // Task split (thread scaling, helper H3): every oc-panel group of an outer task packs
    // the task's whole input block again, so the split weighs that repeated packing.
    /// What every oc-panel group repeats, in multiply-add equivalents: packing the block's
    /// input (measured at ~6 cycles per element for a strided im2col gather, ~16
    /// multiply-adds per cycle), or Winograd's input transform.
    fn repeated_macs_per_oc_group(&self) -> usize {
        const GATHER_MACS: usize = 64;
        const COPY_MACS: usize = 16;
        match &self.winograd {
            Some(w) => 16 * self.in_channels * self.nc.min(w.tiles()) * COPY_MACS,
            None => {
                let per_element = if self.taps == 1 && self.spatial.strides.iter().all(|&s| s == 1) {
                    COPY_MACS
                } else {
                    GATHER_MACS
                };
                self.depth * self.nc.min(self.positions) * per_element
            }
        }
    }
    /// oc-panel groups per outer task for 1..=`SPLIT_TABLE_THREADS` threads.
    pub fn oc_groups_by_threads(&self) -> Vec<usize> {
        (1..=parallel::SPLIT_TABLE_THREADS)
            .map(|threads| {
                parallel::choose_parts(
                    self.outer_tasks(),
                    threads,
                    self.outer_task_macs(),
                    self.repeated_macs_per_oc_group(),
                    self.max_oc_groups(),
                )
            })
            .collect()
    }
    /// Packing slots: one per task that may run at once, up to `MAX_SLOTS` and
    /// `SCRATCH_BUDGET` bytes (but at least 4); more threads than slots wait for one.
    pub fn slots(&self) -> usize {
        let affordable = (SCRATCH_BUDGET / self.slot_bytes().max(1)).max(4);
        (self.outer_tasks() * self.max_oc_groups()).clamp(1, MAX_SLOTS.min(affordable))
    }
    /// One slot: what the orientation's loop nest keeps per task.
    pub fn slot_bytes(&self) -> usize {
        let bytes = match (&self.winograd, self.orientation) {
            (Some(w), _) => winograd::slot_bytes(self, w),
            (None, Orientation::ChannelRows) => channel_rows::slot_bytes(self.kc, self.nc, self.mr, self.nr),
            (None, Orientation::PositionRows) => position_rows::slot_bytes(self.kc, self.nc, self.panels(), self.nr),
        };
        bytes.div_ceil(64) * 64
    }
    pub fn scratch_bytes(&self) -> usize {
        if let Some(rows) = &self.weight_grad_rows {
            return rows.scratch_bytes();
        }
        let packed_weights = if self.runtime_weights {
            self.packed_weight_bytes()
        } else {
            0
        };
        self.weights_offset() + packed_weights
    }
    /// Where run-time weights are packed in the scratch (64-byte aligned).
    pub fn weights_offset(&self) -> usize {
        SLOT_FLAGS_BYTES + self.slots() * self.slot_bytes()
    }
    /// Bytes of the packed weights (`pack_weights`' layout, im2col only).
    pub fn packed_weight_bytes(&self) -> usize {
        if self.winograd.is_some() {
            return winograd::packed_weight_bytes(self);
        }
        self.groups * self.panels() * self.depth * self.channel_tile() * 4
    }

    /// The weights in panels: `[group][panel][kk][channel_tile]`, `kk = tap ·
    /// in_channels + ic`, channels past the group's zero. `w` is the ONNX layout
    /// `[M, C/g, *k]`.
    pub fn pack_weights(&self, w: &[f32]) -> Vec<u8> {
        if self.winograd.is_some() {
            return winograd::pack_weights(self, w);
        }
        let (width, panels, cin, taps) = (self.channel_tile(), self.panels(), self.in_channels, self.taps);
        let mut out = Vec::with_capacity(self.groups * panels * self.depth * width * 4);
        for g in 0..self.groups {
            for panel in 0..panels {
                for tap in 0..taps {
                    for ic in 0..cin {
                        for r in 0..width {
                            let oc_in_group = panel * width + r;
                            let v = if oc_in_group < self.out_channels {
                                let oc = g * self.out_channels + oc_in_group;
                                w.get((oc * cin + ic) * taps + tap).copied().unwrap_or(0.0)
                            } else {
                                0.0
                            };
                            out.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
        out
    }
}

/// The weights of a convolution whose weight input is a constant, as dense f32.
pub fn constant_weights(g: &Graph, node: &Node) -> Option<Vec<f32>> {
    let w = *node.inputs.get(1)?;
    let n = g.ty(w).numel();
    let producer = g.nodes.iter().find(|m| m.outputs.contains(&w))?;
    let Op::Constant(c) = producer.op else {
        return None;
    };
    match &g.constants.get(c.index())?.value {
        ConstValue::Dense(TensorData::F32(v)) if v.len() == n => Some(v.clone()),
        ConstValue::Splat(Scalar::F32(x)) => Some(vec![*x; n]),
        _ => None,
    }
}

/// The plan for `node` on a microkernel of `mr` x `nr`, or None when the node is not a
/// convolution this driver takes (it then runs on the direct kernel).
pub fn plan(g: &Graph, node: &Node, (mr, nr): (usize, usize)) -> Option<ConvGemmPlan> {
    let Op::Conv(geometry) = &node.op else {
        return None;
    };
    if node.outputs.len() != 1 || node.inputs.len() < 2 || mr == 0 || nr == 0 || !nr.is_multiple_of(4) {
        return None;
    }
    let s = &node.schedule;
    if s.layout_in != Layout::Plain || s.layout_out != Layout::Plain {
        return None;
    }
    let x = g.ty(node.inputs[0]);
    let w = g.ty(node.inputs[1]);
    let y = g.ty(node.outputs[0]);
    let rank = x.shape.len();
    if rank < 3 || w.shape.len() != rank || y.shape.len() != rank {
        return None;
    }
    if [x, w, y].iter().any(|t| t.dtype != DType::F32 || t.numel() == 0) {
        return None;
    }
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    let has_bias = op_inputs == 3;
    if has_bias && g.ty(node.inputs[2]).dtype != DType::F32 {
        return None;
    }
    let groups = geometry.groups;
    let (batch, in_total, out_total) = (x.shape[0], x.shape[1], w.shape[0]);
    if groups == 0 || !in_total.is_multiple_of(groups) || !out_total.is_multiple_of(groups) {
        return None;
    }
    let (in_channels, out_channels) = (in_total / groups, out_total / groups);
    if w.shape[1] != in_channels || y.shape[1] != out_total || y.shape[0] != batch {
        return None;
    }
    let depthwise = groups > 1 && groups == in_total && groups == out_total;
    let wanted = match s.kernel.as_str() {
        "gemm" | "winograd" | "weight_grad_rows" => true,
        // Unscheduled graphs (tests, tools): grouped convolutions with a few channels
        // per group fill a register tile too thinly.
        "" => !depthwise && (groups == 1 || (out_channels >= mr && in_channels >= 4)),
        _ => false,
    };
    if !wanted {
        return None;
    }
    // Constant weights are packed at compile time; weights that some node computes or
    // the caller passes are packed at run time. A constant this driver cannot read stays
    // on the direct kernel (the module does not emit constants read only by GEMM nodes).
    let runtime_weights = match producer_op(g, node.inputs[1]) {
        Some(Op::Constant(_)) => {
            constant_weights(g, node)?;
            false
        }
        _ => true,
    };
    let axes = rank - 2;
    let geometry_ok = [
        &geometry.strides,
        &geometry.dilations,
        &geometry.pads_begin,
        &geometry.pads_end,
    ]
    .iter()
    .all(|v| v.len() == axes);
    if !geometry_ok || geometry.strides.contains(&0) || geometry.dilations.contains(&0) {
        return None;
    }
    let kernel = w.shape[2..].to_vec();
    let pointwise = kernel.iter().all(|&k| k == 1)
        && geometry.strides.iter().all(|&s| s == 1)
        && geometry.pads_begin.iter().chain(&geometry.pads_end).all(|&p| p == 0)
        && x.shape[2..] == y.shape[2..];
    let spatial = if pointwise {
        let positions = y.shape[2..].iter().product();
        Spatial {
            input: vec![positions],
            output: vec![positions],
            kernel: vec![1],
            strides: vec![1],
            dilations: vec![1],
            pads: vec![0],
        }
    } else {
        Spatial {
            input: x.shape[2..].to_vec(),
            output: y.shape[2..].to_vec(),
            kernel,
            strides: geometry.strides.clone(),
            dilations: geometry.dilations.clone(),
            pads: geometry.pads_begin.clone(),
        }
    };
    let taps: usize = spatial.kernel.iter().product();
    let depth = taps * in_channels;
    let positions: usize = spatial.output.iter().product();
    let in_plane: usize = spatial.input.iter().product();
    let orientation = orientation(out_channels, positions, depth, mr, nr);
    let orientation = prefer_quad_packing(orientation, &spatial, out_channels, positions, depth, mr, nr);
    let position_tile = if orientation == Orientation::ChannelRows {
        nr
    } else {
        mr
    };
    let (kc, nc) = blocking(s, depth, positions, mr, nr, position_tile);
    let tile_steps = tile_steps(g, node, &y.shape);
    let im2col_cost = orientation_cost(orientation, out_channels, positions, depth, mr, nr)
        + runtime_weights_im2col_packing_cost(runtime_weights, depth, positions);
    let forced = s.kernel == "winograd";
    // Run-time weights are transformed by the node on every call, once for the batch.
    let transform_cost = if runtime_weights {
        winograd::RUNTIME_TRANSFORM_CYCLES_PER_FILTER * in_channels * out_channels / batch.max(1)
    } else {
        0
    };
    let winograd = winograd_shape(
        &spatial,
        groups,
        in_channels,
        out_channels,
        (mr, nr),
        im2col_cost,
        transform_cost,
        forced,
    );
    let (orientation, nc) = match &winograd {
        Some((_, block)) => (Orientation::ChannelRows, *block),
        None => (orientation, nc),
    };
    let mut winograd = winograd.map(|(w, _)| w);
    // A schedule that asks for Winograd may also size its blocks (in tiles).
    let nc = match (&winograd, forced, s.tiles.iter().find(|(n, _)| n == "nc")) {
        (Some(w), true, Some(&(_, tiles))) if tiles > 0 => tiles.div_ceil(nr).min(w.tiles().div_ceil(nr)) * nr,
        _ => nc,
    };
    if let Some(w) = &mut winograd {
        w.set_block(nc);
    }
    let weight_grad_rows = if runtime_weights
        && (mr, nr) == (6, 16)
        && batch == 1
        && groups == 1
        && !has_bias
        && node.epilogue.is_empty()
    {
        let im2col_macs = out_channels.div_ceil(mr) * mr * positions.div_ceil(nr) * nr * depth;
        WeightGradRows::new(
            &spatial.input,
            &spatial.kernel,
            &spatial.output,
            &spatial.strides,
            &spatial.dilations,
            &spatial.pads,
            in_channels,
            out_channels,
        )
        .filter(|rows| s.kernel == "weight_grad_rows" || rows.cheaper_than_im2col(im2col_macs, depth * positions))
    } else {
        None
    };
    let in_place_b = pointwise
        && winograd.is_none()
        && orientation == Orientation::ChannelRows
        && (mr, nr) == (6, 16)
        && out_channels * depth < IN_PLACE_B_MAX_MACS_PER_POSITION;
    Some(ConvGemmPlan {
        batch,
        groups,
        in_channels,
        out_channels,
        spatial,
        taps,
        depth,
        positions,
        in_plane,
        mr,
        nr,
        orientation,
        kc,
        nc,
        has_bias,
        winograd,
        tile_steps,
        weight: node.inputs[1],
        runtime_weights,
        in_place_b,
        weight_grad_rows,
    })
}

/// The op of the node that defines `v` (None for graph inputs).
fn producer_op(g: &Graph, v: ValueId) -> Option<&Op> {
    g.nodes.iter().find(|m| m.outputs.contains(&v)).map(|m| &m.op)
}

/// Positions as rows when that is cheaper by a margin (see `orientation_cost`).
/// `orientation` weighs padded work only. When positions are the rows and `mr` is not a
/// multiple of 4, `pack` copies the im2col position by position; with channels as rows
/// and every output row a whole number of `nr`-wide panels it copies whole f32x4 quads.
/// Near a tie (the weight gradients of training graphs, whose convolution has the
/// kernel's taps times the input channels as positions: 64 channels x 576 positions)
/// that difference decides, charged at a quarter of a tile unit per packed element.
fn prefer_quad_packing(
    o: Orientation,
    spatial: &Spatial,
    channels: usize,
    positions: usize,
    depth: usize,
    mr: usize,
    nr: usize,
) -> Orientation {
    let whole_panels = spatial.output.last().is_some_and(|&row| row.is_multiple_of(nr));
    if o != Orientation::PositionRows || mr.is_multiple_of(4) || !whole_panels {
        return o;
    }
    let position_rows = orientation_cost(o, channels, positions, depth, mr, nr) + positions * depth / 4;
    let channel_rows = orientation_cost(Orientation::ChannelRows, channels, positions, depth, mr, nr);
    if position_rows * 100 < channel_rows * 97 {
        o
    } else {
        Orientation::ChannelRows
    }
}

fn orientation(channels: usize, positions: usize, depth: usize, mr: usize, nr: usize) -> Orientation {
    let cost = |o| orientation_cost(o, channels, positions, depth, mr, nr);
    if cost(Orientation::PositionRows) * 100 < cost(Orientation::ChannelRows) * 97 {
        Orientation::PositionRows
    } else {
        Orientation::ChannelRows
    }
}

/// Estimated cycles per image and group: padded multiply-adds at ~16 per cycle, plus,
/// for positions as rows, ~2 cycles per output element for the transposed store (which
/// makes the swap a loss for shallow reductions such as a first 3x3 convolution over 3
/// channels).
fn orientation_cost(o: Orientation, channels: usize, positions: usize, depth: usize, mr: usize, nr: usize) -> usize {
    let padded = |rows: usize, cols: usize| rows.div_ceil(mr) * mr * cols.div_ceil(nr) * nr;
    match o {
        Orientation::ChannelRows => padded(channels, positions) * depth / 16,
        Orientation::PositionRows => padded(positions, channels) * depth / 16 + 2 * channels * positions,
    }
}

/// Cycles charged to im2col for packing its `depth` x `positions` columns, when the
/// weights are computed at run time (training graphs). `orientation_cost` counts only
/// multiply-adds, so with few output channels (each packed value feeding 16-18 of
/// them) it underrates im2col against Winograd, whose transforms are charged: a 16 -> 16
/// 3x3 conv at 32x32 (resnet_tiny's first stage, forward and input gradient) ran ~1.9x
/// faster as Winograd than on im2col, which the model without this charge kept (perf,
/// the node's share of a training step at batch 64, one thread, same run). A quarter
/// cycle per packed value flips it. Graphs with constant weights (inference) keep the
/// old model: the one measured layer near the boundary, GoogLeNet's 16 -> 48 at 14x14,
/// ran 3% slower as Winograd and this charge would flip it too.
fn runtime_weights_im2col_packing_cost(runtime_weights: bool, depth: usize, positions: usize) -> usize {
    if runtime_weights { depth * positions / 4 } else { 0 }
}

/// Winograd's shape and tiles per block when the convolution qualifies and is
/// estimated at least 15% cheaper than im2col (its 16 products at ~16 multiply-adds per
/// cycle, plus ~9 cycles per tile and channel for the two transforms), or whenever it
/// qualifies if `forced` (the schedule asked for "winograd"). The transform charge was
/// 12 before the deinterleaved window and column-wise input transform
/// (`gemm::winograd`). Measured with a charge of 6 (`scripts/conv_layers.py`, one
/// thread, same run): SqueezeNet's 16 -> 64 at 55x55 and GoogLeNet's 16 -> 32 at 28x28
/// take Winograd and run 19% and 24% faster; GoogLeNet's 16 -> 48 at 14x14 (64 tiles
/// for 49) too, but 3% slower: 9 keeps the first two and not the last.
#[allow(clippy::too_many_arguments)]
fn winograd_shape(
    spatial: &Spatial,
    groups: usize,
    in_channels: usize,
    out_channels: usize,
    (mr, nr): (usize, usize),
    im2col_cost: usize,
    transform_cost: usize,
    forced: bool,
) -> Option<(WinogradShape, usize)> {
    let w = winograd::shape(
        &spatial.input,
        &spatial.output,
        &spatial.kernel,
        &spatial.strides,
        &spatial.dilations,
        &spatial.pads,
        groups,
        in_channels,
        out_channels,
    )?;
    let padded_channels = out_channels.div_ceil(mr) * mr;
    let cost = winograd::product_macs(&w, in_channels, padded_channels, nr) / 16
        + 9 * w.tiles() * (in_channels + out_channels)
        + transform_cost;
    if !forced && cost * 100 >= im2col_cost * 85 {
        return None;
    }
    let block = winograd::block_tiles(&w, in_channels, padded_channels, nr);
    Some((w, block))
}

/// (kc, nc): the schedule's tiles when it has them, else the choose-schedule formula
/// with default cache sizes; then balanced so the last block is not a sliver, nc a
/// multiple of the position tile.
fn blocking(
    s: &cnnc_ir::Schedule,
    depth: usize,
    positions: usize,
    mr: usize,
    nr: usize,
    position_tile: usize,
) -> (usize, usize) {
    let tile = |name: &str| {
        s.tiles
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, v)| v)
            .filter(|&v| v > 0)
    };
    let kc = tile("kc").unwrap_or_else(|| {
        let fit = (DEFAULT_L1D_BYTES / 2 / ((mr + nr) * 4)).max(1);
        if fit >= 8 { fit / 8 * 8 } else { fit }
    });
    let kc = kc.clamp(1, depth);
    let k_blocks = depth.div_ceil(kc);
    let kc = depth.div_ceil(k_blocks);
    let nc = tile("nc").unwrap_or_else(|| (DEFAULT_L2_BYTES / 2 / (kc * 4)).max(position_tile));
    let nc = nc.div_ceil(position_tile) * position_tile;
    let nc = nc.min(positions.div_ceil(position_tile) * position_tile);
    let p_blocks = positions.div_ceil(nc);
    let nc = positions.div_ceil(p_blocks).div_ceil(position_tile) * position_tile;
    (kc, nc)
}

/// The node's epilogue as per-tile steps, or None if an operand cannot be addressed per
/// tile (or a step is not an f32 function of the output).
fn tile_steps(g: &Graph, node: &Node, out_shape: &[usize]) -> Option<Vec<TileStep>> {
    let spatial = &out_shape[2..];
    let natural = cnnc_ir::strides(spatial);
    let mut steps = Vec::new();
    for step in &node.epilogue {
        steps.push(match *step {
            EpilogueStep::Unary(f) => {
                super::elementwise::check_unary(f, DType::F32).ok()?;
                TileStep::Unary(f)
            }
            EpilogueStep::Binary { func, operand } => {
                let ty = g.ty(*node.inputs.get(operand)?);
                if ty.dtype != DType::F32 || func.is_comparison() || func.is_logical() {
                    return None;
                }
                let strides = super::map::broadcast_strides(&ty.shape, out_shape).ok()?;
                let along: Vec<(usize, i64)> = spatial
                    .iter()
                    .zip(&strides[2..])
                    .zip(&natural)
                    .filter(|((extent, _), _)| **extent > 1)
                    .map(|((_, &s), &n)| (n, s))
                    .collect();
                let position_stride = if along.iter().all(|&(_, s)| s == 0) {
                    0
                } else if along.iter().all(|&(n, s)| s == n as i64) {
                    1
                } else {
                    return None;
                };
                TileStep::Binary {
                    func,
                    operand: TileOperand {
                        input: operand,
                        image_stride: strides[0],
                        channel_stride: strides[1],
                        position_stride,
                    },
                }
            }
        });
    }
    Some(steps)
}

/// Symbol of the AVX2 6x16 microkernel that reads B rows in place
/// (`x86::assemble_avx2_gemm_strided_b`): `(k, a, b, c, ldc, accumulate, ldb)`.
pub const STRIDED_B_KERNEL: &str = "cnnc_gemm_f32_avx2_6x16_strided_b";

/// Symbol of the AVX2 6x16 microkernel that prefetches another B panel
/// (`x86::assemble_avx2_gemm_prefetch_b`): `(k, a, b, c, ldc, accumulate, ahead)`.
pub const PREFETCH_B_KERNEL: &str = "cnnc_gemm_f32_avx2_6x16_prefetch_b";

/// A seven-argument variant of the AVX2 microkernel, defined by the first node that
/// needs it (its only declaration is here, so a declared symbol is a defined one).
fn kernel_variant<M: Module>(
    module: &mut M,
    name: &str,
    assemble: fn() -> Result<crate::microkernel::x86::AssembledKernel, CodegenError>,
) -> Result<FuncId, CodegenError> {
    kernel_variant_with(module, name, 7, &assemble)
}

/// A variant of the AVX2 microkernel taking `params` i64 arguments (SystemV), defined
/// once per module under `name`.
fn kernel_variant_with<M: Module>(
    module: &mut M,
    name: &str,
    params: usize,
    assemble: &dyn Fn() -> Result<crate::microkernel::x86::AssembledKernel, CodegenError>,
) -> Result<FuncId, CodegenError> {
    if let Some(FuncOrDataId::Func(id)) = module.get_name(name) {
        return Ok(id);
    }
    let mut sig = module.make_signature();
    sig.call_conv = CallConv::SystemV;
    sig.params.extend(std::iter::repeat_n(AbiParam::new(I64), params));
    let id = module
        .declare_function(name, Linkage::Local, &sig)
        .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
    let kernel = assemble()?;
    module
        .define_function_bytes(id, crate::microkernel::x86::CODE_ALIGN, &kernel.code, &[])
        .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
    Ok(id)
}

/// Functions and data a module shares between its GEMM nodes.
pub struct GemmEnv {
    pub kernel: GemmKernel,
    pub float_env: Option<FloatEnv>,
}

/// Layout of the context a node's kernel passes to its tasks.
const CTX_BUFFERS: i32 = 0;
const CTX_SCRATCH: i32 = 8;
const CTX_OC_GROUPS: i32 = 16;
const CTX_PANELS_PER_GROUP: i32 = 24;
const CTX_BYTES: u32 = 32;

/// Defines the node's packed weights, its task and its kernel (`kernel_sig`: the
/// module's node-kernel signature); returns the kernel. The kernel's buffer array
/// lists the node's inputs, its output, then its scratch (`plan.scratch_bytes()`).
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    env: &GemmEnv,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &ConvGemmPlan,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let a_data = if plan.runtime_weights {
        None
    } else {
        let weights = constant_weights(g, node)
            .ok_or_else(|| CodegenError(format!("conv '{}': the weights are not a constant", node.name)))?;
        let bytes = plan.pack_weights(&weights);
        Some(crate::module::define_bytes(
            module,
            &format!("cnnc_w{node_index}"),
            bytes,
        )?)
    };

    if let Some(rows) = &plan.weight_grad_rows {
        return define_weight_grad_rows(module, env, node, node_index, rows, kernel_sig, ctx, fb_ctx);
    }
    let x86_avx2 = (plan.mr, plan.nr) == (6, 16);
    let strided_b = if plan.in_place_b {
        Some(kernel_variant(
            module,
            STRIDED_B_KERNEL,
            crate::microkernel::x86::assemble_avx2_gemm_strided_b,
        )?)
    } else if x86_avx2 && plan.winograd.is_none() && plan.orientation == Orientation::PositionRows {
        Some(kernel_variant(
            module,
            PREFETCH_B_KERNEL,
            crate::microkernel::x86::assemble_avx2_gemm_prefetch_b,
        )?)
    } else {
        None
    };
    let fused_store = if x86_avx2 && plan.winograd.is_none() && plan.orientation == Orientation::ChannelRows {
        store_epilogue(plan)
    } else {
        None
    };
    let fused_store = match fused_store {
        Some((epilogue, residual_step)) => {
            let base = if plan.in_place_b {
                STRIDED_B_KERNEL
            } else {
                "cnnc_gemm_f32_avx2_6x16"
            };
            let name = epilogue.symbol(base);
            let strided = plan.in_place_b;
            let id = kernel_variant_with(module, &name, 9, &|| {
                crate::microkernel::store_epilogue::assemble_avx2_gemm_with_epilogue(&epilogue, strided)
            })?;
            Some((id, residual_step))
        }
        None => None,
    };
    let task_name = format!("cnnc_k{node_index}_conv_gemm_task");
    let task_sig = parallel::task_signature(module);
    let what = format!("GEMM task of conv '{}'", node.name);
    let task = define_local(
        module,
        &task_name,
        &task_sig,
        ctx,
        fb_ctx,
        &what,
        |b, module, params| {
            let kernels = TaskKernels { strided_b, fused_store };
            emit_task(module, env, kernels, b, node, plan, a_data, params[0], params[1])
        },
    )?;

    let name = format!("cnnc_k{node_index}_conv_gemm");
    let what = format!("kernel of conv '{}' (GEMM)", node.name);
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &what, |b, module, params| {
        let task_ref = module.declare_func_in_func(task, b.func);
        let call_conv = module.isa().default_call_conv();
        emit_kernel(b, g, node, plan, params[0], params[1], task_ref, call_conv)
    })
}

/// The node kernel and task of a weight gradient without im2col (`gemm::weight_grad_rows`).
#[allow(clippy::too_many_arguments)]
fn define_weight_grad_rows<M: Module>(
    module: &mut M,
    env: &GemmEnv,
    node: &Node,
    node_index: usize,
    rows: &WeightGradRows,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let strided_b = kernel_variant(
        module,
        STRIDED_B_KERNEL,
        crate::microkernel::x86::assemble_avx2_gemm_strided_b,
    )?;
    let n_inputs = node.inputs.len();
    let scratch_index = n_inputs + node.outputs.len();
    let task_sig = parallel::task_signature(module);
    let task_name = format!("cnnc_k{node_index}_conv_weight_grad_rows_task");
    let what = format!("weight-gradient task of conv '{}'", node.name);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &what, |b, module, params| {
        let saved_fp = env.float_env.map(|f| f.emit_enter(module, b));
        let kernel = module.declare_func_in_func(strided_b, b.func);
        let share = parallel::emit_task_share(b, params[0], params[1], rows.images);
        let buffer = |b: &mut FunctionBuilder, i: usize| b.ins().load(I64, buffer_flags(), share.bufs, (8 * i) as i32);
        let (x, dy, scratch) = (buffer(b, 0), buffer(b, 1), buffer(b, scratch_index));
        weight_grad_rows::emit_task(b, rows, kernel, x, dy, scratch, params[1], share.first, share.end);
        if let (Some(f), Some(saved)) = (env.float_env, saved_fp) {
            f.emit_restore(module, b, saved);
        }
        Ok(())
    })?;
    let name = format!("cnnc_k{node_index}_conv_weight_grad_rows");
    let what = format!("kernel of conv '{}' (weight gradient rows)", node.name);
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &what, |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_up_to(module, b, host, bufs, task, weight_grad_rows::MAX_TASKS);
        let threads = parallel::emit_host_threads(b, host);
        let limit = int(b, weight_grad_rows::MAX_TASKS as i64);
        let tasks = b.ins().umin(threads, limit);
        let scratch = b.ins().load(I64, buffer_flags(), bufs, (8 * scratch_index) as i32);
        let out = b.ins().load(I64, buffer_flags(), bufs, (8 * n_inputs) as i32);
        weight_grad_rows::emit_sum(b, rows, scratch, tasks, out);
        Ok(())
    })
}

/// The plan's per-tile epilogue as one the microkernel applies before its store, and
/// the index of its residual step among the tile steps.
fn store_epilogue(plan: &ConvGemmPlan) -> Option<(StoreEpilogue, Option<usize>)> {
    let steps = plan.tile_steps.as_ref()?;
    let mut store_steps = Vec::new();
    let mut residual_step = None;
    for (i, step) in steps.iter().enumerate() {
        match step {
            TileStep::Unary(f) => store_steps.extend(unary_store_steps(*f)?),
            TileStep::Binary { func, operand } => {
                // Read with C's row stride: an operand laid out as the output.
                if operand.position_stride != 1 || operand.channel_stride != plan.positions as i64 {
                    return None;
                }
                store_steps.push(binary_store_step(*func)?);
                residual_step = Some(i);
            }
        }
    }
    Some((StoreEpilogue::new(plan.has_bias, store_steps)?, residual_step))
}

/// The microkernel variants a task calls besides the plain one.
struct TaskKernels {
    /// Seven arguments: strided B, or B prefetching (see `TaskFrame::strided_kernel`).
    strided_b: Option<FuncId>,
    /// Nine arguments: the epilogue before the store, and the residual step's index.
    fused_store: Option<(FuncId, Option<usize>)>,
}

fn buffer_flags() -> MemFlagsData {
    MemFlagsData::trusted().with_readonly().with_can_move()
}

/// The node kernel: sets up the task context, picks the split, runs the tasks, then
/// applies an epilogue that could not run per tile.
#[allow(clippy::too_many_arguments)]
fn emit_kernel(
    b: &mut FunctionBuilder,
    g: &Graph,
    node: &Node,
    plan: &ConvGemmPlan,
    host: Value,
    bufs: Value,
    task: cranelift_codegen::ir::FuncRef,
    call_conv: cranelift_codegen::isa::CallConv,
) -> Result<(), CodegenError> {
    let n_buffers = node.inputs.len() + node.outputs.len();
    let scratch = b.ins().load(I64, buffer_flags(), bufs, (8 * n_buffers) as i32);
    parallel::emit_reset_slots(b, scratch, plan.slots());
    let threads = parallel::emit_host_threads(b, host);
    if plan.runtime_weights {
        let weights = b.ins().load(I64, buffer_flags(), bufs, 8);
        let packed = b.ins().iadd_imm_s(scratch, plan.weights_offset() as i64);
        if plan.winograd.is_some() {
            winograd::emit_pack_weights(b, plan, weights, packed);
        } else {
            pack::emit_pack_weights(b, plan, weights, packed);
        }
    }

    // oc-panel groups: chosen per thread count at compile time (`oc_groups_by_threads`).
    let outer = plan.outer_tasks() as i64;
    let oc_groups = parallel::emit_by_threads(b, threads, &plan.oc_groups_by_threads());
    // Panels per group, then the groups actually needed (no empty tasks).
    let panels = plan.panels() as i64;
    let per_group = ceil_div_value(b, panels, oc_groups);
    let oc_groups = ceil_div_value(b, panels, per_group);
    let n_tasks = b.ins().imul_imm_s(oc_groups, outer);

    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, CTX_BYTES, 3));
    b.ins().stack_store(I64, bufs, slot, CTX_BUFFERS);
    b.ins().stack_store(I64, scratch, slot, CTX_SCRATCH);
    b.ins().stack_store(I64, oc_groups, slot, CTX_OC_GROUPS);
    b.ins().stack_store(I64, per_group, slot, CTX_PANELS_PER_GROUP);
    let task_ctx = b.ins().stack_addr(I64, slot, 0);
    parallel::emit_dispatch(b, host, threads, n_tasks, task, task_ctx, call_conv);

    if plan.tile_steps.is_none() && !node.epilogue.is_empty() {
        let inputs: Vec<Value> = (0..node.inputs.len())
            .map(|i| b.ins().load(I64, buffer_flags(), bufs, (8 * i) as i32))
            .collect();
        let output = b.ins().load(I64, buffer_flags(), bufs, (8 * node.inputs.len()) as i32);
        let mut k = KernelCtx {
            b,
            graph: g,
            node,
            inputs,
            outputs: vec![output],
        };
        super::elementwise::emit_epilogue(&mut k)?;
    }
    Ok(())
}

/// `ceil(numerator / d)` for a compile-time numerator and a run-time `d >= 1`.
fn ceil_div_value(b: &mut FunctionBuilder, numerator: i64, d: Value) -> Value {
    let n = int(b, numerator);
    let n = b.ins().iadd(n, d);
    let n = b.ins().iadd_imm_s(n, -1);
    b.ins().udiv(n, d)
}

/// One task: (image, group, p-block, oc-panel group) from `index`, then the loop nest
/// of the plan's orientation.
#[allow(clippy::too_many_arguments)]
fn emit_task<M: Module>(
    module: &mut M,
    env: &GemmEnv,
    kernels: TaskKernels,
    b: &mut FunctionBuilder,
    node: &Node,
    plan: &ConvGemmPlan,
    weights_data: Option<DataId>,
    task_ctx: Value,
    index: Value,
) -> Result<(), CodegenError> {
    let saved_fp = env.float_env.map(|f| f.emit_enter(module, b));
    let kernel = module.declare_func_in_func(env.kernel.func, b.func);
    let strided_kernel = kernels.strided_b.map(|id| module.declare_func_in_func(id, b.func));
    let fused_store = kernels.fused_store.map(|(id, residual_step)| FusedStore {
        kernel: module.declare_func_in_func(id, b.func),
        residual_step,
    });

    let ctx_flags = MemFlagsData::trusted().with_readonly();
    let bufs = b.ins().load(I64, ctx_flags, task_ctx, CTX_BUFFERS);
    let scratch = b.ins().load(I64, ctx_flags, task_ctx, CTX_SCRATCH);
    let weights = match weights_data {
        Some(data) => {
            let gv = module.declare_data_in_func(data, b.func);
            b.ins().symbol_value(I64, gv)
        }
        None => b.ins().iadd_imm_s(scratch, plan.weights_offset() as i64),
    };
    let oc_groups = b.ins().load(I64, ctx_flags, task_ctx, CTX_OC_GROUPS);
    let per_group = b.ins().load(I64, ctx_flags, task_ctx, CTX_PANELS_PER_GROUP);
    let buffer = |b: &mut FunctionBuilder, i: usize| b.ins().load(I64, buffer_flags(), bufs, (8 * i) as i32);
    let x = buffer(b, 0);
    let out = buffer(b, node.inputs.len());
    let bias = if plan.has_bias { Some(buffer(b, 2)) } else { None };
    let steps: &[TileStep] = plan.tile_steps.as_deref().unwrap_or(&[]);
    let operands: Vec<Option<Value>> = steps
        .iter()
        .map(|s| match s {
            TileStep::Unary(_) => None,
            TileStep::Binary { operand, .. } => Some(buffer(b, operand.input)),
        })
        .collect();
    let epilogue = TileEpilogue {
        bias,
        steps,
        operands,
        row_stride: plan.positions as i64,
    };

    let slot = parallel::emit_claim_slot(b, scratch, plan.slots());
    let slot_base = b.ins().iadd_imm_s(scratch, SLOT_FLAGS_BYTES as i64);
    let slot_base = scaled(b, slot_base, slot, plan.slot_bytes() as i64);

    // index = outer · oc_groups + oc_group; outer = (image · groups + group) · p_blocks + p_block.
    let outer = b.ins().udiv(index, oc_groups);
    let outer_part = b.ins().imul(outer, oc_groups);
    let oc_group = b.ins().isub(index, outer_part);
    let p_blocks = plan.p_blocks() as i64;
    let p_block = b.ins().urem_imm_u(outer, p_blocks);
    let image_group = b.ins().udiv_imm_u(outer, p_blocks);
    let group = b.ins().urem_imm_u(image_group, plan.groups as i64);
    let image = b.ins().udiv_imm_u(image_group, plan.groups as i64);
    let panel_lo = b.ins().imul(oc_group, per_group);
    let panel_hi = b.ins().iadd(panel_lo, per_group);
    let panels = int(b, plan.panels() as i64);
    let panel_hi = b.ins().umin(panel_hi, panels);

    let positions = plan.positions as i64;
    let (position_tile, nc) = (plan.position_tile() as i64, plan.nc as i64);
    let p_start = b.ins().imul_imm_s(p_block, nc);
    let all_items = int(b, plan.work_items() as i64);
    let left = b.ins().isub(all_items, p_start);
    let left_panels = b.ins().iadd_imm_s(left, position_tile - 1);
    let left_panels = b.ins().udiv_imm_u(left_panels, position_tile);
    let block_panels = int(b, nc / position_tile);
    let p_panels = b.ins().umin(left_panels, block_panels);

    let in_total = (plan.in_channels * plan.groups) as i64;
    let out_total = (plan.out_channels * plan.groups) as i64;
    let x_channel = b.ins().imul_imm_s(image, in_total);
    let x_channel = scaled(b, x_channel, group, plan.in_channels as i64);
    let x_group = scaled(b, x, x_channel, plan.in_plane as i64 * F32_BYTES);
    let group_channel = b.ins().imul_imm_s(group, plan.out_channels as i64);
    let out_channel = b.ins().imul_imm_s(image, out_total);
    let out_channel = b.ins().iadd(out_channel, group_channel);
    let out_group = scaled(b, out, out_channel, positions * F32_BYTES);
    let group_weights = plan.panels() * plan.depth * plan.channel_tile() * 4;
    let weights_group = scaled(b, weights, group, group_weights as i64);

    let frame = TaskFrame {
        plan,
        kernel,
        strided_kernel,
        fused_store,
        epilogue,
        scratch: slot_base,
        image,
        group_channel,
        p_start,
        p_panels,
        panel_lo,
        panel_hi,
        x_group,
        out_group,
        weights_group,
    };
    match (&plan.winograd, plan.orientation) {
        (Some(w), _) => winograd::emit(b, &frame, w)?,
        (None, Orientation::ChannelRows) => channel_rows::emit(b, &frame)?,
        (None, Orientation::PositionRows) => position_rows::emit(b, &frame)?,
    }
    parallel::emit_release_slot(b, scratch, slot);
    if let (Some(f), Some(saved)) = (env.float_env, saved_fp) {
        f.emit_restore(module, b, saved);
    }
    Ok(())
}

/// What a task's loop nest works on (run-time values in the task function).
pub struct TaskFrame<'a> {
    pub plan: &'a ConvGemmPlan,
    /// The microkernel.
    pub kernel: FuncRef,
    /// The seven-argument microkernel variant: strided B when the plan reads B in place
    /// (`in_place_b`), B prefetching for positions as rows on AVX2.
    pub strided_kernel: Option<FuncRef>,
    /// The microkernel that applies the whole epilogue before its store (channels as
    /// rows on AVX2, an epilogue `store_epilogue` takes), for full tiles of the last
    /// k-block.
    pub fused_store: Option<FusedStore>,
    pub epilogue: TileEpilogue<'a>,
    /// This task's slot of the node's scratch (`plan.slot_bytes()`, 64-byte aligned).
    pub scratch: Value,
    pub image: Value,
    /// First output channel of the group.
    pub group_channel: Value,
    /// First position (Winograd: tile) of the block, and the block's panels of them.
    pub p_start: Value,
    pub p_panels: Value,
    /// Channel panels `panel_lo..panel_hi` of the group.
    pub panel_lo: Value,
    pub panel_hi: Value,
    pub x_group: Value,
    pub out_group: Value,
    /// The group's packed weights.
    pub weights_group: Value,
}

/// A microkernel with the epilogue in its store (`microkernel::store_epilogue`):
/// `(k, a, b, c, ldc, accumulate, ldb, bias, residual)`, B strided when the plan reads
/// B in place, else packed.
pub struct FusedStore {
    pub kernel: FuncRef,
    /// Index of the residual add among the epilogue's steps.
    pub residual_step: Option<usize>,
}

impl TaskFrame<'_> {
    /// What packing needs to know for panels `width` positions wide.
    pub fn pack_shape(&self, width: usize) -> PackShape<'_> {
        PackShape {
            spatial: &self.plan.spatial,
            channels: self.plan.in_channels,
            in_plane: self.plan.in_plane,
            positions: self.plan.positions,
            width,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{BinaryFn, ConvGeometry, Tensor, TensorType};

    /// A conv node with constant weights; returns the graph (node 1 is the conv).
    fn conv_graph(c: usize, m: usize, hw: usize, k: usize, groups: usize) -> Graph {
        let mut g = Graph::new("t");
        let x = g.add_input(TensorType::f32([1, c, hw, hw]), "x");
        let w = g.add_constant(
            "w",
            Tensor::f32([m, c / groups, k, k], vec![0.5; m * c / groups * k * k]),
        );
        let pad = k / 2;
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![pad, pad],
            pads_end: vec![pad, pad],
            groups,
        };
        let y = g.push1("conv", Op::Conv(geometry), &[x, w]).unwrap();
        g.outputs.push(y);
        g
    }

    fn conv_node(g: &Graph) -> &Node {
        g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap()
    }

    #[test]
    fn pointwise_convs_read_b_in_place_only_when_few_channels_share_it() {
        // MobileNet-v2's expansion 16 -> 96 at 112x112: packing would cost ~8% of the MACs.
        let g = conv_graph(16, 96, 112, 1, 1);
        assert!(plan(&g, conv_node(&g), (6, 16)).unwrap().in_place_b);
        // SqueezeNet's classifier 512 -> 1000 at 13x13: strided B costs more than the copy.
        let g = conv_graph(512, 1000, 13, 1, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        assert_eq!(p.orientation, Orientation::ChannelRows);
        assert!(!p.in_place_b);
        // Only the AVX2 tile has the strided kernel.
        let g = conv_graph(16, 96, 112, 1, 1);
        assert!(!plan(&g, conv_node(&g), (14, 32)).unwrap().in_place_b);
    }

    #[test]
    fn few_positions_swap_the_orientation() {
        // 7x7 = 49 positions: 4 panels of 16 (64) vs 9 panels of 6 (54).
        let g = conv_graph(512, 512, 7, 1, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        assert_eq!(p.orientation, Orientation::PositionRows);
        assert_eq!((p.channel_tile(), p.position_tile(), p.panels()), (16, 6, 32));
        assert_eq!(p.nc % 6, 0);
        // With 64 input channels the transposed store outweighs the saved padding.
        let g = conv_graph(64, 512, 7, 1, 1);
        assert_eq!(
            plan(&g, conv_node(&g), (6, 16)).unwrap().orientation,
            Orientation::ChannelRows
        );
        // A shallow reduction (3 channels x 9 taps) makes the transposed store too dear.
        let g = conv_graph(3, 32, 112, 3, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        assert_eq!(p.orientation, Orientation::ChannelRows);
        assert!(
            p.winograd.is_none(),
            "3 input channels: the transforms would cost more than they save"
        );
        // 56x56 = 3136 positions fill 16-wide panels exactly.
        let g = conv_graph(64, 64, 56, 5, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        assert_eq!(p.orientation, Orientation::ChannelRows);
        assert_eq!(p.panels(), 11);
    }

    #[test]
    fn blocks_are_balanced_and_fit_the_problem() {
        let g = conv_graph(64, 64, 56, 5, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        // K = 1600; the default kc 184 needs 9 blocks, balanced to 178 each.
        assert_eq!((p.depth, p.kc, p.k_blocks()), (1600, 178, 9));
        assert!(p.nc.is_multiple_of(16) && p.nc * p.p_blocks() >= p.positions);
        assert!(p.nc * (p.p_blocks() - 1) < p.positions, "no empty block");
        assert!(p.slots() <= MAX_SLOTS && p.scratch_bytes() >= p.slots() * p.slot_bytes());
    }

    #[test]
    fn three_by_three_convolutions_use_winograd() {
        let g = conv_graph(64, 64, 56, 3, 1);
        let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
        let w = p
            .winograd
            .as_ref()
            .expect("Winograd for a 3x3 stride-1 convolution with 64 channels");
        assert_eq!((w.tiles_h, w.tiles_w, w.padded_w), (28, 28, 58));
        assert!(p.nc.is_multiple_of(16) && p.p_blocks() * p.nc >= w.tiles());
        // The window holds every row a block of tiles reads.
        assert!(w.window_rows >= 2 * ((p.nc - 1) / w.tiles_w + 2).min(w.tiles_h) + 2);
        // Strided and 1x1 convolutions do not qualify.
        let g = conv_graph(64, 64, 56, 1, 1);
        assert!(plan(&g, conv_node(&g), (6, 16)).unwrap().winograd.is_none());
    }

    #[test]
    fn weights_pack_tap_major_with_zero_padding() {
        // M = 3 channels, C = 2, 1 tap; panel width 2: panels [0,1] and [2,pad].
        let mut g = Graph::new("w");
        let x = g.add_input(TensorType::f32([1, 2, 4, 4]), "x");
        let w = g.add_constant("w", Tensor::f32([3, 2, 1, 1], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![0, 0],
            pads_end: vec![0, 0],
            groups: 1,
        };
        let y = g.push1("conv", Op::Conv(geometry), &[x, w]).unwrap();
        g.outputs.push(y);
        let p = plan(&g, conv_node(&g), (2, 16)).unwrap();
        assert_eq!(p.orientation, Orientation::ChannelRows);
        let floats: Vec<f32> = p
            .pack_weights(&constant_weights(&g, conv_node(&g)).unwrap())
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Panel 0: kk=0 -> (w[0][0], w[1][0]), kk=1 -> (w[0][1], w[1][1]); panel 1 padded.
        assert_eq!(floats, vec![1.0, 3.0, 2.0, 4.0, 5.0, 0.0, 6.0, 0.0]);
    }

    #[test]
    fn depthwise_direct_and_odd_broadcasts() {
        let g = conv_graph(8, 8, 10, 3, 8);
        assert!(plan(&g, conv_node(&g), (6, 16)).is_none(), "depthwise stays direct");
        let mut g = conv_graph(8, 16, 10, 3, 1);
        g.nodes.iter_mut().for_each(|n| {
            if matches!(n.op, Op::Conv(_)) {
                n.schedule.kernel = "direct".into();
            }
        });
        assert!(
            plan(&g, conv_node(&g), (6, 16)).is_none(),
            "the schedule's choice is kept"
        );

        // A residual of the output's shape is addressed per tile; a [1,1,H,1] operand is not.
        for (shape, per_tile) in [
            (vec![1, 16, 10, 10], true),
            (vec![1, 16, 1, 1], true),
            (vec![1, 1, 10, 1], false),
        ] {
            let mut g = conv_graph(8, 16, 10, 3, 1);
            let operand = g.add_input(TensorType::f32(shape.clone()), "r");
            let conv = g.nodes.iter_mut().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
            conv.inputs.push(operand);
            conv.epilogue = vec![EpilogueStep::Binary {
                func: BinaryFn::Add,
                operand: 2,
            }];
            let p = plan(&g, conv_node(&g), (6, 16)).unwrap();
            assert_eq!(p.tile_steps.is_some(), per_tile, "operand {shape:?}");
        }
    }

    #[test]
    fn few_channel_training_convs_take_winograd_where_inference_ones_do_not() {
        // resnet_tiny's first stage at batch 64: 16 -> 16 channels, 3x3, 32x32.
        let training = {
            let mut g = Graph::new("t");
            let x = g.add_input(TensorType::f32([64, 16, 32, 32]), "x");
            let w = g.add_input(TensorType::f32([16, 16, 3, 3]), "w");
            let geometry = ConvGeometry {
                strides: vec![1, 1],
                dilations: vec![1, 1],
                pads_begin: vec![1, 1],
                pads_end: vec![1, 1],
                groups: 1,
            };
            let y = g.push1("conv", Op::Conv(geometry), &[x, w]).unwrap();
            g.outputs.push(y);
            g
        };
        let p = plan(&training, conv_node(&training), (6, 16)).unwrap();
        assert!(p.runtime_weights && p.winograd.is_some());
        // GoogLeNet's 16 -> 48 at 14x14 with constant weights stays on im2col.
        let g = conv_graph(16, 48, 14, 3, 1);
        assert!(plan(&g, conv_node(&g), (6, 16)).unwrap().winograd.is_none());
    }
}
