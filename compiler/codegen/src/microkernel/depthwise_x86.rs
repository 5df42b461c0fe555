//! Depthwise convolution over channel blocks of 8 (NCHWc8) as AVX2+FMA machine code:
//! every tap of every output position is one `vfmadd231ps` of an 8-channel weight
//! vector with an 8-channel input vector read straight from memory, so the lanes are
//! full whatever the width of the map (the NCHW kernel vectorises along W and wastes
//! most lanes on 14x14 and 7x7 maps).
//!
//! Contract of the function [`assemble`] returns (SystemV, five `i64` parameters, no
//! result):
//!
//! `depthwise(x, w, bias, y, blocks)`
//! - for each of `blocks` channel blocks `cb` (`blocks >= 0`): the input plane at
//!   `x + cb·H·W·32` bytes, [H][W][8] floats; the weights at `w + cb·kh·kw·32`,
//!   [kh][kw][8] (re-laid out at compile time); with a bias, 8 floats at
//!   `bias + cb·32` (`bias` is ignored otherwise); the output plane at
//!   `y + cb·OH·OW·32`, [OH][OW][8];
//! - `y[oh][ow][l] = bias[l] + sum over the taps inside the input of
//!   w[r][s][l] · x[oh·sh − pad_top + r·dh][ow·sw − pad_left + s·dw][l]`, then the
//!   spec's inline steps (ReLU, clip);
//! - any alignment; touches rax, rcx, rdx, rsi, rdi, r8-r11, ymm0-ymm15, saves and
//!   restores rbx and r12, and ends with `vzeroupper`.
//!
//! Geometry is compile-time: output rows are cut into segments with a fixed range of
//! kernel rows inside the input (`AxisWindow::segments`), each segment one loop over
//! identical code; within a row, the columns whose windows are whole run in a loop of
//! tiles of `P` positions, the others (borders, and the remainder of the loop) as
//! groups of positions at compile-time displacements whose taps in the padding are
//! simply left out. Kernels of up to 9 taps keep their weights in registers for the
//! whole block (P = 7 accumulators for 3x3); larger ones load each tap's weight once
//! per group (P = 14).

use cnnc_ir::UnaryFn;
use iced_x86::code_asm::*;

use crate::kernels::CodegenError;
use crate::kernels::compute::window::{AxisWindow, Segment};

/// Channels per block (one ymm register of f32).
pub const BLOCK: usize = 8;
const VECTOR_BYTES: i64 = (BLOCK * 4) as i64;

/// Kernels with at most this many taps keep their weights in registers.
const MAX_PRELOADED_TAPS: usize = 9;

/// What one function computes.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthwiseSpec {
    pub rows: AxisWindow,
    pub cols: AxisWindow,
    pub bias: bool,
    /// Steps applied before the store; only those [`inline_step`] accepts.
    pub steps: Vec<UnaryFn>,
}

/// Whether the machine code applies `f` itself (the piecewise-linear steps that
/// need no more than one scratch register).
pub fn inline_step(f: UnaryFn) -> bool {
    match f {
        UnaryFn::Relu => true,
        UnaryFn::Clip { min, max } => !min.is_nan() && !max.is_nan(),
        _ => false,
    }
}

static YMM: [AsmRegisterYmm; 16] = [
    ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15,
];

// Arguments (SystemV) and loop registers.
const X: AsmRegister64 = rdi;
const W: AsmRegister64 = rsi;
const BIAS: AsmRegister64 = rdx;
const Y: AsmRegister64 = rcx;
const BLOCKS: AsmRegister64 = r8;
const X_ROW: AsmRegister64 = r9;
const Y_ROW: AsmRegister64 = r10;
const ROWS_LEFT: AsmRegister64 = r11;
const X_COL: AsmRegister64 = rax;
const Y_COL: AsmRegister64 = rbx;
const TILES_LEFT: AsmRegister64 = r12;

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling a blocked depthwise kernel: {e}"))
}

/// How registers are shared between weights, accumulators and the epilogue.
#[derive(Clone, Copy, Debug)]
struct Registers {
    preloaded: bool,
    /// First accumulator register and how many.
    first_acc: usize,
    positions: usize,
    /// The epilogue's scratch register, and whether it holds a weight (reloaded after).
    scratch: usize,
    scratch_is_weight: bool,
}

impl Registers {
    fn for_taps(taps: usize) -> Registers {
        if taps <= MAX_PRELOADED_TAPS {
            let positions = (16 - taps).min(8);
            let scratch_is_weight = taps + positions == 16;
            Registers {
                preloaded: true,
                first_acc: taps,
                positions,
                scratch: if scratch_is_weight { taps - 1 } else { 15 },
                scratch_is_weight,
            }
        } else {
            // ymm0: the tap's weight; ymm15: scratch.
            Registers {
                preloaded: false,
                first_acc: 1,
                positions: 14,
                scratch: 15,
                scratch_is_weight: false,
            }
        }
    }
}

/// Output positions per group of accumulators (what the tiles of the column loop hold).
pub fn positions_per_group(spec: &DepthwiseSpec) -> usize {
    Registers::for_taps(spec.rows.kernel * spec.cols.kernel).positions
}

/// One output position of a group: displacements from the group's base registers and
/// the kernel columns whose taps read the input.
#[derive(Clone, Copy, Debug)]
struct Position {
    x_disp: i64,
    y_disp: i64,
    tap_begin: usize,
    tap_end: usize,
}

struct Emitter<'a> {
    asm: &'a mut CodeAssembler,
    spec: &'a DepthwiseSpec,
    regs: Registers,
    constants: Vec<(u32, CodeLabel)>,
    /// Bytes per input row.
    row_bytes: i64,
}

/// The machine code of `spec` (position-independent: constants follow the code).
pub fn assemble(spec: &DepthwiseSpec) -> Result<Vec<u8>, CodegenError> {
    let (taps_r, taps_c) = (spec.rows.kernel, spec.cols.kernel);
    if taps_r == 0 || taps_c == 0 || spec.rows.stride == 0 || spec.cols.stride == 0 {
        return Err(CodegenError(format!("blocked depthwise kernel of an empty window: {spec:?}")));
    }
    if let Some(f) = spec.steps.iter().find(|&&f| !inline_step(f)) {
        return Err(CodegenError(format!(
            "blocked depthwise machine code cannot apply {f:?} (only ReLU and clip)"
        )));
    }
    let limit = i32::MAX as i64 / 4;
    let input_bytes = (spec.rows.input * spec.cols.input) as i64 * VECTOR_BYTES;
    let output_bytes = (spec.rows.output * spec.cols.output) as i64 * VECTOR_BYTES;
    if input_bytes > limit || output_bytes > limit {
        return Err(CodegenError(format!(
            "blocked depthwise planes of {input_bytes} / {output_bytes} bytes exceed 32-bit displacements"
        )));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    let mut e = Emitter {
        asm: &mut asm,
        spec,
        regs: Registers::for_taps(taps_r * taps_c),
        constants: Vec::new(),
        row_bytes: spec.cols.input as i64 * VECTOR_BYTES,
    };
    e.body().map_err(asm_error)?;
    let constants = std::mem::take(&mut e.constants);
    (|| -> Result<(), IcedError> {
        for (bits, mut label) in constants {
            asm.set_label(&mut label)?;
            asm.dd(&[bits; 8])?;
        }
        Ok(())
    })()
    .map_err(asm_error)?;
    let result = asm.assemble(0).map_err(asm_error)?;
    Ok(result)
}

impl Emitter<'_> {
    fn constant(&mut self, v: f32) -> AsmMemoryOperand {
        let bits = v.to_bits();
        if let Some(&(_, l)) = self.constants.iter().find(|(b, _)| *b == bits) {
            return ymmword_ptr(l);
        }
        let l = self.asm.create_label();
        self.constants.push((bits, l));
        ymmword_ptr(l)
    }

    fn taps(&self) -> usize {
        self.spec.rows.kernel * self.spec.cols.kernel
    }

    fn load_weights(&mut self) -> Result<(), IcedError> {
        if self.regs.preloaded {
            for (t, &register) in YMM.iter().enumerate().take(self.taps()) {
                self.asm.vmovups(register, ymmword_ptr(W + (t as i64 * VECTOR_BYTES) as i32))?;
            }
        }
        Ok(())
    }

    fn body(&mut self) -> Result<(), IcedError> {
        let mut done = self.asm.create_label();
        let mut block_loop = self.asm.create_label();
        self.asm.push(rbx)?;
        self.asm.push(r12)?;
        self.asm.test(BLOCKS, BLOCKS)?;
        self.asm.jle(done)?;
        self.asm.set_label(&mut block_loop)?;
        self.load_weights()?;
        let (rows, cols) = (self.spec.rows, self.spec.cols);
        for segment in rows.segments() {
            self.row_segment(&segment)?;
        }
        let plane_in = (rows.input * cols.input) as i64 * VECTOR_BYTES;
        let plane_out = (rows.output * cols.output) as i64 * VECTOR_BYTES;
        self.asm.add(X, plane_in as i32)?;
        self.asm.add(Y, plane_out as i32)?;
        self.asm.add(W, (self.taps() as i64 * VECTOR_BYTES) as i32)?;
        if self.spec.bias {
            self.asm.add(BIAS, VECTOR_BYTES as i32)?;
        }
        self.asm.dec(BLOCKS)?;
        self.asm.jnz(block_loop)?;
        self.asm.set_label(&mut done)?;
        self.asm.pop(r12)?;
        self.asm.pop(rbx)?;
        self.asm.vzeroupper()?;
        self.asm.ret()?;
        Ok(())
    }

    /// Output rows `[start, start + count)`, all reading kernel rows
    /// `[tap_begin, tap_end)`: one loop over the same row code.
    fn row_segment(&mut self, s: &Segment) -> Result<(), IcedError> {
        let rows = self.spec.rows;
        let out_row_bytes = self.spec.cols.output as i64 * VECTOR_BYTES;
        // The window origin's row, possibly above the plane: never read there, as only
        // kernel rows [tap_begin, tap_end) are.
        let x_start = rows.origin(s.start) * self.row_bytes;
        self.asm.lea(X_ROW, ptr(X + x_start as i32))?;
        self.asm.lea(Y_ROW, ptr(Y + (s.start as i64 * out_row_bytes) as i32))?;
        let mut row_loop = self.asm.create_label();
        if s.count > 1 {
            self.asm.mov(ROWS_LEFT, s.count as u64)?;
            self.asm.set_label(&mut row_loop)?;
        }
        self.row(s.tap_begin, s.tap_end)?;
        if s.count > 1 {
            self.asm.add(X_ROW, (rows.stride as i64 * self.row_bytes) as i32)?;
            self.asm.add(Y_ROW, out_row_bytes as i32)?;
            self.asm.dec(ROWS_LEFT)?;
            self.asm.jnz(row_loop)?;
        }
        Ok(())
    }

    /// One output row at `Y_ROW` from the window rows at `X_ROW`.
    fn row(&mut self, row_begin: usize, row_end: usize) -> Result<(), IcedError> {
        let cols = self.spec.cols;
        let p = self.regs.positions;
        let at = |o: usize, s: &Segment| Position {
            x_disp: cols.origin(o) * VECTOR_BYTES,
            y_disp: o as i64 * VECTOR_BYTES,
            tap_begin: s.tap_begin,
            tap_end: s.tap_end,
        };
        let mut fixed: Vec<Position> = Vec::new();
        for s in cols.segments() {
            let whole = s.tap_begin == 0 && s.tap_end == cols.kernel;
            let tiles = if whole { s.count / p } else { 0 };
            // Two tiles or fewer are as short unrolled as in a loop.
            if tiles <= 2 {
                fixed.extend((s.start..s.start + s.count).map(|o| at(o, &s)));
                continue;
            }
            self.asm.lea(X_COL, ptr(X_ROW + (cols.origin(s.start) * VECTOR_BYTES) as i32))?;
            self.asm.lea(Y_COL, ptr(Y_ROW + (s.start as i64 * VECTOR_BYTES) as i32))?;
            self.asm.mov(TILES_LEFT, tiles as u64)?;
            let mut tile_loop = self.asm.create_label();
            self.asm.set_label(&mut tile_loop)?;
            let tile: Vec<Position> = (0..p)
                .map(|i| Position {
                    x_disp: (i * cols.stride) as i64 * VECTOR_BYTES,
                    y_disp: i as i64 * VECTOR_BYTES,
                    tap_begin: 0,
                    tap_end: cols.kernel,
                })
                .collect();
            self.group(X_COL, Y_COL, &tile, row_begin, row_end)?;
            self.asm.add(X_COL, ((p * cols.stride) as i64 * VECTOR_BYTES) as i32)?;
            self.asm.add(Y_COL, (p as i64 * VECTOR_BYTES) as i32)?;
            self.asm.dec(TILES_LEFT)?;
            self.asm.jnz(tile_loop)?;
            fixed.extend((s.start + tiles * p..s.start + s.count).map(|o| at(o, &s)));
        }
        for chunk in fixed.chunks(p) {
            self.group(X_ROW, Y_ROW, chunk, row_begin, row_end)?;
        }
        Ok(())
    }

    /// Computes and stores the positions of one group (at most `positions`).
    fn group(
        &mut self,
        x: AsmRegister64,
        y: AsmRegister64,
        positions: &[Position],
        row_begin: usize,
        row_end: usize,
    ) -> Result<(), IcedError> {
        let (rows, cols) = (self.spec.rows, self.spec.cols);
        let first_acc = self.regs.first_acc;
        let acc = move |i: usize| YMM[first_acc + i];
        for i in 0..positions.len() {
            if self.spec.bias {
                self.asm.vmovups(acc(i), ymmword_ptr(BIAS))?;
            } else {
                self.asm.vxorps(acc(i), acc(i), acc(i))?;
            }
        }
        for r in row_begin..row_end {
            for c in 0..cols.kernel {
                let users: Vec<usize> = (0..positions.len())
                    .filter(|&i| (positions[i].tap_begin..positions[i].tap_end).contains(&c))
                    .collect();
                if users.is_empty() {
                    continue;
                }
                let tap = r * cols.kernel + c;
                let weight = if self.regs.preloaded {
                    YMM[tap]
                } else {
                    self.asm.vmovups(ymm0, ymmword_ptr(W + (tap as i64 * VECTOR_BYTES) as i32))?;
                    ymm0
                };
                let tap_disp =
                    (r * rows.dilation) as i64 * self.row_bytes + (c * cols.dilation) as i64 * VECTOR_BYTES;
                for i in users {
                    let disp = positions[i].x_disp + tap_disp;
                    self.asm.vfmadd231ps(acc(i), weight, ymmword_ptr(x + disp as i32))?;
                }
            }
        }
        let steps = self.spec.steps.clone();
        if !steps.is_empty() {
            let scratch = YMM[self.regs.scratch];
            for f in steps {
                let bounds: Vec<(bool, f32)> = match f {
                    UnaryFn::Relu => vec![(true, 0.0)],
                    UnaryFn::Clip { min, max } => vec![(true, min), (false, max)],
                    _ => Vec::new(),
                };
                for (is_max, v) in bounds {
                    let m = self.constant(v);
                    self.asm.vmovups(scratch, m)?;
                    // x < v ? v : x (NaN x stays): vmaxps d, s1, s2 = s1 > s2 ? s1 : s2.
                    for i in 0..positions.len() {
                        if is_max {
                            self.asm.vmaxps(acc(i), scratch, acc(i))?;
                        } else {
                            self.asm.vminps(acc(i), scratch, acc(i))?;
                        }
                    }
                }
            }
            if self.regs.scratch_is_weight {
                let tap = self.regs.scratch;
                self.asm.vmovups(scratch, ymmword_ptr(W + (tap as i64 * VECTOR_BYTES) as i32))?;
            }
        }
        for (i, pos) in positions.iter().enumerate() {
            self.asm.vmovups(ymmword_ptr(y + pos.y_disp as i32), acc(i))?;
        }
        Ok(())
    }
}

/// The weights [C, 1, kh, kw] re-laid out as [C/8][kh][kw][8] (`channels % 8 == 0`).
pub fn block_weights(weights: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0.0; channels * taps];
    for c in 0..channels {
        let (cb, lane) = (c / BLOCK, c % BLOCK);
        for t in 0..taps {
            out[(cb * taps + t) * BLOCK + lane] = weights[c * taps + t];
        }
    }
    out
}
