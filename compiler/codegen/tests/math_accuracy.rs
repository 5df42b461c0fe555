//! The documented accuracy of the inline math (`math.rs`) measured over dense sweeps
//! against f64, through the whole kernel path (map engine, vector body and scalar
//! tail): on the host (fused multiply-adds where it has FMA) and on x86-64-v2 (never
//! fused), so both forms of every polynomial are held to the same bounds.

use std::path::PathBuf;

use cnnc_codegen::{JitModel, TargetSpec, link_shared};
use cnnc_ir::{Graph, Op, Tensor, TensorData, TensorType, UnaryFn};

fn unary_graph(f: UnaryFn, n: usize) -> Graph {
    let mut g = Graph::new("math");
    let x = g.add_input(TensorType::f32([n]), "x");
    let y = g.push1("f", Op::Unary(f), &[x]).unwrap();
    g.outputs.push(y);
    g
}

/// `n` points spread evenly over [lo, hi] (odd n: the scalar tail runs too).
fn sweep(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    (0..n).map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32).collect()
}

fn run_host(f: UnaryFn, xs: &[f32]) -> Vec<f32> {
    let g = unary_graph(f, xs.len());
    let model = JitModel::compile(&g).unwrap();
    let out = model
        .run(&[Tensor::new([xs.len()], TensorData::F32(xs.to_vec()))])
        .unwrap();
    match &out[0].data {
        TensorData::F32(v) => v.clone(),
        other => panic!("{other:?}"),
    }
}

fn run_target(f: UnaryFn, xs: &[f32], cpu: &str) -> Vec<f32> {
    let g = unary_graph(f, xs.len());
    let target = TargetSpec::parse(None, Some(cpu)).unwrap();
    let object = cnnc_codegen::compile_object(&g, &target).unwrap();
    let path: PathBuf = std::env::temp_dir().join(format!("cnnc-math-{cpu}-{f:?}-{}.so", std::process::id()));
    link_shared(&object, &path, &target).unwrap();
    let model = cnnc_runtime::Model::load(&path).unwrap();
    let mut session = cnnc_runtime::Session::new(&model, 1).unwrap();
    let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = vec![0u8; bytes.len()];
    session.run(&[&bytes], &mut [&mut out]).unwrap();
    let _ = std::fs::remove_file(&path);
    out.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Largest error relative to the f64 result, over results at least `floor` in size
/// (below it: absolute error against `floor`).
fn max_relative_error(xs: &[f32], got: &[f32], exact: impl Fn(f64) -> f64, floor: f64) -> (f64, f32) {
    let mut worst = (0.0, 0.0);
    for (&x, &y) in xs.iter().zip(got) {
        let want = exact(x as f64);
        let err = (y as f64 - want).abs() / want.abs().max(floor);
        if err > worst.0 || err.is_nan() {
            worst = (err, x);
        }
    }
    worst
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn check(cpu: Option<&str>) {
    let run = |f: UnaryFn, xs: &[f32]| match cpu {
        None => run_host(f, xs),
        Some(cpu) => run_target(f, xs, cpu),
    };
    let n = 200_003;
    let cases: [(UnaryFn, f32, f32, fn(f64) -> f64, f64, f64); 5] = [
        (UnaryFn::Exp, -87.0, 88.0, f64::exp, 1e-30, 2.5e-7),
        (UnaryFn::Sigmoid, -80.0, 40.0, sigmoid, 1e-30, 4e-7),
        (
            UnaryFn::Swish { alpha: 1.0 },
            -80.0,
            40.0,
            |x| x * sigmoid(x),
            1e-30,
            4e-7,
        ),
        (UnaryFn::Tanh, -12.0, 12.0, f64::tanh, 1e-30, 4e-7),
        (UnaryFn::Log, 1e-30, 1e30, f64::ln, 1e-30, 2.5e-7),
    ];
    for (f, lo, hi, exact, floor, bound) in cases {
        let xs = sweep(lo, hi, n);
        let got = run(f, &xs);
        let (err, at) = max_relative_error(&xs, &got, exact, floor);
        assert!(
            err <= bound,
            "{cpu:?} {f:?}: relative error {err:e} at x = {at:e} (bound {bound:e})"
        );
    }
    // Underflow through the denormals: e^x to within one denormal unit, and the
    // sigmoid of large negative inputs keeps its digits there too.
    let xs = sweep(-103.0, -87.5, 4001);
    let ulp = f32::from_bits(1) as f64;
    for (f, exact) in [(UnaryFn::Exp, f64::exp as fn(f64) -> f64), (UnaryFn::Sigmoid, sigmoid)] {
        let got = run(f, &xs);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = exact(x as f64);
            assert!(
                (y as f64 - want).abs() <= ulp + 1e-6 * want,
                "{cpu:?} {f:?}({x}) = {y:e}, want {want:e}"
            );
        }
    }
    // IEEE edges.
    let edges = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 100.0, -200.0];
    let got = run(UnaryFn::Exp, &edges);
    assert!(got[0].is_nan());
    assert_eq!(&got[1..], &[f32::INFINITY, 0.0, 1.0, 1.0, f32::INFINITY, 0.0]);
    let got = run(UnaryFn::Sigmoid, &edges);
    assert!(got[0].is_nan());
    assert_eq!(&got[1..], &[1.0, 0.0, 0.5, 0.5, 1.0, 0.0]);
}

#[test]
fn math_meets_its_documented_accuracy_on_the_host() {
    check(None);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn math_meets_its_documented_accuracy_without_fma() {
    check(Some("x86-64-v2"));
}
