//! Cranelift compilation of a module's functions on several threads.
//!
//! Building a graph's module is mostly serial work (kernel IR, weight packing, data
//! objects) interleaved with Cranelift compiling each function the moment it is
//! defined. [`with_parallel_compile`] hands the body a [`ParallelCompile`] module that
//! forwards everything to the real module except `define_function`: that takes the
//! function out of the caller's `Context` and queues it for worker threads, which
//! compile it with their own copy of the ISA while the body goes on. At the end the
//! caller's thread helps drain the queue, then every function is defined from its
//! machine code (`define_function_bytes`) in the order it was submitted, so the
//! object file is the same as when compiling serially.
//!
//! Serial compilation (`CNNC_COMPILE_THREADS=1`, one CPU, `CNNC_DISASM`, which prints
//! each function as it is compiled) defines functions as they come, unchanged.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use cranelift_codegen::Context;
use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::ir::{Function, Signature};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetIsa};
use cranelift_module::{
    DataDescription, DataId, FuncId, Linkage, Module, ModuleDeclarations, ModuleReloc, ModuleResult,
};

use crate::kernels::CodegenError;
use crate::target::TargetSpec;

/// Most compile threads used (the caller's included): a few hundred functions of a
/// few milliseconds each do not keep more busy.
const MAX_THREADS: usize = 8;

/// Runs `body` with a module that compiles functions on up to `MAX_THREADS` threads,
/// then defines them all in `module`.
pub fn with_parallel_compile<M: Module, R>(
    module: &mut M,
    target: &TargetSpec,
    body: impl FnOnce(&mut ParallelCompile<'_, '_, M>) -> Result<R, CodegenError>,
) -> Result<R, CodegenError> {
    let threads = compile_threads();
    let worker_isa = if threads > 1 { same_isa(module.isa(), target) } else { None };
    std::thread::scope(|scope| {
        let mut parallel = ParallelCompile::new(module, worker_isa, threads, scope);
        let result = body(&mut parallel);
        let finished = parallel.finish();
        let value = result?;
        finished?;
        Ok(value)
    })
}

thread_local! {
    static THREADS_OVERRIDE: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Compile threads for modules built on the calling thread from now on (`None`: the
/// default of [`compile_threads`]); for tests comparing serial and parallel output.
pub fn set_compile_threads(threads: Option<usize>) {
    THREADS_OVERRIDE.with(|t| t.set(threads));
}

/// Threads to compile on: `CNNC_COMPILE_THREADS` if set, else the CPUs available; 1
/// when `CNNC_DISASM` asks for each function's code as it is compiled.
fn compile_threads() -> usize {
    if std::env::var_os("CNNC_DISASM").is_some() {
        return 1;
    }
    if let Some(n) = THREADS_OVERRIDE.with(|t| t.get()) {
        return n.clamp(1, MAX_THREADS);
    }
    if let Some(n) = std::env::var("CNNC_COMPILE_THREADS").ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        return n.clamp(1, MAX_THREADS);
    }
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS)
}

/// A second ISA with exactly `isa`'s settings, for the workers (`module.isa()` stays
/// borrowed by the module); None if it cannot be rebuilt identically.
fn same_isa(isa: &dyn TargetIsa, target: &TargetSpec) -> Option<Arc<dyn TargetIsa>> {
    let copy: OwnedTargetIsa = target.isa(isa.flags().is_pic()).ok()?;
    let settings = |i: &dyn TargetIsa| {
        let isa_flags: Vec<String> = i.isa_flags().iter().map(|v| format!("{}={}", v.name, v.value_string())).collect();
        (i.triple().to_string(), i.flags().to_string(), isa_flags)
    };
    (settings(isa) == settings(&*copy)).then_some(copy)
}

struct Job {
    index: usize,
    id: FuncId,
    func: Function,
}

/// A compiled function, ready for `define_function_bytes`.
struct Compiled {
    id: FuncId,
    alignment: u64,
    code: Vec<u8>,
    relocs: Vec<ModuleReloc>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    job_posted: Condvar,
    /// By submission index; an error is the message of a failed compilation.
    results: Mutex<Vec<Option<Result<Compiled, String>>>>,
}

/// A [`Module`] that queues function definitions for compile threads (see the module
/// docs) and forwards everything else to the module it wraps.
pub struct ParallelCompile<'scope, 'm, M: Module> {
    inner: &'m mut M,
    shared: Arc<Shared>,
    isa: Option<Arc<dyn TargetIsa>>,
    workers: Vec<ScopedJoinHandle<'scope, ()>>,
    submitted: usize,
}

impl<'scope, 'm, M: Module> ParallelCompile<'scope, 'm, M> {
    fn new<'env>(
        inner: &'m mut M,
        isa: Option<Arc<dyn TargetIsa>>,
        threads: usize,
        scope: &'scope Scope<'scope, 'env>,
    ) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            job_posted: Condvar::new(),
            results: Mutex::new(Vec::new()),
        });
        let mut workers = Vec::new();
        if let Some(isa) = &isa {
            for _ in 1..threads {
                let (shared, isa) = (Arc::clone(&shared), Arc::clone(isa));
                workers.push(scope.spawn(move || work(&shared, &*isa)));
            }
        }
        let isa = if workers.is_empty() { None } else { isa };
        ParallelCompile { inner, shared, isa, workers, submitted: 0 }
    }

    /// Compiles what is still queued (on this thread too), waits for the workers, and
    /// defines every queued function in submission order.
    fn finish(&mut self) -> Result<(), CodegenError> {
        let Some(isa) = self.isa.take() else {
            return Ok(());
        };
        lock(&self.shared.queue).closed = true;
        self.shared.job_posted.notify_all();
        work(&self.shared, &*isa);
        for worker in self.workers.drain(..) {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        let results = std::mem::take(&mut *lock(&self.shared.results));
        for (index, result) in results.into_iter().enumerate() {
            let compiled = result
                .ok_or_else(|| CodegenError(format!("internal: queued function {index} was not compiled")))?
                .map_err(CodegenError)?;
            let name = self.inner.declarations().get_function_decl(compiled.id).linkage_name(compiled.id).into_owned();
            self.inner
                .define_function_bytes(compiled.id, compiled.alignment, &compiled.code, &compiled.relocs)
                .map_err(|e| CodegenError(format!("{name}: {e}")))?;
        }
        Ok(())
    }
}

impl<M: Module> Drop for ParallelCompile<'_, '_, M> {
    /// After an error in the body: drop what is queued and let the workers exit (the
    /// scope joins them).
    fn drop(&mut self) {
        let mut queue = lock(&self.shared.queue);
        queue.jobs.clear();
        queue.closed = true;
        drop(queue);
        self.shared.job_posted.notify_all();
    }
}

/// Compiles queued jobs until the queue is closed and empty.
fn work(shared: &Shared, isa: &dyn TargetIsa) {
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.closed {
                    return;
                }
                queue = shared.job_posted.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        let index = job.index;
        let result = compile(job, isa);
        lock(&shared.results)[index] = Some(result);
    }
}

fn compile(job: Job, isa: &dyn TargetIsa) -> Result<Compiled, String> {
    let mut ctx = Context::for_function(job.func);
    let alignment = match ctx.compile(isa, &mut ControlPlane::default()) {
        Ok(code) => code.buffer.alignment as u64,
        Err(e) => {
            return Err(format!(
                "function '{}': {}",
                e.func.name,
                cranelift_codegen::print_errors::pretty_error(e.func, e.inner)
            ));
        }
    };
    let code = ctx.compiled_code().ok_or_else(|| format!("function '{}': no code after compiling", ctx.func.name))?;
    let relocs =
        code.buffer.relocs().iter().map(|reloc| ModuleReloc::from_mach_reloc(reloc, &ctx.func, job.id)).collect();
    Ok(Compiled { id: job.id, alignment, code: code.code_buffer().to_vec(), relocs })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<M: Module> Module for ParallelCompile<'_, '_, M> {
    fn isa(&self) -> &dyn TargetIsa {
        self.inner.isa()
    }

    fn declarations(&self) -> &ModuleDeclarations {
        self.inner.declarations()
    }

    fn declare_function(&mut self, name: &str, linkage: Linkage, signature: &Signature) -> ModuleResult<FuncId> {
        self.inner.declare_function(name, linkage, signature)
    }

    fn declare_anonymous_function(&mut self, signature: &Signature) -> ModuleResult<FuncId> {
        self.inner.declare_anonymous_function(signature)
    }

    fn declare_data(&mut self, name: &str, linkage: Linkage, writable: bool, tls: bool) -> ModuleResult<DataId> {
        self.inner.declare_data(name, linkage, writable, tls)
    }

    fn declare_anonymous_data(&mut self, writable: bool, tls: bool) -> ModuleResult<DataId> {
        self.inner.declare_anonymous_data(writable, tls)
    }

    /// Queued: the function leaves `ctx` (which holds no compiled code afterwards).
    fn define_function_with_control_plane(
        &mut self,
        func: FuncId,
        ctx: &mut Context,
        ctrl_plane: &mut ControlPlane,
    ) -> ModuleResult<()> {
        if self.isa.is_none() {
            return self.inner.define_function_with_control_plane(func, ctx, ctrl_plane);
        }
        let index = self.submitted;
        self.submitted += 1;
        lock(&self.shared.results).push(None);
        let body = std::mem::replace(&mut ctx.func, Function::new());
        lock(&self.shared.queue).jobs.push_back(Job { index, id: func, func: body });
        self.shared.job_posted.notify_one();
        Ok(())
    }

    fn define_function_bytes(
        &mut self,
        func_id: FuncId,
        alignment: u64,
        bytes: &[u8],
        relocs: &[ModuleReloc],
    ) -> ModuleResult<()> {
        self.inner.define_function_bytes(func_id, alignment, bytes, relocs)
    }

    fn define_data(&mut self, data_id: DataId, data: &DataDescription) -> ModuleResult<()> {
        self.inner.define_data(data_id, data)
    }
}
