//! 1x1 convolution over channel blocks of 8 (NCHWc8) as AVX2+FMA machine code: a GEMM
//! tile with output positions as rows and output channels as columns (one or two
//! blocks of 8), A read straight from the blocked input, B the weights packed at
//! compile time.
//!
//! Contract of the function [`assemble`] returns (SystemV, four `i64` parameters, no
//! result):
//!
//! `tile(a, b, c, residual)`
//! - `a`: input channel block 0 at the tile's first position; row (position) `i`'s
//!   8 channels of block `kb` at `a + kb·a_block_bytes + i·a_row_bytes`;
//! - `b`: the packed panel: for each input channel `kk`, `8·blocks` weights
//!   `W[m0 + j][kk]`; then, with a bias, `8·blocks` biases;
//! - `c`: output block 0 at the tile's first position; row `i`, block `v` at
//!   `c + v·c_block_bytes + i·32`;
//! - `y[i][j] = bias[j] + Σ_kk A[i][kk]·B[kk][j]`, then the steps in order, where a
//!   residual add reads `residual` at the offsets of `c`;
//! - a slice of a longer reduction (weights too large to stay in L1 whole) may start
//!   from the partial sums at `c` instead of zero (`accumulate`) and, unless it is the
//!   last slice (`finish`), store its sums without the bias and steps;
//! - any alignment; touches rax, rcx, rdx, rsi, rdi, ymm0-ymm15; ends with `vzeroupper`.
//!
//! All sizes are compile-time constants of the function (one per convolution): the
//! k loop runs over input blocks, eight unrolled k steps each, so K = 8·k_blocks has
//! no remainder.

use iced_x86::code_asm::*;

use super::store_epilogue::StoreStep;
use crate::kernels::CodegenError;
use super::x86::YMM;

/// Channels per block (one ymm register of f32).
pub const BLOCK: usize = 8;
/// Most positions per tile: 6 rows x 2 blocks = 12 accumulators, plus 2 B vectors and
/// 2 broadcast registers, fill the 16 ymm registers.
pub const MAX_ROWS: usize = 6;

/// What one function computes.
#[derive(Clone, Debug, PartialEq)]
pub struct PointwiseSpec {
    /// Positions per tile (1..=MAX_ROWS).
    pub rows: usize,
    /// Output channel blocks per tile (1 or 2).
    pub blocks: usize,
    /// Input channel blocks (K / 8, at least 1).
    pub k_blocks: usize,
    pub a_row_bytes: i32,
    pub a_block_bytes: i32,
    pub c_block_bytes: i32,
    pub bias: bool,
    /// Applied before the store: Max, Min and at most one AddResidual.
    pub steps: Vec<StoreStep>,
    /// The sums start from the values at `c` (a later slice of the reduction).
    pub accumulate: bool,
    /// The bias and steps apply (the reduction's last slice); otherwise the partial sums
    /// are stored as they are.
    pub finish: bool,
    /// Bytes past each input block's tile rows to prefetch (0: none): the tiles that
    /// follow, when they stream from beyond L2 (one stream per input block).
    pub prefetch_ahead: i32,
}

/// The distinct Max/Min constants of `steps` (f32 bits, in order of first use).
pub fn step_constants(steps: &[StoreStep]) -> Vec<u32> {
    let mut bits = Vec::new();
    for step in steps {
        if let StoreStep::Max(v) | StoreStep::Min(v) = *step
            && !bits.contains(&v.to_bits())
        {
            bits.push(v.to_bits());
        }
    }
    bits
}

/// At most this many distinct constants (registers free after the k loop).
pub const MAX_CONSTANTS: usize = 2;

impl PointwiseSpec {
    fn constants(&self) -> Vec<u32> {
        step_constants(&self.steps)
    }

    /// Whether the machine code can apply `steps` (Max/Min within the free registers,
    /// at most one residual add).
    pub fn takes_steps(steps: &[StoreStep]) -> bool {
        let spec = PointwiseSpec {
            rows: 1,
            blocks: 1,
            k_blocks: 1,
            a_row_bytes: 0,
            a_block_bytes: 0,
            c_block_bytes: 0,
            bias: false,
            steps: steps.to_vec(),
            accumulate: false,
            finish: true,
            prefetch_ahead: 0,
        };
        steps.iter().all(|s| matches!(s, StoreStep::Max(_) | StoreStep::Min(_) | StoreStep::AddResidual))
            && steps.iter().filter(|s| **s == StoreStep::AddResidual).count() <= 1
            && spec.constants().len() <= MAX_CONSTANTS
    }

    pub fn has_residual(&self) -> bool {
        self.steps.contains(&StoreStep::AddResidual)
    }
}

const CONSTANT_LOW: [AsmRegisterXmm; 16] = [
    xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15,
];

const A: AsmRegister64 = rdi;
const B: AsmRegister64 = rsi;
const C: AsmRegister64 = rdx;
const RESIDUAL: AsmRegister64 = rcx;
const TRIPS: AsmRegister64 = rax;
const SCRATCH: AsmRegister32 = eax;

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the blocked pointwise kernel: {e}"))
}

/// The machine code of `spec`.
pub fn assemble(spec: &PointwiseSpec) -> Result<Vec<u8>, CodegenError> {
    if spec.rows == 0 || spec.rows > MAX_ROWS || !(1..=2).contains(&spec.blocks) || spec.k_blocks == 0 {
        return Err(CodegenError(format!(
            "internal: blocked pointwise tile of {} rows x {} blocks over {} input blocks",
            spec.rows, spec.blocks, spec.k_blocks
        )));
    }
    if !PointwiseSpec::takes_steps(&spec.steps) {
        return Err(CodegenError(format!("internal: blocked pointwise steps {:?} do not fit", spec.steps)));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    emit(&mut asm, spec).map_err(asm_error)?;
    let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
    Ok(result.inner.code_buffer)
}

fn emit(asm: &mut CodeAssembler, s: &PointwiseSpec) -> Result<(), IcedError> {
    let (rows, blocks) = (s.rows, s.blocks);
    // Registers: B vectors, two broadcast registers, then the accumulators.
    let b_vec = |v: usize| YMM[v];
    let scratch = |i: usize| YMM[blocks + i % 2];
    let acc = |i: usize, v: usize| YMM[blocks + 2 + i * blocks + v];
    let nr_bytes = (blocks * BLOCK * 4) as i32;

    for i in 0..rows {
        for v in 0..blocks {
            if s.accumulate {
                asm.vmovups(acc(i, v), ymmword_ptr(C + (v as i32 * s.c_block_bytes + i as i32 * 32)))?;
            } else {
                asm.vxorps(acc(i, v), acc(i, v), acc(i, v))?;
            }
        }
    }
    asm.mov(TRIPS, s.k_blocks as u64)?;
    let mut k_loop = asm.create_label();
    asm.set_label(&mut k_loop)?;
    for lane in 0..BLOCK {
        for v in 0..blocks {
            asm.vmovups(b_vec(v), ymmword_ptr(B + (lane as i32 * nr_bytes + v as i32 * 32)))?;
        }
        for i in 0..rows {
            asm.vbroadcastss(scratch(i), dword_ptr(A + (i as i32 * s.a_row_bytes + lane as i32 * 4)))?;
            for v in 0..blocks {
                asm.vfmadd231ps(acc(i, v), scratch(i), b_vec(v))?;
            }
        }
    }
    if s.prefetch_ahead > 0 {
        let span = (rows - 1) as i32 * s.a_row_bytes + 32;
        for line in (0..span).step_by(64) {
            asm.prefetcht0(byte_ptr(A + (s.prefetch_ahead + line)))?;
        }
    }
    asm.add(A, s.a_block_bytes)?;
    asm.add(B, BLOCK as i32 * nr_bytes)?;
    asm.dec(TRIPS)?;
    asm.jnz(k_loop)?;

    // B now points at the bias (after the last slice).
    emit_tile_store(
        asm,
        &BlockedTileStore {
            rows,
            blocks,
            bias: (s.bias && s.finish).then_some(B),
            steps: if s.finish { &s.steps } else { &[] },
            c: C,
            residual: RESIDUAL,
            c_block_bytes: s.c_block_bytes,
            scratch: SCRATCH,
        },
    )
}

/// The end of a blocked tile function: what [`emit_tile_store`] finishes.
pub struct BlockedTileStore<'a> {
    pub rows: usize,
    /// Output channel blocks (1 or 2).
    pub blocks: usize,
    /// Block `v`'s 8 biases at `bias + 32·v`.
    pub bias: Option<AsmRegister64>,
    /// Max, Min and at most one AddResidual, in order.
    pub steps: &'a [StoreStep],
    /// Row `i`, block `v` at `c + v·c_block_bytes + 32·i` (the residual at the same
    /// offsets from `residual`).
    pub c: AsmRegister64,
    pub residual: AsmRegister64,
    pub c_block_bytes: i32,
    pub scratch: AsmRegister32,
}

/// Adds the bias to the accumulators (row `i`, block `v` in
/// `ymm[blocks + 2 + i·blocks + v]`), applies the steps, stores, and returns. Uses the
/// registers below the accumulators, free once the reduction is done: the steps'
/// constants from ymm0, the bias in `ymm[blocks + 1]`.
pub fn emit_tile_store(asm: &mut CodeAssembler, t: &BlockedTileStore) -> Result<(), IcedError> {
    let blocks = t.blocks;
    let acc = |i: usize, v: usize| YMM[blocks + 2 + i * blocks + v];
    let constants = step_constants(t.steps);
    let constant_reg = |at: usize| YMM[at];
    for (at, &bits) in constants.iter().enumerate() {
        asm.mov(t.scratch, bits)?;
        asm.vmovd(CONSTANT_LOW[at], t.scratch)?;
        asm.vbroadcastss(constant_reg(at), CONSTANT_LOW[at])?;
    }
    let constant = |v: f32| constant_reg(constants.iter().position(|&b| b == v.to_bits()).unwrap_or(0));
    let bias_reg = YMM[blocks + 1];
    let at = |base: AsmRegister64, i: usize, v: usize| ymmword_ptr(base + (v as i32 * t.c_block_bytes + i as i32 * 32));
    for v in 0..blocks {
        if let Some(bias) = t.bias {
            asm.vmovups(bias_reg, ymmword_ptr(bias + v as i32 * 32))?;
        }
        for i in 0..t.rows {
            let y = acc(i, v);
            if t.bias.is_some() {
                asm.vaddps(y, y, bias_reg)?;
            }
            for step in t.steps {
                match *step {
                    // The constant first: a NaN y stays NaN (as the tile pass).
                    StoreStep::Max(c) => asm.vmaxps(y, constant(c), y)?,
                    StoreStep::Min(c) => asm.vminps(y, constant(c), y)?,
                    StoreStep::AddResidual => asm.vaddps(y, y, at(t.residual, i, v))?,
                    StoreStep::LeakyRelu(_) => {}
                }
            }
            asm.vmovups(at(t.c, i, v), y)?;
        }
    }
    asm.vzeroupper()?;
    asm.ret()
}
