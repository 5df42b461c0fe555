//! Machine-code functions defined once per module and found again by the kernel
//! emitters that call them.
//!
//! Each family of functions (activations, transposed convolutions, pointwise
//! weight-gradient tiles) keeps its own thread-local [`RegistryKey`]: `compile_graph`
//! defines every function its graph needs up front ([`FunctionTable::define`]), installs
//! the table for the graph's duration ([`FunctionTable::install`]), and the emitters,
//! which see only a `Function`, look their symbol up ([`lookup`]) and import it
//! ([`import_local`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::thread::LocalKey;

use cnnc_ir::{Graph, Node};
use cranelift_codegen::ir::{self, AbiParam, FuncRef, Function, Signature, types};
use cranelift_codegen::isa::CallConv;
use cranelift_module::{FuncId, Linkage, Module};

use crate::kernels::CodegenError;

/// The thread-local slot of one family's table.
pub type RegistryKey = LocalKey<RefCell<Option<FunctionTable>>>;

/// One family's functions by symbol.
#[derive(Default)]
pub struct FunctionTable {
    functions: HashMap<String, FuncId>,
}

impl FunctionTable {
    /// Declares `name` in `module` with `signature` and defines it as the machine code
    /// `assemble` returns, unless the table has it already (then `assemble` is not run).
    pub fn define<M: Module>(
        &mut self,
        module: &mut M,
        name: String,
        signature: &Signature,
        assemble: impl FnOnce() -> Result<Vec<u8>, CodegenError>,
    ) -> Result<FuncId, CodegenError> {
        if let Some(&id) = self.functions.get(&name) {
            return Ok(id);
        }
        let code = assemble()?;
        let id = module
            .declare_function(&name, Linkage::Local, signature)
            .map_err(|e| CodegenError(format!("declaring {name}: {e}")))?;
        module
            .define_function_bytes(id, super::x86::CODE_ALIGN, &code, &[])
            .map_err(|e| CodegenError(format!("defining {name}: {e}")))?;
        self.functions.insert(name, id);
        Ok(id)
    }

    /// Defines the function of every node of `g` that `spec_of` takes (one per distinct
    /// symbol): the families whose functions follow from single nodes.
    pub fn define_for_nodes<M: Module, S>(
        &mut self,
        module: &mut M,
        g: &Graph,
        signature: &Signature,
        spec_of: impl Fn(&Graph, &Node) -> Option<S>,
        symbol: impl Fn(&S) -> String,
        assemble: impl Fn(&S) -> Result<Vec<u8>, CodegenError>,
    ) -> Result<(), CodegenError> {
        for node in &g.nodes {
            if let Some(spec) = spec_of(g, node) {
                self.define(module, symbol(&spec), signature, || assemble(&spec))?;
            }
        }
        Ok(())
    }

    /// Makes the table what [`lookup`] on `key` finds on this thread until the guard
    /// drops; dropping it restores the previous table (none outside `compile_graph`).
    pub fn install(self, key: &'static RegistryKey) -> InstalledTable {
        let previous = key.with(|slot| slot.replace(Some(self)));
        InstalledTable { key, previous }
    }
}

/// Keeps a [`FunctionTable`] installed; see [`FunctionTable::install`].
pub struct InstalledTable {
    key: &'static RegistryKey,
    previous: Option<FunctionTable>,
}

impl Drop for InstalledTable {
    fn drop(&mut self) {
        let previous = self.previous.take();
        self.key.with(|slot| *slot.borrow_mut() = previous);
    }
}

/// The function named `symbol` in the table installed on `key`, if any.
pub fn lookup(key: &'static RegistryKey, symbol: &str) -> Option<FuncId> {
    key.with(|slot| slot.borrow().as_ref().and_then(|table| table.functions.get(symbol).copied()))
}

/// A reference to the module's local function `id` in `func`: what
/// `Module::declare_func_in_func` does, without the module at hand.
pub fn import_local(func: &mut Function, id: FuncId, signature: Signature) -> FuncRef {
    let signature = func.import_signature(signature);
    let name = func.declare_imported_user_function(ir::UserExternalName { namespace: 0, index: id.as_u32() });
    func.import_function(ir::ExtFuncData {
        name: ir::ExternalName::user(name),
        signature,
        colocated: true,
        patchable: false,
    })
}

/// The signature every machine-code function here has: `params` pointer-sized
/// integers, SystemV, no result.
pub fn sysv_i64_signature(params: usize) -> Signature {
    let mut sig = Signature::new(CallConv::SystemV);
    sig.params.extend((0..params).map(|_| AbiParam::new(types::I64)));
    sig
}
