//! In-process compilation for tests and tools: the same module as the shared library,
//! finished by cranelift-jit instead of an object file and a linker.

use std::ffi::c_void;

use cnnc_ir::{Graph, Tensor, TensorData, TensorType};
use cnnc_runtime::abi;
use cranelift_jit::{JITBuilder, JITModule};

use crate::kernels::CodegenError;
use crate::module::{CompiledInfo, compile_graph};
use crate::target::TargetSpec;

/// A compiled graph, callable in this process.
pub struct JitModel {
    module: Option<JITModule>,
    infer: abi::InferFn,
    model_info: abi::ModelInfoFn,
    info: CompiledInfo,
    input_types: Vec<TensorType>,
    output_types: Vec<TensorType>,
}

/// 64-byte aligned scratch memory.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

fn aligned(bytes: usize) -> Vec<Line> {
    vec![Line([0; 64]); bytes.div_ceil(64).max(1)]
}

fn as_bytes(lines: &[Line]) -> &[u8] {
    // SAFETY: Line is plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u8, lines.len() * 64) }
}

fn as_bytes_mut(lines: &mut [Line]) -> &mut [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) }
}

impl JitModel {
    /// Compiles `g` for the host CPU.
    pub fn compile(g: &Graph) -> Result<JitModel, CodegenError> {
        let target = TargetSpec::host();
        let isa = target.isa(false)?;
        let builder = JITBuilder::with_isa(isa, cranelift_module::default_libcall_names());
        let mut module = JITModule::new(builder);
        let info = match compile_graph(&mut module, g, &target) {
            Ok(info) => info,
            Err(e) => {
                // SAFETY: nothing from this module was handed out.
                unsafe { module.free_memory() };
                return Err(e);
            }
        };
        if let Err(e) = module.finalize_definitions() {
            unsafe { module.free_memory() };
            return Err(CodegenError(format!("JIT finalization failed: {e}")));
        }
        let infer_ptr = module.get_finalized_function(info.infer);
        let info_ptr = module.get_finalized_function(info.model_info);
        // SAFETY: both functions were defined with exactly these C signatures.
        let infer: abi::InferFn = unsafe { std::mem::transmute::<*const u8, abi::InferFn>(infer_ptr) };
        let model_info: abi::ModelInfoFn = unsafe { std::mem::transmute::<*const u8, abi::ModelInfoFn>(info_ptr) };
        Ok(JitModel {
            module: Some(module),
            infer,
            model_info,
            info,
            input_types: g.inputs.iter().map(|&v| g.ty(v).clone()).collect(),
            output_types: g.outputs.iter().map(|&v| g.ty(v).clone()).collect(),
        })
    }

    pub fn info(&self) -> &CompiledInfo {
        &self.info
    }

    pub fn workspace_size(&self) -> usize {
        self.info.workspace_size
    }

    /// The compiled `cnnc_model_info` (valid while `self` lives).
    pub fn model_info(&self) -> &abi::ModelInfo {
        // SAFETY: returns the address of a static data object of this module.
        unsafe { &*(self.model_info)() }
    }

    /// Calls `cnnc_infer` on caller-prepared buffers (benchmarks: no conversion).
    ///
    /// # Safety
    /// One pointer per graph input and output, each to a buffer of the value's byte
    /// size; `workspace` 64-byte aligned with `workspace_size()` bytes.
    pub unsafe fn infer_raw(&self, inputs: &[*const c_void], outputs: &[*mut c_void], workspace: *mut c_void) -> i32 {
        assert!(inputs.len() == self.input_types.len() && outputs.len() == self.output_types.len());
        // SAFETY: the caller upholds the buffer contract.
        unsafe { (self.infer)(std::ptr::null(), inputs.as_ptr(), outputs.as_ptr(), workspace) }
    }

    /// Runs inference on the calling thread. Inputs must match the graph's input types.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, CodegenError> {
        if inputs.len() != self.input_types.len() {
            return Err(CodegenError(format!(
                "model takes {} inputs, got {}",
                self.input_types.len(),
                inputs.len()
            )));
        }
        let mut in_bufs = Vec::with_capacity(inputs.len());
        for (i, (t, want)) in inputs.iter().zip(&self.input_types).enumerate() {
            if t.ty() != *want {
                return Err(CodegenError(format!(
                    "input {i} has type {}, the model expects {want}",
                    t.ty()
                )));
            }
            if t.data.len() != want.numel() {
                return Err(CodegenError(format!(
                    "input {i}: shape {:?} but {} values",
                    t.shape,
                    t.data.len()
                )));
            }
            let bytes = t.data.to_le_bytes();
            let mut buf = aligned(bytes.len());
            as_bytes_mut(&mut buf)[..bytes.len()].copy_from_slice(&bytes);
            in_bufs.push(buf);
        }
        let mut out_bufs: Vec<Vec<Line>> = self.output_types.iter().map(|t| aligned(t.byte_size())).collect();
        let mut workspace = aligned(self.info.workspace_size);
        let in_ptrs: Vec<*const c_void> = in_bufs.iter().map(|b| b.as_ptr() as *const c_void).collect();
        let out_ptrs: Vec<*mut c_void> = out_bufs.iter_mut().map(|b| b.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: buffers have the sizes the model declares, the workspace is 64-byte
        // aligned and large enough, and the pointer arrays outlive the call.
        let status = unsafe {
            (self.infer)(
                std::ptr::null(),
                in_ptrs.as_ptr(),
                out_ptrs.as_ptr(),
                workspace.as_mut_ptr() as *mut c_void,
            )
        };
        if status != abi::STATUS_OK {
            return Err(CodegenError(format!("cnnc_infer returned status {status}")));
        }
        Ok(self
            .output_types
            .iter()
            .zip(&out_bufs)
            .map(|(t, buf)| {
                let bytes = &as_bytes(buf)[..t.byte_size()];
                Tensor {
                    shape: t.shape.clone(),
                    data: TensorData::from_le_bytes(t.dtype, bytes),
                }
            })
            .collect())
    }
}

impl Drop for JitModel {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: the function pointers die with `self`; no call can be running
            // because `run` borrows `self`.
            unsafe { module.free_memory() };
        }
    }
}
