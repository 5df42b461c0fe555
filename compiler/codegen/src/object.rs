//! Graph to relocatable object file (position-independent, for `cc -shared`).

use cnnc_ir::Graph;
use cranelift_object::{ObjectBuilder, ObjectModule};

use crate::kernels::CodegenError;
use crate::module::{CompiledInfo, compile_graph};
use crate::target::TargetSpec;

/// Compiles `g` for `target` into the bytes of an object file exporting
/// `cnnc_model_info` and `cnnc_infer`.
pub fn compile_object(g: &Graph, target: &TargetSpec) -> Result<Vec<u8>, CodegenError> {
    compile_object_with_info(g, target).map(|(bytes, _)| bytes)
}

/// `compile_object`, also returning what was compiled (memory plan, kernel count).
pub fn compile_object_with_info(g: &Graph, target: &TargetSpec) -> Result<(Vec<u8>, CompiledInfo), CodegenError> {
    let isa = target.isa(true)?;
    let name = if g.name.is_empty() {
        "cnnc_model".to_string()
    } else {
        g.name.clone()
    };
    let builder = ObjectBuilder::new(isa, name, cranelift_module::default_libcall_names())
        .map_err(|e| CodegenError(format!("cannot create an object file for {}: {e}", target.triple)))?;
    let mut module = ObjectModule::new(builder);
    let info = compile_graph(&mut module, g, target)?;
    let bytes = module
        .finish()
        .emit()
        .map_err(|e| CodegenError(format!("cannot write the object file: {e}")))?;
    Ok((bytes, info))
}
