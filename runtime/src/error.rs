//! Errors of loading a model, creating a session and running it. Every message names
//! the file or tensor at fault and what was expected.

use std::fmt;
use std::path::PathBuf;

use crate::DType;

/// Why `Model::load` refused a file. Displays as "PATH: reason".
#[derive(Debug)]
pub struct LoadError {
    pub path: PathBuf,
    pub kind: LoadErrorKind,
}

#[derive(Debug)]
pub enum LoadErrorKind {
    /// The file is missing or unreadable.
    Io(std::io::Error),
    /// The dynamic loader refused the file (not a shared object, wrong format, missing
    /// dependency, ...).
    Open(libloading::Error),
    /// A symbol the ABI requires is not exported.
    MissingSymbol { symbol: &'static str, source: libloading::Error },
    /// `cnnc_model_info()` returned null.
    NullInfo,
    AbiVersion { found: u32, expected: u32 },
    /// The code was compiled for another architecture.
    WrongArchitecture { target: String, host_arch: &'static str },
    /// The code uses CPU features this CPU lacks.
    MissingCpuFeatures { missing: Vec<String>, target: String, all_features: Vec<String> },
    /// A feature name this runtime cannot check, so it cannot vouch for the CPU.
    UnknownCpuFeature { feature: String, host_arch: &'static str },
    /// The metadata is malformed: null pointers, absurd counts, unknown dtype codes, ...
    BadMetadata(String),
}

impl LoadError {
    pub(crate) fn new(path: impl Into<PathBuf>, kind: LoadErrorKind) -> LoadError {
        LoadError { path: path.into(), kind }
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            LoadErrorKind::Io(e) => write!(f, "{path}: cannot read the model: {e}"),
            LoadErrorKind::Open(e) => write!(f, "{path}: not a loadable shared object: {e}"),
            LoadErrorKind::MissingSymbol { symbol, source } => write!(
                f,
                "{path}: does not export `{symbol}`, so it is not a cnnc model (or was built by an incompatible cnnc): {source}"
            ),
            LoadErrorKind::NullInfo => write!(f, "{path}: cnnc_model_info() returned a null pointer"),
            LoadErrorKind::AbiVersion { found, expected } => write!(
                f,
                "{path}: model ABI version {found}, but this runtime implements ABI version {expected}; recompile the model with a matching cnnc"
            ),
            LoadErrorKind::WrongArchitecture { target, host_arch } => write!(
                f,
                "{path}: compiled for target {target}, which cannot run on this {host_arch} machine; recompile with --target for this machine"
            ),
            LoadErrorKind::MissingCpuFeatures { missing, target, all_features } => write!(
                f,
                "{path} needs CPU features {} which this CPU lacks (it was compiled for {target} with features {}; recompile with --cpu host)",
                missing.join(", "),
                all_features.join(",")
            ),
            LoadErrorKind::UnknownCpuFeature { feature, host_arch } => write!(
                f,
                "{path}: needs CPU feature `{feature}`, which this runtime cannot check on {host_arch}; refusing to run code that may use missing instructions"
            ),
            LoadErrorKind::BadMetadata(what) => write!(f, "{path}: malformed model metadata: {what}"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            LoadErrorKind::Io(e) => Some(e),
            LoadErrorKind::Open(e) | LoadErrorKind::MissingSymbol { source: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// Why a `Session` could not be created.
#[derive(Debug)]
pub enum SessionError {
    /// The workspace size and alignment do not form a valid allocation, or it failed.
    Workspace { size: usize, align: usize, reason: &'static str },
    /// A worker thread could not be started.
    ThreadSpawn(std::io::Error),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Workspace { size, align, reason } => {
                write!(f, "cannot allocate the model's workspace of {size} bytes aligned to {align}: {reason}")
            }
            SessionError::ThreadSpawn(e) => write!(f, "cannot start a worker thread: {e}"),
        }
    }
}

impl std::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SessionError::ThreadSpawn(e) => Some(e),
            SessionError::Workspace { .. } => None,
        }
    }
}

/// Input or output, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Input => "input",
            Direction::Output => "output",
        })
    }
}

/// Why `Session::run` refused or failed a call.
#[derive(Debug, PartialEq, Eq)]
pub enum RunError {
    /// Wrong number of input or output buffers.
    BufferCount { direction: Direction, expected: usize, given: usize },
    /// A buffer's byte length does not match its tensor.
    BufferSize {
        direction: Direction,
        index: usize,
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        expected_bytes: usize,
        given_bytes: usize,
    },
    /// A typed buffer has another element type than its tensor.
    DTypeMismatch { direction: Direction, index: usize, name: String, expected: DType, given: DType },
    /// The model was compiled without an inference entry point.
    NoInferenceEntry,
    /// The model was compiled without the training entry points.
    NoTrainingEntry,
    /// The state buffer's length is not the model's `state_size`.
    StateSize { expected_bytes: usize, given_bytes: usize },
    /// `cnnc_infer` returned a nonzero status.
    Status(i32),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::BufferCount { direction, expected, given } => {
                write!(f, "the model has {expected} {direction}(s), but {given} {direction} buffer(s) were given")
            }
            RunError::BufferSize { direction, index, name, dtype, shape, expected_bytes, given_bytes } => write!(
                f,
                "{direction} {index} `{name}` is {dtype} {shape:?} ({expected_bytes} bytes), but its buffer has {given_bytes} bytes"
            ),
            RunError::DTypeMismatch { direction, index, name, expected, given } => {
                write!(f, "{direction} {index} `{name}` is {expected}, but a {given} buffer was given")
            }
            RunError::NoInferenceEntry => write!(f, "the model was compiled without an inference entry point (cnnc_infer)"),
            RunError::NoTrainingEntry => write!(f, "the model was compiled without the training entry points (cnnc compile --train)"),
            RunError::StateSize { expected_bytes, given_bytes } => {
                write!(f, "the state buffer has {given_bytes} bytes, the model's state takes {expected_bytes}")
            }
            RunError::Status(status) => write!(f, "cnnc_infer failed with status {status}"),
        }
    }
}

impl std::error::Error for RunError {}
