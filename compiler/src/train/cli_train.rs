//! The training commands behind the CLI (`cli.rs` parses the flags): `cnnc compile --train`
//! and `cnnc verify-train`.

use std::path::{Path, PathBuf};

use cnnc_codegen::TargetSpec;

use super::compiled::compile_fused_step;
use super::fused::{OptimizerKind, fused_train_step};
use super::model::{TrainOptions, load_training_graph_with};
use super::verify_train::verify_train_case_compiled;
use crate::driver::{Error, ScratchDir};
use crate::verify::{Outcome, case_name};

/// The optimizer named by `--optimizer` (sgd when absent).
pub fn optimizer_kind(name: Option<&str>) -> Result<OptimizerKind, Error> {
    match name.unwrap_or("sgd") {
        "sgd" => Ok(OptimizerKind::Sgd),
        "adam" => Ok(OptimizerKind::Adam),
        other => Err(Error::Input(format!("--optimizer: unknown optimizer `{other}` (sgd, adam)"))),
    }
}

/// `cnnc compile MODEL --train`: the fused training step as `cnnc_train_step` (and the pure
/// step as `cnnc_infer`). Returns the number of state tensors and the state size in bytes.
pub fn compile_training(model: &Path, optimizer: OptimizerKind, freeze: &[String], target: &TargetSpec, out: &Path) -> Result<(usize, usize), Error> {
    let options = TrainOptions { freeze: freeze.to_vec() };
    let tg = load_training_graph_with(model, &options).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let fused = fused_train_step(&tg, optimizer).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    compile_fused_step(&fused, target, out).map_err(Error::Failed)?;
    let bytes = fused.state.iter().map(|s| s.ty.byte_size()).sum();
    Ok((fused.state.len(), bytes))
}

/// Training cases under `dirs`: folders holding `meta.json` and `model.onnx`, or folders of them.
pub fn collect_train_cases(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let is_case = |d: &Path| d.join("meta.json").is_file() && d.join("model.onnx").is_file();
    let mut cases = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(Error::Input(format!("{} is not a directory", d.display())));
        }
        if is_case(d) {
            cases.push(d.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(d)
            .map_err(|e| Error::Input(format!("{}: {e}", d.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && is_case(p))
            .collect();
        if found.is_empty() {
            return Err(Error::Input(format!("{}: no training case (meta.json + model.onnx) here", d.display())));
        }
        found.sort();
        cases.extend(found);
    }
    Ok(cases)
}

/// `cnnc verify-train`: one line per case, then the summary; Err when a case failed.
pub fn verify_train_all(dirs: &[PathBuf], target: &TargetSpec) -> Result<(), Error> {
    let cases = collect_train_cases(dirs)?;
    let scratch = ScratchDir::new("verify-train")?;
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    // A panic inside a case is reported as that case's failure, without a backtrace.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for case in &cases {
        let outcome = std::panic::catch_unwind(|| verify_train_case_compiled(case, target, &scratch.0)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Outcome::Fail(format!("internal error (panic): {msg}"))
        });
        match outcome {
            Outcome::Pass => passed += 1,
            Outcome::Fail(_) => failed += 1,
            Outcome::Skip(_) => skipped += 1,
        }
        println!("{}", outcome.line(&case_name(case)));
    }
    std::panic::set_hook(previous_hook);
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 { Err(Error::Failed(format!("{failed} case(s) failed"))) } else { Ok(()) }
}

/// `cnnc bench MODEL --train`: training-step times in ms (SGD with momentum 0.9, lr 0.01,
/// random inputs and labels), after warm-up; at least `min_runs` runs or 2 s.
pub fn bench_training(model: &Path, target: &TargetSpec, threads: usize, min_runs: usize) -> Result<Vec<f64>, Error> {
    use super::compiled::Trainer;
    use super::fused::HyperValues;
    use cnnc_ir::{Tensor, TensorData};
    use std::time::Instant;

    let tg = load_training_graph_with(model, &TrainOptions::default()).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let fused = fused_train_step(&tg, OptimizerKind::Sgd).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let scratch = ScratchDir::new("bench-train")?;
    let so = scratch.0.join("train.so");
    compile_fused_step(&fused, target, &so).map_err(Error::Failed)?;
    let mut trainer = Trainer::load(&so, &fused.initial_state(), threads).map_err(Error::Failed)?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let data: Vec<Tensor> = fused
        .data_inputs
        .iter()
        .map(|&v| {
            let ty = fused.graph.ty(v);
            Tensor::f32(ty.shape.clone(), (0..ty.numel()).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect())
        })
        .collect();
    let classes = fused.graph.ty(tg.logits).shape.get(1).copied().unwrap_or(1).max(1) as u64;
    let batch = fused.graph.ty(fused.labels).numel();
    let labels = Tensor::new(vec![batch], TensorData::I64((0..batch).map(|_| (next() % classes) as i64).collect()));
    let mut step = 0u64;
    let mut run = |trainer: &mut Trainer| -> Result<f64, Error> {
        step += 1;
        let hyper = HyperValues { lr: 0.01, momentum: 0.9, weight_decay: 0.0, beta1: 0.0, beta2: 0.0, epsilon: 0.0, step };
        let t = Instant::now();
        trainer.step(&data, &labels, &hyper).map_err(Error::Failed)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let warm = Instant::now();
    let mut n = 0;
    while n < 3 || warm.elapsed().as_secs_f64() < 0.3 {
        run(&mut trainer)?;
        n += 1;
    }
    let mut times = Vec::new();
    let total = Instant::now();
    while times.len() < min_runs || (total.elapsed().as_secs_f64() < 2.0 && times.len() < 10_000) {
        times.push(run(&mut trainer)?);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}
