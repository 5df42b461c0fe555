//! Bool masks in the vectorised map engine: comparisons, logical ops and `where` chained
//! the way activation and pooling gradients use them (bool intermediates in the
//! workspace, broadcast scalars, NaN), against the interpreter, on the host (JIT) and on
//! the SSE-only levels (x86-64, x86-64-v2) through a linked `.so`.

mod common;

use cnnc_codegen::{JitModel, TargetSpec};
use cnnc_ir::{BinaryFn, DType, Graph, Op, Tensor, TensorType, UnaryFn, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

/// Floats with ties against the thresholds, signed zeros, NaN and infinities.
fn mask_floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(12) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => 0.0,
            3 => -0.0,
            4 => 6.0,
            5 => 1e-40,
            _ => rng.f32_in(-8.0, 8.0),
        })
        .collect()
}

/// ReLU6's gradient mask, a max-pool style "first hit" chain and a mask read through
/// a broadcast, all from one f32 input `x`, a gradient `g` and a bool `flag` of
/// `flag_shape` (broadcast against x).
fn mask_graph(shape: &[usize], flag_shape: &[usize]) -> Graph {
    let mut g = Graph::new("masks");
    let x = g.add_input(TensorType::f32(shape.to_vec()), "x");
    let grad = g.add_input(TensorType::f32(shape.to_vec()), "g");
    let flag = g.add_input(TensorType::new(DType::Bool, flag_shape.to_vec()), "flag");
    let scalar = |g: &mut Graph, v: f32| g.add_constant("k", Tensor::f32(Vec::<usize>::new(), vec![v]));
    let (zero, six) = (scalar(&mut g, 0.0), scalar(&mut g, 6.0));
    let above = g.push1("above", Op::Binary(BinaryFn::Greater), &[x, zero]).unwrap();
    let below = g.push1("below", Op::Binary(BinaryFn::Less), &[x, six]).unwrap();
    let inside = g.push1("inside", Op::Binary(BinaryFn::And), &[above, below]).unwrap();
    let masked = g.push1("masked", Op::Where, &[inside, grad, zero]).unwrap();
    let hit = g.push1("hit", Op::Binary(BinaryFn::Equal), &[x, grad]).unwrap();
    let not_inside = g.push1("not", Op::Unary(UnaryFn::Not), &[inside]).unwrap();
    let first = g.push1("first", Op::Binary(BinaryFn::And), &[hit, not_inside]).unwrap();
    let either = g.push1("either", Op::Binary(BinaryFn::Or), &[first, flag]).unwrap();
    let odd = g.push1("odd", Op::Binary(BinaryFn::Xor), &[either, inside]).unwrap();
    let same = g.push1("same", Op::Binary(BinaryFn::Equal), &[odd, flag]).unwrap();
    let picked = g.push1("picked", Op::Where, &[flag, masked, x]).unwrap();
    let bools = g.push1("bools", Op::Where, &[same, odd, inside]).unwrap();
    let at_least = g
        .push1("ge", Op::Binary(BinaryFn::GreaterOrEqual), &[picked, grad])
        .unwrap();
    let at_most = g
        .push1("le", Op::Binary(BinaryFn::LessOrEqual), &[picked, six])
        .unwrap();
    g.outputs.extend([masked, either, bools, picked, at_least, at_most]);
    g
}

fn inputs(rng: &mut Rng, shape: &[usize], flag_shape: &[usize]) -> Vec<Tensor> {
    let n: usize = shape.iter().product();
    let x = mask_floats(rng, n);
    // Some gradients equal x, so `hit` is not always false.
    let grad: Vec<f32> = x
        .iter()
        .map(|&v| if rng.below(3) == 0 { v } else { rng.f32_in(-5.0, 5.0) })
        .collect();
    vec![
        Tensor::f32(shape.to_vec(), x),
        Tensor::f32(shape.to_vec(), grad),
        random_tensor(rng, DType::Bool, flag_shape, 0.0, 0.0),
    ]
}

fn check_all(got: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

fn run_shared(g: &Graph, target: &TargetSpec, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    common::run_shared_library("mask-lanes", g, target, 1, inputs)
}

/// Shapes with long contiguous runs (the vector loop, unrolled by four, and its tails)
/// and a flag that is a scalar, a row or the full shape.
fn problem() -> impl Strategy<Value = (Vec<usize>, u8, u64)> {
    (prop::collection::vec(1usize..40, 1..=3), 0u8..3, 1u64..u64::MAX)
}

fn flag_shape(shape: &[usize], kind: u8) -> Vec<usize> {
    match kind {
        0 => Vec::new(),
        1 => vec![shape[shape.len() - 1]],
        _ => shape.to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    #[test]
    fn mask_chains_match_interpreter_on_host((shape, kind, seed) in problem()) {
        let flag = flag_shape(&shape, kind);
        let g = mask_graph(&shape, &flag);
        let ins = inputs(&mut Rng(seed), &shape, &flag);
        let want = interp::run(&g, &ins).map_err(TestCaseError::fail)?;
        let got = JitModel::compile(&g).and_then(|m| m.run(&ins)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_all(&got, &want).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(6), ..ProptestConfig::default() })]

    #[test]
    fn mask_chains_match_interpreter_on_sse_levels((shape, kind, seed) in problem()) {
        let flag = flag_shape(&shape, kind);
        let g = mask_graph(&shape, &flag);
        let ins = inputs(&mut Rng(seed), &shape, &flag);
        let want = interp::run(&g, &ins).map_err(TestCaseError::fail)?;
        for cpu in ["x86-64", "x86-64-v2"] {
            let target = TargetSpec::parse(None, Some(cpu)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let got = run_shared(&g, &target, &ins).map_err(|e| TestCaseError::fail(format!("{cpu}: {e}")))?;
            check_all(&got, &want).map_err(|e| TestCaseError::fail(format!("{cpu}: {e}")))?;
        }
    }
}
