//! The compile path as library calls: load -> passes -> code generation -> link.
//! The CLI and the tests drive cnnc through these functions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cnnc_codegen::TargetSpec;
use cnnc_ir::{DType, Graph, Tensor};

use crate::passes;

/// Why a command failed, mapped onto the exit statuses of DESIGN.md.
#[derive(Debug)]
pub enum Error {
    /// Bad input or usage (exit 2): unreadable file, unsupported model, bad flag.
    Input(String),
    /// A check failed or cnnc hit an internal error (exit 1).
    Failed(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) => 2,
            Error::Failed(_) => 1,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Input(m) | Error::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Reads an ONNX model into IR for inference (shapes inferred, constants folded by the
/// frontend; training-mode nodes take inference semantics).
pub fn load_onnx(path: &Path, batch: Option<usize>) -> Result<Graph, Error> {
    let opts = cnnc_onnx::LoadOptions { batch, inference: true, ..Default::default() };
    cnnc_onnx::load_model(path, &opts).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

/// Runs the inference pipeline for `target` (with `pipeline_options()`), calling
/// `observe` after each pass.
pub fn optimize(g: &mut Graph, target: &passes::TargetDesc, observe: impl FnMut(&str, &Graph)) -> Result<(), Error> {
    let ctx = passes::PassContext { target: target.clone() };
    let pipeline = passes::inference_pipeline_with(&pipeline_options());
    passes::run_pipeline(g, &pipeline, &ctx, observe).map_err(|e| Error::Failed(e.to_string()))
}

/// The environment variable that turns the blocked NCHWc layout off (`1`); the CLI's
/// `--no-nchwc` sets it, so `verify`'s child processes inherit it.
pub const NO_NCHWC_VAR: &str = "CNNC_NO_NCHWC";

/// The pipeline switches this process runs with.
pub fn pipeline_options() -> passes::PipelineOptions {
    let no_nchwc = std::env::var_os(NO_NCHWC_VAR).is_some_and(|v| v == "1");
    passes::PipelineOptions { nchwc: !no_nchwc }
}

/// What `compile_to_shared_object` did, for the one-line summary.
pub struct CompileReport {
    pub kernels: usize,
    pub weight_bytes: usize,
    pub seconds: f64,
}

/// Lowers an optimised graph to native code and links `out` (a shared object).
pub fn compile_to_shared_object(g: &Graph, target: &TargetSpec, out: &Path) -> Result<CompileReport, Error> {
    let start = Instant::now();
    cnnc_codegen::object::compile_shared(g, target, out).map_err(|e| Error::Failed(e.to_string()))?;
    let weight_bytes = g
        .constants
        .iter()
        .filter(|c| matches!(c.value, cnnc_ir::ConstValue::Dense(_)))
        .map(|c| c.ty.byte_size())
        .sum();
    let kernels = g.nodes.iter().filter(|n| !matches!(n.op, cnnc_ir::Op::Constant(_))).count();
    Ok(CompileReport { kernels, weight_bytes, seconds: start.elapsed().as_secs_f64() })
}

/// ONNX file -> optimised graph -> `out`.
pub fn compile_file(model: &Path, batch: Option<usize>, target: &TargetSpec, out: &Path) -> Result<(Graph, CompileReport), Error> {
    let start = Instant::now();
    let mut g = load_onnx(model, batch)?;
    optimize(&mut g, &passes::TargetDesc::from_target(target), |_, _| {})?;
    let mut report = compile_to_shared_object(&g, target, out)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok((g, report))
}

/// A scratch directory for artifacts of one cnnc process, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> Result<ScratchDir, Error> {
        let dir = std::env::temp_dir().join(format!("cnnc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Failed(format!("creating {}: {e}", dir.display())))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // CNNC_KEEP_SCRATCH=1 keeps the compiled objects and libraries, so that a profiler
        // run over `cnnc bench --train` can still name the kernels afterwards.
        if std::env::var_os("CNNC_KEEP_SCRATCH").is_some_and(|v| v == "1") {
            eprintln!("cnnc: kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// IR dtype for a runtime dtype (they mirror each other; the runtime keeps its own
/// so that it does not depend on the compiler).
pub fn ir_dtype(d: cnnc_runtime::DType) -> DType {
    match d {
        cnnc_runtime::DType::F32 => DType::F32,
        cnnc_runtime::DType::I64 => DType::I64,
        cnnc_runtime::DType::I32 => DType::I32,
        cnnc_runtime::DType::Bool => DType::Bool,
    }
}

/// Runs a loaded model on IR tensors, checking dtypes and shapes against its metadata.
pub fn run_model(session: &mut cnnc_runtime::Session, info: &cnnc_runtime::ModelInfo, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
    if inputs.len() != info.inputs.len() {
        return Err(Error::Input(format!("the model takes {} input(s), {} given", info.inputs.len(), inputs.len())));
    }
    for (t, spec) in inputs.iter().zip(&info.inputs) {
        let want = ir_dtype(spec.dtype);
        if t.data.dtype() != want || t.shape != spec.shape {
            return Err(Error::Input(format!(
                "input `{}` must be {}{:?}, got {}{:?}",
                spec.name,
                want,
                spec.shape,
                t.data.dtype(),
                t.shape
            )));
        }
    }
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let in_refs: Vec<&[u8]> = in_bytes.iter().map(|b| b.as_slice()).collect();
    let mut out_bytes: Vec<Vec<u8>> = info
        .outputs
        .iter()
        .map(|s| vec![0u8; s.shape.iter().product::<usize>() * ir_dtype(s.dtype).size()])
        .collect();
    let mut out_refs: Vec<&mut [u8]> = out_bytes.iter_mut().map(|b| b.as_mut_slice()).collect();
    session.run(&in_refs, &mut out_refs).map_err(|e| Error::Failed(format!("running the model: {e}")))?;
    Ok(info
        .outputs
        .iter()
        .zip(out_bytes)
        .map(|(s, b)| Tensor::new(s.shape.clone(), cnnc_ir::TensorData::from_le_bytes(ir_dtype(s.dtype), &b)))
        .collect())
}
