//! Direct KxK convolution over channel blocks of 8 (NCHWc8) as AVX2+FMA machine code:
//! up to six consecutive output positions of one output row x one or two output blocks
//! per call, the taps as compile-time displacements into the blocked input (no im2col),
//! the weights packed at compile time. Modelled on MLAS's `MlasConvNchwcFloatKernel`.
//!
//! Contract of the function [`assemble`] returns (SystemV, six `i64` parameters, no
//! result):
//!
//! `tile(a, b, c, residual, kernel_rows, bias)`
//! - `a`: input channel block 0, input row of the first kernel row the call runs,
//!   column of the tile's first position's kernel column 0 (it may lie left of the
//!   image: a border function only reads its valid columns). Position `i`, kernel
//!   column `kx`, lane `l` of block `kb` in kernel row `r` at
//!   `a + r·a_row_bytes + kb·a_block_bytes + i·a_position_bytes + kx·a_tap_bytes + l·a_lane_bytes`
//!   (a blocked input: lanes 4 bytes apart; a plain one, a stem's few channels: one
//!   block whose lanes are the channel planes);
//! - `b`: the packed weights of the first kernel row the call runs: for each kernel row,
//!   input block, kernel column (all `kernel_w` of them, also those the function
//!   skips) and lane, `8·blocks` weights;
//! - `c`: output block 0 at the tile's first position; position `i`, block `v` at
//!   `c + v·c_block_bytes + i·32`; a residual add reads `residual` at the same offsets;
//! - `kernel_rows` >= 1: kernel rows to run (the caller leaves out rows in the padding);
//! - `bias`: `8·blocks` floats (read only when the spec has a bias);
//! - `y = bias + Σ taps`, then the steps in order, stored;
//! - any alignment; touches rax, rcx, rdx, rsi, rdi, r8-r11, ymm0-ymm15; ends with
//!   `vzeroupper`.

use iced_x86::code_asm::*;

use super::pointwise_blocked_x86::{BlockedTileStore, emit_tile_store, step_constants};
use super::store_epilogue::StoreStep;
use crate::kernels::CodegenError;
use super::x86::YMM;

/// Channels per block (one ymm register of f32).
pub const BLOCK: usize = 8;
/// Most positions per tile: 6 x 2 accumulators + 2 weight vectors + 2 broadcasts.
pub const MAX_ROWS: usize = 6;
/// At most this many distinct clamp constants (registers free after the taps).
pub const MAX_CONSTANTS: usize = 2;

/// What one function computes.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectSpec {
    /// Output positions per call (1..=MAX_ROWS).
    pub rows: usize,
    /// Output channel blocks per call (1 or 2).
    pub blocks: usize,
    /// Input channel blocks (at least 1).
    pub k_blocks: usize,
    /// Input channels per block (8 blocked; a plain input's channels, up to 8, as one
    /// block) and the bytes between them (4 blocked, a plane plain).
    pub lanes: usize,
    pub a_lane_bytes: i32,
    /// Kernel columns packed per kernel row.
    pub kernel_w: usize,
    /// Per position, the kernel columns this function runs (all for interior
    /// positions, the ones inside the image at a border).
    pub columns: Vec<Vec<usize>>,
    pub a_position_bytes: i32,
    pub a_tap_bytes: i32,
    pub a_block_bytes: i32,
    pub a_row_bytes: i32,
    pub c_block_bytes: i32,
    pub bias: bool,
    /// Applied before the store: Max, Min and at most one AddResidual.
    pub steps: Vec<StoreStep>,
}

/// Whether the machine code applies `steps` (Max/Min within the free registers, at
/// most one residual add).
pub fn takes_steps(steps: &[StoreStep]) -> bool {
    steps.iter().all(|s| matches!(s, StoreStep::Max(_) | StoreStep::Min(_) | StoreStep::AddResidual))
        && steps.iter().filter(|s| **s == StoreStep::AddResidual).count() <= 1
        && step_constants(steps).len() <= MAX_CONSTANTS
}

const A: AsmRegister64 = rdi;
const B: AsmRegister64 = rsi;
const C: AsmRegister64 = rdx;
const RESIDUAL: AsmRegister64 = rcx;
const KERNEL_ROWS: AsmRegister64 = r8;
const BIAS: AsmRegister64 = r9;
const BLOCK_TRIPS: AsmRegister64 = rax;
const COLUMN_TRIPS: AsmRegister64 = r10;
const SCRATCH: AsmRegister32 = r11d;

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the blocked direct convolution kernel: {e}"))
}

/// The machine code of `spec`.
pub fn assemble(spec: &DirectSpec) -> Result<Vec<u8>, CodegenError> {
    let columns_ok = spec.columns.len() == spec.rows
        && spec.columns.iter().all(|c| !c.is_empty() && c.iter().all(|&x| x < spec.kernel_w));
    if spec.rows == 0
        || spec.rows > MAX_ROWS
        || !(1..=2).contains(&spec.blocks)
        || spec.k_blocks == 0
        || !(1..=BLOCK).contains(&spec.lanes)
        || !columns_ok
    {
        return Err(CodegenError(format!(
            "internal: blocked direct tile of {} rows x {} blocks over {} input blocks, columns {:?} of {}",
            spec.rows, spec.blocks, spec.k_blocks, spec.columns, spec.kernel_w
        )));
    }
    let row_step = spec.a_row_bytes as i64 - spec.k_blocks as i64 * spec.a_block_bytes as i64;
    if i32::try_from(row_step).is_err() {
        return Err(CodegenError(format!("internal: blocked direct row step {row_step} beyond 32 bits")));
    }
    if !takes_steps(&spec.steps) {
        return Err(CodegenError(format!("internal: blocked direct steps {:?} do not fit", spec.steps)));
    }
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    emit(&mut asm, spec).map_err(asm_error)?;
    let result = asm.assemble_options(0, iced_x86::BlockEncoderOptions::NONE).map_err(asm_error)?;
    Ok(result.inner.code_buffer)
}

fn emit(asm: &mut CodeAssembler, s: &DirectSpec) -> Result<(), IcedError> {
    let (rows, blocks) = (s.rows, s.blocks);
    let b_vec = |v: usize| YMM[v];
    let scratch = |i: usize| YMM[blocks + i % 2];
    let acc = |i: usize, v: usize| YMM[blocks + 2 + i * blocks + v];
    let nr_bytes = (blocks * BLOCK * 4) as i32;
    let lanes = s.lanes;
    let block_weight_bytes = s.kernel_w as i32 * lanes as i32 * nr_bytes;

    for i in 0..rows {
        for v in 0..blocks {
            asm.vxorps(acc(i, v), acc(i, v), acc(i, v))?;
        }
    }
    let mut row_loop = asm.create_label();
    asm.set_label(&mut row_loop)?;
    asm.mov(BLOCK_TRIPS, s.k_blocks as u64)?;
    let mut block_loop = asm.create_label();
    asm.set_label(&mut block_loop)?;
    // Interior tiles loop over the kernel columns (one column's code: the function
    // stays small in the instruction cache); border tiles unroll them, leaving out the
    // FMAs of each position's outside columns.
    let interior = s.columns.iter().all(|c| c.len() == s.kernel_w);
    let column_loop = interior && s.kernel_w > 1;
    let column_code = |asm: &mut CodeAssembler, kx: usize, disp_kx: usize| -> Result<(), IcedError> {
        let positions: Vec<usize> = (0..rows).filter(|&i| s.columns[i].contains(&kx)).collect();
        if positions.is_empty() {
            return Ok(());
        }
        for lane in 0..lanes {
            let weights = (disp_kx * lanes + lane) as i32 * nr_bytes;
            for v in 0..blocks {
                asm.vmovups(b_vec(v), ymmword_ptr(B + (weights + v as i32 * 32)))?;
            }
            for &i in &positions {
                let at = i as i32 * s.a_position_bytes + disp_kx as i32 * s.a_tap_bytes + lane as i32 * s.a_lane_bytes;
                asm.vbroadcastss(scratch(i), dword_ptr(A + at))?;
                for v in 0..blocks {
                    asm.vfmadd231ps(acc(i, v), scratch(i), b_vec(v))?;
                }
            }
        }
        Ok(())
    };
    if column_loop {
        asm.mov(COLUMN_TRIPS, s.kernel_w as u64)?;
        let mut columns = asm.create_label();
        asm.set_label(&mut columns)?;
        column_code(asm, 0, 0)?;
        asm.add(A, s.a_tap_bytes)?;
        asm.add(B, lanes as i32 * nr_bytes)?;
        asm.dec(COLUMN_TRIPS)?;
        asm.jnz(columns)?;
        // Back to kernel column 0 (B is at the next block's weights already).
        asm.sub(A, s.kernel_w as i32 * s.a_tap_bytes)?;
    } else {
        for kx in 0..s.kernel_w {
            column_code(asm, kx, kx)?;
        }
        asm.add(B, block_weight_bytes)?;
    }
    asm.add(A, s.a_block_bytes)?;
    asm.dec(BLOCK_TRIPS)?;
    asm.jnz(block_loop)?;
    // Back to block 0, one kernel row down.
    let row_step = s.a_row_bytes as i64 - s.k_blocks as i64 * s.a_block_bytes as i64;
    if row_step != 0 {
        asm.add(A, row_step as i32)?;
    }
    asm.dec(KERNEL_ROWS)?;
    asm.jnz(row_loop)?;

    emit_tile_store(
        asm,
        &BlockedTileStore {
            rows,
            blocks,
            bias: s.bias.then_some(BIAS),
            steps: &s.steps,
            c: C,
            residual: RESIDUAL,
            c_block_bytes: s.c_block_bytes,
            scratch: SCRATCH,
        },
    )
}
