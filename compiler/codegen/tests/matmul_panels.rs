//! MatMul against the reference interpreter over random M, K, N and batch shapes:
//! constant B (the packed-panel kernel, `kernels::gemv`, for up to `MAX_ROWS` rows)
//! and B as a graph input (the general kernel), with fused epilogues (bias, Relu,
//! Swish); through the JIT on the host CPU and through a linked `.so` for the
//! x86-64-v2 target, run by a session of one and two threads.

mod common;

use cnnc_codegen::kernels::gemv;
use cnnc_codegen::{JitModel, TargetSpec, link_shared};
use cnnc_ir::{BinaryFn, EpilogueStep, Graph, Op, Tensor, TensorType, UnaryFn, interp};
use common::{Rng, cases, check_close, random_tensor};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Problem {
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    constant_b: bool,
    /// Bias add over N, then Relu or Swish, fused into the node.
    epilogue: Option<UnaryFn>,
    seed: u64,
}

impl Problem {
    fn n(&self) -> usize {
        self.b_shape[self.b_shape.len() - 1]
    }

    /// The graph (epilogue fused into the MatMul node) and its inputs.
    fn build(&self) -> (Graph, Vec<Tensor>) {
        let mut rng = Rng(self.seed | 1);
        let mut g = Graph::new("matmul");
        let a = random_tensor(&mut rng, cnnc_ir::DType::F32, &self.a_shape, -1.0, 1.0);
        let b = random_tensor(&mut rng, cnnc_ir::DType::F32, &self.b_shape, -1.0, 1.0);
        let x = g.add_input(TensorType::f32(self.a_shape.clone()), "a");
        let mut inputs = vec![a];
        let w = if self.constant_b {
            g.add_constant("b", b)
        } else {
            inputs.push(b);
            g.add_input(TensorType::f32(self.b_shape.clone()), "b")
        };
        let mut operands = vec![x, w];
        let mut epilogue = Vec::new();
        if let Some(f) = self.epilogue {
            let n = self.n();
            let bias = random_tensor(&mut rng, cnnc_ir::DType::F32, &[n], -1.0, 1.0);
            operands.push(g.add_constant("bias", bias));
            epilogue.push(EpilogueStep::Binary {
                func: BinaryFn::Add,
                operand: 2,
            });
            epilogue.push(EpilogueStep::Unary(f));
        }
        let y = g.push1("mm", Op::MatMul, &operands[..2]).unwrap();
        let node = g.nodes.iter_mut().find(|n| n.op == Op::MatMul).unwrap();
        node.inputs = operands;
        node.epilogue = epilogue;
        g.outputs.push(y);
        cnnc_ir::verify::verify(&g).unwrap();
        (g, inputs)
    }
}

fn problem() -> impl Strategy<Value = Problem> {
    let rows = prop_oneof![3 => 1usize..=5, 1 => 6usize..=70];
    let batch = prop_oneof![2 => Just(vec![]), 1 => Just(vec![2]), 1 => Just(vec![3, 1])];
    (
        rows,
        1usize..=40,
        prop_oneof![1usize..=9, 10usize..=90],
        batch,
        0u8..3,
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(UnaryFn::Relu)),
            Just(Some(UnaryFn::Swish { alpha: 1.0 }))
        ],
        any::<u64>(),
    )
        .prop_map(|(m, k, n, batch, b_form, constant_b, epilogue, seed)| {
            let mut a_shape = batch;
            a_shape.extend([m, k]);
            // B as [K, N], [1, K, N] (more axes than A when A has none) or batched.
            let b_shape = match b_form {
                0 => vec![k, n],
                1 => vec![1, k, n],
                _ => {
                    let mut s = a_shape[..a_shape.len() - 2].to_vec();
                    s.extend([k, n]);
                    s
                }
            };
            Problem {
                a_shape,
                b_shape,
                constant_b,
                epilogue,
                seed,
            }
        })
}

fn reference(g: &Graph, inputs: &[Tensor]) -> Vec<Tensor> {
    interp::run(g, inputs).unwrap()
}

fn check_all(got: &[Tensor], want: &[Tensor]) -> Result<(), String> {
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

fn takes_panels(g: &Graph) -> bool {
    g.nodes.iter().any(|n| n.op == Op::MatMul && gemv::plan(g, n).is_some())
}

fn check_jit(p: &Problem) -> Result<(), String> {
    let (g, inputs) = p.build();
    let want = reference(&g, &inputs);
    let model = JitModel::compile(&g).map_err(|e| e.to_string())?;
    let got = model.run(&inputs).map_err(|e| e.to_string())?;
    check_all(&got, &want)
}

/// Compiles for `target`, links, runs with a session of each thread count.
fn check_shared(p: &Problem, target: &TargetSpec, threads: &[usize]) -> Result<(), String> {
    let (g, inputs) = p.build();
    let want = reference(&g, &inputs);
    let object = cnnc_codegen::compile_object(&g, target).map_err(|e| e.to_string())?;
    let path = common::temp_so("matmul");
    link_shared(&object, &path, target).map_err(|e| e.to_string())?;
    let result = threads.iter().try_for_each(|&t| {
        let got = common::run_loaded(&path, &g, t, &inputs)?;
        check_all(&got, &want).map_err(|e| format!("{t} threads: {e}"))
    });
    let _ = std::fs::remove_file(&path);
    result
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn matmul_on_the_host_matches_interpreter(p in problem()) {
        check_jit(&p).map_err(|e| TestCaseError::fail(format!("{p:?}: {e}")))?;
    }

    #[test]
    fn matmul_on_x86_64_v2_with_threads_matches_interpreter(p in problem()) {
        let target = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        check_shared(&p, &target, &[1, 2]).map_err(|e| TestCaseError::fail(format!("{p:?}: {e}")))?;
    }
}

fn fixed(a_shape: &[usize], b_shape: &[usize], epilogue: Option<UnaryFn>) -> Problem {
    Problem {
        a_shape: a_shape.to_vec(),
        b_shape: b_shape.to_vec(),
        constant_b: true,
        epilogue,
        seed: 7,
    }
}

#[test]
fn classifier_shapes_take_the_panel_kernel() {
    for p in [
        fixed(&[1, 64], &[64, 1000], Some(UnaryFn::Relu)),
        fixed(&[1, 37], &[37, 33], None),
        fixed(&[2, 3, 19], &[19, 13], None),
        fixed(&[5, 19], &[1, 19, 61], Some(UnaryFn::Swish { alpha: 1.0 })),
        fixed(&[64, 9], &[9, 7], None),
    ] {
        let (g, _) = p.build();
        assert!(takes_panels(&g), "{p:?} did not take the panel kernel");
        check_jit(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
    let (g, _) = fixed(&[65, 9], &[9, 7], None).build();
    assert!(!takes_panels(&g), "more than MAX_ROWS rows stay on the general kernel");
}

#[test]
fn large_classifier_splits_over_threads() {
    // K·N large enough for several tasks; a tail panel of 8 columns.
    let p = fixed(&[1, 512], &[512, 1000], Some(UnaryFn::Relu));
    let host = TargetSpec::host();
    check_shared(&p, &host, &[1, 2, 3]).unwrap();
    let baseline = TargetSpec::parse(None, Some("x86-64")).unwrap();
    check_shared(&fixed(&[3, 200], &[200, 301], None), &baseline, &[1, 2]).unwrap();
}
