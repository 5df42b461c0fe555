//! Depthwise convolutions over blocked activations (NCHWc8: [N, C/8, H, W, 8]):
//! `Op::Conv` with groups == C == C_out, schedule layout_in == layout_out ==
//! Blocked{8}. Every tap is one 8-wide fused multiply-add across the 8 channels of a
//! block, independent of the map's width (`microkernel::depthwise_x86`).
//!
//! One node is three functions: the machine code of one channel block's plane (per
//! node: geometry, padding and the ReLU/clip epilogue are baked in), a task over a
//! range of channel blocks of one image, and the node's kernel, which hands the tasks
//! to the host's `parallel_for` (`parallel::emit_dispatch`). The weights [C, 1, kh, kw]
//! are re-laid out at compile time into [C/8][kh][kw][8] (a data object of the node);
//! the bias [C] already is [C/8][8].
//!
//! Epilogues: ReLU and clip in the machine code before the store; other all-unary
//! epilogues (SiLU, sigmoid...) by the AVX2 activation functions over each finished
//! plane while it is in cache; epilogues with binary steps, whose operands have the
//! output's shape (so its blocked layout, by the verifier's rule), by the generic
//! in-place pass over the output after the tasks. Per-channel operands ([N, C, 1, 1])
//! would need the block-wise indexing and are not taken (`supports` says no).
//!
//! Targets: x86-64 with AVX2 and FMA only; elsewhere `supports` is false and a
//! blocked depthwise node is a `CodegenError` (there is no f32x4 path).

use cnnc_ir::{DType, EpilogueStep, Graph, Layout, Node, Op, TensorData, UnaryFn};
use cranelift_codegen::Context;
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{FuncRef, InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Linkage, Module};

use super::compute::window::AxisWindow;
use super::parallel::FloatEnv;
use super::{CodegenError, parallel};
use crate::microkernel::activation::{self, ActivationSpec};
use crate::microkernel::depthwise_x86::{self, BLOCK, DepthwiseSpec};
use crate::module::{define_bytes, define_local};
use crate::target::TargetSpec;

/// Kernels with more taps are left to the plain layout (code size: every tap of every
/// position of a group is one instruction).
pub const MAX_TAPS: usize = 49;

/// Work (output elements x taps) per task to aim for, and the most tasks per image.
const TASK_WORK: usize = 1 << 15;
const MAX_TASKS_PER_IMAGE: usize = 16;

/// Whether the node, given a Blocked{8} schedule, runs on this kernel for `target`
/// (what the layout pass asks before putting a depthwise convolution in a blocked
/// region). Ignores the node's current schedule.
pub fn supports(g: &Graph, node: &Node, target: &TargetSpec) -> bool {
    runs_on(target) && supports_node(g, node)
}

/// Whether the target runs the kernel's machine code (x86-64 with AVX2 and FMA;
/// AVX-512 machines included, in blocks of 8).
pub fn runs_on(target: &TargetSpec) -> bool {
    activation::available(target)
}

/// [`supports`] without the target: the node's shapes, weights and epilogue (for a
/// pass that knows only that the target has AVX2+FMA, e.g. from its vector width).
pub fn supports_node(g: &Graph, node: &Node) -> bool {
    geometry(g, node, None).is_ok()
}

/// The layout block this kernel works in.
pub const fn block() -> usize {
    BLOCK
}

/// The blocked plan of the node: None when it is not a depthwise convolution with a
/// blocked schedule (it is then someone else's), an error when it is one this kernel
/// cannot run.
pub fn plan(g: &Graph, node: &Node, target: &TargetSpec) -> Result<Option<BlockedDepthwise>, CodegenError> {
    let Op::Conv(geometry_attrs) = &node.op else {
        return Ok(None);
    };
    let s = &node.schedule;
    if s.layout_in == Layout::Plain && s.layout_out == Layout::Plain {
        return Ok(None);
    }
    let Some(&x) = node.inputs.first() else {
        return Ok(None);
    };
    let channels = g.ty(x).shape.get(1).copied().unwrap_or(0);
    if geometry_attrs.groups != channels || channels == 1 {
        return Ok(None);
    }
    let blocked = Layout::Blocked { block: BLOCK as u32 };
    if s.layout_in != blocked || s.layout_out != blocked {
        return Err(CodegenError(format!(
            "depthwise node '{}': layouts {:?} -> {:?}; the blocked kernel runs Blocked{{8}} -> Blocked{{8}}",
            node.name, s.layout_in, s.layout_out
        )));
    }
    geometry(g, node, Some(target))
        .map(Some)
        .map_err(|why| CodegenError(format!("blocked depthwise node '{}': {why}", node.name)))
}

/// Everything the node's functions are built from.
#[derive(Clone, Debug)]
pub struct BlockedDepthwise {
    batch: usize,
    blocks: usize,
    spec: DepthwiseSpec,
    /// Weights as [C/8][kh][kw][8].
    weights: Vec<f32>,
    epilogue: EpiloguePlan,
}

#[derive(Clone, Debug, PartialEq)]
enum EpiloguePlan {
    None,
    /// In the machine code (`spec.steps`).
    Inline,
    /// The activation function over each finished plane.
    PerPlane(ActivationSpec),
    /// The generic in-place pass over the whole output after the tasks.
    AfterTasks,
}

impl BlockedDepthwise {
    fn taps(&self) -> usize {
        self.spec.rows.kernel * self.spec.cols.kernel
    }
    fn in_plane_bytes(&self) -> i64 {
        (self.spec.rows.input * self.spec.cols.input * BLOCK * 4) as i64
    }
    fn out_plane_bytes(&self) -> i64 {
        (self.spec.rows.output * self.spec.cols.output * BLOCK * 4) as i64
    }
    /// Channel blocks per task, and tasks per image.
    fn split(&self) -> (usize, usize) {
        let per_block = self.spec.rows.output * self.spec.cols.output * BLOCK * self.taps();
        let per_task = TASK_WORK.div_ceil(per_block.max(1)).max(1);
        let tasks = self.blocks.div_ceil(per_task).clamp(1, MAX_TASKS_PER_IMAGE.min(self.blocks));
        let per_task = self.blocks.div_ceil(tasks);
        (per_task, self.blocks.div_ceil(per_task))
    }
}

/// The plan of the node, checked against `target` when given.
fn geometry(g: &Graph, node: &Node, target: Option<&TargetSpec>) -> Result<BlockedDepthwise, String> {
    let Op::Conv(attrs) = &node.op else {
        return Err("not a convolution".into());
    };
    if let Some(target) = target
        && !runs_on(target)
    {
        return Err(format!(
            "the blocked depthwise kernel is AVX2+FMA machine code; target {} lacks it",
            target.triple
        ));
    }
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    if !(2..=3).contains(&op_inputs) || node.inputs.len() < op_inputs || node.outputs.len() != 1 {
        return Err("needs input, weights, optional bias and one output".into());
    }
    let x = g.ty(node.inputs[0]);
    let w = g.ty(node.inputs[1]);
    let y = g.ty(node.outputs[0]);
    if [x, w, y].iter().any(|t| t.dtype != DType::F32 || t.shape.len() != 4) {
        return Err("only rank-4 f32 convolutions".into());
    }
    let channels = x.shape[1];
    if attrs.groups != channels || w.shape[..2] != [channels, 1] || y.shape[..2] != [x.shape[0], channels] {
        return Err("not depthwise with one output channel per group".into());
    }
    if !channels.is_multiple_of(BLOCK) || channels == 0 {
        return Err(format!("{channels} channels are not a multiple of {BLOCK}"));
    }
    if y.numel() == 0 {
        return Err("empty output".into());
    }
    if [&attrs.strides, &attrs.dilations, &attrs.pads_begin, &attrs.pads_end]
        .iter()
        .any(|v| v.len() != 2)
    {
        return Err("needs 2-D geometry".into());
    }
    let axis = |a: usize| AxisWindow::conv_axis(attrs, &x.shape, &w.shape, &y.shape, a);
    let (rows, cols) = (axis(0), axis(1));
    if [rows, cols].iter().any(|a| a.kernel == 0 || a.stride == 0 || a.dilation == 0) {
        return Err("zero kernel, stride or dilation".into());
    }
    if rows.kernel * cols.kernel > MAX_TAPS {
        return Err(format!("{} taps (at most {MAX_TAPS})", rows.kernel * cols.kernel));
    }
    // Displacements are 32-bit: planes of up to 64 MB.
    let plane = |a: &AxisWindow, b: &AxisWindow, f: fn(&AxisWindow) -> usize| f(a) * f(b) * BLOCK * 4;
    if plane(&rows, &cols, |a| a.input) >= (1 << 26) || plane(&rows, &cols, |a| a.output) >= (1 << 26) {
        return Err("planes too large".into());
    }
    let weights = match g.constant_of(node.inputs[1]).map(|c| c.to_tensor().data) {
        Some(TensorData::F32(v)) if v.len() == w.numel() => v,
        _ => return Err("weights must be an f32 constant (they are re-laid out at compile time)".into()),
    };
    let bias = op_inputs == 3;
    if bias {
        let b = g.ty(node.inputs[2]);
        if b.dtype != DType::F32 || b.shape != [channels] {
            return Err(format!("bias {b} is not f32[{channels}]"));
        }
    }
    let out_shape = &y.shape;
    let mut unary = Vec::new();
    let mut binary = false;
    for step in &node.epilogue {
        match *step {
            EpilogueStep::Unary(f) => unary.push(f),
            EpilogueStep::Binary { operand, .. } => {
                let ty = node.inputs.get(operand).map(|&v| g.ty(v));
                if ty.is_none_or(|t| t.shape != *out_shape || t.dtype != DType::F32) {
                    return Err("epilogue operands other than of the output's shape".into());
                }
                binary = true;
            }
        }
    }
    let epilogue = if node.epilogue.is_empty() {
        EpiloguePlan::None
    } else if binary {
        EpiloguePlan::AfterTasks
    } else if unary.iter().all(|&f| depthwise_x86::inline_step(f)) {
        EpiloguePlan::Inline
    } else {
        match ActivationSpec::new(false, &unary) {
            Some(spec) => EpiloguePlan::PerPlane(spec),
            None => EpiloguePlan::AfterTasks,
        }
    };
    let steps: Vec<UnaryFn> = if epilogue == EpiloguePlan::Inline { unary } else { Vec::new() };
    let taps = rows.kernel * cols.kernel;
    Ok(BlockedDepthwise {
        batch: x.shape[0],
        blocks: channels / BLOCK,
        spec: DepthwiseSpec { rows, cols, bias, steps },
        weights: depthwise_x86::block_weights(&weights, channels, taps),
        epilogue,
    })
}

/// The machine code's signature: `(x, w, bias, y, blocks)`, all i64, SystemV.
fn machine_code_signature() -> Signature {
    crate::microkernel::registry::sysv_i64_signature(5)
}

/// Defines the node's machine code, weights, task and kernel; returns the kernel
/// (module node-kernel signature `kernel_sig`: the buffers are the node's inputs, then
/// its output).
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    g: &Graph,
    node: &Node,
    node_index: usize,
    plan: &BlockedDepthwise,
    float_env: Option<FloatEnv>,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let what = format!("blocked depthwise '{}'", node.name);
    let code = depthwise_x86::assemble(&plan.spec)?;
    let code_name = format!("cnnc_k{node_index}_dwc8");
    let code_id = module
        .declare_function(&code_name, Linkage::Local, &machine_code_signature())
        .map_err(|e| CodegenError(format!("declaring {code_name}: {e}")))?;
    module
        .define_function_bytes(code_id, crate::microkernel::x86::CODE_ALIGN, &code, &[])
        .map_err(|e| CodegenError(format!("defining {code_name}: {e}")))?;
    let weight_bytes: Vec<u8> = plan.weights.iter().flat_map(|v| v.to_le_bytes()).collect();
    let weights = define_bytes(module, &format!("cnnc_w{node_index}_dwc8"), weight_bytes)?;

    let (per_task, tasks_per_image) = plan.split();
    let has_bias = plan.spec.bias;
    let output_slot = node.inputs.len();
    let task_name = format!("cnnc_k{node_index}_conv_dwc8_task");
    let task_sig = parallel::task_signature(module);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, module, params| {
        let (task_ctx, index) = (params[0], params[1]);
        // Like the GEMM tasks: denormal activations must not slow the FMA chains down.
        let saved_fp = float_env.map(|f| f.emit_enter(module, b));
        let flags = MemFlagsData::trusted().with_readonly().with_can_move();
        let bufs = b.ins().load(I64, flags, task_ctx, 0);
        let chunk = b.ins().urem_imm_u(index, tasks_per_image as i64);
        let image = b.ins().udiv_imm_u(index, tasks_per_image as i64);
        let first = b.ins().imul_imm_s(chunk, per_task as i64);
        let plane = b.ins().imul_imm_s(image, plan.blocks as i64);
        let plane = b.ins().iadd(plane, first);
        let x = b.ins().load(I64, flags, bufs, 0);
        let x = super::gemm::scaled(b, x, plane, plan.in_plane_bytes());
        let y = b.ins().load(I64, flags, bufs, (8 * output_slot) as i32);
        let y = super::gemm::scaled(b, y, plane, plan.out_plane_bytes());
        let gv = module.declare_data_in_func(weights, b.func);
        let w = b.ins().symbol_value(I64, gv);
        let w = super::gemm::scaled(b, w, first, (plan.taps() * BLOCK * 4) as i64);
        let bias = if has_bias {
            let bias = b.ins().load(I64, flags, bufs, 16);
            super::gemm::scaled(b, bias, first, (BLOCK * 4) as i64)
        } else {
            b.ins().iconst(I64, 0)
        };
        let last_count = plan.blocks - (tasks_per_image - 1) * per_task;
        let count = if last_count == per_task {
            b.ins().iconst(I64, per_task as i64)
        } else {
            let is_last = b.ins().icmp_imm_u(IntCC::Equal, chunk, (tasks_per_image - 1) as i64);
            let full = b.ins().iconst(I64, per_task as i64);
            let last = b.ins().iconst(I64, last_count as i64);
            b.ins().select(is_last, last, full)
        };
        let code_ref = module.declare_func_in_func(code_id, b.func);
        match &plan.epilogue {
            EpiloguePlan::PerPlane(spec) => {
                let act = activation::import(b.func, spec).ok_or_else(|| {
                    CodegenError(format!("internal: no activation function {} defined", spec.symbol()))
                })?;
                emit_planes_with_activation(b, plan, code_ref, act, [x, w, bias, y], count);
            }
            _ => {
                b.ins().call(code_ref, &[x, w, bias, y, count]);
            }
        }
        if let (Some(f), Some(saved)) = (float_env, saved_fp) {
            f.emit_restore(module, b, saved);
        }
        Ok(())
    })?;

    let name = format!("cnnc_k{node_index}_conv_dwc8");
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_over_buffers(module, b, host, bufs, task, plan.batch * tasks_per_image);
        if plan.epilogue == EpiloguePlan::AfterTasks {
            super::elementwise::emit_epilogue_steps_from_buffers(b, g, node, &node.epilogue, bufs)?;
        }
        Ok(())
    })
}

/// `count` planes one at a time: the convolution of a plane, then the activation over
/// it while it is in cache.
fn emit_planes_with_activation(
    b: &mut FunctionBuilder,
    plan: &BlockedDepthwise,
    code: FuncRef,
    act: FuncRef,
    [x, w, bias, y]: [Value; 4],
    count: Value,
) {
    let one = b.ins().iconst(I64, 1);
    let zero = b.ins().iconst(I64, 0);
    let plane_floats = b.ins().iconst(I64, (plan.spec.rows.output * plan.spec.cols.output * BLOCK) as i64);
    let header = b.create_block();
    let body = b.create_block();
    let done = b.create_block();
    for _ in 0..5 {
        b.append_block_param(header, I64);
    }
    b.ins().jump(header, &[zero.into(), x.into(), w.into(), bias.into(), y.into()]);
    b.switch_to_block(header);
    let p = b.block_params(header).to_vec();
    let more = b.ins().icmp(IntCC::UnsignedLessThan, p[0], count);
    b.ins().brif(more, body, &[], done, &[]);
    b.switch_to_block(body);
    b.seal_block(body);
    b.ins().call(code, &[p[1], p[2], p[3], p[4], one]);
    b.ins().call(act, &[p[4], one, plane_floats, zero, zero]);
    let i = b.ins().iadd_imm_s(p[0], 1);
    let x = b.ins().iadd_imm_s(p[1], plan.in_plane_bytes());
    let w = b.ins().iadd_imm_s(p[2], (plan.taps() * BLOCK * 4) as i64);
    let bias = if plan.spec.bias {
        b.ins().iadd_imm_s(p[3], (BLOCK * 4) as i64)
    } else {
        p[3]
    };
    let y = b.ins().iadd_imm_s(p[4], plan.out_plane_bytes());
    b.ins().jump(header, &[i.into(), x.into(), w.into(), bias.into(), y.into()]);
    b.seal_block(header);
    b.switch_to_block(done);
    b.seal_block(done);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{ConvGeometry, Schedule, Tensor, TensorType};

    fn depthwise(c: usize, hw: usize, k: usize) -> Graph {
        let mut g = Graph::new("dw");
        let x = g.add_input(TensorType::f32([1, c, hw, hw]), "x");
        let w = g.add_constant("w", Tensor::f32([c, 1, k, k], vec![0.1; c * k * k]));
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![k / 2, k / 2],
            pads_end: vec![k / 2, k / 2],
            groups: c,
        };
        let y = g.push1("dw", Op::Conv(geometry), &[x, w]).unwrap();
        g.outputs.push(y);
        g
    }

    fn host_has_avx2() -> bool {
        activation::available(&TargetSpec::host())
    }

    #[test]
    fn supports_multiples_of_eight_on_avx2_only() {
        let host = TargetSpec::host();
        let portable = TargetSpec::parse(None, Some("x86-64-v2")).unwrap();
        let g = depthwise(16, 14, 3);
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        assert_eq!(supports(&g, node, &host), host_has_avx2());
        assert!(!supports(&g, node, &portable), "no f32x4 path");
        assert!(supports_node(&g, node), "the node itself is fine");
        let g = depthwise(12, 14, 3);
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        assert!(!supports(&g, node, &host), "12 channels");
        let g = depthwise(16, 14, 9);
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        assert!(!supports(&g, node, &host), "81 taps");
    }

    #[test]
    fn plain_schedules_are_not_taken_and_wrong_layouts_are_errors() {
        let host = TargetSpec::host();
        let mut g = depthwise(16, 14, 3);
        let i = g.nodes.iter().position(|n| matches!(n.op, Op::Conv(_))).unwrap();
        assert!(plan(&g, &g.nodes[i], &host).unwrap().is_none());
        g.nodes[i].schedule = Schedule {
            layout_in: Layout::Blocked { block: 16 },
            layout_out: Layout::Blocked { block: 16 },
            ..Schedule::default()
        };
        let err = plan(&g, &g.nodes[i], &host).unwrap_err();
        assert!(err.0.contains("Blocked{8}"), "{err}");
    }

    #[test]
    fn tasks_cover_every_block() {
        let host = TargetSpec::host();
        if !host_has_avx2() {
            return;
        }
        for (c, hw) in [(8, 7), (96, 56), (960, 7), (144, 56), (32, 112)] {
            let g = depthwise(c, hw, 3);
            let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
            let p = geometry(&g, node, Some(&host)).unwrap();
            let (per_task, tasks) = p.split();
            assert!(per_task * tasks >= p.blocks && per_task * (tasks - 1) < p.blocks, "{c}x{hw}");
        }
    }
}
