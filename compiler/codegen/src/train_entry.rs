//! The training entry points of the C ABI (`runtime/src/abi.rs`), each a thin exported
//! function around a graph compiled by `compile_graph` / `compile_graph_entry`:
//!
//! - `cnnc_train_step(host, state, inputs, labels, hyper, workspace, loss)` around the fused
//!   training graph (`cnnc::train::fused`), which is also exported as `cnnc_infer` (the pure
//!   function) with `cnnc_model_info`. Its inputs: `num_state` state tensors, `num_data` data
//!   inputs, the labels, then the seven f32 hyper-parameter scalars (the fields of
//!   `cnnc_hyper`, `step` as f32); its outputs: the new value of every state tensor, the
//!   loss, then one gradient per trained parameter.
//! - `cnnc_compute_gradients(host, state, inputs, labels, workspace, loss)` and
//!   `cnnc_apply_update(host, state, hyper, workspace)` around graphs of their own
//!   (`EntryGraph`: forward + backward + running statistics; the optimizer update), each
//!   compiled into its own object (kernel names repeat between graphs) and linked into the
//!   same library (`compile_train_objects`). Their graph inputs and outputs are bound by
//!   name to tensors of the fused graph's state layout.
//!
//! An entry point points its graph's state inputs into the caller's state buffer and writes
//! the state tensors the graph also reads into a shadow copy in the workspace (after the
//! graph's memory plan), copied back once the graph has run: a graph never reads and writes
//! the same memory. Other outputs (gradients, the loss) are written in place. The library's
//! workspace size covers every entry point.
//!
//! State buffer layout: the state tensors in graph order, then the gradients, each at a
//! 64-byte aligned offset; `cnnc_model_info` lists them all (names: the graph values'
//! names, gradients "<parameter>.grad").

use cnnc_ir::Graph;
use cnnc_runtime::abi;
use cranelift_codegen::ir::types::{F32, I32, I64};
use cranelift_codegen::ir::{
    AbiParam, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, UserFuncName,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};

use crate::kernels::CodegenError;
use crate::module::{
    CompiledInfo, ModelExtras, StateTensorDesc, compile_graph_entry, compile_graph_with_extras, define,
    extra_workspace_offset,
};
use crate::plan::WORKSPACE_ALIGN;
use crate::target::TargetSpec;

/// Number of hyper-parameter scalar inputs (fields of `abi::Hyper`).
pub const HYPER_INPUTS: usize = 7;

/// How the fused graph's inputs and outputs divide up (see the module doc).
#[derive(Clone, Debug)]
pub struct TrainSignature {
    pub num_state: usize,
    pub num_data: usize,
}

/// Where each state tensor and gradient lives in the state buffer.
#[derive(Clone, Debug)]
pub struct StateLayout {
    /// State tensors then gradients.
    pub tensors: Vec<StateTensorDesc>,
    /// Bytes of the state tensors proper (the part `cnnc_train_step` rewrites), which
    /// are contiguous from offset 0.
    pub state_bytes: usize,
    pub size: usize,
}

impl StateLayout {
    pub fn of(g: &Graph, sig: &TrainSignature) -> Result<StateLayout, CodegenError> {
        check_signature(g, sig)?;
        let mut offset = 0usize;
        let mut tensors = Vec::new();
        let place = |tensors: &mut Vec<StateTensorDesc>, offset: &mut usize, name: String, ty: &cnnc_ir::TensorType| {
            *offset = offset.next_multiple_of(WORKSPACE_ALIGN);
            tensors.push(StateTensorDesc { name, ty: ty.clone(), offset: *offset as u64 });
            *offset += ty.byte_size();
        };
        for &v in &g.inputs[..sig.num_state] {
            place(&mut tensors, &mut offset, g.value(v).name.clone(), g.ty(v));
        }
        let state_bytes = offset;
        for (&v, &p) in g.outputs[sig.num_state + 1..].iter().zip(&g.inputs[..sig.num_state]) {
            place(&mut tensors, &mut offset, format!("{}.grad", g.value(p).name), g.ty(v));
        }
        Ok(StateLayout { tensors, state_bytes, size: offset.next_multiple_of(WORKSPACE_ALIGN) })
    }
}

fn check_signature(g: &Graph, sig: &TrainSignature) -> Result<(), CodegenError> {
    let inputs = sig.num_state + sig.num_data + 1 + HYPER_INPUTS;
    if g.inputs.len() != inputs {
        return Err(CodegenError(format!(
            "a training graph with {} state tensor(s) and {} data input(s) needs {inputs} inputs, this one has {}",
            sig.num_state,
            sig.num_data,
            g.inputs.len()
        )));
    }
    if g.outputs.len() < sig.num_state + 1 {
        return Err(CodegenError(format!(
            "a training graph needs the new state and the loss as outputs, this one has {}",
            g.outputs.len()
        )));
    }
    let grads = g.outputs.len() - sig.num_state - 1;
    if grads > sig.num_state {
        return Err(CodegenError(format!(
            "a training graph with {} state tensor(s) has {grads} gradients",
            sig.num_state
        )));
    }
    for (k, (&input, &output)) in g.inputs.iter().zip(&g.outputs).take(sig.num_state).enumerate() {
        if g.ty(input) != g.ty(output) {
            return Err(CodegenError(format!(
                "state tensor {k}: input {} and new value {} differ in type",
                g.ty(input),
                g.ty(output)
            )));
        }
    }
    for (k, (&param, &grad)) in g.inputs.iter().zip(&g.outputs[sig.num_state + 1..]).enumerate() {
        if g.ty(param) != g.ty(grad) {
            return Err(CodegenError(format!(
                "gradient {k}: parameter {} and gradient {} differ in type",
                g.ty(param),
                g.ty(grad)
            )));
        }
    }
    for &h in &g.inputs[sig.num_state + sig.num_data + 1..] {
        if *g.ty(h) != cnnc_ir::TensorType::f32(Vec::<usize>::new()) {
            return Err(CodegenError(format!(
                "hyper-parameter input '{}' must be an f32 scalar, is {}",
                g.value(h).name,
                g.ty(h)
            )));
        }
    }
    Ok(())
}

/// What an input of an entry point's graph is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputBinding {
    /// The state buffer's tensor of this name (`StateLayout::tensors`; gradients "<p>.grad").
    State(String),
    /// The `j`-th of the entry's `inputs` pointers (the model's data inputs).
    Data(usize),
    /// The entry's `labels` pointer.
    Labels,
    /// Field `k` of `cnnc_hyper` as an f32 scalar (`HYPER_INPUTS` fields; the last, the
    /// u64 `step`, is converted to f32).
    Hyper(usize),
}

/// Where an output of an entry point's graph goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputBinding {
    /// The state buffer's tensor of this name. When the graph also reads it, the graph
    /// writes a shadow copy in the workspace, copied back after the graph has run (the
    /// graph never reads and writes the same memory).
    State(String),
    /// `*loss` (an f32 scalar).
    Loss,
}

/// A graph behind one more training entry point (`abi::SYM_COMPUTE_GRADIENTS`,
/// `abi::SYM_APPLY_UPDATE`), with what each of its inputs and outputs is bound to.
#[derive(Clone, Debug)]
pub struct EntryGraph {
    pub symbol: &'static str,
    pub graph: Graph,
    pub inputs: Vec<InputBinding>,
    pub outputs: Vec<OutputBinding>,
}

/// The parameters of a training entry point, in C order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryParam {
    Host,
    State,
    Inputs,
    Labels,
    Hyper,
    Workspace,
    Loss,
}

fn entry_params(symbol: &str) -> Result<&'static [EntryParam], CodegenError> {
    use EntryParam::*;
    match symbol {
        abi::SYM_TRAIN_STEP => Ok(&[Host, State, Inputs, Labels, Hyper, Workspace, Loss]),
        abi::SYM_COMPUTE_GRADIENTS => Ok(&[Host, State, Inputs, Labels, Workspace, Loss]),
        abi::SYM_APPLY_UPDATE => Ok(&[Host, State, Hyper, Workspace]),
        other => Err(CodegenError(format!("'{other}' is not a training entry point of the ABI"))),
    }
}

/// The fused graph's bindings (see the module doc).
fn train_step_bindings(
    g: &Graph,
    sig: &TrainSignature,
    layout: &StateLayout,
) -> (Vec<InputBinding>, Vec<OutputBinding>) {
    let state_names = || layout.tensors[..sig.num_state].iter().map(|t| t.name.clone());
    let mut inputs: Vec<InputBinding> = state_names().map(InputBinding::State).collect();
    inputs.extend((0..sig.num_data).map(InputBinding::Data));
    inputs.push(InputBinding::Labels);
    inputs.extend((0..HYPER_INPUTS).map(InputBinding::Hyper));
    let mut outputs: Vec<OutputBinding> = state_names().map(OutputBinding::State).collect();
    outputs.push(OutputBinding::Loss);
    let grads = g.outputs.len() - sig.num_state - 1;
    outputs.extend(
        layout.tensors[sig.num_state..sig.num_state + grads].iter().map(|t| OutputBinding::State(t.name.clone())),
    );
    (inputs, outputs)
}

/// How an entry point reaches its graph's buffers, checked against the graph's types.
struct ResolvedEntry {
    params: &'static [EntryParam],
    /// Per graph input: (binding, state tensor index for `State`).
    inputs: Vec<(InputBinding, Option<usize>)>,
    /// Per graph output: `None` for the loss, else (state tensor index, through the shadow).
    outputs: Vec<Option<(usize, bool)>>,
    /// Bytes after the graph's workspace for the shadow copies (0 without any).
    shadow_bytes: usize,
}

fn resolve(
    symbol: &'static str,
    g: &Graph,
    inputs: &[InputBinding],
    outputs: &[OutputBinding],
    layout: &StateLayout,
) -> Result<ResolvedEntry, CodegenError> {
    let params = entry_params(symbol)?;
    let err = |msg: String| CodegenError(format!("{symbol}: {msg}"));
    if inputs.len() != g.inputs.len() || outputs.len() != g.outputs.len() {
        return Err(err(format!(
            "{} input and {} output bindings for a graph of {} inputs and {} outputs",
            inputs.len(),
            outputs.len(),
            g.inputs.len(),
            g.outputs.len()
        )));
    }
    let find = |name: &str| {
        layout
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| err(format!("no state tensor '{name}' in the state layout")))
    };
    let needs = |p: EntryParam, what: &str| {
        if params.contains(&p) {
            Ok(())
        } else {
            Err(err(format!("a graph input is bound to {what}, which this entry point does not take")))
        }
    };
    let scalar = cnnc_ir::TensorType::f32(Vec::<usize>::new());
    let mut resolved_inputs = Vec::with_capacity(inputs.len());
    let mut read_state = Vec::new();
    for (binding, &v) in inputs.iter().zip(&g.inputs) {
        let ty = g.ty(v);
        let index = match binding {
            InputBinding::State(name) => {
                let k = find(name)?;
                if layout.tensors[k].ty != *ty {
                    return Err(err(format!(
                        "state tensor '{name}' is {}, the graph input '{}' is {ty}",
                        layout.tensors[k].ty,
                        g.value(v).name
                    )));
                }
                read_state.push(k);
                Some(k)
            }
            InputBinding::Data(_) => {
                needs(EntryParam::Inputs, "the data inputs")?;
                None
            }
            InputBinding::Labels => {
                needs(EntryParam::Labels, "the labels")?;
                None
            }
            InputBinding::Hyper(k) => {
                needs(EntryParam::Hyper, "a hyper-parameter")?;
                if *k >= HYPER_INPUTS || *ty != scalar {
                    return Err(err(format!(
                        "hyper-parameter input {k} ('{}', {ty}) must be one of {HYPER_INPUTS} f32 scalars",
                        g.value(v).name
                    )));
                }
                None
            }
        };
        resolved_inputs.push((binding.clone(), index));
    }
    let mut resolved_outputs = Vec::with_capacity(outputs.len());
    for (binding, &v) in outputs.iter().zip(&g.outputs) {
        let ty = g.ty(v);
        match binding {
            OutputBinding::Loss => {
                needs(EntryParam::Loss, "the loss")?;
                if *ty != scalar {
                    return Err(err(format!("the loss must be an f32 scalar, is {ty}")));
                }
                resolved_outputs.push(None);
            }
            OutputBinding::State(name) => {
                let k = find(name)?;
                if layout.tensors[k].ty != *ty {
                    return Err(err(format!(
                        "state tensor '{name}' is {}, the graph output is {ty}",
                        layout.tensors[k].ty
                    )));
                }
                let shadow = read_state.contains(&k);
                resolved_outputs.push(Some((k, shadow)));
            }
        }
    }
    // The shadow mirrors the state buffer's layout, up to the end of the last shadowed tensor.
    let shadow_bytes = resolved_outputs
        .iter()
        .flatten()
        .filter(|(_, shadow)| *shadow)
        .map(|&(k, _)| layout.tensors[k].offset as usize + layout.tensors[k].ty.byte_size())
        .max()
        .unwrap_or(0);
    Ok(ResolvedEntry { params, inputs: resolved_inputs, outputs: resolved_outputs, shadow_bytes })
}

/// What `compile_train_graph` emitted.
#[derive(Clone, Debug)]
pub struct CompiledTrain {
    pub graph: CompiledInfo,
    pub train_step: FuncId,
    pub layout: StateLayout,
}

/// Compiles the fused training graph `g` with `cnnc_infer` (the pure function: all
/// inputs to all outputs), `cnnc_train_step` and training metadata in `cnnc_model_info`.
/// `min_workspace`: what entry points compiled into other objects of the same library
/// need (`compile_entry_object`).
pub fn compile_train_graph<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    sig: &TrainSignature,
    min_workspace: usize,
) -> Result<CompiledTrain, CodegenError> {
    let layout = StateLayout::of(g, sig)?;
    let (inputs, outputs) = train_step_bindings(g, sig, &layout);
    let resolved = resolve(abi::SYM_TRAIN_STEP, g, &inputs, &outputs, &layout)?;
    let extras = ModelExtras {
        entry_flags: abi::ENTRY_TRAIN,
        extra_workspace: resolved.shadow_bytes.max(layout.state_bytes),
        state_size: layout.size as u64,
        state_tensors: layout.tensors.clone(),
        min_workspace,
    };
    let graph = compile_graph_with_extras(module, g, target, &extras)?;
    let shadow = extra_workspace_offset(&graph.plan);
    let train_step = emit_entry(module, abi::SYM_TRAIN_STEP, &resolved, &layout, graph.infer, shadow)?;
    Ok(CompiledTrain { graph, train_step, layout })
}

/// `compile_train_graph` into the bytes of a PIC object file.
pub fn compile_train_object(
    g: &Graph,
    target: &TargetSpec,
    sig: &TrainSignature,
) -> Result<(Vec<u8>, CompiledTrain), CodegenError> {
    compile_train_object_sharing(g, target, sig, 0)
}

/// `compile_train_object` with a workspace of at least `min_workspace` bytes.
pub fn compile_train_object_sharing(
    g: &Graph,
    target: &TargetSpec,
    sig: &TrainSignature,
    min_workspace: usize,
) -> Result<(Vec<u8>, CompiledTrain), CodegenError> {
    let mut module = object_module(g, target)?;
    let compiled = compile_train_graph(&mut module, g, target, sig, min_workspace)?;
    let bytes = module.finish().emit().map_err(|e| CodegenError(format!("cannot write the object file: {e}")))?;
    Ok((bytes, compiled))
}

fn object_module(g: &Graph, target: &TargetSpec) -> Result<ObjectModule, CodegenError> {
    let isa = target.isa(true)?;
    let name = if g.name.is_empty() { "cnnc_model".to_string() } else { g.name.clone() };
    let builder = ObjectBuilder::new(isa, name, cranelift_module::default_libcall_names())
        .map_err(|e| CodegenError(format!("cannot create an object file for {}: {e}", target.triple)))?;
    Ok(ObjectModule::new(builder))
}

/// The object of one more entry point (`entry.symbol`, exported) around its own graph,
/// for the library of the fused graph `fused` (whose state layout it uses). Returns the
/// object and the workspace the entry point needs.
pub fn compile_entry_object(
    entry: &EntryGraph,
    fused: &Graph,
    sig: &TrainSignature,
    target: &TargetSpec,
) -> Result<(Vec<u8>, usize), CodegenError> {
    let layout = StateLayout::of(fused, sig)?;
    let resolved = resolve(entry.symbol, &entry.graph, &entry.inputs, &entry.outputs, &layout)?;
    let mut module = object_module(&entry.graph, target)?;
    let graph_symbol = format!("{}_graph", entry.symbol);
    let graph = compile_graph_entry(&mut module, &entry.graph, target, &graph_symbol)?;
    let shadow = extra_workspace_offset(&graph.plan);
    emit_entry(&mut module, entry.symbol, &resolved, &layout, graph.infer, shadow)?;
    let workspace = if resolved.shadow_bytes > 0 { shadow + resolved.shadow_bytes } else { graph.plan.workspace_size };
    let bytes = module.finish().emit().map_err(|e| CodegenError(format!("cannot write the object file: {e}")))?;
    Ok((bytes, workspace))
}

/// The objects of a training library: the fused graph (`cnnc_infer`, `cnnc_model_info`,
/// `cnnc_train_step`) then one per `entries`, to be linked together.
pub fn compile_train_objects(
    fused: &Graph,
    target: &TargetSpec,
    sig: &TrainSignature,
    entries: &[EntryGraph],
) -> Result<(Vec<Vec<u8>>, CompiledTrain), CodegenError> {
    let mut objects = Vec::with_capacity(entries.len() + 1);
    let mut min_workspace = 0;
    for entry in entries {
        let (object, workspace) = compile_entry_object(entry, fused, sig, target)?;
        objects.push(object);
        min_workspace = min_workspace.max(workspace);
    }
    let (main, compiled) = compile_train_object_sharing(fused, target, sig, min_workspace)?;
    objects.insert(0, main);
    Ok((objects, compiled))
}

/// Byte offsets of `abi::Hyper`'s fields (six f32, then the u64 step).
const HYPER_STEP_OFFSET: i32 = 24;

/// The exported `symbol`: binds the graph function `graph_fn`'s inputs and outputs (the
/// `cnnc_infer` signature) to the entry's parameters, calls it, then copies the shadowed
/// state back from the workspace (at `shadow` + the tensor's state offset).
fn emit_entry<M: Module>(
    module: &mut M,
    symbol: &'static str,
    entry: &ResolvedEntry,
    layout: &StateLayout,
    graph_fn: FuncId,
    shadow: usize,
) -> Result<FuncId, CodegenError> {
    let call_conv = module.isa().default_call_conv();
    let mut signature = Signature::new(call_conv);
    for _ in entry.params {
        signature.params.push(AbiParam::new(I64));
    }
    signature.returns.push(AbiParam::new(I32));
    let id = module
        .declare_function(symbol, Linkage::Export, &signature)
        .map_err(|e| CodegenError(format!("{symbol}: {e}")))?;
    let mut ctx = module.make_context();
    let mut fb_ctx = FunctionBuilderContext::new();
    ctx.func.signature = signature;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb_ctx);
        let entry_block = b.create_block();
        b.append_block_params_for_function_params(entry_block);
        b.switch_to_block(entry_block);
        b.seal_block(entry_block);
        let values = b.block_params(entry_block).to_vec();
        let param = |p: EntryParam| entry.params.iter().position(|&q| q == p).map(|i| values[i]);
        let missing = |p: EntryParam| CodegenError(format!("internal: {symbol} has no {p:?} parameter"));
        let host = param(EntryParam::Host).ok_or_else(|| missing(EntryParam::Host))?;
        let state = param(EntryParam::State).ok_or_else(|| missing(EntryParam::State))?;
        let workspace = param(EntryParam::Workspace).ok_or_else(|| missing(EntryParam::Workspace))?;
        let ptr_flags = MemFlagsData::trusted().with_readonly();
        let in_slot = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            (8 * entry.inputs.len().max(1)) as u32,
            3,
        ));
        let out_slot = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            (8 * entry.outputs.len().max(1)) as u32,
            3,
        ));
        let step_slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 4, 2));

        for (at, (binding, index)) in entry.inputs.iter().enumerate() {
            let at = (8 * at) as i32;
            let addr = match (binding, index) {
                (InputBinding::State(_), Some(k)) => b.ins().iadd_imm_s(state, layout.tensors[*k].offset as i64),
                (InputBinding::Data(j), _) => {
                    let inputs = param(EntryParam::Inputs).ok_or_else(|| missing(EntryParam::Inputs))?;
                    b.ins().load(I64, ptr_flags, inputs, (8 * j) as i32)
                }
                (InputBinding::Labels, _) => param(EntryParam::Labels).ok_or_else(|| missing(EntryParam::Labels))?,
                (InputBinding::Hyper(k), _) if *k == HYPER_INPUTS - 1 => {
                    // The graph reads the step as f32 (exact up to 2^24 steps).
                    let hyper = param(EntryParam::Hyper).ok_or_else(|| missing(EntryParam::Hyper))?;
                    let step = b.ins().load(I64, ptr_flags, hyper, HYPER_STEP_OFFSET);
                    let step_f32 = b.ins().fcvt_from_uint(F32, step);
                    b.ins().stack_store(I64, step_f32, step_slot, 0);
                    b.ins().stack_addr(I64, step_slot, 0)
                }
                (InputBinding::Hyper(k), _) => {
                    let hyper = param(EntryParam::Hyper).ok_or_else(|| missing(EntryParam::Hyper))?;
                    b.ins().iadd_imm_s(hyper, (4 * k) as i64)
                }
                (InputBinding::State(name), None) => {
                    return Err(CodegenError(format!("internal: state tensor '{name}' unresolved")));
                }
            };
            b.ins().stack_store(I64, addr, in_slot, at);
        }
        for (at, output) in entry.outputs.iter().enumerate() {
            let addr = match *output {
                None => param(EntryParam::Loss).ok_or_else(|| missing(EntryParam::Loss))?,
                Some((k, true)) => b.ins().iadd_imm_s(workspace, (shadow as u64 + layout.tensors[k].offset) as i64),
                Some((k, false)) => b.ins().iadd_imm_s(state, layout.tensors[k].offset as i64),
            };
            b.ins().stack_store(I64, addr, out_slot, (8 * at) as i32);
        }

        let in_addr = b.ins().stack_addr(I64, in_slot, 0);
        let out_addr = b.ins().stack_addr(I64, out_slot, 0);
        let fref = module.declare_func_in_func(graph_fn, b.func);
        let call = b.ins().call(fref, &[host, in_addr, out_addr, workspace]);
        let status = b.inst_results(call)[0];
        let failed = b.create_block();
        let copy_back = b.create_block();
        b.ins().brif(status, failed, &[], copy_back, &[]);

        b.switch_to_block(failed);
        b.seal_block(failed);
        b.ins().return_(&[status]);

        b.switch_to_block(copy_back);
        b.seal_block(copy_back);
        for (start, end) in shadow_runs(entry, layout) {
            let dst = b.ins().iadd_imm_s(state, start as i64);
            let src = b.ins().iadd_imm_s(workspace, (shadow + start) as i64);
            crate::kernels::movement::copy_bytes(&mut b, dst, src, end - start, MemFlagsData::trusted());
        }
        let ok = b.ins().iconst(I32, abi::STATUS_OK as i64);
        b.ins().return_(&[ok]);
        b.finalize(module.target_config());
    }
    define(module, id, &mut ctx, symbol)?;
    Ok(id)
}

/// Byte ranges of the state buffer to copy back from the shadow: the shadowed tensors,
/// neighbours in the layout merged into one run (the padding between them goes along).
fn shadow_runs(entry: &ResolvedEntry, layout: &StateLayout) -> Vec<(usize, usize)> {
    let mut shadowed: Vec<usize> = entry.outputs.iter().flatten().filter(|(_, s)| *s).map(|&(k, _)| k).collect();
    shadowed.sort_unstable();
    shadowed.dedup();
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for k in shadowed {
        let t = &layout.tensors[k];
        let (start, end) = (t.offset as usize, t.offset as usize + t.ty.byte_size());
        match runs.last_mut() {
            Some((_, last_end, last_k)) if *last_k + 1 == k => {
                *last_end = end;
                *last_k = k;
            }
            _ => runs.push((start, end, k)),
        }
    }
    runs.into_iter().map(|(start, end, _)| (start, end)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{BinaryFn, DType, Op, TensorType};

    /// A toy "training graph": state w [3], data x [3], labels, hyper; outputs w', loss, grad.
    fn toy() -> Graph {
        let mut g = Graph::new("toy");
        let w = g.add_input(TensorType::f32(vec![3]), "w");
        let x = g.add_input(TensorType::f32(vec![3]), "x");
        g.add_input(TensorType::new(DType::I64, vec![1]), "labels");
        let hyper: Vec<_> =
            (0..HYPER_INPUTS).map(|k| g.add_input(TensorType::f32(Vec::<usize>::new()), format!("h{k}"))).collect();
        let scaled = g.push1("scaled", Op::Binary(BinaryFn::Mul), &[hyper[0], x]).unwrap();
        let w_new = g.push1("w_new", Op::Binary(BinaryFn::Sub), &[w, scaled]).unwrap();
        let loss = g.push1("loss", Op::Reduce { kind: cnnc_ir::ReduceKind::Sum, axes: vec![0] }, &[w]).unwrap();
        let loss = g.push_typed("loss0", Op::Reshape, &[loss], TensorType::f32(Vec::<usize>::new())).unwrap();
        g.outputs = vec![w_new, loss, x];
        g
    }

    #[test]
    fn layout_places_state_then_gradients_aligned() {
        let layout = StateLayout::of(&toy(), &TrainSignature { num_state: 1, num_data: 1 }).unwrap();
        let names: Vec<&str> = layout.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["w", "w.grad"]);
        assert_eq!(layout.tensors[0].offset, 0);
        assert_eq!(layout.tensors[1].offset, WORKSPACE_ALIGN as u64);
        assert_eq!(layout.state_bytes, 12);
        assert_eq!(layout.size, 2 * WORKSPACE_ALIGN);
    }

    #[test]
    fn signatures_that_do_not_fit_the_graph_are_refused() {
        let g = toy();
        let err = StateLayout::of(&g, &TrainSignature { num_state: 2, num_data: 1 }).unwrap_err();
        assert!(err.0.contains("needs 11 inputs"), "{err}");
        let mut wrong_hyper = g.clone();
        let last = *wrong_hyper.inputs.last().unwrap();
        wrong_hyper.values[last.index()].ty = TensorType::f32(vec![2]);
        let err = StateLayout::of(&wrong_hyper, &TrainSignature { num_state: 1, num_data: 1 }).unwrap_err();
        assert!(err.0.contains("must be an f32 scalar"), "{err}");
    }
}
