//! Fake cnnc models written in C and compiled at test time with the system `cc`, so the
//! runtime is tested against real shared objects built from `abi::C_HEADER`.
//!
//! The model: inputs `a` f32 [2,3] and `b` i64 [1], output `sum` f32 [2,3] = a + b[0],
//! computed row by row through the workspace, with the rows spread by
//! `host->parallel_for` when there is one. Magic values of `b[0]` make it report:
//! -999 returns status 7; -1000 returns status 100 + host->num_threads when it was
//! given a parallel_for, else 100.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use cnnc_runtime::abi;

pub const HEADER_NAME: &str = "cnnc_model.h";

const MODEL_SOURCE: &str = r#"
#include "cnnc_model.h"
#include <string.h>

static const uint64_t shape_2x3[2] = {2, 3};
static const uint64_t shape_1[1] = {1};
static const cnnc_tensor_desc model_inputs[2] = {
    {@A_NAME@, CNNC_DTYPE_F32, 2, @A_SHAPE@, 0},
    {"b", @B_DTYPE@, 1, shape_1, 0},
};
static const cnnc_tensor_desc model_outputs[1] = {
    {"sum", CNNC_DTYPE_F32, 2, shape_2x3, 0},
};
static const uint64_t state_shape[1] = {4};
static const cnnc_tensor_desc model_state[1] = {
    {"w", CNNC_DTYPE_F32, 1, state_shape, @STATE_OFFSET@},
};
static const struct cnnc_model_desc model_info = {
    @ABI_VERSION@, 2, 1, 1, model_inputs, model_outputs,
    @WORKSPACE_SIZE@, @WORKSPACE_ALIGN@,
    "@TARGET@", "@CPU_FEATURES@", "fake_add", @ENTRY_FLAGS@,
    32, model_state,
};

const struct cnnc_model_desc* cnnc_model_info(void) { return &model_info; }

struct add_ctx { const float* a; float b; float* out; float* scratch; };

static void add_row(void* p, uint64_t row) {
    struct add_ctx* ctx = p;
    /* Through the workspace, so a workspace that is too small or shared shows up. */
    for (int j = 0; j < 3; ++j) ctx->scratch[row * 3 + j] = ctx->a[row * 3 + j] + ctx->b;
    for (int j = 0; j < 3; ++j) ctx->out[row * 3 + j] = ctx->scratch[row * 3 + j];
}

int32_t cnnc_infer(const cnnc_host* host, const void* const* inputs, void* const* outputs, void* workspace) {
    if ((uintptr_t)workspace % @WORKSPACE_ALIGN@ != 0) return 2;
    int64_t b;
    memcpy(&b, inputs[1], sizeof b); /* buffers need not be aligned */
    if (b == -999) return 7;
    if (b == -1000) return 100 + (host && host->parallel_for ? (int32_t)host->num_threads : 0);
    struct add_ctx ctx = { inputs[0], (float)b, outputs[0], workspace };
    if (host && host->parallel_for) host->parallel_for(host->user, 2, add_row, &ctx);
    else for (uint64_t row = 0; row < 2; ++row) add_row(&ctx, row);
    return CNNC_STATUS_OK;
}
"#;

/// What to put in the fake model's metadata.
#[derive(Clone, Debug)]
pub struct FakeModel {
    pub abi_version: u32,
    pub target: String,
    pub cpu_features: String,
    pub workspace_size: u64,
    pub workspace_align: u64,
    pub entry_flags: &'static str,
    /// C expression for input 0's name.
    pub a_name: &'static str,
    /// C expression for input 0's shape pointer.
    pub a_shape: &'static str,
    /// C expression for input 1's dtype code.
    pub b_dtype: &'static str,
    pub state_offset: u64,
}

impl Default for FakeModel {
    fn default() -> Self {
        FakeModel {
            abi_version: abi::ABI_VERSION,
            target: host_target(),
            cpu_features: baseline_feature().to_owned(),
            workspace_size: 64,
            workspace_align: 64,
            entry_flags: "CNNC_ENTRY_INFER",
            a_name: "\"a\"",
            a_shape: "shape_2x3",
            b_dtype: "CNNC_DTYPE_I64",
            state_offset: 16,
        }
    }
}

pub fn host_target() -> String {
    format!("{}-unknown-{}-gnu", std::env::consts::ARCH, std::env::consts::OS)
}

/// A feature every CPU of this architecture has.
pub fn baseline_feature() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "sse2",
        "aarch64" => "neon",
        _ => "",
    }
}

/// A directory removed when dropped (a loaded library stays mapped after its file is
/// removed, so models may outlive it).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cnnc-runtime-test-{}-{tag}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether a C compiler is available; prints why a test is skipped when not.
pub fn have_cc(test: &str) -> bool {
    let ok = Command::new("cc").arg("--version").output().is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP {test}: no C compiler `cc` on PATH to build the fake model");
    }
    ok
}

/// Writes `abi::C_HEADER` into `dir`, so every fake model proves the header compiles.
pub fn write_header(dir: &Path) {
    std::fs::write(dir.join(HEADER_NAME), abi::C_HEADER).expect("writing the header");
}

/// Compiles a C translation unit including `header` with warnings as errors.
pub fn header_compiles(dir: &Path, header: &str) -> Result<(), String> {
    header_compiles_with(dir, header, "cc", "c", &["-std=c11"])
}

/// Whether a C++ compiler `c++` is available.
pub fn have_cxx() -> bool {
    Command::new("c++").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Compiles a C++ translation unit including `header` with warnings as errors.
pub fn header_compiles_as_cxx(dir: &Path, header: &str) -> Result<(), String> {
    header_compiles_with(dir, header, "c++", "cpp", &["-std=c++17"])
}

fn header_compiles_with(dir: &Path, header: &str, compiler: &str, ext: &str, std_flag: &[&str]) -> Result<(), String> {
    let probe_dir = dir.join(format!("header-probe-{ext}"));
    std::fs::create_dir_all(&probe_dir).map_err(|e| e.to_string())?;
    std::fs::write(probe_dir.join(HEADER_NAME), header).map_err(|e| e.to_string())?;
    let source = probe_dir.join(format!("probe.{ext}"));
    // Uses the entry-point declarations, not only the types.
    let probe = format!(
        "#include \"{HEADER_NAME}\"\nint probe(void) {{ return CNNC_ABI_VERSION + (cnnc_model_info() != 0) + cnnc_infer(0, 0, 0, 0); }}\n"
    );
    std::fs::write(&source, probe).map_err(|e| e.to_string())?;
    let output = Command::new(compiler)
        .args(std_flag)
        .args(["-Wall", "-Wextra", "-Werror", "-c"])
        .arg(&source)
        .arg("-o")
        .arg(probe_dir.join("probe.o"))
        .output()
        .map_err(|e| e.to_string())?;
    if output.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&output.stderr).into_owned()) }
}

/// Compiles C source into `dir/name.so` (header already written there).
pub fn compile_shared(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c_path = dir.join(format!("{name}.c"));
    let so_path = dir.join(format!("{name}.so"));
    std::fs::write(&c_path, source).expect("writing C source");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-std=c11", "-Wall", "-Werror"])
        .arg("-I")
        .arg(dir)
        .arg(&c_path)
        .arg("-o")
        .arg(&so_path)
        .output()
        .expect("running cc");
    assert!(output.status.success(), "cc failed on {name}:\n{}", String::from_utf8_lossy(&output.stderr));
    so_path
}

impl FakeModel {
    pub fn source(&self) -> String {
        MODEL_SOURCE
            .replace("@ABI_VERSION@", &self.abi_version.to_string())
            .replace("@TARGET@", &self.target)
            .replace("@CPU_FEATURES@", &self.cpu_features)
            .replace("@WORKSPACE_SIZE@", &self.workspace_size.to_string())
            .replace("@WORKSPACE_ALIGN@", &self.workspace_align.max(1).to_string())
            .replace("@ENTRY_FLAGS@", self.entry_flags)
            .replace("@A_NAME@", self.a_name)
            .replace("@A_SHAPE@", self.a_shape)
            .replace("@B_DTYPE@", self.b_dtype)
            .replace("@STATE_OFFSET@", &self.state_offset.to_string())
    }

    /// Builds the model as `dir/name.so`. Every model needs its own path: the dynamic
    /// loader keeps one copy per path per process.
    pub fn build(&self, dir: &TempDir, name: &str) -> PathBuf {
        if !dir.path().join(HEADER_NAME).exists() {
            write_header(dir.path());
        }
        compile_shared(dir.path(), name, &self.source())
    }
}

/// The model's reference: a + b.
pub fn expected_sum(a: &[f32], b: i64) -> Vec<f32> {
    a.iter().map(|x| x + b as f32).collect()
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32_from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
