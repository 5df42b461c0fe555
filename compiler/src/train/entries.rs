//! The graphs behind `cnnc_compute_gradients` and `cnnc_apply_update`, cut out of the
//! fused training step (`fused.rs`) so that the three entry points run the very same
//! nodes: compute_gradients + apply_update equals train_step, bit for bit.
//!
//! - gradients: the fused graph's forward, loss, backward and running-statistics nodes;
//!   outputs the new running statistics (and Dropout's call counter), the loss and every parameter's gradient (into its
//!   "<parameter>.grad" slot of the state buffer).
//! - update: the optimizer nodes, with each gradient read back from its slot (a new graph
//!   input in place of the backward's value); outputs the new parameters and optimizer
//!   buffers.

use cnnc_codegen::{EntryGraph, InputBinding, OutputBinding};
use cnnc_ir::{Graph, ValueId};
use cnnc_runtime::abi;

use super::fused::{FusedStep, StateKind};

/// Name of the state buffer's gradient slot of `parameter` (`cnnc_codegen::StateLayout`).
pub fn grad_slot_name(parameter: &str) -> String {
    format!("{parameter}.grad")
}

/// The fused graph's input `v` as the entry points bind it.
fn input_binding(fused: &FusedStep, v: ValueId) -> Option<InputBinding> {
    if let Some(s) = fused.state.iter().find(|s| s.input == v) {
        return Some(InputBinding::State(s.name.clone()));
    }
    if let Some(j) = fused.data_inputs.iter().position(|&d| d == v) {
        return Some(InputBinding::Data(j));
    }
    if v == fused.labels {
        return Some(InputBinding::Labels);
    }
    fused.hyper.iter().position(|&h| h == v).map(InputBinding::Hyper)
}

/// `g` reduced to what `outputs` need, its inputs to those still read; `bind` names each
/// remaining input's binding.
fn prune(
    symbol: &'static str,
    mut g: Graph,
    outputs: Vec<(ValueId, OutputBinding)>,
    bind: impl Fn(ValueId) -> Option<InputBinding>,
) -> Result<EntryGraph, String> {
    let (values, output_bindings): (Vec<ValueId>, Vec<OutputBinding>) = outputs.into_iter().unzip();
    g.outputs = values;
    // Bindings travel with the inputs through the renumbering of `remove_dead`.
    let bindings: Vec<Option<InputBinding>> = g.inputs.iter().map(|&v| bind(v)).collect();
    g.remove_dead();
    let mut read = vec![false; g.values.len()];
    for v in g.nodes.iter().flat_map(|n| &n.inputs).chain(&g.outputs) {
        read[v.index()] = true;
    }
    let mut inputs = Vec::new();
    let mut input_bindings = Vec::new();
    for (&v, binding) in g.inputs.iter().zip(bindings) {
        if !read[v.index()] {
            continue;
        }
        let binding = binding
            .ok_or_else(|| format!("{symbol}: the graph input '{}' has no place in the ABI", g.value(v).name))?;
        inputs.push(v);
        input_bindings.push(binding);
    }
    g.inputs = inputs;
    // Drops the values of the inputs no longer read.
    g.remove_dead();
    cnnc_ir::verify(&g).map_err(|e| format!("{symbol}: internal: the cut graph does not verify: {e}"))?;
    Ok(EntryGraph { symbol, graph: g, inputs: input_bindings, outputs: output_bindings })
}

/// The graph of `cnnc_compute_gradients`.
pub fn gradients_graph(fused: &FusedStep) -> Result<EntryGraph, String> {
    let mut outputs: Vec<(ValueId, OutputBinding)> = fused
        .state
        .iter()
        .filter(|s| matches!(s.kind, StateKind::RunningMean | StateKind::RunningVar | StateKind::DropoutStep))
        .map(|s| (s.output, OutputBinding::State(s.name.clone())))
        .collect();
    outputs.push((fused.loss, OutputBinding::Loss));
    outputs.extend(
        fused.grads.iter().zip(&fused.param_names).map(|(&g, name)| (g, OutputBinding::State(grad_slot_name(name)))),
    );
    prune(abi::SYM_COMPUTE_GRADIENTS, fused.graph.clone(), outputs, |v| input_binding(fused, v))
}

/// The graph of `cnnc_apply_update`.
pub fn update_graph(fused: &FusedStep) -> Result<EntryGraph, String> {
    let mut g = fused.graph.clone();
    let mut slots: Vec<(ValueId, String)> = Vec::new();
    for (&grad, name) in fused.grads.iter().zip(&fused.param_names) {
        let ty = g.ty(grad).clone();
        let slot = g.add_input(ty, grad_slot_name(name));
        for node in &mut g.nodes {
            for v in node.inputs.iter_mut().filter(|v| **v == grad) {
                *v = slot;
            }
        }
        slots.push((slot, grad_slot_name(name)));
    }
    let outputs = fused
        .state
        .iter()
        .filter(|s| matches!(s.kind, StateKind::Parameter | StateKind::FirstMoment | StateKind::SecondMoment))
        .map(|s| (s.output, OutputBinding::State(s.name.clone())))
        .collect();
    prune(abi::SYM_APPLY_UPDATE, g, outputs, |v| {
        slots
            .iter()
            .find(|(slot, _)| *slot == v)
            .map(|(_, name)| InputBinding::State(name.clone()))
            .or_else(|| input_binding(fused, v))
    })
}

/// Both extra entry graphs of a training library.
pub fn entry_graphs(fused: &FusedStep) -> Result<Vec<EntryGraph>, String> {
    Ok(vec![gradients_graph(fused)?, update_graph(fused)?])
}
