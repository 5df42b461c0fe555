//! Direct convolution (`Op::Conv`) over any number of spatial axes, f32.
//!
//! Loop nest: batch, group, blocks of up to 4 output channels, then the output
//! positions axis by axis. Outer axes are split into window segments (see
//! `compute::window`) so their tap ranges are compile-time constants. Along the
//! innermost axis a tile holds, per output channel of the block, up to four f32x4
//! accumulators over consecutive output positions, kept in registers across the
//! whole reduction: kernel taps outside, the group's input channels innermost (one
//! tap per loop body). Interior tiles run in a loop without bounds checks; the few
//! tiles at the row's edges are emitted at known positions, where each lane's tap
//! validity is decided at compile time (invalid lanes read as zero) and stores past
//! the row end are dropped. 1x1 convolutions without stride or padding run as one
//! flat spatial axis, which makes them a plain matrix product.

use cnnc_ir::{ConvGeometry, DType, Op};
use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::{AxisWindow, Segment};
use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, input_flags, load, load_f32x4_strided, mul_add,
    offset_ptr, require_buffers, require_dtype, require_plain_layout, scalar_flags, shuffle_f32x4,
    splat_f32, store, tiled_loop, vector_flags,
};
use super::compute::misrouted;
use super::{CodegenError, KernelCtx};
use crate::microkernel::conv_rows_x86::{self, RowConvSpec};

/// Output channels computed together: each tap's input vectors are reused this often.
const CHANNEL_BLOCK: usize = 4;

/// Innermost kernel axes up to this many taps are unrolled; longer ones loop.
const UNROLL_TAPS: usize = 8;

/// Code-size bound: channel loops one conv may emit (ordinary layers need < 500).
const MAX_TAP_BODIES: usize = 20_000;

/// Input vectors one loop body may load at once without spilling accumulators.
const MAX_LIVE_INPUTS: usize = 4;

/// Vector accumulators per output channel for a block of `channels`, chosen to keep
/// accumulators + input vectors + one weight splat within x86's 16 xmm registers.
fn vectors_per_channel(channels: usize) -> usize {
    match channels {
        4 => 2,
        3 => 3,
        _ => 4,
    }
}

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::Conv(geometry) = &k.node.op else {
        return Err(misrouted(k, "conv"));
    };
    require_plain_layout(k)?;
    require_buffers(k, 2, 3, 1)?;
    let x_ty = k.graph.ty(k.node.inputs[0]);
    let w_ty = k.graph.ty(k.node.inputs[1]);
    let y_ty = k.graph.ty(k.node.outputs[0]);
    require_dtype(k, "input", x_ty, DType::F32)?;
    require_dtype(k, "weight", w_ty, DType::F32)?;
    require_dtype(k, "output", y_ty, DType::F32)?;
    if let Some(&bias) = k.node.inputs.get(2) {
        require_dtype(k, "bias", k.graph.ty(bias), DType::F32)?;
    }
    if let Some(spec) = RowConvSpec::of_node(k.graph, k.node)
        && let Some(code) = conv_rows_x86::import(k.b.func, &spec)
    {
        let (x_image, y_image) = (x_ty.shape[1..].iter().product::<usize>(), y_ty.shape[1..].iter().product::<usize>());
        let batch = x_ty.shape[0];
        let bias = k.inputs.get(2).copied().unwrap_or_else(|| k.b.ins().iconst(I64, 0));
        let (x, w, y) = (k.inputs[0], k.inputs[1], k.outputs[0]);
        counted_loop(k.b, batch, vec![], |b, n, _| {
            let x_n = index_ptr(b, x, n, ConvPlan::bytes(x_image));
            let y_n = index_ptr(b, y, n, ConvPlan::bytes(y_image));
            b.ins().call(code, &[x_n, w, y_n, bias]);
            vec![]
        });
        return Ok(());
    }
    let plan = ConvPlan::new(&x_ty.shape, &w_ty.shape, &y_ty.shape, geometry)
        .map_err(|e| CodegenError(format!("conv node '{}': {e}", k.node.name)))?;
    let bodies = plan.emitted_tap_bodies();
    if bodies > MAX_TAP_BODIES {
        return Err(CodegenError(format!(
            "conv node '{}': padding and kernel size ({x_ty} * {w_ty}) would need {bodies} specialised tap loops \
             (limit {MAX_TAP_BODIES}); this geometry is not supported",
            k.node.name
        )));
    }
    let plan = ConvPlan {
        weight_flags: input_flags(k, 1, scalar_flags()),
        bias_flags: input_flags(k, 2, scalar_flags()),
        ..plan
    };
    let bias = k.inputs.get(2).copied();
    plan.emit(k.b, k.inputs[0], k.inputs[1], bias, k.outputs[0]);
    Ok(())
}

/// Sizes and strides of one convolution, in elements.
struct ConvPlan {
    batch: usize,
    groups: usize,
    in_per_group: usize,
    out_per_group: usize,
    axes: Vec<AxisWindow>,
    segments: Vec<Vec<Segment>>,
    in_strides: Vec<usize>,
    out_strides: Vec<usize>,
    kernel_strides: Vec<usize>,
    in_plane: usize,
    out_plane: usize,
    kernel_size: usize,
    /// Load flags of the weight and bias (movable when immutable during the call).
    weight_flags: MemFlagsData,
    bias_flags: MemFlagsData,
}

/// The output channels a tile computes and where their data lives.
#[derive(Clone, Copy)]
struct ChannelBlock {
    channels: usize,
    /// Weights of the block's first output channel.
    w: Value,
    bias: Option<Value>,
}

/// A register tile along the innermost axis.
#[derive(Clone, Copy)]
struct Tile {
    vectors: usize,
    /// Input channels the tile's channel loops cover (a slice of the group; set by
    /// `emit_tile`).
    in_channels: usize,
    /// First position of an edge tile (emitted at a known position, lanes checked at
    /// compile time); None for interior tiles, whose lanes all read inside the input.
    edge: Option<usize>,
}

/// A run of tiles along the innermost axis.
#[derive(Clone, Copy, Debug)]
enum RowPiece {
    /// One tile at a known position.
    Edge { start: usize, vectors: usize },
    /// `tiles` full tiles from `start`, in a loop.
    Interior {
        start: usize,
        vectors: usize,
        tiles: usize,
    },
}

/// What one lane of an edge tile needs from one tap.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Lane {
    /// An output whose tap reads inside the input.
    Load,
    /// An output whose tap falls on padding: contributes zero.
    Zero,
    /// Past the row's last output (result dropped); `readable` when its tap still
    /// lies inside the input row, so a whole-vector load may cover it.
    Ignored { readable: bool },
}

/// Input channels per slice: a divisor of the group's count in 8..=32 when there is
/// one (no remainder copy of the tap loops), the whole group when small, else 16.
fn channel_slice(channels: usize) -> usize {
    if channels <= 32 {
        return channels.max(1);
    }
    (8..=32)
        .rev()
        .find(|&d| channels.is_multiple_of(d))
        .unwrap_or(16)
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    cnnc_ir::strides(shape)
}

impl ConvPlan {
    fn new(x: &[usize], w: &[usize], y: &[usize], g: &ConvGeometry) -> Result<ConvPlan, String> {
        let rank = x.len();
        if rank < 3 || w.len() != rank || y.len() != rank {
            return Err(format!(
                "input {x:?}, weight {w:?} and output {y:?} must share a rank >= 3"
            ));
        }
        let spatial = rank - 2;
        if [
            g.strides.len(),
            g.dilations.len(),
            g.pads_begin.len(),
            g.pads_end.len(),
        ] != [spatial; 4]
        {
            return Err(format!(
                "geometry needs {spatial} strides, dilations and pads"
            ));
        }
        let groups = g.groups;
        if groups == 0
            || !x[1].is_multiple_of(groups)
            || !w[0].is_multiple_of(groups)
            || w[1] * groups != x[1]
            || y[1] != w[0]
            || y[0] != x[0]
        {
            return Err(format!(
                "input {x:?}, weight {w:?}, output {y:?} disagree for groups={groups}"
            ));
        }
        let mut axes = Vec::with_capacity(spatial);
        for i in 0..spatial {
            let axis = AxisWindow::conv_axis(g, x, w, y, i);
            if axis.kernel == 0 || axis.stride == 0 || axis.dilation == 0 {
                return Err(format!("axis {i}: zero kernel size, stride or dilation"));
            }
            axes.push(axis);
        }
        let pointwise = axes.iter().all(|a| {
            a.kernel == 1
                && a.stride == 1
                && a.pad_begin == 0
                && a.pad_end == 0
                && a.input == a.output
        });
        let (in_sp, out_sp, k_sp): (Vec<usize>, Vec<usize>, Vec<usize>) =
            if pointwise && spatial > 1 {
                let plane: usize = x[2..].iter().product();
                axes = vec![AxisWindow {
                    input: plane,
                    output: plane,
                    kernel: 1,
                    stride: 1,
                    dilation: 1,
                    pad_begin: 0,
                    pad_end: 0,
                }];
                (vec![plane], vec![plane], vec![1])
            } else {
                (x[2..].to_vec(), y[2..].to_vec(), w[2..].to_vec())
            };
        let segments = axes.iter().map(AxisWindow::segments).collect();
        Ok(ConvPlan {
            batch: x[0],
            groups,
            in_per_group: w[1],
            out_per_group: w[0] / groups,
            axes,
            segments,
            in_strides: row_major_strides(&in_sp),
            out_strides: row_major_strides(&out_sp),
            kernel_strides: row_major_strides(&k_sp),
            in_plane: in_sp.iter().product(),
            out_plane: out_sp.iter().product(),
            kernel_size: k_sp.iter().product(),
            weight_flags: scalar_flags(),
            bias_flags: scalar_flags(),
        })
    }

    fn bytes(elements: usize) -> i64 {
        elements as i64 * F32_BYTES
    }

    fn emit(&self, b: &mut FunctionBuilder, x: Value, w: Value, bias: Option<Value>, y: Value) {
        let channels = self.groups * self.in_per_group;
        let out_channels = self.groups * self.out_per_group;
        let x_batch = Self::bytes(channels * self.in_plane);
        let y_batch = Self::bytes(out_channels * self.out_plane);
        counted_loop(b, self.batch, vec![], |b, n, _| {
            let x_n = index_ptr(b, x, n, x_batch);
            let y_n = index_ptr(b, y, n, y_batch);
            counted_loop(b, self.groups, vec![], |b, g, _| {
                let x_g = index_ptr(b, x_n, g, Self::bytes(self.in_per_group * self.in_plane));
                let w_g = index_ptr(
                    b,
                    w,
                    g,
                    Self::bytes(self.out_per_group * self.in_per_group * self.kernel_size),
                );
                let y_g = index_ptr(b, y_n, g, Self::bytes(self.out_per_group * self.out_plane));
                let bias_g = bias.map(|p| index_ptr(b, p, g, Self::bytes(self.out_per_group)));
                self.emit_group(b, x_g, w_g, bias_g, y_g);
                vec![]
            });
            vec![]
        });
    }

    fn emit_group(
        &self,
        b: &mut FunctionBuilder,
        x: Value,
        w: Value,
        bias: Option<Value>,
        y: Value,
    ) {
        let block = CHANNEL_BLOCK.min(self.out_per_group.max(1));
        let w_step = Self::bytes(block * self.in_per_group * self.kernel_size);
        let y_step = Self::bytes(block * self.out_plane);
        let (_, rest) = tiled_loop(b, self.out_per_group, block, vec![], |b, i, _| {
            let cb = ChannelBlock {
                channels: block,
                w: index_ptr(b, w, i, w_step),
                bias: bias.map(|p| index_ptr(b, p, i, Self::bytes(block))),
            };
            let y_block = index_ptr(b, y, i, y_step);
            self.emit_positions(b, &cb, 0, x, y_block, &mut Vec::new());
            vec![]
        });
        if rest > 0 {
            let first = self.out_per_group - rest;
            let cb = ChannelBlock {
                channels: rest,
                w: offset_ptr(
                    b,
                    w,
                    Self::bytes(first * self.in_per_group * self.kernel_size),
                ),
                bias: bias.map(|p| offset_ptr(b, p, Self::bytes(first))),
            };
            let y_block = offset_ptr(b, y, Self::bytes(first * self.out_plane));
            self.emit_positions(b, &cb, 0, x, y_block, &mut Vec::new());
        }
    }

    /// Output positions of axis `axis` and the axes inside it. `x_origin` points at the
    /// window origin of the enclosing axes' positions (it may lie outside the buffer,
    /// never dereferenced there); `taps` holds the tap ranges fixed by those axes.
    fn emit_positions(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        axis: usize,
        x_origin: Value,
        y: Value,
        taps: &mut Vec<(usize, usize)>,
    ) {
        if axis + 1 == self.axes.len() {
            self.emit_row(b, cb, x_origin, y, taps);
            return;
        }
        let a = self.axes[axis];
        let in_stride = Self::bytes(self.in_strides[axis]);
        let out_stride = Self::bytes(self.out_strides[axis]);
        for seg in &self.segments[axis] {
            let x0 = offset_ptr(b, x_origin, a.origin(seg.start) * in_stride);
            let y0 = offset_ptr(b, y, seg.start as i64 * out_stride);
            taps.push((seg.tap_begin, seg.tap_end));
            counted_loop(b, seg.count, vec![x0, y0], |b, _, c| {
                self.emit_positions(b, cb, axis + 1, c[0], c[1], taps);
                vec![
                    b.ins().iadd_imm_s(c[0], a.stride as i64 * in_stride),
                    b.ins().iadd_imm_s(c[1], out_stride),
                ]
            });
            taps.pop();
        }
    }

    /// How the innermost axis is covered for a block of `channels` output channels:
    /// edge tiles at compile-time positions (per-lane tap validity, partial stores)
    /// around one loop of interior tiles that need no checks.
    fn row_tiles(&self, channels: usize) -> Vec<RowPiece> {
        let a = self.axes[self.axes.len() - 1];
        let out = a.output;
        let vectors = vectors_per_channel(channels);
        let width = vectors * LANES;
        let (lo, hi) = self.segments[self.axes.len() - 1]
            .iter()
            .find(|s| s.tap_begin == 0 && s.tap_end == a.kernel)
            .map_or((0, 0), |s| (s.start, s.start + s.count));
        let mut pieces = Vec::new();
        let mut p = 0;
        while p < lo.min(out) {
            pieces.push(RowPiece::Edge {
                start: p,
                vectors: 1,
            });
            p += LANES;
        }
        if hi > p && (hi - p) / width > 0 {
            let tiles = (hi - p) / width;
            pieces.push(RowPiece::Interior {
                start: p,
                vectors,
                tiles,
            });
            p += tiles * width;
        }
        while p < out {
            let tile_vectors = ((out - p) / LANES).clamp(1, vectors);
            pieces.push(RowPiece::Edge {
                start: p,
                vectors: tile_vectors,
            });
            p += tile_vectors * LANES;
        }
        pieces
    }

    /// Channel loops (tap × input-channel slice bodies) the kernel would emit: a bound
    /// on code size for pathological geometries (huge kernels over huge padding).
    fn emitted_tap_bodies(&self) -> usize {
        let block = CHANNEL_BLOCK.min(self.out_per_group.max(1));
        let mut blocks = vec![block];
        if self.out_per_group % block != 0 {
            blocks.push(self.out_per_group % block);
        }
        let slices = if self.in_per_group % channel_slice(self.in_per_group) != 0 {
            2
        } else {
            1
        };
        let outer: usize = self.segments[..self.axes.len() - 1]
            .iter()
            .map(Vec::len)
            .product();
        let last = self.axes.len() - 1;
        let row = |channels: usize| -> usize {
            self.row_tiles(channels)
                .iter()
                .map(|piece| match *piece {
                    RowPiece::Interior { .. } => self.axes[last].kernel,
                    RowPiece::Edge { start, vectors } => (0..self.axes[last].kernel)
                        .filter(|&t| {
                            (0..vectors * LANES)
                                .any(|lane| self.lane_state(start, lane, t).0 == Lane::Load)
                        })
                        .count(),
                })
                .sum()
        };
        blocks
            .iter()
            .map(|&c| row(c))
            .sum::<usize>()
            .saturating_mul(outer)
            .saturating_mul(slices)
    }

    /// The innermost axis, tile by tile (see `row_tiles`).
    fn emit_row(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        x_origin: Value,
        y: Value,
        taps: &[(usize, usize)],
    ) {
        let a = self.axes[self.axes.len() - 1];
        let at = |b: &mut FunctionBuilder, p: usize| {
            (
                offset_ptr(b, x_origin, a.origin(p) * F32_BYTES),
                offset_ptr(b, y, Self::bytes(p)),
            )
        };
        for piece in self.row_tiles(cb.channels) {
            match piece {
                RowPiece::Edge { start, vectors } => {
                    let (xp, yp) = at(b, start);
                    self.emit_tile(
                        b,
                        cb,
                        Tile {
                            vectors,
                            in_channels: 0,
                            edge: Some(start),
                        },
                        xp,
                        yp,
                        taps,
                    );
                }
                RowPiece::Interior {
                    start,
                    vectors,
                    tiles,
                } => {
                    let (xp, yp) = at(b, start);
                    let width = vectors * LANES;
                    counted_loop(b, tiles, vec![xp, yp], |b, _, c| {
                        self.emit_tile(
                            b,
                            cb,
                            Tile {
                                vectors,
                                in_channels: 0,
                                edge: None,
                            },
                            c[0],
                            c[1],
                            taps,
                        );
                        vec![
                            b.ins().iadd_imm_s(c[0], Self::bytes(width * a.stride)),
                            b.ins().iadd_imm_s(c[1], Self::bytes(width)),
                        ]
                    });
                }
            }
        }
    }

    /// What lane `lane` of an edge tile at `p0` needs for tap `t`, and the input
    /// index (within the row) it reads.
    fn lane_state(&self, p0: usize, lane: usize, t: usize) -> (Lane, i64) {
        let a = self.axes[self.axes.len() - 1];
        let q = p0 + lane;
        let i = a.origin(q) + (t * a.dilation) as i64;
        let inside = i >= 0 && i < a.input as i64;
        let state = match (q < a.output, inside) {
            (true, true) => Lane::Load,
            (true, false) => Lane::Zero,
            (false, readable) => Lane::Ignored { readable },
        };
        (state, i)
    }

    /// One register tile: `cb.channels` output channels × `tile.vectors` f32x4 of
    /// consecutive positions.
    fn emit_tile(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        tile: Tile,
        x_origin: Value,
        y: Value,
        taps: &[(usize, usize)],
    ) {
        let mut accs = Vec::with_capacity(cb.channels * tile.vectors);
        for r in 0..cb.channels {
            let init = match cb.bias {
                Some(p) => {
                    let v = load(b, F32, self.bias_flags, p, Self::bytes(r));
                    b.ins().splat(F32X4, v)
                }
                None => splat_f32(b, 0.0),
            };
            accs.extend(std::iter::repeat_n(init, tile.vectors));
        }
        // Input channels in slices, taps inside each slice: a slice's weights (4 output
        // channels × slice × kernel) stay in L1 across its tap loops, which a single
        // channel loop per tap would stream from L2 again for every tap.
        let slice = channel_slice(self.in_per_group);
        let slices = self.in_per_group / slice;
        let rest = self.in_per_group - slices * slice;
        let mut carried = vec![x_origin, cb.w];
        carried.extend(accs);
        let x_slice = Self::bytes(slice * self.in_plane);
        let w_slice = Self::bytes(slice * self.kernel_size);
        let done = counted_loop(b, slices, carried, |b, _, c| {
            let tile = Tile {
                in_channels: slice,
                ..tile
            };
            let accs = self.emit_taps(b, cb, tile, 0, c[0], c[1], c[2..].to_vec(), taps);
            let mut next = vec![
                b.ins().iadd_imm_s(c[0], x_slice),
                b.ins().iadd_imm_s(c[1], w_slice),
            ];
            next.extend(accs);
            next
        });
        let mut accs = done[2..].to_vec();
        if rest > 0 {
            let tile = Tile {
                in_channels: rest,
                ..tile
            };
            accs = self.emit_taps(b, cb, tile, 0, done[0], done[1], accs, taps);
        }
        let out = self.axes[self.axes.len() - 1].output;
        for r in 0..cb.channels {
            for v in 0..tile.vectors {
                let acc = accs[r * tile.vectors + v];
                let offset = Self::bytes(r * self.out_plane + v * LANES);
                let lanes = tile
                    .edge
                    .map_or(LANES, |p0| out.saturating_sub(p0 + v * LANES).min(LANES));
                if lanes == LANES {
                    store(b, vector_flags(), acc, y, offset);
                } else {
                    for e in 0..lanes {
                        let x = b.ins().extractlane(acc, e as u8);
                        store(b, scalar_flags(), x, y, offset + Self::bytes(e));
                    }
                }
            }
        }
    }

    /// Accumulates the taps of kernel axes `axis..`, each over all input channels of
    /// the group. The channel loop is innermost: one tap per loop body keeps only that
    /// tap's input vectors live (Cranelift issues a block's loads before its arithmetic),
    /// and its long trip count amortises the loop overhead.
    #[allow(clippy::too_many_arguments)]
    fn emit_taps(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        tile: Tile,
        axis: usize,
        x: Value,
        w: Value,
        accs: Vec<Value>,
        taps: &[(usize, usize)],
    ) -> Vec<Value> {
        let a = self.axes[axis];
        let x_tap = Self::bytes(a.dilation * self.in_strides[axis]);
        let w_tap = Self::bytes(self.kernel_strides[axis]);
        let innermost = axis + 1 == self.axes.len();
        if let (true, Some(p0)) = (innermost, tile.edge) {
            // Every tap some lane reads, with its per-lane validity.
            let mut accs = accs;
            for t in 0..a.kernel {
                let valid: Vec<(Lane, i64)> = (0..tile.vectors * LANES)
                    .map(|lane| self.lane_state(p0, lane, t))
                    .collect();
                if valid.iter().any(|&(l, _)| l == Lane::Load) {
                    let xt = offset_ptr(b, x, t as i64 * x_tap);
                    let wt = offset_ptr(b, w, t as i64 * w_tap);
                    accs = self.emit_channels(b, cb, tile, xt, wt, accs, Some(&valid));
                }
            }
            return accs;
        }
        let (begin, end) = if innermost { (0, a.kernel) } else { taps[axis] };
        // Unrolled taps share a block when there is no channel loop to separate them.
        let unroll = innermost
            && end - begin <= UNROLL_TAPS
            && (tile.in_channels > 1 || (end - begin) * tile.vectors <= MAX_LIVE_INPUTS);
        if unroll {
            let mut accs = accs;
            for t in begin..end {
                let xt = offset_ptr(b, x, t as i64 * x_tap);
                let wt = offset_ptr(b, w, t as i64 * w_tap);
                accs = self.emit_channels(b, cb, tile, xt, wt, accs, None);
            }
            return accs;
        }
        let x0 = offset_ptr(b, x, begin as i64 * x_tap);
        let w0 = offset_ptr(b, w, begin as i64 * w_tap);
        let mut carried = vec![x0, w0];
        carried.extend(accs);
        let done = counted_loop(b, end - begin, carried, |b, _, c| {
            let accs = if innermost {
                self.emit_channels(b, cb, tile, c[0], c[1], c[2..].to_vec(), None)
            } else {
                self.emit_taps(b, cb, tile, axis + 1, c[0], c[1], c[2..].to_vec(), taps)
            };
            let mut next = vec![
                b.ins().iadd_imm_s(c[0], x_tap),
                b.ins().iadd_imm_s(c[1], w_tap),
            ];
            next.extend(accs);
            next
        });
        done[2..].to_vec()
    }

    /// One tap over every input channel of the group; `valid` gives each lane's needs
    /// in an edge tile (None: every lane loads).
    #[allow(clippy::too_many_arguments)]
    fn emit_channels(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        tile: Tile,
        x: Value,
        w: Value,
        accs: Vec<Value>,
        valid: Option<&[(Lane, i64)]>,
    ) -> Vec<Value> {
        let in_channel_step = Self::bytes(self.in_plane);
        let w_channel_step = Self::bytes(self.kernel_size);
        let mut carried = vec![x, w];
        carried.extend(accs);
        let done = counted_loop(b, tile.in_channels, carried, |b, _, c| {
            let accs = self.emit_tap(b, cb, tile, c[0], c[1], c[2..].to_vec(), valid);
            let mut next = vec![
                b.ins().iadd_imm_s(c[0], in_channel_step),
                b.ins().iadd_imm_s(c[1], w_channel_step),
            ];
            next.extend(accs);
            next
        });
        done[2..].to_vec()
    }

    /// One tap of one input channel: loads the tile's inputs once and each output
    /// channel's weight once. Lanes reading padding are zero.
    #[allow(clippy::too_many_arguments)]
    fn emit_tap(
        &self,
        b: &mut FunctionBuilder,
        cb: &ChannelBlock,
        tile: Tile,
        x: Value,
        w: Value,
        mut accs: Vec<Value>,
        valid: Option<&[(Lane, i64)]>,
    ) -> Vec<Value> {
        let stride = self.axes[self.axes.len() - 1].stride;
        let inputs: Vec<Option<Value>> = (0..tile.vectors)
            .map(|v| {
                let offset = Self::bytes(v * LANES * stride);
                match valid {
                    None => Some(load_f32x4_strided(b, vector_flags(), x, offset, stride)),
                    Some(lanes) => {
                        self.edge_input(b, x, offset, &lanes[v * LANES..(v + 1) * LANES])
                    }
                }
            })
            .collect();
        let w_channel = Self::bytes(self.in_per_group * self.kernel_size);
        for r in 0..cb.channels {
            let scalar = load(b, F32, self.weight_flags, w, r as i64 * w_channel);
            let wv = b.ins().splat(F32X4, scalar);
            for (v, input) in inputs.iter().enumerate() {
                if let Some(input) = *input {
                    let i = r * tile.vectors + v;
                    accs[i] = mul_add(b, accs[i], input, wv);
                }
            }
        }
        accs
    }

    /// One input vector of an edge tile (None when no lane needs data). Prefers one
    /// vector load: whole when every lane may read, or shifted in from a neighbouring
    /// in-row window with zeros filling the padding lanes (one `palignr`); otherwise
    /// gathers the lanes that load into a zero vector.
    fn edge_input(
        &self,
        b: &mut FunctionBuilder,
        x: Value,
        offset: i64,
        lanes: &[(Lane, i64)],
    ) -> Option<Value> {
        let a = self.axes[self.axes.len() - 1];
        let stride = a.stride;
        let loads: Vec<usize> = (0..LANES).filter(|&e| lanes[e].0 == Lane::Load).collect();
        let (&first, &last) = (loads.first()?, loads.last()?);
        let readable =
            |e: usize| matches!(lanes[e].0, Lane::Load | Lane::Ignored { readable: true });
        if (0..LANES).all(readable) {
            return Some(load_f32x4_strided(b, vector_flags(), x, offset, stride));
        }
        let in_row = |start: i64| start >= 0 && start + LANES as i64 <= a.input as i64;
        let ignored = |e: usize| matches!(lanes[e].0, Lane::Ignored { .. });
        if stride == 1 && loads.len() == last - first + 1 {
            let end = last + 1;
            // Window starting at the first loading lane, shifted up by `first` lanes.
            if in_row(lanes[first].1) && (end..LANES).all(ignored) {
                let window = load(b, F32X4, vector_flags(), x, offset + Self::bytes(first));
                let zero = splat_f32(b, 0.0);
                let sel = |e: usize| (LANES - first + e) as u8;
                return Some(shuffle_f32x4(
                    b,
                    zero,
                    window,
                    [sel(0), sel(1), sel(2), sel(3)],
                ));
            }
            // Window ending at the last loading lane, shifted down.
            if in_row(lanes[last].1 + 1 - LANES as i64) && (0..first).all(ignored) {
                let window = load(
                    b,
                    F32X4,
                    vector_flags(),
                    x,
                    offset + Self::bytes(end) - Self::bytes(LANES),
                );
                let zero = splat_f32(b, 0.0);
                let sel = |e: usize| (LANES - end + e) as u8;
                return Some(shuffle_f32x4(
                    b,
                    window,
                    zero,
                    [sel(0), sel(1), sel(2), sel(3)],
                ));
            }
        }
        let mut vec = splat_f32(b, 0.0);
        for &e in &loads {
            let s = load(b, F32, scalar_flags(), x, offset + Self::bytes(e * stride));
            vec = b.ins().insertlane(vec, s, e as u8);
        }
        Some(vec)
    }
}
