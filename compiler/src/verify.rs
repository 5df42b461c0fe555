//! `cnnc verify`: ONNX backend-test cases through the whole compiler.
//!
//! Each case runs in a child process (`cnnc __verify-case DIR`), so generated code
//! that crashes is reported as a failure of that case rather than taking the run
//! down, and cases run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use cnnc_codegen::TargetSpec;

use crate::compare::compare;
use crate::driver::{self, Error, ScratchDir};

/// The result of one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

impl Outcome {
    pub fn line(&self, name: &str) -> String {
        match self {
            Outcome::Pass => format!("PASS {name}"),
            Outcome::Fail(r) => format!("FAIL {name}: {r}"),
            Outcome::Skip(r) => format!("SKIP {name}: {r}"),
        }
    }

    fn parse(line: &str) -> Option<Outcome> {
        let (tag, rest) = line.split_once(' ')?;
        let reason = || rest.split_once(": ").map(|(_, r)| r.to_string()).unwrap_or_default();
        match tag {
            "PASS" => Some(Outcome::Pass),
            "FAIL" => Some(Outcome::Fail(reason())),
            "SKIP" => Some(Outcome::Skip(reason())),
            _ => None,
        }
    }
}

/// Expands the command-line arguments into case directories: a directory holding
/// `model.onnx` is a case, otherwise its sub-directories (recursively) are searched.
pub fn collect_cases(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut cases = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(Error::Input(format!("{} is not a directory", d.display())));
        }
        let before = cases.len();
        find_cases(d, &mut cases)?;
        if cases.len() == before {
            return Err(Error::Input(format!("no test cases (model.onnx) under {}", d.display())));
        }
    }
    Ok(cases)
}

fn find_cases(d: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    if d.join("model.onnx").is_file() {
        out.push(d.to_path_buf());
        return Ok(());
    }
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(d)
        .map_err(|e| Error::Input(format!("reading {}: {e}", d.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for s in subdirs {
        find_cases(&s, out)?;
    }
    Ok(())
}

pub fn case_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

/// Runs every case in child processes, `jobs` at a time, printing one line per case
/// in order and then the summary. Returns (passed, failed, skipped).
pub fn verify_all(cases: &[PathBuf], jobs: usize, target_args: &[String]) -> (usize, usize, usize) {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cnnc"));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; cases.len()]);
    let printed = Mutex::new(0usize);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= cases.len() {
                    break;
                }
                let outcome = run_child(&exe, &cases[i], target_args);
                let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
                r[i] = Some(outcome);
                // Print finished cases in order as soon as their predecessors are done.
                let mut p = printed.lock().unwrap_or_else(|p| p.into_inner());
                while *p < cases.len() {
                    let Some(o) = &r[*p] else { break };
                    println!("{}", o.line(&case_name(&cases[*p])));
                    let _ = std::io::stdout().flush();
                    *p += 1;
                }
            });
        }
    });
    let r = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let count = |f: fn(&Outcome) -> bool| r.iter().flatten().filter(|o| f(o)).count();
    let passed = count(|o| matches!(o, Outcome::Pass));
    let failed = count(|o| matches!(o, Outcome::Fail(_)));
    let skipped = count(|o| matches!(o, Outcome::Skip(_)));
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    (passed, failed, skipped)
}

fn run_child(exe: &Path, case: &Path, target_args: &[String]) -> Outcome {
    let out = Command::new(exe)
        .arg("__verify-case")
        .arg(case)
        .args(target_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return Outcome::Fail(format!("could not start {}: {e}", exe.display())),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(o) = stdout.lines().rev().find_map(Outcome::parse) {
        return o;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    match out.status.code() {
        Some(c) => Outcome::Fail(format!("exited with status {c} without a verdict: {last}")),
        None => Outcome::Fail(format!("crashed ({}) {last}", describe_signal(&out.status))),
    }
}

fn describe_signal(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("signal {sig}");
        }
    }
    status.to_string()
}

/// The body of one case, run inside the child process.
///
/// cnnc needs shape-like inputs (Reshape's shape, Slice's bounds, Clip's limits...)
/// to be compile-time constants, as they are in deployed models; backend-test cases
/// often feed them as graph inputs instead. When the frontend refuses a model only
/// for that reason, the named inputs are bound to each data set's values and the
/// model is compiled once per data set.
pub fn verify_case(dir: &Path, target: &TargetSpec) -> Outcome {
    let model = dir.join("model.onnx");
    let mut data_sets: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
            .collect(),
        Err(e) => return Outcome::Fail(format!("reading {}: {e}", dir.display())),
    };
    data_sets.sort();
    let input_names = match graph_input_names(&model) {
        Ok(n) => n,
        Err(e) => return Outcome::Fail(e),
    };
    let options = cnnc_onnx::LoadOptions::default();
    let mut shared_graph = None;
    let mut bind: Vec<String> = Vec::new();
    match cnnc_onnx::load_model(&model, &options) {
        Ok(g) => shared_graph = Some(g),
        Err(e) if e.is_unsupported() => match constant_input_names(&e, &input_names) {
            Some(names) => bind = names,
            None => return Outcome::Skip(one_line(&e.to_string())),
        },
        Err(e) => return Outcome::Fail(format!("loading the model: {}", one_line(&e.to_string()))),
    }
    if data_sets.is_empty() {
        return Outcome::Skip("the case has no test_data_set_N directories: nothing to compare".into());
    }
    let scratch = match ScratchDir::new("verify") {
        Ok(s) => s,
        Err(e) => return Outcome::Fail(e.to_string()),
    };
    for ds in &data_sets {
        let ds_name = case_name(ds);
        let inputs = match read_numbered(ds, "input", input_names.len()) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("{ds_name}: {e}")),
        };
        let expected = match read_numbered(ds, "output", usize::MAX) {
            Ok(t) => t,
            Err(e) => return Outcome::Fail(format!("{ds_name}: {e}")),
        };
        let graph = match &shared_graph {
            Some(g) => g.clone(),
            None => match load_binding(&model, &options, &input_names, &inputs, &mut bind) {
                Ok(g) => g,
                Err(o) => return o,
            },
        };
        let runtime_inputs: Vec<cnnc_ir::Tensor> = input_names
            .iter()
            .zip(&inputs)
            .filter(|(n, _)| !bind.contains(n))
            .map(|(_, t)| t.clone())
            .collect();
        match compile_and_run(graph, target, &scratch.0, &runtime_inputs) {
            Ok((actual, names)) => {
                if actual.len() != expected.len() {
                    return Outcome::Fail(format!("{ds_name}: {} reference outputs, the model has {}", expected.len(), actual.len()));
                }
                for (k, (a, e)) in actual.iter().zip(&expected).enumerate() {
                    if let Err(msg) = compare(a, e) {
                        return Outcome::Fail(format!("{ds_name}: output {k} (`{}`): {msg}", names[k]));
                    }
                }
            }
            Err(msg) => return Outcome::Fail(format!("{ds_name}: {msg}")),
        }
    }
    Outcome::Pass
}

/// Loads the model with `bind` inputs as constants, widening `bind` while the
/// frontend names further inputs it needs constant.
fn load_binding(
    model: &Path,
    options: &cnnc_onnx::LoadOptions,
    input_names: &[String],
    inputs: &[cnnc_ir::Tensor],
    bind: &mut Vec<String>,
) -> Result<cnnc_ir::Graph, Outcome> {
    for _ in 0..=input_names.len() {
        let bound: Vec<(String, cnnc_ir::Tensor)> =
            input_names.iter().zip(inputs).filter(|(n, _)| bind.contains(n)).map(|(n, t)| (n.clone(), t.clone())).collect();
        match cnnc_onnx::load_model_with_constant_inputs(model, options, &bound) {
            Ok(g) => return Ok(g),
            Err(e) if e.is_unsupported() => match constant_input_names(&e, input_names) {
                Some(more) if more.iter().any(|n| !bind.contains(n)) => {
                    bind.extend(more.into_iter().filter(|n| !bind.contains(n)).collect::<Vec<_>>())
                }
                _ => return Err(Outcome::Skip(one_line(&e.to_string()))),
            },
            Err(e) => return Err(Outcome::Fail(format!("loading the model: {}", one_line(&e.to_string())))),
        }
    }
    Err(Outcome::Skip("inputs needed as constants could not be bound".into()))
}

/// Graph inputs named by "must be a compile-time constant" refusals, if every
/// refusal is of that kind.
fn constant_input_names(e: &cnnc_onnx::FrontendError, input_names: &[String]) -> Option<Vec<String>> {
    let cnnc_onnx::FrontendError::Unsupported(nodes) = e else { return None };
    let mut names = Vec::new();
    for n in nodes {
        if !n.reason.contains("must be a compile-time constant") {
            return None;
        }
        let name = n.reason.split_once("('")?.1.split_once("')")?.0.to_string();
        if !input_names.contains(&name) {
            return None;
        }
        names.push(name);
    }
    Some(names)
}

/// Names of the graph inputs that have no initializer, in order (what input_K.pb feed).
fn graph_input_names(model: &Path) -> Result<Vec<String>, String> {
    let bytes = std::fs::read(model).map_err(|e| format!("reading {}: {e}", model.display()))?;
    let proto = cnnc_onnx::decode_model(&bytes).map_err(|e| format!("loading the model: {e}"))?;
    let graph = proto.graph.unwrap_or_default();
    let init: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    Ok(graph.input.iter().filter(|i| !init.contains(i.name.as_str())).map(|i| i.name.clone()).collect())
}

fn compile_and_run(
    mut g: cnnc_ir::Graph,
    target: &TargetSpec,
    scratch: &Path,
    inputs: &[cnnc_ir::Tensor],
) -> Result<(Vec<cnnc_ir::Tensor>, Vec<String>), String> {
    driver::optimize(&mut g, &crate::passes::TargetDesc::from_target(target), |_, _| {}).map_err(|e| one_line(&e.to_string()))?;
    let so = scratch.join(format!("model{}.so", COMPILED.fetch_add(1, Ordering::SeqCst)));
    driver::compile_to_shared_object(&g, target, &so).map_err(|e| one_line(&e.to_string()))?;
    let loaded = cnnc_runtime::Model::load(&so).map_err(|e| format!("loading the compiled model: {e}"))?;
    let info = loaded.info().clone();
    let mut session = cnnc_runtime::Session::new(&loaded, 1).map_err(|e| format!("creating a session: {e}"))?;
    let out = driver::run_model(&mut session, &info, inputs).map_err(|e| e.to_string())?;
    Ok((out, info.outputs.iter().map(|o| o.name.clone()).collect()))
}

static COMPILED: AtomicUsize = AtomicUsize::new(0);

/// Reads `prefix_0.pb`, `prefix_1.pb`, ... (at most `limit`, stopping at the first gap).
fn read_numbered(dir: &Path, prefix: &str, limit: usize) -> Result<Vec<cnnc_ir::Tensor>, String> {
    let mut out = Vec::new();
    for k in 0..limit {
        let p = dir.join(format!("{prefix}_{k}.pb"));
        if !p.is_file() {
            break;
        }
        let (_, t) = cnnc_onnx::read_tensor_pb(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        out.push(t);
    }
    if limit != usize::MAX && out.len() != limit {
        return Err(format!("{} {prefix} file(s), the model takes {limit}", out.len()));
    }
    Ok(out)
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}
