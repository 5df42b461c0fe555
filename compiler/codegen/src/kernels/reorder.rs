//! Reorder: the same values in another physical layout, Plain [N, C, H, W] <->
//! Blocked{b} [N, C/b, H, W, b] (`Op::Reorder`, inserted where a blocked region meets
//! plain producers or consumers).
//!
//! Either direction is a transpose of the two innermost axes of [N, C/b, b, H·W] /
//! [N, C/b, H·W, b], which `movement::copy_nd` runs by 4x4 register transposes when
//! b and H·W are multiples of 4.

use cnnc_ir::{DType, Graph, Layout, Node, TensorType};

use super::map::readonly_flags;
use super::movement::copy_nd;
use super::{CodegenError, KernelCtx};

fn err<T>(msg: String) -> Result<T, CodegenError> {
    Err(CodegenError(msg))
}

/// The channel block of a blocked layout (`None` for Plain).
pub fn block_of(layout: Layout) -> Option<usize> {
    match layout {
        Layout::Plain => None,
        Layout::Blocked { block } => Some(block as usize),
    }
}

/// Checks that `ty` can be held in `layout`; returns its block (`None` for Plain).
pub fn check_blockable(node: &Node, ty: &TensorType, layout: Layout) -> Result<Option<usize>, CodegenError> {
    let Some(block) = block_of(layout) else { return Ok(None) };
    if block == 0 || ty.rank() != 4 || ty.dtype != DType::F32 || !ty.shape[1].is_multiple_of(block) {
        return err(format!(
            "node '{}': {ty} cannot be held blocked({block}) (needs rank-4 f32 with channels a multiple of {block})",
            node.name
        ));
    }
    Ok(Some(block))
}

/// Element strides of the [N, C/b, H·W, b] view of a tensor [N, C, H, W] held Plain
/// (`blocked` false) or Blocked{b}.
fn view_strides(shape: &[usize], block: usize, blocked: bool) -> Vec<i64> {
    let (c, positions) = (shape[1], shape[2] * shape[3]);
    let (c, p, b) = (c as i64, positions as i64, block as i64);
    if blocked { vec![c * p, b * p, b, 1] } else { vec![c * p, b * p, 1, p] }
}

/// Whether the reorder moves bytes at all (a layout-free value, [N, C, 1, 1], has the
/// same bytes in both layouts and is copied as is).
pub fn is_copy(g: &Graph, node: &Node) -> bool {
    cnnc_ir::verify::is_layout_free(g.ty(node.inputs[0]))
}

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let x = k.graph.ty(k.node.inputs[0]).clone();
    let (from, to) = (k.node.schedule.layout_in, k.node.schedule.layout_out);
    let block = match (check_blockable(k.node, &x, from)?, check_blockable(k.node, &x, to)?) {
        (Some(_), Some(_)) | (None, None) if from == to => {
            super::movement::copy_bytes(k.b, k.outputs[0], k.inputs[0], x.byte_size(), readonly_flags());
            return Ok(());
        }
        (Some(b), None) | (None, Some(b)) => b,
        _ => {
            return err(format!(
                "reorder '{}': from {from:?} to {to:?} is not implemented (one side must be plain)",
                k.node.name
            ));
        }
    };
    if is_copy(k.graph, k.node) {
        super::movement::copy_bytes(k.b, k.outputs[0], k.inputs[0], x.byte_size(), readonly_flags());
        return Ok(());
    }
    let positions = x.shape[2] * x.shape[3];
    let src_blocked = from != Layout::Plain;
    // Iterate in the destination's order, so stores are contiguous.
    let view = if src_blocked {
        [x.shape[0], x.shape[1] / block, block, positions]
    } else {
        [x.shape[0], x.shape[1] / block, positions, block]
    };
    let src_view = view_strides(&x.shape, block, src_blocked);
    let dst_view = view_strides(&x.shape, block, !src_blocked);
    // Strides of the [N, C/b, b, HW] axes, permuted into the iteration order.
    let order = |s: &[i64]| if src_blocked { vec![s[0], s[1], s[3], s[2]] } else { s.to_vec() };
    // view_strides lists [N, C/b, H·W, b]; a destination in plain order iterates
    // [N, C/b, b, H·W].
    let (dst_strides, src_strides) = (order(&dst_view), order(&src_view));
    copy_nd(k.b, &view, 4, k.outputs[0], &dst_strides, k.inputs[0], &src_strides, readonly_flags());
    Ok(())
}
