//! The weight gradient of a pointwise (1x1, stride 1, unpadded) convolution with several
//! maps and channels per group: dw[m, c] = Σ_n Σ_p dy[n, m, p]·x[n, c, p], a product of
//! dy [M, P] and xᵀ per image in which both operands run contiguously along the positions
//! p (NCHW planes), so nothing is transposed or packed.
//!
//! Register blocks of up to 3 maps x 3 channels: per four positions, 3 + 3 vector loads
//! feed 9 independent multiply-add chains; on AVX2+FMA each block is a call of a machine
//! code tile (`microkernel::pointwise_weight_grad_x86`: 8 positions per vector, up to 12
//! sums, blocks sized by `block_sizes`). Positions are taken in chunks so that the
//! chunk of every plane of the side with fewer planes stays in L1 while the blocks of the
//! other side pass over it (a chunk's sums go into dw as they complete). Meant for the products with few maps or
//! channels (a mobile network's 16-32 channel bottlenecks), where the GEMM form packs a
//! wide operand for few uses of each element.

use cranelift_codegen::ir::{
    InstBuilder, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use crate::kernels::compute::{F32_BYTES, LANES, counted_loop, index_ptr, load, offset_ptr, scalar_flags, store, tiled_loop, vector_flags};
use crate::kernels::movement::emit_fill;
use crate::microkernel::pointwise_weight_grad_x86::{self as machine, TileSpec};
use cnnc_ir::Scalar;

/// Maps and channels of a register block (9 accumulators + 6 loaded vectors of the 16
/// xmm registers).
const BLOCK: usize = 3;

/// Vectors of positions per loop iteration. (Two made Cranelift load both steps' operands
/// up front and spill accumulators.)
const UNROLL: usize = 1;

/// Bytes of the inner side's planes per chunk of positions (of a 48 KB L1, with room for
/// the outer block's planes).
const INNER_CHUNK_BYTES: usize = 16 * 1024;

/// The same for the machine-code tiles, sized for L2 instead: a chunk of 256 positions
/// over 16 KB made every plane of both sides a separate 1 KB stream per chunk (MobileNet's
/// 96 x 16 product: 112 streams, which the prefetchers do not follow, 8.8 GMAC/s); with the
/// inner side's chunk in L2 each outer plane is one long sequential read.
const INNER_CHUNK_BYTES_MACHINE_CODE: usize = 192 * 1024;

/// One pointwise weight gradient: [batch, groups · channels, positions] x and
/// [batch, groups · maps, positions] dy into dw [groups · maps, channels].
pub struct PointwisePlan {
    pub batch: usize,
    pub groups: usize,
    pub channels_per_group: usize,
    pub maps_per_group: usize,
    pub positions: usize,
    pub fused: bool,
}

fn bytes(elements: usize) -> i64 {
    elements as i64 * F32_BYTES
}

impl PointwisePlan {
    pub fn emit(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value) {
        let (cpg, mpg, p) = (self.channels_per_group, self.maps_per_group, self.positions);
        emit_fill(b, dw, self.groups * mpg * cpg, Scalar::F32(0.0));
        counted_loop(b, self.batch, vec![], |b, image, _| {
            let x_image = index_ptr(b, x, image, bytes(self.groups * cpg * p));
            let dy_image = index_ptr(b, dy, image, bytes(self.groups * mpg * p));
            counted_loop(b, self.groups, vec![], |b, group, _| {
                let x_group = index_ptr(b, x_image, group, bytes(cpg * p));
                let dy_group = index_ptr(b, dy_image, group, bytes(mpg * p));
                let dw_group = index_ptr(b, dw, group, bytes(mpg * cpg));
                let chunk_size = self.chunk();
                let (done, rest) = tiled_loop(b, p, chunk_size, vec![], |b, chunk, _| {
                    let at = b.ins().imul_imm_s(chunk, bytes(chunk_size));
                    let xc = b.ins().iadd(x_group, at);
                    let dyc = b.ins().iadd(dy_group, at);
                    self.emit_chunk(b, xc, dyc, dw_group, chunk_size);
                    vec![]
                });
                debug_assert!(done.is_empty());
                if rest > 0 {
                    let start = bytes(p - rest);
                    let xc = offset_ptr(b, x_group, start);
                    let dyc = offset_ptr(b, dy_group, start);
                    self.emit_chunk(b, xc, dyc, dw_group, rest);
                }
                vec![]
            });
            vec![]
        });
    }

    /// dw[m, c] += Σ over `count` positions from x and dy (a chunk's first position).
    /// Blocks of the side with more planes outermost: the chunk of every plane of the other
    /// side is read once per outer block, so that side's chunk is the one kept in L1.
    fn emit_chunk(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value, count: usize) {
        let (cpg, mpg) = (self.channels_per_group, self.maps_per_group);
        let maps_outer = mpg >= cpg;
        let (outer, inner) = if maps_outer { (mpg, cpg) } else { (cpg, mpg) };
        let (map_block, channel_block) = self.block_sizes();
        let (outer_block, inner_block) = if maps_outer { (map_block, channel_block) } else { (channel_block, map_block) };
        for (outer_start, outer_size, outer_repeat) in blocks(outer, outer_block) {
            counted_loop(b, outer_repeat, vec![], |b, ob, _| {
                let first_outer = b.ins().imul_imm_s(ob, outer_block as i64);
                let first_outer = b.ins().iadd_imm_s(first_outer, outer_start as i64);
                for &(inner_start, inner_size, inner_repeat) in &blocks(inner, inner_block) {
                    counted_loop(b, inner_repeat, vec![], |b, ib, _| {
                        let first_inner = b.ins().imul_imm_s(ib, inner_block as i64);
                        let first_inner = b.ins().iadd_imm_s(first_inner, inner_start as i64);
                        let ((map0, maps), (channel0, channels)) = if maps_outer {
                            ((first_outer, outer_size), (first_inner, inner_size))
                        } else {
                            ((first_inner, inner_size), (first_outer, outer_size))
                        };
                        let dy_rows = index_ptr(b, dy, map0, bytes(self.positions));
                        let x_rows = index_ptr(b, x, channel0, bytes(self.positions));
                        let dw_row = index_ptr(b, dw, map0, bytes(cpg));
                        let dw_block = index_ptr(b, dw_row, channel0, bytes(1));
                        self.emit_block(b, x_rows, dy_rows, dw_block, maps, channels, count);
                        vec![]
                    });
                }
                vec![]
            });
        }
    }

    /// Whether the AVX2+FMA tiles of `microkernel::pointwise_weight_grad_x86` were defined
    /// for this product (all of them are, or none).
    fn machine_code(&self) -> bool {
        machine::tiles_of(self.maps_per_group, self.channels_per_group, self.positions)
            .iter()
            .all(machine::defined)
    }

    /// `(maps, channels)` per register block: the machine code's tiles, else 3 x 3.
    fn block_sizes(&self) -> (usize, usize) {
        if self.machine_code() {
            machine::block_sizes(self.maps_per_group, self.channels_per_group)
        } else {
            (BLOCK, BLOCK)
        }
    }

    /// Positions per chunk: the inner side's planes of a chunk take at most
    /// `INNER_CHUNK_BYTES` (whole vectors, at least 64 positions).
    fn chunk(&self) -> usize {
        let inner = self.channels_per_group.min(self.maps_per_group).max(1);
        let budget = if self.machine_code() { INNER_CHUNK_BYTES_MACHINE_CODE } else { INNER_CHUNK_BYTES };
        let fit = budget / (inner * F32_BYTES as usize);
        (fit - fit % LANES).max(64)
    }

    /// The `maps` x `channels` sums over `count` positions, added into dw (rows `cpg` apart).
    #[allow(clippy::too_many_arguments)]
    fn emit_block(&self, b: &mut FunctionBuilder, x: Value, dy: Value, dw: Value, maps: usize, channels: usize, count: usize) {
        let tile = TileSpec {
            maps,
            channels,
            plane_bytes: self.positions * F32_BYTES as usize,
            dw_row_bytes: self.channels_per_group * F32_BYTES as usize,
        };
        if self.machine_code()
            && let Some(code) = machine::import(b.func, &tile)
        {
            let count = b.ins().iconst(I64, count as i64);
            b.ins().call(code, &[x, dy, dw, count]);
            return;
        }
        let plane = bytes(self.positions);
        let zero = b.ins().f32const(0.0);
        let zeros = b.ins().splat(F32X4, zero);
        let pairs = maps * channels;
        let mut carried = vec![x, dy];
        carried.extend(vec![zeros; pairs]);
        let step = |b: &mut FunctionBuilder, xp: Value, dyp: Value, at: i64, accs: &mut [Value]| {
            let g: Vec<Value> = (0..maps).map(|m| load(b, F32X4, vector_flags(), dyp, m as i64 * plane + at)).collect();
            let xs: Vec<Value> = (0..channels).map(|ch| load(b, F32X4, vector_flags(), xp, ch as i64 * plane + at)).collect();
            for m in 0..maps {
                for ch in 0..channels {
                    accs[m * channels + ch] = self.fma(b, xs[ch], g[m], accs[m * channels + ch]);
                }
            }
        };
        let (after, rest) = tiled_loop(b, count, UNROLL * LANES, carried, |b, _, c| {
            let (xp, dyp) = (c[0], c[1]);
            let mut accs = c[2..].to_vec();
            for u in 0..UNROLL {
                step(b, xp, dyp, bytes(u * LANES), &mut accs);
            }
            let mut next = vec![b.ins().iadd_imm_s(xp, bytes(UNROLL * LANES)), b.ins().iadd_imm_s(dyp, bytes(UNROLL * LANES))];
            next.extend(accs);
            next
        });
        let (mut xp, mut dyp) = (after[0], after[1]);
        let mut accs = after[2..].to_vec();
        for _ in 0..rest / LANES {
            step(b, xp, dyp, 0, &mut accs);
            xp = b.ins().iadd_imm_s(xp, bytes(LANES));
            dyp = b.ins().iadd_imm_s(dyp, bytes(LANES));
        }
        let rest = rest % LANES;
        for e in 0..rest {
            for m in 0..maps {
                let g = load(b, F32, scalar_flags(), dyp, m as i64 * plane + bytes(e));
                for ch in 0..channels {
                    let xv = load(b, F32, scalar_flags(), xp, ch as i64 * plane + bytes(e));
                    let product = b.ins().fmul(xv, g);
                    let lane0 = b.ins().scalar_to_vector(F32X4, product);
                    let slot = m * channels + ch;
                    accs[slot] = b.ins().fadd(accs[slot], lane0);
                }
            }
        }
        for m in 0..maps {
            for ch in 0..channels {
                let total = horizontal_sum(b, accs[m * channels + ch]);
                let at = bytes(m * self.channels_per_group + ch);
                let old = load(b, F32, scalar_flags(), dw, at);
                let sum = b.ins().fadd(old, total);
                store(b, scalar_flags(), sum, dw, at);
            }
        }
    }

    fn fma(&self, b: &mut FunctionBuilder, x: Value, y: Value, acc: Value) -> Value {
        if self.fused {
            b.ins().fma(x, y, acc)
        } else {
            let p = b.ins().fmul(x, y);
            b.ins().fadd(acc, p)
        }
    }
}

/// Blocks over `n` items as (first item, block size, how many blocks of that size in a
/// row): whole blocks of `block`, then one of the remainder.
fn blocks(n: usize, block: usize) -> Vec<(usize, usize, usize)> {
    let whole = n / block;
    let mut out = Vec::new();
    if whole > 0 {
        out.push((0, block, whole));
    }
    if n % block > 0 {
        out.push((whole * block, n % block, 1));
    }
    out
}

fn horizontal_sum(b: &mut FunctionBuilder, v: Value) -> Value {
    let mut total = b.ins().extractlane(v, 0);
    for lane in 1..LANES {
        let e = b.ins().extractlane(v, lane as u8);
        total = b.ins().fadd(total, e);
    }
    total
}
