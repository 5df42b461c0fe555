//! Gradient rules of data-movement ops: each is the op's adjoint (inverse placement).

use cnnc_ir::{Node, Op, PadMode, Scalar, TensorType, ValueId};

use super::autodiff::Builder;

type Grads = Result<Vec<Option<ValueId>>, String>;

pub fn grad_reshape(b: &mut Builder, node: &Node, gy: ValueId) -> Grads {
    let shape = b.shape(node.inputs[0]);
    Ok(vec![Some(b.reshape(gy, &shape)?)])
}

pub fn grad_transpose(b: &mut Builder, perm: &[usize], gy: ValueId) -> Grads {
    let mut inverse = vec![0; perm.len()];
    for (d, &p) in perm.iter().enumerate() {
        inverse[p] = d;
    }
    Ok(vec![Some(b.transpose(gy, inverse)?)])
}

/// A unit-step slice's adjoint zero-pads the gradient back to the input's extent.
pub fn grad_slice(b: &mut Builder, starts: &[usize], steps: &[i64], node: &Node, gy: ValueId) -> Grads {
    if steps.iter().any(|&s| s != 1) {
        return Err(format!("no gradient rule for a slice with steps {steps:?} (only unit steps)"));
    }
    let (x_shape, y_shape) = (b.shape(node.inputs[0]), b.shape(gy));
    let begins: Vec<i64> = starts.iter().map(|&s| s as i64).collect();
    let ends: Vec<i64> = (0..x_shape.len()).map(|i| (x_shape[i] - starts[i] - y_shape[i]) as i64).collect();
    Ok(vec![Some(b.push(Op::Pad { begins, ends, mode: PadMode::Constant(Scalar::F32(0.0)) }, &[gy])?)])
}

/// A constant pad's adjoint crops what it added and zero-fills what it cropped: a pad by
/// the negated amounts.
pub fn grad_pad(b: &mut Builder, begins: &[i64], ends: &[i64], mode: &PadMode, gy: ValueId) -> Grads {
    if !matches!(mode, PadMode::Constant(_)) {
        return Err(format!("no gradient rule for {mode:?} padding (only constant)"));
    }
    let begins = begins.iter().map(|&p| -p).collect();
    let ends = ends.iter().map(|&p| -p).collect();
    Ok(vec![Some(b.push(Op::Pad { begins, ends, mode: PadMode::Constant(Scalar::F32(0.0)) }, &[gy])?)])
}

pub fn grad_concat(b: &mut Builder, axis: usize, node: &Node, gy: ValueId, needs: &[bool]) -> Grads {
    let rank = b.shape(gy).len();
    let mut offset = 0;
    let mut grads = Vec::with_capacity(node.inputs.len());
    for (&input, &need) in node.inputs.iter().zip(needs) {
        let shape = b.shape(input);
        if need {
            let mut starts = vec![0; rank];
            starts[axis] = offset;
            let ty = TensorType::new(b.g.ty(input).dtype, shape.clone());
            grads.push(Some(b.push_typed(Op::Slice { starts, steps: vec![1; rank] }, &[gy], ty)?));
        } else {
            grads.push(None);
        }
        offset += shape[axis];
    }
    Ok(grads)
}

pub fn grad_broadcast(b: &mut Builder, node: &Node, gy: ValueId) -> Grads {
    let shape = b.shape(node.inputs[0]);
    Ok(vec![Some(b.sum_to_shape(gy, &shape)?)])
}
