//! The AVX2 6x16 GEMM microkernel with a convolution's epilogue applied to the
//! accumulators in registers before the one store of the tile: the bias, cheap
//! activations (ReLU, clip, leaky ReLU) and a residual add, instead of storing the tile
//! and running a second pass over it (`gemm::tile` and `activation`), which cost
//! MobileNet-v2 ~8% of its time in that pass.
//!
//! Contract (SystemV, nine `i64` arguments, no result):
//!
//! `kernel(k, a, b, c, ldc, accumulate, ldb, bias, residual)`
//! - `k, a, b, c, ldc, accumulate` as the module contract ([`super`]); B packed, or for
//!   the strided variant B row `kk` at `b + kk * ldb` bytes (`ldb` ignored otherwise);
//! - then per row `i`: `y = C[i][j]` (plus the old C when accumulating),
//!   `y = y + bias[i]` (specs with a bias), then the steps in order, where a residual
//!   add reads `residual + i * ldc * 4 + j * 4` (same row stride as C);
//! - the arithmetic is the same as the tile pass it replaces (`math.rs` through
//!   `activation`): bias first, `maxc`/`minc` as `vmaxps`/`vminps` with the constant as
//!   the first source (a NaN value stays NaN), leaky ReLU by compare and blend, so the
//!   results agree bit for bit.

use cnnc_ir::{BinaryFn, EpilogueStep, UnaryFn};
use iced_x86::code_asm::*;

use super::x86::{self, AssembledKernel, YMM};
use crate::kernels::CodegenError;

/// One step applied to the accumulators.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StoreStep {
    /// `max(y, v)`, NaN y staying NaN.
    Max(f32),
    /// `min(y, v)`, NaN y staying NaN.
    Min(f32),
    /// `y < 0 ? alpha·y : y`.
    LeakyRelu(f32),
    /// `y + residual[i][j]`.
    AddResidual,
}

/// What the kernel applies before its store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreEpilogue {
    pub bias: bool,
    pub steps: Vec<StoreStep>,
}

/// At most this many distinct constants, each held in a register for the whole store.
const MAX_CONSTANTS: usize = 2;

/// The unary functions the store applies, as steps (None: not one of them).
pub fn unary_store_steps(f: UnaryFn) -> Option<Vec<StoreStep>> {
    match f {
        UnaryFn::Relu => Some(vec![StoreStep::Max(0.0)]),
        // NaN bounds are left to the general path (its maxc/minc switch to NaN-propagating forms).
        UnaryFn::Clip { min, max } if !min.is_nan() && !max.is_nan() => {
            let mut steps = Vec::new();
            // max(y, -inf) and min(y, +inf) are y for every y, NaN included.
            if min != f32::NEG_INFINITY {
                steps.push(StoreStep::Max(min));
            }
            if max != f32::INFINITY {
                steps.push(StoreStep::Min(max));
            }
            Some(steps)
        }
        UnaryFn::LeakyRelu { alpha } if !alpha.is_nan() => Some(vec![StoreStep::LeakyRelu(alpha)]),
        _ => None,
    }
}

/// The residual add as a step (the only binary step the store applies).
pub fn binary_store_step(f: BinaryFn) -> Option<StoreStep> {
    (f == BinaryFn::Add).then_some(StoreStep::AddResidual)
}

impl StoreEpilogue {
    /// The epilogue when its constants fit in the registers the store has free, at most
    /// one residual add, and there is work to do.
    pub fn new(bias: bool, steps: Vec<StoreStep>) -> Option<StoreEpilogue> {
        let e = StoreEpilogue { bias, steps };
        let residuals = e.steps.iter().filter(|s| **s == StoreStep::AddResidual).count();
        if (!e.bias && e.steps.is_empty()) || residuals > 1 || e.constants().len() > MAX_CONSTANTS {
            return None;
        }
        Some(e)
    }

    /// Distinct constants (by bits), in first-use order.
    fn constants(&self) -> Vec<u32> {
        let mut bits = Vec::new();
        let mut add = |v: f32| {
            if !bits.contains(&v.to_bits()) {
                bits.push(v.to_bits());
            }
        };
        for step in &self.steps {
            match *step {
                StoreStep::Max(v) | StoreStep::Min(v) => add(v),
                StoreStep::LeakyRelu(alpha) => {
                    add(0.0);
                    add(alpha);
                }
                StoreStep::AddResidual => {}
            }
        }
        bits
    }

    pub fn has_residual(&self) -> bool {
        self.steps.contains(&StoreStep::AddResidual)
    }

    /// The local symbol: the base kernel's plus the steps (f32 bits in hex keep it short
    /// and distinct per parameter).
    pub fn symbol(&self, base: &str) -> String {
        let mut name = format!("{base}_ep");
        if self.bias {
            name.push_str("_bias");
        }
        for step in &self.steps {
            match *step {
                StoreStep::Max(v) => name.push_str(&format!("_max{:08x}", v.to_bits())),
                StoreStep::Min(v) => name.push_str(&format!("_min{:08x}", v.to_bits())),
                StoreStep::LeakyRelu(a) => name.push_str(&format!("_leaky{:08x}", a.to_bits())),
                StoreStep::AddResidual => name.push_str("_residual"),
            }
        }
        name
    }
}

// Registers free once the k loop is done (the kernel's argument registers k, a and b,
// its trip counter) and the vector registers that held B rows and A broadcasts.
const C: AsmRegister64 = rcx;
const LDC: AsmRegister64 = r8;
const ACCUMULATE: AsmRegister64 = r9;
const ROW_BYTES: AsmRegister64 = r10;
const BIAS: AsmRegister64 = rsi;
const RESIDUAL: AsmRegister64 = rdx;
const SCRATCH: AsmRegister32 = eax;
/// Accumulators of row `row`, vector `v` (the kernel's layout: B rows, 2 broadcast
/// registers, then the 6x2 accumulators).
fn accumulator(row: usize, v: usize) -> AsmRegisterYmm {
    YMM[4 + row * 2 + v]
}
/// Free vector registers during the store: the row's bias, two constants, one temporary.
const BIAS_VECTOR: AsmRegisterYmm = ymm0;
const CONSTANT_VECTORS: [AsmRegisterYmm; MAX_CONSTANTS] = [ymm1, ymm2];
/// The low halves of `CONSTANT_VECTORS`.
const CONSTANT_LOW: [AsmRegisterXmm; MAX_CONSTANTS] = [xmm1, xmm2];
const TEMP: AsmRegisterYmm = ymm3;
const ROWS: usize = 6;
const VECTORS_PER_ROW: usize = 2;

/// The 6x16 AVX2+FMA kernel with `epilogue` before its store; B packed, or strided
/// (read in place) when `strided_b`.
pub fn assemble_avx2_gemm_with_epilogue(
    epilogue: &StoreEpilogue,
    strided_b: bool,
) -> Result<AssembledKernel, CodegenError> {
    let store = |asm: &mut CodeAssembler| emit_store(asm, epilogue);
    x86::assemble_avx2_with_store(strided_b, &store)
}

fn emit_store(asm: &mut CodeAssembler, e: &StoreEpilogue) -> Result<(), IcedError> {
    // The eighth and ninth arguments, above the return address and the seventh.
    if e.bias {
        asm.mov(BIAS, qword_ptr(rsp + 16))?;
    }
    if e.has_residual() {
        asm.mov(RESIDUAL, qword_ptr(rsp + 24))?;
    }
    let constants = e.constants();
    for (i, &bits) in constants.iter().enumerate() {
        asm.mov(SCRATCH, bits)?;
        asm.vmovd(CONSTANT_LOW[i], SCRATCH)?;
        asm.vbroadcastss(CONSTANT_VECTORS[i], CONSTANT_LOW[i])?;
    }
    let constant = |v: f32| {
        let at = constants
            .iter()
            .position(|&b| b == v.to_bits())
            .expect("constant collected");
        CONSTANT_VECTORS[at]
    };
    asm.lea(ROW_BYTES, LDC * 4)?;
    let mut store_plain = asm.create_label();
    asm.test(ACCUMULATE, ACCUMULATE)?;
    asm.jz(store_plain)?;
    emit_rows(asm, e, &constant, true)?;
    asm.set_label(&mut store_plain)?;
    emit_rows(asm, e, &constant, false)
}

fn emit_rows(
    asm: &mut CodeAssembler,
    e: &StoreEpilogue,
    constant: &dyn Fn(f32) -> AsmRegisterYmm,
    accumulate: bool,
) -> Result<(), IcedError> {
    let vector = |base: AsmRegister64, v: usize| ymmword_ptr(base + (v * 32) as i32);
    for row in 0..ROWS {
        if accumulate {
            for v in 0..VECTORS_PER_ROW {
                asm.vaddps(accumulator(row, v), accumulator(row, v), vector(C, v))?;
            }
        }
        if e.bias {
            asm.vbroadcastss(BIAS_VECTOR, dword_ptr(BIAS + (row * 4) as i32))?;
            for v in 0..VECTORS_PER_ROW {
                asm.vaddps(accumulator(row, v), accumulator(row, v), BIAS_VECTOR)?;
            }
        }
        for step in &e.steps {
            for v in 0..VECTORS_PER_ROW {
                let y = accumulator(row, v);
                match *step {
                    // vmaxps d, s1, s2 = s1 > s2 ? s1 : s2: the constant first keeps a NaN y.
                    StoreStep::Max(c) => asm.vmaxps(y, constant(c), y)?,
                    StoreStep::Min(c) => asm.vminps(y, constant(c), y)?,
                    StoreStep::LeakyRelu(alpha) => {
                        // As `activation`: a real compare, so −0 stays −0 whatever α's sign.
                        asm.vcmpltps(TEMP, y, constant(0.0))?;
                        asm.vmulps(BIAS_VECTOR, y, constant(alpha))?;
                        asm.vblendvps(y, y, BIAS_VECTOR, TEMP)?;
                    }
                    StoreStep::AddResidual => asm.vaddps(y, y, vector(RESIDUAL, v))?,
                }
            }
        }
        for v in 0..VECTORS_PER_ROW {
            asm.vmovups(vector(C, v), accumulator(row, v))?;
        }
        if row + 1 < ROWS {
            asm.add(C, ROW_BYTES)?;
            if e.has_residual() {
                asm.add(RESIDUAL, ROW_BYTES)?;
            }
        }
    }
    asm.vzeroupper()?;
    asm.ret()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_map_to_store_steps() {
        assert_eq!(unary_store_steps(UnaryFn::Relu), Some(vec![StoreStep::Max(0.0)]));
        let relu6 = UnaryFn::Clip { min: 0.0, max: 6.0 };
        assert_eq!(
            unary_store_steps(relu6),
            Some(vec![StoreStep::Max(0.0), StoreStep::Min(6.0)])
        );
        let upper_only = UnaryFn::Clip {
            min: f32::NEG_INFINITY,
            max: 6.0,
        };
        assert_eq!(unary_store_steps(upper_only), Some(vec![StoreStep::Min(6.0)]));
        let nan_bound = UnaryFn::Clip {
            min: f32::NAN,
            max: 6.0,
        };
        assert_eq!(unary_store_steps(nan_bound), None);
        assert_eq!(unary_store_steps(UnaryFn::Sigmoid), None);
        assert_eq!(binary_store_step(BinaryFn::Mul), None);
    }

    #[test]
    fn epilogues_beyond_the_free_registers_are_refused() {
        assert!(StoreEpilogue::new(false, vec![]).is_none());
        assert!(StoreEpilogue::new(true, vec![]).is_some());
        let three_constants = vec![StoreStep::Max(0.0), StoreStep::Min(6.0), StoreStep::Max(1.0)];
        assert!(StoreEpilogue::new(true, three_constants).is_none());
        // LeakyReLU's zero is shared with ReLU's.
        let shared = vec![StoreStep::LeakyRelu(0.1), StoreStep::Max(0.0)];
        assert!(StoreEpilogue::new(false, shared).is_some());
        let two_residuals = vec![StoreStep::AddResidual, StoreStep::AddResidual];
        assert!(StoreEpilogue::new(true, two_residuals).is_none());
    }

    #[test]
    fn symbols_differ_per_parameter_and_kernels_assemble() {
        let a = StoreEpilogue::new(true, vec![StoreStep::Max(0.0), StoreStep::Min(6.0)]).unwrap();
        let b = StoreEpilogue::new(true, vec![StoreStep::Max(0.0), StoreStep::Min(4.0)]).unwrap();
        assert_ne!(a.symbol("k"), b.symbol("k"));
        let c = StoreEpilogue::new(true, vec![StoreStep::AddResidual, StoreStep::LeakyRelu(-0.5)]).unwrap();
        for e in [&a, &b, &c] {
            for strided in [false, true] {
                let kernel = assemble_avx2_gemm_with_epilogue(e, strided).unwrap();
                assert_eq!((kernel.mr, kernel.nr), (ROWS, 16));
                assert_eq!(kernel.main_loop_offset % x86::LOOP_ALIGN, 0);
            }
        }
    }
}

/// The operand a node's machine code reads for its residual add (the epilogue's Add
/// operand), when `steps` has one.
pub fn residual_operand(epilogue: &[EpilogueStep], steps: &[StoreStep]) -> Option<usize> {
    if !steps.contains(&StoreStep::AddResidual) {
        return None;
    }
    epilogue.iter().find_map(|s| match *s {
        EpilogueStep::Binary { func: BinaryFn::Add, operand } => Some(operand),
        _ => None,
    })
}
