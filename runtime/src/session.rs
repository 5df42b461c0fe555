//! A session: what one caller needs to run a model repeatedly (workspace, thread pool).
//! Sessions of the same model are independent and may run at the same time on
//! different threads.

use std::alloc::Layout;
use std::ffi::c_void;
use std::ptr::NonNull;

use crate::error::{Direction, RunError, SessionError};
use crate::pool::ThreadPool;
use crate::{DType, Model, ModelInfo, TensorSpec, abi};

/// Hyper-parameter scalar inputs of a training model's `cnnc_infer` (fields of `abi::Hyper`).
const TRAIN_HYPER_INPUTS: usize = 7;

pub struct Session {
    model: Model,
    workspace: Workspace,
    /// `None` for one thread: the model then runs everything on the calling thread.
    pool: Option<ThreadPool>,
    // Reused between calls so `run` allocates nothing.
    input_ptrs: Vec<*const c_void>,
    output_ptrs: Vec<*mut c_void>,
}

// SAFETY: the raw pointers are the session's own workspace and per-call scratch; a
// session is used by one thread at a time (`run` takes `&mut self`).
unsafe impl Send for Session {}

impl Session {
    /// A session running on `threads` threads (the caller included; 0 means one per
    /// available CPU).
    pub fn new(model: &Model, threads: usize) -> Result<Session, SessionError> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let info = model.info();
        let workspace = Workspace::new(info.workspace_size, info.workspace_align)?;
        let pool = if threads > 1 { Some(ThreadPool::new(threads).map_err(SessionError::ThreadSpawn)?) } else { None };
        Ok(Session {
            model: model.clone(),
            workspace,
            pool,
            input_ptrs: Vec::with_capacity(info.inputs.len()),
            output_ptrs: Vec::with_capacity(info.outputs.len()),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn info(&self) -> &ModelInfo {
        self.model.info()
    }

    /// Threads a parallel loop is spread over, the caller included.
    pub fn num_threads(&self) -> usize {
        self.pool.as_ref().map_or(1, ThreadPool::num_threads)
    }

    /// Runs inference on raw buffers: one per input and per output, in the model's
    /// order, each dense row-major little-endian with exactly the tensor's byte length
    /// (`TensorSpec::byte_len`). Buffers need no particular alignment.
    pub fn run(&mut self, inputs: &[&[u8]], outputs: &mut [&mut [u8]]) -> Result<(), RunError> {
        let infer = self.inference_entry()?;
        let info = self.model.info();
        check_buffers(Direction::Input, &info.inputs, inputs.iter().map(|b| b.len()))?;
        check_buffers(Direction::Output, &info.outputs, outputs.iter().map(|b| b.len()))?;

        self.input_ptrs.clear();
        self.input_ptrs.extend(inputs.iter().map(|b| b.as_ptr().cast::<c_void>()));
        self.output_ptrs.clear();
        self.output_ptrs.extend(outputs.iter_mut().map(|b| b.as_mut_ptr().cast::<c_void>()));
        let host = match &self.pool {
            Some(pool) => pool.host(),
            None => abi::Host { user: std::ptr::null_mut(), parallel_for: None, num_threads: 1, reserved: 0 },
        };
        // SAFETY: every buffer has been checked against the model's metadata, the
        // workspace has the size and alignment it asked for, and the library is alive
        // (the session holds the model).
        let status = unsafe { infer(&host, self.input_ptrs.as_ptr(), self.output_ptrs.as_ptr(), self.workspace.as_ptr()) };
        if status == abi::STATUS_OK { Ok(()) } else { Err(RunError::Status(status)) }
    }

    /// Runs inference on typed buffers and returns freshly allocated outputs. Each
    /// input's dtype must match the model's.
    pub fn run_typed(&mut self, inputs: &[TensorRef<'_>]) -> Result<Vec<TensorBuf>, RunError> {
        self.inference_entry()?;
        let info = self.model.info();
        check_buffers(Direction::Input, &info.inputs, inputs.iter().map(|t| t.as_bytes().len()))
            .and_then(|()| check_dtypes(Direction::Input, &info.inputs, inputs.iter().map(TensorRef::dtype)))?;
        let mut outputs: Vec<TensorBuf> = info.outputs.iter().map(TensorBuf::zeros_for).collect();
        let input_bytes: Vec<&[u8]> = inputs.iter().map(TensorRef::as_bytes).collect();
        let mut output_bytes: Vec<&mut [u8]> = outputs.iter_mut().map(TensorBuf::as_bytes_mut).collect();
        self.run(&input_bytes, &mut output_bytes)?;
        Ok(outputs)
    }

    /// `run_typed` for a model whose inputs and outputs are all f32.
    pub fn run_f32(&mut self, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, RunError> {
        self.inference_entry()?;
        let info = self.model.info();
        check_dtypes(Direction::Output, &info.outputs, info.outputs.iter().map(|_| DType::F32))?;
        let typed: Vec<TensorRef<'_>> = inputs.iter().map(|&data| TensorRef::F32(data)).collect();
        let outputs = self.run_typed(&typed)?;
        Ok(outputs
            .into_iter()
            .map(|t| match t {
                TensorBuf::F32(v) => v,
                // Outputs were checked to be f32 above.
                _ => Vec::new(),
            })
            .collect())
    }

    /// The model's data inputs in a training model (`cnnc compile --train`): the inputs
    /// after the leading state tensors, before the labels and the seven hyper-parameters.
    pub fn training_data_inputs(&self) -> &[TensorSpec] {
        let info = self.model.info();
        let leading_state = info.inputs.iter().zip(&info.state_tensors).take_while(|(i, s)| i.name == s.name).count();
        let end = info.inputs.len().saturating_sub(1 + TRAIN_HYPER_INPUTS).max(leading_state);
        &info.inputs[leading_state..end]
    }

    /// One training step (`cnnc_train_step`) in place on `state` (`state_size` bytes, laid
    /// out as `state_tensors` says; optimizer buffers zero before the first step).
    /// `inputs`: one buffer per `training_data_inputs()`; `labels`: int64 class indices.
    /// Returns the loss.
    pub fn train_step(&mut self, state: &mut [u8], inputs: &[&[u8]], labels: &[i64], hyper: &abi::Hyper) -> Result<f32, RunError> {
        let train = self.model.train_step_fn().ok_or(RunError::NoTrainingEntry)?;
        self.check_batch(state, inputs, labels)?;
        let host = self.host();
        let mut loss = 0f32;
        // SAFETY: the state, data and label buffers were checked against the model's
        // metadata, the workspace has the size and alignment it asked for, and the
        // library is alive (the session holds the model).
        let status = unsafe {
            train(
                &host,
                state.as_mut_ptr().cast::<c_void>(),
                self.input_ptrs.as_ptr(),
                labels.as_ptr().cast::<c_void>(),
                hyper,
                self.workspace.as_ptr(),
                &mut loss,
            )
        };
        if status == abi::STATUS_OK { Ok(loss) } else { Err(RunError::Status(status)) }
    }

    /// Forward and backward (`cnnc_compute_gradients`) on `state`: every parameter's
    /// gradient into its "<parameter>.grad" slot, the BatchNorm running statistics updated,
    /// no optimizer update. Buffers as for `train_step`. Returns the loss.
    pub fn compute_gradients(&mut self, state: &mut [u8], inputs: &[&[u8]], labels: &[i64]) -> Result<f32, RunError> {
        let compute = self.model.compute_gradients_fn().ok_or(RunError::NoTrainingEntry)?;
        self.check_batch(state, inputs, labels)?;
        let host = self.host();
        let mut loss = 0f32;
        // SAFETY: as in `train_step`.
        let status = unsafe {
            compute(
                &host,
                state.as_mut_ptr().cast::<c_void>(),
                self.input_ptrs.as_ptr(),
                labels.as_ptr().cast::<c_void>(),
                self.workspace.as_ptr(),
                &mut loss,
            )
        };
        if status == abi::STATUS_OK { Ok(loss) } else { Err(RunError::Status(status)) }
    }

    /// The optimizer update (`cnnc_apply_update`) of `state`'s parameters and optimizer
    /// buffers from the gradients in its ".grad" slots (left by `compute_gradients`, or
    /// accumulated or all-reduced by the caller since).
    pub fn apply_update(&mut self, state: &mut [u8], hyper: &abi::Hyper) -> Result<(), RunError> {
        let update = self.model.apply_update_fn().ok_or(RunError::NoTrainingEntry)?;
        self.check_state(state)?;
        let host = self.host();
        // SAFETY: the state buffer was checked against the model's metadata, the workspace
        // has the size and alignment it asked for, and the library is alive.
        let status = unsafe { update(&host, state.as_mut_ptr().cast::<c_void>(), hyper, self.workspace.as_ptr()) };
        if status == abi::STATUS_OK { Ok(()) } else { Err(RunError::Status(status)) }
    }

    fn check_state(&self, state: &[u8]) -> Result<(), RunError> {
        let info = self.model.info();
        if state.len() != info.state_size {
            return Err(RunError::StateSize { expected_bytes: info.state_size, given_bytes: state.len() });
        }
        Ok(())
    }

    /// Checks a training call's buffers and points `input_ptrs` at the data inputs.
    fn check_batch(&mut self, state: &[u8], inputs: &[&[u8]], labels: &[i64]) -> Result<(), RunError> {
        self.check_state(state)?;
        let info = self.model.info();
        let data = self.training_data_inputs();
        check_buffers(Direction::Input, data, inputs.iter().map(|b| b.len()))?;
        let label_spec = &info.inputs[info.inputs.len() - 1 - TRAIN_HYPER_INPUTS];
        check_buffers(Direction::Input, std::slice::from_ref(label_spec), std::iter::once(std::mem::size_of_val(labels)))?;
        self.input_ptrs.clear();
        self.input_ptrs.extend(inputs.iter().map(|b| b.as_ptr().cast::<c_void>()));
        Ok(())
    }

    fn host(&self) -> abi::Host {
        match &self.pool {
            Some(pool) => pool.host(),
            None => abi::Host { user: std::ptr::null_mut(), parallel_for: None, num_threads: 1, reserved: 0 },
        }
    }

    fn inference_entry(&self) -> Result<abi::InferFn, RunError> {
        self.model.infer_fn().ok_or(RunError::NoInferenceEntry)
    }
}

fn check_buffers(
    direction: Direction,
    specs: &[TensorSpec],
    lengths: impl ExactSizeIterator<Item = usize>,
) -> Result<(), RunError> {
    if lengths.len() != specs.len() {
        return Err(RunError::BufferCount { direction, expected: specs.len(), given: lengths.len() });
    }
    for (index, (spec, given_bytes)) in specs.iter().zip(lengths).enumerate() {
        if given_bytes != spec.byte_len() {
            return Err(RunError::BufferSize {
                direction,
                index,
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape: spec.shape.clone(),
                expected_bytes: spec.byte_len(),
                given_bytes,
            });
        }
    }
    Ok(())
}

fn check_dtypes(direction: Direction, specs: &[TensorSpec], dtypes: impl Iterator<Item = DType>) -> Result<(), RunError> {
    for (index, (spec, given)) in specs.iter().zip(dtypes).enumerate() {
        if spec.dtype != given {
            return Err(RunError::DTypeMismatch { direction, index, name: spec.name.clone(), expected: spec.dtype, given });
        }
    }
    Ok(())
}

/// A borrowed, typed input buffer (dense, row-major).
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
    I32(&'a [i32]),
    Bool(&'a [bool]),
}

impl TensorRef<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::I64(_) => DType::I64,
            TensorRef::I32(_) => DType::I32,
            TensorRef::Bool(_) => DType::Bool,
        }
    }

    /// The elements as the ABI's little-endian bytes (the in-memory layout on the
    /// little-endian targets cnnc supports).
    pub fn as_bytes(&self) -> &[u8] {
        match *self {
            TensorRef::F32(s) => bytes_of(s),
            TensorRef::I64(s) => bytes_of(s),
            TensorRef::I32(s) => bytes_of(s),
            TensorRef::Bool(s) => bytes_of(s),
        }
    }
}

impl<'a> From<&'a [f32]> for TensorRef<'a> {
    fn from(s: &'a [f32]) -> Self {
        TensorRef::F32(s)
    }
}
impl<'a> From<&'a [i64]> for TensorRef<'a> {
    fn from(s: &'a [i64]) -> Self {
        TensorRef::I64(s)
    }
}
impl<'a> From<&'a [i32]> for TensorRef<'a> {
    fn from(s: &'a [i32]) -> Self {
        TensorRef::I32(s)
    }
}
impl<'a> From<&'a [bool]> for TensorRef<'a> {
    fn from(s: &'a [bool]) -> Self {
        TensorRef::Bool(s)
    }
}

/// An owned, typed output buffer. Bool outputs are kept as bytes (0 or 1 per the ABI)
/// so that a model writing another value cannot create an invalid `bool`.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorBuf {
    F32(Vec<f32>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<u8>),
}

impl TensorBuf {
    /// A zeroed buffer for `spec`.
    pub fn zeros_for(spec: &TensorSpec) -> TensorBuf {
        let n = spec.element_count();
        match spec.dtype {
            DType::F32 => TensorBuf::F32(vec![0.0; n]),
            DType::I64 => TensorBuf::I64(vec![0; n]),
            DType::I32 => TensorBuf::I32(vec![0; n]),
            DType::Bool => TensorBuf::Bool(vec![0; n]),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            TensorBuf::F32(_) => DType::F32,
            TensorBuf::I64(_) => DType::I64,
            TensorBuf::I32(_) => DType::I32,
            TensorBuf::Bool(_) => DType::Bool,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorBuf::F32(v) => bytes_of(v),
            TensorBuf::I64(v) => bytes_of(v),
            TensorBuf::I32(v) => bytes_of(v),
            TensorBuf::Bool(v) => v,
        }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            TensorBuf::F32(v) => bytes_of_mut(v),
            TensorBuf::I64(v) => bytes_of_mut(v),
            TensorBuf::I32(v) => bytes_of_mut(v),
            TensorBuf::Bool(v) => v,
        }
    }
}

/// # Safety
/// The type has no padding, so every byte of a slice of it is initialised.
unsafe trait NoPadding: Copy {}
/// # Safety
/// As `NoPadding`, and every byte pattern is a valid value, so it may be written as bytes.
unsafe trait AnyBitPattern: NoPadding {}

unsafe impl NoPadding for f32 {}
unsafe impl NoPadding for i64 {}
unsafe impl NoPadding for i32 {}
unsafe impl NoPadding for bool {}
unsafe impl AnyBitPattern for f32 {}
unsafe impl AnyBitPattern for i64 {}
unsafe impl AnyBitPattern for i32 {}

fn bytes_of<T: NoPadding>(s: &[T]) -> &[u8] {
    // SAFETY: all size_of_val bytes are initialised (NoPadding).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), size_of_val(s)) }
}

fn bytes_of_mut<T: AnyBitPattern>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: initialised bytes, and any bytes written back form valid values.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), size_of_val(s)) }
}

/// The model's scratch memory, zeroed once, with the alignment the model asked for.
struct Workspace {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Workspace {
    fn new(size: usize, align: usize) -> Result<Workspace, SessionError> {
        let layout = Layout::from_size_align(size, align.max(1))
            .map_err(|_| SessionError::Workspace { size, align, reason: "invalid size or alignment" })?;
        if size == 0 {
            // Never dereferenced; aligned and non-null for code that offsets it by 0.
            let dangling = NonNull::new(layout.align() as *mut u8).unwrap_or(NonNull::dangling());
            return Ok(Workspace { ptr: dangling, layout });
        }
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(SessionError::Workspace { size, align, reason: "out of memory" })?;
        Ok(Workspace { ptr, layout })
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.layout.size() != 0 {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_honours_alignment() {
        for align in [1, 8, 64, 4096] {
            let mut ws = Workspace::new(100, align).expect("allocating");
            assert_eq!(ws.as_ptr() as usize % align, 0, "align {align}");
        }
        let mut empty = Workspace::new(0, 64).expect("empty workspace");
        assert!(!empty.as_ptr().is_null());
        assert_eq!(empty.as_ptr() as usize % 64, 0);
    }

    #[test]
    fn workspace_rejects_bad_alignment() {
        assert!(matches!(Workspace::new(16, 3), Err(SessionError::Workspace { .. })));
    }

    #[test]
    fn typed_buffers_view_their_bytes() {
        let data = [1.0f32, -2.0];
        assert_eq!(TensorRef::F32(&data).as_bytes(), &[0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]);
        let flags = [true, false];
        assert_eq!(TensorRef::from(&flags[..]).as_bytes(), &[1, 0]);
        let mut out = TensorBuf::zeros_for(&TensorSpec { name: "y".into(), dtype: DType::I32, shape: vec![2], offset: 0 });
        out.as_bytes_mut().copy_from_slice(&[7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(out, TensorBuf::I32(vec![7, -1]));
    }
}
