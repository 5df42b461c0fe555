//! Compiling for AArch64 and running the result under qemu-user through the C harness.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cnnc_ir::{DType, Tensor, TensorData};

use crate::common;

pub const TARGET: &str = "aarch64-unknown-linux-gnu";
const CROSS_CC: &str = "aarch64-linux-gnu-gcc";
const QEMU: &str = "qemu-aarch64";
/// The cross sysroot qemu-user takes its dynamic loader and libc from.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// A model run under emulation that takes longer than this is hung, not slow: MobileNetV2
/// takes ~10 s.
const RUN_LIMIT: Duration = Duration::from_secs(600);

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The cross harness, built once per test process; None (after a SKIP message) when
/// the cross tools are missing. With CI=true missing tools are a failure.
pub fn harness() -> Option<&'static Path> {
    static HARNESS: OnceLock<Option<PathBuf>> = OnceLock::new();
    HARNESS.get_or_init(build_harness).as_deref()
}

fn build_harness() -> Option<PathBuf> {
    let mut missing = Vec::new();
    if !runs(CROSS_CC, "--version") {
        missing.push(format!(
            "{CROSS_CC} (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
        ));
    }
    if !runs(QEMU, "--version") {
        missing.push(format!("{QEMU} (Debian: qemu-user)"));
    }
    if !Path::new(SYSROOT)
        .join("lib/ld-linux-aarch64.so.1")
        .exists()
    {
        missing.push(format!(
            "the AArch64 sysroot {SYSROOT} (Debian: libc6-dev-arm64-cross)"
        ));
    }
    if !missing.is_empty() {
        let msg = format!("cross tools missing: {}", missing.join(", "));
        if ci() {
            panic!("{msg}; CI=true, and .ci/run installs them");
        }
        eprintln!("SKIP: {msg}; AArch64 tests skipped");
        return None;
    }
    let dir = common::scratch("aarch64-harness");
    // The harness includes the very header `cnnc compile --header` writes, so an ABI
    // change that the header and the generated code disagree on shows up here.
    std::fs::write(dir.join("cnnc_model.h"), cnnc_runtime::abi::C_HEADER)
        .expect("write the ABI header");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/aarch64/harness.c");
    let exe = dir.join("harness");
    let out = Command::new(CROSS_CC)
        .args(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&dir)
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .args(["-ldl", "-lpthread"])
        .output()
        .expect("run the cross compiler");
    assert!(
        out.status.success(),
        "building the harness failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(exe)
}

/// Runs `cmd`, killing it after `limit`; returns (stdout, stderr) or a message.
fn run_with_limit(cmd: &mut Command, limit: Duration) -> Result<(String, String), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    // Drain both pipes on their own threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("killed after {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    if status.success() {
        Ok((out, err))
    } else {
        Err(format!("{status}\nstdout:\n{out}\nstderr:\n{err}"))
    }
}

/// What one model run produced, with timings for the report.
pub struct Aarch64Run {
    pub outputs: Vec<(String, Tensor)>,
    /// The harness's stdout: model info, tensor lines, `infer_ms`, `parallel_for_calls`.
    pub report: String,
    pub compile: Duration,
    pub emulate: Duration,
}

/// `cnnc compile MODEL --target aarch64 -o SO --header H`, checking the header too.
pub fn compile_for_aarch64(model: &Path, so: &Path, header: &Path) -> Result<Duration, String> {
    let start = Instant::now();
    let out = common::run_cnnc(&[
        "compile",
        path(model),
        "--target",
        TARGET,
        "-o",
        path(so),
        "--header",
        path(header),
    ]);
    let elapsed = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "cnnc compile --target {TARGET} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    let header_text = std::fs::read_to_string(header).map_err(|e| format!("no header: {e}"))?;
    if !header_text.contains(cnnc_runtime::abi::C_HEADER) || !header_text.contains(TARGET) {
        return Err(format!(
            "the header lacks the ABI declarations or the target:\n{header_text}"
        ));
    }
    Ok(elapsed)
}

/// Runs the AArch64 library `so` on `inputs` under qemu with a `threads` host (0: NULL
/// host), files in `dir`. The result's `compile` time is zero.
pub fn run_under_qemu(
    harness: &Path,
    dir: &Path,
    so: &Path,
    inputs: &[Tensor],
    threads: u32,
) -> Result<Aarch64Run, String> {
    let mut args = vec![
        so.to_path_buf(),
        dir.to_path_buf(),
        PathBuf::from(threads.to_string()),
    ];
    for (k, t) in inputs.iter().enumerate() {
        let file = dir.join(format!("input_{k}.bin"));
        std::fs::write(&file, t.data.to_le_bytes())
            .map_err(|e| format!("writing {}: {e}", file.display()))?;
        args.push(file);
    }
    let start = Instant::now();
    let (stdout, _) = run_with_limit(
        Command::new(QEMU)
            .arg("-L")
            .arg(SYSROOT)
            .arg(harness)
            .args(&args),
        RUN_LIMIT,
    )
    .map_err(|e| format!("the harness under {QEMU}: {e}"))?;
    let emulate = start.elapsed();
    if !stdout.contains(&format!("target {TARGET} ")) || !stdout.contains("features neon") {
        return Err(format!(
            "model info does not name {TARGET} with NEON:\n{stdout}"
        ));
    }
    Ok(Aarch64Run {
        outputs: read_outputs(dir, &stdout)?,
        report: stdout,
        compile: Duration::ZERO,
        emulate,
    })
}

/// Compiles `model` for AArch64 and runs it on `inputs` under qemu; panics on failure.
pub fn compile_and_run(
    harness: &Path,
    dir: &Path,
    model: &Path,
    inputs: &[Tensor],
    threads: u32,
) -> Aarch64Run {
    let so = dir.join("model.so");
    let compile =
        compile_for_aarch64(model, &so, &dir.join("model.h")).unwrap_or_else(|e| panic!("{e}"));
    let run = run_under_qemu(harness, dir, &so, inputs, threads)
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    Aarch64Run { compile, ..run }
}

impl Aarch64Run {
    /// A `key value` line of the harness report.
    pub fn reported(&self, key: &str) -> &str {
        self.report
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .unwrap_or("?")
    }

    pub fn summary(&self) -> String {
        format!(
            "compile {:.2} s, qemu {:.2} s (inference {} ms emulated, {} parallel_for calls)",
            self.compile.as_secs_f64(),
            self.emulate.as_secs_f64(),
            self.reported("infer_ms"),
            self.reported("parallel_for_calls")
        )
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("scratch paths are UTF-8")
}

/// Rebuilds the outputs from the harness's `output K NAME DTYPE DIMS` lines and files.
fn read_outputs(dir: &Path, stdout: &str) -> Result<Vec<(String, Tensor)>, String> {
    let mut outputs = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("output ")) {
        let fields: Vec<&str> = line.split(' ').collect();
        let [_, k, name, dtype, dims] = fields[..] else {
            return Err(format!("bad harness line: {line}"));
        };
        if k != outputs.len().to_string() {
            return Err(format!("outputs out of order: {line}"));
        }
        let dtype = match dtype.parse::<u32>() {
            Ok(cnnc_runtime::abi::DTYPE_F32) => DType::F32,
            Ok(cnnc_runtime::abi::DTYPE_I32) => DType::I32,
            Ok(cnnc_runtime::abi::DTYPE_I64) => DType::I64,
            Ok(cnnc_runtime::abi::DTYPE_BOOL) => DType::Bool,
            _ => return Err(format!("unknown dtype in {line}")),
        };
        let shape = if dims == "scalar" {
            vec![]
        } else {
            dims.split(',')
                .map(|d| d.parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{line}: {e}"))?
        };
        let file = dir.join(format!("output_{k}.bin"));
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if bytes.len() != shape.iter().product::<usize>() * dtype.size() {
            return Err(format!(
                "{} holds {} bytes, not a {dtype}{shape:?}",
                file.display(),
                bytes.len()
            ));
        }
        outputs.push((
            name.to_string(),
            Tensor::new(shape, TensorData::from_le_bytes(dtype, &bytes)),
        ));
    }
    Ok(outputs)
}
