//! A whole graph as one Cranelift module: a local function per node kernel, constants
//! as read-only data, and the two exported symbols of the C ABI (`runtime/src/abi.rs`):
//!
//! - `cnnc_infer(host, inputs, outputs, workspace) -> i32` calls the kernels in node
//!   order, then fills the outputs that are copies (see `plan.rs`), and returns 0.
//! - `cnnc_model_info() -> *const ModelInfo` returns a data object laid out exactly as
//!   `abi::ModelInfo`, whose strings, shapes and tensor descriptors are further data
//!   objects linked by relocations.
//!
//! Every kernel has the signature `fn(host: *const Host, buffers: *const *mut u8)`
//! where `buffers` lists the node's input then output addresses, then the node's
//! scratch memory if the plan gave it some; the entry point builds that array in a
//! stack slot. Kernels that split their work (convolutions run as GEMM,
//! `kernels::conv_gemm`) hand tasks to `host->parallel_for`.
//!
//! On x86-64, GEMM tasks and blocked convolution tasks run with flush-to-zero and
//! denormals-are-zero and restore the MXCSR they found (`kernels::parallel`); the rest of
//! `cnnc_infer` leaves it alone.

use cnnc_ir::{ConstValue, Graph, Op};
use cnnc_runtime::abi;
use cranelift_codegen::Context;
use cranelift_codegen::ir::types::{I32, I64};
use cranelift_codegen::ir::{
    AbiParam, Function, InstBuilder, MemFlagsData, Signature, StackSlotData, StackSlotKind, UserFuncName, Value,
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{DataDescription, DataId, FuncId, Linkage, Module};

use crate::kernels::channel_split;
use crate::kernels::conv_gemm::{self, ConvGemmPlan, GemmEnv};
use crate::kernels::gemv::{self, GemvPlan};
use crate::kernels::parallel::FloatEnv;
use crate::kernels::{self, CodegenError, KernelCtx};
use crate::microkernel::{self, GemmKernelKind};
use crate::plan::{Location, MemoryPlan, WORKSPACE_ALIGN};
use crate::target::TargetSpec;

/// What `compile_graph` declared and decided.
#[derive(Clone, Debug)]
pub struct CompiledInfo {
    pub infer: FuncId,
    pub model_info: FuncId,
    pub plan: MemoryPlan,
    pub workspace_size: usize,
    /// Kernel functions emitted (one per node that runs code).
    pub kernels: usize,
    /// Convolutions run as GEMM on the microkernel (the others use the direct kernel).
    pub gemm_convs: usize,
    /// Of those, the ones run by Winograd's F(2x2, 3x3).
    pub winograd_convs: usize,
    /// Channel-separable nodes split into per-chunk tasks (`kernels::channel_split`).
    pub split_nodes: usize,
}

fn module_err(what: &str) -> impl Fn(cranelift_module::ModuleError) -> CodegenError + '_ {
    move |e| CodegenError(format!("{what}: {e}"))
}

fn dtype_code(d: cnnc_ir::DType) -> u32 {
    match d {
        cnnc_ir::DType::F32 => abi::DTYPE_F32,
        cnnc_ir::DType::I32 => abi::DTYPE_I32,
        cnnc_ir::DType::I64 => abi::DTYPE_I64,
        cnnc_ir::DType::Bool => abi::DTYPE_BOOL,
    }
}

/// What a module with more entry points than `cnnc_infer` adds to `cnnc_model_info`
/// (training: `train_entry.rs`).
#[derive(Clone, Debug, Default)]
pub struct ModelExtras {
    /// ENTRY_* bits besides ENTRY_INFER.
    pub entry_flags: u64,
    /// Bytes the extra entry points use after the memory plan's workspace (at
    /// `extra_workspace_offset(plan)`).
    pub extra_workspace: usize,
    pub state_size: u64,
    pub state_tensors: Vec<StateTensorDesc>,
    /// The workspace size reported is at least this: entry points compiled from other
    /// graphs (`compile_graph_entry`, linked into the same library) share the workspace.
    pub min_workspace: usize,
}

/// One tensor of the training state buffer.
#[derive(Clone, Debug)]
pub struct StateTensorDesc {
    pub name: String,
    pub ty: cnnc_ir::TensorType,
    /// Byte offset in the state buffer.
    pub offset: u64,
}

/// Where `ModelExtras::extra_workspace` starts in the workspace.
pub fn extra_workspace_offset(plan: &MemoryPlan) -> usize {
    plan.workspace_size.next_multiple_of(WORKSPACE_ALIGN)
}

/// Compiles `g` into `module`; the caller finishes the module (object file or JIT).
pub fn compile_graph<M: Module>(module: &mut M, g: &Graph, target: &TargetSpec) -> Result<CompiledInfo, CodegenError> {
    compile_graph_with_extras(module, g, target, &ModelExtras::default())
}

/// `compile_graph`, with `extras` described in `cnnc_model_info`.
pub fn compile_graph_with_extras<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    extras: &ModelExtras,
) -> Result<CompiledInfo, CodegenError> {
    let (compiled, model_info) = compile_graph_as(module, g, target, abi::SYM_INFER, Linkage::Export, Some(extras))?;
    let model_info = model_info.ok_or_else(|| CodegenError("internal: no cnnc_model_info".into()))?;
    Ok(CompiledInfo { model_info, ..compiled })
}

/// A graph compiled as a local function named `symbol` with `cnnc_infer`'s signature and
/// contract, and no `cnnc_model_info`: for a further entry point of a library whose
/// metadata another graph's module defines (training: `train_entry.rs`). Each graph goes
/// into its own module (kernel and data names repeat between graphs); the objects are
/// linked together. `CompiledInfo::model_info` is the entry itself.
pub fn compile_graph_entry<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    symbol: &str,
) -> Result<CompiledInfo, CodegenError> {
    let (compiled, _) = compile_graph_as(module, g, target, symbol, Linkage::Local, None)?;
    Ok(compiled)
}

/// Cranelift compiles the functions on several threads (`parallel_compile`).
fn compile_graph_as<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    symbol: &str,
    linkage: Linkage,
    extras: Option<&ModelExtras>,
) -> Result<(CompiledInfo, Option<FuncId>), CodegenError> {
    crate::parallel_compile::with_parallel_compile(module, target, |module| {
        compile_graph_functions(module, g, target, symbol, linkage, extras)
    })
}

fn compile_graph_functions<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    symbol: &str,
    linkage: Linkage,
    extras: Option<&ModelExtras>,
) -> Result<(CompiledInfo, Option<FuncId>), CodegenError> {
    if module.target_config().pointer_type() != I64 {
        return Err(CodegenError("cnnc generates code for 64-bit targets only".into()));
    }
    let _fused = crate::math::FusedMultiplyAdd::for_isa(module.isa());
    let _activations = microkernel::activation::ActivationFunctions::define_for_graph(module, target, g)?;
    let _transposed_convs = microkernel::conv_transpose_x86::TransposedConvFunctions::define_for_graph(module, target, g)?;
    let _pointwise_weight_grads = microkernel::pointwise_weight_grad_x86::PointwiseWeightGradFunctions::define_for_graph(module, target, g)?;
    let _weight_grads = microkernel::conv_weight_grad_x86::WeightGradFunctions::define_for_graph(module, target, g)?;
    let _row_convs = microkernel::conv_rows_x86::RowConvFunctions::define_for_graph(module, target, g)?;
    let gemm_tile = GemmKernelKind::for_target(target).tile(target);
    let gemm_plans: Vec<Option<ConvGemmPlan>> = g.nodes.iter().map(|n| conv_gemm::plan(g, n, gemm_tile)).collect();
    let gemv_plans: Vec<Option<GemvPlan>> = g.nodes.iter().map(|n| gemv::plan(g, n)).collect();
    let scratch: Vec<usize> = gemm_plans
        .iter()
        .map(|p| p.as_ref().map_or(0, ConvGemmPlan::scratch_bytes))
        .collect();
    let plan = MemoryPlan::with_scratch(g, &scratch).map_err(|e| CodegenError(format!("memory plan: {e}")))?;
    let call_conv = module.isa().default_call_conv();
    // GEMM tasks and blocked convolutions run with denormals flushed.
    let blocked_convs = g
        .nodes
        .iter()
        .any(|n| matches!(n.op, cnnc_ir::Op::Conv(_)) && n.schedule.layout_out != cnnc_ir::Layout::Plain);
    let float_env = if gemm_plans.iter().any(Option::is_some) || blocked_convs {
        FloatEnv::define(module, target)?
    } else {
        None
    };
    let gemm_env = if gemm_plans.iter().any(Option::is_some) {
        let kernel = microkernel::define_gemm_kernel(module, target)?;
        if (kernel.mr, kernel.nr) != gemm_tile {
            return Err(CodegenError(format!(
                "internal: GEMM microkernel is {}x{}, convolutions were planned for {}x{}",
                kernel.mr, kernel.nr, gemm_tile.0, gemm_tile.1
            )));
        }
        Some(GemmEnv { kernel, float_env })
    } else {
        None
    };

    // Constants referenced by Constant nodes with dense data, except those read only as
    // the weights of GEMM convolutions, which keep their own packed copy (the kernel is
    // passed a null address for them and never reads it).
    let mut read = vec![false; g.values.len()];
    for (ni, node) in g.nodes.iter().enumerate() {
        // Blocked depthwise convolutions keep their own re-laid-out weights too.
        let blocked_depthwise = matches!(kernels::depthwise_blocked::plan(g, node, target), Ok(Some(_)))
            || kernels::conv_blocked::packs_weights(g, node, target);
        for (i, &v) in node.inputs.iter().enumerate() {
            let packed_weight =
                i == 1 && (gemm_plans[ni].is_some() || gemv_plans[ni].is_some() || blocked_depthwise);
            if !packed_weight && let Some(r) = read.get_mut(v.index()) {
                *r = true;
            }
        }
    }
    for &v in &g.outputs {
        if let Some(r) = read.get_mut(v.index()) {
            *r = true;
        }
    }
    let mut const_data: Vec<Option<DataId>> = vec![None; g.constants.len()];
    for node in &g.nodes {
        let Op::Constant(c) = node.op else { continue };
        if !node
            .outputs
            .iter()
            .any(|v| read.get(v.index()).copied().unwrap_or(true))
        {
            continue;
        }
        let Some(constant) = g.constants.get(c.index()) else {
            return Err(CodegenError(format!("node '{}' names missing constant {c}", node.name)));
        };
        let ConstValue::Dense(data) = &constant.value else {
            continue;
        };
        if const_data[c.index()].is_some() || data.is_empty() {
            continue;
        }
        if data.len() != constant.ty.numel() || data.dtype() != constant.ty.dtype {
            return Err(CodegenError(format!(
                "constant '{}' holds {} {} values for {}",
                constant.name,
                data.len(),
                data.dtype(),
                constant.ty
            )));
        }
        let id = define_bytes(module, &format!("cnnc_const{}", c.index()), data.to_le_bytes())?;
        const_data[c.index()] = Some(id);
    }

    let mut kernel_sig = Signature::new(call_conv);
    kernel_sig.params.push(AbiParam::new(I64));
    kernel_sig.params.push(AbiParam::new(I64));

    let mut ctx = module.make_context();
    let mut fb_ctx = FunctionBuilderContext::new();
    let mut kernels_of_nodes: Vec<Option<FuncId>> = vec![None; g.nodes.len()];
    let mut split_nodes = 0;
    for (ni, node) in g.nodes.iter().enumerate() {
        if !kernels::needs_kernel(g, node) || plan.is_alias(g, node) {
            continue;
        }
        if let (Some(gemm_plan), Some(env)) = (&gemm_plans[ni], &gemm_env) {
            kernels::check_node(g, node)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            let id = conv_gemm::define_node(module, env, g, node, ni, gemm_plan, &kernel_sig, &mut ctx, &mut fb_ctx)?;
            kernels_of_nodes[ni] = Some(id);
            continue;
        }
        if let Some(gemv_plan) = &gemv_plans[ni] {
            kernels::check_node(g, node)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            let id = gemv::define_node(module, g, node, ni, gemv_plan, &kernel_sig, &mut ctx, &mut fb_ctx)?;
            kernels_of_nodes[ni] = Some(id);
            continue;
        }
        if let Some(blocked) = kernels::depthwise_blocked::plan(g, node, target)? {
            kernels::check_node(g, node)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            let id = kernels::depthwise_blocked::define_node(
                module,
                g,
                node,
                ni,
                &blocked,
                float_env,
                &kernel_sig,
                &mut ctx,
                &mut fb_ctx,
            )?;
            kernels_of_nodes[ni] = Some(id);
            continue;
        }
        if let Some(blocked) = kernels::conv_blocked::plan(g, node, target)? {
            kernels::check_node(g, node)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            let id = kernels::conv_blocked::define_node(module, g, node, ni, &blocked, float_env, &kernel_sig, &mut ctx, &mut fb_ctx)?;
            kernels_of_nodes[ni] = Some(id);
            continue;
        }
        if let Some(split) = channel_split::plan(g, node) {
            kernels::check_node(g, node)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            let id = channel_split::define_node(module, node, ni, &split, &kernel_sig, &mut ctx, &mut fb_ctx)?;
            kernels_of_nodes[ni] = Some(id);
            split_nodes += 1;
            continue;
        }
        let name = format!("cnnc_k{ni}_{}", node.op.mnemonic());
        let id = module
            .declare_function(&name, Linkage::Local, &kernel_sig)
            .map_err(module_err(&name))?;
        let table_ids = kernels::node_tables(g, node)
            .into_iter()
            .enumerate()
            .map(|(t, bytes)| define_bytes(module, &format!("cnnc_t{ni}_{t}"), bytes))
            .collect::<Result<Vec<_>, _>>()?;
        module.clear_context(&mut ctx);
        ctx.func.signature = kernel_sig.clone();
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        {
            let mut b = FunctionBuilder::new(&mut ctx.func, &mut fb_ctx);
            let entry = b.create_block();
            b.append_block_params_for_function_params(entry);
            b.switch_to_block(entry);
            b.seal_block(entry);
            let bufs = b.block_params(entry)[1];
            let flags = MemFlagsData::trusted().with_readonly().with_can_move();
            let mut ptrs = Vec::new();
            for i in 0..node.inputs.len() + node.outputs.len() {
                ptrs.push(b.ins().load(I64, flags, bufs, (8 * i) as i32));
            }
            let outputs = ptrs.split_off(node.inputs.len());
            let mut tables = Vec::new();
            for &t in &table_ids {
                let gv = module.declare_data_in_func(t, b.func);
                tables.push(b.ins().symbol_value(I64, gv));
            }
            let mut k = KernelCtx {
                b: &mut b,
                graph: g,
                node,
                inputs: ptrs,
                outputs,
            };
            kernels::emit_node(&mut k, &tables)
                .map_err(|e| CodegenError(format!("node '{}' ({}): {e}", node.name, node.op.mnemonic())))?;
            b.ins().return_(&[]);
            b.finalize(module.target_config());
        }
        define(
            module,
            id,
            &mut ctx,
            &format!("kernel of node '{}' ({})", node.name, node.op.mnemonic()),
        )?;
        kernels_of_nodes[ni] = Some(id);
    }

    let infer = emit_infer(
        module,
        (symbol, linkage),
        g,
        &plan,
        &const_data,
        &kernels_of_nodes,
        &kernel_sig,
        &mut ctx,
        &mut fb_ctx,
    )?;
    let model_info = match extras {
        Some(extras) => {
            let info_data = emit_model_info_data(module, g, target, &plan, extras)?;
            Some(emit_model_info_fn(module, info_data, &mut ctx, &mut fb_ctx)?)
        }
        None => None,
    };
    let kernels = kernels_of_nodes.iter().flatten().count();
    let compiled = CompiledInfo {
        infer,
        model_info: model_info.unwrap_or(infer),
        workspace_size: plan.workspace_size,
        plan,
        kernels,
        gemm_convs: gemm_plans.iter().flatten().count(),
        winograd_convs: gemm_plans.iter().flatten().filter(|p| p.winograd.is_some()).count(),
        split_nodes,
    };
    Ok((compiled, model_info))
}

/// Defines function `id` from `ctx` (verifying it first in debug builds); `what` names
/// it in errors and in `CNNC_DISASM` output.
pub(crate) fn define<M: Module>(module: &mut M, id: FuncId, ctx: &mut Context, what: &str) -> Result<(), CodegenError> {
    if cfg!(debug_assertions)
        && let Err(errors) = cranelift_codegen::verify_function(&ctx.func, module.isa())
    {
        let pretty = cranelift_codegen::print_errors::pretty_verifier_error(&ctx.func, None, errors);
        return Err(CodegenError(format!(
            "{what}: invalid IR (a code generator bug):\n{pretty}"
        )));
    }
    // CNNC_DISASM=1 prints every function's machine code (for kernel tuning).
    let disasm = std::env::var_os("CNNC_DISASM").is_some();
    ctx.set_disasm(disasm);
    let result = module.define_function(id, ctx);
    if disasm && let Some(code) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
        eprintln!("; {what}\n{code}");
    }
    result.map_err(|e| match e {
        cranelift_module::ModuleError::Compilation(inner) => CodegenError(format!(
            "{what}: {}",
            cranelift_codegen::print_errors::pretty_error(&ctx.func, inner)
        )),
        other => CodegenError(format!("{what}: {other}")),
    })
}

/// A local read-only data object holding `bytes`, 64-byte aligned.
/// Declares `name` as a local function with `sig`, builds its body with
/// `body(builder, module, entry block parameters)`, adds the return and defines it; `what`
/// names it in errors.
pub(crate) fn define_local<M: Module>(
    module: &mut M,
    name: &str,
    sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
    what: &str,
    body: impl FnOnce(&mut FunctionBuilder, &mut M, &[Value]) -> Result<(), CodegenError>,
) -> Result<FuncId, CodegenError> {
    let id = module.declare_function(name, Linkage::Local, sig).map_err(module_err(name))?;
    module.clear_context(ctx);
    ctx.func.signature = sig.clone();
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fb_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let params = b.block_params(entry).to_vec();
        body(&mut b, module, &params).map_err(|e| CodegenError(format!("{what}: {e}")))?;
        b.ins().return_(&[]);
        b.finalize(module.target_config());
    }
    define(module, id, ctx, what)?;
    Ok(id)
}

pub(crate) fn define_bytes<M: Module>(module: &mut M, name: &str, bytes: Vec<u8>) -> Result<DataId, CodegenError> {
    let id = module
        .declare_data(name, Linkage::Local, false, false)
        .map_err(module_err(name))?;
    let mut d = DataDescription::new();
    d.define(bytes.into_boxed_slice());
    d.set_align(WORKSPACE_ALIGN as u64);
    module.define_data(id, &d).map_err(module_err(name))?;
    Ok(id)
}

/// The address of a value during a call.
fn location_addr<M: Module>(
    module: &M,
    b: &mut FunctionBuilder,
    loc: Location,
    params: &[Value; 4],
    const_data: &[Option<DataId>],
) -> Value {
    let [_, inputs, outputs, workspace] = *params;
    let flags = MemFlagsData::trusted().with_readonly().with_can_move();
    match loc {
        Location::Input(i) => b.ins().load(I64, flags, inputs, (8 * i) as i32),
        Location::Output(j) => b.ins().load(I64, flags, outputs, (8 * j) as i32),
        Location::Workspace(off) => b.ins().iadd_imm_s(workspace, off as i64),
        Location::Constant(c) => match const_data.get(c).copied().flatten() {
            Some(id) => {
                let gv = module.declare_data_in_func(id, b.func);
                b.ins().symbol_value(I64, gv)
            }
            // An empty constant: nothing is ever read through the address.
            None => b.ins().iconst(I64, 0),
        },
    }
}

#[allow(clippy::too_many_arguments)]
fn emit_infer<M: Module>(
    module: &mut M,
    (symbol, linkage): (&str, Linkage),
    g: &Graph,
    plan: &MemoryPlan,
    const_data: &[Option<DataId>],
    kernels_of_nodes: &[Option<FuncId>],
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let call_conv = kernel_sig.call_conv;
    let mut sig = Signature::new(call_conv);
    for _ in 0..4 {
        sig.params.push(AbiParam::new(I64));
    }
    sig.returns.push(AbiParam::new(I32));
    let id = module
        .declare_function(symbol, linkage, &sig)
        .map_err(module_err(symbol))?;
    module.clear_context(ctx);
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fb_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let p = b.block_params(entry);
        let params = [p[0], p[1], p[2], p[3]];
        // Inputs, outputs and one scratch pointer.
        let max_buffers = g
            .nodes
            .iter()
            .map(|n| n.inputs.len() + n.outputs.len() + 1)
            .max()
            .unwrap_or(0)
            .max(1);
        let slot = b.create_sized_stack_slot(StackSlotData::new(
            StackSlotKind::ExplicitSlot,
            (8 * max_buffers) as u32,
            3,
        ));
        for (ni, node) in g.nodes.iter().enumerate() {
            let Some(kernel) = kernels_of_nodes[ni] else { continue };
            for (i, &v) in node.inputs.iter().chain(&node.outputs).enumerate() {
                let loc = plan
                    .location(v)
                    .ok_or_else(|| CodegenError(format!("node '{}': value {v} has no storage", node.name)))?;
                let addr = location_addr(module, &mut b, loc, &params, const_data);
                b.ins().stack_store(I64, addr, slot, (8 * i) as i32);
            }
            if let Some(offset) = plan.scratch.get(ni).copied().flatten() {
                let at = node.inputs.len() + node.outputs.len();
                let addr = location_addr(module, &mut b, Location::Workspace(offset), &params, const_data);
                b.ins().stack_store(I64, addr, slot, (8 * at) as i32);
            }
            let bufs = b.ins().stack_addr(I64, slot, 0);
            let fref = module.declare_func_in_func(kernel, b.func);
            b.ins().call(fref, &[params[0], bufs]);
        }
        for copy in &plan.output_copies {
            if copy.bytes == 0 {
                continue;
            }
            let dst = location_addr(module, &mut b, Location::Output(copy.output), &params, const_data);
            let src = location_addr(module, &mut b, copy.from, &params, const_data);
            kernels::movement::copy_bytes(&mut b, dst, src, copy.bytes, MemFlagsData::trusted());
        }
        let ok = b.ins().iconst(I32, abi::STATUS_OK as i64);
        b.ins().return_(&[ok]);
        b.finalize(module.target_config());
    }
    define(module, id, ctx, symbol)?;
    Ok(id)
}

/// Builds the `ModelInfo` data object and everything it points to.
fn emit_model_info_data<M: Module>(
    module: &mut M,
    g: &Graph,
    target: &TargetSpec,
    plan: &MemoryPlan,
    extras: &ModelExtras,
) -> Result<DataId, CodegenError> {
    let mut counter = 0usize;
    let mut next_name = |what: &str| {
        counter += 1;
        format!("cnnc_info_{what}{counter}")
    };
    let cstring = |module: &mut M, name: String, s: &str| -> Result<DataId, CodegenError> {
        let mut bytes: Vec<u8> = s.bytes().filter(|&c| c != 0).collect();
        bytes.push(0);
        let id = module
            .declare_data(&name, Linkage::Local, false, false)
            .map_err(module_err(&name))?;
        let mut d = DataDescription::new();
        d.define(bytes.into_boxed_slice());
        module.define_data(id, &d).map_err(module_err(&name))?;
        Ok(id)
    };

    // Tensor descriptor arrays for inputs and outputs.
    let mut desc_arrays = Vec::new();
    for (kind, values) in [("in", &g.inputs), ("out", &g.outputs)] {
        if values.is_empty() {
            desc_arrays.push(None);
            continue;
        }
        let mut relocs: Vec<(usize, DataId)> = Vec::new();
        let mut bytes = vec![0u8; values.len() * DESC_SIZE];
        for (i, &v) in values.iter().enumerate() {
            let value = g.value(v);
            let base = i * DESC_SIZE;
            let name_id = cstring(module, next_name(&format!("{kind}name")), &value.name)?;
            relocs.push((base + DESC_NAME, name_id));
            bytes[base + DESC_DTYPE..][..4].copy_from_slice(&dtype_code(value.ty.dtype).to_le_bytes());
            bytes[base + DESC_RANK..][..4].copy_from_slice(&(value.ty.rank() as u32).to_le_bytes());
            if value.ty.rank() > 0 {
                let shape: Vec<u8> = value.ty.shape.iter().flat_map(|&d| (d as u64).to_le_bytes()).collect();
                let shape_id = define_plain(module, &next_name(&format!("{kind}shape")), shape, 8)?;
                relocs.push((base + DESC_SHAPE, shape_id));
            }
        }
        let id = define_with_relocs(module, &next_name(&format!("{kind}desc")), bytes, &relocs)?;
        desc_arrays.push(Some(id));
    }
    let state_descs = if extras.state_tensors.is_empty() {
        None
    } else {
        let mut relocs: Vec<(usize, DataId)> = Vec::new();
        let mut bytes = vec![0u8; extras.state_tensors.len() * DESC_SIZE];
        for (i, t) in extras.state_tensors.iter().enumerate() {
            let base = i * DESC_SIZE;
            let name_id = cstring(module, next_name("statename"), &t.name)?;
            relocs.push((base + DESC_NAME, name_id));
            bytes[base + DESC_DTYPE..][..4].copy_from_slice(&dtype_code(t.ty.dtype).to_le_bytes());
            bytes[base + DESC_RANK..][..4].copy_from_slice(&(t.ty.rank() as u32).to_le_bytes());
            bytes[base + DESC_OFFSET..][..8].copy_from_slice(&t.offset.to_le_bytes());
            if t.ty.rank() > 0 {
                let shape: Vec<u8> = t.ty.shape.iter().flat_map(|&d| (d as u64).to_le_bytes()).collect();
                let shape_id = define_plain(module, &next_name("stateshape"), shape, 8)?;
                relocs.push((base + DESC_SHAPE, shape_id));
            }
        }
        Some(define_with_relocs(module, &next_name("statedesc"), bytes, &relocs)?)
    };

    let features = target.cpu_features().join(",");
    let target_id = cstring(module, next_name("target"), &target.triple.to_string())?;
    let features_id = cstring(module, next_name("features"), &features)?;
    let name_id = cstring(module, next_name("model"), &g.name)?;

    let mut bytes = vec![0u8; INFO_SIZE];
    let put32 = |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put32(&mut bytes, INFO_ABI_VERSION, abi::ABI_VERSION);
    put32(&mut bytes, INFO_NUM_INPUTS, g.inputs.len() as u32);
    put32(&mut bytes, INFO_NUM_OUTPUTS, g.outputs.len() as u32);
    put32(&mut bytes, INFO_NUM_STATE, extras.state_tensors.len() as u32);
    let workspace_size = if extras.extra_workspace > 0 {
        extra_workspace_offset(plan) + extras.extra_workspace
    } else {
        plan.workspace_size
    }
    .max(extras.min_workspace);
    put64(&mut bytes, INFO_WORKSPACE_SIZE, workspace_size as u64);
    put64(&mut bytes, INFO_WORKSPACE_ALIGN, WORKSPACE_ALIGN as u64);
    put64(&mut bytes, INFO_ENTRY_FLAGS, abi::ENTRY_INFER | extras.entry_flags);
    put64(&mut bytes, INFO_STATE_SIZE, extras.state_size);
    let mut relocs = vec![
        (INFO_TARGET, target_id),
        (INFO_CPU_FEATURES, features_id),
        (INFO_MODEL_NAME, name_id),
    ];
    if let Some(id) = desc_arrays[0] {
        relocs.push((INFO_INPUTS, id));
    }
    if let Some(id) = desc_arrays[1] {
        relocs.push((INFO_OUTPUTS, id));
    }
    if let Some(id) = state_descs {
        relocs.push((INFO_STATE_TENSORS, id));
    }
    define_with_relocs(module, "cnnc_info", bytes, &relocs)
}

fn define_plain<M: Module>(module: &mut M, name: &str, bytes: Vec<u8>, align: u64) -> Result<DataId, CodegenError> {
    let id = module
        .declare_data(name, Linkage::Local, false, false)
        .map_err(module_err(name))?;
    let mut d = DataDescription::new();
    d.define(bytes.into_boxed_slice());
    d.set_align(align);
    module.define_data(id, &d).map_err(module_err(name))?;
    Ok(id)
}

/// A read-only data object with the addresses of other data objects at given offsets.
fn define_with_relocs<M: Module>(
    module: &mut M,
    name: &str,
    bytes: Vec<u8>,
    relocs: &[(usize, DataId)],
) -> Result<DataId, CodegenError> {
    let id = module
        .declare_data(name, Linkage::Local, false, false)
        .map_err(module_err(name))?;
    let mut d = DataDescription::new();
    d.define(bytes.into_boxed_slice());
    d.set_align(8);
    for &(offset, target) in relocs {
        let gv = module.declare_data_in_data(target, &mut d);
        d.write_data_addr(offset as u32, gv, 0);
    }
    module.define_data(id, &d).map_err(module_err(name))?;
    Ok(id)
}

fn emit_model_info_fn<M: Module>(
    module: &mut M,
    info: DataId,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let mut sig = Signature::new(module.isa().default_call_conv());
    sig.returns.push(AbiParam::new(I64));
    let id = module
        .declare_function(abi::SYM_MODEL_INFO, Linkage::Export, &sig)
        .map_err(module_err(abi::SYM_MODEL_INFO))?;
    module.clear_context(ctx);
    ctx.func = Function::with_name_signature(UserFuncName::user(0, id.as_u32()), sig);
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, fb_ctx);
        let entry = b.create_block();
        b.switch_to_block(entry);
        b.seal_block(entry);
        let gv = module.declare_data_in_func(info, b.func);
        let addr = b.ins().symbol_value(I64, gv);
        b.ins().return_(&[addr]);
        b.finalize(module.target_config());
    }
    define(module, id, ctx, abi::SYM_MODEL_INFO)?;
    Ok(id)
}

// Layout of abi::TensorDesc and abi::ModelInfo on 64-bit targets (checked against the
// host's layout of the Rust declarations in the tests below).
const DESC_SIZE: usize = 32;
const DESC_NAME: usize = 0;
const DESC_DTYPE: usize = 8;
const DESC_RANK: usize = 12;
const DESC_SHAPE: usize = 16;
const DESC_OFFSET: usize = 24;
const INFO_SIZE: usize = 96;
const INFO_ABI_VERSION: usize = 0;
const INFO_NUM_INPUTS: usize = 4;
const INFO_NUM_OUTPUTS: usize = 8;
const INFO_NUM_STATE: usize = 12;
const INFO_INPUTS: usize = 16;
const INFO_OUTPUTS: usize = 24;
const INFO_WORKSPACE_SIZE: usize = 32;
const INFO_WORKSPACE_ALIGN: usize = 40;
const INFO_TARGET: usize = 48;
const INFO_CPU_FEATURES: usize = 56;
const INFO_MODEL_NAME: usize = 64;
const INFO_ENTRY_FLAGS: usize = 72;
const INFO_STATE_SIZE: usize = 80;
const INFO_STATE_TENSORS: usize = 88;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_abi_declarations() {
        assert_eq!(size_of::<abi::TensorDesc>(), DESC_SIZE);
        assert_eq!(offset_of!(abi::TensorDesc, name), DESC_NAME);
        assert_eq!(offset_of!(abi::TensorDesc, dtype), DESC_DTYPE);
        assert_eq!(offset_of!(abi::TensorDesc, rank), DESC_RANK);
        assert_eq!(offset_of!(abi::TensorDesc, shape), DESC_SHAPE);
        assert_eq!(offset_of!(abi::TensorDesc, offset), DESC_OFFSET);
        assert_eq!(size_of::<abi::ModelInfo>(), INFO_SIZE);
        assert_eq!(offset_of!(abi::ModelInfo, abi_version), INFO_ABI_VERSION);
        assert_eq!(offset_of!(abi::ModelInfo, num_inputs), INFO_NUM_INPUTS);
        assert_eq!(offset_of!(abi::ModelInfo, num_outputs), INFO_NUM_OUTPUTS);
        assert_eq!(offset_of!(abi::ModelInfo, num_state_tensors), INFO_NUM_STATE);
        assert_eq!(offset_of!(abi::ModelInfo, inputs), INFO_INPUTS);
        assert_eq!(offset_of!(abi::ModelInfo, outputs), INFO_OUTPUTS);
        assert_eq!(offset_of!(abi::ModelInfo, workspace_size), INFO_WORKSPACE_SIZE);
        assert_eq!(offset_of!(abi::ModelInfo, workspace_align), INFO_WORKSPACE_ALIGN);
        assert_eq!(offset_of!(abi::ModelInfo, target), INFO_TARGET);
        assert_eq!(offset_of!(abi::ModelInfo, cpu_features), INFO_CPU_FEATURES);
        assert_eq!(offset_of!(abi::ModelInfo, model_name), INFO_MODEL_NAME);
        assert_eq!(offset_of!(abi::ModelInfo, entry_flags), INFO_ENTRY_FLAGS);
        assert_eq!(offset_of!(abi::ModelInfo, state_size), INFO_STATE_SIZE);
        assert_eq!(offset_of!(abi::ModelInfo, state_tensors), INFO_STATE_TENSORS);
    }
}
