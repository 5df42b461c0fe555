//! Bias + activation epilogues as AVX2+FMA machine code: 8 lanes, fused multiply-adds
//! and all 16 ymm registers, where Cranelift's x86-64 backend stops at f32x4 and spills
//! the constants of `exp` to the stack (SiLU tiles of EfficientNet spent most of their
//! epilogue reloading them).
//!
//! Contract of every function (SystemV, five `i64` parameters, no result):
//!
//! `activation(tile, rows, cols, row_stride_bytes, bias)`
//! - for `r in 0..rows`, `c in 0..cols`: `y = tile[r * row_stride_bytes / 4 + c]`,
//!   `y = y + bias[r]` (variants with a bias only; `bias` is ignored otherwise), then
//!   the steps in order, stored back in place;
//! - any `rows, cols >= 0`, any alignment; the last `cols % 8` columns of a row go
//!   through `vmaskmovps`, which touches no byte outside the row;
//! - touches only rax, rcx, rdx, rsi, rdi, r8-r11 and ymm0-ymm15, never the stack, and
//!   ends with `vzeroupper`.
//!
//! Numerics: the piecewise-linear steps (ReLU, clip, leaky ReLU, hard sigmoid, hard
//! swish, affine) compute exactly what `math.rs` emits on a target with FMA (same
//! operations in the same order, same constants), so they agree bit for bit with the
//! f32x4 path (up to NaN payloads). The sigmoid and SiLU take a cheaper route than
//! math.rs: a degree-4 polynomial after a one-step range reduction, one exponent
//! scaling instead of two (0.33 instead of 0.54 ns per element in a C model of both).
//! Relative error at most 4e-6 against exact arithmetic on the f32 input (the bound
//! of ../shared/DESIGN.md is 1e-3) wherever e^−|αx| >= 2.8e-38; below that e^−|αx| is
//! flushed to 0, so sigmoid(x) = 0 for x < −86.5 (the exact value is below 2.8e-38)
//! and x·sigmoid(αx) = −0 when αx < −86.5 (exact magnitude below |x|·2.8e-38).
//! ±inf, NaN and ±0 give what the interpreter gives.
//!
//! Functions are defined per module up front ([`ActivationFunctions::define_for_graph`],
//! one per distinct epilogue of the graph) and found by kernel emitters through
//! [`import`], which needs only the function being built: emitters reach the epilogue
//! through plain `FunctionBuilder`s, without the module.

// Coefficients are quoted as in math.rs.
#![allow(clippy::excessive_precision)]

use std::cell::RefCell;

use cnnc_ir::{EpilogueStep, Graph, UnaryFn};
use cranelift_codegen::ir::{FuncRef, Function, Signature};
use cranelift_module::{FuncId, FuncOrDataId, Linkage, Module};
use iced_x86::code_asm::*;

use super::GemmKernelKind;
use super::registry::{FunctionTable, InstalledTable, import_local, lookup};
use crate::kernels::CodegenError;
use crate::target::TargetSpec;

/// What one function computes: an optional per-row bias, then unary steps in order.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationSpec {
    pub bias: bool,
    pub steps: Vec<UnaryFn>,
}

impl ActivationSpec {
    /// The spec when every step is one the machine code implements (and there is
    /// work to do), else None.
    pub fn new(bias: bool, steps: &[UnaryFn]) -> Option<ActivationSpec> {
        if steps.is_empty() || !steps.iter().all(|&f| supported(f)) {
            return None;
        }
        Some(ActivationSpec {
            bias,
            steps: steps.to_vec(),
        })
    }

    /// The local symbol, which also keys the module's functions: `Debug` of an f32
    /// is its shortest round-trip form, so distinct parameters give distinct names.
    pub fn symbol(&self) -> String {
        let mut name = String::from("cnnc_act_avx2");
        if self.bias {
            name.push_str("_bias");
        }
        for step in &self.steps {
            name.push('_');
            for letter in format!("{step:?}").chars() {
                match letter {
                    c if c.is_ascii_alphanumeric() => name.push(c),
                    '.' => name.push('p'),
                    '-' => name.push('m'),
                    '+' => name.push('P'),
                    _ => {}
                }
            }
        }
        name
    }
}

/// Whether `f` has a machine-code form. NaN parameters are left to the f32x4 path
/// (its `maxc`/`minc` switch to NaN-propagating max/min for them).
pub fn supported(f: UnaryFn) -> bool {
    let finite_or_inf = |v: f32| !v.is_nan();
    match f {
        UnaryFn::Relu | UnaryFn::Sigmoid | UnaryFn::HardSwish => true,
        // αx is NaN only where x is (the machine code relies on it).
        UnaryFn::Swish { alpha } => alpha.is_finite() && alpha != 0.0,
        UnaryFn::LeakyRelu { alpha } => finite_or_inf(alpha),
        UnaryFn::Clip { min, max } => finite_or_inf(min) && finite_or_inf(max),
        UnaryFn::HardSigmoid { alpha, beta } => finite_or_inf(alpha) && finite_or_inf(beta),
        UnaryFn::Affine { scale, shift } => finite_or_inf(scale) && finite_or_inf(shift),
        _ => false,
    }
}

/// Whether the target runs the machine code (AVX2 and FMA on x86-64).
pub fn available(target: &TargetSpec) -> bool {
    matches!(
        GemmKernelKind::for_target(target),
        GemmKernelKind::Avx2Fma | GemmKernelKind::Avx512
    )
}

/// `(tile, rows, cols, row_stride_bytes, bias)`, all i64, SystemV.
pub fn activation_signature() -> Signature {
    super::registry::sysv_i64_signature(5)
}

thread_local! {
    static REGISTRY: RefCell<Option<FunctionTable>> = const { RefCell::new(None) };
}

/// While alive, [`import`] on this thread finds the functions defined for the graph.
pub struct ActivationFunctions {
    _installed: InstalledTable,
}

impl ActivationFunctions {
    /// Defines one function per distinct all-unary epilogue of `g` (with and without
    /// a bias: GEMM tiles add the bias in the function, depthwise kernels before it)
    /// when the target has AVX2+FMA; on other targets defines nothing, and every
    /// emitter keeps its f32x4 code.
    pub fn define_for_graph<M: Module>(
        module: &mut M,
        target: &TargetSpec,
        g: &Graph,
    ) -> Result<ActivationFunctions, CodegenError> {
        let mut table = FunctionTable::default();
        if available(target) {
            for node in &g.nodes {
                let Some(steps) = unary_steps(&node.epilogue) else {
                    continue;
                };
                for bias in [false, true] {
                    let Some(spec) = ActivationSpec::new(bias, &steps) else {
                        continue;
                    };
                    table.define(module, spec.symbol(), &activation_signature(), || assemble_avx2(&spec))?;
                }
            }
        }
        Ok(ActivationFunctions { _installed: table.install(&REGISTRY) })
    }
}

/// The steps of an epilogue when all of them are unary.
pub fn unary_steps(epilogue: &[EpilogueStep]) -> Option<Vec<UnaryFn>> {
    epilogue
        .iter()
        .map(|s| match s {
            EpilogueStep::Unary(f) => Some(*f),
            EpilogueStep::Binary { .. } => None,
        })
        .collect()
}

/// Declares and defines the function of `spec` in `module` (or returns the one already
/// there under its symbol).
pub fn define<M: Module>(module: &mut M, spec: &ActivationSpec) -> Result<FuncId, CodegenError> {
    let name = spec.symbol();
    if let Some(FuncOrDataId::Func(id)) = module.get_name(&name) {
        return Ok(id);
    }
    let code = assemble_avx2(spec)?;
    let id = module
        .declare_function(&name, Linkage::Local, &activation_signature())
        .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
    module
        .define_function_bytes(id, super::x86::CODE_ALIGN, &code, &[])
        .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
    Ok(id)
}

/// A reference to the function of `spec` in `func`, when one was defined for the
/// graph being compiled on this thread.
pub fn import(func: &mut Function, spec: &ActivationSpec) -> Option<FuncRef> {
    let id = lookup(&REGISTRY, &spec.symbol())?;
    Some(import_local(func, id, activation_signature()))
}

fn asm_error(e: IcedError) -> CodegenError {
    CodegenError(format!("assembling an activation function: {e}"))
}

/// The machine code of `spec` (position-independent: constants follow the code and
/// are read RIP-relative).
pub fn assemble_avx2(spec: &ActivationSpec) -> Result<Vec<u8>, CodegenError> {
    // Twice: the first pass finds where the constants land, the second pads them to a
    // 32-byte boundary (functions start at `CODE_ALIGN`), so no load splits a line.
    let first = emit(spec, 0)?;
    let pad = (32 - first.1 % 32) % 32;
    let (code, at) = emit(spec, pad)?;
    if at % 32 != 0 {
        return Err(CodegenError(format!(
            "internal: activation constants at offset {at} after padding by {pad}"
        )));
    }
    Ok(code)
}

static YMM: [AsmRegisterYmm; 16] = [
    ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15,
];
/// e^x for x in [−ln 2/2, ln 2/2]: 1 + c₁x + … + c₄x⁴, a relative-error minimax fit
/// (Lawson iterations), relative error 2.8e-6 (3.1e-6 with the f32 rounding and the
/// one-step reduction, simulated).
const EXP_POLYNOMIAL: [f32; 5] = [1.0, 0.999_966_9, 0.500_030_16, 0.167_874_8, 0.041_513_81];
/// e^x is flushed to 0 below this: n = round(x·log₂e) >= −125 above it, so 2ⁿ times
/// the polynomial (>= 0.7) stays a normal number. The flushed e^x are below 2.8e-38.
const FLUSH_BELOW: f32 = -86.5;
/// `vcmpps` predicates.
const CMP_UNORDERED: i32 = 3;
const CMP_NOT_GREATER_EQUAL: i32 = 9;
/// Registers per interleaved chain: the value, then temporaries.
const CHAIN_REGISTERS: usize = 7;
/// Lanes of the tail mask (`vmaskmovps`).
const MASK: AsmRegisterYmm = ymm14;
/// The row's bias, broadcast.
const BIAS: AsmRegisterYmm = ymm15;

// Arguments (SystemV) and scratch.
const TILE: AsmRegister64 = rdi;
const ROWS: AsmRegister64 = rsi;
const COLS: AsmRegister64 = rdx;
const ROW_STRIDE: AsmRegister64 = rcx;
const BIAS_PTR: AsmRegister64 = r8;
const AT: AsmRegister64 = rax;
const LEFT: AsmRegister64 = r9;
const SCRATCH: AsmRegister64 = r10;

/// Constants, each stored as a full vector after the code.
struct Constants {
    values: Vec<(u32, CodeLabel)>,
}

impl Constants {
    fn label(&mut self, asm: &mut CodeAssembler, bits: u32) -> CodeLabel {
        if let Some(&(_, l)) = self.values.iter().find(|(b, _)| *b == bits) {
            return l;
        }
        let l = asm.create_label();
        self.values.push((bits, l));
        l
    }
    fn f(&mut self, asm: &mut CodeAssembler, v: f32) -> AsmMemoryOperand {
        ymmword_ptr(self.label(asm, v.to_bits()))
    }
    fn i(&mut self, asm: &mut CodeAssembler, v: i32) -> AsmMemoryOperand {
        ymmword_ptr(self.label(asm, v as u32))
    }
}

/// Returns the code and the offset of the constants.
fn emit(spec: &ActivationSpec, pad: usize) -> Result<(Vec<u8>, usize), CodegenError> {
    let mut asm = CodeAssembler::new(64).map_err(asm_error)?;
    let mut constants = Constants { values: Vec::new() };
    let mut mask_table = asm.create_label();
    emit_body(&mut asm, spec, &mut constants, mask_table).map_err(asm_error)?;
    (|| -> Result<(), IcedError> {
        if pad > 0 {
            asm.db(&vec![0xcc; pad])?;
        }
        // 8 lanes of ones then 8 of zeros: the 8 floats from `mask_table + 4 (8 - n)`
        // select the first n lanes.
        asm.set_label(&mut mask_table)?;
        asm.dd(&[u32::MAX; 8])?;
        asm.dd(&[0; 8])?;
        for (bits, mut label) in std::mem::take(&mut constants.values) {
            asm.set_label(&mut label)?;
            asm.dd(&[bits; 8])?;
        }
        Ok(())
    })()
    .map_err(asm_error)?;
    let result = asm
        .assemble_options(0, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .map_err(asm_error)?;
    let at = result.label_ip(&mask_table).map_err(asm_error)? as usize;
    Ok((result.inner.code_buffer, at))
}

/// The code (the data after it is emitted by the caller).
fn emit_body(
    asm: &mut CodeAssembler,
    spec: &ActivationSpec,
    k: &mut Constants,
    mask_table: CodeLabel,
) -> Result<(), IcedError> {
    let chain = |c: usize| &YMM[c * CHAIN_REGISTERS..(c + 1) * CHAIN_REGISTERS];
    let mut done = asm.create_label();
    let mut row_loop = asm.create_label();
    let mut pair_loop = asm.create_label();
    let mut single = asm.create_label();
    let mut tail = asm.create_label();
    let mut row_end = asm.create_label();

    asm.test(ROWS, ROWS)?;
    asm.jle(done)?;
    asm.set_label(&mut row_loop)?;
    if spec.bias {
        asm.vbroadcastss(BIAS, dword_ptr(BIAS_PTR))?;
        asm.add(BIAS_PTR, 4)?;
    }
    asm.mov(AT, TILE)?;
    asm.mov(LEFT, COLS)?;
    asm.cmp(LEFT, 16)?;
    asm.jl(single)?;

    // Two vectors per trip, their instructions interleaved (independent chains).
    asm.set_label(&mut pair_loop)?;
    let both = [chain(0), chain(1)];
    for (c, regs) in both.iter().enumerate() {
        asm.vmovups(regs[0], ymmword_ptr(AT + 32 * c as i32))?;
    }
    emit_steps(asm, spec, k, &both)?;
    for (c, regs) in both.iter().enumerate() {
        asm.vmovups(ymmword_ptr(AT + 32 * c as i32), regs[0])?;
    }
    asm.add(AT, 64)?;
    asm.sub(LEFT, 16)?;
    asm.cmp(LEFT, 16)?;
    asm.jge(pair_loop)?;

    asm.set_label(&mut single)?;
    asm.cmp(LEFT, 8)?;
    asm.jl(tail)?;
    let one = [chain(0)];
    asm.vmovups(one[0][0], ymmword_ptr(AT))?;
    emit_steps(asm, spec, k, &one)?;
    asm.vmovups(ymmword_ptr(AT), one[0][0])?;
    asm.add(AT, 32)?;
    asm.sub(LEFT, 8)?;

    asm.set_label(&mut tail)?;
    asm.test(LEFT, LEFT)?;
    asm.jle(row_end)?;
    // mask = the 8 floats at mask_table + 32 - 4·left.
    asm.lea(SCRATCH, ptr(mask_table))?;
    asm.shl(LEFT, 2)?;
    asm.sub(SCRATCH, LEFT)?;
    asm.vmovups(MASK, ymmword_ptr(SCRATCH + 32))?;
    asm.vmaskmovps(one[0][0], MASK, ymmword_ptr(AT))?;
    emit_steps(asm, spec, k, &one)?;
    asm.vmaskmovps(ymmword_ptr(AT), MASK, one[0][0])?;

    asm.set_label(&mut row_end)?;
    asm.add(TILE, ROW_STRIDE)?;
    asm.dec(ROWS)?;
    asm.jnz(row_loop)?;
    asm.set_label(&mut done)?;
    asm.vzeroupper()?;
    asm.ret()?;
    Ok(())
}

/// Bias and steps on `chains[c][0]` for every chain, instruction by instruction.
fn emit_steps(
    asm: &mut CodeAssembler,
    spec: &ActivationSpec,
    k: &mut Constants,
    chains: &[&[AsmRegisterYmm]],
) -> Result<(), IcedError> {
    let mut e = Emitter { asm, k, chains };
    if spec.bias {
        e.each(|a, r, _| a.vaddps(r[0], r[0], BIAS))?;
    }
    for &step in &spec.steps {
        e.step(step)?;
    }
    Ok(())
}

struct Emitter<'a, 'c> {
    asm: &'a mut CodeAssembler,
    k: &'a mut Constants,
    chains: &'a [&'c [AsmRegisterYmm]],
}

impl Emitter<'_, '_> {
    /// One instruction per chain: `f(asm, chain registers, constants)`.
    fn each(
        &mut self,
        mut f: impl FnMut(&mut CodeAssembler, &[AsmRegisterYmm], &mut Constants) -> Result<(), IcedError>,
    ) -> Result<(), IcedError> {
        for regs in self.chains {
            f(self.asm, regs, self.k)?;
        }
        Ok(())
    }

    /// `r[i] = max(r[i], v)` as math.rs's `maxc`: `x < v ? v : x` (NaN x stays).
    fn maxc(&mut self, i: usize, tmp: usize, v: f32) -> Result<(), IcedError> {
        self.each(|a, r, k| {
            let m = k.f(a, v);
            a.vmovups(r[tmp], m)
        })?;
        // vmaxps d, s1, s2 = s1 > s2 ? s1 : s2.
        self.each(|a, r, _| a.vmaxps(r[i], r[tmp], r[i]))
    }

    /// `r[i] = min(r[i], v)` as `minc`: `v < x ? v : x`.
    fn minc(&mut self, i: usize, tmp: usize, v: f32) -> Result<(), IcedError> {
        self.each(|a, r, k| {
            let m = k.f(a, v);
            a.vmovups(r[tmp], m)
        })?;
        self.each(|a, r, _| a.vminps(r[i], r[tmp], r[i]))
    }

    fn mulc(&mut self, dst: usize, src: usize, v: f32) -> Result<(), IcedError> {
        self.each(|a, r, k| {
            let m = k.f(a, v);
            a.vmulps(r[dst], r[src], m)
        })
    }

    fn addc(&mut self, dst: usize, src: usize, v: f32) -> Result<(), IcedError> {
        self.each(|a, r, k| {
            let m = k.f(a, v);
            a.vaddps(r[dst], r[src], m)
        })
    }

    /// `r[dst] = r[src] | sign bit`: −|x|, NaN staying NaN.
    fn neg_abs(&mut self, dst: usize, src: usize) -> Result<(), IcedError> {
        self.each(|a, r, k| {
            let m = k.i(a, i32::MIN);
            a.vorps(r[dst], r[src], m)
        })
    }

    fn step(&mut self, f: UnaryFn) -> Result<(), IcedError> {
        match f {
            UnaryFn::Relu => self.maxc(0, 1, 0.0),
            UnaryFn::Clip { min, max } => {
                self.maxc(0, 1, min)?;
                self.minc(0, 1, max)
            }
            UnaryFn::LeakyRelu { alpha } => {
                // x < 0 ? αx : x with a real compare: −0 stays −0 whatever α's sign.
                self.each(|a, r, _| a.vxorps(r[1], r[1], r[1]))?;
                self.each(|a, r, _| a.vcmpltps(r[1], r[0], r[1]))?;
                self.mulc(2, 0, alpha)?;
                self.each(|a, r, _| a.vblendvps(r[0], r[0], r[2], r[1]))
            }
            UnaryFn::HardSigmoid { alpha, beta } => {
                self.mulc(0, 0, alpha)?;
                self.addc(0, 0, beta)?;
                self.minc(0, 1, 1.0)?;
                self.maxc(0, 1, 0.0)
            }
            UnaryFn::HardSwish => {
                self.mulc(2, 0, 1.0 / 6.0)?;
                self.addc(2, 2, 0.5)?;
                self.minc(2, 1, 1.0)?;
                self.maxc(2, 1, 0.0)?;
                self.each(|a, r, _| a.vmulps(r[0], r[0], r[2]))
            }
            UnaryFn::Affine { scale, shift } => {
                self.mulc(0, 0, scale)?;
                self.addc(0, 0, shift)
            }
            UnaryFn::Sigmoid => {
                // s = 1/(1 + e), times e for negative x (e = e^−|x|), picked by the sign
                // bit (−0 gives ½); a NaN x is flushed inside the exp, so it is put back
                // at the end.
                self.neg_abs(2, 0)?;
                self.exp_of_nonpositive(2)?;
                self.addc(3, 6, 1.0)?;
                self.each(|a, r, k| {
                    let m = k.f(a, 1.0);
                    a.vmovups(r[4], m)
                })?;
                self.each(|a, r, _| a.vdivps(r[4], r[4], r[3]))?;
                self.each(|a, r, _| a.vmulps(r[6], r[6], r[4]))?;
                self.each(|a, r, _| a.vblendvps(r[6], r[4], r[6], r[0]))?;
                self.each(|a, r, _| a.vcmpps(r[3], r[0], r[0], CMP_UNORDERED))?;
                self.each(|a, r, _| a.vblendvps(r[0], r[6], r[0], r[3]))
            }
            UnaryFn::Swish { alpha } => {
                // (t < 0 ? x·e : x) / (1 + e), t = αx, e = e^−|t|: the sigmoid's two forms
                // multiplied through by x, one division. A NaN t is a NaN x (α is finite
                // and non-zero), which both numerators carry.
                let t = if alpha == 1.0 {
                    0
                } else {
                    self.mulc(1, 0, alpha)?;
                    1
                };
                self.neg_abs(2, t)?;
                self.exp_of_nonpositive(2)?;
                self.addc(3, 6, 1.0)?;
                self.each(|a, r, _| a.vmulps(r[6], r[0], r[6]))?;
                self.each(|a, r, _| a.vblendvps(r[0], r[0], r[6], r[t]))?;
                self.each(|a, r, _| a.vdivps(r[0], r[0], r[3]))
            }
            other => unreachable!("ActivationSpec admits only supported steps, not {other:?}"),
        }
    }

    /// r[6] = e^{r[x]} for r[x] <= 0, or 0 where r[x] < [`FLUSH_BELOW`] or is NaN;
    /// keeps r[x], clobbers r[3..6].
    ///
    /// n = round(x·log₂e) by the 1.5·2²³ trick (one rounding, in the FMA), r = x − n·ln 2
    /// in one FMA (ln 2 rounded to f32 is off by 1.9e-9, times |n| <= 125: at most 2.4e-7
    /// relative, below the polynomial's error), e^r by [`EXP_POLYNOMIAL`], and 2ⁿ added
    /// to its exponent field as an integer:
    /// above the flush threshold n >= −125, so the result is a normal number.
    /// Registers: r[3] n + magic, r[4] n then the flush mask, r[5] r.
    fn exp_of_nonpositive(&mut self, x: usize) -> Result<(), IcedError> {
        const MAGIC: f32 = 12_582_912.0;
        self.each(|a, r, k| {
            let m = k.f(a, MAGIC);
            a.vmovups(r[3], m)
        })?;
        self.each(|a, r, k| {
            let m = k.f(a, std::f32::consts::LOG2_E);
            a.vfmadd231ps(r[3], r[x], m)
        })?;
        self.each(|a, r, k| {
            let m = k.f(a, MAGIC);
            a.vsubps(r[4], r[3], m)
        })?;
        self.each(|a, r, _| a.vmovaps(r[5], r[x]))?;
        self.each(|a, r, k| {
            let m = k.f(a, -std::f32::consts::LN_2);
            a.vfmadd231ps(r[5], r[4], m)
        })?;
        // Lanes below the threshold or NaN: their n and r are meaningless (−inf, huge
        // magnitudes, NaN payloads), the mask zeroes whatever they computed.
        self.each(|a, r, k| {
            let m = k.f(a, FLUSH_BELOW);
            a.vcmpps(r[4], r[x], m, CMP_NOT_GREATER_EQUAL)
        })?;
        let (highest, rest) = EXP_POLYNOMIAL.split_last().expect("coefficients");
        self.each(|a, r, k| {
            let m = k.f(a, *highest);
            a.vmovups(r[6], m)
        })?;
        for &c in rest.iter().rev() {
            self.each(|a, r, k| {
                let m = k.f(a, c);
                a.vfmadd213ps(r[6], r[5], m)
            })?;
        }
        // The low bits of n + magic are n: shifted into the exponent field, added.
        self.each(|a, r, _| a.vpslld(r[3], r[3], 23))?;
        self.each(|a, r, _| a.vpaddd(r[6], r[6], r[3]))?;
        self.each(|a, r, _| a.vandnps(r[6], r[4], r[6]))
    }
}
