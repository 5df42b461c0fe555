//! Shared helpers of the codegen integration tests: the DESIGN.md tolerance, running a
//! graph both ways, and random data.
#![allow(dead_code)]

use cnnc_codegen::JitModel;
use cnnc_ir::{DType, Graph, Tensor, TensorData, interp};

/// DESIGN.md: |y − ref| <= 1e-3·|ref| + 1e-4·max|ref| (+ the smallest normal f32, see
/// below); NaN where the reference has NaN, equal infinities; integers and bools
/// exact; shapes equal.
pub fn check_close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!("shape {:?} != reference {:?}", got.shape, want.shape));
    }
    match (&got.data, &want.data) {
        (TensorData::F32(y), TensorData::F32(r)) => {
            let max = r.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
            for (i, (&a, &b)) in y.iter().zip(r).enumerate() {
                let ok = if b.is_nan() {
                    a.is_nan()
                } else if b.is_infinite() {
                    a == b
                } else {
                    // Plus an absolute floor at the smallest normal f32: denormal
                    // results carry too few bits for a relative bound (their inputs
                    // already lost precision), which only degenerate tensors whose
                    // max|ref| is itself denormal can expose.
                    (a - b).abs() <= 1e-3 * b.abs() + 1e-4 * max + f32::MIN_POSITIVE
                };
                if !ok {
                    return Err(format!("element {i}: got {a:e}, reference {b:e} (max|ref| {max:e})"));
                }
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        (a, b) => {
            let n = a.len().min(b.len());
            let first = (0..n).find(|&i| a.get(i) != b.get(i));
            Err(format!(
                "{} data differs (first at {first:?}: {:?} vs {:?})",
                a.dtype(),
                first.map(|i| a.get(i)),
                first.map(|i| b.get(i))
            ))
        }
    }
}

/// Compiles `g`, runs it and the interpreter on `inputs`, compares every output.
pub fn check_graph(g: &Graph, inputs: &[Tensor]) -> Result<(), String> {
    let want = interp::run(g, inputs).map_err(|e| format!("interpreter: {e}"))?;
    let model = JitModel::compile(g).map_err(|e| format!("compile: {e}"))?;
    let got = model.run(inputs).map_err(|e| format!("run: {e}"))?;
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        check_close(a, b).map_err(|e| format!("output {k}: {e}"))?;
    }
    Ok(())
}

/// Deterministic pseudo-random numbers (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random tensor data of `dtype` (floats in [lo, hi), ints in [-20, 20], bools).
pub fn random_tensor(rng: &mut Rng, dtype: DType, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data = match dtype {
        DType::F32 => TensorData::F32((0..n).map(|_| rng.f32_in(lo, hi)).collect()),
        DType::I64 => TensorData::I64((0..n).map(|_| rng.below(41) as i64 - 20).collect()),
        DType::I32 => TensorData::I32((0..n).map(|_| rng.below(41) as i32 - 20).collect()),
        DType::Bool => TensorData::Bool((0..n).map(|_| rng.below(2) == 1).collect()),
    };
    Tensor::new(shape.to_vec(), data)
}

/// Proptest case count: `PROPTEST_CASES` if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fresh path for a test's shared library; `tag` names the test file.
pub fn temp_so(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "cnnc-{tag}-{}-{}.so",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Runs the shared library at `path`, compiled from `g`, through a runtime session of
/// `threads` threads, with inputs and outputs in plain vectors.
pub fn run_loaded(path: &std::path::Path, g: &Graph, threads: usize, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let model = cnnc_runtime::Model::load(path).map_err(|e| e.to_string())?;
    let mut session = cnnc_runtime::Session::new(&model, threads).map_err(|e| e.to_string())?;
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let in_refs: Vec<&[u8]> = in_bytes.iter().map(Vec::as_slice).collect();
    let out_types: Vec<cnnc_ir::TensorType> = g.outputs.iter().map(|&v| g.ty(v).clone()).collect();
    let mut out_bytes: Vec<Vec<u8>> = out_types.iter().map(|t| vec![0u8; t.byte_size()]).collect();
    let mut out_refs: Vec<&mut [u8]> = out_bytes.iter_mut().map(Vec::as_mut_slice).collect();
    session.run(&in_refs, &mut out_refs).map_err(|e| e.to_string())?;
    Ok(out_types
        .iter()
        .zip(&out_bytes)
        .map(|(t, bytes)| Tensor {
            shape: t.shape.clone(),
            data: TensorData::from_le_bytes(t.dtype, bytes),
        })
        .collect())
}

/// Compiles `g` for `target`, links a temporary shared library (`tag` names it), runs it
/// with `threads` threads (`run_loaded`) and removes it.
pub fn run_shared_library(
    tag: &str,
    g: &Graph,
    target: &cnnc_codegen::TargetSpec,
    threads: usize,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>, String> {
    let object = cnnc_codegen::compile_object(g, target).map_err(|e| e.to_string())?;
    let path = temp_so(tag);
    cnnc_codegen::link_shared(&object, &path, target).map_err(|e| e.to_string())?;
    let result = run_loaded(&path, g, threads, inputs);
    let _ = std::fs::remove_file(&path);
    result
}
