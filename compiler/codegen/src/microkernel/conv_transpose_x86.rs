//! Stride-1 transposed convolution of one image (2-D, ungrouped, undilated) as AVX2+FMA
//! machine code, in gather form: each output row is a register tile of up to 12 ymm
//! accumulators (output channels x 8-column vectors) fed by every input row and tap that
//! reaches it. The scatter form of `kernels/conv_transpose.rs` re-loads and re-stores the
//! outputs once per tap in f32x4; here each output is stored once (LeNet's 16 -> 6, 5x5
//! input gradient spent a third of the training step there).
//!
//! Contract of the function [`assemble`] returns (SystemV, four `i64` parameters, no
//! result):
//!
//! `image(xp, w, y, bias)`
//! - `xp`: the image's input with its columns padded: channel `c`, row `iy`, padded
//!   column `jx` at `xp + 4·((c·in_h + iy)·padded_width + jx)`, holding `x[c][iy][jx + lo]`
//!   where `lo = pad_w − (k_w − 1)`, and 0 where `jx + lo` is outside `[0, in_w)`
//!   ([`TransposedSpec::padded_width`], [`TransposedSpec::padded_shift`]);
//! - `w`: the weights `[in_channels, out_channels, k_h, k_w]` as ConvTranspose takes them;
//! - `y`: the image's output `[out_channels, out_h, out_w]`, every element written once;
//! - `bias`: `out_channels` floats when the spec has a bias, else ignored;
//! - `y[m][oy][ox] = bias[m] + Σ_c Σ_ky Σ_kx x[c][oy + pad_h − ky][ox + pad_w − kx]·w[c][m][ky][kx]`
//!   over the rows inside the input (the columns are the padding's business);
//! - any alignment; preserves rbx, rbp, r12-r15 (pushes the ones it uses), ends with
//!   `vzeroupper`.

use std::cell::RefCell;

use cnnc_ir::{DType, Graph, Layout, Node, Op};
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
/// Largest padded input copy (a stack slot of the calling kernel).
pub const MAX_PADDED_BYTES: usize = 64 * 1024;
/// Code-size bound: column tiles x channel blocks, each a few hundred bytes per tap column.
const MAX_TILE_LOOPS: usize = 256;

/// The shape of one node's transposed convolution, all compile-time constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TransposedSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    pub bias: bool,
}

/// Output columns `[first, first + 8·vectors)`, the last vector holding `tail` real lanes.
#[derive(Clone, Copy, Debug)]
struct ColumnTile {
    first: usize,
    vectors: usize,
    tail: usize,
}

impl TransposedSpec {
    /// The spec of a stride-1, undilated, ungrouped 2-D f32 ConvTranspose in plain layout
    /// whose padded input copy fits [`MAX_PADDED_BYTES`]; None for anything else.
    pub fn of_node(g: &Graph, node: &Node) -> Option<TransposedSpec> {
        let Op::ConvTranspose(geometry) = &node.op else {
            return None;
        };
        if node.schedule.layout_in != Layout::Plain || node.schedule.layout_out != Layout::Plain {
            return None;
        }
        let op_inputs = cnnc_ir::verify::op_input_count(node);
        if !(2..=3).contains(&op_inputs) || node.inputs.len() < op_inputs || node.outputs.len() != 1 {
            return None;
        }
        let x = g.ty(node.inputs[0]);
        let w = g.ty(node.inputs[1]);
        let y = g.ty(node.outputs[0]);
        if [x.dtype, w.dtype, y.dtype] != [DType::F32; 3] || x.shape.len() != 4 || w.shape.len() != 4 || y.shape.len() != 4
        {
            return None;
        }
        if op_inputs == 3 && g.ty(node.inputs[2]).dtype != DType::F32 {
            return None;
        }
        if geometry.groups != 1 || geometry.strides != [1, 1] || geometry.dilations != [1, 1] {
            return None;
        }
        if geometry.pads_begin.len() != 2 || x.shape[1] != w.shape[0] || y.shape[1] != w.shape[1] || y.shape[0] != x.shape[0]
        {
            return None;
        }
        let spec = TransposedSpec {
            in_channels: x.shape[1],
            out_channels: w.shape[1],
            in_h: x.shape[2],
            in_w: x.shape[3],
            out_h: y.shape[2],
            out_w: y.shape[3],
            k_h: w.shape[2],
            k_w: w.shape[3],
            pad_h: geometry.pads_begin[0],
            pad_w: geometry.pads_begin[1],
            bias: op_inputs == 3,
        };
        let sizes = [spec.in_channels, spec.out_channels, spec.in_h, spec.in_w, spec.out_h, spec.out_w, spec.k_h, spec.k_w];
        if sizes.contains(&0) || spec.padded_bytes() > MAX_PADDED_BYTES || spec.tile_loops() > MAX_TILE_LOOPS {
            return None;
        }
        // Displacements are 32-bit.
        let largest = spec.out_channels * spec.out_h * spec.out_w * 4 + spec.out_channels * spec.k_h * spec.k_w * 4;
        if largest > i32::MAX as usize / 2 {
            return None;
        }
        Some(spec)
    }

    /// Floats per padded input row: every column the output's 8-wide vectors reach.
    pub fn padded_width(&self) -> usize {
        self.out_w.div_ceil(LANES) * LANES + self.k_w - 1
    }

    /// `lo`: padded column `jx` holds input column `jx + lo`.
    pub fn padded_shift(&self) -> isize {
        self.pad_w as isize - (self.k_w as isize - 1)
    }

    pub fn padded_bytes(&self) -> usize {
        self.in_channels * self.in_h * self.padded_width() * 4
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

    /// `(first channel, channels)` blocks for a tile of `vectors` columns.
    fn channel_blocks(&self, vectors: usize) -> Vec<(usize, usize)> {
        let per_block = ACCUMULATORS / vectors;
        let blocks = self.out_channels.div_ceil(per_block);
        // Balanced blocks: 8 channels as 4 + 4 rather than 6 + 2.
        let base = self.out_channels / blocks;
        let extra = self.out_channels % blocks;
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

    fn tile_loops(&self) -> usize {
        self.column_tiles().iter().map(|t| self.channel_blocks(t.vectors).len()).sum()
    }

    /// The function's symbol (local to the module): distinct specs, distinct names.
    pub fn symbol(&self) -> String {
        let s = self;
        format!(
            "cnnc_conv_transpose_avx2_c{}_m{}_{}x{}_to_{}x{}_k{}x{}_p{}x{}{}",
            s.in_channels,
            s.out_channels,
            s.in_h,
            s.in_w,
            s.out_h,
            s.out_w,
            s.k_h,
            s.k_w,
            s.pad_h,
            s.pad_w,
            if s.bias { "_bias" } else { "" }
        )
    }
}

/// `(xp, w, y, bias)`, all i64, SystemV.
pub fn signature() -> Signature {
    super::registry::sysv_i64_signature(4)
}

thread_local! {
    static REGISTRY: RefCell<Option<FunctionTable>> = const { RefCell::new(None) };
}

/// While alive, [`import`] on this thread finds the functions defined for the graph.
pub struct TransposedConvFunctions {
    _installed: InstalledTable,
}

impl TransposedConvFunctions {
    /// Defines one function per distinct [`TransposedSpec`] of `g`'s ConvTranspose nodes
    /// when the target has AVX2+FMA; elsewhere none (the f32x4 scatter kernel runs).
    pub fn define_for_graph<M: Module>(
        module: &mut M,
        target: &TargetSpec,
        g: &Graph,
    ) -> Result<TransposedConvFunctions, CodegenError> {
        let mut table = FunctionTable::default();
        if available(target) {
            table.define_for_nodes(module, g, &signature(), TransposedSpec::of_node, TransposedSpec::symbol, assemble)?;
        }
        Ok(TransposedConvFunctions { _installed: table.install(&REGISTRY) })
    }
}

/// A reference to the function of `spec` in `func`, when one was defined for the graph
/// being compiled on this thread.
pub fn import(func: &mut Function, spec: &TransposedSpec) -> Option<FuncRef> {
    let id = lookup(&REGISTRY, &spec.symbol())?;
    Some(import_local(func, id, signature()))
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the transposed convolution kernel: {e}"))
}

const XP: AsmRegister64 = rdi;
const W: AsmRegister64 = rsi;
const Y: AsmRegister64 = rdx;
const BIAS: AsmRegister64 = rcx;
const OY: AsmRegister64 = r8;
const ROW: AsmRegister64 = r9;
const KY_LEFT: AsmRegister64 = r10;
const C_LEFT: AsmRegister64 = r11;
const X_ROW: AsmRegister64 = rax;
const W_ROW: AsmRegister64 = rbx;
const X_AT: AsmRegister64 = r12;
const W_AT: AsmRegister64 = r13;

/// The machine code of `spec`.
pub fn assemble(spec: &TransposedSpec) -> Result<Vec<u8>, CodegenError> {
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    let mut mask_table = asm.create_label();
    (|| -> Result<(), IcedError> {
        asm.push(rbx)?;
        asm.push(r12)?;
        asm.push(r13)?;
        for tile in spec.column_tiles() {
            for (first, channels) in spec.channel_blocks(tile.vectors) {
                emit_tile_rows(&mut asm, spec, tile, first, channels, mask_table)?;
            }
        }
        asm.vzeroupper()?;
        asm.pop(r13)?;
        asm.pop(r12)?;
        asm.pop(rbx)?;
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

/// Every output row of one column tile and block of output channels.
fn emit_tile_rows(
    asm: &mut CodeAssembler,
    s: &TransposedSpec,
    tile: ColumnTile,
    first_channel: usize,
    channels: usize,
    mask_table: CodeLabel,
) -> Result<(), IcedError> {
    let vectors = tile.vectors;
    let acc = |m: usize, v: usize| YMM[m * vectors + v];
    let input = |v: usize| YMM[12 + v];
    let broadcast = |m: usize| YMM[14 + m % 2];
    let taps = (s.k_h * s.k_w) as i32;
    let padded_row_bytes = (s.padded_width() * 4) as i32;
    let channel_bytes = padded_row_bytes * s.in_h as i32;
    let weight_channel_bytes = s.out_channels as i32 * taps * 4;
    let plane_bytes = (s.out_h * s.out_w * 4) as i32;

    let mut row_loop = asm.create_label();
    let mut ky_loop = asm.create_label();
    let mut c_loop = asm.create_label();
    let mut store = asm.create_label();

    asm.xor(OY, OY)?;
    asm.set_label(&mut row_loop)?;
    for m in 0..channels {
        if s.bias {
            asm.vbroadcastss(acc(m, 0), dword_ptr(BIAS + ((first_channel + m) * 4) as i32))?;
            for v in 1..vectors {
                asm.vmovaps(acc(m, v), acc(m, 0))?;
            }
        } else {
            for v in 0..vectors {
                asm.vxorps(acc(m, v), acc(m, v), acc(m, v))?;
            }
        }
    }
    // Taps ky with input row iy = oy + pad_h − ky inside [0, in_h):
    // ky in [max(0, oy + pad_h − (in_h − 1)), min(k_h − 1, oy + pad_h)].
    asm.lea(ROW, qword_ptr(OY + s.pad_h as i32))?;
    asm.mov(KY_LEFT, (s.k_h - 1) as u64)?;
    asm.cmp(ROW, KY_LEFT)?;
    asm.cmovl(KY_LEFT, ROW)?;
    asm.xor(X_ROW, X_ROW)?;
    asm.mov(C_LEFT, ROW)?;
    asm.sub(C_LEFT, (s.in_h - 1) as i32)?;
    asm.cmp(C_LEFT, 0)?;
    asm.cmovl(C_LEFT, X_ROW)?;
    // C_LEFT holds the first tap row for now.
    asm.sub(KY_LEFT, C_LEFT)?;
    asm.inc(KY_LEFT)?;
    asm.jle(store)?;
    asm.mov(X_ROW, ROW)?;
    asm.sub(X_ROW, C_LEFT)?;
    asm.imul_3(X_ROW, X_ROW, padded_row_bytes)?;
    asm.add(X_ROW, XP)?;
    asm.imul_3(W_ROW, C_LEFT, s.k_w as i32 * 4)?;
    asm.add(W_ROW, W)?;

    asm.set_label(&mut ky_loop)?;
    asm.mov(X_AT, X_ROW)?;
    asm.mov(W_AT, W_ROW)?;
    asm.mov(C_LEFT, s.in_channels as u64)?;
    asm.set_label(&mut c_loop)?;
    for kx in 0..s.k_w {
        for v in 0..vectors {
            let column = tile.first + v * LANES + s.k_w - 1 - kx;
            asm.vmovups(input(v), ymmword_ptr(X_AT + (column * 4) as i32))?;
        }
        for m in 0..channels {
            let at = ((first_channel + m) as i32 * taps + kx as i32) * 4;
            asm.vbroadcastss(broadcast(m), dword_ptr(W_AT + at))?;
            for v in 0..vectors {
                asm.vfmadd231ps(acc(m, v), input(v), broadcast(m))?;
            }
        }
    }
    asm.add(X_AT, channel_bytes)?;
    asm.add(W_AT, weight_channel_bytes)?;
    asm.dec(C_LEFT)?;
    asm.jnz(c_loop)?;
    asm.sub(X_ROW, padded_row_bytes)?;
    asm.add(W_ROW, s.k_w as i32 * 4)?;
    asm.dec(KY_LEFT)?;
    asm.jnz(ky_loop)?;

    asm.set_label(&mut store)?;
    asm.imul_3(ROW, OY, (s.out_w * 4) as i32)?;
    asm.add(ROW, Y)?;
    let mask = input(0);
    if tile.tail < LANES {
        asm.lea(X_ROW, ptr(mask_table))?;
        asm.vmovups(mask, ymmword_ptr(X_ROW + (4 * (LANES - tile.tail)) as i32))?;
    }
    for m in 0..channels {
        for v in 0..vectors {
            let at = ymmword_ptr(ROW + ((first_channel + m) as i32 * plane_bytes + ((tile.first + v * LANES) * 4) as i32));
            if v + 1 == vectors && tile.tail < LANES {
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

    fn spec(out_w: usize, out_channels: usize) -> TransposedSpec {
        TransposedSpec {
            in_channels: 3,
            out_channels,
            in_h: 4,
            in_w: out_w - 2,
            out_h: 6,
            out_w,
            k_h: 3,
            k_w: 3,
            pad_h: 0,
            pad_w: 0,
            bias: false,
        }
    }

    #[test]
    fn column_tiles_cover_the_row_once() {
        for out_w in 3..60 {
            let tiles = spec(out_w, 6).column_tiles();
            let mut next = 0;
            for t in &tiles {
                assert_eq!(t.first, next);
                assert!((1..=2).contains(&t.vectors) && (1..=LANES).contains(&t.tail));
                next += (t.vectors - 1) * LANES + t.tail;
            }
            assert_eq!(next, out_w);
        }
    }

    #[test]
    fn channel_blocks_fit_the_accumulators() {
        for m in 1..40 {
            for vectors in 1..=2 {
                let blocks = spec(16, m).channel_blocks(vectors);
                assert_eq!(blocks.iter().map(|b| b.1).sum::<usize>(), m);
                assert!(blocks.iter().all(|b| b.1 >= 1 && b.1 * vectors <= ACCUMULATORS));
            }
        }
    }

    #[test]
    fn assembles() {
        assert!(!assemble(&spec(14, 6)).unwrap().is_empty());
    }
}
