//! Softmax cross-entropy with class-index labels, mean over the batch (PyTorch's
//! `F.cross_entropy` defaults), and its gradient with respect to the logits.

use cnnc_ir::{BinaryFn, DType, Graph, Op, ReduceKind, Tensor, TensorData, TensorType, UnaryFn, ValueId};

/// The loss value (f32, rank 0) and d(loss)/d(logits), appended to `g`.
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy {
    pub loss: ValueId,
    pub dlogits: ValueId,
}

/// loss = −mean_n log softmax(z)[n, label_n] for logits z [N, K] and int64 labels [N];
/// computed stably as (z − max) − log Σ exp(z − max). The gradient is built in closed
/// form, (softmax(z) − onehot(labels)) / N, rather than by differentiating the max.
/// Labels outside [0, K) select no class (they contribute only the log-sum-exp term);
/// checking them is the caller's job.
pub fn softmax_cross_entropy(g: &mut Graph, logits: ValueId, labels: ValueId) -> Result<CrossEntropy, String> {
    let z_ty = g.ty(logits).clone();
    let [batch, classes] = z_ty.shape[..] else {
        return Err(format!("softmax cross-entropy needs logits [N, classes], got {z_ty}"));
    };
    if z_ty.dtype != DType::F32 {
        return Err(format!("softmax cross-entropy needs f32 logits, got {z_ty}"));
    }
    let l_ty = g.ty(labels).clone();
    if l_ty.dtype != DType::I64 || l_ty.shape != [batch] {
        return Err(format!("labels must be i64[{batch}] to match logits {z_ty}, got {l_ty}"));
    }
    let name = |what: &str| format!("loss.{what}");
    let max = g.push1(name("max"), Op::Reduce { kind: ReduceKind::Max, axes: vec![1] }, &[logits])?;
    let shifted = g.push1(name("shift"), Op::Binary(BinaryFn::Sub), &[logits, max])?;
    let exp = g.push1(name("exp"), Op::Unary(UnaryFn::Exp), &[shifted])?;
    let total = g.push1(name("sum"), Op::Reduce { kind: ReduceKind::Sum, axes: vec![1] }, &[exp])?;
    let log_total = g.push1(name("log"), Op::Unary(UnaryFn::Log), &[total])?;
    let log_probs = g.push1(name("log_softmax"), Op::Binary(BinaryFn::Sub), &[shifted, log_total])?;

    let column = g.push_typed(name("labels"), Op::Reshape, &[labels], TensorType::new(DType::I64, vec![batch, 1]))?;
    let class_ids = g.add_constant(name("classes"), Tensor::new(vec![1, classes], TensorData::I64((0..classes as i64).collect())));
    let hot = g.push1(name("hot"), Op::Binary(BinaryFn::Equal), &[column, class_ids])?;
    let one_hot = g.push1(name("one_hot"), Op::Cast { to: DType::F32 }, &[hot])?;

    let picked = g.push1(name("picked"), Op::Binary(BinaryFn::Mul), &[one_hot, log_probs])?;
    let summed = g.push1(name("total"), Op::Reduce { kind: ReduceKind::Sum, axes: vec![0, 1] }, &[picked])?;
    let inv_batch = 1.0 / batch.max(1) as f32;
    let mean = g.push1(name("mean"), Op::Unary(UnaryFn::Affine { scale: -inv_batch, shift: 0.0 }), &[summed])?;
    let loss = g.push_typed(name("value"), Op::Reshape, &[mean], TensorType::f32(Vec::<usize>::new()))?;

    let softmax = g.push1(name("softmax"), Op::Binary(BinaryFn::Div), &[exp, total])?;
    let residual = g.push1(name("residual"), Op::Binary(BinaryFn::Sub), &[softmax, one_hot])?;
    let dlogits = g.push1(name("dlogits"), Op::Unary(UnaryFn::Affine { scale: inv_batch, shift: 0.0 }), &[residual])?;
    Ok(CrossEntropy { loss, dlogits })
}
