//! Channel-parallel kernels: a node whose output channel `c` reads only channel `c` of
//! its activation (depthwise convolutions, pooling) is cut into chunks of channels per
//! image, and each chunk is compiled by the node's own emitter as a node of a small
//! graph with the chunk's shapes. The chunks run as tasks (`parallel`): one task per
//! (image, chunk), handed to `host->parallel_for`, or run in a loop on one thread.
//!
//! Epilogue operands are cut the same way where they have the output's channel (or
//! image) axis, and shared where they broadcast along it.

use cnnc_ir::{Graph, Node, Op, TensorType};
use cranelift_codegen::Context;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Signature, Value};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_module::{FuncId, Module};

use crate::module::define_local;

use super::{CodegenError, KernelCtx, parallel};

/// Work units (output elements x window taps) below which a node is not split: the
/// ~µs of a parallel loop would not pay.
const MIN_SPLIT_WORK: usize = 1 << 18;
/// Work units per chunk to aim for, and the most chunks per image.
const CHUNK_WORK: usize = 1 << 15;
const MAX_CHUNKS: usize = 16;

/// How one buffer of the node is cut: element offsets per image and per channel
/// (0 when the buffer is shared along that axis), and its chunk's type.
#[derive(Clone, Debug, PartialEq)]
struct BufferCut {
    image_stride: usize,
    channel_stride: usize,
    /// The axis holding the channels, if the buffer is cut along it.
    channel_axis: Option<usize>,
    /// The axis holding the images, if the buffer is cut along it.
    image_axis: Option<usize>,
    ty: TensorType,
}

impl BufferCut {
    /// The type of a chunk of `channels` channels of one image.
    fn chunk_type(&self, channels: usize) -> TensorType {
        let mut shape = self.ty.shape.clone();
        if let Some(a) = self.image_axis {
            shape[a] = 1;
        }
        if let Some(a) = self.channel_axis {
            shape[a] = channels;
        }
        TensorType::new(self.ty.dtype, shape)
    }
}

/// The split of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelSplit {
    images: usize,
    channels: usize,
    /// Channels per chunk (the last chunk may have fewer).
    chunk: usize,
    inputs: Vec<BufferCut>,
    output: BufferCut,
}

impl ChannelSplit {
    fn chunks(&self) -> usize {
        self.channels.div_ceil(self.chunk)
    }
    fn tasks(&self) -> usize {
        self.images * self.chunks()
    }
}

/// The split for `node`, or None when it is not channel-separable or too small.
pub fn plan(g: &Graph, node: &Node) -> Option<ChannelSplit> {
    if node.outputs.len() != 1 || node.inputs.is_empty() || !plain_layout(node) {
        return None;
    }
    let out = g.ty(node.outputs[0]);
    let x = g.ty(node.inputs[0]);
    if out.shape.len() < 3 || x.shape.len() != out.shape.len() || out.numel() == 0 {
        return None;
    }
    let (images, channels) = (out.shape[0], out.shape[1]);
    if x.shape[0] != images || x.shape[1] != channels {
        return None;
    }
    let op_inputs = cnnc_ir::verify::op_input_count(node);
    let taps: usize = match &node.op {
        Op::Conv(geometry) => {
            let w = g.ty(*node.inputs.get(1)?);
            let depthwise =
                geometry.groups == channels && w.shape.first() == Some(&channels) && w.shape.get(1) == Some(&1);
            if !depthwise || channels < 2 {
                return None;
            }
            w.shape[2..].iter().product()
        }
        Op::Pool(attrs) => attrs.kernel.iter().product(),
        _ => return None,
    };
    let work = out.numel() * taps.max(1);
    if work < MIN_SPLIT_WORK {
        return None;
    }
    let per_image = work / images.max(1);
    let chunks = (per_image / CHUNK_WORK).clamp(1, MAX_CHUNKS.min(channels));
    if chunks * images < 2 {
        return None;
    }
    let chunk = channels.div_ceil(chunks);
    // Whole vectors of channels where there are enough (the direct kernels block by 4).
    let chunk = if channels >= 8 { chunk.div_ceil(4) * 4 } else { chunk };

    let activation = |ty: &TensorType| {
        let strides = cnnc_ir::strides(&ty.shape);
        BufferCut {
            image_stride: strides[0],
            channel_stride: strides[1],
            channel_axis: Some(1),
            image_axis: Some(0),
            ty: ty.clone(),
        }
    };
    let mut inputs = Vec::with_capacity(node.inputs.len());
    for (i, &v) in node.inputs.iter().enumerate() {
        let ty = g.ty(v);
        let cut = if i == 0 {
            activation(ty)
        } else if i < op_inputs {
            // Depthwise weights [C, 1, *k] and bias [C]: channels on axis 0.
            if ty.shape.first() != Some(&channels) {
                return None;
            }
            BufferCut {
                image_stride: 0,
                channel_stride: cnnc_ir::strides(&ty.shape)[0],
                channel_axis: Some(0),
                image_axis: None,
                ty: ty.clone(),
            }
        } else {
            operand_cut(ty, &out.shape)?
        };
        inputs.push(cut);
    }
    Some(ChannelSplit {
        images,
        channels,
        chunk,
        inputs,
        output: activation(out),
    })
}

fn plain_layout(node: &Node) -> bool {
    node.schedule.layout_in == cnnc_ir::Layout::Plain && node.schedule.layout_out == cnnc_ir::Layout::Plain
}

/// An epilogue operand broadcast to the output shape: cut along the channel and image
/// axes where it has them at full extent, shared where they are 1.
fn operand_cut(ty: &TensorType, out_shape: &[usize]) -> Option<BufferCut> {
    let rank = ty.shape.len();
    let lead = out_shape.len().checked_sub(rank)?;
    let strides = cnnc_ir::strides(&ty.shape);
    let axis_of = |out_axis: usize| out_axis.checked_sub(lead);
    let mut cut = BufferCut {
        image_stride: 0,
        channel_stride: 0,
        channel_axis: None,
        image_axis: None,
        ty: ty.clone(),
    };
    // Output axis 0 holds the images, axis 1 the channels.
    if let Some(a) = axis_of(0) {
        match ty.shape[a] {
            1 => {}
            extent if extent == out_shape[0] => {
                cut.image_axis = Some(a);
                cut.image_stride = strides[a];
            }
            _ => return None,
        }
    }
    if let Some(a) = axis_of(1) {
        match ty.shape[a] {
            1 => {}
            extent if extent == out_shape[1] => {
                cut.channel_axis = Some(a);
                cut.channel_stride = strides[a];
            }
            _ => return None,
        }
    }
    Some(cut)
}

/// Defines the node's task and kernel; returns the kernel (module node-kernel
/// signature `kernel_sig`). The buffers are the node's inputs then its output.
#[allow(clippy::too_many_arguments)]
pub fn define_node<M: Module>(
    module: &mut M,
    node: &Node,
    node_index: usize,
    split: &ChannelSplit,
    kernel_sig: &Signature,
    ctx: &mut Context,
    fb_ctx: &mut FunctionBuilderContext,
) -> Result<FuncId, CodegenError> {
    let full = sub_graph(node, split, split.chunk);
    let last_chunk = split.channels - (split.chunks() - 1) * split.chunk;
    let tail = (last_chunk != split.chunk).then(|| sub_graph(node, split, last_chunk));
    let what = format!("{} '{}' split by channels", node.op.mnemonic(), node.name);

    let task_name = format!("cnnc_k{node_index}_{}_task", node.op.mnemonic());
    let task_sig = parallel::task_signature(module);
    let task = define_local(module, &task_name, &task_sig, ctx, fb_ctx, &format!("task of {what}"), |b, _, params| {
        emit_task(b, split, &full, tail.as_ref(), params[0], params[1])
    })?;

    let name = format!("cnnc_k{node_index}_{}_split", node.op.mnemonic());
    define_local(module, &name, kernel_sig, ctx, fb_ctx, &format!("kernel of {what}"), |b, module, params| {
        let (host, bufs) = (params[0], params[1]);
        parallel::emit_dispatch_over_buffers(module, b, host, bufs, task, split.tasks());
        Ok(())
    })
}

/// The node as it applies to one chunk of `channels` channels of one image: a graph
/// whose inputs are the chunks of the node's inputs.
fn sub_graph(node: &Node, split: &ChannelSplit, channels: usize) -> Graph {
    let mut sub = Graph::new(format!("{}_chunk{channels}", node.name));
    let inputs: Vec<_> = split
        .inputs
        .iter()
        .enumerate()
        .map(|(i, cut)| sub.add_input(cut.chunk_type(channels), format!("in{i}")))
        .collect();
    let output = sub.add_value(split.output.chunk_type(channels), "out");
    let op = match &node.op {
        Op::Conv(geometry) => Op::Conv(cnnc_ir::ConvGeometry {
            groups: channels,
            ..geometry.clone()
        }),
        other => other.clone(),
    };
    sub.nodes.push(Node {
        name: node.name.clone(),
        op,
        inputs,
        outputs: vec![output],
        epilogue: node.epilogue.clone(),
        schedule: node.schedule.clone(),
    });
    sub.outputs.push(output);
    sub
}

/// Task `index` = image · chunks + chunk: offsets every buffer and runs the chunk's
/// code (the tail chunk's when it is the last and smaller).
fn emit_task(
    b: &mut FunctionBuilder,
    split: &ChannelSplit,
    full: &Graph,
    tail: Option<&Graph>,
    task_ctx: Value,
    index: Value,
) -> Result<(), CodegenError> {
    let flags = MemFlagsData::trusted().with_readonly().with_can_move();
    let bufs = b.ins().load(I64, flags, task_ctx, 0);
    let chunks = split.chunks() as i64;
    let chunk = b.ins().urem_imm_u(index, chunks);
    let image = b.ins().udiv_imm_u(index, chunks);
    let first_channel = b.ins().imul_imm_s(chunk, split.chunk as i64);
    let address = |b: &mut FunctionBuilder, slot: usize, cut: &BufferCut| {
        let base = b.ins().load(I64, flags, bufs, (8 * slot) as i32);
        let bytes = cut.ty.dtype.size() as i64;
        let at = super::gemm::scaled(b, base, image, cut.image_stride as i64 * bytes);
        super::gemm::scaled(b, at, first_channel, cut.channel_stride as i64 * bytes)
    };
    let inputs: Vec<Value> = split
        .inputs
        .iter()
        .enumerate()
        .map(|(i, cut)| address(b, i, cut))
        .collect();
    let output = address(b, split.inputs.len(), &split.output);

    let emit_chunk = |b: &mut FunctionBuilder, sub: &Graph| -> Result<(), CodegenError> {
        let mut k = KernelCtx {
            b,
            graph: sub,
            node: &sub.nodes[0],
            inputs: inputs.clone(),
            outputs: vec![output],
        };
        super::emit_node(&mut k, &[])
    };
    match tail {
        None => emit_chunk(b, full),
        Some(tail) => {
            let last = b
                .ins()
                .icmp_imm_s(cranelift_codegen::ir::condcodes::IntCC::Equal, chunk, chunks - 1);
            let tail_block = b.create_block();
            let full_block = b.create_block();
            let done = b.create_block();
            b.ins().brif(last, tail_block, &[], full_block, &[]);
            b.switch_to_block(tail_block);
            b.seal_block(tail_block);
            emit_chunk(b, tail)?;
            b.ins().jump(done, &[]);
            b.switch_to_block(full_block);
            b.seal_block(full_block);
            emit_chunk(b, full)?;
            b.ins().jump(done, &[]);
            b.switch_to_block(done);
            b.seal_block(done);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnc_ir::{ConvGeometry, PoolAttrs, PoolKind, Tensor};

    fn depthwise(c: usize, hw: usize) -> Graph {
        let mut g = Graph::new("dw");
        let x = g.add_input(TensorType::f32([1, c, hw, hw]), "x");
        let w = g.add_constant("w", Tensor::f32([c, 1, 3, 3], vec![0.1; c * 9]));
        let geometry = ConvGeometry {
            strides: vec![1, 1],
            dilations: vec![1, 1],
            pads_begin: vec![1, 1],
            pads_end: vec![1, 1],
            groups: c,
        };
        let y = g.push1("dw", Op::Conv(geometry), &[x, w]).unwrap();
        g.outputs.push(y);
        g
    }

    #[test]
    fn large_depthwise_splits_into_vector_chunks() {
        let g = depthwise(96, 56);
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        let s = plan(&g, node).unwrap();
        assert_eq!(s.chunk % 4, 0);
        assert!(s.chunks() > 1 && s.chunks() <= MAX_CHUNKS);
        assert_eq!(s.inputs[1].channel_axis, Some(0), "weights cut along their first axis");
        assert_eq!(s.inputs[0].chunk_type(s.chunk).shape, vec![1, s.chunk, 56, 56]);
    }

    #[test]
    fn small_nodes_do_not_split_and_operands_align() {
        let g = depthwise(8, 4);
        let node = g.nodes.iter().find(|n| matches!(n.op, Op::Conv(_))).unwrap();
        assert!(plan(&g, node).is_none(), "too little work");
        let mut g = Graph::new("pool");
        let x = g.add_input(TensorType::f32([1, 64, 112, 112]), "x");
        let attrs = PoolAttrs {
            kind: PoolKind::Max,
            kernel: vec![3, 3],
            strides: vec![2, 2],
            dilations: vec![1, 1],
            pads_begin: vec![1, 1],
            pads_end: vec![1, 1],
        };
        let y = g
            .push_typed("pool", Op::Pool(attrs), &[x], TensorType::f32([1, 64, 56, 56]))
            .unwrap();
        g.outputs.push(y);
        assert!(plan(&g, &g.nodes[0]).is_some(), "a large pool splits");
        let operand = TensorType::f32([1, 1, 56, 1]);
        assert_eq!(
            operand_cut(&operand, &[1, 64, 56, 56]).unwrap().channel_axis,
            None,
            "shared along channels"
        );
        let lower_rank = operand_cut(&TensorType::f32([64, 1, 1]), &[1, 64, 56, 56]).unwrap();
        assert_eq!(
            (lower_rank.channel_axis, lower_rank.image_axis),
            (Some(0), None),
            "aligned from the right"
        );
    }
}
