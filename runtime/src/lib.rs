//! cnnc's runtime: loads a model compiled by cnnc (a shared object exporting the C ABI
//! of [`abi`]) and runs it. It does not depend on the compiler.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = cnnc_runtime::Model::load("model.so")?; // checks ABI version, arch, CPU features
//! let mut session = cnnc_runtime::Session::new(&model, 2)?; // workspace + a 2-thread pool
//! let image = vec![0.0f32; 3 * 224 * 224];
//! let outputs = session.run_f32(&[&image])?;
//! # Ok(()) }
//! ```
//!
//! - [`loader`]: [`Model::load`] and the owned metadata ([`ModelInfo`], [`TensorSpec`]).
//! - [`session`]: [`Session`] (workspace, pool) with raw-byte and typed `run` calls.
//! - [`pool`]: the [`ThreadPool`] behind the ABI's `parallel_for`.
//! - [`cpu`]: architecture and CPU-feature checks.

pub mod abi;
pub mod cpu;
mod dtype;
mod error;
pub mod loader;
pub mod pool;
pub mod session;

pub use dtype::DType;
pub use error::{Direction, LoadError, LoadErrorKind, RunError, SessionError};
pub use loader::{Model, ModelInfo, TensorSpec};
pub use pool::ThreadPool;
pub use session::{Session, TensorBuf, TensorRef};
