//! Ungrouped, unpadded 2-D convolution of one image with few input channels (LeNet's
//! 1 -> 6 and 6 -> 16 5x5 layers) as AVX2+FMA machine code, one output row at a time:
//! a register tile of up to 12 ymm accumulators (output channels x 8-column vectors),
//! per tap two loads of x along the row and one weight broadcast per channel. Taps are
//! compile-time displacements from the row's pointer into x, weights are read as the
//! convolution takes them ([M, C, KH, KW]), and each output is stored once (bias added
//! in registers). The f32x4 direct kernel of `kernels/conv.rs` used 6 of the 16 lanes of
//! its 16-channel tiles on LeNet's first layer; the GEMM path packs an im2col of a
//! 150-deep reduction per 16 channels on the second.
//!
//! Contract of the function [`assemble`] returns (SystemV, four `i64` parameters, no
//! result):
//!
//! `image(x, w, y, bias)`
//! - `x`: one image `[channels, in_h, in_w]`;
//! - `w`: the weights `[maps, channels, k_h, k_w]`;
//! - `y`: the image's output `[maps, out_h, out_w]`, every element written once;
//! - `bias`: `maps` floats when the spec has a bias, else ignored;
//! - `y[m][oy][ox] = bias[m] + Σ_c Σ_ky Σ_kx x[c][oy·s_h + ky·d_h][ox + kx·d_w]·w[m][c][ky][kx]`,
//!   then max(·, 0) when the spec has `relu`
//!   (column stride 1, no padding: every tap reads inside x; the last vector of a row
//!   loads and stores only its real lanes, so nothing past x or y is touched);
//! - any alignment; touches rax, rcx, rdx, rsi, rdi, r8-r11 and ymm0-ymm15, never the
//!   stack; ends with `vzeroupper`.

use std::cell::RefCell;

use cnnc_ir::{ConvGeometry, DType, EpilogueStep, Graph, Layout, Node, Op, UnaryFn};
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
/// Input channels up to this many: beyond it the GEMM path's packed panels win.
pub const MAX_CHANNELS: usize = 8;
/// Code-size bound: tiles (column tiles x channel blocks) x taps unrolled per channel.
const MAX_UNROLLED_TAPS: usize = 2048;

/// One node's convolution, all compile-time constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowConvSpec {
    pub channels: usize,
    pub maps: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub stride_h: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
    pub bias: bool,
    /// The node's epilogue is exactly ReLU, applied in registers before the store
    /// (any other epilogue runs as the in-place pass after the kernel).
    pub relu: bool,
}

/// Output columns `[first, first + 8·vectors)`, the last vector holding `tail` real lanes.
#[derive(Clone, Copy, Debug)]
struct ColumnTile {
    first: usize,
    vectors: usize,
    tail: usize,
}

impl RowConvSpec {
    /// The spec of an f32, plain-layout, ungrouped, unpadded 2-D convolution scheduled on
    /// the direct kernel, with column stride 1, a kernel larger than 1x1 and at most
    /// [`MAX_CHANNELS`] input channels; None for anything else.
    pub fn of_node(g: &Graph, node: &Node) -> Option<RowConvSpec> {
        let Op::Conv(geometry) = &node.op else { return None };
        let s = &node.schedule;
        if s.layout_in != Layout::Plain || s.layout_out != Layout::Plain || s.kernel != "direct" {
            return None;
        }
        let op_inputs = cnnc_ir::verify::op_input_count(node);
        if !(2..=3).contains(&op_inputs) || node.inputs.len() < op_inputs || node.outputs.len() != 1 {
            return None;
        }
        let (x, w, y) = (g.ty(node.inputs[0]), g.ty(node.inputs[1]), g.ty(node.outputs[0]));
        if [x.dtype, w.dtype, y.dtype] != [DType::F32; 3] || x.rank() != 4 || w.rank() != 4 || y.rank() != 4 {
            return None;
        }
        if op_inputs == 3 && g.ty(node.inputs[2]).dtype != DType::F32 {
            return None;
        }
        let spec = Self::from_shapes(geometry, &x.shape, &w.shape, &y.shape)?;
        Some(RowConvSpec {
            bias: op_inputs == 3,
            relu: node.epilogue == [EpilogueStep::Unary(UnaryFn::Relu)],
            ..spec
        })
    }

    /// The spec (without bias or ReLU) of an ungrouped, unpadded 2-D convolution of x
    /// [N, C, H, W] by w [M, C, KH, KW] into y [N, M, OH, OW] that this kernel takes:
    /// column stride 1, a kernel larger than 1x1, at most [`MAX_CHANNELS`] input
    /// channels; None otherwise. `choose-schedule` asks it before scheduling a
    /// convolution on the direct kernel.
    pub fn from_shapes(geometry: &ConvGeometry, x: &[usize], w: &[usize], y: &[usize]) -> Option<RowConvSpec> {
        if x.len() != 4 || w.len() != 4 || y.len() != 4 {
            return None;
        }
        if geometry.groups != 1 || geometry.strides.len() != 2 || geometry.strides[1] != 1 {
            return None;
        }
        if geometry.pads_begin.iter().chain(&geometry.pads_end).any(|&p| p != 0) {
            return None;
        }
        if x[1] != w[1] || y[1] != w[0] || y[0] != x[0] {
            return None;
        }
        let spec = RowConvSpec {
            channels: x[1],
            maps: w[0],
            in_h: x[2],
            in_w: x[3],
            out_h: y[2],
            out_w: y[3],
            k_h: w[2],
            k_w: w[3],
            stride_h: geometry.strides[0],
            dilation_h: geometry.dilations[0],
            dilation_w: geometry.dilations[1],
            bias: false,
            relu: false,
        };
        spec.valid().then_some(spec)
    }

    fn valid(&self) -> bool {
        let s = self;
        let sizes = [s.channels, s.maps, s.in_h, s.in_w, s.out_h, s.out_w, s.k_h, s.k_w, s.stride_h, s.dilation_h, s.dilation_w];
        // 1x1 kernels (plain matrix products) stay on the f32x4 kernel: not measured here.
        if sizes.contains(&0) || s.channels > MAX_CHANNELS || s.k_h * s.k_w == 1 {
            return false;
        }
        let inside = (s.out_h - 1) * s.stride_h + (s.k_h - 1) * s.dilation_h < s.in_h
            && s.out_w - 1 + (s.k_w - 1) * s.dilation_w < s.in_w;
        // Displacements are 32-bit.
        let largest = (s.channels * s.in_h * s.in_w).max(s.maps * s.out_h * s.out_w).max(s.maps * s.channels * s.k_h * s.k_w) * 4;
        inside && largest < i32::MAX as usize / 2 && self.tile_count() * s.k_h * s.k_w <= MAX_UNROLLED_TAPS
    }

    fn column_tiles(&self) -> Vec<ColumnTile> {
        let mut tiles = Vec::new();
        let mut first = 0;
        while first < self.out_w {
            let left = self.out_w - first;
            let vectors = left.div_ceil(LANES).min(2);
            let covered = (vectors * LANES).min(left);
            let tail = covered - (vectors - 1) * LANES;
            tiles.push(ColumnTile { first, vectors, tail });
            first += covered;
        }
        tiles
    }

    /// `(first map, maps)` blocks for a tile of `vectors` columns, balanced (16 maps of
    /// two vectors as 6 + 5 + 5).
    fn map_blocks(&self, vectors: usize) -> Vec<(usize, usize)> {
        let per_block = ACCUMULATORS / vectors;
        let blocks = self.maps.div_ceil(per_block);
        let (base, extra) = (self.maps / blocks, self.maps % blocks);
        let mut first = 0;
        (0..blocks)
            .map(|b| {
                let n = base + usize::from(b < extra);
                let block = (first, n);
                first += n;
                block
            })
            .collect()
    }

    fn tile_count(&self) -> usize {
        self.column_tiles().iter().map(|t| self.map_blocks(t.vectors).len()).sum()
    }

    /// The function's symbol (local to the module): distinct specs, distinct names.
    pub fn symbol(&self) -> String {
        let s = self;
        format!(
            "cnnc_conv_rows_avx2_c{}_m{}_{}x{}_to_{}x{}_k{}x{}_s{}_d{}x{}{}{}",
            s.channels,
            s.maps,
            s.in_h,
            s.in_w,
            s.out_h,
            s.out_w,
            s.k_h,
            s.k_w,
            s.stride_h,
            s.dilation_h,
            s.dilation_w,
            if s.bias { "_bias" } else { "" },
            if s.relu { "_relu" } else { "" }
        )
    }
}

/// Whether `node` runs on a row function defined for this thread's graph that applies the
/// node's whole epilogue (ReLU) itself (`kernels::applies_own_epilogue`).
pub fn applies_epilogue(g: &Graph, node: &Node) -> bool {
    RowConvSpec::of_node(g, node).is_some_and(|spec| spec.relu && lookup(&REGISTRY, &spec.symbol()).is_some())
}

/// `(x, w, y, bias)`, all i64, SystemV.
pub fn signature() -> Signature {
    super::registry::sysv_i64_signature(4)
}

thread_local! {
    static REGISTRY: RefCell<Option<FunctionTable>> = const { RefCell::new(None) };
}

/// While alive, [`import`] on this thread finds the functions defined for the graph.
pub struct RowConvFunctions {
    _installed: InstalledTable,
}

impl RowConvFunctions {
    /// Defines one function per distinct [`RowConvSpec`] of `g`'s convolutions when the
    /// target has AVX2+FMA; elsewhere none (the f32x4 kernel runs).
    pub fn define_for_graph<M: Module>(module: &mut M, target: &TargetSpec, g: &Graph) -> Result<RowConvFunctions, CodegenError> {
        let mut table = FunctionTable::default();
        if available(target) {
            table.define_for_nodes(module, g, &signature(), RowConvSpec::of_node, RowConvSpec::symbol, assemble)?;
        }
        Ok(RowConvFunctions { _installed: table.install(&REGISTRY) })
    }
}

/// A reference to the function of `spec` in `func`, when one was defined for the graph
/// being compiled on this thread.
pub fn import(func: &mut Function, spec: &RowConvSpec) -> Option<FuncRef> {
    let id = lookup(&REGISTRY, &spec.symbol())?;
    Some(import_local(func, id, signature()))
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the row convolution kernel: {e}"))
}

const X: AsmRegister64 = rdi;
const W: AsmRegister64 = rsi;
const Y: AsmRegister64 = rdx;
const BIAS: AsmRegister64 = rcx;
const OY: AsmRegister64 = r8;
const X_AT: AsmRegister64 = r9;
const W_AT: AsmRegister64 = r10;
const C_LEFT: AsmRegister64 = r11;
const SCRATCH: AsmRegister64 = rax;

/// The machine code of `spec`.
pub fn assemble(spec: &RowConvSpec) -> Result<Vec<u8>, CodegenError> {
    if !spec.valid() {
        return Err(CodegenError(format!("internal: row convolution spec {spec:?} does not fit the kernel")));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    let mut mask_table = asm.create_label();
    (|| -> Result<(), IcedError> {
        for tile in spec.column_tiles() {
            for (first, maps) in spec.map_blocks(tile.vectors) {
                emit_tile_rows(&mut asm, spec, tile, first, maps, mask_table)?;
            }
        }
        asm.vzeroupper()?;
        asm.ret()?;
        // 8 lanes of ones then 8 of zeros: the 8 floats from `mask_table + 4·(8 − n)`
        // select the first n lanes.
        asm.set_label(&mut mask_table)?;
        asm.dd(&[u32::MAX; 8])?;
        asm.dd(&[0; 8])
    })()
    .map_err(asm_error)?;
    let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
    Ok(result.inner.code_buffer)
}

/// Every output row of one column tile and block of maps.
fn emit_tile_rows(
    asm: &mut CodeAssembler,
    s: &RowConvSpec,
    tile: ColumnTile,
    first_map: usize,
    maps: usize,
    mask_table: CodeLabel,
) -> Result<(), IcedError> {
    let vectors = tile.vectors;
    let acc = |m: usize, v: usize| YMM[m * vectors + v];
    let input = |v: usize| YMM[12 + v];
    let mask = YMM[14];
    let broadcast = YMM[15];
    let masked = tile.tail < LANES;
    let row_bytes = (s.in_w * 4) as i32;
    let channel_bytes = (s.in_h * s.in_w * 4) as i32;
    let taps = s.k_h * s.k_w;
    let map_weight_bytes = (s.channels * taps * 4) as i32;
    let plane_bytes = (s.out_h * s.out_w * 4) as i32;

    let mut row_loop = asm.create_label();
    let mut channel_loop = asm.create_label();

    if masked {
        asm.lea(SCRATCH, ptr(mask_table))?;
        asm.vmovups(mask, ymmword_ptr(SCRATCH + (4 * (LANES - tile.tail)) as i32))?;
    }
    asm.xor(OY, OY)?;
    asm.set_label(&mut row_loop)?;
    for m in 0..maps {
        if s.bias {
            asm.vbroadcastss(acc(m, 0), dword_ptr(BIAS + ((first_map + m) * 4) as i32))?;
            for v in 1..vectors {
                asm.vmovaps(acc(m, v), acc(m, 0))?;
            }
        } else {
            for v in 0..vectors {
                asm.vxorps(acc(m, v), acc(m, v), acc(m, v))?;
            }
        }
    }
    // x row oy·s_h of channel 0, at the tile's first column.
    asm.imul_3(X_AT, OY, row_bytes * s.stride_h as i32)?;
    asm.lea(X_AT, qword_ptr(X_AT + X + (tile.first * 4) as i32))?;
    asm.lea(W_AT, qword_ptr(W + first_map as i32 * map_weight_bytes))?;
    asm.mov(C_LEFT, s.channels as u64)?;
    asm.set_label(&mut channel_loop)?;
    for ky in 0..s.k_h {
        for kx in 0..s.k_w {
            let at = ky as i32 * s.dilation_h as i32 * row_bytes + (kx * s.dilation_w * 4) as i32;
            for v in 0..vectors {
                let from = ymmword_ptr(X_AT + at + (v * LANES * 4) as i32);
                if masked && v + 1 == vectors {
                    asm.vmaskmovps(input(v), mask, from)?;
                } else {
                    asm.vmovups(input(v), from)?;
                }
            }
            for m in 0..maps {
                let weight = m as i32 * map_weight_bytes + ((ky * s.k_w + kx) * 4) as i32;
                asm.vbroadcastss(broadcast, dword_ptr(W_AT + weight))?;
                for v in 0..vectors {
                    asm.vfmadd231ps(acc(m, v), input(v), broadcast)?;
                }
            }
        }
    }
    asm.add(X_AT, channel_bytes)?;
    asm.add(W_AT, (taps * 4) as i32)?;
    asm.dec(C_LEFT)?;
    asm.jnz(channel_loop)?;

    if s.relu {
        asm.vxorps(broadcast, broadcast, broadcast)?;
        for m in 0..maps {
            for v in 0..vectors {
                asm.vmaxps(acc(m, v), acc(m, v), broadcast)?;
            }
        }
    }
    asm.imul_3(SCRATCH, OY, (s.out_w * 4) as i32)?;
    asm.add(SCRATCH, Y)?;
    for m in 0..maps {
        for v in 0..vectors {
            let at = ymmword_ptr(SCRATCH + ((first_map + m) as i32 * plane_bytes + ((tile.first + v * LANES) * 4) as i32));
            if masked && v + 1 == vectors {
                asm.vmaskmovps(at, mask, acc(m, v))?;
            } else {
                asm.vmovups(at, acc(m, v))?;
            }
        }
    }
    asm.inc(OY)?;
    asm.cmp(OY, s.out_h as i32)?;
    asm.jl(row_loop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(out_w: usize, maps: usize) -> RowConvSpec {
        RowConvSpec {
            channels: 2,
            maps,
            in_h: 8,
            in_w: out_w + 4,
            out_h: 4,
            out_w,
            k_h: 5,
            k_w: 5,
            stride_h: 1,
            dilation_h: 1,
            dilation_w: 1,
            bias: true,
            relu: true,
        }
    }

    #[test]
    fn column_tiles_cover_the_row_once() {
        for out_w in 1..60 {
            let mut next = 0;
            for t in spec(out_w, 6).column_tiles() {
                assert_eq!(t.first, next);
                assert!((1..=2).contains(&t.vectors) && (1..=LANES).contains(&t.tail));
                next += (t.vectors - 1) * LANES + t.tail;
            }
            assert_eq!(next, out_w);
        }
    }

    #[test]
    fn map_blocks_fit_the_accumulators() {
        for maps in 1..40 {
            for vectors in 1..=2 {
                let blocks = spec(16, maps).map_blocks(vectors);
                assert_eq!(blocks.iter().map(|b| b.1).sum::<usize>(), maps);
                assert!(blocks.iter().all(|b| b.1 >= 1 && b.1 * vectors <= ACCUMULATORS));
            }
        }
    }

    #[test]
    fn assembles() {
        assert!(!assemble(&spec(28, 6)).unwrap().is_empty());
        assert!(!assemble(&spec(10, 16)).unwrap().is_empty());
    }
}
