//! The on-demand conformance sweep: ../shared's backend-test cases under qemu.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cnnc::verify::Outcome;
use cnnc_ir::{Graph, Tensor};

use crate::common;
use crate::qemu::{TARGET, run_under_qemu};

/// Sweeps every case under `shared`'s suites (narrowed by CNNC_AARCH64_CASES; the
/// harness lends a CNNC_AARCH64_THREADS-thread host, default 2, 0 for none) on all
/// cores, printing `cnnc verify`-style lines; returns (passed, failed, skipped).
pub fn run_all(shared: &Path, harness: &Path) -> (usize, usize, usize) {
    let roots: Vec<PathBuf> = ["onnx-node", "onnx-pytorch", "onnx-light", "zoo/models"]
        .iter()
        .map(|d| shared.join(d))
        .collect();
    let filter = std::env::var("CNNC_AARCH64_CASES").unwrap_or_default();
    let threads: u32 = match std::env::var("CNNC_AARCH64_THREADS") {
        Ok(t) => t
            .parse()
            .unwrap_or_else(|_| panic!("CNNC_AARCH64_THREADS must be a number, got `{t}`")),
        Err(_) => 2,
    };
    let cases: Vec<PathBuf> = cnnc::verify::collect_cases(&roots)
        .expect("the suites are readable")
        .into_iter()
        .filter(|c| cnnc::verify::case_name(c).contains(&filter))
        .collect();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(case) = cases.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let outcome = std::panic::catch_unwind(|| sweep_case(harness, case, threads))
                        .unwrap_or_else(|_| {
                            Outcome::Fail("the test panicked (message above)".into())
                        });
                    println!("{}", outcome.line(&cnnc::verify::case_name(case)));
                    outcomes.lock().expect("no poisoned lock").push(outcome);
                }
            });
        }
    });
    let outcomes = outcomes.into_inner().expect("no poisoned lock");
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let passed = count(|o| matches!(o, Outcome::Pass));
    let failed = count(|o| matches!(o, Outcome::Fail(_)));
    let skipped = count(|o| matches!(o, Outcome::Skip(_)));
    println!(
        "aarch64 sweep: {passed} passed, {failed} failed, {skipped} skipped in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    (passed, failed, skipped)
}

/// One backend-test case under qemu: compile once (or once per data set when inputs
/// must be bound as constants), run every data set, compare with its outputs.
fn sweep_case(harness: &Path, case: &Path, threads: u32) -> Outcome {
    let model = case.join("model.onnx");
    let input_names = match cnnc_onnx::decode_model(&std::fs::read(&model).unwrap_or_default()) {
        Ok(proto) => {
            let graph = proto.graph.unwrap_or_default();
            let init: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
            graph
                .input
                .iter()
                .filter(|i| !init.contains(i.name.as_str()))
                .map(|i| i.name.clone())
                .collect::<Vec<_>>()
        }
        Err(e) => return Outcome::Fail(format!("loading the model: {}", one_line(&e.to_string()))),
    };
    let mut data_sets: Vec<PathBuf> = std::fs::read_dir(case)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    data_sets.retain(|p| cnnc::verify::case_name(p).starts_with("test_data_set_"));
    data_sets.sort();
    if data_sets.is_empty() {
        return Outcome::Skip("the case has no test_data_set_N directories".into());
    }
    let target =
        cnnc_codegen::TargetSpec::parse(Some(TARGET), None).expect("the AArch64 target parses");
    let dir = common::scratch(&format!("aarch64-sweep-{}", cnnc::verify::case_name(case)));
    let so = dir.join("model.so");
    // Inputs bound as constants; None until the model is compiled, and recompiled per
    // data set when some are bound.
    let mut bound: Option<Vec<String>> = None;
    for ds in &data_sets {
        let ds_name = cnnc::verify::case_name(ds);
        let (inputs, expected) = match (read_numbered(ds, "input"), read_numbered(ds, "output")) {
            (Ok(i), Ok(o)) => (i, o),
            (Err(e), _) | (_, Err(e)) => return Outcome::Skip(e),
        };
        if inputs.len() != input_names.len() {
            return Outcome::Fail(format!(
                "{ds_name}: {} input files, the model takes {}",
                inputs.len(),
                input_names.len()
            ));
        }
        if bound.as_ref().is_none_or(|b| !b.is_empty()) {
            let (mut graph, now_bound) = match load_binding_constants(&model, &input_names, &inputs)
            {
                Ok(loaded) => loaded,
                Err(outcome) => return outcome,
            };
            let compiled = cnnc::driver::optimize(
                &mut graph,
                &cnnc::passes::TargetDesc::from_target(&target),
                |_, _| {},
            )
            .and_then(|()| cnnc::driver::compile_to_shared_object(&graph, &target, &so));
            if let Err(e) = compiled {
                let msg = one_line(&e.to_string());
                return if e.exit_code() == 2 {
                    Outcome::Skip(msg)
                } else {
                    Outcome::Fail(format!("compiling: {msg}"))
                };
            }
            bound = Some(now_bound);
        }
        let bound_names = bound.as_deref().unwrap_or_default();
        let runtime_inputs: Vec<Tensor> = input_names
            .iter()
            .zip(&inputs)
            .filter(|(n, _)| !bound_names.contains(n))
            .map(|(_, t)| t.clone())
            .collect();
        let outputs = match run_under_qemu(harness, &dir, &so, &runtime_inputs, threads) {
            Ok(run) => run.outputs,
            Err(e) => return Outcome::Fail(format!("{ds_name}: {}", one_line(&e))),
        };
        if outputs.len() != expected.len() {
            return Outcome::Fail(format!(
                "{ds_name}: {} reference outputs, the model has {}",
                expected.len(),
                outputs.len()
            ));
        }
        for (k, ((name, got), want)) in outputs.iter().zip(&expected).enumerate() {
            if let Err(e) = cnnc::compare::compare(got, want) {
                return Outcome::Fail(format!("{ds_name}: output {k} (`{name}`): {e}"));
            }
        }
    }
    Outcome::Pass
}

/// `PREFIX_0.pb`, `PREFIX_1.pb`, ... up to the first gap.
fn read_numbered(dir: &Path, prefix: &str) -> Result<Vec<Tensor>, String> {
    (0..)
        .map(|k| dir.join(format!("{prefix}_{k}.pb")))
        .take_while(|p| p.is_file())
        .map(|p| {
            cnnc_onnx::read_tensor_pb(&p)
                .map(|(_, t)| t)
                .map_err(|e| one_line(&e.to_string()))
        })
        .collect()
}

/// Loads the model, binding the graph inputs the frontend wants as compile-time
/// constants to this data set's values (the rule `cnnc verify` follows). Returns the
/// graph and the names bound.
fn load_binding_constants(
    model: &Path,
    input_names: &[String],
    inputs: &[Tensor],
) -> Result<(Graph, Vec<String>), Outcome> {
    let options = cnnc_onnx::LoadOptions::default();
    let mut bind: Vec<String> = Vec::new();
    for _ in 0..=input_names.len() {
        let constants: Vec<(String, Tensor)> = input_names
            .iter()
            .zip(inputs)
            .filter(|(n, _)| bind.contains(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let error = match cnnc_onnx::load_model_with_constant_inputs(model, &options, &constants) {
            Ok(graph) => return Ok((graph, bind)),
            Err(e) => e,
        };
        let message = one_line(&error.to_string());
        let cnnc_onnx::FrontendError::Unsupported(nodes) = &error else {
            return Err(if error.is_unsupported() {
                Outcome::Skip(message)
            } else {
                Outcome::Fail(format!("loading the model: {message}"))
            });
        };
        // The frontend names the input in "... must be a compile-time constant ('NAME') ...".
        let wanted: Vec<String> = nodes
            .iter()
            .filter(|n| n.reason.contains("must be a compile-time constant"))
            .filter_map(|n| Some(n.reason.split_once("('")?.1.split_once("')")?.0.to_string()))
            .filter(|name| input_names.contains(name) && !bind.contains(name))
            .collect();
        if wanted.is_empty() {
            return Err(Outcome::Skip(message));
        }
        bind.extend(wanted);
    }
    Err(Outcome::Skip(
        "inputs needed as constants could not be bound".into(),
    ))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
