//! Graph to relocatable object file (position-independent, for `cc -shared`).

use std::path::Path;

use cnnc_ir::Graph;
use cranelift_object::{ObjectBuilder, ObjectModule};

use crate::kernels::CodegenError;
use crate::link;
use crate::module::{CompiledInfo, compile_graph};
use crate::target::TargetSpec;

/// Compiles `g` for `target` into the bytes of an object file exporting
/// `cnnc_model_info` and `cnnc_infer`.
pub fn compile_object(g: &Graph, target: &TargetSpec) -> Result<Vec<u8>, CodegenError> {
    compile_object_with_info(g, target).map(|(bytes, _)| bytes)
}

/// `compile_object`, also returning what was compiled (memory plan, kernel count).
pub fn compile_object_with_info(g: &Graph, target: &TargetSpec) -> Result<(Vec<u8>, CompiledInfo), CodegenError> {
    let mut module = object_module(g, target)?;
    let info = compile_graph(&mut module, g, target)?;
    let bytes = module.finish().emit().map_err(|e| CodegenError(format!("cannot write the object file: {e}")))?;
    Ok((bytes, info))
}

/// Compiles `g` and links it into the shared library `out`. The object goes straight
/// to a scratch file, never whole in memory (it is mostly weights). Errors start with
/// "code generation: " or "linking OUT: ".
pub fn compile_shared(g: &Graph, target: &TargetSpec, out: &Path) -> Result<CompiledInfo, CodegenError> {
    let codegen_err = |e: CodegenError| CodegenError(format!("code generation: {e}"));
    let mut module = object_module(g, target).map_err(codegen_err)?;
    let info = compile_graph(&mut module, g, target).map_err(codegen_err)?;
    let product = module.finish();
    let link_err = |e: CodegenError| CodegenError(format!("linking {}: {e}", out.display()));
    link::with_scratch_dir(|dir| {
        let obj_path = dir.join("model.o");
        let write_err = |e: &dyn std::fmt::Display| CodegenError(format!("cannot write {}: {e}", obj_path.display()));
        let file = std::fs::File::create(&obj_path).map_err(|e| write_err(&e))?;
        product.object.write_stream(std::io::BufWriter::with_capacity(1 << 20, file)).map_err(|e| write_err(&e))?;
        link::link_object_files(std::slice::from_ref(&obj_path), out, target)
    })
    .map_err(link_err)?;
    Ok(info)
}

fn object_module(g: &Graph, target: &TargetSpec) -> Result<ObjectModule, CodegenError> {
    let isa = target.isa(true)?;
    let name = if g.name.is_empty() { "cnnc_model".to_string() } else { g.name.clone() };
    let builder = ObjectBuilder::new(isa, name, cranelift_module::default_libcall_names())
        .map_err(|e| CodegenError(format!("cannot create an object file for {}: {e}", target.triple)))?;
    Ok(ObjectModule::new(builder))
}
