//! The reference interpreter: plain Rust that follows the doc comments of `op.rs`
//! exactly. It is the test oracle for the whole compiler, so it favours obviously
//! correct code over speed (yet keeps inner loops allocation-free).
//!
//! Conventions beyond `op.rs`, chosen so the oracle never panics or invents values:
//! - Integer arithmetic wraps; integer division (and Mean) by zero gives 0.
//! - Float Max/Min (binary, Reduce, Pool) propagate NaN; every unary function maps
//!   NaN to NaN except PowConst (C `pow`: NaN⁰ = 1).
//! - Transcendental functions are computed in f64 and rounded once; sums accumulate
//!   in f32 in a natural order (see each op family).
//! - Out-of-range Gather/GatherElements indices are errors.
//!
//! Op families live in `interp/`: `elementwise`, `matmul`, `conv`, `pool`, `reduce`,
//! `layout`, `window_grad` (pooling's and convolution's training gradients); `math`
//! has the scalar formulas (including `erf`), `elem` the per-dtype
//! plumbing.

mod conv;
mod elem;
mod elementwise;
mod layout;
mod math;
mod matmul;
mod pool;
mod reduce;
mod window_grad;

pub use math::{erf, erfc};

use crate::graph::{Constant, Graph, ValueId};
use crate::infer;
use crate::op::{EpilogueStep, Op};
use crate::types::{Tensor, TensorType};

fn check_consistent(t: &Tensor, what: &dyn Fn() -> String) -> Result<(), String> {
    let count: usize = t.shape.iter().product();
    if count != t.data.len() {
        return Err(format!(
            "{}: shape {:?} holds {count} elements but the data has {}",
            what(),
            t.shape,
            t.data.len()
        ));
    }
    Ok(())
}

/// Evaluates one op. `output_types` are the node's declared output types; they may be
/// empty for ops whose output type follows from the inputs. The op and inputs are
/// type-checked with `infer::output_types` first, so a malformed node is an error,
/// never a panic.
pub fn eval(
    op: &Op,
    inputs: &[&Tensor],
    output_types: &[TensorType],
    constants: &[Constant],
) -> Result<Vec<Tensor>, String> {
    for (i, t) in inputs.iter().enumerate() {
        check_consistent(t, &|| format!("{} input {i}", op.mnemonic()))?;
    }
    let input_types: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
    let type_refs: Vec<&TensorType> = input_types.iter().collect();
    let declared = (!output_types.is_empty() || infer::needs_declared_type(op)).then_some(output_types);
    let types = infer::output_types(op, &type_refs, constants, declared)?;
    let out_shape = &types[0].shape;
    let result = match op {
        Op::Constant(c) => {
            constants.get(c.index()).map(Constant::to_tensor).ok_or_else(|| format!("constant {c} does not exist"))?
        }
        Op::Unary(f) => elementwise::unary(*f, inputs[0])?,
        Op::Binary(f) => elementwise::binary(*f, inputs[0], inputs[1])?,
        Op::Where => elementwise::where_(inputs[0], inputs[1], inputs[2])?,
        Op::Cast { to } => elementwise::cast(inputs[0], *to),
        Op::MatMul => matmul::matmul(inputs[0], inputs[1])?,
        Op::Conv(g) => conv::conv(g, inputs, out_shape)?,
        Op::ConvTranspose(g) => conv::conv_transpose(g, inputs, out_shape)?,
        Op::Pool(p) => pool::pool(p, inputs[0], out_shape)?,
        Op::PoolGrad(p) => window_grad::pool_grad(p, inputs[0], inputs[1])?,
        Op::ConvWeightGrad(g) => window_grad::conv_weight_grad(g, inputs[0], inputs[1], out_shape)?,
        Op::Reduce { kind, axes } => reduce::reduce(*kind, axes, inputs[0])?,
        Op::ArgReduce { kind, axis, select_last_index } => {
            reduce::arg_reduce(*kind, *axis, *select_last_index, inputs[0])?
        }
        Op::Reshape => layout::reshape(inputs[0], out_shape)?,
        Op::Reorder => inputs[0].clone(),
        Op::Transpose { perm } => layout::transpose(perm, inputs[0])?,
        Op::Slice { starts, steps } => layout::slice(starts, steps, inputs[0], out_shape)?,
        Op::Pad { begins, ends, mode } => layout::pad(begins, ends, mode, inputs[0])?,
        Op::Concat { axis } => layout::concat(*axis, inputs)?,
        Op::Broadcast => layout::broadcast(inputs[0], out_shape)?,
        Op::Gather { axis } => layout::gather(*axis, inputs[0], inputs[1])?,
        Op::GatherElements { axis } => layout::gather_elements(*axis, inputs[0], inputs[1])?,
        Op::Resample { axis, lo, hi, weight_hi } => layout::resample(*axis, lo, hi, weight_hi, inputs[0])?,
        Op::RandomUniform { seed } => {
            // f32 -> u64 saturates (NaN -> 0), as the compiled code's conversion does.
            let step = inputs[1].data.get(0).as_f64() as f32 as u64;
            let n = out_shape.iter().product::<usize>() as u64;
            Tensor::f32(out_shape.clone(), (0..n).map(|i| crate::op::random_uniform(*seed, step, i)).collect())
        }
    };
    if result.ty() != types[0] {
        return Err(format!(
            "interpreter bug: {} produced {} where {} was expected",
            op.mnemonic(),
            result.ty(),
            types[0]
        ));
    }
    Ok(vec![result])
}

/// Applies fused elementwise steps to a node's result in order. A `Binary` step's
/// second operand is `node_inputs[operand]`, broadcast to `out`'s shape, which the step
/// may not change.
pub fn apply_epilogue(out: &mut Tensor, steps: &[EpilogueStep], node_inputs: &[&Tensor]) -> Result<(), String> {
    for (i, step) in steps.iter().enumerate() {
        let next = match step {
            EpilogueStep::Unary(f) => eval(&Op::Unary(*f), &[&*out], &[], &[])?,
            EpilogueStep::Binary { func, operand } => {
                let other = node_inputs.get(*operand).ok_or_else(|| {
                    format!("epilogue step {i}: operand {operand} but the node has {} inputs", node_inputs.len())
                })?;
                eval(&Op::Binary(*func), &[&*out, other], &[], &[])?
            }
        };
        let next = next.into_iter().next().ok_or("epilogue step produced no value")?;
        if next.shape != out.shape {
            return Err(format!("epilogue step {i} ({step:?}) turns shape {:?} into {:?}", out.shape, next.shape));
        }
        *out = next;
    }
    Ok(())
}

/// Runs the graph on `inputs` (one per graph input, in order) and returns its outputs.
/// Values are freed after their last use.
pub fn run(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
    let mut values = execute(g, inputs, false)?;
    let mut remaining = vec![0usize; g.values.len()];
    for &o in &g.outputs {
        remaining[o.index()] += 1;
    }
    g.outputs
        .iter()
        .map(|&o| {
            remaining[o.index()] -= 1;
            let slot = &mut values[o.index()];
            let value = if remaining[o.index()] == 0 { slot.take() } else { slot.clone() };
            value.ok_or_else(|| format!("graph output {o} is never defined"))
        })
        .collect()
}

/// Runs the graph and returns every value it defines (None for values that are never
/// defined), indexed by `ValueId`: for bisecting a miscompile.
pub fn run_all(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Option<Tensor>>, String> {
    execute(g, inputs, true)
}

fn value_label(g: &Graph, v: ValueId) -> String {
    match g.values.get(v.index()) {
        Some(value) if !value.name.is_empty() => format!("{v} ('{}')", value.name),
        _ => v.to_string(),
    }
}

fn execute(g: &Graph, inputs: &[Tensor], keep_all: bool) -> Result<Vec<Option<Tensor>>, String> {
    if inputs.len() != g.inputs.len() {
        return Err(format!("graph '{}' takes {} inputs, got {}", g.name, g.inputs.len(), inputs.len()));
    }
    let value_count = g.values.len();
    let check_id = |v: ValueId| {
        if v.index() < value_count { Ok(()) } else { Err(format!("value {v} does not exist ({value_count} values)")) }
    };
    let mut values: Vec<Option<Tensor>> = vec![None; value_count];
    for (k, (&v, t)) in g.inputs.iter().zip(inputs).enumerate() {
        check_id(v)?;
        check_consistent(t, &|| format!("input {k}"))?;
        if t.ty() != *g.ty(v) {
            return Err(format!("input {k} {} must be {}, got {}", value_label(g, v), g.ty(v), t.ty()));
        }
        values[v.index()] = Some(t.clone());
    }

    // The last node reading each value; graph outputs are never freed.
    let mut last_use: Vec<Option<usize>> = vec![None; value_count];
    for (i, node) in g.nodes.iter().enumerate() {
        for &v in node.inputs.iter().chain(&node.outputs) {
            check_id(v)?;
            last_use[v.index()] = Some(i);
        }
    }
    for &o in &g.outputs {
        check_id(o)?;
        last_use[o.index()] = None;
    }
    let mut is_output = vec![false; value_count];
    for &o in &g.outputs {
        is_output[o.index()] = true;
    }

    for (i, node) in g.nodes.iter().enumerate() {
        let context = || format!("node {i} '{}' ({})", node.name, node.op.mnemonic());
        let outs = {
            let ins: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|&v| {
                    values[v.index()]
                        .as_ref()
                        .ok_or_else(|| format!("{}: input {} is not defined yet", context(), value_label(g, v)))
                })
                .collect::<Result<_, _>>()?;
            let out_types: Vec<TensorType> = node.outputs.iter().map(|&v| g.ty(v).clone()).collect();
            // Inputs past the op's own are operands only the epilogue reads.
            let own = crate::verify::op_input_count(node);
            let mut outs = eval(&node.op, &ins[..own], &out_types, &g.constants).map_err(|e| format!("{}: {e}", context()))?;
            if outs.len() != node.outputs.len() {
                return Err(format!(
                    "{}: produced {} outputs, the node has {}",
                    context(),
                    outs.len(),
                    node.outputs.len()
                ));
            }
            if !node.epilogue.is_empty() {
                apply_epilogue(&mut outs[0], &node.epilogue, &ins).map_err(|e| format!("{}: {e}", context()))?;
                if outs[0].ty() != out_types[0] {
                    return Err(format!(
                        "{}: epilogue makes {} but the output is declared {}",
                        context(),
                        outs[0].ty(),
                        out_types[0]
                    ));
                }
            }
            outs
        };
        for (&v, t) in node.outputs.iter().zip(outs) {
            if values[v.index()].is_some() {
                return Err(format!("{}: value {} is defined twice", context(), value_label(g, v)));
            }
            values[v.index()] = Some(t);
        }
        if !keep_all {
            for &v in node.inputs.iter().chain(&node.outputs) {
                if last_use[v.index()] == Some(i) && !is_output[v.index()] {
                    values[v.index()] = None;
                }
            }
        }
    }
    Ok(values)
}
