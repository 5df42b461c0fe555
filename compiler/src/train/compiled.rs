//! The training library: the fused training step (`cnnc_train_step`) and the graphs of
//! `cnnc_compute_gradients` and `cnnc_apply_update` cut out of it (`entries.rs`), each
//! optimised (`optimize.rs`), compiled and linked into one `.so`
//! (`cnnc_codegen::train_entry`), and driven through the runtime: what `cnnc compile
//! --train`, `verify-train`, `bench --train` and the tests use.

use std::path::Path;

use cnnc_codegen::{TargetSpec, TrainSignature, compile_train_objects, link_shared_objects};
use cnnc_ir::{DType, Tensor, TensorData};
use cnnc_runtime::{Model, Session, abi};

use super::fused::{FusedStep, HyperValues};

/// Compiles `fused` with all three training entry points for `target` and links `out`.
pub fn compile_fused_step(fused: &FusedStep, target: &TargetSpec, out: &Path) -> Result<(), String> {
    let sig = TrainSignature { num_state: fused.state.len(), num_data: fused.data_inputs.len() };
    // Cut before optimising: the cuts name the fused graph's values.
    let mut entries = super::entries::entry_graphs(fused)?;
    let ctx = crate::passes::PassContext { target: crate::passes::TargetDesc::from_target(target) };
    for entry in &mut entries {
        super::optimize::optimize_training_graph(&mut entry.graph, &ctx).map_err(|e| format!("{}: {e}", entry.symbol))?;
    }
    let mut graph = fused.graph.clone();
    super::optimize::optimize_for_target(&mut graph, target)?;
    let (objects, _) = compile_train_objects(&graph, target, &sig, &entries).map_err(|e| format!("code generation: {e}"))?;
    let objects: Vec<&[u8]> = objects.iter().map(Vec::as_slice).collect();
    link_shared_objects(&objects, out, target).map_err(|e| format!("linking {}: {e}", out.display()))
}

/// A loaded training model and its state buffer.
pub struct Trainer {
    pub session: Session,
    pub state: Vec<u8>,
}

impl Trainer {
    /// Loads `so` and fills the state from `initial` (state tensors in the model's order,
    /// as `FusedStep::initial_state` gives them); gradients and buffers not given start at zero.
    pub fn load(so: &Path, initial: &[Tensor], threads: usize) -> Result<Trainer, String> {
        let model = Model::load(so).map_err(|e| e.to_string())?;
        if !model.info().has_training() {
            return Err(format!("{}: compiled without the training entry points", so.display()));
        }
        let session = Session::new(&model, threads).map_err(|e| e.to_string())?;
        let mut trainer = Trainer { state: vec![0u8; model.info().state_size], session };
        for (k, t) in initial.iter().enumerate() {
            trainer.set_state(k, t)?;
        }
        Ok(trainer)
    }

    pub fn set_state(&mut self, index: usize, t: &Tensor) -> Result<(), String> {
        let spec = self.session.info().state_tensors.get(index).ok_or_else(|| format!("no state tensor {index}"))?;
        if spec.shape != t.shape || crate::driver::ir_dtype(spec.dtype) != t.data.dtype() {
            return Err(format!("state tensor '{}' is {:?} {:?}, given {}", spec.name, spec.dtype, spec.shape, t.ty()));
        }
        let bytes = t.data.to_le_bytes();
        self.state[spec.offset..spec.offset + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }

    /// The state tensor (or gradient, "<parameter>.grad") named `name`.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        let spec = self.session.info().state_tensors.iter().find(|s| s.name == name)?;
        let dtype = crate::driver::ir_dtype(spec.dtype);
        let bytes = &self.state[spec.offset..spec.offset + spec.element_count() * dtype.size()];
        Some(Tensor::new(spec.shape.clone(), TensorData::from_le_bytes(dtype, bytes)))
    }

    /// One step (`cnnc_train_step`); returns the loss.
    pub fn step(&mut self, data: &[Tensor], labels: &Tensor, hyper: &HyperValues) -> Result<f32, String> {
        let (bytes, labels) = batch_bytes(data, labels)?;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        self.session.train_step(&mut self.state, &refs, labels, &abi_hyper(hyper)).map_err(|e| e.to_string())
    }

    /// Forward and backward (`cnnc_compute_gradients`): the gradients into their ".grad"
    /// slots and the running statistics updated, no optimizer update; returns the loss.
    pub fn compute_gradients(&mut self, data: &[Tensor], labels: &Tensor) -> Result<f32, String> {
        let (bytes, labels) = batch_bytes(data, labels)?;
        let refs: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
        self.session.compute_gradients(&mut self.state, &refs, labels).map_err(|e| e.to_string())
    }

    /// The optimizer update from the gradients in the state (`cnnc_apply_update`).
    pub fn apply_update(&mut self, hyper: &HyperValues) -> Result<(), String> {
        self.session.apply_update(&mut self.state, &abi_hyper(hyper)).map_err(|e| e.to_string())
    }
}

fn batch_bytes<'l>(data: &[Tensor], labels: &'l Tensor) -> Result<(Vec<Vec<u8>>, &'l [i64]), String> {
    let TensorData::I64(labels) = &labels.data else {
        return Err(format!("labels must be int64, are {}", labels.data.dtype()));
    };
    if data.iter().any(|t| t.data.dtype() != DType::F32) {
        return Err("training data inputs must be f32".into());
    }
    Ok((data.iter().map(|t| t.data.to_le_bytes()).collect(), labels))
}

fn abi_hyper(hyper: &HyperValues) -> abi::Hyper {
    abi::Hyper {
        learning_rate: hyper.lr,
        momentum: hyper.momentum,
        weight_decay: hyper.weight_decay,
        beta1: hyper.beta1,
        beta2: hyper.beta2,
        epsilon: hyper.epsilon,
        step: hyper.step,
    }
}
