//! Scalar formulas of the unary functions.
//!
//! Transcendental functions are evaluated in f64 and rounded once to f32, so the
//! oracle is as close to the exact value as an f32 can be; plain arithmetic (affine
//! maps, clamps, Softsign) is done in f32 as the formula is written.

use crate::op::UnaryFn;

const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// erf(x) · √π/2 · e^{x²} as the series Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1)): every term is
/// positive, so nothing cancels. Used for 0 <= x < SERIES_LIMIT.
fn erf_series_scaled(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    sum
}

/// erfc(x) for x >= SERIES_LIMIT from the continued fraction
/// erfc(x) = e^{-x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))), evaluated bottom-up.
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut tail = x;
    for n in (1..=120).rev() {
        tail = x + (n as f64 * 0.5) / tail;
    }
    (-x * x).exp() * (FRAC_2_SQRT_PI * 0.5) / tail
}

/// Below this the series is used, above it the continued fraction; both are accurate
/// to a few f64 ulps there.
const SERIES_LIMIT: f64 = 2.5;

/// The error function, accurate to ~1e-15 absolute.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return -erf(-x);
    }
    if x < SERIES_LIMIT {
        FRAC_2_SQRT_PI * (-x * x).exp() * erf_series_scaled(x)
    } else {
        1.0 - erfc_continued_fraction(x)
    }
}

/// The complementary error function 1 − erf(x), accurate in relative terms for large x.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x < SERIES_LIMIT { 1.0 - erf(x) } else { erfc_continued_fraction(x) }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// ln(1 + e^x) without overflow for large x or loss of precision for very negative x.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `f` on one f32. `Not` has no f32 meaning; the caller rejects it before.
/// Every function maps NaN to NaN except `PowConst`, which follows C `pow` (NaN⁰ = 1).
pub(crate) fn unary_f32(f: UnaryFn, x: f32) -> f32 {
    if x.is_nan() && !matches!(f, UnaryFn::PowConst { .. }) {
        return x;
    }
    let wide = x as f64;
    let rounded = |v: f64| v as f32;
    match f {
        UnaryFn::Neg => -x,
        UnaryFn::Abs => x.abs(),
        UnaryFn::Sqrt => rounded(wide.sqrt()),
        UnaryFn::Exp => rounded(wide.exp()),
        UnaryFn::Log => rounded(wide.ln()),
        UnaryFn::Reciprocal => 1.0 / x,
        UnaryFn::Floor => x.floor(),
        UnaryFn::Ceil => x.ceil(),
        UnaryFn::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        UnaryFn::Sigmoid => rounded(sigmoid(wide)),
        UnaryFn::Tanh => rounded(wide.tanh()),
        UnaryFn::Erf => rounded(erf(wide)),
        UnaryFn::Softplus => rounded(softplus(wide)),
        UnaryFn::Softsign => x / (1.0 + x.abs()),
        UnaryFn::Mish => rounded(wide * softplus(wide).tanh()),
        UnaryFn::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        // 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(−x/√2), which keeps relative accuracy for x < 0.
        UnaryFn::GeluErf => rounded(0.5 * wide * erfc(-wide * std::f64::consts::FRAC_1_SQRT_2)),
        UnaryFn::GeluTanh => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (wide + 0.044715 * wide * wide * wide);
            rounded(0.5 * wide * (1.0 + inner.tanh()))
        }
        UnaryFn::Not => f32::NAN,
        UnaryFn::LeakyRelu { alpha } => {
            if x < 0.0 {
                alpha * x
            } else {
                x
            }
        }
        UnaryFn::Elu { alpha } => {
            if x < 0.0 {
                rounded(alpha as f64 * wide.exp_m1())
            } else {
                x
            }
        }
        UnaryFn::Selu { alpha, gamma } => {
            if x > 0.0 {
                rounded(gamma as f64 * wide)
            } else {
                rounded(gamma as f64 * (alpha as f64 * wide.exp() - alpha as f64))
            }
        }
        UnaryFn::Celu { alpha } => {
            let a = alpha as f64;
            rounded(wide.max(0.0) + (a * (wide / a).exp_m1()).min(0.0))
        }
        UnaryFn::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
        UnaryFn::Swish { alpha } => rounded(wide * sigmoid(alpha as f64 * wide)),
        UnaryFn::Clip { min, max } => x.max(min).min(max),
        UnaryFn::Affine { scale, shift } => x * scale + shift,
        UnaryFn::PowConst { exponent } => rounded(wide.powf(exponent as f64)),
    }
}
