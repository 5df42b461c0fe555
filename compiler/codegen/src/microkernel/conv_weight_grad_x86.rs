//! The weight gradient of an ungrouped 2-D convolution with few input channels (LeNet's
//! 6 -> 16 and 1 -> 6 5x5 layers) as AVX2+FMA machine code over one image at a time:
//! dwᵀ[tap, m] += Σ_o x[tap-shifted o]·dy[m, o], a product of the (never materialised)
//! im2col rows of x with dy channels-last. Output maps are the vector lanes (8 per ymm,
//! up to 16 per panel), kernel taps (c, kh, kw) the rows of a register tile (6 rows of 2
//! ymm or 12 rows of 1): per output position one or two loads of dy and one broadcast of
//! x per row feed 12 FMAs. Each tap is a compile-time displacement from the position's
//! pointer into x, so x is read in place: no stacked taps, slices, concat or transposes
//! of x (the matrix form spent ~25% of LeNet's training step on them and a product with
//! 16 columns).
//!
//! Contract of the function [`assemble`] returns (SystemV, three `i64` parameters, no
//! result):
//!
//! `image(x, dy_t, dw_t)`
//! - `x`: one image `[channels, in_h, in_w]`;
//! - `dy_t`: that image's output gradient channels-last, `[out_h·out_w, padded_maps]`
//!   ([`WeightGradSpec::padded_maps`]: maps rounded up to 8; the pad lanes may hold
//!   anything finite -- their sums land in pad lanes of `dw_t` only);
//! - `dw_t`: the running sums `[taps, padded_maps]`, tap t = (c·k_h + kh)·k_w + kw;
//! - `dw_t[t][m] += Σ_{oh, ow} dy_t[oh·out_w + ow][m] · x[c][oh·s_h + kh·d_h][ow·s_w + kw·d_w]`;
//! - no padding: every tap reads inside x ([`WeightGradSpec::of_node`] checks it);
//! - any alignment; touches rax, rcx, rsi, rdi, rdx, r8-r11 and ymm0-ymm15, never the
//!   stack; ends with `vzeroupper`.

use std::cell::RefCell;

use cnnc_ir::{ConvGeometry, DType, Graph, Layout, Node, Op};
use cranelift_codegen::ir::{FuncRef, Function, Signature};
use cranelift_module::Module;
use iced_x86::code_asm::*;

use super::activation::available;
use super::registry::{FunctionTable, InstalledTable, import_local, lookup};
use crate::kernels::CodegenError;
use crate::target::TargetSpec;
use super::x86::YMM;

const LANES: usize = 8;
const ACCUMULATORS: usize = 12;
/// Largest per-call scratch (dy channels-last of one image and the running sums): a stack
/// slot of the calling kernel.
pub const MAX_SCRATCH_BYTES: usize = 64 * 1024;
/// Code-size bound: register tiles (each a few hundred bytes).
const MAX_TILES: usize = 512;

/// One node's weight gradient, all compile-time constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightGradSpec {
    pub channels: usize,
    pub maps: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
}

/// A register tile: taps `[first_tap, first_tap + taps)` x ymm vectors
/// `[first_vector, first_vector + vectors)` of the padded maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tile {
    first_tap: usize,
    taps: usize,
    first_vector: usize,
    vectors: usize,
}

impl WeightGradSpec {
    /// The spec of an f32, plain-layout, ungrouped, unpadded 2-D `ConvWeightGrad` whose
    /// taps all read inside x and whose scratch fits [`MAX_SCRATCH_BYTES`]; None for
    /// anything else.
    pub fn of_node(g: &Graph, node: &Node) -> Option<WeightGradSpec> {
        let Op::ConvWeightGrad(geometry) = &node.op else { return None };
        if node.schedule.layout_in != Layout::Plain || node.schedule.layout_out != Layout::Plain {
            return None;
        }
        if node.inputs.len() != 2 || node.outputs.len() != 1 {
            return None;
        }
        let (x, dy, dw) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        if [x.dtype, dy.dtype, dw.dtype] != [DType::F32; 3] || x.rank() != 4 || dy.rank() != 4 || dw.rank() != 4 {
            return None;
        }
        Self::from_shapes(geometry, &x.shape, &dy.shape, &dw.shape)
    }

    /// The spec of an ungrouped, unpadded 2-D weight gradient of x [N, C, H, W], dy
    /// [N, M, OH, OW] into dw [M, C, KH, KW] that this kernel takes; None otherwise.
    pub fn from_shapes(geometry: &ConvGeometry, x: &[usize], dy: &[usize], dw: &[usize]) -> Option<WeightGradSpec> {
        if x.len() != 4 || dy.len() != 4 || dw.len() != 4 {
            return None;
        }
        if geometry.groups != 1 || geometry.pads_begin.len() != 2 || geometry.pads_begin.iter().any(|&p| p != 0) {
            return None;
        }
        if x[0] != dy[0] || dw[0] != dy[1] || dw[1] != x[1] {
            return None;
        }
        let spec = WeightGradSpec {
            channels: x[1],
            maps: dy[1],
            in_h: x[2],
            in_w: x[3],
            out_h: dy[2],
            out_w: dy[3],
            k_h: dw[2],
            k_w: dw[3],
            stride_h: geometry.strides[0],
            stride_w: geometry.strides[1],
            dilation_h: geometry.dilations[0],
            dilation_w: geometry.dilations[1],
        };
        // `kernels::conv_weight_grad`'s pointwise path takes these first.
        let pointwise = spec.k_h * spec.k_w == 1 && spec.stride_h == 1 && spec.stride_w == 1 && x[2..] == dy[2..];
        if pointwise && spec.channels * spec.maps > 1 {
            return None;
        }
        spec.valid().then_some(spec)
    }

    fn valid(&self) -> bool {
        let s = self;
        let sizes = [s.channels, s.maps, s.in_h, s.in_w, s.out_h, s.out_w, s.k_h, s.k_w, s.stride_h, s.stride_w];
        if sizes.contains(&0) || s.dilation_h == 0 || s.dilation_w == 0 {
            return false;
        }
        let reach = |out: usize, stride: usize, k: usize, d: usize| (out - 1) * stride + (k - 1) * d + 1;
        let inside = reach(s.out_h, s.stride_h, s.k_h, s.dilation_h) <= s.in_h
            && reach(s.out_w, s.stride_w, s.k_w, s.dilation_w) <= s.in_w;
        // Displacements are 32-bit.
        let image_bytes = s.channels * s.in_h * s.in_w * 4;
        inside
            && image_bytes < i32::MAX as usize / 2
            && s.scratch_bytes() <= MAX_SCRATCH_BYTES
            && s.tiles().len() <= MAX_TILES
    }

    pub fn taps(&self) -> usize {
        self.channels * self.k_h * self.k_w
    }

    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }

    pub fn padded_maps(&self) -> usize {
        self.maps.div_ceil(LANES) * LANES
    }

    /// Bytes of `dy_t` (at offset 0) and `dw_t` (at [`Self::dy_t_bytes`]).
    pub fn scratch_bytes(&self) -> usize {
        self.dy_t_bytes() + self.taps() * self.padded_maps() * 4
    }

    pub fn dy_t_bytes(&self) -> usize {
        self.positions() * self.padded_maps() * 4
    }

    /// Panels of at most 2 vectors, each split into balanced blocks of taps (12 rows of
    /// one vector, 6 of two).
    fn tiles(&self) -> Vec<Tile> {
        let vectors = self.padded_maps() / LANES;
        let taps = self.taps();
        let mut tiles = Vec::new();
        let mut first_vector = 0;
        while first_vector < vectors {
            let panel = (vectors - first_vector).min(2);
            let rows = ACCUMULATORS / panel;
            let blocks = taps.div_ceil(rows);
            let (base, extra) = (taps / blocks, taps % blocks);
            let mut first_tap = 0;
            for block in 0..blocks {
                let n = base + usize::from(block < extra);
                tiles.push(Tile { first_tap, taps: n, first_vector, vectors: panel });
                first_tap += n;
            }
            first_vector += panel;
        }
        tiles
    }

    /// Byte offset in x of tap t at output position (0, 0).
    fn tap_displacement(&self, tap: usize) -> i32 {
        let (c, kh, kw) = (tap / (self.k_h * self.k_w), (tap / self.k_w) % self.k_h, tap % self.k_w);
        ((c * self.in_h * self.in_w + kh * self.dilation_h * self.in_w + kw * self.dilation_w) * 4) as i32
    }

    /// The function's symbol (local to the module): distinct specs, distinct names.
    pub fn symbol(&self) -> String {
        let s = self;
        format!(
            "cnnc_conv_wgrad_avx2_c{}_m{}_{}x{}_to_{}x{}_k{}x{}_s{}x{}_d{}x{}",
            s.channels,
            s.maps,
            s.in_h,
            s.in_w,
            s.out_h,
            s.out_w,
            s.k_h,
            s.k_w,
            s.stride_h,
            s.stride_w,
            s.dilation_h,
            s.dilation_w
        )
    }
}

/// `(x, dy_t, dw_t)`, all i64, SystemV.
pub fn signature() -> Signature {
    super::registry::sysv_i64_signature(3)
}

thread_local! {
    static REGISTRY: RefCell<Option<FunctionTable>> = const { RefCell::new(None) };
}

/// While alive, [`import`] on this thread finds the functions defined for the graph.
pub struct WeightGradFunctions {
    _installed: InstalledTable,
}

impl WeightGradFunctions {
    /// Defines one function per distinct [`WeightGradSpec`] of `g`'s nodes when the
    /// target has AVX2+FMA; elsewhere none (the f32x4 kernel runs).
    pub fn define_for_graph<M: Module>(module: &mut M, target: &TargetSpec, g: &Graph) -> Result<WeightGradFunctions, CodegenError> {
        let mut table = FunctionTable::default();
        if available(target) {
            table.define_for_nodes(module, g, &signature(), WeightGradSpec::of_node, WeightGradSpec::symbol, assemble)?;
        }
        Ok(WeightGradFunctions { _installed: table.install(&REGISTRY) })
    }
}

/// A reference to the function of `spec` in `func`, when one was defined for the graph
/// being compiled on this thread.
pub fn import(func: &mut Function, spec: &WeightGradSpec) -> Option<FuncRef> {
    let id = lookup(&REGISTRY, &spec.symbol())?;
    Some(import_local(func, id, signature()))
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the convolution weight-gradient kernel: {e}"))
}

const X: AsmRegister64 = rdi;
const DY_T: AsmRegister64 = rsi;
const DW_T: AsmRegister64 = rdx;
const ROWS_LEFT: AsmRegister64 = rcx;
const COLUMNS_LEFT: AsmRegister64 = r8;
const X_AT: AsmRegister64 = r9;
const DY_AT: AsmRegister64 = r10;

/// The machine code of `spec`.
pub fn assemble(spec: &WeightGradSpec) -> Result<Vec<u8>, CodegenError> {
    if !spec.valid() {
        return Err(CodegenError(format!("internal: weight-gradient spec {spec:?} does not fit the kernel")));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    (|| -> Result<(), IcedError> {
        for tile in spec.tiles() {
            emit_tile(&mut asm, spec, tile)?;
        }
        asm.vzeroupper()?;
        asm.ret()
    })()
    .map_err(asm_error)?;
    let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
    Ok(result.inner.code_buffer)
}

/// One register tile over every output position of the image.
fn emit_tile(asm: &mut CodeAssembler, s: &WeightGradSpec, tile: Tile) -> Result<(), IcedError> {
    let vectors = tile.vectors;
    let acc = |r: usize, v: usize| YMM[r * vectors + v];
    let gradient = |v: usize| YMM[12 + v];
    // The broadcast registers left over, rotated so consecutive rows do not share one.
    let spare: Vec<AsmRegisterYmm> = (12 + vectors..16).map(|i| YMM[i]).collect();
    let row_bytes = (s.padded_maps() * 4) as i32;
    let sums_at = |r: usize, v: usize| {
        let tap = tile.first_tap + r;
        ymmword_ptr(DW_T + (tap as i32 * row_bytes + ((tile.first_vector + v) * LANES * 4) as i32))
    };
    let mut row_loop = asm.create_label();
    let mut column_loop = asm.create_label();

    for r in 0..tile.taps {
        for v in 0..vectors {
            asm.vmovups(acc(r, v), sums_at(r, v))?;
        }
    }
    asm.mov(X_AT, X)?;
    asm.lea(DY_AT, qword_ptr(DY_T + (tile.first_vector * LANES * 4) as i32))?;
    asm.mov(ROWS_LEFT, s.out_h as u64)?;
    asm.set_label(&mut row_loop)?;
    asm.mov(COLUMNS_LEFT, s.out_w as u64)?;
    asm.set_label(&mut column_loop)?;
    for v in 0..vectors {
        asm.vmovups(gradient(v), ymmword_ptr(DY_AT + (v * LANES * 4) as i32))?;
    }
    for r in 0..tile.taps {
        let broadcast = spare[r % spare.len()];
        asm.vbroadcastss(broadcast, dword_ptr(X_AT + s.tap_displacement(tile.first_tap + r)))?;
        for v in 0..vectors {
            asm.vfmadd231ps(acc(r, v), gradient(v), broadcast)?;
        }
    }
    asm.add(X_AT, (s.stride_w * 4) as i32)?;
    asm.add(DY_AT, row_bytes)?;
    asm.dec(COLUMNS_LEFT)?;
    asm.jnz(column_loop)?;
    let next_row = (s.stride_h * s.in_w) as i64 - (s.out_w * s.stride_w) as i64;
    asm.add(X_AT, (next_row * 4) as i32)?;
    asm.dec(ROWS_LEFT)?;
    asm.jnz(row_loop)?;
    for r in 0..tile.taps {
        for v in 0..vectors {
            asm.vmovups(sums_at(r, v), acc(r, v))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(channels: usize, maps: usize) -> WeightGradSpec {
        WeightGradSpec {
            channels,
            maps,
            in_h: 14,
            in_w: 14,
            out_h: 10,
            out_w: 10,
            k_h: 5,
            k_w: 5,
            stride_h: 1,
            stride_w: 1,
            dilation_h: 1,
            dilation_w: 1,
        }
    }

    #[test]
    fn tiles_cover_every_tap_and_vector_once() {
        for channels in 1..8 {
            for maps in 1..40 {
                let s = spec(channels, maps);
                let mut covered = vec![0; s.taps() * s.padded_maps() / LANES];
                for t in s.tiles() {
                    assert!(t.taps >= 1 && t.taps * t.vectors <= ACCUMULATORS && (1..=2).contains(&t.vectors));
                    for tap in t.first_tap..t.first_tap + t.taps {
                        for v in t.first_vector..t.first_vector + t.vectors {
                            covered[tap * s.padded_maps() / LANES + v] += 1;
                        }
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "{channels} x {maps}");
            }
        }
    }

    #[test]
    fn assembles() {
        assert!(!assemble(&spec(6, 16)).unwrap().is_empty());
        assert!(!assemble(&spec(1, 6)).unwrap().is_empty());
    }
}
