//! The register tile of a pointwise (1x1) convolution's weight gradient as AVX2+FMA
//! machine code: `maps x channels` sums of products of dy's and x's planes along their
//! (contiguous) positions, 8 positions per ymm, up to 12 accumulators. One side's vectors
//! are held in registers (at most 3), the other side's are loaded one at a time and
//! multiplied into them: per 8 positions `maps + channels` loads feed `maps·channels`
//! fused multiply-adds. Twice the width of the f32x4 Cranelift loop of
//! `kernels/pointwise_weight_grad.rs`, which keeps the chunking and the loops around it.
//!
//! Contract of the function [`assemble`] returns (SystemV, four `i64` parameters, no
//! result):
//!
//! `tile(x, dy, dw, count)`
//! - `x`: channel 0 of the tile at its first position, channel `j` at `x + j·plane_bytes`;
//! - `dy`: map 0 of the tile at the same position, map `i` at `dy + i·plane_bytes`;
//! - `dw`: the tile's first sum, sum `(i, j)` at `dw + i·dw_row_bytes + 4·j`;
//! - `dw[i][j] += Σ_{p < count} dy[i][p]·x[j][p]`, `count >= 0` positions;
//! - reads no byte past the `count` positions of each plane; touches rax, rcx, rdx, rsi,
//!   rdi, r8, r9 and ymm0-ymm15, never the stack; ends with `vzeroupper`.

use std::cell::RefCell;

use cnnc_ir::{DType, Graph, Node, Op};
use cranelift_codegen::ir::{FuncRef, Function, Signature};
use cranelift_module::Module;
use iced_x86::code_asm::*;

use super::activation::available;
use super::registry::{FunctionTable, InstalledTable, import_local, lookup};
use crate::kernels::CodegenError;
use crate::target::TargetSpec;
use super::x86::YMM;

const LANES: usize = 8;
/// Accumulators of a tile; with 3 held vectors and one streamed, all 16 ymm registers.
pub const ACCUMULATORS: usize = 12;
/// The most vectors of the held side.
const MAX_HELD: usize = 3;

/// One tile function: all compile-time constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileSpec {
    pub maps: usize,
    pub channels: usize,
    pub plane_bytes: usize,
    pub dw_row_bytes: usize,
}

impl TileSpec {
    pub fn fits(maps: usize, channels: usize) -> bool {
        maps >= 1 && channels >= 1 && maps * channels <= ACCUMULATORS && maps.min(channels) <= MAX_HELD
    }

    pub fn symbol(&self) -> String {
        format!(
            "cnnc_pointwise_wgrad_avx2_{}x{}_plane{}_row{}",
            self.maps, self.channels, self.plane_bytes, self.dw_row_bytes
        )
    }
}

/// Block sizes `(maps, channels)` for a product of `maps x channels` sums: the pair of
/// register tiles that issues the fewest cycles per 8 positions (2 loads and 2 FMAs a
/// cycle), e.g. 96 x 16 as 3 x 4 tiles, not 4 x 3 with a 1-channel remainder.
pub fn block_sizes(maps: usize, channels: usize) -> (usize, usize) {
    const CANDIDATES: [(usize, usize); 8] = [(3, 4), (4, 3), (2, 6), (6, 2), (1, 12), (12, 1), (3, 3), (2, 4)];
    let cost = |&(bm, bc): &(usize, usize)| -> usize {
        let mut total = 0;
        for (m, m_repeat) in sizes(maps, bm) {
            for (c, c_repeat) in sizes(channels, bc) {
                // Twice the cycles per 8 positions: loads and FMAs, two of each per cycle.
                total += m_repeat * c_repeat * (m + c).max(m * c);
            }
        }
        total
    };
    CANDIDATES.iter().copied().min_by_key(cost).unwrap_or((3, 3))
}

/// `(block size, how many)`: whole blocks of `block`, then the remainder.
fn sizes(n: usize, block: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if n / block > 0 {
        out.push((block, n / block));
    }
    if n % block > 0 {
        out.push((n % block, 1));
    }
    out
}

/// The pointwise weight gradient of `node`, when it is one: `(batch, groups, channels per
/// group, maps per group, positions)`, as `kernels::conv_weight_grad` decides it.
pub fn pointwise_of_node(g: &Graph, node: &Node) -> Option<(usize, usize, usize, usize, usize)> {
    let Op::ConvWeightGrad(geometry) = &node.op else { return None };
    if node.inputs.len() != 2 || node.outputs.len() != 1 {
        return None;
    }
    let (x, dy, dw) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
    if [x.dtype, dy.dtype, dw.dtype] != [DType::F32; 3] || x.rank() < 3 || x.rank() != dy.rank() || x.rank() != dw.rank() {
        return None;
    }
    let unit = |v: &[usize]| v.iter().all(|&s| s == 1);
    let zero = |v: &[usize]| v.iter().all(|&s| s == 0);
    if x.shape[2..] != dy.shape[2..] || !unit(&dw.shape[2..]) || !unit(&geometry.strides) || !zero(&geometry.pads_begin) {
        return None;
    }
    let groups = geometry.groups;
    if groups == 0 || x.shape[1] % groups != 0 || dy.shape[1] % groups != 0 {
        return None;
    }
    let (cpg, mpg) = (x.shape[1] / groups, dy.shape[1] / groups);
    (cpg * mpg > 1).then(|| (x.shape[0], groups, cpg, mpg, x.shape[2..].iter().product()))
}

/// Every tile spec a pointwise weight gradient of `maps x channels` per group over
/// `positions` uses.
pub fn tiles_of(maps: usize, channels: usize, positions: usize) -> Vec<TileSpec> {
    let (bm, bc) = block_sizes(maps, channels);
    let mut out = Vec::new();
    for (m, _) in sizes(maps, bm) {
        for (c, _) in sizes(channels, bc) {
            out.push(TileSpec { maps: m, channels: c, plane_bytes: positions * 4, dw_row_bytes: channels * 4 });
        }
    }
    out
}

/// `(x, dy, dw, count)`, all i64, SystemV.
pub fn signature() -> Signature {
    super::registry::sysv_i64_signature(4)
}

thread_local! {
    static REGISTRY: RefCell<Option<FunctionTable>> = const { RefCell::new(None) };
}

/// While alive, [`import`] on this thread finds the tiles defined for the graph.
pub struct PointwiseWeightGradFunctions {
    _installed: InstalledTable,
}

impl PointwiseWeightGradFunctions {
    /// Defines the tiles of every pointwise weight gradient of `g` when the target has
    /// AVX2+FMA (elsewhere none: the f32x4 loop runs).
    pub fn define_for_graph<M: Module>(
        module: &mut M,
        target: &TargetSpec,
        g: &Graph,
    ) -> Result<PointwiseWeightGradFunctions, CodegenError> {
        let mut table = FunctionTable::default();
        if available(target) {
            for node in &g.nodes {
                let Some((_, _, cpg, mpg, positions)) = pointwise_of_node(g, node) else { continue };
                if positions * 4 * MAX_HELD.max(ACCUMULATORS) > i32::MAX as usize {
                    continue;
                }
                for spec in tiles_of(mpg, cpg, positions) {
                    table.define(module, spec.symbol(), &signature(), || assemble(&spec))?;
                }
            }
        }
        Ok(PointwiseWeightGradFunctions { _installed: table.install(&REGISTRY) })
    }
}

/// Whether tiles were defined for this spec's shape on this thread (all of a node's are,
/// or none).
pub fn defined(spec: &TileSpec) -> bool {
    lookup(&REGISTRY, &spec.symbol()).is_some()
}

/// A reference to the tile function of `spec` in `func`, when one was defined.
pub fn import(func: &mut Function, spec: &TileSpec) -> Option<FuncRef> {
    let id = lookup(&REGISTRY, &spec.symbol())?;
    Some(import_local(func, id, signature()))
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the pointwise weight-gradient tile: {e}"))
}

const XMM: [AsmRegisterXmm; 16] = [
    xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15,
];

const X: AsmRegister64 = rdi;
const DY: AsmRegister64 = rsi;
const DW: AsmRegister64 = rdx;
const COUNT: AsmRegister64 = rcx;
const VECTORS: AsmRegister64 = r8;

/// The machine code of `spec`.
pub fn assemble(spec: &TileSpec) -> Result<Vec<u8>, CodegenError> {
    if !TileSpec::fits(spec.maps, spec.channels) || spec.plane_bytes * ACCUMULATORS > i32::MAX as usize {
        return Err(CodegenError(format!("internal: pointwise weight-gradient tile {spec:?} does not fit")));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    emit(&mut asm, spec).map_err(asm_error)?;
    let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
    Ok(result.inner.code_buffer)
}

fn emit(asm: &mut CodeAssembler, s: &TileSpec) -> Result<(), IcedError> {
    // The smaller side is held; accumulator (i, j) is map i, channel j either way.
    let maps_held = s.maps <= s.channels;
    let (held_count, streamed_count) = if maps_held { (s.maps, s.channels) } else { (s.channels, s.maps) };
    let (held_base, streamed_base) = if maps_held { (DY, X) } else { (X, DY) };
    let acc_index = |h: usize, t: usize| if maps_held { h * s.channels + t } else { t * s.channels + h };
    let held = |h: usize| 12 + h;
    let streamed = 15;
    let plane = s.plane_bytes as i32;
    let accumulators = s.maps * s.channels;

    let mut vector_loop = asm.create_label();
    let mut reduce = asm.create_label();
    let mut scalar_loop = asm.create_label();
    let mut store = asm.create_label();

    for a in 0..accumulators {
        asm.vxorps(YMM[a], YMM[a], YMM[a])?;
    }
    asm.mov(VECTORS, COUNT)?;
    asm.shr(VECTORS, 3)?;
    asm.jz(reduce)?;
    asm.set_label(&mut vector_loop)?;
    for h in 0..held_count {
        asm.vmovups(YMM[held(h)], ymmword_ptr(held_base + h as i32 * plane))?;
    }
    for t in 0..streamed_count {
        asm.vmovups(YMM[streamed], ymmword_ptr(streamed_base + t as i32 * plane))?;
        for h in 0..held_count {
            let a = acc_index(h, t);
            asm.vfmadd231ps(YMM[a], YMM[held(h)], YMM[streamed])?;
        }
    }
    asm.add(X, (LANES * 4) as i32)?;
    asm.add(DY, (LANES * 4) as i32)?;
    asm.dec(VECTORS)?;
    asm.jnz(vector_loop)?;

    // Each accumulator's 8 lanes into lane 0 (the scalar tail's VEX ops clear the upper
    // half, so the vectors are summed first).
    asm.set_label(&mut reduce)?;
    for a in 0..accumulators {
        let (t1, t2) = (XMM[12], XMM[13]);
        asm.vextractf128(t1, YMM[a], 1)?;
        asm.vaddps(XMM[a], XMM[a], t1)?;
        asm.vmovhlps(t2, t2, XMM[a])?;
        asm.vaddps(XMM[a], XMM[a], t2)?;
        asm.vmovshdup(t1, XMM[a])?;
        asm.vaddss(XMM[a], XMM[a], t1)?;
    }
    asm.and(COUNT, (LANES - 1) as i32)?;
    asm.jz(store)?;
    asm.set_label(&mut scalar_loop)?;
    for h in 0..held_count {
        asm.vmovss(XMM[held(h)], dword_ptr(held_base + h as i32 * plane))?;
    }
    for t in 0..streamed_count {
        asm.vmovss(XMM[streamed], dword_ptr(streamed_base + t as i32 * plane))?;
        for h in 0..held_count {
            let a = acc_index(h, t);
            asm.vfmadd231ss(XMM[a], XMM[held(h)], XMM[streamed])?;
        }
    }
    asm.add(X, 4)?;
    asm.add(DY, 4)?;
    asm.dec(COUNT)?;
    asm.jnz(scalar_loop)?;

    asm.set_label(&mut store)?;
    for i in 0..s.maps {
        for j in 0..s.channels {
            let a = i * s.channels + j;
            let at = dword_ptr(DW + (i * s.dw_row_bytes + 4 * j) as i32);
            asm.vaddss(XMM[a], XMM[a], at)?;
            asm.vmovss(at, XMM[a])?;
        }
    }
    asm.vzeroupper()?;
    asm.ret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_fit_and_prefer_no_thin_remainders() {
        for maps in 1..50 {
            for channels in 1..50 {
                let (bm, bc) = block_sizes(maps, channels);
                assert!(TileSpec::fits(bm, bc));
                for t in tiles_of(maps, channels, 64) {
                    assert!(TileSpec::fits(t.maps, t.channels), "{maps}x{channels}: {t:?}");
                }
            }
        }
        assert_eq!(block_sizes(96, 16), (3, 4));
    }

    #[test]
    fn every_tile_assembles() {
        for m in 1..=12 {
            for c in 1..=12 {
                if TileSpec::fits(m, c) {
                    let spec = TileSpec { maps: m, channels: c, plane_bytes: 4 * 100, dw_row_bytes: 4 * c };
                    assert!(!assemble(&spec).unwrap().is_empty());
                }
            }
        }
    }
}
