//! `Op::RandomUniform`: compiled code draws exactly the interpreter's numbers, each step
//! its own stream, uniformly over [0, 1).

mod common;

use cnnc_ir::{Graph, Op, Tensor, TensorData, TensorType};

fn graph(seed: u64, shape: &[usize]) -> Graph {
    let mut g = Graph::new("random");
    let x = g.add_input(TensorType::f32(shape.to_vec()), "x");
    let step = g.add_input(TensorType::f32(Vec::<usize>::new()), "step");
    let u = g.push1("u", Op::RandomUniform { seed }, &[x, step]).unwrap();
    g.outputs.push(u);
    g
}

fn values(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v.clone(),
        other => panic!("expected f32, got {}", other.dtype()),
    }
}

#[test]
fn compiled_draws_equal_the_interpreter_and_vary_with_step_and_seed() {
    let shape = [3, 5, 7, 11];
    let n: usize = shape.iter().product();
    let x = Tensor::f32(shape.to_vec(), vec![0.0; n]);
    let model = cnnc_codegen::JitModel::compile(&graph(42, &shape)).unwrap();
    let mut previous: Option<Vec<f32>> = None;
    for step in [0.0f32, 1.0, 2.0, 1e6, -3.0, f32::NAN] {
        let inputs = [x.clone(), Tensor::f32(Vec::<usize>::new(), vec![step])];
        let got = values(&model.run(&inputs).unwrap()[0]);
        let want = values(&cnnc_ir::interp::run(&graph(42, &shape), &inputs).unwrap()[0]);
        assert_eq!(got, want, "step {step}: compiled and interpreted draws differ");
        assert!(got.iter().all(|&u| (0.0..1.0).contains(&u)), "step {step}: a draw outside [0, 1)");
        let mean = got.iter().sum::<f32>() / n as f32;
        assert!((mean - 0.5).abs() < 0.03, "step {step}: mean {mean} of {n} uniform draws");
        if step >= 0.0
            && let Some(p) = &previous
        {
            assert_ne!(p, &got, "step {step} repeats the previous stream");
        }
        previous = Some(got);
    }
    let other_seed = cnnc_codegen::JitModel::compile(&graph(43, &shape)).unwrap();
    let inputs = [x, Tensor::f32(Vec::<usize>::new(), vec![1.0])];
    assert_ne!(values(&other_seed.run(&inputs).unwrap()[0]), values(&model.run(&inputs).unwrap()[0]));
}

#[test]
fn random_uniform_round_trips_through_the_text_form() {
    let g = graph(12_345_678_901, &[2, 3]);
    let text = cnnc_ir::print(&g);
    assert!(text.contains("random_uniform") && text.contains("seed=12345678901"), "{text}");
    let parsed = cnnc_ir::parse::parse(&text).unwrap();
    assert_eq!(cnnc_ir::print(&parsed), text);
}
