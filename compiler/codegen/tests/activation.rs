//! The AVX2+FMA activation functions (`microkernel::activation`): the piecewise-linear
//! steps bit for bit against the f32x4 Cranelift path (the same operations, so equal
//! results, IEEE edges included), the sigmoid and SiLU within their documented bounds
//! against the interpreter and against f64 (flushing included), rows with tails and
//! strides (nothing outside the rows written, a bias the same as shifted inputs), and
//! GEMM and depthwise convolutions with every activation against the interpreter on the
//! host (which calls the functions) and on x86-64-v2 (which keeps the f32x4 epilogues).

mod common;

use cnnc_codegen::microkernel::activation::{self, ActivationSpec};
use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{ConvGeometry, DType, EpilogueStep, Graph, Op, Tensor, TensorData, TensorType, UnaryFn, interp};
use common::{Rng, cases, check_close, random_tensor};
use cranelift_jit::{JITBuilder, JITModule};
use proptest::prelude::*;

type ActivationFn = unsafe extern "sysv64" fn(*mut f32, i64, i64, i64, *const f32);

fn host_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A JIT module holding one activation function (freed on drop).
struct Jitted {
    module: Option<JITModule>,
    call: ActivationFn,
}

impl Drop for Jitted {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: `call` dies with self.
            unsafe { m.free_memory() };
        }
    }
}

fn jit(spec: &ActivationSpec) -> Jitted {
    let target = TargetSpec::parse(None, None).unwrap();
    let isa = target.isa(false).expect("isa");
    let mut module = JITModule::new(JITBuilder::with_isa(isa, cranelift_module::default_libcall_names()));
    let id = activation::define(&mut module, spec).expect("define");
    module.finalize_definitions().expect("finalize");
    let ptr = module.get_finalized_function(id);
    // SAFETY: the function has this signature (SystemV).
    let call = unsafe { std::mem::transmute::<*const u8, ActivationFn>(ptr) };
    Jitted {
        module: Some(module),
        call,
    }
}

impl Jitted {
    /// Runs over `rows` rows of `cols` floats, `stride` floats apart, in `data`.
    fn run(&self, data: &mut [f32], rows: usize, cols: usize, stride: usize, bias: &[f32]) {
        assert!(rows == 0 || (rows - 1) * stride + cols <= data.len());
        assert!(bias.len() >= rows);
        // SAFETY: the rows lie inside `data`, the bias has a value per row.
        unsafe {
            (self.call)(
                data.as_mut_ptr(),
                rows as i64,
                cols as i64,
                (stride * 4) as i64,
                bias.as_ptr(),
            )
        };
    }
}

/// The f32x4 path: the steps as a chain of elementwise nodes through the JIT.
fn f32x4_path(steps: &[UnaryFn], xs: &[f32]) -> Vec<f32> {
    let mut g = Graph::new("chain");
    let mut v = g.add_input(TensorType::f32([xs.len()]), "x");
    for (i, &f) in steps.iter().enumerate() {
        v = g.push1(format!("f{i}"), Op::Unary(f), &[v]).unwrap();
    }
    g.outputs.push(v);
    let model = JitModel::compile(&g).unwrap();
    let out = model
        .run(&[Tensor::new([xs.len()], TensorData::F32(xs.to_vec()))])
        .unwrap();
    match &out[0].data {
        TensorData::F32(v) => v.clone(),
        other => panic!("{other:?}"),
    }
}

/// Every supported function with parameters that reach each branch (negative and
/// infinite parameters included), and chains.
fn specs() -> Vec<Vec<UnaryFn>> {
    use UnaryFn::*;
    let single = [
        Relu,
        Sigmoid,
        HardSwish,
        Swish { alpha: 1.0 },
        Swish { alpha: 1.702 },
        Swish { alpha: -0.5 },
        LeakyRelu { alpha: 0.01 },
        LeakyRelu { alpha: -2.0 },
        Clip { min: 0.0, max: 6.0 },
        Clip {
            min: f32::NEG_INFINITY,
            max: 0.25,
        },
        Clip {
            min: -1.0,
            max: f32::INFINITY,
        },
        HardSigmoid { alpha: 0.2, beta: 0.5 },
        HardSigmoid {
            alpha: -1.0 / 6.0,
            beta: 0.5,
        },
        Affine {
            scale: 1.5,
            shift: -0.25,
        },
    ];
    let mut all: Vec<Vec<UnaryFn>> = single.iter().map(|&f| vec![f]).collect();
    all.push(vec![Swish { alpha: 1.0 }, Clip { min: -0.2, max: 3.0 }]);
    all.push(vec![Affine { scale: 2.0, shift: 1.0 }, Sigmoid, Relu]);
    all.push(vec![HardSwish, LeakyRelu { alpha: 0.1 }, Swish { alpha: 1.0 }]);
    all
}

/// Inputs: IEEE edges, denormals, every magnitude up to overflow, random values.
fn inputs() -> Vec<f32> {
    let mut xs = vec![
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        -f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        88.7,
        89.5,
        -89.5,
        -103.9,
        -104.5,
        -150.0,
        1e-30,
        -1e-30,
    ];
    let mut e = -40.0f32;
    while e <= 38.0 {
        let m = 10f32.powf(e);
        xs.extend([m, -m, 1.37 * m, -1.37 * m]);
        e += 0.25;
    }
    let n = 4001;
    xs.extend((0..n).map(|i| -120.0 + 240.0 * i as f32 / (n - 1) as f32));
    let mut rng = Rng(0x5eed);
    xs.extend((0..2000).map(|_| rng.f32_in(-12.0, 12.0)));
    xs
}

fn same(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// Whether the steps include one the machine code computes by its own route (not
/// bit for bit with math.rs).
fn has_transcendental(steps: &[UnaryFn]) -> bool {
    steps
        .iter()
        .any(|f| matches!(f, UnaryFn::Sigmoid | UnaryFn::Swish { .. }))
}

/// The reference of a chain: the piecewise-linear steps through the f32x4 path (which
/// the machine code matches bit for bit), the sigmoid and SiLU through the interpreter.
fn reference_chain(steps: &[UnaryFn], xs: &[f32]) -> Vec<f32> {
    let mut v = xs.to_vec();
    for step in steps {
        v = if has_transcendental(&[*step]) {
            interpreter_chain(&[*step], &v)
        } else {
            f32x4_path(&[*step], &v)
        };
    }
    v
}

/// The interpreter's chain (each step rounded to f32, as the spec says).
fn interpreter_chain(steps: &[UnaryFn], xs: &[f32]) -> Vec<f32> {
    let mut t = Tensor::new([xs.len()], TensorData::F32(xs.to_vec()));
    let epilogue: Vec<EpilogueStep> = steps.iter().map(|&f| EpilogueStep::Unary(f)).collect();
    interp::apply_epilogue(&mut t, &epilogue, &[]).unwrap();
    match t.data {
        TensorData::F32(v) => v,
        other => panic!("{other:?}"),
    }
}

/// The documented bound of the sigmoid and SiLU (module docs of `activation.rs`).
const RELATIVE_BOUND: f64 = 4e-6;
/// e^−|αx| below this is flushed to 0.
const FLUSHED: f64 = 2.8e-38;

/// `got` against the interpreter for chains with a sigmoid or SiLU: NaN in the same
/// places, infinities equal, else within the relative bound (widened by the rounding
/// of αx, which e^{αx} magnifies by |αx|: the interpreter multiplies in f64) plus the
/// flush allowance.
fn within_bound(steps: &[UnaryFn], x: f32, got: f32, want: f32) -> bool {
    if got == want {
        return true;
    }
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want.is_infinite() || got.is_infinite() {
        return want == got;
    }
    let scale = steps
        .iter()
        .map(|f| match f {
            UnaryFn::Swish { alpha } => alpha.abs().max(1.0) as f64,
            UnaryFn::Affine { scale, .. } => scale.abs().max(1.0) as f64,
            _ => 1.0,
        })
        .product::<f64>();
    let magnitude = (x as f64).abs() * scale;
    let relative = RELATIVE_BOUND + magnitude * f32::EPSILON as f64 / 2.0;
    (got as f64 - want as f64).abs() <= relative * (want as f64).abs() + FLUSHED * magnitude.max(1.0) * 2.0
}

#[test]
fn functions_match_the_f32x4_path_or_the_bounds() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: the host has no AVX2+FMA");
        return;
    }
    let xs = inputs();
    let bias_values = [0.0f32, 0.75, -3.5, f32::NAN];
    for steps in specs() {
        let plain = jit(&ActivationSpec::new(false, &steps).unwrap());
        let mut got = xs.clone();
        plain.run(&mut got, 1, xs.len(), xs.len(), &[0.0]);
        if has_transcendental(&steps) {
            let want = reference_chain(&steps, &xs);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    within_bound(&steps, xs[i], g, w),
                    "{steps:?}({:e}) = {g:e}, reference {w:e}",
                    xs[i]
                );
            }
        } else {
            let want = f32x4_path(&steps, &xs);
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(same(g, w), "{steps:?}({:e}) = {g:e}, f32x4 path {w:e}", xs[i]);
            }
        }
        // With a bias per row: bit for bit the plain function of x + bias.
        let biased = jit(&ActivationSpec::new(true, &steps).unwrap());
        let cols = 1013;
        let rows = bias_values.len();
        let mut data: Vec<f32> = (0..rows * cols).map(|i| xs[i % xs.len()]).collect();
        let mut want: Vec<f32> = data
            .iter()
            .enumerate()
            .map(|(i, &x)| x + bias_values[i / cols])
            .collect();
        let all = want.len();
        plain.run(&mut want, 1, all, all, &[0.0]);
        biased.run(&mut data, rows, cols, cols, &bias_values);
        for (i, (&g, &w)) in data.iter().zip(&want).enumerate() {
            assert!(
                same(g, w),
                "{steps:?} with bias {}: x = {:e} gives {g:e}, the plain function {w:e}",
                bias_values[i / cols],
                xs[i % xs.len()]
            );
        }
    }
}

#[test]
fn rows_of_any_width_and_stride_touch_nothing_else() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: the host has no AVX2+FMA");
        return;
    }
    let steps = [UnaryFn::Swish { alpha: 1.0 }];
    let f = jit(&ActivationSpec::new(true, &steps).unwrap());
    let plain = jit(&ActivationSpec::new(false, &steps).unwrap());
    let sentinel = f32::from_bits(0x7fc0_1234);
    let mut rng = Rng(7);
    for rows in [0usize, 1, 2, 3, 6] {
        for cols in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 23, 24, 31, 33, 50] {
            for gap in [0usize, 1, 5] {
                let stride = cols + gap;
                let len = rows * stride + 9;
                let mut data = vec![sentinel; len];
                let bias: Vec<f32> = (0..rows.max(1)).map(|_| rng.f32_in(-1.0, 1.0)).collect();
                let mut inside = vec![false; len];
                for r in 0..rows {
                    for c in 0..cols {
                        data[r * stride + c] = rng.f32_in(-8.0, 8.0);
                        inside[r * stride + c] = true;
                    }
                }
                let mut want: Vec<f32> = (0..len)
                    .map(|i| {
                        if inside[i] {
                            data[i] + bias[i / stride.max(1)]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                plain.run(&mut want, 1, len, len, &[0.0]);
                f.run(&mut data, rows, cols, stride, &bias);
                for i in 0..len {
                    if inside[i] {
                        assert!(
                            same(data[i], want[i]),
                            "rows {rows} cols {cols} stride {stride}: element {i}"
                        );
                    } else {
                        assert_eq!(
                            data[i].to_bits(),
                            sentinel.to_bits(),
                            "rows {rows} cols {cols} stride {stride}: wrote outside the rows at {i}"
                        );
                    }
                }
            }
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The bounds of the module docs, measured on the machine code itself against f64.
#[test]
fn silu_and_sigmoid_meet_the_documented_accuracy() {
    if !host_has_avx2_fma() {
        eprintln!("skipped: the host has no AVX2+FMA");
        return;
    }
    let n = 400_003;
    let xs: Vec<f32> = (0..n).map(|i| -86.0 + 126.0 * i as f32 / (n - 1) as f32).collect();
    let mut rng = Rng(0xacc);
    let xs: Vec<f32> = xs
        .into_iter()
        .chain((0..100_000).map(|_| rng.f32_in(-10.0, 10.0)))
        .chain((0..400).map(|i| 1e-6 * (i as f32 - 200.0)))
        .collect();
    let cases: [(UnaryFn, fn(f64) -> f64); 4] = [
        (UnaryFn::Sigmoid, sigmoid),
        (UnaryFn::Swish { alpha: 1.0 }, |x| x * sigmoid(x)),
        // α·x is rounded to f32 first, an error e^{αx} magnifies by |αx|: the
        // reference starts from the same rounded product.
        (UnaryFn::Swish { alpha: 1.702 }, |x| {
            x * sigmoid((1.702f32 * x as f32) as f64)
        }),
        (UnaryFn::Swish { alpha: -0.5 }, |x| x * sigmoid((-0.5f32 * x as f32) as f64)),
    ];
    for (f, exact) in cases {
        let jitted = jit(&ActivationSpec::new(false, &[f]).unwrap());
        let mut got = xs.clone();
        jitted.run(&mut got, 1, xs.len(), xs.len(), &[0.0]);
        let mut worst = (0.0f64, 0.0f32);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = exact(x as f64);
            if want.abs() < 1e-30 {
                continue;
            }
            let err = (y as f64 - want).abs() / want.abs();
            if err > worst.0 || err.is_nan() {
                worst = (err, x);
            }
        }
        eprintln!("{f:?}: worst relative error {:e} at x = {:e}", worst.0, worst.1);
        assert!(
            worst.0 <= RELATIVE_BOUND,
            "{f:?}: relative error {:e} at x = {:e}",
            worst.0,
            worst.1
        );
    }
    // Far down the flush applies: within 2.8e-38·max(1, |x|) of the exact value, and
    // no denormal garbage from the exponent arithmetic.
    let xs: Vec<f32> = (0..8001).map(|i| -200.0 + 114.5 * i as f32 / 8000.0).collect();
    for (f, exact) in [
        (UnaryFn::Sigmoid, sigmoid as fn(f64) -> f64),
        (UnaryFn::Swish { alpha: 1.0 }, |x| x * sigmoid(x)),
    ] {
        let jitted = jit(&ActivationSpec::new(false, &[f]).unwrap());
        let mut got = xs.clone();
        jitted.run(&mut got, 1, xs.len(), xs.len(), &[0.0]);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = exact(x as f64);
            assert!(
                (y as f64 - want).abs() <= FLUSHED * (x as f64).abs().max(1.0) + RELATIVE_BOUND * want.abs(),
                "{f:?}({x}) = {y:e}, want {want:e}"
            );
        }
    }
    let edges = [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 100.0, -200.0, f32::MAX, f32::MIN];
    let sigmoid_fn = jit(&ActivationSpec::new(false, &[UnaryFn::Sigmoid]).unwrap());
    let mut got = edges.to_vec();
    sigmoid_fn.run(&mut got, 1, edges.len(), edges.len(), &[0.0]);
    assert!(got[0].is_nan() && got[1].is_nan());
    assert_eq!(&got[2..], &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
    // Payloads whose low bits would land in the exponent field stay NaN.
    let payloads: Vec<f32> = (0..64u32).map(|i| f32::from_bits(0x7fc0_0000 | i * 37 | (i << 9))).collect();
    for f in [UnaryFn::Sigmoid, UnaryFn::Swish { alpha: 1.0 }, UnaryFn::Swish { alpha: 2.5 }] {
        let jitted = jit(&ActivationSpec::new(false, &[f]).unwrap());
        let mut got = payloads.clone();
        let all = got.len();
        jitted.run(&mut got, 1, all, all, &[0.0]);
        assert!(got.iter().all(|v| v.is_nan()), "{f:?} of NaN payloads: {got:?}");
    }
    let silu = jit(&ActivationSpec::new(false, &[UnaryFn::Swish { alpha: 1.0 }]).unwrap());
    let mut got = edges.to_vec();
    silu.run(&mut got, 1, edges.len(), edges.len(), &[0.0]);
    assert!(got[0].is_nan() && got[1].is_nan());
    // x·sigmoid(x) at −inf is −inf·0, NaN, as in the interpreter.
    assert!(got[3].is_nan());
    assert_eq!([got[2], got[4], got[5], got[6]], [f32::INFINITY, 100.0, -0.0, f32::MAX]);
    assert_eq!(got[7].to_bits(), (-0.0f32).to_bits());
}

#[test]
fn symbols_tell_parameters_apart_and_unsupported_steps_have_no_function() {
    let a = ActivationSpec::new(false, &[UnaryFn::LeakyRelu { alpha: 0.1 }]).unwrap();
    let b = ActivationSpec::new(false, &[UnaryFn::LeakyRelu { alpha: -0.1 }]).unwrap();
    let c = ActivationSpec::new(true, &[UnaryFn::LeakyRelu { alpha: 0.1 }]).unwrap();
    assert_ne!(a.symbol(), b.symbol());
    assert_ne!(a.symbol(), c.symbol());
    assert!(ActivationSpec::new(false, &[UnaryFn::Tanh]).is_none());
    // αx would be NaN for x = 0 or ±inf where x is not: left to the f32x4 path.
    for alpha in [0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        assert!(ActivationSpec::new(false, &[UnaryFn::Swish { alpha }]).is_none());
    }
    assert!(ActivationSpec::new(false, &[UnaryFn::Relu, UnaryFn::Erf]).is_none());
    assert!(ActivationSpec::new(true, &[]).is_none());
    assert!(
        ActivationSpec::new(
            false,
            &[UnaryFn::Clip {
                min: f32::NAN,
                max: 1.0
            }]
        )
        .is_none()
    );
}

/// The activations a convolution's epilogue may end with in these tests.
const ACTIVATIONS: [UnaryFn; 10] = [
    UnaryFn::Relu,
    UnaryFn::Sigmoid,
    UnaryFn::HardSwish,
    UnaryFn::Swish { alpha: 1.0 },
    UnaryFn::Swish { alpha: 0.8 },
    UnaryFn::LeakyRelu { alpha: 0.1 },
    UnaryFn::Clip { min: 0.0, max: 6.0 },
    UnaryFn::Clip { min: -0.5, max: 0.5 },
    UnaryFn::HardSigmoid { alpha: 0.2, beta: 0.5 },
    UnaryFn::Affine {
        scale: -2.0,
        shift: 0.5,
    },
];

#[derive(Clone, Debug)]
struct ConvProblem {
    batch: usize,
    in_channels: usize,
    out_channels: usize,
    /// Depthwise (groups = channels, out = in) or dense.
    depthwise: bool,
    input: [usize; 2],
    kernel: usize,
    stride: usize,
    pad: usize,
    bias: bool,
    steps: Vec<UnaryFn>,
    seed: u64,
}

impl ConvProblem {
    fn graph(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let (c, m) = if self.depthwise {
            (self.in_channels, self.in_channels)
        } else {
            (self.in_channels, self.out_channels)
        };
        let groups = if self.depthwise { c } else { 1 };
        let mut g = Graph::new("conv");
        let x_shape = [self.batch, c, self.input[0], self.input[1]];
        let x = g.add_input(TensorType::f32(x_shape), "x");
        let inputs = vec![random_tensor(&mut rng, DType::F32, &x_shape, -2.0, 2.0)];
        let w_shape = [m, c / groups, self.kernel, self.kernel];
        let w = g.add_constant("w", random_tensor(&mut rng, DType::F32, &w_shape, -0.5, 0.5));
        let mut conv_inputs = vec![x, w];
        if self.bias {
            conv_inputs.push(g.add_constant("b", random_tensor(&mut rng, DType::F32, &[m], -1.0, 1.0)));
        }
        let geometry = ConvGeometry {
            strides: vec![self.stride; 2],
            dilations: vec![1, 1],
            pads_begin: vec![self.pad; 2],
            pads_end: vec![self.pad; 2],
            groups,
        };
        let y = g.push1("conv", Op::Conv(geometry), &conv_inputs).unwrap();
        let node = g.nodes.last_mut().unwrap();
        node.epilogue = self.steps.iter().map(|&f| EpilogueStep::Unary(f)).collect();
        node.schedule.kernel = if self.depthwise { "depthwise" } else { "gemm" }.into();
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, inputs)
    }
}

fn conv_problem() -> impl Strategy<Value = ConvProblem> {
    (
        (1usize..=2, 1usize..=20, 1usize..=20, any::<bool>()),
        (1usize..=20, 1usize..=40),
        prop_oneof![
            Just((1usize, 1usize, 0usize)),
            Just((3, 1, 1)),
            Just((3, 2, 1)),
            Just((5, 1, 2))
        ],
        any::<bool>(),
        proptest::collection::vec(0usize..ACTIVATIONS.len(), 1..=2),
        any::<u64>(),
    )
        .prop_map(
            |((batch, in_channels, out_channels, depthwise), (h, w), (kernel, stride, pad), bias, steps, seed)| {
                ConvProblem {
                    batch,
                    in_channels,
                    out_channels,
                    depthwise,
                    input: [h.max(kernel), w.max(kernel)],
                    kernel,
                    stride,
                    pad,
                    bias,
                    steps: steps.iter().map(|&s| ACTIVATIONS[s]).collect(),
                    seed,
                }
            },
        )
}

fn check_all(got: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

fn run_shared(g: &Graph, cpu: &str, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let target = TargetSpec::parse(None, Some(cpu)).map_err(|e| e.to_string())?;
    common::run_shared_library("activation", g, &target, 2, inputs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), ..ProptestConfig::default() })]

    /// The host: on AVX2+FMA the epilogues run in the activation functions.
    #[test]
    fn conv_epilogues_on_the_host_match_interpreter(p in conv_problem()) {
        let (g, inputs) = p.graph();
        let want = interp::run(&g, &inputs).unwrap();
        let model = JitModel::compile(&g).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = model.run(&inputs).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(16), ..ProptestConfig::default() })]

    /// x86-64-v2 keeps the f32x4 epilogues (a two-thread session over a `.so`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn conv_epilogues_on_x86_64_v2_match_interpreter(p in conv_problem()) {
        let (g, inputs) = p.graph();
        let want = interp::run(&g, &inputs).unwrap();
        let got = run_shared(&g, "x86-64-v2", &inputs).map_err(TestCaseError::fail)?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

/// Whether the host's compiled library really calls the functions (and x86-64-v2's
/// does not): the symbols of a SiLU convolution's object.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_functions_are_defined_only_for_avx2_fma_targets() {
    let p = ConvProblem {
        batch: 1,
        in_channels: 8,
        out_channels: 16,
        depthwise: false,
        input: [8, 8],
        kernel: 1,
        stride: 1,
        pad: 0,
        bias: true,
        steps: vec![UnaryFn::Swish { alpha: 1.0 }],
        seed: 3,
    };
    let (g, _) = p.graph();
    let symbol = ActivationSpec::new(true, &p.steps).unwrap().symbol();
    let contains = |haystack: &[u8], needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    let v2 = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
    let object = cnnc_codegen::compile_object(&g, &v2).unwrap();
    assert!(!contains(&object, symbol.as_bytes()));
    let v3 = TargetSpec::parse(None, Some("x86-64-v3")).unwrap();
    assert!(activation::available(&v3));
    let object = cnnc_codegen::compile_object(&g, &v3).unwrap();
    assert!(
        contains(&object, symbol.as_bytes()),
        "no {symbol} in the x86-64-v3 object"
    );
}

/// Nanoseconds per element over a 6x16 tile (the GEMM epilogue's shape) and a 56x56
/// plane (a depthwise channel), for the record: `cargo test --release -p cnnc-codegen
/// --test activation -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    if !host_has_avx2_fma() {
        return;
    }
    let mut rng = Rng(11);
    for steps in [
        vec![UnaryFn::Swish { alpha: 1.0 }],
        vec![UnaryFn::Sigmoid],
        vec![UnaryFn::Clip { min: 0.0, max: 6.0 }],
        vec![UnaryFn::Relu],
    ] {
        let f = jit(&ActivationSpec::new(true, &steps).unwrap());
        for (rows, cols) in [(6usize, 16usize), (1, 56 * 56)] {
            let source: Vec<f32> = (0..rows * cols).map(|_| rng.f32_in(-6.0, 6.0)).collect();
            let bias = vec![0.0f32; rows];
            let mut data = source.clone();
            let reps = 4_000_000 / (rows * cols);
            // The fastest of several trials (the machine is shared), minus the copy.
            let fastest = |data: &mut Vec<f32>, apply: bool| {
                (0..9)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        for _ in 0..reps {
                            data.copy_from_slice(&source);
                            if apply {
                                f.run(data, rows, cols, cols, &bias);
                            }
                            std::hint::black_box(&mut *data);
                        }
                        start.elapsed()
                    })
                    .min()
                    .unwrap()
            };
            let total = fastest(&mut data, true);
            let copy = fastest(&mut data, false);
            let ns = total.saturating_sub(copy).as_secs_f64() * 1e9 / (reps * rows * cols) as f64;
            eprintln!("{steps:?} {rows}x{cols}: {ns:.3} ns/element");
        }
    }
}
