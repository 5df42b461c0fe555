//! f32 math emitted inline as Cranelift IR, the same code for scalars (`F32`) and
//! vectors (`F32X4`): the type of the argument decides.
//!
//! `exp` and `log` are Cephes-style polynomials (relative error ~1e-7 over the whole
//! range, with IEEE behaviour at ±inf, NaN, zero and denormals); everything else is
//! built from them. Only plain arithmetic, compares, selects and integer bit tricks
//! are used, so no instruction needs SSE4.1 and nothing calls out of the code.
//!
//! Multiply-adds are fused (`fma`) when the code being compiled on this thread targets
//! a CPU with FMA ([`FusedMultiplyAdd`], set for the whole of `compile_graph`): half
//! the instructions and latency in every polynomial, and one rounding instead of two.
//! Without it (or on a thread that never set it) they are a multiply and an add; both
//! meet the documented accuracy.

// Coefficients are quoted as published (Cephes, Numerical Recipes), with more digits
// than an f32 keeps.
#![allow(clippy::excessive_precision)]

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Type, Value};
use cranelift_codegen::isa::TargetIsa;
use cranelift_frontend::FunctionBuilder;
use std::cell::Cell;

thread_local! {
    static FUSED: Cell<bool> = const { Cell::new(false) };
}

/// While alive, `Fx` on this thread emits `fma` for multiply-adds (when `enabled`);
/// dropping it restores the previous setting. A thread-local rather than a builder
/// field because every kernel emitter reaches the math through `unary_lane`, which
/// knows nothing of the target; code emitted on a thread that never set it is merely
/// unfused.
pub struct FusedMultiplyAdd {
    previous: bool,
}

impl FusedMultiplyAdd {
    pub fn enable(enabled: bool) -> FusedMultiplyAdd {
        FusedMultiplyAdd {
            previous: FUSED.with(|f| f.replace(enabled)),
        }
    }

    /// For code compiled by `isa`: on when Cranelift lowers `fma` to an instruction
    /// (x86-64 with the FMA flag, AArch64), never when it would be a libcall.
    pub fn for_isa(isa: &dyn TargetIsa) -> FusedMultiplyAdd {
        Self::enable(isa_has_fma(isa))
    }
}

impl Drop for FusedMultiplyAdd {
    fn drop(&mut self) {
        FUSED.with(|f| f.set(self.previous));
    }
}

/// Whether `fma` compiles to one instruction on `isa`.
pub fn isa_has_fma(isa: &dyn TargetIsa) -> bool {
    match isa.triple().architecture {
        target_lexicon::Architecture::Aarch64(_) => true,
        target_lexicon::Architecture::X86_64 => isa
            .isa_flags()
            .iter()
            .any(|f| f.name == "has_fma" && f.as_bool() == Some(true)),
        _ => false,
    }
}

/// Whether multiply-adds emitted on this thread are fused.
pub fn fused_multiply_add() -> bool {
    FUSED.with(Cell::get)
}

/// A float expression builder for one lane type (F32 or F32X4).
pub struct Fx<'a, 'f> {
    pub b: &'a mut FunctionBuilder<'f>,
    pub ty: Type,
}

/// A lane mask produced by a comparison (I8 for scalars, I32X4 for vectors).
#[derive(Clone, Copy, Debug)]
pub struct Mask(pub Value);

impl<'a, 'f> Fx<'a, 'f> {
    pub fn new(b: &'a mut FunctionBuilder<'f>, ty: Type) -> Self {
        debug_assert!(ty == F32 || ty == F32X4, "Fx works on f32 lanes, not {ty}");
        Fx { b, ty }
    }

    /// Builder for the type of `x`.
    pub fn of(b: &'a mut FunctionBuilder<'f>, x: Value) -> Self {
        let ty = b.func.dfg.value_type(x);
        Fx::new(b, ty)
    }

    fn is_vector(&self) -> bool {
        self.ty.is_vector()
    }

    /// The integer type with the same lanes.
    pub fn int_ty(&self) -> Type {
        if self.is_vector() { I32X4 } else { I32 }
    }

    pub fn c(&mut self, v: f32) -> Value {
        let s = self.b.ins().f32const(v);
        if self.is_vector() {
            self.b.ins().splat(self.ty, s)
        } else {
            s
        }
    }

    pub fn ci(&mut self, v: i32) -> Value {
        let s = self.b.ins().iconst(I32, v as i64);
        if self.is_vector() {
            self.b.ins().splat(I32X4, s)
        } else {
            s
        }
    }

    pub fn add(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fadd(x, y)
    }
    pub fn sub(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fsub(x, y)
    }
    pub fn mul(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fmul(x, y)
    }
    pub fn div(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fdiv(x, y)
    }
    pub fn addc(&mut self, x: Value, k: f32) -> Value {
        let k = self.c(k);
        self.add(x, k)
    }
    pub fn mulc(&mut self, x: Value, k: f32) -> Value {
        let k = self.c(k);
        self.mul(x, k)
    }
    /// x·y + z, fused where the target has FMA (see [`FusedMultiplyAdd`]).
    pub fn mul_add(&mut self, x: Value, y: Value, z: Value) -> Value {
        if fused_multiply_add() {
            return self.b.ins().fma(x, y, z);
        }
        let p = self.mul(x, y);
        self.add(p, z)
    }
    /// x·k + z for a constant k.
    pub fn mul_addc(&mut self, x: Value, k: f32, z: Value) -> Value {
        let k = self.c(k);
        self.mul_add(x, k, z)
    }
    pub fn neg(&mut self, x: Value) -> Value {
        self.b.ins().fneg(x)
    }
    pub fn abs(&mut self, x: Value) -> Value {
        self.b.ins().fabs(x)
    }
    /// −|x| (NaN stays NaN): one `or` of the sign bit instead of abs then neg.
    pub fn neg_abs(&mut self, x: Value) -> Value {
        let bits = self.to_bits(x);
        let sign = self.ci(i32::MIN);
        let r = self.b.ins().bor(bits, sign);
        self.from_bits(r)
    }
    /// NaN-propagating max/min.
    pub fn max(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fmax(x, y)
    }
    pub fn min(&mut self, x: Value, y: Value) -> Value {
        self.b.ins().fmin(x, y)
    }
    /// max(x, k) for a constant k, NaN x staying NaN. A compare and a select: much
    /// cheaper on x86 than `fmax`, whose lowering also orders ±0 and NaN operands.
    pub fn maxc(&mut self, x: Value, k: f32) -> Value {
        let kv = self.c(k);
        if k.is_nan() {
            return self.max(x, kv);
        }
        let below = self.cmp(FloatCC::LessThan, x, kv);
        self.sel(below, kv, x)
    }
    /// min(x, k) for a constant k, NaN x staying NaN.
    pub fn minc(&mut self, x: Value, k: f32) -> Value {
        let kv = self.c(k);
        if k.is_nan() {
            return self.min(x, kv);
        }
        let above = self.cmp(FloatCC::LessThan, kv, x);
        self.sel(above, kv, x)
    }

    pub fn cmp(&mut self, cc: FloatCC, x: Value, y: Value) -> Mask {
        Mask(self.b.ins().fcmp(cc, x, y))
    }
    pub fn cmpc(&mut self, cc: FloatCC, x: Value, k: f32) -> Mask {
        let k = self.c(k);
        self.cmp(cc, x, k)
    }
    pub fn is_nan(&mut self, x: Value) -> Mask {
        self.cmp(FloatCC::Unordered, x, x)
    }
    pub fn and(&mut self, m: Mask, n: Mask) -> Mask {
        Mask(self.b.ins().band(m.0, n.0))
    }
    pub fn or(&mut self, m: Mask, n: Mask) -> Mask {
        Mask(self.b.ins().bor(m.0, n.0))
    }
    pub fn not(&mut self, m: Mask) -> Mask {
        if self.is_vector() {
            Mask(self.b.ins().bnot(m.0))
        } else {
            Mask(self.b.ins().bxor_imm_s(m.0, 1))
        }
    }

    /// `m ? x : y` lane by lane (x, y floats of this type).
    pub fn sel(&mut self, m: Mask, x: Value, y: Value) -> Value {
        if self.is_vector() {
            let mask = self.b.ins().bitcast(self.ty, MemFlagsData::new(), m.0);
            self.b.ins().bitselect(mask, x, y)
        } else {
            self.b.ins().select(m.0, x, y)
        }
    }
    pub fn selc(&mut self, m: Mask, k: f32, y: Value) -> Value {
        let k = self.c(k);
        self.sel(m, k, y)
    }

    pub fn to_bits(&mut self, x: Value) -> Value {
        let t = self.int_ty();
        self.b.ins().bitcast(t, MemFlagsData::new(), x)
    }
    pub fn from_bits(&mut self, i: Value) -> Value {
        self.b.ins().bitcast(self.ty, MemFlagsData::new(), i)
    }
    pub fn int_to_float(&mut self, i: Value) -> Value {
        self.b.ins().fcvt_from_sint(self.ty, i)
    }

    /// Evaluates c[0] + c[1]·x + c[2]·x² + … (Horner).
    pub fn poly(&mut self, x: Value, c: &[f32]) -> Value {
        let mut acc = self.c(c[c.len() - 1]);
        for &k in c[..c.len() - 1].iter().rev() {
            let k = self.c(k);
            acc = self.mul_add(acc, x, k);
        }
        acc
    }

    /// `x` with the sign bit of `sign` (x itself non-negative or of any sign: its own
    /// sign bit is replaced).
    pub fn copysign(&mut self, x: Value, sign: Value) -> Value {
        let xb = self.to_bits(x);
        let sb = self.to_bits(sign);
        let lo = self.ci(0x7fff_ffff);
        let hi = self.ci(i32::MIN);
        let magnitude = self.b.ins().band(xb, lo);
        let s = self.b.ins().band(sb, hi);
        let r = self.b.ins().bor(magnitude, s);
        self.from_bits(r)
    }

    /// eˣ. Overflows to +inf above ln(f32::MAX), underflows through the denormals to 0.
    pub fn exp(&mut self, x: Value) -> Value {
        // Past these bounds the result is inf or 0 anyway; clamping keeps the exponent
        // arithmetic below in range. The clamps keep NaN.
        let x = self.minc(x, 89.0);
        self.exp_below_89(x)
    }

    /// eˣ for x <= 89 or NaN (callers whose argument is never large skip a clamp).
    fn exp_below_89(&mut self, x: Value) -> Value {
        let x = self.maxc(x, -104.0);
        // n = round(x / ln 2) with the 1.5·2²³ trick: adding it rounds to an integer
        // held in the low mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        let t = self.mulc(x, std::f32::consts::LOG2_E);
        let t = self.addc(t, MAGIC);
        let n = self.addc(t, -MAGIC);
        // n + 254: the exponent biases of both halves of 2ⁿ below, folded in here.
        let tb = self.to_bits(t);
        let magic_bits = self.ci(MAGIC.to_bits() as i32 - 2 * 127);
        let biased = self.b.ins().isub(tb, magic_bits);
        // r = x − n·ln 2 in two parts (Cody–Waite) so the reduction is exact.
        let r = self.mul_addc(n, -0.693_359_4, x);
        let r = self.mul_addc(n, 2.121_944_4e-4, r);
        let r2 = self.mul(r, r);
        let p = self.poly(
            r,
            &[
                5.000_000_1e-1,
                1.666_666_5e-1,
                4.166_579_6e-2,
                8.333_452e-3,
                1.398_2e-3,
                1.987_569_1e-4,
            ],
        );
        let p = self.mul_add(p, r2, r);
        let p = self.addc(p, 1.0);
        // 2ⁿ in two halves so that n in [-150, 128] never leaves the normal range of
        // either factor; the final product rounds once into denormals or overflows.
        // With n + 254 >= 104, (n + 254) >> 1 = (n >> 1) + 127 is the first half's
        // biased exponent and the rest the second's.
        let e1 = self.b.ins().sshr_imm_u(biased, 1);
        let e2 = self.b.ins().isub(biased, e1);
        let s1 = self.exponent_to_float(e1);
        let s2 = self.exponent_to_float(e2);
        let y = self.mul(p, s1);
        self.mul(y, s2)
    }

    /// 2^(e − 127) for a biased exponent lane e in [1, 254].
    fn exponent_to_float(&mut self, e: Value) -> Value {
        let bits = self.b.ins().ishl_imm_u(e, 23);
        self.from_bits(bits)
    }

    /// ln x: NaN below zero, -inf at ±0, +inf at +inf, NaN for NaN; denormals exact.
    pub fn log(&mut self, x: Value) -> Value {
        // Scale denormals into the normal range first.
        let den = self.cmpc(FloatCC::LessThan, x, f32::MIN_POSITIVE);
        let scaled = self.mulc(x, 8_388_608.0);
        let xs = self.sel(den, scaled, x);
        let zero = self.c(0.0);
        let minus_23 = self.c(-23.0);
        let e_adjust = self.sel(den, minus_23, zero);

        let bits = self.to_bits(xs);
        let exp_bits = self.b.ins().ushr_imm_u(bits, 23);
        let mask_ff = self.ci(0xff);
        let exp_bits = self.b.ins().band(exp_bits, mask_ff);
        let bias = self.ci(126);
        let e = self.b.ins().isub(exp_bits, bias);
        let e = self.int_to_float(e);
        let e = self.add(e, e_adjust);
        // Mantissa m in [0.5, 1).
        let mant_mask = self.ci(0x007f_ffff);
        let half_bits = self.ci(0x3f00_0000);
        let m = self.b.ins().band(bits, mant_mask);
        let m = self.b.ins().bor(m, half_bits);
        let m = self.from_bits(m);
        // Bring m into [√½, √2) around 1: m < √½ → 2m − 1 with e − 1, else m − 1.
        let small = self.cmpc(FloatCC::LessThan, m, std::f32::consts::FRAC_1_SQRT_2);
        let one = self.c(1.0);
        let e_minus = self.sub(e, one);
        let e = self.sel(small, e_minus, e);
        let twice = self.add(m, m);
        let mm = self.sel(small, twice, m);
        let f = self.sub(mm, one);

        let z = self.mul(f, f);
        let p = self.poly(
            f,
            &[
                3.333_333_1e-1,
                -2.499_999_4e-1,
                2.000_071_4e-1,
                -1.666_805_8e-1,
                1.424_932_3e-1,
                -1.242_014_1e-1,
                1.167_699_9e-1,
                -1.151_461e-1,
                7.037_683_6e-2,
            ],
        );
        let y = self.mul(p, f);
        let y = self.mul(y, z);
        let lo = self.mulc(e, -2.121_944_4e-4);
        let y = self.add(y, lo);
        let half_z = self.mulc(z, -0.5);
        let y = self.add(y, half_z);
        let r = self.add(f, y);
        let hi = self.mulc(e, 0.693_359_4);
        let r = self.add(r, hi);

        let is_inf = self.cmpc(FloatCC::Equal, x, f32::INFINITY);
        let r = self.selc(is_inf, f32::INFINITY, r);
        let is_zero = self.cmpc(FloatCC::Equal, x, 0.0);
        let r = self.selc(is_zero, f32::NEG_INFINITY, r);
        let negative = self.cmpc(FloatCC::LessThan, x, 0.0);
        let r = self.selc(negative, f32::NAN, r);
        let nan = self.is_nan(x);
        self.sel(nan, x, r)
    }

    /// eˣ − 1, accurate near 0 (Kahan: (u − 1)·x / ln u with u = eˣ).
    pub fn expm1(&mut self, x: Value) -> Value {
        let u = self.exp(x);
        let one = self.c(1.0);
        let um1 = self.sub(u, one);
        let lu = self.log(u);
        let q = self.div(x, lu);
        let general = self.mul(um1, q);
        let u_is_one = self.cmp(FloatCC::Equal, u, one);
        let r = self.sel(u_is_one, x, general);
        let minus_one = self.cmpc(FloatCC::Equal, um1, -1.0);
        let r = self.selc(minus_one, -1.0, r);
        let inf = self.cmpc(FloatCC::Equal, u, f32::INFINITY);
        self.selc(inf, f32::INFINITY, r)
    }

    /// ln(1 + y), accurate for small y (Goldberg: ln u · y / (u − 1) with u = 1 + y).
    pub fn log1p(&mut self, y: Value) -> Value {
        let one = self.c(1.0);
        let u = self.add(one, y);
        let lu = self.log(u);
        let um1 = self.sub(u, one);
        let q = self.div(y, um1);
        let general = self.mul(lu, q);
        let u_is_one = self.cmp(FloatCC::Equal, u, one);
        let r = self.sel(u_is_one, y, general);
        // y = +inf: u − 1 = inf and inf/inf is NaN; ln(inf) is the answer.
        let inf = self.cmpc(FloatCC::Equal, u, f32::INFINITY);
        self.sel(inf, lu, r)
    }

    /// 1/(1 + e^−x), as e^x/(1 + e^x) for negative x so that tiny results keep
    /// their digits (down into the denormals) instead of flushing through 1/inf.
    pub fn sigmoid(&mut self, x: Value) -> Value {
        let nax = self.neg_abs(x);
        let e = self.exp_below_89(nax);
        let one = self.c(1.0);
        let d = self.add(one, e);
        let s = self.div(one, d);
        let es = self.mul(e, s);
        let negative = self.cmpc(FloatCC::LessThan, x, 0.0);
        self.sel(negative, es, s)
    }

    /// x·sigmoid(αx) with one division: (αx < 0 ? x·e : x) / (1 + e), e = e^−|αx|
    /// (the sigmoid's two forms, each multiplied through by x).
    pub fn swish(&mut self, x: Value, alpha: f32) -> Value {
        let t = if alpha == 1.0 { x } else { self.mulc(x, alpha) };
        let nat = self.neg_abs(t);
        let e = self.exp_below_89(nat);
        let d = self.addc(e, 1.0);
        let xe = self.mul(x, e);
        let negative = self.cmpc(FloatCC::LessThan, t, 0.0);
        let numerator = self.sel(negative, xe, x);
        self.div(numerator, d)
    }

    pub fn tanh(&mut self, x: Value) -> Value {
        // Small |x|: odd polynomial (Cephes tanhf), no cancellation.
        let ax = self.abs(x);
        let z = self.mul(x, x);
        let p = self.poly(
            z,
            &[
                -3.333_328_2e-1,
                1.333_144_2e-1,
                -5.373_971_6e-2,
                2.063_908_9e-2,
                -5.704_988_7e-3,
            ],
        );
        let p = self.mul(p, z);
        let p = self.mul(p, x);
        let small = self.add(p, x);
        // Otherwise 1 − 2/(e^{2|x|} + 1) with the sign of x; e^{2|x|} = inf gives 1.
        let two_ax = self.add(ax, ax);
        let e = self.exp(two_ax);
        let e1 = self.addc(e, 1.0);
        let two = self.c(2.0);
        let q = self.div(two, e1);
        let one = self.c(1.0);
        let big = self.sub(one, q);
        let big = self.copysign(big, x);
        let is_small = self.cmpc(FloatCC::LessThan, ax, 0.625);
        self.sel(is_small, small, big)
    }

    /// erfc x = 1 − erf x with relative error ~1.2e-7 for every x (Numerical Recipes'
    /// `erfcc`, a Chebyshev fit of t·e^{−x²+P(t)}, t = 1/(1 + |x|/2)).
    pub fn erfc(&mut self, x: Value) -> Value {
        let ax = self.abs(x);
        let t = self.mulc(ax, 0.5);
        let t = self.addc(t, 1.0);
        let one = self.c(1.0);
        let t = self.div(one, t);
        let p = self.poly(
            t,
            &[
                -1.265_512_2,
                1.000_023_7,
                0.374_091_96,
                0.096_784_18,
                -0.186_288_06,
                0.278_868_07,
                -1.135_203_98,
                1.488_515_87,
                -0.822_152_23,
                0.170_872_77,
            ],
        );
        let z = self.mul(ax, ax);
        let arg = self.sub(p, z);
        let e = self.exp(arg);
        let r = self.mul(t, e);
        // erfc(−x) = 2 − erfc(x).
        let two = self.c(2.0);
        let reflected = self.sub(two, r);
        let negative = self.cmpc(FloatCC::LessThan, x, 0.0);
        self.sel(negative, reflected, r)
    }

    /// erf x: Maclaurin series below |x| = 1 (relative accuracy near 0), 1 − erfc|x|
    /// with the sign of x above.
    pub fn erf(&mut self, x: Value) -> Value {
        let ax = self.abs(x);
        let z = self.mul(x, x);
        // 2/√π · Σ (−1)ⁿ x^{2n+1} / (n!(2n+1)), n = 0..=10.
        let mut coeffs = [0f32; 11];
        let mut factorial = 1f64;
        for (n, c) in coeffs.iter_mut().enumerate() {
            if n > 0 {
                factorial *= n as f64;
            }
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            *c = (std::f64::consts::FRAC_2_SQRT_PI * sign / (factorial * (2 * n + 1) as f64)) as f32;
        }
        let s = self.poly(z, &coeffs);
        let series = self.mul(s, x);
        let c = self.erfc(ax);
        let one = self.c(1.0);
        let tail = self.sub(one, c);
        let tail = self.copysign(tail, x);
        let near = self.cmpc(FloatCC::LessThan, ax, 1.0);
        self.sel(near, series, tail)
    }

    /// ln(1 + eˣ) = max(x, 0) + ln(1 + e^{−|x|}).
    pub fn softplus(&mut self, x: Value) -> Value {
        let nax = self.neg_abs(x);
        let e = self.exp_below_89(nax);
        let l = self.log1p(e);
        let m = self.maxc(x, 0.0);
        self.add(m, l)
    }

    /// C `pow` for floats, with its special cases (x⁰ = 1 even for NaN, 1ʸ = 1,
    /// (−1)^±inf = 1, negative bases with integer exponents, signed zeros).
    pub fn pow(&mut self, x: Value, y: Value) -> Value {
        let ax = self.abs(x);
        let l = self.log(ax);
        let yl = self.mul(y, l);
        let mag = self.exp(yl);
        // Parity of y: integer when floor(y) == y, odd when y/2 is not an integer.
        let fy = self.b.ins().floor(y);
        let y_int = self.cmp(FloatCC::Equal, fy, y);
        let half = self.mulc(y, 0.5);
        let fhalf = self.b.ins().floor(half);
        let half_frac = self.cmp(FloatCC::NotEqual, fhalf, half);
        let y_odd = self.and(y_int, half_frac);
        // Sign bit of x (covers −0).
        let xb = self.to_bits(x);
        let zero_i = self.ci(0);
        let x_neg = Mask(self.b.ins().icmp(IntCC::SignedLessThan, xb, zero_i));
        let neg_mag = self.neg(mag);
        let flip = self.and(x_neg, y_odd);
        let r = self.sel(flip, neg_mag, mag);
        // A finite, non-zero negative base with a non-integer exponent has no real power.
        let below = self.cmpc(FloatCC::LessThan, x, 0.0);
        let finite = self.cmpc(FloatCC::NotEqual, x, f32::NEG_INFINITY);
        let not_int = self.not(y_int);
        let bad = self.and(below, finite);
        let bad = self.and(bad, not_int);
        let r = self.selc(bad, f32::NAN, r);
        // |x| = 1 with y = ±inf, and x = 1 with anything: 1.
        let y_inf = self.cmpc(FloatCC::Equal, ax, 1.0);
        let abs_y = self.abs(y);
        let y_is_inf = self.cmpc(FloatCC::Equal, abs_y, f32::INFINITY);
        let unit_inf = self.and(y_inf, y_is_inf);
        let r = self.selc(unit_inf, 1.0, r);
        let x_one = self.cmpc(FloatCC::Equal, x, 1.0);
        let r = self.selc(x_one, 1.0, r);
        let y_zero = self.cmpc(FloatCC::Equal, y, 0.0);
        self.selc(y_zero, 1.0, r)
    }
}
