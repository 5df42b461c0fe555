//! The training entry point of the C ABI (`runtime/src/abi.rs`) around a fused training
//! graph (`cnnc::train::fused`), compiled as an ordinary graph by `compile_graph`:
//!
//! - graph inputs: `num_state` state tensors, `num_data` data inputs, the labels, then the
//!   seven f32 hyper-parameter scalars (the fields of `cnnc_hyper`, `step` as f32);
//! - graph outputs: the new value of every state tensor, the loss, then one gradient per
//!   trained parameter.
//!
//! `cnnc_train_step(host, state, inputs, labels, hyper, workspace, loss) -> i32` points the
//! state inputs into the caller's state buffer, writes the new state into a shadow copy in
//! the workspace (after the memory plan's part), the gradients into their slots of the
//! state buffer and the loss to `*loss`, runs `cnnc_infer`, then copies the shadow back:
//! the graph never reads and writes the same memory.
//!
//! State buffer layout: the state tensors in graph order, then the gradients, each at a
//! 64-byte aligned offset; `cnnc_model_info` lists them all (names: the graph values'
//! names, gradients "<parameter>.grad").

use cnnc_ir::Graph;
use cnnc_runtime::abi;
use cranelift_codegen::ir::types::{F32, I32, I64};
use cranelift_codegen::ir::{AbiParam, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, UserFuncName};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};
use cranelift_object::{ObjectBuilder, ObjectModule};

use crate::kernels::CodegenError;
use crate::module::{CompiledInfo, ModelExtras, StateTensorDesc, compile_graph_with_extras, define, extra_workspace_offset};
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
        return Err(CodegenError(format!("a training graph needs the new state and the loss as outputs, this one has {}", g.outputs.len())));
    }
    let grads = g.outputs.len() - sig.num_state - 1;
    if grads > sig.num_state {
        return Err(CodegenError(format!("a training graph with {} state tensor(s) has {grads} gradients", sig.num_state)));
    }
    for (k, (&input, &output)) in g.inputs.iter().zip(&g.outputs).take(sig.num_state).enumerate() {
        if g.ty(input) != g.ty(output) {
            return Err(CodegenError(format!("state tensor {k}: input {} and new value {} differ in type", g.ty(input), g.ty(output))));
        }
    }
    for (k, (&param, &grad)) in g.inputs.iter().zip(&g.outputs[sig.num_state + 1..]).enumerate() {
        if g.ty(param) != g.ty(grad) {
            return Err(CodegenError(format!("gradient {k}: parameter {} and gradient {} differ in type", g.ty(param), g.ty(grad))));
        }
    }
    for &h in &g.inputs[sig.num_state + sig.num_data + 1..] {
        if *g.ty(h) != cnnc_ir::TensorType::f32(Vec::<usize>::new()) {
            return Err(CodegenError(format!("hyper-parameter input '{}' must be an f32 scalar, is {}", g.value(h).name, g.ty(h))));
        }
    }
    Ok(())
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
pub fn compile_train_graph<M: Module>(module: &mut M, g: &Graph, target: &TargetSpec, sig: &TrainSignature) -> Result<CompiledTrain, CodegenError> {
    let layout = StateLayout::of(g, sig)?;
    let extras = ModelExtras {
        entry_flags: abi::ENTRY_TRAIN,
        extra_workspace: layout.state_bytes,
        state_size: layout.size as u64,
        state_tensors: layout.tensors.clone(),
    };
    let graph = compile_graph_with_extras(module, g, target, &extras)?;
    let shadow = extra_workspace_offset(&graph.plan);
    let train_step = emit_train_step(module, g, sig, &layout, graph.infer, shadow)?;
    Ok(CompiledTrain { graph, train_step, layout })
}

/// `compile_train_graph` into the bytes of a PIC object file.
pub fn compile_train_object(g: &Graph, target: &TargetSpec, sig: &TrainSignature) -> Result<(Vec<u8>, CompiledTrain), CodegenError> {
    let isa = target.isa(true)?;
    let name = if g.name.is_empty() { "cnnc_model".to_string() } else { g.name.clone() };
    let builder = ObjectBuilder::new(isa, name, cranelift_module::default_libcall_names())
        .map_err(|e| CodegenError(format!("cannot create an object file for {}: {e}", target.triple)))?;
    let mut module = ObjectModule::new(builder);
    let compiled = compile_train_graph(&mut module, g, target, sig)?;
    let bytes = module.finish().emit().map_err(|e| CodegenError(format!("cannot write the object file: {e}")))?;
    Ok((bytes, compiled))
}

/// Byte offsets of `abi::Hyper`'s fields (six f32, then the u64 step).
const HYPER_STEP_OFFSET: i32 = 24;

fn emit_train_step<M: Module>(
    module: &mut M,
    g: &Graph,
    sig: &TrainSignature,
    layout: &StateLayout,
    infer: FuncId,
    shadow: usize,
) -> Result<FuncId, CodegenError> {
    let call_conv = module.isa().default_call_conv();
    let mut sig_train = Signature::new(call_conv);
    for _ in 0..7 {
        sig_train.params.push(AbiParam::new(I64));
    }
    sig_train.returns.push(AbiParam::new(I32));
    let id = module
        .declare_function(abi::SYM_TRAIN_STEP, Linkage::Export, &sig_train)
        .map_err(|e| CodegenError(format!("{}: {e}", abi::SYM_TRAIN_STEP)))?;
    let mut ctx = module.make_context();
    let mut fb_ctx = FunctionBuilderContext::new();
    ctx.func.signature = sig_train;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let p = b.block_params(entry).to_vec();
        let [host, state, inputs, labels, hyper, workspace, loss] = p[..] else {
            return Err(CodegenError("internal: cnnc_train_step parameters".into()));
        };
        let ptr_flags = MemFlagsData::trusted().with_readonly();
        let in_slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (8 * g.inputs.len().max(1)) as u32, 3));
        let out_slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, (8 * g.outputs.len().max(1)) as u32, 3));
        let step_slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, 4, 2));

        let mut at = 0i32;
        for t in &layout.tensors[..sig.num_state] {
            let addr = b.ins().iadd_imm_s(state, t.offset as i64);
            b.ins().stack_store(I64, addr, in_slot, at);
            at += 8;
        }
        for j in 0..sig.num_data {
            let addr = b.ins().load(I64, ptr_flags, inputs, (8 * j) as i32);
            b.ins().stack_store(I64, addr, in_slot, at);
            at += 8;
        }
        b.ins().stack_store(I64, labels, in_slot, at);
        at += 8;
        for h in 0..HYPER_INPUTS - 1 {
            let addr = b.ins().iadd_imm_s(hyper, (4 * h) as i64);
            b.ins().stack_store(I64, addr, in_slot, at);
            at += 8;
        }
        // The graph reads the step as f32 (exact up to 2^24 steps).
        let step = b.ins().load(I64, ptr_flags, hyper, HYPER_STEP_OFFSET);
        let step_f32 = b.ins().fcvt_from_uint(F32, step);
        b.ins().stack_store(I64, step_f32, step_slot, 0);
        let step_addr = b.ins().stack_addr(I64, step_slot, 0);
        b.ins().stack_store(I64, step_addr, in_slot, at);

        let mut at = 0i32;
        for t in &layout.tensors[..sig.num_state] {
            let addr = b.ins().iadd_imm_s(workspace, (shadow as u64 + t.offset) as i64);
            b.ins().stack_store(I64, addr, out_slot, at);
            at += 8;
        }
        b.ins().stack_store(I64, loss, out_slot, at);
        at += 8;
        for t in &layout.tensors[sig.num_state..] {
            let addr = b.ins().iadd_imm_s(state, t.offset as i64);
            b.ins().stack_store(I64, addr, out_slot, at);
            at += 8;
        }

        let in_addr = b.ins().stack_addr(I64, in_slot, 0);
        let out_addr = b.ins().stack_addr(I64, out_slot, 0);
        let fref = module.declare_func_in_func(infer, b.func);
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
        let shadow_addr = b.ins().iadd_imm_s(workspace, shadow as i64);
        crate::kernels::movement::copy_bytes(&mut b, state, shadow_addr, layout.state_bytes, MemFlagsData::trusted());
        let ok = b.ins().iconst(I32, abi::STATUS_OK as i64);
        b.ins().return_(&[ok]);
        b.finalize(module.target_config());
    }
    define(module, id, &mut ctx, abi::SYM_TRAIN_STEP)?;
    Ok(id)
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
        let hyper: Vec<_> = (0..HYPER_INPUTS).map(|k| g.add_input(TensorType::f32(Vec::<usize>::new()), format!("h{k}"))).collect();
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
