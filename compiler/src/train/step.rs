//! One training step run by the reference interpreter: forward, loss, gradients, then the
//! optimizer update (SGD with momentum, Adam) and the BatchNorm running statistics, both
//! in PyTorch's conventions.
//! The test oracle for compiled training functions.

use cnnc_ir::{Tensor, interp};

use super::model::TrainingGraph;

/// SGD as `torch.optim.SGD` (dampening 0, no Nesterov): d = g + wd·p; v = μ·v + d
/// (v = d on the first step); p −= lr·v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

/// Adam as `torch.optim.Adam` (no AMSGrad; weight decay as L2, added to the gradient):
/// g += wd·p; m = β1·m + (1 − β1)·g; v = β2·v + (1 − β2)·g²;
/// p −= (lr / (1 − β1ᵗ))·m / (√v / √(1 − β2ᵗ) + ε).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for Adam {
    /// PyTorch's defaults.
    fn default() -> Adam {
        Adam { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd(Sgd),
    Adam(Adam),
}

impl From<Sgd> for Optimizer {
    fn from(sgd: Sgd) -> Optimizer {
        Optimizer::Sgd(sgd)
    }
}

impl From<Adam> for Optimizer {
    fn from(adam: Adam) -> Optimizer {
        Optimizer::Adam(adam)
    }
}

/// Everything a training step reads and writes besides the batch.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// In `TrainingGraph::params` order.
    pub params: Vec<Tensor>,
    /// SGD's momentum buffer or Adam's first moment, None before the first step.
    pub velocity: Vec<Option<Vec<f32>>>,
    /// Adam's second moment, None before the first step (and for SGD).
    pub second_moment: Vec<Option<Vec<f32>>>,
    /// Updates applied so far (Adam's bias correction counts them).
    pub steps: u32,
    /// (mean, var) per `TrainingGraph::running` entry.
    pub running: Vec<(Tensor, Tensor)>,
}

impl TrainState {
    /// The state a model file holds: its initializers, no momentum yet.
    pub fn initial(tg: &TrainingGraph) -> TrainState {
        TrainState {
            params: tg.params.iter().map(|p| p.initial.clone()).collect(),
            velocity: vec![None; tg.params.len()],
            second_moment: vec![None; tg.params.len()],
            steps: 0,
            running: tg.running.iter().map(|r| (r.initial_mean.clone(), r.initial_var.clone())).collect(),
        }
    }

    /// The named tensor: a parameter or a running statistic.
    pub fn get<'s>(&'s self, tg: &TrainingGraph, name: &str) -> Option<&'s Tensor> {
        if let Some(k) = tg.params.iter().position(|p| p.name == name) {
            return Some(&self.params[k]);
        }
        tg.running.iter().zip(&self.running).find_map(|(r, (mean, var))| {
            if r.mean_name == name {
                Some(mean)
            } else if r.var_name == name {
                Some(var)
            } else {
                None
            }
        })
    }
}

/// The loss and gradients of one batch (no update).
#[derive(Clone, Debug)]
pub struct StepResult {
    pub loss: Tensor,
    pub grads: Vec<Tensor>,
    /// (batch mean, unbiased batch variance) per `TrainingGraph::running` entry.
    pub batch_statistics: Vec<(Tensor, Tensor)>,
}

pub fn compute_gradients(tg: &TrainingGraph, state: &TrainState, data: &[Tensor], labels: &Tensor) -> Result<StepResult, String> {
    let inputs = tg.assemble_inputs(data, &state.params, labels)?;
    let mut outputs = interp::run(&tg.graph, &inputs)?.into_iter();
    let loss = outputs.next().ok_or("the training graph produced no loss")?;
    let grads: Vec<Tensor> = outputs.by_ref().take(tg.params.len()).collect();
    let rest: Vec<Tensor> = outputs.collect();
    if grads.len() != tg.params.len() || rest.len() != 2 * tg.running.len() {
        return Err("the training graph's outputs do not match its parameters and statistics".into());
    }
    let batch_statistics = rest.chunks(2).map(|pair| (pair[0].clone(), pair[1].clone())).collect();
    Ok(StepResult { loss, grads, batch_statistics })
}

fn f32s<'t>(t: &'t Tensor, what: &str) -> Result<&'t [f32], String> {
    t.data.as_f32().ok_or_else(|| format!("{what} is not f32"))
}

/// Applies the optimizer's update to the parameters and folds the batch statistics into
/// the running statistics.
pub fn apply_update(
    tg: &TrainingGraph,
    state: &mut TrainState,
    step: &StepResult,
    optimizer: impl Into<Optimizer>,
) -> Result<(), String> {
    let optimizer = optimizer.into();
    state.steps += 1;
    for (k, param) in tg.params.iter().enumerate() {
        let grad = f32s(&step.grads[k], &param.name)?;
        let p = f32s(&state.params[k], &param.name)?;
        let updated = match optimizer {
            Optimizer::Sgd(sgd) => {
                let direction: Vec<f32> = grad.iter().zip(p).map(|(&g, &p)| g + sgd.weight_decay * p).collect();
                let velocity: Vec<f32> = match state.velocity[k].take() {
                    Some(v) if sgd.momentum != 0.0 => {
                        v.iter().zip(&direction).map(|(&v, &d)| sgd.momentum * v + d).collect()
                    }
                    _ => direction,
                };
                let updated = p.iter().zip(&velocity).map(|(&p, &v)| p - sgd.lr * v).collect();
                state.velocity[k] = Some(velocity);
                updated
            }
            Optimizer::Adam(adam) => {
                let g: Vec<f32> = grad.iter().zip(p).map(|(&g, &p)| g + adam.weight_decay * p).collect();
                let m_prev = state.velocity[k].take().unwrap_or_else(|| vec![0.0; g.len()]);
                let v_prev = state.second_moment[k].take().unwrap_or_else(|| vec![0.0; g.len()]);
                let m: Vec<f32> = m_prev.iter().zip(&g).map(|(&m, &g)| adam.beta1 * m + (1.0 - adam.beta1) * g).collect();
                let v: Vec<f32> =
                    v_prev.iter().zip(&g).map(|(&v, &g)| adam.beta2 * v + (1.0 - adam.beta2) * g * g).collect();
                let t = state.steps as i32;
                let correction1 = 1.0 - (adam.beta1 as f64).powi(t);
                let correction2_sqrt = (1.0 - (adam.beta2 as f64).powi(t)).sqrt();
                let step_size = (adam.lr as f64 / correction1) as f32;
                let updated = p
                    .iter()
                    .zip(m.iter().zip(&v))
                    .map(|(&p, (&m, &v))| p - step_size * m / (v.sqrt() / correction2_sqrt as f32 + adam.eps))
                    .collect();
                state.velocity[k] = Some(m);
                state.second_moment[k] = Some(v);
                updated
            }
        };
        state.params[k] = Tensor::f32(state.params[k].shape.clone(), updated);
    }
    for (k, stats) in tg.running.iter().enumerate() {
        let keep = stats.onnx_momentum as f64;
        let (batch_mean, batch_var) = &step.batch_statistics[k];
        let (mean, var) = &mut state.running[k];
        for (running, batch, name) in [(mean, batch_mean, &stats.mean_name), (var, batch_var, &stats.var_name)] {
            let blended: Vec<f32> = f32s(running, name)?
                .iter()
                .zip(f32s(batch, name)?)
                .map(|(&r, &b)| (keep * r as f64 + (1.0 - keep) * b as f64) as f32)
                .collect();
            *running = Tensor::f32(running.shape.clone(), blended);
        }
    }
    Ok(())
}

/// compute_gradients then apply_update.
pub fn train_step(
    tg: &TrainingGraph,
    state: &mut TrainState,
    data: &[Tensor],
    labels: &Tensor,
    optimizer: impl Into<Optimizer>,
) -> Result<StepResult, String> {
    let step = compute_gradients(tg, state, data, labels)?;
    apply_update(tg, state, &step, optimizer)?;
    Ok(step)
}
