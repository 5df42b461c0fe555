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
