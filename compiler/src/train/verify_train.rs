//! `verify-train` over the reference interpreter: runs the two steps of a case in the layout
//! of ../shared/zoo/make_train_ref.py and compares, per step, the loss, the gradients of
//! step 1, and for every parameter and running statistic the state after the step and the
//! update (after minus before) against PyTorch's.

use std::path::Path;

use cnnc_ir::{Tensor, TensorData};

use super::model::{TrainingGraph, load_training_graph};
use super::step::{Adam, Optimizer, Sgd, TrainState, train_step};
use crate::compare::compare;
use crate::verify::Outcome;

const STEPS: usize = 2;
/// Failure messages listed in an outcome line before "... and N more".
const LISTED_FAILURES: usize = 4;

/// PASS when every check of every step holds; SKIP for an optimizer cnnc does not run
/// (SGD with Nesterov or dampening, AMSGrad, others); FAIL otherwise, naming the checks.
pub fn verify_train_case(dir: &Path) -> Outcome {
    match train_case_failures(dir) {
        Ok(CaseResult::Unsupported(reason)) => Outcome::Skip(reason),
        Ok(CaseResult::Checked(failures)) if failures.is_empty() => Outcome::Pass,
        Ok(CaseResult::Checked(failures)) => {
            let mut message = failures.iter().take(LISTED_FAILURES).cloned().collect::<Vec<_>>().join("; ");
            if failures.len() > LISTED_FAILURES {
                message.push_str(&format!("; ... and {} more", failures.len() - LISTED_FAILURES));
            }
            Outcome::Fail(message)
        }
        Err(e) => Outcome::Fail(e),
    }
}

pub enum CaseResult {
    /// Every failed check, empty when the case passes.
    Checked(Vec<String>),
    Unsupported(String),
}

/// Runs a case and lists every failed check.
pub fn train_case_failures(dir: &Path) -> Result<CaseResult, String> {
    let meta_path = dir.join("meta.json");
    let meta = std::fs::read_to_string(&meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let optimizer = match read_optimizer(&meta)? {
        Ok(optimizer) => optimizer,
        Err(reason) => return Ok(CaseResult::Unsupported(reason)),
    };
    let tg = load_training_graph(dir.join("model.onnx"))?;
    let read = |path: &Path| -> Result<Tensor, String> {
        cnnc_onnx::read_tensor_pb(path).map(|(_, t)| t).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut failures = Vec::new();
    let mut state = TrainState::initial(&tg);
    let mut reference_before = state.clone();
    for step in 1..=STEPS {
        let step_dir = dir.join(format!("step_{step}"));
        let x = read(&step_dir.join("x.pb"))?;
        let labels = read(&step_dir.join("labels.pb"))?;
        let before = state.clone();
        let result = train_step(&tg, &mut state, &[x], &labels, optimizer)?;
        let tag = format!("step {step}");
        if let Err(e) = compare(&result.loss, &read(&step_dir.join("loss.pb"))?) {
            failures.push(format!("{tag} loss: {e}"));
        }
        if step == 1 {
            for name in tensor_names(&step_dir.join("grad"))? {
                let reference = read(&step_dir.join("grad").join(format!("{name}.pb")))?;
                match tg.params.iter().position(|p| p.name == name) {
                    Some(k) => {
                        if let Err(e) = compare(&result.grads[k], &reference) {
                            failures.push(format!("{tag} gradient of {name}: {e}"));
                        }
                    }
                    None => failures.push(format!("PyTorch trains '{name}', cnnc does not")),
                }
            }
        }
        let mut reference_after = state.clone();
        for name in tensor_names(&step_dir.join("after"))? {
            let reference = read(&step_dir.join("after").join(format!("{name}.pb")))?;
            let (Some(ours), Some(ours_before), Some(reference_start)) =
                (state.get(&tg, &name), before.get(&tg, &name), reference_before.get(&tg, &name))
            else {
                failures.push(format!("{tag}: '{name}' is PyTorch state that cnnc does not keep"));
                continue;
            };
            if let Err(e) = compare(ours, &reference) {
                failures.push(format!("{tag} {name} after the update: {e}"));
            }
            let update = difference(ours, ours_before)?;
            let reference_update = difference(&reference, reference_start)?;
            if let Err(e) = compare_update(&update, &reference_update) {
                failures.push(format!("{tag} update of {name}: {e}"));
            }
            set_named(&tg, &mut reference_after, &name, reference);
        }
        reference_before = reference_after;
    }
    Ok(CaseResult::Checked(failures))
}

/// The optimizer of meta.json, or why the case is not one cnnc runs.
fn read_optimizer(meta: &str) -> Result<Result<Optimizer, String>, String> {
    let start = meta.find("\"optimizer\"").ok_or("meta.json has no \"optimizer\"")?;
    let optimizer = &meta[start..];
    let end = optimizer.find('}').ok_or("meta.json: the \"optimizer\" object is not closed")?;
    let optimizer = &optimizer[..end];
    let kind = json_field(optimizer, "kind").ok_or("meta.json: optimizer has no \"kind\"")?;
    let number = |key: &str, default: Option<f64>| -> Result<f64, String> {
        match json_field(optimizer, key) {
            Some(text) => text.parse::<f64>().map_err(|_| format!("meta.json: optimizer \"{key}\" is not a number: {text}")),
            None => default.ok_or_else(|| format!("meta.json: optimizer has no \"{key}\"")),
        }
    };
    match kind.trim_matches('"') {
        "sgd" => {
            if json_field(optimizer, "nesterov").is_some_and(|v| v == "true") {
                return Ok(Err("Nesterov momentum is not supported yet".into()));
            }
            if number("dampening", Some(0.0))? != 0.0 {
                return Ok(Err("SGD dampening is not supported yet".into()));
            }
            Ok(Ok(Optimizer::Sgd(Sgd {
                lr: number("lr", None)? as f32,
                momentum: number("momentum", Some(0.0))? as f32,
                weight_decay: number("weight_decay", Some(0.0))? as f32,
            })))
        }
        "adam" => {
            if json_field(optimizer, "amsgrad").is_some_and(|v| v == "true") {
                return Ok(Err("AMSGrad is not supported yet".into()));
            }
            let defaults = Adam::default();
            let (beta1, beta2) = match json_array(optimizer, "betas") {
                Some(betas) => match betas[..] {
                    [b1, b2] => (b1, b2),
                    _ => return Err(format!("meta.json: optimizer \"betas\" must have two entries, has {}", betas.len())),
                },
                None => (number("beta1", Some(defaults.beta1 as f64))?, number("beta2", Some(defaults.beta2 as f64))?),
            };
            Ok(Ok(Optimizer::Adam(Adam {
                lr: number("lr", None)? as f32,
                beta1: beta1 as f32,
                beta2: beta2 as f32,
                eps: number("eps", Some(defaults.eps as f64))? as f32,
                weight_decay: number("weight_decay", Some(0.0))? as f32,
            })))
        }
        other => Ok(Err(format!("optimizer \"{other}\" is not supported (sgd, adam)"))),
    }
}

/// A flat array of numbers `"key": [a, b, ...]`.
fn json_array(object: &str, key: &str) -> Option<Vec<f64>> {
    let quoted = format!("\"{key}\"");
    let after = &object[object.find(&quoted)? + quoted.len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start().strip_prefix('[')?;
    let body = &after[..after.find(']')?];
    body.split(',').map(|item| item.trim().parse::<f64>().ok()).collect()
}

/// The raw text of a scalar field `"key": value` in a flat JSON object.
fn json_field<'t>(object: &'t str, key: &str) -> Option<&'t str> {
    let quoted = format!("\"{key}\"");
    let after = &object[object.find(&quoted)? + quoted.len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let end = after.find([',', '\n', '}']).unwrap_or(after.len());
    Some(after[..end].trim())
}

/// Names of the `NAME.pb` files in `dir`, sorted.
fn tensor_names(dir: &Path) -> Result<Vec<String>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file_name.strip_suffix(".pb") {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn set_named(tg: &TrainingGraph, state: &mut TrainState, name: &str, value: Tensor) {
    if let Some(k) = tg.params.iter().position(|p| p.name == name) {
        state.params[k] = value;
    } else if let Some(k) = tg.running.iter().position(|r| r.mean_name == name) {
        state.running[k].0 = value;
    } else if let Some(k) = tg.running.iter().position(|r| r.var_name == name) {
        state.running[k].1 = value;
    }
}

fn difference(after: &Tensor, before: &Tensor) -> Result<Tensor, String> {
    match (&after.data, &before.data) {
        (TensorData::F32(a), TensorData::F32(b)) if after.shape == before.shape => {
            Ok(Tensor::f32(after.shape.clone(), a.iter().zip(b).map(|(a, b)| a - b).collect()))
        }
        _ => Err(format!("cannot subtract {} from {}", before.ty(), after.ty())),
    }
}

/// DESIGN.md's rule for updates: |u − ref| <= 1e-3·|ref| + 1e-4·max|ref update|, i.e.
/// `compare` applied to the update tensors themselves.
fn compare_update(update: &Tensor, reference: &Tensor) -> Result<(), String> {
    compare(update, reference)
}

/// `verify_train_case` for the compiled training step: the fused step graph compiled for
/// `target` into `scratch`, run through `cnnc_train_step` on its state buffer; the
/// gradients of step 1 are the ones the step leaves in the state buffer.
pub fn verify_train_case_compiled(dir: &Path, target: &cnnc_codegen::TargetSpec, scratch: &Path) -> Outcome {
    match compiled_case_failures(dir, target, scratch) {
        Ok(CaseResult::Unsupported(reason)) => Outcome::Skip(reason),
        Ok(CaseResult::Checked(failures)) if failures.is_empty() => Outcome::Pass,
        Ok(CaseResult::Checked(failures)) => {
            let mut message = failures.iter().take(LISTED_FAILURES).cloned().collect::<Vec<_>>().join("; ");
            if failures.len() > LISTED_FAILURES {
                message.push_str(&format!("; ... and {} more", failures.len() - LISTED_FAILURES));
            }
            Outcome::Fail(message)
        }
        Err(e) => Outcome::Fail(e),
    }
}

/// Runs a case through the compiled step and lists every failed check.
pub fn compiled_case_failures(dir: &Path, target: &cnnc_codegen::TargetSpec, scratch: &Path) -> Result<CaseResult, String> {
    use super::compiled::{Trainer, compile_fused_step};
    use super::fused::{HyperValues, fused_train_step};
    use std::collections::HashMap;

    let meta_path = dir.join("meta.json");
    let meta = std::fs::read_to_string(&meta_path).map_err(|e| format!("{}: {e}", meta_path.display()))?;
    let optimizer = match read_optimizer(&meta)? {
        Ok(optimizer) => optimizer,
        Err(reason) => return Ok(CaseResult::Unsupported(reason)),
    };
    let tg = load_training_graph(dir.join("model.onnx"))?;
    let fused = fused_train_step(&tg, optimizer.into())?;
    let case = dir.file_name().map_or_else(|| "case".to_string(), |n| n.to_string_lossy().into_owned());
    let so = scratch.join(format!("{case}.train.so"));
    compile_fused_step(&fused, target, &so)?;
    let mut trainer = Trainer::load(&so, &fused.initial_state(), 1)?;
    let read = |path: &Path| -> Result<Tensor, String> {
        cnnc_onnx::read_tensor_pb(path).map(|(_, t)| t).map_err(|e| format!("{}: {e}", path.display()))
    };
    let mut failures = Vec::new();
    let mut reference_before: HashMap<String, Tensor> = HashMap::new();
    for step in 1..=STEPS {
        let step_dir = dir.join(format!("step_{step}"));
        let x = read(&step_dir.join("x.pb"))?;
        let labels = read(&step_dir.join("labels.pb"))?;
        let after_names = tensor_names(&step_dir.join("after"))?;
        let mut before = HashMap::new();
        for name in &after_names {
            if let Some(t) = trainer.get(name) {
                reference_before.entry(name.clone()).or_insert_with(|| t.clone());
                before.insert(name.clone(), t);
            }
        }
        let loss = trainer.step(&[x], &labels, &HyperValues::from_optimizer(optimizer, step as u64))?;
        let tag = format!("step {step}");
        if let Err(e) = compare(&Tensor::f32(Vec::<usize>::new(), vec![loss]), &read(&step_dir.join("loss.pb"))?) {
            failures.push(format!("{tag} loss: {e}"));
        }
        if step == 1 {
            for name in tensor_names(&step_dir.join("grad"))? {
                let reference = read(&step_dir.join("grad").join(format!("{name}.pb")))?;
                match trainer.get(&format!("{name}.grad")) {
                    Some(ours) => {
                        if let Err(e) = compare(&ours, &reference) {
                            failures.push(format!("{tag} gradient of {name}: {e}"));
                        }
                    }
                    None => failures.push(format!("PyTorch trains '{name}', cnnc does not")),
                }
            }
        }
        for name in &after_names {
            let reference = read(&step_dir.join("after").join(format!("{name}.pb")))?;
            let (Some(ours), Some(ours_before), Some(reference_start)) = (trainer.get(name), before.get(name), reference_before.get(name)) else {
                failures.push(format!("{tag}: '{name}' is PyTorch state that cnnc does not keep"));
                continue;
            };
            if let Err(e) = compare(&ours, &reference) {
                failures.push(format!("{tag} {name} after the update: {e}"));
            }
            let update = difference(&ours, ours_before)?;
            let reference_update = difference(&reference, reference_start)?;
            if let Err(e) = compare_update(&update, &reference_update) {
                failures.push(format!("{tag} update of {name}: {e}"));
            }
            reference_before.insert(name.clone(), reference);
        }
    }
    Ok(CaseResult::Checked(failures))
}
