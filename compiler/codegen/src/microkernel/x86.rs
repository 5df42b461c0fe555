//! Hand-scheduled x86-64 GEMM microkernels, assembled with iced-x86.
//!
//! Both kernels follow the contract in [`super`]: SystemV arguments
//! `rdi = k, rsi = a, rdx = b, rcx = c, r8 = ldc, r9 = accumulate`; they touch only
//! caller-saved general registers (rax, rcx, rdx, rsi, rdi, r8-r11), never the stack,
//! and end with `vzeroupper` (legacy-SSE code after dirty upper halves pays a
//! state-transition penalty on some cores).
//!
//! The register tile is the classic outer-product shape (XNNPACK `f32-gemm 6x16`,
//! ORT `SgemmKernelFma3`/`SgemmKernelAvx512F`): per k step, `nr / lanes` vector loads of
//! the B row, one broadcast per A element, and `mr * nr / lanes` independent FMAs into
//! accumulators that live in registers for the whole k loop. With 2 FMA pipes and a
//! 4-cycle latency, 8 chains keep the pipes busy; the tiles below have 12 (AVX2) and
//! 28 (AVX-512) so loads and loop overhead hide behind the FMAs.

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::asm_traits::{CodeAsmVaddps, CodeAsmVbroadcastss, CodeAsmVfmadd231ps, CodeAsmVmovups};
use iced_x86::code_asm::*;

use crate::kernels::CodegenError;

/// Everything that differs between the AVX2 and AVX-512 kernels. `R` is the vector
/// register type (`AsmRegisterYmm` or `AsmRegisterZmm`).
struct TileShape<R: 'static> {
    /// Rows of C (= elements of A broadcast per k step).
    mr: usize,
    /// Vectors per C row; `nr = vectors_per_row * lanes`.
    vectors_per_row: usize,
    lanes: usize,
    /// k steps per main-loop iteration (a power of two).
    k_unroll: usize,
    /// The register file, used in the order B row, broadcast scratch, accumulators.
    registers: &'static [R],
    /// How to zero a register: `vxorps` needs AVX512DQ for zmm, `vpxord` is AVX512F.
    zero: fn(&mut CodeAssembler, R) -> Result<(), IcedError>,
}

/// Registers that take A broadcasts in turn, so one row's broadcast can load while
/// the previous row's FMAs read the other.
const BROADCAST_SCRATCH: usize = 2;

impl<R> TileShape<R> {
    fn nr(&self) -> usize {
        self.vectors_per_row * self.lanes
    }
    fn vector_bytes(&self) -> usize {
        self.lanes * 4
    }
    fn accumulators(&self) -> usize {
        self.mr * self.vectors_per_row
    }
    fn registers_needed(&self) -> usize {
        self.vectors_per_row + BROADCAST_SCRATCH + self.accumulators()
    }
}

pub(crate) const YMM: [AsmRegisterYmm; 16] = [
    ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15,
];

const ZMM: [AsmRegisterZmm; 32] = [
    zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13, zmm14, zmm15, zmm16, zmm17,
    zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26, zmm27, zmm28, zmm29, zmm30, zmm31,
];

/// AVX2+FMA: 6x16 = 12 ymm accumulators + 2 B vectors + 2 broadcast registers, all 16.
const AVX2_TILE: TileShape<AsmRegisterYmm> = TileShape {
    mr: 6,
    vectors_per_row: 2,
    lanes: 8,
    k_unroll: 4,
    registers: &YMM,
    zero: |asm, r| asm.vxorps(r, r, r),
};

/// AVX-512F: 14x32 = 28 zmm accumulators + 2 B vectors + 2 broadcast registers, all
/// 32. Broadcasting into a register rather than using `{1to16}` FMA operands halves
/// the loads per k step (16 instead of 30 for 28 FMAs), leaving load ports to spare.
const AVX512_TILE: TileShape<AsmRegisterZmm> = TileShape {
    mr: 14,
    vectors_per_row: 2,
    lanes: 16,
    k_unroll: 4,
    registers: &ZMM,
    zero: |asm, r| asm.vpxord(r, r, r),
};

/// A finished kernel: machine code plus its tile shape.
pub struct AssembledKernel {
    pub code: Vec<u8>,
    pub mr: usize,
    pub nr: usize,
    /// Offset of the k main loop in `code` (aligned to [`LOOP_ALIGN`]).
    pub main_loop_offset: usize,
}

/// Main loops start on a 32-byte boundary so the decoder and the op cache see the
/// same lines from one call to the next (functions are placed at [`CODE_ALIGN`]).
pub const LOOP_ALIGN: usize = 32;
/// Alignment to request for the function itself.
pub const CODE_ALIGN: u64 = 64;

/// The 6x16 AVX2+FMA kernel.
pub fn assemble_avx2_gemm() -> Result<AssembledKernel, CodegenError> {
    assemble(&AVX2_TILE, BRows::Packed)
}

/// The 14x32 AVX-512F kernel.
pub fn assemble_avx512_gemm() -> Result<AssembledKernel, CodegenError> {
    assemble(&AVX512_TILE, BRows::Packed)
}

/// The 6x16 AVX2+FMA kernel reading B in place: `kernel(k, a, b, c, ldc, accumulate,
/// ldb)`, B row `kk` at `b + kk * ldb` bytes (any alignment), everything else as in the
/// module contract. The seventh argument is on the stack (SystemV); the kernel only
/// reads it. Used by 1x1 convolutions, whose input already is the K x N matrix, so
/// the copy into packed panels is skipped.
pub fn assemble_avx2_gemm_strided_b() -> Result<AssembledKernel, CodegenError> {
    assemble(&AVX2_TILE, BRows::Strided)
}

/// The 6x16 AVX2+FMA kernel, B packed or strided, with `store` emitting what follows
/// the k loop (`store_epilogue`).
pub fn assemble_avx2_with_store(
    strided_b: bool,
    store: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<AssembledKernel, CodegenError> {
    let b_rows = if strided_b { BRows::Strided } else { BRows::Packed };
    assemble_with_store(&AVX2_TILE, b_rows, Some(store))
}

/// How many panels ahead the strided-B kernel prefetches its rows.
const STRIDED_B_PREFETCH_PANELS: usize = 2;

/// The 6x16 AVX2+FMA kernel that also prefetches another B panel:
/// `kernel(k, a, b, c, ldc, accumulate, ahead)`, with one `prefetcht0` per k step of
/// B's row `kk` at `b + ahead + kk * 64` bytes, everything else as the module
/// contract. For positions as rows, where B is the weights: the first call on a
/// channel panel fetches the next panel while the calls that reuse this one run.
pub fn assemble_avx2_gemm_prefetch_b() -> Result<AssembledKernel, CodegenError> {
    assemble(&AVX2_TILE, BRows::PackedPrefetch)
}

/// Where the kernel finds B's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BRows {
    /// Consecutive, `nr` floats apart (the packed panel of the contract).
    Packed,
    /// As `Packed`, prefetching the rows `ahead` bytes further (the seventh argument).
    PackedPrefetch,
    /// `ldb` bytes apart, `ldb` the seventh argument (on the stack).
    Strided,
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling the GEMM microkernel: {e}"))
}

/// Assembles twice: once to learn where the main loop lands, once with the padding
/// that aligns it.
fn assemble<R: Copy>(shape: &TileShape<R>, b_rows: BRows) -> Result<AssembledKernel, CodegenError>
where
    CodeAssembler: VectorOps<R>,
{
    assemble_with_store(shape, b_rows, None)
}

/// Emits the stores of the finished tile (the accumulators in registers, k loop done)
/// and returns; replaces the plain store of [`emit_body`].
type StoreHook<'a> = &'a dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>;

fn assemble_with_store<R: Copy>(
    shape: &TileShape<R>,
    b_rows: BRows,
    store: Option<StoreHook>,
) -> Result<AssembledKernel, CodegenError>
where
    CodeAssembler: VectorOps<R>,
{
    if !shape.k_unroll.is_power_of_two() {
        return Err(CodegenError(format!(
            "internal: GEMM k unroll {} is not a power of two",
            shape.k_unroll
        )));
    }
    if shape.registers_needed() > shape.registers.len() {
        return Err(CodegenError(format!(
            "internal: GEMM tile {}x{} needs {} vector registers, the ISA has {}",
            shape.mr,
            shape.nr(),
            shape.registers_needed(),
            shape.registers.len()
        )));
    }
    if b_rows == BRows::Strided && shape.k_unroll != 4 {
        return Err(CodegenError(format!(
            "internal: the strided-B GEMM kernel addresses 4 rows per iteration, the tile unrolls {}",
            shape.k_unroll
        )));
    }
    let first = emit(shape, 0, b_rows, store)?;
    let pad = (LOOP_ALIGN - first.main_loop_offset % LOOP_ALIGN) % LOOP_ALIGN;
    let kernel = emit(shape, pad, b_rows, store)?;
    if kernel.main_loop_offset % LOOP_ALIGN != 0 {
        return Err(CodegenError(format!(
            "internal: GEMM main loop at offset {} after padding by {pad}",
            kernel.main_loop_offset
        )));
    }
    Ok(kernel)
}

/// The vector instructions the emitter uses, for either register width.
pub trait VectorOps<R>:
    CodeAsmVmovups<R, AsmMemoryOperand>
    + CodeAsmVmovups<AsmMemoryOperand, R>
    + CodeAsmVfmadd231ps<R, R, R>
    + CodeAsmVbroadcastss<R, AsmMemoryOperand>
    + CodeAsmVaddps<R, R, AsmMemoryOperand>
{
}

impl VectorOps<AsmRegisterYmm> for CodeAssembler {}
impl VectorOps<AsmRegisterZmm> for CodeAssembler {}

// Argument registers (SystemV) and the scratch registers the kernel uses.
const K: AsmRegister64 = rdi;
const A: AsmRegister64 = rsi;
const B: AsmRegister64 = rdx;
const C: AsmRegister64 = rcx;
const LDC: AsmRegister64 = r8;
const ACCUMULATE: AsmRegister64 = r9;
const ROW_BYTES: AsmRegister64 = r10;
const ROW: AsmRegister64 = r11;
const TRIPS: AsmRegister64 = rax;
// Strided B only, during the k loops (ROW_BYTES and ROW are free then): ldb and 3 * ldb.
const LDB: AsmRegister64 = r10;
const LDB3: AsmRegister64 = r11;

fn emit<R: Copy>(
    shape: &TileShape<R>,
    loop_pad: usize,
    b_rows: BRows,
    store: Option<StoreHook>,
) -> Result<AssembledKernel, CodegenError>
where
    CodeAssembler: VectorOps<R>,
{
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    let main_loop = emit_body(&mut asm, shape, loop_pad, b_rows, store).map_err(asm_error)?;
    let result = asm
        .assemble_options(0, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .map_err(asm_error)?;
    let main_loop_offset = result.label_ip(&main_loop).map_err(asm_error)? as usize;
    Ok(AssembledKernel {
        code: result.inner.code_buffer,
        mr: shape.mr,
        nr: shape.nr(),
        main_loop_offset,
    })
}

/// Emits the whole kernel; returns the label of the k main loop.
fn emit_body<R: Copy>(
    asm: &mut CodeAssembler,
    shape: &TileShape<R>,
    loop_pad: usize,
    b_rows: BRows,
    store_hook: Option<StoreHook>,
) -> Result<CodeLabel, IcedError>
where
    CodeAssembler: VectorOps<R>,
{
    let mr = shape.mr;
    let vpr = shape.vectors_per_row;
    let vector_bytes = shape.vector_bytes() as i32;
    let b_row = |v: usize| shape.registers[v];
    let a_scratch = |row: usize| shape.registers[vpr + row % BROADCAST_SCRATCH];
    let accumulator = |row: usize, v: usize| shape.registers[vpr + BROADCAST_SCRATCH + row * vpr + v];

    // Touch the C tile now so its lines arrive while the k loop runs (C rows are
    // written once per call and are usually not in L1). A row may straddle two lines.
    asm.lea(ROW_BYTES, LDC * 4)?;
    asm.mov(ROW, C)?;
    let row_span = (shape.nr() * 4 - 1) as i32;
    for row in 0..mr {
        asm.prefetcht0(byte_ptr(ROW))?;
        asm.prefetcht0(byte_ptr(ROW + row_span))?;
        if row + 1 < mr {
            asm.add(ROW, ROW_BYTES)?;
        }
    }
    for row in 0..mr {
        for v in 0..vpr {
            (shape.zero)(asm, accumulator(row, v))?;
        }
    }
    if b_rows == BRows::Strided {
        // The seventh argument, above the return address.
        asm.mov(LDB, qword_ptr(rsp + 8))?;
        asm.lea(LDB3, LDB + LDB * 2)?;
    }
    if b_rows == BRows::PackedPrefetch {
        // `ahead`, the seventh argument, as an absolute address that moves with B.
        asm.mov(LDB, qword_ptr(rsp + 8))?;
        asm.add(LDB, B)?;
    }

    // One k step at offset `step` (in k, below the unroll) from the current A and B pointers.
    let k_step = |asm: &mut CodeAssembler, step: usize| -> Result<(), IcedError> {
        for v in 0..vpr {
            let within = v as i32 * vector_bytes;
            let at = match (b_rows, step) {
                (BRows::Packed | BRows::PackedPrefetch, _) => B + ((step * shape.nr() * 4) as i32 + within),
                (BRows::Strided, 0) => B + within,
                (BRows::Strided, 1) => B + LDB + within,
                (BRows::Strided, 2) => B + LDB * 2 + within,
                (BRows::Strided, _) => B + LDB3 + within,
            };
            asm.vmovups(b_row(v), ymmword_or_zmmword(shape, at))?;
        }
        if b_rows == BRows::Strided {
            // The row's next panels (callers walk panels along the rows, 64 bytes
            // each): one line per row and k step, fetched ahead of the call reading it.
            let ahead = (shape.nr() * 4 * STRIDED_B_PREFETCH_PANELS) as i32;
            let at = match step {
                0 => B + ahead,
                1 => B + LDB + ahead,
                2 => B + LDB * 2 + ahead,
                _ => B + LDB3 + ahead,
            };
            asm.prefetcht0(byte_ptr(at))?;
        }
        if b_rows == BRows::PackedPrefetch {
            asm.prefetcht0(byte_ptr(LDB + (step * shape.nr() * 4) as i32))?;
        }
        for row in 0..mr {
            let a_offset = ((step * mr + row) * 4) as i32;
            let a = a_scratch(row);
            asm.vbroadcastss(a, dword_ptr(A + a_offset))?;
            for v in 0..vpr {
                asm.vfmadd231ps(accumulator(row, v), a, b_row(v))?;
            }
        }
        Ok(())
    };

    let unroll = shape.k_unroll;
    let mut main_loop = asm.create_label();
    let mut remainder = asm.create_label();
    let mut remainder_loop = asm.create_label();
    let mut store = asm.create_label();
    let mut store_plain = asm.create_label();

    asm.mov(TRIPS, K)?;
    asm.shr(TRIPS, unroll.trailing_zeros())?;
    asm.jz(remainder)?;
    if loop_pad > 0 {
        asm.nops_with_size(loop_pad)?;
    }
    asm.set_label(&mut main_loop)?;
    for step in 0..unroll {
        k_step(asm, step)?;
    }
    asm.add(A, (unroll * mr * 4) as i32)?;
    match b_rows {
        BRows::Packed => asm.add(B, (unroll * shape.nr() * 4) as i32)?,
        BRows::PackedPrefetch => {
            asm.add(B, (unroll * shape.nr() * 4) as i32)?;
            asm.add(LDB, (unroll * shape.nr() * 4) as i32)?;
        }
        BRows::Strided => asm.lea(B, B + LDB * 4)?,
    }
    asm.dec(TRIPS)?;
    asm.jnz(main_loop)?;

    asm.set_label(&mut remainder)?;
    asm.and(K, (unroll - 1) as i32)?;
    asm.jz(store)?;
    asm.set_label(&mut remainder_loop)?;
    k_step(asm, 0)?;
    asm.add(A, (mr * 4) as i32)?;
    match b_rows {
        BRows::Packed => asm.add(B, (shape.nr() * 4) as i32)?,
        BRows::PackedPrefetch => {
            asm.add(B, (shape.nr() * 4) as i32)?;
            asm.add(LDB, (shape.nr() * 4) as i32)?;
        }
        BRows::Strided => asm.add(B, LDB)?,
    }
    asm.dec(K)?;
    asm.jnz(remainder_loop)?;

    asm.set_label(&mut store)?;
    if let Some(hook) = store_hook {
        hook(asm)?;
        return Ok(main_loop);
    }
    if b_rows != BRows::Packed {
        asm.lea(ROW_BYTES, LDC * 4)?;
    }
    asm.test(ACCUMULATE, ACCUMULATE)?;
    asm.jz(store_plain)?;
    for row in 0..mr {
        for v in 0..vpr {
            let at = ymmword_or_zmmword(shape, C + v as i32 * vector_bytes);
            asm.vaddps(accumulator(row, v), accumulator(row, v), at)?;
            asm.vmovups(
                ymmword_or_zmmword(shape, C + v as i32 * vector_bytes),
                accumulator(row, v),
            )?;
        }
        if row + 1 < mr {
            asm.add(C, ROW_BYTES)?;
        }
    }
    asm.vzeroupper()?;
    asm.ret()?;

    asm.set_label(&mut store_plain)?;
    for row in 0..mr {
        for v in 0..vpr {
            asm.vmovups(
                ymmword_or_zmmword(shape, C + v as i32 * vector_bytes),
                accumulator(row, v),
            )?;
        }
        if row + 1 < mr {
            asm.add(C, ROW_BYTES)?;
        }
    }
    asm.vzeroupper()?;
    asm.ret()?;
    Ok(main_loop)
}

/// A full-vector memory operand of the tile's width.
fn ymmword_or_zmmword<R>(shape: &TileShape<R>, at: AsmMemoryOperand) -> AsmMemoryOperand {
    if shape.lanes == 16 {
        zmmword_ptr(at)
    } else {
        ymmword_ptr(at)
    }
}
