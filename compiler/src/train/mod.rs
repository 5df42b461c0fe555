//! Training: reverse-mode autodiff over the IR (`autodiff`, with the gradient rules split by
//! op family in `rules_*`), the softmax cross-entropy loss (`loss`) and the training graph of
//! an ONNX model with its trainable parameters as graph inputs (`model`).

pub mod autodiff;
pub mod cli_train;
pub mod compiled;
pub mod entries;
pub mod export;
pub mod fused;
mod lean_backward;
pub mod loss;
pub mod model;
pub mod optimize;
pub mod step;
pub mod verify_train;
mod rules_elementwise;
mod rules_layout;
mod rules_pool;
mod rules_window;

pub use autodiff::backward;
pub use fused::{FusedStep, HyperValues, OptimizerKind, StateKind, StateTensor, fused_train_step};
pub use loss::softmax_cross_entropy;
pub use step::{Adam, Optimizer, Sgd, StepResult, TrainState, apply_update, compute_gradients, train_step};
pub use verify_train::verify_train_case;
pub use model::{
    Parameter, RunningStatistics, TrainOptions, TrainingGraph, glob_matches, load_training_graph, load_training_graph_batched,
    load_training_graph_with, trainable_initializers,
};
