//! One training step run by the reference interpreter: forward, loss, gradients, then the
//! optimizer update and the BatchNorm running statistics, both in PyTorch's conventions.
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

/// Everything a training step reads and writes besides the batch.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// In `TrainingGraph::params` order.
    pub params: Vec<Tensor>,
    /// Momentum buffers, None before the first step.
    pub velocity: Vec<Option<Vec<f32>>>,
    /// (mean, var) per `TrainingGraph::running` entry.
    pub running: Vec<(Tensor, Tensor)>,
}

impl TrainState {
    /// The state a model file holds: its initializers, no momentum yet.
    pub fn initial(tg: &TrainingGraph) -> TrainState {
        TrainState {
            params: tg.params.iter().map(|p| p.initial.clone()).collect(),
            velocity: vec![None; tg.params.len()],
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

/// Applies the SGD update to the parameters and folds the batch statistics into the
/// running statistics.
pub fn apply_update(tg: &TrainingGraph, state: &mut TrainState, step: &StepResult, sgd: Sgd) -> Result<(), String> {
    for (k, param) in tg.params.iter().enumerate() {
        let grad = f32s(&step.grads[k], &param.name)?;
        let p = f32s(&state.params[k], &param.name)?;
        let direction: Vec<f32> = grad.iter().zip(p).map(|(&g, &p)| g + sgd.weight_decay * p).collect();
        let velocity = match state.velocity[k].take() {
            Some(v) if sgd.momentum != 0.0 => v.iter().zip(&direction).map(|(&v, &d)| sgd.momentum * v + d).collect(),
            _ => direction,
        };
        let updated: Vec<f32> = p.iter().zip(&velocity).map(|(&p, &v)| p - sgd.lr * v).collect();
        state.params[k] = Tensor::f32(state.params[k].shape.clone(), updated);
        state.velocity[k] = Some(velocity);
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
pub fn train_step(tg: &TrainingGraph, state: &mut TrainState, data: &[Tensor], labels: &Tensor, sgd: Sgd) -> Result<StepResult, String> {
    let step = compute_gradients(tg, state, data, labels)?;
    apply_update(tg, state, &step, sgd)?;
    Ok(step)
}
