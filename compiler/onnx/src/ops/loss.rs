//! NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss over [N, C, d1...] scores and
//! [N, d1...] integer labels.

use cnnc_ir::{BinaryFn, DType, Op, ReduceKind, UnaryFn, ValueId};

use super::compose::{binary, drop_axes, reduce_keep, scalar, unary};
use super::softmax::{Flavor, softmax_along};
use crate::ctx::{LowerResult, NodeCtx, invalid, unsupported};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    None,
    Sum,
    Mean,
}

fn reduction(ctx: &NodeCtx) -> LowerResult<Reduction> {
    match ctx.attr_string("reduction", "mean")?.as_str() {
        "none" => Ok(Reduction::None),
        "sum" => Ok(Reduction::Sum),
        "mean" => Ok(Reduction::Mean),
        other => Err(invalid(format!("reduction must be none, sum or mean, got '{other}'"))),
    }
}

/// loss[n, d...] = −weight[t]·log_prob[n, t, d...] with t = target[n, d...]; labels equal to
/// `ignore_index` contribute 0 (and no weight to the mean). GatherElements reads the
/// target class (ignored labels replaced by class 0 so the read stays in range); `mean`
/// divides by the sum of the applied weights (the element count without weights or
/// ignore_index).
fn negative_log_likelihood(ctx: &mut NodeCtx, log_prob: ValueId, target: ValueId, weight: Option<ValueId>) -> LowerResult<ValueId> {
    let scores = ctx.shape(log_prob);
    let labels = ctx.shape(target);
    if scores.len() < 2 {
        return Err(invalid(format!("input must be [N, C, d...], got {scores:?}")));
    }
    let mut expected = vec![scores[0]];
    expected.extend(&scores[2..]);
    if labels != expected {
        return Err(invalid(format!("target has shape {labels:?}; expected {expected:?} for input {scores:?}")));
    }
    if ctx.dtype(log_prob) != DType::F32 {
        return Err(unsupported(format!("{} on {} scores", ctx.node.op_type, ctx.dtype(log_prob))));
    }
    let label_type = ctx.dtype(target);
    if !label_type.is_int() {
        return Err(invalid(format!("target must hold integer labels, got {label_type}")));
    }
    if let Some(w) = weight
        && ctx.shape(w) != [scores[1]]
    {
        return Err(invalid(format!("weight has shape {:?}; expected [{}]", ctx.shape(w), scores[1])));
    }
    let reduction = reduction(ctx)?;
    let keep = match ctx.attr_int_opt("ignore_index")? {
        Some(ignored) => {
            let ignored = scalar(ctx, label_type, ignored as f64);
            let is_ignored = binary(ctx, BinaryFn::Equal, target, ignored)?;
            Some(unary(ctx, UnaryFn::Not, is_ignored)?)
        }
        None => None,
    };
    let class = match keep {
        Some(keep) => {
            let zero = scalar(ctx, label_type, 0.0);
            ctx.push(Op::Where, &[keep, target, zero])?
        }
        None => target,
    };
    let mut class_axis = labels.clone();
    class_axis.insert(1, 1);
    let class_index = ctx.reshape(class, class_axis)?;
    let picked = ctx.push(Op::GatherElements { axis: 1 }, &[log_prob, class_index])?;
    let picked = drop_axes(ctx, picked, &[1])?;
    let mut loss = unary(ctx, UnaryFn::Neg, picked)?;
    // The weight each element carries: weight[class], zero where ignored.
    let mut applied = match weight {
        Some(w) => {
            let per_element = ctx.push(Op::Gather { axis: 0 }, &[w, class])?;
            loss = binary(ctx, BinaryFn::Mul, loss, per_element)?;
            Some(per_element)
        }
        None => None,
    };
    if let Some(keep) = keep {
        let zero = scalar(ctx, DType::F32, 0.0);
        loss = ctx.push(Op::Where, &[keep, loss, zero])?;
        applied = Some(match applied {
            Some(w) => ctx.push(Op::Where, &[keep, w, zero])?,
            None => ctx.cast(keep, DType::F32)?,
        });
    }
    let all: Vec<usize> = (0..labels.len()).collect();
    match reduction {
        Reduction::None => Ok(loss),
        Reduction::Sum => {
            let sum = reduce_keep(ctx, ReduceKind::Sum, loss, &all)?;
            ctx.reshape(sum, vec![])
        }
        Reduction::Mean => {
            let mean = match applied {
                None => reduce_keep(ctx, ReduceKind::Mean, loss, &all)?,
                Some(applied) => {
                    let total = reduce_keep(ctx, ReduceKind::Sum, loss, &all)?;
                    let weight_sum = reduce_keep(ctx, ReduceKind::Sum, applied, &all)?;
                    binary(ctx, BinaryFn::Div, total, weight_sum)?
                }
            };
            ctx.reshape(mean, vec![])
        }
    }
}

pub fn negative_log_likelihood_loss(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (input, target, weight) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    Ok(vec![negative_log_likelihood(ctx, input, target, weight)?])
}

/// NegativeLogLikelihoodLoss of LogSoftmax over the class axis 1; output 1 (optional) is
/// that log-probability.
pub fn softmax_cross_entropy_loss(ctx: &mut NodeCtx) -> LowerResult<Vec<ValueId>> {
    let (scores, target, weight) = (ctx.input(0)?, ctx.input(1)?, ctx.opt_input(2));
    if ctx.shape(scores).len() < 2 {
        return Err(invalid(format!("scores must be [N, C, d...], got {:?}", ctx.shape(scores))));
    }
    if ctx.dtype(scores) != DType::F32 {
        return Err(unsupported(format!("SoftmaxCrossEntropyLoss on {} scores", ctx.dtype(scores))));
    }
    let log_prob = softmax_along(ctx, scores, &[1], Flavor::LogSoftmax)?;
    let loss = negative_log_likelihood(ctx, log_prob, target, weight)?;
    Ok(vec![loss, log_prob])
}
