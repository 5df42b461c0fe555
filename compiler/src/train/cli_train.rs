//! The training commands behind the CLI (`cli.rs` parses the flags): `cnnc compile --train`,
//! `cnnc verify-train`, `cnnc bench --train` and `cnnc export-trained`.

use std::path::{Path, PathBuf};

use cnnc_codegen::TargetSpec;

use super::compiled::compile_fused_step;
use super::fused::{OptimizerKind, fused_train_step};
use super::model::{TrainOptions, load_training_graph_batched};
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

/// What `cnnc compile --train` builds.
#[derive(Clone, Debug, Default)]
pub struct TrainCompileOptions {
    pub optimizer: Option<OptimizerKind>,
    /// `--freeze` globs.
    pub freeze: Vec<String>,
    /// `--batch`: the leading dim of the data inputs (the model's when `None`).
    pub batch: Option<usize>,
    /// `--header`: where to write the C header describing the library's tensors.
    pub header: Option<PathBuf>,
}

/// `cnnc compile MODEL --train`: the training entry points (`cnnc_train_step`,
/// `cnnc_compute_gradients`, `cnnc_apply_update`; the pure fused step as `cnnc_infer`).
/// Returns the number of state tensors and the size of their values in bytes.
pub fn compile_training(model: &Path, options: &TrainCompileOptions, target: &TargetSpec, out: &Path) -> Result<(usize, usize), Error> {
    let train_options = TrainOptions { freeze: options.freeze.clone() };
    let tg = load_training_graph_batched(model, &train_options, options.batch)
        .map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let optimizer = options.optimizer.unwrap_or(OptimizerKind::Sgd);
    let fused = fused_train_step(&tg, optimizer).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    compile_fused_step(&fused, target, out).map_err(Error::Failed)?;
    if let Some(h) = &options.header {
        let header = training_header(&fused, optimizer, target).map_err(Error::Failed)?;
        std::fs::write(h, header).map_err(|e| Error::Input(format!("writing {}: {e}", h.display())))?;
    }
    let bytes = fused.state.iter().map(|s| s.ty.byte_size()).sum();
    Ok((fused.state.len(), bytes))
}

/// The ABI header with a comment describing a training library: its data inputs, labels and
/// state buffer layout (every tensor's offset, gradients included).
pub fn training_header(fused: &super::fused::FusedStep, optimizer: OptimizerKind, target: &TargetSpec) -> Result<String, String> {
    let g = &fused.graph;
    let sig = cnnc_codegen::TrainSignature { num_state: fused.state.len(), num_data: fused.data_inputs.len() };
    let layout = cnnc_codegen::StateLayout::of(g, &sig).map_err(|e| e.to_string())?;
    let clean = |name: &str| name.replace("*/", "* /");
    let mut s = format!(
        "/* Training library of model `{}`, compiled by cnnc {} for {} (cpu {}), optimizer {}.\n",
        clean(&g.name),
        env!("CARGO_PKG_VERSION"),
        target.triple,
        target.cpu_name(),
        match optimizer {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        }
    );
    s.push_str(" * Entry points: cnnc_train_step, cnnc_compute_gradients, cnnc_apply_update.\n");
    for (k, &v) in fused.data_inputs.iter().enumerate() {
        s.push_str(&format!(" *   inputs[{k}] \"{}\": {}\n", clean(&g.value(v).name), g.ty(v)));
    }
    s.push_str(&format!(" *   labels: {} (class indices)\n", g.ty(fused.labels)));
    s.push_str(&format!(" *   state_size: {} bytes\n", layout.size));
    for (k, t) in layout.tensors.iter().enumerate() {
        s.push_str(&format!(" *   state[{k}] \"{}\": {} at offset {}\n", clean(&t.name), t.ty, t.offset));
    }
    s.push_str(" */\n");
    s.push_str(cnnc_runtime::abi::C_HEADER);
    Ok(s)
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
pub fn bench_training(model: &Path, batch: Option<usize>, target: &TargetSpec, threads: usize, min_runs: usize) -> Result<Vec<f64>, Error> {
    use super::compiled::Trainer;
    use super::fused::HyperValues;
    use cnnc_ir::{Tensor, TensorData};
    use std::time::Instant;

    let tg = load_training_graph_batched(model, &TrainOptions::default(), batch)
        .map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
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

/// `cnnc export-trained MODEL.onnx --train-so TRAIN.so --state STATE.bin -o TRAINED.onnx`.
pub fn export_trained(model: &Path, train_so: &Path, state: &Path, out: &Path) -> Result<super::export::ExportReport, Error> {
    super::export::export_trained_files(model, train_so, state, out).map_err(Error::Input)
}
