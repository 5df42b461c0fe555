//! Graph-to-graph passes. A pipeline is a plain list of passes; the verifier runs
//! after every one, so a pass that breaks an invariant is named at once.

use cnnc_ir::Graph;

pub mod choose_layout;
pub mod choose_schedule;
pub(crate) mod edit;
pub mod eliminate_dead_code;
pub mod fold_batchnorm;
pub mod fold_constants;
pub mod fuse_epilogue;
pub mod matmul_as_conv;
pub mod merge_reshapes;
pub mod target;

pub use target::TargetDesc;

/// What every pass may read besides the graph. Passes must not look at the host
/// directly: everything machine-dependent comes through here, so tests can pin it.
#[derive(Clone, Debug, PartialEq)]
pub struct PassContext {
    pub target: TargetDesc,
}

/// One named rewrite of the whole graph.
pub struct Pass {
    pub name: &'static str,
    /// What the pass does, for `cnnc dump --list-passes`.
    pub summary: &'static str,
    pub run: fn(&mut Graph, &PassContext) -> Result<(), String>,
}

/// The inference pipeline, in order. Batch normalisation folds before fusion (a folded
/// mul/add costs nothing, a fused one costs a step), fusion before scheduling (the
/// schedule is chosen for the final node), layouts after fusion (regions are chosen
/// for the fused nodes) and before scheduling (which leaves blocked nodes alone), dead
/// code last.
pub fn inference_pipeline() -> Vec<Pass> {
    inference_pipeline_with(&PipelineOptions::default())
}

/// Switches of the inference pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Blocked NCHWc regions (`choose_layout`); off for A/B runs (`--no-nchwc`).
    pub nchwc: bool,
}

impl Default for PipelineOptions {
    fn default() -> PipelineOptions {
        PipelineOptions { nchwc: true }
    }
}

/// The inference pipeline with `options`.
pub fn inference_pipeline_with(options: &PipelineOptions) -> Vec<Pass> {
    let mut passes = vec![
        fold_constants::PASS,
        merge_reshapes::PASS,
        fold_batchnorm::PASS,
        fuse_epilogue::PASS,
        matmul_as_conv::PASS,
    ];
    if options.nchwc {
        passes.push(choose_layout::PASS);
    }
    passes.extend([choose_schedule::PASS, eliminate_dead_code::PASS]);
    passes
}

/// A pass failed or left the graph invalid.
#[derive(Debug)]
pub struct PassError {
    pub pass: &'static str,
    pub message: String,
}

impl std::fmt::Display for PassError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "internal error in pass `{}`: {}", self.pass, self.message)
    }
}

impl std::error::Error for PassError {}

/// Runs `passes` in order, verifying after each and calling `observe(pass name, graph)`
/// after it (dumps use this; the verifier has already accepted the graph by then).
pub fn run_pipeline(
    g: &mut Graph,
    passes: &[Pass],
    ctx: &PassContext,
    mut observe: impl FnMut(&str, &Graph),
) -> Result<(), PassError> {
    cnnc_ir::verify::verify(g).map_err(|e| PassError { pass: "frontend", message: e.to_string() })?;
    for p in passes {
        (p.run)(g, ctx).map_err(|message| PassError { pass: p.name, message })?;
        cnnc_ir::verify::verify(g).map_err(|e| PassError { pass: p.name, message: e.to_string() })?;
        observe(p.name, g);
    }
    Ok(())
}
