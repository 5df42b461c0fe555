//! Trains a LeNet-style convnet on the 8x8 handwritten digits with cnnc's compiled training
//! step (`cnnc_train_step`), measures test accuracy each epoch with an inference library
//! compiled from the current state (written back into the ONNX model by
//! `cnnc::train::export::write_trained_onnx`), saves the trained model as ONNX (and the raw
//! state buffer, from which `cnnc export-trained` writes the same file) and checks that
//! inference compiled from the saved file gives the same accuracy.
//!
//! `train-digits [--data FILE.csv.gz] [--out DIR] [--epochs N] [--seed S]`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use cnnc::train::compiled::{Trainer, compile_fused_step};
use cnnc::train::export::write_trained_onnx;
use cnnc::train::{HyperValues, OptimizerKind, fused_train_step, load_training_graph};
use cnnc_codegen::TargetSpec;
use cnnc_examples::digits::{self, CLASSES, Dataset, PIXELS, SIDE};
use cnnc_examples::lenet5::Rng;
use cnnc_ir::{Tensor, TensorData};

const BATCH: usize = 32;
const LEARNING_RATE: f32 = 0.1;
const MOMENTUM: f32 = 0.9;
const WEIGHT_DECAY: f32 = 1e-4;
const TEST_FRACTION: f64 = 0.2;
const BAR_WIDTH: usize = 30;

struct Options {
    data: PathBuf,
    out: PathBuf,
    epochs: usize,
    seed: u64,
}

fn main() -> ExitCode {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("train-digits: {e}");
            eprintln!(
                "usage: train-digits [--data FILE.csv.gz] [--out DIR] [--epochs N] [--seed S]"
            );
            return ExitCode::from(2);
        }
    };
    if !options.data.is_file() {
        eprintln!(
            "train-digits: the digits data set is not at {} (expected ../shared/data/digits.csv.gz next to the repository; give another path with --data)",
            options.data.display()
        );
        return ExitCode::from(2);
    }
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train-digits: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse_args() -> Result<Options, String> {
    // The workspace root, so that the defaults do not depend on the working directory.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().unwrap_or(manifest_dir);
    let mut options = Options {
        data: root.join("../shared/data/digits.csv.gz"),
        out: root.join("out/digits"),
        epochs: 30,
        seed: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => options.data = PathBuf::from(value()?),
            "--out" => options.out = PathBuf::from(value()?),
            "--epochs" => {
                options.epochs = value()?
                    .parse()
                    .map_err(|_| "--epochs takes a positive integer".to_string())?
            }
            "--seed" => {
                options.seed = value()?
                    .parse()
                    .map_err(|_| "--seed takes an unsigned integer".to_string())?
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if options.epochs == 0 {
        return Err("--epochs must be at least 1".into());
    }
    Ok(options)
}

fn run(options: &Options) -> Result<(), String> {
    let start = Instant::now();
    let data = digits::load_csv(&options.data)?;
    let (train, test) = data.split(TEST_FRACTION, options.seed);
    println!(
        "digits: {} images, {} for training, {} for testing (seed {})",
        data.len(),
        train.len(),
        test.len(),
        options.seed
    );
    std::fs::create_dir_all(&options.out)
        .map_err(|e| format!("creating {}: {e}", options.out.display()))?;
    let out = |name: &str| options.out.join(name);

    // The training library is compiled once from the initial model; its state buffer then
    // carries the parameters and momentum from step to step.
    let initial = digits::initial_parameters(options.seed);
    let initial_onnx = out("lenet_digits_initial.onnx");
    write_model(&initial_onnx, BATCH, &initial)?;
    let training_graph = load_training_graph(&initial_onnx)?;
    let fused = fused_train_step(&training_graph, OptimizerKind::Sgd)?;
    let train_so = out("lenet_digits_train.so");
    let target = TargetSpec::host();
    compile_fused_step(&fused, &target, &train_so)?;
    let mut trainer = Trainer::load(&train_so, &fused.initial_state(), 1)?;
    println!(
        "compiled the training step ({} state tensors) in {:.1}s",
        fused.state.len(),
        start.elapsed().as_secs_f64()
    );

    let mut rng = Rng::new(options.seed ^ 0x5eed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let batches = train.len() / BATCH;
    let mut step = 0u64;
    let mut last_test_accuracy = 0.0;
    for epoch in 1..=options.epochs {
        // Cosine decay to zero over the run.
        let progress = (epoch - 1) as f32 / options.epochs as f32;
        let lr = LEARNING_RATE * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        digits::shuffle(&mut order, &mut rng);
        let mut loss_sum = 0.0f64;
        for b in 0..batches {
            let rows = &order[b * BATCH..(b + 1) * BATCH];
            let mut images = Vec::with_capacity(BATCH * PIXELS);
            for &i in rows {
                digits::push_augmented(&mut images, train.image(i), &mut rng);
            }
            let labels: Vec<i64> = rows.iter().map(|&i| train.labels[i]).collect();
            let x = Tensor::f32(vec![BATCH, 1, SIDE, SIDE], images);
            step += 1;
            let hyper = HyperValues {
                lr,
                momentum: MOMENTUM,
                weight_decay: WEIGHT_DECAY,
                beta1: 0.0,
                beta2: 0.0,
                epsilon: 0.0,
                step,
            };
            let loss = trainer.step(
                &[x],
                &Tensor::new(vec![BATCH], TensorData::I64(labels)),
                &hyper,
            )?;
            if !loss.is_finite() {
                return Err(format!(
                    "epoch {epoch}, batch {}: the loss is {loss}",
                    b + 1
                ));
            }
            loss_sum += loss as f64;
            print!("\r{}", digits::progress_bar(b + 1, batches, BAR_WIDTH));
            let _ = std::io::stdout().flush();
        }
        println!();
        let eval_start = Instant::now();
        let current = out("lenet_digits_current.onnx");
        export(&trainer, &initial_onnx, &current)?;
        let train_accuracy = accuracy_batched(&current, &train, &out("eval_train.so"), &target)?;
        let test_accuracy = accuracy_batched(&current, &test, &out("eval_test.so"), &target)?;
        println!(
            "epoch {epoch} loss {:.4} train_acc {:.1}% test_acc {:.1}%  (lr {lr:.4}, eval {:.1}s)",
            loss_sum / batches as f64,
            100.0 * train_accuracy,
            100.0 * test_accuracy,
            eval_start.elapsed().as_secs_f64()
        );
        last_test_accuracy = test_accuracy;
    }

    // The deliverable: the trained model, compiled at batch 1 from the saved file alone. The
    // raw state buffer is saved too: `cnnc export-trained` writes the same ONNX file from it.
    let saved = out("lenet_digits.onnx");
    export(&trainer, &initial_onnx, &saved)?;
    let state_file = out("lenet_digits_train.state");
    std::fs::write(&state_file, &trainer.state)
        .map_err(|e| format!("writing {}: {e}", state_file.display()))?;
    println!(
        "saved the state buffer; the same model from the command line: cnnc export-trained {} --train-so {} --state {} -o TRAINED.onnx",
        initial_onnx.display(),
        train_so.display(),
        state_file.display()
    );
    let saved_so = out("lenet_digits.so");
    cnnc::driver::compile_file(&saved, Some(1), &target, &saved_so).map_err(|e| e.to_string())?;
    let reloaded_accuracy = accuracy_one_by_one(&saved_so, &test)?;
    println!(
        "saved {}; compiled from it, one image at a time: test_acc {:.2}% (during training: {:.2}%)",
        saved.display(),
        100.0 * reloaded_accuracy,
        100.0 * last_test_accuracy
    );
    println!("total time {:.1}s", start.elapsed().as_secs_f64());
    if (reloaded_accuracy - last_test_accuracy).abs() > 1e-12 {
        return Err(format!(
            "the saved model's accuracy ({:.2}%) differs from the one measured during training ({:.2}%)",
            100.0 * reloaded_accuracy,
            100.0 * last_test_accuracy
        ));
    }
    Ok(())
}

fn write_model(path: &Path, batch: usize, parameters: &[(String, Tensor)]) -> Result<(), String> {
    let bytes = digits::lenet_digits_onnx(batch, parameters)?;
    std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// `original` with the parameters of the trainer's state buffer, written to `out`.
fn export(trainer: &Trainer, original: &Path, out: &Path) -> Result<(), String> {
    write_trained_onnx(original, &trainer.state, trainer.session.info(), out)?;
    Ok(())
}

/// Accuracy on all of `data` in one run of an inference library compiled from `onnx` for
/// that batch.
fn accuracy_batched(
    onnx: &Path,
    data: &Dataset,
    so: &Path,
    target: &TargetSpec,
) -> Result<f64, String> {
    cnnc::driver::compile_file(onnx, Some(data.len()), target, so).map_err(|e| e.to_string())?;
    let mut session = open_session(so)?;
    let logits = session
        .run_f32(&[&data.images])
        .map_err(|e| format!("running {}: {e}", so.display()))?;
    Ok(fraction_correct(&logits[0], &data.labels))
}

/// Accuracy of a batch-1 library, one image per call.
fn accuracy_one_by_one(so: &Path, data: &Dataset) -> Result<f64, String> {
    let mut session = open_session(so)?;
    let mut logits = Vec::with_capacity(data.len() * CLASSES);
    for i in 0..data.len() {
        let out = session
            .run_f32(&[data.image(i)])
            .map_err(|e| format!("running {}: {e}", so.display()))?;
        logits.extend_from_slice(&out[0]);
    }
    Ok(fraction_correct(&logits, &data.labels))
}

fn open_session(so: &Path) -> Result<cnnc_runtime::Session, String> {
    let model = cnnc_runtime::Model::load(so).map_err(|e| format!("{}: {e}", so.display()))?;
    cnnc_runtime::Session::new(&model, 1).map_err(|e| format!("{}: {e}", so.display()))
}

fn fraction_correct(logits: &[f32], labels: &[i64]) -> f64 {
    let predicted = digits::predictions(logits);
    let correct = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    correct as f64 / labels.len().max(1) as f64
}
