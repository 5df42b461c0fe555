//! The whole training step as ONE IR graph, for code generation: the training graph of
//! `model.rs` plus the optimizer update and the BatchNorm running-statistics update as IR
//! ops, in PyTorch's conventions (the same formulas as `step.rs`, which is the oracle).
//!
//! Inputs, in `graph.inputs` order: the state tensors (`state` order), the model's data
//! inputs, `labels`, then the hyper-parameters as f32 scalars (`HYPER_NAMES` order).
//! Outputs: the new value of every state tensor (`state` order), the loss, then the gradient
//! of every parameter (`TrainingGraph::params` order).
//!
//! The state keeps no step counter and no "first step" flag: optimizer buffers start at zero,
//! and with v = 0, SGD's v = μ·v + d gives PyTorch's v = d on the first step; Adam's bias
//! correction reads the `step` hyper-parameter (1-based).

use cnnc_ir::{BinaryFn, DType, Graph, Op, Tensor, TensorType, UnaryFn, ValueId};

use super::model::TrainingGraph;
use super::step::{Optimizer, TrainState};

/// Hyper-parameter inputs, in graph order (the fields of the C ABI's `cnnc_hyper`).
pub const HYPER_NAMES: [&str; 7] = ["lr", "momentum", "weight_decay", "beta1", "beta2", "epsilon", "step"];

/// What a state tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    Parameter,
    /// SGD's momentum buffer or Adam's first moment (`exp_avg`).
    FirstMoment,
    /// Adam's second moment (`exp_avg_sq`).
    SecondMoment,
    RunningMean,
    RunningVar,
    /// The call counter of training-mode Dropout's generator (`DROPOUT_STEP`).
    DropoutStep,
}

/// The state tensor counting the forward passes that drew Dropout masks: an f32 scalar
/// from 0, advanced by every call that runs the forward pass (`train_step`,
/// `compute_gradients`), so each call draws new masks.
pub const DROPOUT_STEP: &str = "cnnc.dropout_step";

#[derive(Clone, Debug)]
pub struct StateTensor {
    /// The parameter's or running statistic's initializer name; optimizer buffers append
    /// ".momentum" (SGD), ".exp_avg" or ".exp_avg_sq" (Adam).
    pub name: String,
    pub kind: StateKind,
    pub ty: TensorType,
    pub input: ValueId,
    pub output: ValueId,
    /// The value a fresh model starts from (initializer, or zeros for optimizer buffers).
    pub initial: Tensor,
}

#[derive(Clone, Debug)]
pub struct FusedStep {
    pub graph: Graph,
    pub state: Vec<StateTensor>,
    pub data_inputs: Vec<ValueId>,
    pub labels: ValueId,
    /// One f32 scalar input per `HYPER_NAMES` entry.
    pub hyper: Vec<ValueId>,
    pub loss: ValueId,
    /// Gradient outputs, one per parameter.
    pub grads: Vec<ValueId>,
    /// Parameter names in `grads` order.
    pub param_names: Vec<String>,
}

/// Per-call hyper-parameters as the graph reads them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HyperValues {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub epsilon: f32,
    /// 1-based optimizer step.
    pub step: u64,
}

impl HyperValues {
    pub fn from_optimizer(optimizer: Optimizer, step: u64) -> HyperValues {
        match optimizer {
            Optimizer::Sgd(s) => HyperValues {
                lr: s.lr,
                momentum: s.momentum,
                weight_decay: s.weight_decay,
                beta1: 0.0,
                beta2: 0.0,
                epsilon: 0.0,
                step,
            },
            Optimizer::Adam(a) => HyperValues {
                lr: a.lr,
                momentum: 0.0,
                weight_decay: a.weight_decay,
                beta1: a.beta1,
                beta2: a.beta2,
                epsilon: a.eps,
                step,
            },
        }
    }

    /// In `HYPER_NAMES` order, as rank-0 tensors.
    pub fn tensors(&self) -> Vec<Tensor> {
        [self.lr, self.momentum, self.weight_decay, self.beta1, self.beta2, self.epsilon, self.step as f32]
            .into_iter()
            .map(|v| Tensor::f32(Vec::<usize>::new(), vec![v]))
            .collect()
    }
}

/// Whether the optimizer is Adam (two moment buffers) or SGD (one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    Adam,
}

impl From<Optimizer> for OptimizerKind {
    fn from(o: Optimizer) -> OptimizerKind {
        match o {
            Optimizer::Sgd(_) => OptimizerKind::Sgd,
            Optimizer::Adam(_) => OptimizerKind::Adam,
        }
    }
}

struct Builder<'g> {
    g: &'g mut Graph,
    prefix: String,
}

impl Builder<'_> {
    fn unary(&mut self, name: &str, f: UnaryFn, x: ValueId) -> Result<ValueId, String> {
        self.g.push1(format!("{}.{name}", self.prefix), Op::Unary(f), &[x])
    }
    fn binary(&mut self, name: &str, f: BinaryFn, a: ValueId, b: ValueId) -> Result<ValueId, String> {
        self.g.push1(format!("{}.{name}", self.prefix), Op::Binary(f), &[a, b])
    }
}

/// Appends the optimizer and running-statistics updates to `tg`'s graph.
pub fn fused_train_step(tg: &TrainingGraph, optimizer: OptimizerKind) -> Result<FusedStep, String> {
    let mut g = tg.graph.clone();
    let scalar = TensorType::f32(Vec::<usize>::new());
    let hyper: Vec<ValueId> = HYPER_NAMES.iter().map(|n| g.add_input(scalar.clone(), format!("hyper.{n}"))).collect();
    let [lr, momentum, weight_decay, beta1, beta2, epsilon, step] = hyper[..] else {
        return Err("internal: hyper-parameter count".into());
    };

    let mut state = Vec::new();
    let first_update_node = g.nodes.len();
    let mut b = Builder { g: &mut g, prefix: "update".into() };

    // Adam's bias corrections, shared by every parameter.
    let adam_scalars = if optimizer == OptimizerKind::Adam {
        b.prefix = "adam".into();
        let beta1_t = b.binary("beta1_pow", BinaryFn::Pow, beta1, step)?;
        let correction1 = b.unary("correction1", UnaryFn::Affine { scale: -1.0, shift: 1.0 }, beta1_t)?;
        let step_size = b.binary("step_size", BinaryFn::Div, lr, correction1)?;
        let beta2_t = b.binary("beta2_pow", BinaryFn::Pow, beta2, step)?;
        let correction2 = b.unary("correction2", UnaryFn::Affine { scale: -1.0, shift: 1.0 }, beta2_t)?;
        let correction2_sqrt = b.unary("correction2_sqrt", UnaryFn::Sqrt, correction2)?;
        let one_minus_beta1 = b.unary("one_minus_beta1", UnaryFn::Affine { scale: -1.0, shift: 1.0 }, beta1)?;
        let one_minus_beta2 = b.unary("one_minus_beta2", UnaryFn::Affine { scale: -1.0, shift: 1.0 }, beta2)?;
        Some((step_size, correction2_sqrt, one_minus_beta1, one_minus_beta2))
    } else {
        None
    };

    let mut moments = Vec::new();
    for param in &tg.params {
        let ty = b.g.ty(param.input).clone();
        if ty.dtype != DType::F32 {
            return Err(format!("parameter '{}' is {}, training needs f32", param.name, ty.dtype));
        }
        b.prefix = format!("update.{}", param.name);
        let p = param.input;
        let decay = b.binary("decay", BinaryFn::Mul, weight_decay, p)?;
        let direction = b.binary("direction", BinaryFn::Add, param.grad, decay)?;
        let zeros = Tensor::new(ty.shape.clone(), cnnc_ir::TensorData::zeros(DType::F32, ty.numel()));
        match adam_scalars {
            None => {
                let v = b.g.add_input(ty.clone(), format!("{}.momentum", param.name));
                let kept = b.binary("kept", BinaryFn::Mul, momentum, v)?;
                let v_new = b.binary("velocity", BinaryFn::Add, kept, direction)?;
                let scaled = b.binary("scaled", BinaryFn::Mul, lr, v_new)?;
                let p_new = b.binary("param", BinaryFn::Sub, p, scaled)?;
                state.push(st(&param.name, StateKind::Parameter, &ty, p, p_new, param.initial.clone()));
                moments.push(st(&format!("{}.momentum", param.name), StateKind::FirstMoment, &ty, v, v_new, zeros));
            }
            Some((step_size, correction2_sqrt, one_minus_beta1, one_minus_beta2)) => {
                let m = b.g.add_input(ty.clone(), format!("{}.exp_avg", param.name));
                let v = b.g.add_input(ty.clone(), format!("{}.exp_avg_sq", param.name));
                let m_kept = b.binary("m_kept", BinaryFn::Mul, beta1, m)?;
                let m_added = b.binary("m_added", BinaryFn::Mul, one_minus_beta1, direction)?;
                let m_new = b.binary("exp_avg", BinaryFn::Add, m_kept, m_added)?;
                let v_kept = b.binary("v_kept", BinaryFn::Mul, beta2, v)?;
                let squared = b.binary("squared", BinaryFn::Mul, direction, direction)?;
                let v_added = b.binary("v_added", BinaryFn::Mul, one_minus_beta2, squared)?;
                let v_new = b.binary("exp_avg_sq", BinaryFn::Add, v_kept, v_added)?;
                let root = b.unary("root", UnaryFn::Sqrt, v_new)?;
                let corrected = b.binary("corrected", BinaryFn::Div, root, correction2_sqrt)?;
                let denominator = b.binary("denominator", BinaryFn::Add, corrected, epsilon)?;
                let ratio = b.binary("ratio", BinaryFn::Div, m_new, denominator)?;
                let scaled = b.binary("scaled", BinaryFn::Mul, step_size, ratio)?;
                let p_new = b.binary("param", BinaryFn::Sub, p, scaled)?;
                state.push(st(&param.name, StateKind::Parameter, &ty, p, p_new, param.initial.clone()));
                moments.push(st(&format!("{}.exp_avg", param.name), StateKind::FirstMoment, &ty, m, m_new, zeros.clone()));
                moments.push(st(&format!("{}.exp_avg_sq", param.name), StateKind::SecondMoment, &ty, v, v_new, zeros));
            }
        }
    }
    state.extend(moments);

    for stats in &tg.running {
        let keep = stats.onnx_momentum;
        b.prefix = format!("running.{}", stats.mean_name);
        for (name, kind, initial, batch) in [
            (&stats.mean_name, StateKind::RunningMean, &stats.initial_mean, stats.batch_mean),
            (&stats.var_name, StateKind::RunningVar, &stats.initial_var, stats.batch_var),
        ] {
            let ty = initial.ty();
            let running = b.g.add_input(ty.clone(), name.clone());
            let kept = b.unary("kept", UnaryFn::Affine { scale: keep, shift: 0.0 }, running)?;
            let added = b.unary("added", UnaryFn::Affine { scale: 1.0 - keep, shift: 0.0 }, batch)?;
            let blended = b.binary("blended", BinaryFn::Add, kept, added)?;
            state.push(st(name, kind, &ty, running, blended, initial.clone()));
        }
    }

    // Training-mode Dropout (`Op::RandomUniform` with a placeholder step from the
    // frontend) draws from the counter in the state, so train_step and the
    // compute_gradients/apply_update pair draw the same masks.
    let random: Vec<usize> =
        (0..b.g.nodes.len()).filter(|&i| matches!(b.g.nodes[i].op, Op::RandomUniform { .. })).collect();
    if !random.is_empty() {
        let ty = TensorType::f32(Vec::<usize>::new());
        let counter = b.g.add_input(ty.clone(), DROPOUT_STEP);
        for &i in &random {
            b.g.nodes[i].inputs[1] = counter;
        }
        b.prefix = "dropout".into();
        let next = b.unary("step", UnaryFn::Affine { scale: 1.0, shift: 1.0 }, counter)?;
        let zero = Tensor::f32(Vec::<usize>::new(), vec![0.0]);
        state.push(st(DROPOUT_STEP, StateKind::DropoutStep, &ty, counter, next, zero));
    }

    place_updates_after_their_operands(&mut g, first_update_node);
    super::lean_backward::lighten_backward(&mut g);

    let grads: Vec<ValueId> = tg.params.iter().map(|p| p.grad).collect();
    // Inputs in the documented order: state, data, labels, hyper-parameters.
    let mut inputs: Vec<ValueId> = state.iter().map(|s| s.input).collect();
    inputs.extend(&tg.data_inputs);
    inputs.push(tg.labels);
    inputs.extend(&hyper);
    if inputs.len() != g.inputs.len() {
        return Err(format!("internal: the fused step binds {} of {} graph inputs", inputs.len(), g.inputs.len()));
    }
    g.inputs = inputs;
    g.outputs = state.iter().map(|s| s.output).chain([tg.loss]).chain(grads.iter().copied()).collect();
    Ok(FusedStep {
        graph: g,
        state,
        data_inputs: tg.data_inputs.clone(),
        labels: tg.labels,
        hyper,
        loss: tg.loss,
        grads,
        param_names: tg.params.iter().map(|p| p.name.clone()).collect(),
    })
}

/// Moves each update node (optimizer, running statistics, Dropout counter: the nodes from
/// `first_update_node` on) next to the training node whose value it waits for, so that a
/// parameter is updated as soon as its gradient is complete -- while the gradient is still
/// in cache -- instead of in one sweep over every gradient after the backward pass.
///
/// An update node whose result feeds other update nodes goes just before the first of
/// them (a parameter-sized `weight_decay * p` is not computed up front and kept alive
/// through the whole step); one that feeds none goes just after the last training node it
/// reads. Safe to update that early: the entry points write state outputs to a shadow copy,
/// copied back after the graph (`codegen/src/train_entry.rs`), so a later reader of a
/// parameter still sees its old value. Training nodes keep their order.
fn place_updates_after_their_operands(g: &mut Graph, first_update_node: usize) {
    let producers = g.producers();
    let users = g.users();
    let count = g.nodes.len();
    // The last training node an update node reads, directly or through other update nodes.
    let mut after: Vec<Option<usize>> = vec![None; count];
    for i in first_update_node..count {
        after[i] = g.nodes[i]
            .inputs
            .iter()
            .filter_map(|v| producers[v.index()])
            .map(|p| if p < first_update_node { Some(p) } else { after[p] })
            .max()
            .flatten();
    }
    // Where it goes: its first consumer's place, or `after` when no update node reads it.
    // Consumers come later in node order, so a reverse sweep sees them first.
    let mut place: Vec<Option<usize>> = vec![None; count];
    for i in (first_update_node..count).rev() {
        let consumers = g.nodes[i].outputs.iter().flat_map(|o| users[o.index()].iter().copied());
        place[i] = consumers.map(|c| place[c]).min().unwrap_or(after[i]);
    }
    let mut order: Vec<usize> = (0..count).collect();
    // (training node to follow -- None: before every training node --, the training node
    // itself before its updates, node order among equals).
    order.sort_by_key(|&i| if i < first_update_node { (Some(i), 0, i) } else { (place[i], 1, i) });
    let mut nodes: Vec<Option<cnnc_ir::Node>> = std::mem::take(&mut g.nodes).into_iter().map(Some).collect();
    g.nodes = order.into_iter().filter_map(|i| nodes[i].take()).collect();
}

fn st(name: &str, kind: StateKind, ty: &TensorType, input: ValueId, output: ValueId, initial: Tensor) -> StateTensor {
    StateTensor { name: name.to_string(), kind, ty: ty.clone(), input, output, initial }
}

impl FusedStep {
    /// The state a fresh model starts from.
    pub fn initial_state(&self) -> Vec<Tensor> {
        self.state.iter().map(|s| s.initial.clone()).collect()
    }

    /// The graph's inputs from the state (`state` order), data, labels and hyper-parameters.
    pub fn assemble_inputs(&self, state: &[Tensor], data: &[Tensor], labels: &Tensor, hyper: &HyperValues) -> Result<Vec<Tensor>, String> {
        if state.len() != self.state.len() || data.len() != self.data_inputs.len() {
            return Err(format!(
                "expected {} state tensor(s) and {} data input(s), got {} and {}",
                self.state.len(),
                self.data_inputs.len(),
                state.len(),
                data.len()
            ));
        }
        let mut inputs: Vec<Tensor> = state.to_vec();
        inputs.extend(data.iter().cloned());
        inputs.push(labels.clone());
        inputs.extend(hyper.tensors());
        Ok(inputs)
    }

    /// Splits the graph's outputs into (new state, loss, gradients).
    pub fn split_outputs(&self, outputs: Vec<Tensor>) -> Result<(Vec<Tensor>, Tensor, Vec<Tensor>), String> {
        if outputs.len() != self.state.len() + 1 + self.grads.len() {
            return Err(format!("the fused step produced {} outputs, expected {}", outputs.len(), self.state.len() + 1 + self.grads.len()));
        }
        let mut it = outputs.into_iter();
        let state: Vec<Tensor> = it.by_ref().take(self.state.len()).collect();
        let loss = it.next().ok_or("no loss")?;
        Ok((state, loss, it.collect()))
    }

    /// The state as the interpreter's `TrainState` holds it (for comparing with `step.rs`).
    pub fn state_from_reference(&self, tg: &TrainingGraph, reference: &TrainState) -> Result<Vec<Tensor>, String> {
        self.state
            .iter()
            .map(|s| {
                let k = |name: &str| tg.params.iter().position(|p| p.name == name);
                let buffer = |buf: &Option<Vec<f32>>| match buf {
                    Some(v) => Tensor::f32(s.ty.shape.clone(), v.clone()),
                    None => s.initial.clone(),
                };
                match s.kind {
                    StateKind::Parameter | StateKind::RunningMean | StateKind::RunningVar => {
                        reference.get(tg, &s.name).cloned().ok_or_else(|| format!("no reference state '{}'", s.name))
                    }
                    StateKind::FirstMoment => {
                        let base = s.name.rsplit_once('.').map_or("", |(b, _)| b);
                        let i = k(base).ok_or_else(|| format!("no parameter for '{}'", s.name))?;
                        Ok(buffer(&reference.velocity[i]))
                    }
                    StateKind::SecondMoment => {
                        let base = s.name.rsplit_once('.').map_or("", |(b, _)| b);
                        let i = k(base).ok_or_else(|| format!("no parameter for '{}'", s.name))?;
                        Ok(buffer(&reference.second_moment[i]))
                    }
                    StateKind::DropoutStep => {
                        Err("the interpreter's training step has no Dropout (its masks are random)".to_string())
                    }
                }
            })
            .collect()
    }
}
