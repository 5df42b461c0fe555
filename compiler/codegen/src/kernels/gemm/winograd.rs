//! 3x3 stride-1 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016), on the GEMM microkernel.
//!
//! The output is cut into 2x2 tiles; tile t reads the 4x4 input patch `d` at
//! (2·ty − pad_h, 2·tx − pad_w). With `U = G g Gᵀ` (each 3x3 filter, 4x4 after the
//! transform, computed at compile time) and `V = Bᵀ d B`, the tile is
//! `Y = Aᵀ [Σ_ic U[oc][ic] ⊙ V[ic]] A`: the sum is 16 independent matrix products
//! `M_ξ = U_ξ [M x C] · V_ξ [C x tiles]`, one per point ξ of the 4x4 transform, with
//! 16 multiply-adds per tile and channel pair instead of 36 (2.25x fewer).
//!
//! A task handles a block of tiles (and a group of output-channel panels):
//! 1. copy the input rows the block reads, zero-padded, into its slot (the transforms
//!    then need no bounds checks), each row split into its even and odd columns
//!    (`[even | odd]`): tile tx's patch starts at column 2·tx, so a patch column of
//!    four consecutive tiles is then four consecutive floats (one plain load instead of
//!    two loads and a shuffle per vector);
//! 2. input transform: for each quad of tiles in one tile row and each input channel,
//!    16 f32x4 (one lane per tile) written straight into the B panels of the 16
//!    products (`[ξ][tile panel][ic][nr]`); other quads tile by tile;
//! 3. the 16 products on the microkernel into `[ξ][channel][tile]`;
//! 4. output transform per channel and quad of tiles, epilogue, store (vectors for
//!    quads whose 2x2 outputs are all inside the image, else element by element).
//!
//! The transforms add and subtract with factors of ±1 and ½ only, so the result
//! differs from direct summation by a few units in the last place of the operands.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I8};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::{for_range, int, repeat, scaled, unflatten};
use crate::kernels::CodegenError;
use crate::kernels::compute::{LANES, counted_loop, scalar_flags, shuffle_f32x4, vector_flags};
use crate::kernels::conv_gemm::{ConvGemmPlan, TaskFrame};

const F32_BYTES: i64 = 4;
/// Points of the transformed 4x4 tile.
const POINTS: usize = 16;
/// Bytes of scratch a block's working set should stay under (Zen 5's L2 is 1 MiB).
/// Larger blocks copy fewer halo rows into their windows: 768 KiB against 384 KiB made
/// the 3x3 layers of resnet18 and densenet121 2-6% faster (`scripts/conv_layers.py`,
/// one thread, same run).
const BLOCK_BYTES: usize = 768 * 1024;

/// The tile geometry of one Winograd convolution.
#[derive(Clone, Debug, PartialEq)]
pub struct WinogradShape {
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    pub tiles_h: usize,
    pub tiles_w: usize,
    /// Rows of the padded input window a block copies (the most any block needs).
    pub window_rows: usize,
    /// Floats per padded row: every column a tile reads (even: the row's two halves,
    /// even and odd columns, are `padded_w / 2` floats each).
    pub padded_w: usize,
}

impl WinogradShape {
    pub fn tiles(&self) -> usize {
        self.tiles_h * self.tiles_w
    }
}

/// The shape when a convolution is a 3x3, stride 1, dilation 1, single-group 2-D one
/// (else None); `window_rows` is set by `block_tiles`.
#[allow(clippy::too_many_arguments)]
pub fn shape(
    input: &[usize],
    output: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: &[usize],
    groups: usize,
    in_channels: usize,
    out_channels: usize,
) -> Option<WinogradShape> {
    let square_3x3 = kernel == [3, 3] && strides == [1, 1] && dilations == [1, 1];
    if !square_3x3 || groups != 1 || input.len() != 2 || output.len() != 2 {
        return None;
    }
    if in_channels == 0 || out_channels == 0 || output[0] == 0 || output[1] == 0 {
        return None;
    }
    let (tiles_h, tiles_w) = (output[0].div_ceil(2), output[1].div_ceil(2));
    Some(WinogradShape {
        in_h: input[0],
        in_w: input[1],
        out_h: output[0],
        out_w: output[1],
        pad_h: pads[0],
        pad_w: pads[1],
        tiles_h,
        tiles_w,
        window_rows: 0,
        padded_w: 2 * tiles_w + 2,
    })
}

/// Tiles per block: a multiple of `nr` whose transformed input and products fit
/// `BLOCK_BYTES`, balanced over the blocks.
pub fn block_tiles(w: &WinogradShape, in_channels: usize, padded_channels: usize, nr: usize) -> usize {
    let per_tile = POINTS * (in_channels + padded_channels) * 4;
    let fit = (BLOCK_BYTES / per_tile / nr * nr).max(nr);
    let tiles = w.tiles();
    let fit = fit.min(tiles.div_ceil(nr) * nr);
    let blocks = tiles.div_ceil(fit);
    tiles.div_ceil(blocks).div_ceil(nr) * nr
}

impl WinogradShape {
    /// Sizes the input window for blocks of `block` tiles (at least 1).
    pub fn set_block(&mut self, block: usize) {
        // A block spans at most this many tile rows, each 2 input rows plus a 2-row halo.
        let tile_rows = ((block.max(1) - 1) / self.tiles_w + 2).min(self.tiles_h);
        self.window_rows = 2 * tile_rows + 2;
    }
}

/// Multiply-adds (padded) of the 16 products, for comparing with im2col.
pub fn product_macs(w: &WinogradShape, in_channels: usize, padded_channels: usize, nr: usize) -> usize {
    POINTS * padded_channels * in_channels * w.tiles().div_ceil(nr) * nr
}

fn window_bytes(plan: &ConvGemmPlan, w: &WinogradShape) -> usize {
    (plan.in_channels * w.window_rows * w.padded_w * 4).div_ceil(64) * 64
}

fn padded_channels(plan: &ConvGemmPlan) -> usize {
    plan.panels() * plan.mr
}

/// Slot layout: padded input window, V (`[ξ][tile panel][ic][nr]`), M (`[ξ][channel][tile]`).
pub fn slot_bytes(plan: &ConvGemmPlan, w: &WinogradShape) -> usize {
    window_bytes(plan, w) + POINTS * v_point_stride(plan, w) + POINTS * m_point_stride(plan)
}

/// Bytes from one point's V to the next: its panels, plus one cache line so that the 16
/// points' lines of one channel (written together by the input transform) do not all
/// fall into one L1 set when a point's panels are a multiple of 4 KiB.
fn v_point_stride(plan: &ConvGemmPlan, _w: &WinogradShape) -> usize {
    plan.nc * plan.in_channels * 4 + 64
}

/// Bytes from one point's M to the next (skewed by a line as `v_point_stride`: the
/// output transform reads the 16 points of a channel together).
fn m_point_stride(plan: &ConvGemmPlan) -> usize {
    padded_channels(plan) * plan.nc * 4 + 64
}

/// `U = G g Gᵀ` per filter, in A panels: `[ξ][panel][ic][mr]` (points `u_point_stride` apart), channels past M zero.
pub fn pack_weights(plan: &ConvGemmPlan, weights: &[f32]) -> Vec<u8> {
    const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];
    let (c, m, mr, panels) = (plan.in_channels, plan.out_channels, plan.mr, plan.panels());
    // transformed[(oc * c + ic) * 16 + ξ]
    let mut transformed = vec![0f32; m * c * POINTS];
    for oc in 0..m {
        for ic in 0..c {
            let g = |r: usize, s: usize| weights.get(((oc * c + ic) * 3 + r) * 3 + s).copied().unwrap_or(0.0) as f64;
            for (i, gi) in G.iter().enumerate() {
                for (j, gj) in G.iter().enumerate() {
                    let mut u = 0.0;
                    for (r, &gir) in gi.iter().enumerate() {
                        for (s, &gjs) in gj.iter().enumerate() {
                            u += gir * g(r, s) * gjs;
                        }
                    }
                    transformed[(oc * c + ic) * POINTS + i * 4 + j] = u as f32;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(packed_weight_bytes(plan));
    for xi in 0..POINTS {
        out.resize(xi * u_point_stride(plan), 0);
        for panel in 0..panels {
            for ic in 0..c {
                for r in 0..mr {
                    let oc = panel * mr + r;
                    let v = if oc < m {
                        transformed[(oc * c + ic) * POINTS + xi]
                    } else {
                        0.0
                    };
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Bytes of the transformed weights (`pack_weights`' layout).
pub fn packed_weight_bytes(plan: &ConvGemmPlan) -> usize {
    POINTS * u_point_stride(plan)
}

/// Bytes from one point's U to the next: its panels, plus one cache line, so that the
/// 16 points of a filter (written together when the weights are packed at run time)
/// do not all fall into one L1 set when a point's panels are a multiple of 4 KiB (they
/// did at 512 channels: the run-time transform took half as long as the products).
fn u_point_stride(plan: &ConvGemmPlan) -> usize {
    plan.panels() * plan.in_channels * plan.mr * 4 + 64
}

/// Cycles to transform and pack one filter at run time, charged against Winograd's gain
/// when the weights are a graph input: ~35 measured (512 -> 512 channels at 7x7, batch
/// 16: the transform was 6.3% of the node's perf samples, ~2.3 ms for 262144 filters).
pub const RUNTIME_TRANSFORM_CYCLES_PER_FILTER: usize = 36;

/// `pack_weights` at run time, for weights that are a graph input or a node's output
/// (training graphs: each step's parameters, and the flipped filters of input
/// gradients): `w` is `[M, C, 3, 3]`, `dst` receives `[ξ][panel][ic][mr]`, the rows of
/// the last panel past M zeroed (the scratch holds other nodes' data). Scalar, filter by
/// filter, in f32: a few percent of the products' time at 512 channels.
pub fn emit_pack_weights(b: &mut FunctionBuilder, plan: &ConvGemmPlan, w: Value, dst: Value) {
    let (c, m, mr) = (plan.in_channels, plan.out_channels, plan.mr);
    let panel_bytes = (c * mr) as i64 * F32_BYTES;
    let point_bytes = u_point_stride(plan) as i64;
    let filter_bytes = 9 * F32_BYTES;
    let channel_filters_bytes = c as i64 * filter_bytes;
    let row_bytes = mr as i64 * F32_BYTES;
    let store = |b: &mut FunctionBuilder, value: Value, base: Value, offset: i64| match i32::try_from(offset) {
        Ok(offset) => {
            b.ins().store(MemFlagsData::trusted(), value, base, offset);
        }
        Err(_) => {
            let at = b.ins().iadd_imm_s(base, offset);
            b.ins().store(MemFlagsData::trusted(), value, at, 0);
        }
    };
    // Panel by panel, input channel by input channel, the panel's `mr` filters together:
    // each point then gets `mr` consecutive floats, one line written whole after
    // another (output channel by output channel, every store went to a line of its own
    // and the panel's 16 point columns did not stay in L1).
    let emit_panel = |b: &mut FunctionBuilder, src: Value, panel_dst: Value, rows: usize| {
        counted_loop(b, c, vec![src, panel_dst], |b, _, at| {
            for r in 0..mr {
                if r < rows {
                    let g: Vec<Value> = (0..9)
                        .map(|k| {
                            let offset = r as i64 * channel_filters_bytes + k * F32_BYTES;
                            b.ins().load(F32, scalar_flags(), at[0], offset as i32)
                        })
                        .collect();
                    let u = filter_transform(b, &g);
                    for (xi, &value) in u.iter().enumerate() {
                        store(b, value, at[1], xi as i64 * point_bytes + r as i64 * F32_BYTES);
                    }
                } else {
                    let zero = b.ins().f32const(0.0);
                    for xi in 0..POINTS {
                        store(b, zero, at[1], xi as i64 * point_bytes + r as i64 * F32_BYTES);
                    }
                }
            }
            vec![
                b.ins().iadd_imm_s(at[0], filter_bytes),
                b.ins().iadd_imm_s(at[1], row_bytes),
            ]
        });
    };
    let full_panels = m / mr;
    counted_loop(b, full_panels, vec![], |b, panel, _| {
        let src = scaled(b, w, panel, mr as i64 * channel_filters_bytes);
        let panel_dst = scaled(b, dst, panel, panel_bytes);
        emit_panel(b, src, panel_dst, mr);
        vec![]
    });
    let rows_left = m % mr;
    if rows_left > 0 {
        let src = b.ins().iadd_imm_s(w, (full_panels * mr) as i64 * channel_filters_bytes);
        let panel_dst = b.ins().iadd_imm_s(dst, full_panels as i64 * panel_bytes);
        emit_panel(b, src, panel_dst, rows_left);
    }
}

/// `U = G g Gᵀ` of one 3x3 filter `g` (row-major), the 16 points ξ = 4·i + j in order.
/// G's rows are (1, 0, 0), (½, ½, ½), (½, −½, ½), (0, 0, 1).
fn filter_transform(b: &mut FunctionBuilder, g: &[Value]) -> Vec<Value> {
    let half = b.ins().f32const(0.5);
    // [g0, ½(g0 + g1 + g2), ½(g0 − g1 + g2), g2]
    let by_g = |b: &mut FunctionBuilder, g0: Value, g1: Value, g2: Value| -> [Value; 4] {
        let outer = b.ins().fadd(g0, g2);
        let plus = b.ins().fadd(outer, g1);
        let minus = b.ins().fsub(outer, g1);
        [g0, b.ins().fmul(plus, half), b.ins().fmul(minus, half), g2]
    };
    // Columns first: t[i][s] = Σ_r G[i][r] g[r][s].
    let columns: Vec<[Value; 4]> = (0..3).map(|s| by_g(b, g[s], g[3 + s], g[6 + s])).collect();
    let mut u = Vec::with_capacity(POINTS);
    for i in 0..4 {
        u.extend(by_g(b, columns[0][i], columns[1][i], columns[2][i]));
    }
    u
}

/// `Bᵀ d B` of a 4x4 patch, element (r, j) of which `load(b, r, j)` returns (F32 or
/// F32X4 lanes), each point ξ handed to `store(b, ξ, value)` as soon as it is computed.
/// Column by column: the column transform (`· B`) of one column of the four rows, then
/// its row transform (`Bᵀ ·`), so that about 8 values are live at a time (16 xmm
/// registers; a row-first order keeps 16 partial sums and spills). Loads repeat (32
/// instead of 16) but fold into the subtractions as memory operands.
fn input_transform(
    b: &mut FunctionBuilder,
    mut load: impl FnMut(&mut FunctionBuilder, usize, usize) -> Value,
    mut store: impl FnMut(&mut FunctionBuilder, usize, Value),
) {
    for j in 0..4 {
        let e: [Value; 4] = std::array::from_fn(|r| match j {
            0 => {
                let (d0, d2) = (load(b, r, 0), load(b, r, 2));
                b.ins().fsub(d0, d2)
            }
            1 => {
                let (d1, d2) = (load(b, r, 1), load(b, r, 2));
                b.ins().fadd(d1, d2)
            }
            2 => {
                let (d2, d1) = (load(b, r, 2), load(b, r, 1));
                b.ins().fsub(d2, d1)
            }
            _ => {
                let (d1, d3) = (load(b, r, 1), load(b, r, 3));
                b.ins().fsub(d1, d3)
            }
        });
        let v0 = b.ins().fsub(e[0], e[2]);
        store(b, j, v0);
        let v1 = b.ins().fadd(e[1], e[2]);
        store(b, 4 + j, v1);
        let v2 = b.ins().fsub(e[2], e[1]);
        store(b, 8 + j, v2);
        let v3 = b.ins().fsub(e[1], e[3]);
        store(b, 12 + j, v3);
    }
}

/// `Aᵀ m A` of the 16 points `load_row(b, i)` returns row by row (row i = points
/// 4i..4i+4): the 2x2 outputs `[y00, y01, y10, y11]`. Rows are folded into the two
/// output rows as they arrive (12 live values instead of 24).
fn output_transform(
    b: &mut FunctionBuilder,
    mut load_row: impl FnMut(&mut FunctionBuilder, usize) -> [Value; 4],
) -> [Value; 4] {
    // Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]].
    let m0 = load_row(b, 0);
    let m1 = load_row(b, 1);
    let mut z0 = [m0[0]; 4];
    let mut z1 = m1;
    for c in 0..4 {
        z0[c] = b.ins().fadd(m0[c], m1[c]);
    }
    let m2 = load_row(b, 2);
    for c in 0..4 {
        z0[c] = b.ins().fadd(z0[c], m2[c]);
        z1[c] = b.ins().fsub(z1[c], m2[c]);
    }
    let m3 = load_row(b, 3);
    for c in 0..4 {
        z1[c] = b.ins().fsub(z1[c], m3[c]);
    }
    let mut y = [z0[0]; 4];
    for (i, z) in [z0, z1].iter().enumerate() {
        let s = b.ins().fadd(z[0], z[1]);
        y[i * 2] = b.ins().fadd(s, z[2]);
        let d = b.ins().fsub(z[1], z[2]);
        y[i * 2 + 1] = b.ins().fsub(d, z[3]);
    }
    y
}

pub fn emit(b: &mut FunctionBuilder, f: &TaskFrame, w: &WinogradShape) -> Result<(), CodegenError> {
    let plan = f.plan;
    let (mr, nr) = (plan.mr as i64, plan.nr as i64);
    let channels = plan.in_channels as i64;
    let block = plan.nc as i64;
    let tiles = w.tiles() as i64;
    let window = f.scratch;
    let v_base = b.ins().iadd_imm_s(window, window_bytes(plan, w) as i64);
    let m_base = b.ins().iadd_imm_s(v_base, (POINTS * v_point_stride(plan, w)) as i64);
    let t0 = f.p_start;
    let all_tiles = int(b, tiles);
    let left = b.ins().isub(all_tiles, t0);
    let block_v = int(b, block);
    let count = b.ins().umin(left, block_v);
    let t_end = b.ins().iadd(t0, count);
    let first_row = b.ins().udiv_imm_u(t0, w.tiles_w as i64);

    emit_window(b, f, w, first_row, t_end, window);

    // Input transform, tile panel by tile panel; a quad's V values are one f32x4 per
    // (ξ, channel). When every quad of a panel is regular, one channel loop transforms
    // them all, so each (ξ, channel) line of the panel is written whole at once (quad by
    // quad, the 16 lines of a channel went back to L2 between the visits of its quads).
    let quads_per_panel = nr / LANES as i64;
    let zero = int(b, 0);
    let row_bytes = w.padded_w as i64 * F32_BYTES;
    let channel_window_bytes = w.window_rows as i64 * row_bytes;
    let v_point_bytes = v_point_stride(plan, w) as i64;
    let v_row_bytes = nr * F32_BYTES;
    let q_ctx = QuadContext {
        w,
        window,
        v_base,
        first_row,
        t0,
        t_end,
        channels,
        nr,
        row_bytes,
        channel_window_bytes,
        v_point_bytes,
        v_row_bytes,
    };
    for_range(b, zero, f.p_panels, |b, panel| {
        let first_quad = b.ins().imul_imm_s(panel, quads_per_panel);
        let quads: Vec<QuadPlace> = (0..quads_per_panel)
            .map(|i| {
                let q = b.ins().iadd_imm_s(first_quad, i);
                quad_place(b, &q_ctx, q)
            })
            .collect();
        let mut all_regular = quads[0].regular;
        for quad in &quads[1..] {
            all_regular = b.ins().band(all_regular, quad.regular);
        }
        let whole = b.create_block();
        let by_quad = b.create_block();
        let done = b.create_block();
        b.ins().brif(all_regular, whole, &[], by_quad, &[]);

        b.switch_to_block(whole);
        b.seal_block(whole);
        let n_channels = int(b, channels);
        let mut carried: Vec<Value> = quads.iter().map(|quad| quad.src).collect();
        carried.push(quads[0].dst);
        repeat(b, n_channels, &carried, |b, ptrs| {
            let (srcs, dst) = ptrs.split_at(ptrs.len() - 1);
            let dst = dst[0];
            let mut next = Vec::with_capacity(ptrs.len());
            for (i, &src) in srcs.iter().enumerate() {
                emit_quad_transform_f32x4(b, &q_ctx, src, dst, i as i64 * LANES as i64 * F32_BYTES);
                next.push(b.ins().iadd_imm_s(src, channel_window_bytes));
            }
            next.push(b.ins().iadd_imm_s(dst, v_row_bytes));
            next
        });
        b.ins().jump(done, &[]);

        b.switch_to_block(by_quad);
        b.seal_block(by_quad);
        for quad in &quads {
            emit_input_quad(b, &q_ctx, quad);
        }
        b.ins().jump(done, &[]);

        b.switch_to_block(done);
        b.seal_block(done);
    });

    // The 16 products: M_ξ[channel rows of the panel][tiles of the tile panel].
    let u_point_bytes = u_point_stride(plan) as i64;
    let u_panel_bytes = channels * mr * F32_BYTES;
    let m_point_bytes = m_point_stride(plan) as i64;
    crate::kernels::compute::counted_loop(b, POINTS, vec![], |b, xi, _| {
        let u_point = scaled(b, f.weights_group, xi, u_point_bytes);
        let v_point = scaled(b, v_base, xi, v_point_bytes);
        let m_point = scaled(b, m_base, xi, m_point_bytes);
        let k = int(b, channels);
        let ldc = int(b, block);
        let fresh = int(b, 0);
        for_range(b, f.panel_lo, f.panel_hi, |b, panel| {
            let a = scaled(b, u_point, panel, u_panel_bytes);
            let c_rows = scaled(b, m_point, panel, mr * block * F32_BYTES);
            let zero = int(b, 0);
            for_range(b, zero, f.p_panels, |b, tp| {
                let v = scaled(b, v_point, tp, channels * nr * F32_BYTES);
                let c = scaled(b, c_rows, tp, nr * F32_BYTES);
                b.ins().call(f.kernel, &[k, a, v, c, ldc, fresh]);
            });
        });
        vec![]
    });

    // Output transform and store, per channel of the task's panels.
    let first_channel = b.ins().imul_imm_s(f.panel_lo, mr);
    let end_channel = b.ins().imul_imm_s(f.panel_hi, mr);
    let out_channels = int(b, plan.out_channels as i64);
    let end_channel = b.ins().umin(end_channel, out_channels);
    let quads = b.ins().imul_imm_s(f.p_panels, quads_per_panel);
    let mut failure = None;
    for_range(b, first_channel, end_channel, |b, oc| {
        let channel = b.ins().iadd(f.group_channel, oc);
        let m_row = scaled(b, m_base, oc, block * F32_BYTES);
        let out_plane = scaled(b, f.out_group, oc, plan.positions as i64 * F32_BYTES);
        let zero = int(b, 0);
        for_range(b, zero, quads, |b, q| {
            if let Err(e) = emit_output_quad(b, f, w, m_row, m_point_bytes, out_plane, channel, q, t_end) {
                failure = Some(e);
            }
        });
    });
    failure.map_or(Ok(()), Err)
}

/// What the input transform of one block's quads shares.
struct QuadContext<'a> {
    w: &'a WinogradShape,
    window: Value,
    v_base: Value,
    first_row: Value,
    t0: Value,
    t_end: Value,
    channels: i64,
    nr: i64,
    row_bytes: i64,
    channel_window_bytes: i64,
    v_point_bytes: i64,
    v_row_bytes: i64,
}

/// Where quad `q` of the block reads and writes, and whether it is regular: its four
/// tiles in one tile row and inside the block (`src` is meaningful only then).
struct QuadPlace {
    regular: Value,
    src: Value,
    dst: Value,
    /// First tile of the quad.
    t: Value,
}

fn quad_place(b: &mut FunctionBuilder, c: &QuadContext, q: Value) -> QuadPlace {
    let w = c.w;
    let quads_per_panel = c.nr / LANES as i64;
    let t = b.ins().imul_imm_s(q, LANES as i64);
    let t = b.ins().iadd(c.t0, t);
    // V address of (ξ = 0, channel 0) for this quad: its panel, its lane offset.
    let panel = b.ins().udiv_imm_u(q, quads_per_panel);
    let in_panel = b.ins().urem_imm_u(q, quads_per_panel);
    let dst = scaled(b, c.v_base, panel, c.channels * c.nr * F32_BYTES);
    let dst = scaled(b, dst, in_panel, LANES as i64 * F32_BYTES);
    let coords = unflatten(b, t, &[w.tiles_h, w.tiles_w]);
    let one_row = if w.tiles_w >= LANES {
        b.ins()
            .icmp_imm_u(IntCC::UnsignedLessThanOrEqual, coords[1], (w.tiles_w - LANES) as i64)
    } else {
        b.ins().iconst(I8, 0)
    };
    let last = b.ins().iadd_imm_s(t, LANES as i64 - 1);
    let in_block = b.ins().icmp(IntCC::UnsignedLessThan, last, c.t_end);
    let regular = b.ins().band(one_row, in_block);
    let src = patch_address(b, c.window, w, coords[0], coords[1], c.first_row);
    QuadPlace { regular, src, dst, t }
}

/// The input transform of one channel of a regular quad: patch rows at `src`, the 16
/// points to `dst + lane_offset` bytes and on (one f32x4 per point).
fn emit_quad_transform_f32x4(b: &mut FunctionBuilder, c: &QuadContext, src: Value, dst: Value, lane_offset: i64) {
    // The four tiles' column j are consecutive in the even or odd half.
    input_transform(
        b,
        |b, r, j| {
            let offset = r as i64 * c.row_bytes + patch_column_offset(c.w, j);
            b.ins().load(F32X4, vector_flags(), src, offset as i32)
        },
        |b, xi, value| {
            store_point(b, value, dst, lane_offset + xi as i64 * c.v_point_bytes);
        },
    );
}

/// The input transform of quad `q` on its own: vectors when it is regular, else tile by
/// tile (zeros for tiles past the block).
fn emit_input_quad(b: &mut FunctionBuilder, c: &QuadContext, place: &QuadPlace) {
    let (w, window, first_row, t_end, channels) = (c.w, c.window, c.first_row, c.t_end, c.channels);
    let (row_bytes, channel_window_bytes, v_point_bytes, v_row_bytes) =
        (c.row_bytes, c.channel_window_bytes, c.v_point_bytes, c.v_row_bytes);
    let (t, dst) = (place.t, place.dst);
    let fast = b.create_block();
    let slow = b.create_block();
    let done = b.create_block();
    b.ins().brif(place.regular, fast, &[], slow, &[]);

    b.switch_to_block(fast);
    b.seal_block(fast);
    let n_channels = int(b, channels);
    repeat(b, n_channels, &[place.src, dst], |b, ptrs| {
        emit_quad_transform_f32x4(b, c, ptrs[0], ptrs[1], 0);
        vec![
            b.ins().iadd_imm_s(ptrs[0], channel_window_bytes),
            b.ins().iadd_imm_s(ptrs[1], v_row_bytes),
        ]
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(slow);
    b.seal_block(slow);
    for lane in 0..LANES {
        let t_lane = b.ins().iadd_imm_s(t, lane as i64);
        let dst_lane = b.ins().iadd_imm_s(dst, lane as i64 * F32_BYTES);
        let inside = b.ins().icmp(IntCC::UnsignedLessThan, t_lane, t_end);
        let copy = b.create_block();
        let zeros = b.create_block();
        let lane_done = b.create_block();
        b.ins().brif(inside, copy, &[], zeros, &[]);

        b.switch_to_block(copy);
        b.seal_block(copy);
        let coords = unflatten(b, t_lane, &[w.tiles_h, w.tiles_w]);
        let src = patch_address(b, window, w, coords[0], coords[1], first_row);
        let n_channels = int(b, channels);
        repeat(b, n_channels, &[src, dst_lane], |b, ptrs| {
            let (src, dst) = (ptrs[0], ptrs[1]);
            input_transform(
                b,
                |b, r, j| {
                    let offset = r as i64 * row_bytes + patch_column_offset(w, j);
                    b.ins().load(F32, scalar_flags(), src, offset as i32)
                },
                |b, xi, value| {
                    store_point(b, value, dst, xi as i64 * v_point_bytes);
                },
            );
            vec![
                b.ins().iadd_imm_s(ptrs[0], channel_window_bytes),
                b.ins().iadd_imm_s(ptrs[1], v_row_bytes),
            ]
        });
        b.ins().jump(lane_done, &[]);

        b.switch_to_block(zeros);
        b.seal_block(zeros);
        let z = b.ins().f32const(0.0);
        let n_channels = int(b, channels);
        repeat(b, n_channels, &[dst_lane], |b, ptrs| {
            for xi in 0..POINTS {
                let at = b.ins().iadd_imm_s(ptrs[0], xi as i64 * v_point_bytes);
                b.ins().store(scalar_flags(), z, at, 0);
            }
            vec![b.ins().iadd_imm_s(ptrs[0], v_row_bytes)]
        });
        b.ins().jump(lane_done, &[]);

        b.switch_to_block(lane_done);
        b.seal_block(lane_done);
    }
    b.ins().jump(done, &[]);

    b.switch_to_block(done);
    b.seal_block(done);
}

/// Window address of the patch of tile (ty, tx): window row `2·(ty − first_row)`, and
/// in each half of the row (`emit_window`), column `tx` (padded column `2·tx`).
fn patch_address(
    b: &mut FunctionBuilder,
    window: Value,
    w: &WinogradShape,
    ty: Value,
    tx: Value,
    first_row: Value,
) -> Value {
    let row = b.ins().isub(ty, first_row);
    let row = b.ins().imul_imm_s(row, 2 * w.padded_w as i64);
    let at = b.ins().iadd(row, tx);
    scaled(b, window, at, F32_BYTES)
}

/// Byte offset, from a patch's address, of its column `j`: the even padded columns
/// form the first half of a window row, the odd ones the second, so column `j` of
/// tiles tx, tx+1, ... lies at consecutive floats.
fn patch_column_offset(w: &WinogradShape, j: usize) -> i64 {
    window_column_offset(w, j)
}

/// Byte offset of padded column `c` in a window row: `[even columns | odd columns]`,
/// `padded_w / 2` floats each.
fn window_column_offset(w: &WinogradShape, c: usize) -> i64 {
    let half_bytes = (w.padded_w / 2) as i64 * F32_BYTES;
    (c % 2) as i64 * half_bytes + (c / 2) as i64 * F32_BYTES
}

/// Stores one transformed point (F32 or F32X4) at `dst + offset` bytes.
fn store_point(b: &mut FunctionBuilder, value: Value, dst: Value, offset: i64) {
    let flags = if b.func.dfg.value_type(value) == F32X4 {
        vector_flags()
    } else {
        scalar_flags()
    };
    b.ins().store(flags, value, dst, offset as i32);
}

/// Copies, for every input channel, the padded input rows of tile rows
/// `first_row..=last tile row of the block` into the window (zero outside the image).
fn emit_window(
    b: &mut FunctionBuilder,
    f: &TaskFrame,
    w: &WinogradShape,
    first_row: Value,
    t_end: Value,
    window: Value,
) {
    let last_tile = b.ins().iadd_imm_s(t_end, -1);
    let last_row = b.ins().udiv_imm_u(last_tile, w.tiles_w as i64);
    let rows = b.ins().isub(last_row, first_row);
    let rows = b.ins().imul_imm_s(rows, 2);
    let rows = b.ins().iadd_imm_s(rows, 4);
    // Padded row r of the window is input row 2·first_row + r − pad_h.
    let first_input_row = b.ins().imul_imm_s(first_row, 2);
    let first_input_row = b.ins().iadd_imm_s(first_input_row, -(w.pad_h as i64));
    let row_bytes = w.padded_w as i64 * F32_BYTES;
    let in_row_bytes = w.in_w as i64 * F32_BYTES;
    let channels = int(b, f.plan.in_channels as i64);
    let plane_bytes = f.plan.in_plane as i64 * F32_BYTES;
    repeat(b, channels, &[window, f.x_group], |b, ptrs| {
        let (dst_channel, src_channel) = (ptrs[0], ptrs[1]);
        let zero = int(b, 0);
        for_range(b, zero, rows, |b, r| {
            let dst = scaled(b, dst_channel, r, row_bytes);
            let input_row = b.ins().iadd(first_input_row, r);
            let inside = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, input_row, w.in_h as i64);
            let copy = b.create_block();
            let zeros = b.create_block();
            let done = b.create_block();
            b.ins().brif(inside, copy, &[], zeros, &[]);

            b.switch_to_block(copy);
            b.seal_block(copy);
            let src = scaled(b, src_channel, input_row, in_row_bytes);
            copy_row_deinterleaved(b, w, dst, src);
            b.ins().jump(done, &[]);

            b.switch_to_block(zeros);
            b.seal_block(zeros);
            fill_zero(b, dst, 0, w.padded_w);
            b.ins().jump(done, &[]);

            b.switch_to_block(done);
            b.seal_block(done);
        });
        vec![
            b.ins().iadd_imm_s(dst_channel, w.window_rows as i64 * row_bytes),
            b.ins().iadd_imm_s(src_channel, plane_bytes),
        ]
    });
}

/// Zeroes `count` floats at `dst + offset` bytes (compile-time count).
fn fill_zero(b: &mut FunctionBuilder, dst: Value, offset: i64, count: usize) {
    let z = b.ins().f32const(0.0);
    let zv = b.ins().splat(F32X4, z);
    for v in 0..count / LANES {
        b.ins()
            .store(vector_flags(), zv, dst, (offset + (v * LANES * 4) as i64) as i32);
    }
    for e in count / LANES * LANES..count {
        b.ins().store(scalar_flags(), z, dst, (offset + (e * 4) as i64) as i32);
    }
}

/// Copies one input row (`w.in_w` floats at `src`) into the window row at `dst`, split
/// into its even and odd padded columns (`window_column_offset`), zeros in the padding
/// columns. Whole octets of input columns are two loads and two shuffles.
fn copy_row_deinterleaved(b: &mut FunctionBuilder, w: &WinogradShape, dst: Value, src: Value) {
    let z = b.ins().f32const(0.0);
    for c in (0..w.pad_w).chain(w.pad_w + w.in_w..w.padded_w) {
        b.ins()
            .store(scalar_flags(), z, dst, window_column_offset(w, c) as i32);
    }
    let octets = w.in_w / (2 * LANES);
    if octets > 0 {
        // Input column 2i lands at padded column pad_w + 2i, in the half of pad_w's
        // parity, float i past where input column 0 lands; likewise the odd columns.
        let even_dst = b.ins().iadd_imm_s(dst, window_column_offset(w, w.pad_w));
        let odd_dst = b.ins().iadd_imm_s(dst, window_column_offset(w, w.pad_w + 1));
        let n = int(b, octets as i64);
        repeat(b, n, &[src, even_dst, odd_dst], |b, ptrs| {
            let lo = b.ins().load(F32X4, vector_flags().with_readonly(), ptrs[0], 0);
            let hi = b.ins().load(F32X4, vector_flags().with_readonly(), ptrs[0], 16);
            let even = shuffle_f32x4(b, lo, hi, [0, 2, 4, 6]);
            let odd = shuffle_f32x4(b, lo, hi, [1, 3, 5, 7]);
            b.ins().store(vector_flags(), even, ptrs[1], 0);
            b.ins().store(vector_flags(), odd, ptrs[2], 0);
            vec![
                b.ins().iadd_imm_s(ptrs[0], 2 * LANES as i64 * F32_BYTES),
                b.ins().iadd_imm_s(ptrs[1], LANES as i64 * F32_BYTES),
                b.ins().iadd_imm_s(ptrs[2], LANES as i64 * F32_BYTES),
            ]
        });
    }
    for i in octets * 2 * LANES..w.in_w {
        let v = b.ins().load(F32, scalar_flags().with_readonly(), src, (i * 4) as i32);
        b.ins()
            .store(scalar_flags(), v, dst, window_column_offset(w, w.pad_w + i) as i32);
    }
}

/// Output transform of quad `q` for one channel: vectors when its four tiles share a
/// tile row and all 2x2 outputs are inside the image, else output by output.
#[allow(clippy::too_many_arguments)]
fn emit_output_quad(
    b: &mut FunctionBuilder,
    f: &TaskFrame,
    w: &WinogradShape,
    m_row: Value,
    m_point_bytes: i64,
    out_plane: Value,
    channel: Value,
    q: Value,
    t_end: Value,
) -> Result<(), CodegenError> {
    let quad_bytes = b.ins().imul_imm_s(q, (LANES * 4) as i64);
    let m_quad = b.ins().iadd(m_row, quad_bytes);
    let y = output_transform(b, |b, i| {
        [0, 1, 2, 3].map(|j| {
            let xi = (i * 4 + j) as i64;
            b.ins().load(F32X4, vector_flags(), m_quad, (xi * m_point_bytes) as i32)
        })
    });
    let t = b.ins().imul_imm_s(q, LANES as i64);
    let t = b.ins().iadd(f.p_start, t);
    let coords = unflatten(b, t, &[w.tiles_h, w.tiles_w]);
    // Vector path: tiles tx..tx+3 in one row, inside the block, outputs inside the image.
    let regular = if w.tiles_w >= LANES {
        let last_col = b.ins().imul_imm_s(coords[1], 2);
        let last_col = b.ins().iadd_imm_s(last_col, 2 * LANES as i64 - 1);
        let cols_ok = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, last_col, w.out_w as i64);
        let last_row = b.ins().imul_imm_s(coords[0], 2);
        let last_row = b.ins().iadd_imm_s(last_row, 1);
        let rows_ok = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, last_row, w.out_h as i64);
        let last_tile = b.ins().iadd_imm_s(t, LANES as i64 - 1);
        let in_block = b.ins().icmp(IntCC::UnsignedLessThan, last_tile, t_end);
        let ok = b.ins().band(cols_ok, rows_ok);
        b.ins().band(ok, in_block)
    } else {
        b.ins().iconst(I8, 0)
    };
    let fast = b.create_block();
    let slow = b.create_block();
    let done = b.create_block();
    b.ins().brif(regular, fast, &[], slow, &[]);

    b.switch_to_block(fast);
    b.seal_block(fast);
    let out_w = w.out_w as i64;
    for dy in 0..2 {
        // Lanes of y[dy][0] are columns 2·tx + 2l, of y[dy][1] columns 2·tx + 2l + 1.
        let (even, odd) = (y[dy * 2], y[dy * 2 + 1]);
        let lo = shuffle_f32x4(b, even, odd, [0, 4, 1, 5]);
        let hi = shuffle_f32x4(b, even, odd, [2, 6, 3, 7]);
        let row = b.ins().imul_imm_s(coords[0], 2);
        let row = b.ins().iadd_imm_s(row, dy as i64);
        let position = b.ins().imul_imm_s(row, out_w);
        let col = b.ins().imul_imm_s(coords[1], 2);
        let position = b.ins().iadd(position, col);
        for (half, v) in [lo, hi].into_iter().enumerate() {
            let p = b.ins().iadd_imm_s(position, (half * LANES) as i64);
            let v = f.epilogue.emit_at(b, v, f.image, channel, p)?;
            let at = scaled(b, out_plane, p, F32_BYTES);
            b.ins().store(vector_flags(), v, at, 0);
        }
    }
    b.ins().jump(done, &[]);

    b.switch_to_block(slow);
    b.seal_block(slow);
    for lane in 0..LANES {
        let t_lane = b.ins().iadd_imm_s(t, lane as i64);
        let c = unflatten(b, t_lane, &[w.tiles_h, w.tiles_w]);
        let tile_ok = b.ins().icmp(IntCC::UnsignedLessThan, t_lane, t_end);
        for dy in 0..2 {
            for dx in 0..2 {
                let row = b.ins().imul_imm_s(c[0], 2);
                let row = b.ins().iadd_imm_s(row, dy as i64);
                let col = b.ins().imul_imm_s(c[1], 2);
                let col = b.ins().iadd_imm_s(col, dx as i64);
                let row_ok = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, row, w.out_h as i64);
                let col_ok = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, col, out_w);
                let ok = b.ins().band(row_ok, col_ok);
                let ok = b.ins().band(ok, tile_ok);
                let store = b.create_block();
                let next = b.create_block();
                b.ins().brif(ok, store, &[], next, &[]);
                b.switch_to_block(store);
                b.seal_block(store);
                let value = b.ins().extractlane(y[dy * 2 + dx], lane as u8);
                let p = b.ins().imul_imm_s(row, out_w);
                let p = b.ins().iadd(p, col);
                let value = f.epilogue.emit_at(b, value, f.image, channel, p)?;
                let at = scaled(b, out_plane, p, F32_BYTES);
                b.ins().store(scalar_flags(), value, at, 0);
                b.ins().jump(next, &[]);
                b.switch_to_block(next);
                b.seal_block(next);
            }
        }
    }
    b.ins().jump(done, &[]);

    b.switch_to_block(done);
    b.seal_block(done);
    Ok(())
}
