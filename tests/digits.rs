//! The digits training example's model (`cnnc_examples::digits`) through cnnc's compiled
//! training step on synthetic 8x8 "digits" (a class-specific 2x2 block plus noise), so that
//! the test needs no data files: the loss must fall and the trained parameters, written back
//! into ONNX and compiled for inference, must classify the set and agree with the
//! reference interpreter.

mod common;

use cnnc::train::compiled::{Trainer, compile_fused_step};
use cnnc::train::{HyperValues, OptimizerKind, fused_train_step, load_training_graph};
use cnnc_codegen::TargetSpec;
use cnnc_examples::digits::{self, CLASSES, Dataset, PIXELS, SIDE};
use cnnc_examples::lenet5::Rng;
use cnnc_ir::{Tensor, TensorData};

const BATCH: usize = 32;

/// Class `c` lights the 2x2 cell `c` of the 4x4 grid of cells, on a noisy background.
fn synthetic_digits(count: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut data = Dataset::default();
    for i in 0..count {
        let label = (i % CLASSES) as i64;
        let (cell_x, cell_y) = (2 * (label as usize % 4), 2 * (label as usize / 4));
        for y in 0..SIDE {
            for x in 0..SIDE {
                let lit = (cell_x..cell_x + 2).contains(&x) && (cell_y..cell_y + 2).contains(&y);
                data.images
                    .push(if lit { 1.0 } else { 0.0 } + 0.2 * rng.uniform());
            }
        }
        data.labels.push(label);
    }
    data
}

#[test]
fn digits_model_trains_and_compiled_inference_matches_the_interpreter() {
    let dir = common::scratch("digits-example");
    let data = synthetic_digits(4 * BATCH, 3);
    let initial_onnx = dir.join("initial.onnx");
    std::fs::write(
        &initial_onnx,
        digits::lenet_digits_onnx(BATCH, &digits::initial_parameters(3)).unwrap(),
    )
    .unwrap();
    let tg = load_training_graph(&initial_onnx).unwrap();
    let fused = fused_train_step(&tg, OptimizerKind::Sgd).unwrap();
    let target = TargetSpec::host();
    let train_so = dir.join("train.so");
    compile_fused_step(&fused, &target, &train_so).unwrap();
    let mut trainer = Trainer::load(&train_so, &fused.initial_state(), 1).unwrap();

    let batches = data.len() / BATCH;
    let mut losses = Vec::new();
    for step in 1..=80u64 {
        let b = (step as usize - 1) % batches;
        let images = data.images[b * BATCH * PIXELS..(b + 1) * BATCH * PIXELS].to_vec();
        let labels = data.labels[b * BATCH..(b + 1) * BATCH].to_vec();
        let hyper = HyperValues {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            epsilon: 0.0,
            step,
        };
        let loss = trainer
            .step(
                &[Tensor::f32(vec![BATCH, 1, SIDE, SIDE], images)],
                &Tensor::new(vec![BATCH], TensorData::I64(labels)),
                &hyper,
            )
            .unwrap();
        losses.push(loss);
    }
    let first_epoch: f32 = losses[..batches].iter().sum::<f32>() / batches as f32;
    let last_epoch: f32 = losses[losses.len() - batches..].iter().sum::<f32>() / batches as f32;
    assert!(
        last_epoch < 0.5 * first_epoch,
        "the loss did not fall: {losses:?}"
    );

    let parameters: Vec<(String, Tensor)> = digits::parameter_shapes()
        .into_iter()
        .map(|(name, _)| {
            (
                name.to_string(),
                trainer
                    .get(name)
                    .unwrap_or_else(|| panic!("no state tensor {name}")),
            )
        })
        .collect();
    let trained_onnx = dir.join("trained.onnx");
    let bytes = digits::lenet_digits_onnx(data.len(), &parameters).unwrap();
    std::fs::write(&trained_onnx, &bytes).unwrap();
    let so = dir.join("trained.so");
    cnnc::driver::compile_file(&trained_onnx, None, &target, &so).unwrap();
    let model = cnnc_runtime::Model::load(&so).unwrap();
    let mut session = cnnc_runtime::Session::new(&model, 1).unwrap();
    let logits = session.run_f32(&[&data.images]).unwrap().remove(0);

    let graph = cnnc_onnx::load_model_bytes(
        &bytes,
        &cnnc_onnx::LoadOptions {
            batch: None,
            inference: true,
            ..Default::default()
        },
    )
    .unwrap();
    let input = Tensor::f32(vec![data.len(), 1, SIDE, SIDE], data.images.clone());
    let reference = cnnc_ir::interp::run(&graph, std::slice::from_ref(&input))
        .unwrap()
        .remove(0);
    cnnc::compare::compare(
        &Tensor::f32(vec![data.len(), CLASSES], logits.clone()),
        &reference,
    )
    .unwrap();

    let correct = digits::predictions(&logits)
        .iter()
        .zip(&data.labels)
        .filter(|(p, l)| p == l)
        .count();
    assert!(
        correct * 10 >= data.len() * 9,
        "{correct} of {} right after training",
        data.len()
    );
}
