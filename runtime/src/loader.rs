//! Loading a compiled model: open the shared object, check that this process can run
//! it (ABI version, architecture, CPU features) and copy its metadata into owned types.

use std::ffi::{CStr, c_char};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libloading::Library;

use crate::error::{LoadError, LoadErrorKind};
use crate::{DType, abi, cpu};

/// Counts above these are taken as corrupt metadata rather than allocated blindly.
const MAX_TENSORS: u32 = 1 << 20;
const MAX_RANK: u32 = 64;

/// One input, output or state tensor of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset inside the state buffer (state tensors only; 0 otherwise).
    pub offset: usize,
}

impl TensorSpec {
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the tensor's dense buffer. The loader has checked that it fits.
    pub fn byte_len(&self) -> usize {
        self.element_count() * self.dtype.size()
    }
}

/// A model's metadata, copied out of `cnnc_model_info()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    pub name: String,
    /// Target triple the code was compiled for.
    pub target: String,
    /// CPU features the code uses (all present on this CPU, or loading would have failed).
    pub cpu_features: Vec<String>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub workspace_size: usize,
    /// A power of two (an ABI value of 0 is read as 1).
    pub workspace_align: usize,
    /// `abi::ENTRY_*` bits.
    pub entry_flags: u64,
    pub state_size: usize,
    pub state_tensors: Vec<TensorSpec>,
}

impl ModelInfo {
    pub fn has_inference(&self) -> bool {
        self.entry_flags & abi::ENTRY_INFER != 0
    }

    pub fn has_training(&self) -> bool {
        self.entry_flags & abi::ENTRY_TRAIN != 0
    }
}

/// A loaded model. Cloning is cheap and shares the library, which stays loaded until the
/// last clone and the last `Session` made from it are dropped.
#[derive(Clone)]
pub struct Model {
    inner: Arc<Loaded>,
}

struct Loaded {
    path: PathBuf,
    info: ModelInfo,
    infer: Option<abi::InferFn>,
    train_step: Option<abi::TrainStepFn>,
    compute_gradients: Option<abi::ComputeGradientsFn>,
    apply_update: Option<abi::ApplyUpdateFn>,
    // Declared last so it is dropped last: the function pointers above point into it.
    _library: Library,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.inner.path).field("info", &self.inner.info).finish()
    }
}

impl Model {
    /// Loads a cnnc-compiled shared object and checks that this process can run it.
    ///
    /// Loading runs the library's initialisers and, later, its code in this process:
    /// only load files produced by cnnc. The dynamic loader shares one copy of a path
    /// per process, so a file rewritten in place while an earlier `Model` of it is
    /// alive is not reloaded; compile to a fresh path instead.
    pub fn load(path: impl AsRef<Path>) -> Result<Model, LoadError> {
        let given = path.as_ref();
        let err = |kind| LoadError::new(given, kind);
        // dlopen searches the library path for a name without a slash; a relative path
        // given by a user means the file in the working directory.
        let absolute = std::path::absolute(given).map_err(|e| err(LoadErrorKind::Io(e)))?;
        let metadata = std::fs::metadata(&absolute).map_err(|e| err(LoadErrorKind::Io(e)))?;
        if !metadata.is_file() {
            return Err(err(LoadErrorKind::Io(std::io::Error::other("not a regular file"))));
        }
        // SAFETY: loading runs the library's initialisers; cnnc's objects have none of
        // their own, and the documented contract is to load only cnnc output.
        let library = unsafe { Library::new(&absolute) }.map_err(|e| err(LoadErrorKind::Open(e)))?;
        let info_fn = symbol::<abi::ModelInfoFn>(&library, abi::SYM_MODEL_INFO).map_err(&err)?;
        // SAFETY: the symbol has the ABI's signature (checked below through abi_version).
        let raw_info = unsafe { info_fn() };
        let info = unsafe { read_info(raw_info) }.map_err(&err)?;
        let infer = if info.has_inference() {
            Some(symbol::<abi::InferFn>(&library, abi::SYM_INFER).map_err(&err)?)
        } else {
            None
        };
        // Looked up, not required: `Session::train_step` reports a missing entry point.
        let train_step =
            if info.has_training() { symbol::<abi::TrainStepFn>(&library, abi::SYM_TRAIN_STEP).ok() } else { None };
        let compute_gradients = if info.has_training() {
            symbol::<abi::ComputeGradientsFn>(&library, abi::SYM_COMPUTE_GRADIENTS).ok()
        } else {
            None
        };
        let apply_update =
            if info.has_training() { symbol::<abi::ApplyUpdateFn>(&library, abi::SYM_APPLY_UPDATE).ok() } else { None };
        Ok(Model {
            inner: Arc::new(Loaded {
                path: given.to_owned(),
                info,
                infer,
                train_step,
                compute_gradients,
                apply_update,
                _library: library,
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// The path as given to `load`.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn infer_fn(&self) -> Option<abi::InferFn> {
        self.inner.infer
    }

    pub(crate) fn train_step_fn(&self) -> Option<abi::TrainStepFn> {
        self.inner.train_step
    }

    pub(crate) fn compute_gradients_fn(&self) -> Option<abi::ComputeGradientsFn> {
        self.inner.compute_gradients
    }

    pub(crate) fn apply_update_fn(&self) -> Option<abi::ApplyUpdateFn> {
        self.inner.apply_update
    }
}

fn symbol<T: Copy>(library: &Library, name: &'static str) -> Result<T, LoadErrorKind> {
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    // SAFETY: T is the ABI's type for `name`; the copied pointer is used only while the
    // library is alive (Model keeps it).
    unsafe { library.get::<T>(&c_name) }
        .map(|s| *s)
        .map_err(|source| LoadErrorKind::MissingSymbol { symbol: name, source })
}

/// Checks and copies the C metadata.
///
/// # Safety
/// `raw` is null or points to a `ModelInfo` of some ABI version whose first field is
/// `abi_version`; for version 1 every non-null pointer in it is valid as the ABI says.
unsafe fn read_info(raw: *const abi::ModelInfo) -> Result<ModelInfo, LoadErrorKind> {
    if raw.is_null() {
        return Err(LoadErrorKind::NullInfo);
    }
    // Only the version field is common to all ABI versions; read it alone first.
    let found = unsafe { raw.cast::<u32>().read() };
    if found != abi::ABI_VERSION {
        return Err(LoadErrorKind::AbiVersion { found, expected: abi::ABI_VERSION });
    }
    let raw = unsafe { &*raw };

    let target = unsafe { read_str(raw.target, "target") }?;
    let host_arch = std::env::consts::ARCH;
    if cpu::triple_arch(&target) != host_arch {
        return Err(LoadErrorKind::WrongArchitecture { target, host_arch });
    }
    let cpu_features = cpu::parse_feature_list(&unsafe { read_str(raw.cpu_features, "cpu_features") }?);
    check_cpu_features(&cpu_features, &target)?;

    let name = unsafe { read_str(raw.model_name, "model_name") }?;
    let inputs = unsafe { read_tensors(raw.inputs, raw.num_inputs, "inputs") }?;
    let outputs = unsafe { read_tensors(raw.outputs, raw.num_outputs, "outputs") }?;
    let state_tensors = unsafe { read_tensors(raw.state_tensors, raw.num_state_tensors, "state_tensors") }?;

    let workspace_size = to_usize(raw.workspace_size, "workspace_size")?;
    let workspace_align = to_usize(raw.workspace_align.max(1), "workspace_align")?;
    if std::alloc::Layout::from_size_align(workspace_size, workspace_align).is_err() {
        return Err(LoadErrorKind::BadMetadata(format!(
            "workspace of {workspace_size} bytes aligned to {workspace_align}: the alignment must be a power of two and the size at most isize::MAX"
        )));
    }
    let state_size = to_usize(raw.state_size, "state_size")?;
    for t in &state_tensors {
        if t.offset.checked_add(t.byte_len()).is_none_or(|end| end > state_size) {
            return Err(LoadErrorKind::BadMetadata(format!(
                "state tensor `{}` ({} bytes at offset {}) does not fit in the state buffer of {state_size} bytes",
                t.name,
                t.byte_len(),
                t.offset
            )));
        }
    }
    Ok(ModelInfo {
        name,
        target,
        cpu_features,
        inputs,
        outputs,
        workspace_size,
        workspace_align,
        entry_flags: raw.entry_flags,
        state_size,
        state_tensors,
    })
}

fn check_cpu_features(features: &[String], target: &str) -> Result<(), LoadErrorKind> {
    let mut missing = Vec::new();
    for feature in features {
        match cpu::has_feature(feature) {
            Some(true) => {}
            Some(false) => missing.push(feature.clone()),
            None => {
                return Err(LoadErrorKind::UnknownCpuFeature {
                    feature: feature.clone(),
                    host_arch: std::env::consts::ARCH,
                });
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LoadErrorKind::MissingCpuFeatures { missing, target: target.to_owned(), all_features: features.to_vec() })
    }
}

fn to_usize(value: u64, field: &str) -> Result<usize, LoadErrorKind> {
    usize::try_from(value).map_err(|_| LoadErrorKind::BadMetadata(format!("{field} = {value} does not fit in memory")))
}

/// # Safety
/// `ptr` is null or a NUL-terminated string.
unsafe fn read_str(ptr: *const c_char, field: &str) -> Result<String, LoadErrorKind> {
    if ptr.is_null() {
        return Err(LoadErrorKind::BadMetadata(format!("{field} is a null pointer")));
    }
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map(str::to_owned)
        .map_err(|_| LoadErrorKind::BadMetadata(format!("{field} is not valid UTF-8")))
}

/// # Safety
/// `ptr` is null or points to `count` descriptors whose pointers are valid.
unsafe fn read_tensors(ptr: *const abi::TensorDesc, count: u32, field: &str) -> Result<Vec<TensorSpec>, LoadErrorKind> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_TENSORS {
        return Err(LoadErrorKind::BadMetadata(format!("{field}: {count} tensors is more than the {MAX_TENSORS} allowed")));
    }
    if ptr.is_null() {
        return Err(LoadErrorKind::BadMetadata(format!("{field} is a null pointer but its count is {count}")));
    }
    let descs = unsafe { std::slice::from_raw_parts(ptr, count as usize) };
    descs.iter().enumerate().map(|(i, d)| unsafe { read_tensor(d, &format!("{field}[{i}]")) }).collect()
}

/// # Safety
/// The descriptor's pointers are null or valid for its rank.
unsafe fn read_tensor(desc: &abi::TensorDesc, field: &str) -> Result<TensorSpec, LoadErrorKind> {
    let name = unsafe { read_str(desc.name, &format!("{field}.name")) }?;
    let bad = |what: String| LoadErrorKind::BadMetadata(format!("{field} `{name}`: {what}"));
    let dtype = DType::from_abi_code(desc.dtype).ok_or_else(|| bad(format!("unknown dtype code {}", desc.dtype)))?;
    if desc.rank > MAX_RANK {
        return Err(bad(format!("rank {} is more than the {MAX_RANK} allowed", desc.rank)));
    }
    let dims: &[u64] = if desc.rank == 0 {
        &[]
    } else if desc.shape.is_null() {
        return Err(bad(format!("shape is a null pointer but the rank is {}", desc.rank)));
    } else {
        unsafe { std::slice::from_raw_parts(desc.shape, desc.rank as usize) }
    };
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d} does not fit in memory"))))
        .collect::<Result<_, _>>()?;
    let fits_in_memory = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .is_some_and(|bytes| bytes <= isize::MAX as usize);
    if !fits_in_memory {
        return Err(bad(format!("shape {shape:?} of {dtype} is too large to allocate")));
    }
    let offset = to_usize(desc.offset, &format!("{field}.offset"))?;
    Ok(TensorSpec { name, dtype, shape, offset })
}
