//! The C ABI of a cnnc-compiled model, version 1. The compiler emits code and data
//! matching these declarations; the loader reads them; `C_HEADER` is the same
//! contract for C callers. Any change to a layout here bumps `ABI_VERSION`.
//!
//! Rules every entry point follows:
//! - All memory is the caller's: inputs, outputs, workspace (and, for training, the
//!   state buffer). Entry points allocate nothing and keep no global mutable state,
//!   so concurrent calls with separate workspaces (and outputs) are safe.
//! - Buffers are dense, row-major, little-endian, in the tensor's dtype (bool: one
//!   byte, 0 or 1). The workspace must be `workspace_align`-aligned.
//! - `host` may be null; when `host->parallel_for` is null, everything runs on the
//!   calling thread.

use std::ffi::{c_char, c_void};

pub const ABI_VERSION: u32 = 1;

/// Exported symbol names.
pub const SYM_MODEL_INFO: &str = "cnnc_model_info";
pub const SYM_INFER: &str = "cnnc_infer";
/// Training entry points (present when `entry_flags & ENTRY_TRAIN`).
pub const SYM_COMPUTE_GRADIENTS: &str = "cnnc_compute_gradients";
pub const SYM_APPLY_UPDATE: &str = "cnnc_apply_update";
pub const SYM_TRAIN_STEP: &str = "cnnc_train_step";

pub const ENTRY_INFER: u64 = 1;
pub const ENTRY_TRAIN: u64 = 2;

/// Element type codes: ONNX's TensorProto.DataType numbers.
pub const DTYPE_F32: u32 = 1;
pub const DTYPE_I32: u32 = 6;
pub const DTYPE_I64: u32 = 7;
pub const DTYPE_BOOL: u32 = 9;

/// Status codes returned by entry points.
pub const STATUS_OK: i32 = 0;

/// `task(ctx, i)` for one index of a parallel loop.
pub type TaskFn = unsafe extern "C" fn(ctx: *mut c_void, index: u64);

/// Runs `task(ctx, i)` for every `i` in `0..n`, possibly on several threads, and
/// returns when all have finished.
pub type ParallelForFn = unsafe extern "C" fn(user: *mut c_void, n: u64, task: TaskFn, ctx: *mut c_void);

/// Services the caller lends to a call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Host {
    /// Passed back as `user` to `parallel_for`.
    pub user: *mut c_void,
    /// Null: run on the calling thread.
    pub parallel_for: Option<ParallelForFn>,
    /// Number of threads `parallel_for` spreads work over (a hint for splitting).
    pub num_threads: u32,
    pub reserved: u32,
}

/// Describes one input, output or state tensor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TensorDesc {
    pub name: *const c_char,
    pub dtype: u32,
    pub rank: u32,
    pub shape: *const u64,
    /// Byte offset inside the state buffer (state tensors only; 0 otherwise).
    pub offset: u64,
}

/// Per-call training hyper-parameters (a schedule changes `learning_rate` per call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Hyper {
    pub learning_rate: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// 1-based optimizer step (Adam's bias correction).
    pub step: u64,
}

/// Everything a caller needs to drive the model, returned by `cnnc_model_info()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModelInfo {
    pub abi_version: u32,
    pub num_inputs: u32,
    pub num_outputs: u32,
    pub num_state_tensors: u32,
    pub inputs: *const TensorDesc,
    pub outputs: *const TensorDesc,
    pub workspace_size: u64,
    pub workspace_align: u64,
    /// Target triple the code was compiled for, e.g. "x86_64-unknown-linux-gnu".
    pub target: *const c_char,
    /// Comma-separated CPU features the code uses, named as in
    /// `std::is_x86_feature_detected!` / `is_aarch64_feature_detected!` ("avx2,fma").
    pub cpu_features: *const c_char,
    pub model_name: *const c_char,
    /// ENTRY_* bits.
    pub entry_flags: u64,
    /// Training: size of the state buffer and its tensors (parameters, optimizer
    /// state, running statistics, gradients), each with its offset.
    pub state_size: u64,
    pub state_tensors: *const TensorDesc,
}

/// `const cnnc_model_desc* cnnc_model_info(void)`
pub type ModelInfoFn = unsafe extern "C" fn() -> *const ModelInfo;

/// `int32_t cnnc_infer(const cnnc_host*, const void* const* inputs, void* const* outputs, void* workspace)`
pub type InferFn = unsafe extern "C" fn(
    host: *const Host,
    inputs: *const *const c_void,
    outputs: *const *mut c_void,
    workspace: *mut c_void,
) -> i32;

/// `int32_t cnnc_train_step(const cnnc_host*, void* state, const void* const* inputs,
/// const void* labels, const cnnc_hyper*, void* workspace, float* loss)`: one optimizer
/// step in place on the state buffer (parameters, optimizer state and running statistics
/// updated; the step's gradients left in their slots); `inputs` are the model's data
/// inputs (the `inputs` descriptors after the leading state tensors), `labels` int64
/// class indices [batch]. Optimizer buffers start at zero.
pub type TrainStepFn = unsafe extern "C" fn(
    host: *const Host,
    state: *mut c_void,
    inputs: *const *const c_void,
    labels: *const c_void,
    hyper: *const Hyper,
    workspace: *mut c_void,
    loss: *mut f32,
) -> i32;

/// `int32_t cnnc_compute_gradients(const cnnc_host*, void* state, const void* const* inputs,
/// const void* labels, void* workspace, float* loss)`: forward and backward on the state
/// buffer's parameters; writes every parameter's gradient into its "<parameter>.grad" slot
/// and updates the BatchNorm running statistics (PyTorch updates them in forward); no
/// optimizer update. Between this and `cnnc_apply_update` the caller may change the
/// gradients (accumulate over batches, all-reduce across processes).
pub type ComputeGradientsFn = unsafe extern "C" fn(
    host: *const Host,
    state: *mut c_void,
    inputs: *const *const c_void,
    labels: *const c_void,
    workspace: *mut c_void,
    loss: *mut f32,
) -> i32;

/// `int32_t cnnc_apply_update(const cnnc_host*, void* state, const cnnc_hyper*, void* workspace)`:
/// the optimizer update of the parameters and optimizer state from the gradients in the
/// state buffer. `cnnc_compute_gradients` then `cnnc_apply_update` is `cnnc_train_step`.
pub type ApplyUpdateFn =
    unsafe extern "C" fn(host: *const Host, state: *mut c_void, hyper: *const Hyper, workspace: *mut c_void) -> i32;

/// The C header for ABI version 1 (model-independent; `cnnc compile --header`
/// appends a comment describing the model's own tensors).
pub const C_HEADER: &str = r#"/* cnnc model ABI, version 1. Generated by cnnc; do not edit. */
#ifndef CNNC_MODEL_ABI_H
#define CNNC_MODEL_ABI_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define CNNC_ABI_VERSION 1
#define CNNC_ENTRY_INFER 1u
#define CNNC_ENTRY_TRAIN 2u
#define CNNC_DTYPE_F32 1u
#define CNNC_DTYPE_I32 6u
#define CNNC_DTYPE_I64 7u
#define CNNC_DTYPE_BOOL 9u
#define CNNC_STATUS_OK 0

typedef void (*cnnc_task_fn)(void* ctx, uint64_t index);
typedef void (*cnnc_parallel_for_fn)(void* user, uint64_t n, cnnc_task_fn task, void* ctx);

/* Services lent to a call. May be NULL; a NULL parallel_for runs on the calling thread. */
typedef struct cnnc_host {
    void* user;
    cnnc_parallel_for_fn parallel_for;
    uint32_t num_threads;
    uint32_t reserved;
} cnnc_host;

typedef struct cnnc_tensor_desc {
    const char* name;
    uint32_t dtype;          /* CNNC_DTYPE_* (ONNX TensorProto codes) */
    uint32_t rank;
    const uint64_t* shape;
    uint64_t offset;         /* byte offset in the state buffer (state tensors only) */
} cnnc_tensor_desc;

typedef struct cnnc_hyper {
    float learning_rate, momentum, weight_decay, beta1, beta2, epsilon;
    uint64_t step;
} cnnc_hyper;

typedef struct cnnc_model_desc {
    uint32_t abi_version;
    uint32_t num_inputs, num_outputs, num_state_tensors;
    const cnnc_tensor_desc* inputs;
    const cnnc_tensor_desc* outputs;
    uint64_t workspace_size, workspace_align;
    const char* target;
    const char* cpu_features;  /* comma-separated; check before calling */
    const char* model_name;
    uint64_t entry_flags;      /* CNNC_ENTRY_* */
    uint64_t state_size;
    const cnnc_tensor_desc* state_tensors;
} cnnc_model_desc;

/* Metadata. Check abi_version == CNNC_ABI_VERSION and the CPU features first. */
const cnnc_model_desc* cnnc_model_info(void);

/* Inference. Buffers are caller-owned, dense row-major; the workspace holds
 * workspace_size bytes aligned to workspace_align. Returns CNNC_STATUS_OK.
 * Safe to call concurrently with distinct workspaces and outputs. */
int32_t cnnc_infer(const cnnc_host* host, const void* const* inputs,
                   void* const* outputs, void* workspace);

/* Training (entry_flags & CNNC_ENTRY_TRAIN). The state buffer (state_size bytes, laid
 * out as state_tensors says; optimizer buffers zero before the first step) is updated in
 * place: parameters, optimizer state, running statistics, and the step's gradients
 * ("<parameter>.grad"). inputs: the model's data inputs; labels: int64 class indices.
 * With a training model, cnnc_infer is the pure step: inputs = state tensors, data,
 * labels, then the seven hyper-parameters as float scalars; outputs = new state tensors,
 * loss, gradients. */
int32_t cnnc_train_step(const cnnc_host* host, void* state, const void* const* inputs,
                        const void* labels, const cnnc_hyper* hyper, void* workspace,
                        float* loss);

/* The same step in two halves, for gradient accumulation or an all-reduce in between:
 * cnnc_compute_gradients runs forward and backward, writes every gradient into its
 * "<parameter>.grad" slot of the state and updates the BatchNorm running statistics,
 * without an optimizer update; cnnc_apply_update applies the optimizer to the parameters
 * and optimizer state from the gradients in the state. The two in sequence equal
 * cnnc_train_step. Same buffers and workspace as cnnc_train_step. */
int32_t cnnc_compute_gradients(const cnnc_host* host, void* state, const void* const* inputs,
                               const void* labels, void* workspace, float* loss);
int32_t cnnc_apply_update(const cnnc_host* host, void* state, const cnnc_hyper* hyper,
                          void* workspace);

#ifdef __cplusplus
}
#endif
#endif
"#;
