//! Cranelift code generation for cnnc IR graphs.
//!
//! Public API:
//! - [`TargetSpec`] (`target`): triple + CPU level → Cranelift ISA with explicit
//!   feature flags; `cpu_features()` lists what the code may use.
//! - [`compile_graph`] (`module`): a graph into any `cranelift_module::Module`: one
//!   local function per node kernel, constants as read-only data, and the exported C
//!   ABI symbols `cnnc_infer` / `cnnc_model_info` (`cnnc_runtime::abi`).
//! - [`compile_object`] (`object`): graph → PIC object file bytes;
//!   [`link_shared`] (`link`): object → `.so` via the system C compiler.
//! - [`JitModel`] (`jit`): compile for the host in-process and `run` on tensors
//!   (what the property tests use).
//! - [`MemoryPlan`] (`plan`): where each value lives (caller buffers, workspace slots
//!   reused by lifetime, read-only data).
//! - `kernels`: per-op-family emitters (`KernelCtx`, `emit_node` dispatch); `math`:
//!   inline f32 exp/log/tanh/erf/pow for scalars and f32x4; `loops`: loop scaffolding.
//!
//! Every error is a [`CodegenError`] with a message naming the node or setting at fault.

pub mod jit;
pub mod kernels;
pub mod link;
pub mod loops;
pub mod math;
pub mod microkernel;
pub mod module;
pub mod object;
pub mod parallel_compile;
pub mod plan;
pub mod target;
pub mod train_entry;

pub use jit::JitModel;
pub use kernels::CodegenError;
pub use link::{link_shared, link_shared_objects};
pub use module::{CompiledInfo, ModelExtras, StateTensorDesc, compile_graph, compile_graph_entry, compile_graph_with_extras};
pub use object::compile_object;
pub use plan::MemoryPlan;
pub use target::{CpuChoice, TargetSpec};
pub use train_entry::{
    CompiledTrain, EntryGraph, InputBinding, OutputBinding, StateLayout, TrainSignature, compile_entry_object, compile_train_object,
    compile_train_objects,
};
