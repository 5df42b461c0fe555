//! Records, for every convolution, which kernel family computes it and the tile sizes
//! that fit the target's registers and caches, as data in the node's `Schedule` (the
//! code generator reads it; dumps show it).
//!
//! Kernel families:
//! - "depthwise": groups == C_in == C_out > 1. Each output channel reads one input
//!   channel, so there is no reduction over channels to block: vectors run along
//!   channels and a row of output positions is kept in registers. Tiles: `c` (channels
//!   per vector) and `ow` (output positions per register tile, the same accumulator
//!   budget as the GEMM tile: mr·nr/vector_width registers).
//! - "gemm": groups == 1. The convolution is out[oc][p] = W[oc][k] x col[k][p] with
//!   k = C_in·kh·kw and p the output positions (1x1 convolutions need no im2col).
//!   Tiles follow the GotoBLAS/BLIS blocking:
//!   - `mr` x `nr`: the microkernel's register tile (output channels x positions);
//!   - `kc`: the depth of one packed panel pair, so that a kc x nr panel of col and a
//!     mr x kc panel of W (kc·(mr+nr)·4 bytes) take at most half of L1d, leaving room
//!     for the output tile and streaming;
//!   - `nc`: the positions of one packed col block, so that kc·nc·4 bytes take at most
//!     half of L2;
//!   - none exceeds the problem (kc <= k; nc <= p rounded up to nr).
//! - "direct": grouped convolutions that are not depthwise (few channels per group
//!   make a GEMM per group too thin to fill a register tile), and convolutions with at
//!   most `SMALL_CONV_MACS_PER_POSITION` multiply-adds per output position. Tiles: `oc` (output
//!   channels, nr) and `ow` (output positions, mr), the register block of a direct
//!   kernel.
//!
//! Nodes with a non-default schedule already (chosen by an earlier pass or by hand)
//! are left alone.

use cnnc_ir::{Graph, Op, Schedule};

use super::{Pass, PassContext, TargetDesc};

pub const PASS: Pass = Pass {
    name: "choose-schedule",
    summary: "pick each conv's kernel family, vector width and cache tiles for the target",
    run,
};

fn run(g: &mut Graph, ctx: &PassContext) -> Result<(), String> {
    check_target(&ctx.target)?;
    for i in 0..g.nodes.len() {
        let node = &g.nodes[i];
        let Op::Conv(geometry) = &node.op else { continue };
        if !node.schedule.is_default() {
            continue;
        }
        let x = g.ty(node.inputs[0]);
        let w = g.ty(node.inputs[1]);
        let y = g.ty(node.outputs[0]);
        let shape = ConvShape {
            in_channels: x.shape[1],
            out_channels: w.shape[0],
            groups: geometry.groups,
            reduction: w.shape[1..].iter().product(),
            positions: y.shape[2..].iter().product(),
        };
        let rows = few_channel_rows(geometry, &x.shape, &w.shape, &y.shape, &ctx.target);
        g.nodes[i].schedule = conv_schedule(&shape, &ctx.target);
        if rows {
            g.nodes[i].schedule.kernel = "direct".to_string();
        }
    }
    Ok(())
}

/// Convolutions that `microkernel::conv_rows_x86` takes (ungrouped, unpadded, column
/// stride 1, not 1x1, few input channels: its `RowConvSpec::from_shapes`) run on the direct
/// kernel, which on AVX2+ targets is that machine code (output rows as maps x column-vector
/// register tiles, x read in place): LeNet-5's 6 -> 16 5x5 layer measured ~2x faster there
/// than on the GEMM path, whose im2col packs a 150-deep reduction for 16 channels.
fn few_channel_rows(geometry: &cnnc_ir::ConvGeometry, x: &[usize], w: &[usize], y: &[usize], target: &TargetDesc) -> bool {
    target.vector_width >= 8
        && cnnc_codegen::microkernel::conv_rows_x86::RowConvSpec::from_shapes(geometry, x, w, y).is_some()
}

/// The numbers a schedule choice depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvShape {
    pub in_channels: usize,
    pub out_channels: usize,
    pub groups: usize,
    /// Multiply-adds per output element: C_in/groups · kh · kw.
    pub reduction: usize,
    /// Output positions per image and channel: oh · ow.
    pub positions: usize,
}

/// The schedule of one convolution on `target`.
pub fn conv_schedule(conv: &ConvShape, target: &TargetDesc) -> Schedule {
    let (mr, nr, vw) = (target.gemm_mr, target.gemm_nr, target.vector_width);
    let (kernel, tiles) = if conv.groups > 1 && conv.groups == conv.in_channels && conv.groups == conv.out_channels {
        ("depthwise", vec![("c".to_string(), vw), ("ow".to_string(), (mr * nr / vw).max(1))])
    } else if conv.groups == 1 && conv.reduction * conv.out_channels > SMALL_CONV_MACS_PER_POSITION {
        let (kc, nc) = gemm_blocking(conv.reduction, conv.positions, target);
        let tiles = [("mr", mr), ("nr", nr), ("kc", kc), ("nc", nc)];
        ("gemm", tiles.into_iter().map(|(n, v)| (n.to_string(), v)).collect())
    } else {
        ("direct", vec![("oc".to_string(), nr), ("ow".to_string(), mr)])
    };
    Schedule { vector_width: vw as u32, tiles, kernel: kernel.to_string(), ..Default::default() }
}

/// Multiply-adds per output position (C_in·kh·kw·C_out) at or below which a convolution
/// runs on the direct kernel: the GEMM path packs K values per position (im2col) and pays
/// a fixed cost per register tile, which a reduction this short does not amortise.
/// Measured on LeNet-5's first conv (K = 25, C_out = 6, 28x28): direct ~0.03 ms, GEMM
/// ~0.05 ms per image (`cnnc bench`, same run).
pub const SMALL_CONV_MACS_PER_POSITION: usize = 256;

/// (kc, nc) for a GEMM with reduction depth `k` over `positions` columns.
fn gemm_blocking(k: usize, positions: usize, target: &TargetDesc) -> (usize, usize) {
    let (mr, nr) = (target.gemm_mr, target.gemm_nr);
    const F32: usize = 4;
    // kc·(mr + nr)·4 <= L1d/2, rounded down to whole vectors of the packed panels.
    let kc_fit = (target.l1d_bytes / 2 / ((mr + nr) * F32)).max(1);
    let kc_fit = if kc_fit >= 8 { kc_fit / 8 * 8 } else { kc_fit };
    let kc = kc_fit.min(k.max(1));
    // kc·nc·4 <= L2/2, in whole register tiles, and no wider than the problem.
    let nc_fit = (target.l2_bytes / 2 / (kc * F32)).max(nr) / nr * nr;
    let positions_rounded = positions.max(1).div_ceil(nr) * nr;
    (kc, nc_fit.min(positions_rounded))
}

fn check_target(t: &TargetDesc) -> Result<(), String> {
    if t.gemm_mr == 0 || t.gemm_nr == 0 || t.vector_width == 0 || t.l1d_bytes == 0 || t.l2_bytes == 0 {
        return Err(format!("target description {:?} has a zero size: {t:?}", t.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avx2() -> TargetDesc {
        TargetDesc::fixed_for_tests()
    }

    fn tiles(s: &Schedule) -> Vec<(&str, usize)> {
        s.tiles.iter().map(|(n, v)| (n.as_str(), *v)).collect()
    }

    #[test]
    fn a_large_gemm_conv_fills_half_of_each_cache() {
        // ResNet's 3x3, 256 -> 256 on 14x14: k = 2304, p = 196.
        let conv = ConvShape { in_channels: 256, out_channels: 256, groups: 1, reduction: 2304, positions: 196 };
        let s = conv_schedule(&conv, &avx2());
        assert_eq!(s.kernel, "gemm");
        assert_eq!(s.vector_width, 8);
        // 16384 / (22·4) = 186 -> 184; nc: 524288 / (184·4) = 712 -> 704, capped by p = 196 -> 208.
        assert_eq!(tiles(&s), [("mr", 6), ("nr", 16), ("kc", 184), ("nc", 208)]);
        let t = avx2();
        assert!(184 * (6 + 16) * 4 <= t.l1d_bytes / 2);
    }

    #[test]
    fn nc_is_limited_by_l2_when_the_image_is_large() {
        let conv = ConvShape { in_channels: 64, out_channels: 64, groups: 1, reduction: 576, positions: 56 * 56 };
        let s = conv_schedule(&conv, &avx2());
        let (kc, nc) = (s.tiles[2].1, s.tiles[3].1);
        assert_eq!(kc, 184);
        assert_eq!(nc, 704);
        assert!(kc * nc * 4 <= avx2().l2_bytes / 2 && nc % 16 == 0);
    }

    #[test]
    fn small_reductions_cap_kc() {
        let conv = ConvShape { in_channels: 3, out_channels: 32, groups: 1, reduction: 27, positions: 112 * 112 };
        let s = conv_schedule(&conv, &avx2());
        assert_eq!(s.tiles[2], ("kc".to_string(), 27));
        assert_eq!(s.tiles[3].1 % 16, 0);
    }

    #[test]
    fn tiny_convs_stay_direct() {
        // LeNet-5's first conv: 1 -> 6 channels, 5x5.
        let lenet = ConvShape { in_channels: 1, out_channels: 6, groups: 1, reduction: 25, positions: 784 };
        assert_eq!(conv_schedule(&lenet, &avx2()).kernel, "direct");
        // Its second (6 -> 16, 5x5: 2400 multiply-adds per position) is a GEMM.
        let second = ConvShape { in_channels: 6, out_channels: 16, groups: 1, reduction: 150, positions: 100 };
        assert_eq!(conv_schedule(&second, &avx2()).kernel, "gemm");
    }

    #[test]
    fn depthwise_and_grouped_convs_get_their_families() {
        let dw = ConvShape { in_channels: 32, out_channels: 32, groups: 32, reduction: 9, positions: 12544 };
        let s = conv_schedule(&dw, &avx2());
        assert_eq!(s.kernel, "depthwise");
        assert_eq!(tiles(&s), [("c", 8), ("ow", 12)]);
        let grouped = ConvShape { in_channels: 32, out_channels: 64, groups: 4, reduction: 72, positions: 100 };
        let s = conv_schedule(&grouped, &avx2());
        assert_eq!(s.kernel, "direct");
        assert_eq!(tiles(&s), [("oc", 16), ("ow", 6)]);
        // A depthwise multiplier (C_out = 2·C_in) is not depthwise in this sense.
        let multiplier = ConvShape { in_channels: 8, out_channels: 16, groups: 8, reduction: 9, positions: 64 };
        assert_eq!(conv_schedule(&multiplier, &avx2()).kernel, "direct");
    }

    #[test]
    fn avx512_tiles() {
        let t = TargetDesc {
            name: "avx512".into(),
            vector_width: 16,
            gemm_mr: 14,
            gemm_nr: 32,
            l1d_bytes: 48 * 1024,
            l2_bytes: 1 << 20,
        };
        let conv = ConvShape { in_channels: 512, out_channels: 512, groups: 1, reduction: 4608, positions: 49 };
        let s = conv_schedule(&conv, &t);
        // 24576 / (46·4) = 133 -> 128; nc capped by p = 49 -> 64.
        assert_eq!(tiles(&s), [("mr", 14), ("nr", 32), ("kc", 128), ("nc", 64)]);
        assert_eq!(s.vector_width, 16);
    }
}
