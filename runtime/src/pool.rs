//! The thread pool behind `abi::Host::parallel_for`.
//!
//! A pool of `threads` runs each loop on `threads - 1` workers plus the calling thread.
//! Indices are handed out one at a time from an atomic counter, so uneven tasks
//! balance themselves. A call posts the loop under a mutex, wakes only as many parked
//! workers as there are indices to share, and waits for the workers that joined.
//! Nothing is allocated per call.
//!
//! A model calls `parallel_for` once or more per layer, so the pool's latency adds up
//! over an inference: idle workers spin briefly before parking, which lets the next
//! loop of the same inference start without a futex wake-up.
//!
//! A `parallel_for` made while another is running on the same pool (a task that
//! starts a nested loop, or a second thread) runs on its calling thread alone.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::abi;

/// How long an idle worker polls for the next loop before parking. Long enough to cover
/// the serial work between two parallel layers, short enough not to steal much CPU
/// from other processes once the model is done.
const WORKER_SPIN: Duration = Duration::from_micros(100);
/// How long the caller polls for workers still finishing their last index before it
/// sleeps. Short, and without yielding: a worker still busy after this long has most
/// likely been preempted by another process, and a caller that sleeps leaves its core
/// idle, so the scheduler moves the preempted worker there at once; a caller that
/// yields stays runnable and the worker waits for its own core.
const CALLER_SPIN: Duration = Duration::from_micros(50);

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    work_posted: Condvar,
    work_finished: Condvar,
    /// Mirrors `State::generation` so spinning workers see new work without the lock.
    posted_generation: AtomicU64,
    next_index: AtomicU64,
    /// Workers that joined the current loop and have not yet left it.
    active_workers: AtomicUsize,
    /// A loop is in flight; a nested or concurrent call runs inline instead.
    busy: AtomicBool,
    num_threads: u32,
}

struct State {
    /// Bumped for every posted loop and at shutdown.
    generation: u64,
    /// The loop workers may join; cleared once every index has been handed out.
    job: Option<Job>,
    parked_workers: usize,
    shutdown: bool,
}

#[derive(Clone, Copy)]
struct Job {
    task: abi::TaskFn,
    ctx: TaskContext,
    n: u64,
}

#[derive(Clone, Copy)]
struct TaskContext(*mut c_void);

// SAFETY: the ABI makes `task(ctx, i)` callable from any thread for the duration of
// the `parallel_for` call that posted it, and the pool never uses it afterwards.
unsafe impl Send for TaskContext {}

impl ThreadPool {
    /// A pool spreading loops over `threads` threads: the caller and `threads - 1`
    /// workers. `threads` 0 is taken as 1 (no workers).
    pub fn new(threads: usize) -> std::io::Result<ThreadPool> {
        let threads = threads.clamp(1, u32::MAX as usize);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { generation: 0, job: None, parked_workers: 0, shutdown: false }),
            work_posted: Condvar::new(),
            work_finished: Condvar::new(),
            posted_generation: AtomicU64::new(0),
            next_index: AtomicU64::new(0),
            active_workers: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            num_threads: threads as u32,
        });
        let mut pool = ThreadPool { shared, workers: Vec::with_capacity(threads - 1) };
        for i in 1..threads {
            let shared = Arc::clone(&pool.shared);
            // On failure `pool` is dropped, which stops the workers already started.
            let handle =
                std::thread::Builder::new().name(format!("cnnc-worker-{i}")).spawn(move || worker_loop(&shared))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Threads a loop is spread over, the caller included.
    pub fn num_threads(&self) -> usize {
        self.shared.num_threads as usize
    }

    /// The host services to pass to a model. The pointers in it are valid while the
    /// pool is alive.
    pub fn host(&self) -> abi::Host {
        abi::Host {
            user: Arc::as_ptr(&self.shared).cast_mut().cast(),
            parallel_for: Some(parallel_for),
            num_threads: self.shared.num_threads,
            reserved: 0,
        }
    }

    /// Runs `f(i)` for every `i` in `0..n` on the pool; returns when all are done. If
    /// `f` panics, the other indices still run and the first panic is resumed here.
    pub fn for_each<F: Fn(u64) + Sync>(&self, n: u64, f: F) {
        struct Context<F> {
            f: F,
            first_panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
        }
        unsafe extern "C" fn trampoline<F: Fn(u64) + Sync>(ctx: *mut c_void, index: u64) {
            // SAFETY: ctx is the `Context` below, alive for the whole loop.
            let ctx = unsafe { &*(ctx as *const Context<F>) };
            // Unwinding out of an `extern "C"` function aborts; carry the panic over.
            if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (ctx.f)(index))) {
                ctx.first_panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(payload);
            }
        }
        let ctx = Context { f, first_panic: Mutex::new(None) };
        // SAFETY: `F: Sync` makes calling it from several threads sound, and
        // `parallel_loop` returns only after every call has finished.
        unsafe { self.shared.parallel_loop(n, trampoline::<F>, &ctx as *const Context<F> as *mut c_void) };
        if let Some(payload) = ctx.first_panic.into_inner().unwrap_or_else(PoisonError::into_inner) {
            std::panic::resume_unwind(payload);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.shared.state);
            state.shutdown = true;
            state.generation += 1;
            self.shared.posted_generation.store(state.generation, Ordering::Release);
        }
        self.shared.work_posted.notify_all();
        for worker in self.workers.drain(..) {
            // A worker cannot panic (its tasks are `extern "C"`, which abort instead);
            // an Err here would only repeat a message already printed.
            let _ = worker.join();
        }
    }
}

/// `abi::ParallelForFn` for a pool: `user` is the pointer put in `ThreadPool::host`.
///
/// # Safety
/// `user` comes from `ThreadPool::host` of a live pool; `task(ctx, i)` may be called
/// concurrently from any thread for `i` in `0..n`.
pub unsafe extern "C" fn parallel_for(user: *mut c_void, n: u64, task: abi::TaskFn, ctx: *mut c_void) {
    // SAFETY: per this function's contract, `user` points to the live pool's state.
    let shared = unsafe { &*(user as *const Shared) };
    unsafe { shared.parallel_loop(n, task, ctx) }
}

impl Shared {
    /// # Safety
    /// `task(ctx, i)` may be called concurrently from any thread for `i` in `0..n`.
    unsafe fn parallel_loop(&self, n: u64, task: abi::TaskFn, ctx: *mut c_void) {
        let job = Job { task, ctx: TaskContext(ctx), n };
        let has_workers = self.num_threads > 1;
        if n <= 1 || !has_workers || self.busy.swap(true, Ordering::Acquire) {
            // SAFETY: forwarded from this function's contract.
            unsafe { run_indices_inline(job) };
            return;
        }
        let workers_to_wake = {
            let mut state = lock(&self.state);
            self.next_index.store(0, Ordering::Relaxed);
            state.job = Some(job);
            state.generation += 1;
            self.posted_generation.store(state.generation, Ordering::Release);
            // Spinning workers find the loop themselves; the caller takes one index.
            let helpers_wanted = usize::try_from(n - 1).unwrap_or(usize::MAX);
            state.parked_workers.min(helpers_wanted)
        };
        for _ in 0..workers_to_wake {
            self.work_posted.notify_one();
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.claim_indices(job) };

        // Every index has been handed out: stop late workers from joining, then wait for
        // those still running their last one.
        lock(&self.state).job = None;
        if !spin_without_yielding(CALLER_SPIN, || self.active_workers.load(Ordering::Acquire) == 0) {
            let mut state = lock(&self.state);
            while self.active_workers.load(Ordering::Acquire) != 0 {
                state = self.work_finished.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
        }
        self.busy.store(false, Ordering::Release);
    }

    /// # Safety
    /// As for `parallel_loop`, for the loop that posted `job`.
    unsafe fn claim_indices(&self, job: Job) {
        loop {
            let index = self.next_index.fetch_add(1, Ordering::Relaxed);
            if index >= job.n {
                break;
            }
            // SAFETY: the caller of the posting `parallel_loop` is still waiting for us.
            unsafe { (job.task)(job.ctx.0, index) };
        }
    }
}

/// # Safety
/// `task(ctx, i)` may be called for `i` in `0..n`.
unsafe fn run_indices_inline(job: Job) {
    for index in 0..job.n {
        unsafe { (job.task)(job.ctx.0, index) };
    }
}

fn worker_loop(shared: &Shared) {
    let mut seen_generation = 0;
    loop {
        spin_until(WORKER_SPIN, || shared.posted_generation.load(Ordering::Acquire) != seen_generation);
        let job = {
            let mut state = lock(&shared.state);
            loop {
                if state.shutdown {
                    return;
                }
                if state.generation != seen_generation {
                    seen_generation = state.generation;
                    if let Some(job) = state.job {
                        // Under the lock, so the caller that clears `job` sees us.
                        shared.active_workers.fetch_add(1, Ordering::Relaxed);
                        break job;
                    }
                    // The loop was over before we got here.
                    continue;
                }
                state.parked_workers += 1;
                state = shared.work_posted.wait(state).unwrap_or_else(PoisonError::into_inner);
                state.parked_workers -= 1;
            }
        };
        // SAFETY: we joined while `job` was posted, so its caller waits for us to leave.
        unsafe { shared.claim_indices(job) };
        if shared.active_workers.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Taking the lock orders this wake-up after the caller's check-then-wait.
            let _state = lock(&shared.state);
            shared.work_finished.notify_all();
        }
    }
}

/// Polls `done` for up to `budget`; returns its last answer. After a short busy spin it
/// yields between polls: when the machine is oversubscribed the thread being waited
/// for may need this core.
fn spin_until(budget: Duration, mut done: impl FnMut() -> bool) -> bool {
    const BUSY_POLLS: u32 = 256;
    let start = Instant::now();
    let mut polls: u32 = 0;
    loop {
        if done() {
            return true;
        }
        polls = polls.saturating_add(1);
        if polls < BUSY_POLLS {
            std::hint::spin_loop();
            continue;
        }
        std::thread::yield_now();
        if start.elapsed() >= budget {
            return done();
        }
    }
}

/// Polls `done` for up to `budget` without giving up the core; returns its last answer.
fn spin_without_yielding(budget: Duration, mut done: impl FnMut() -> bool) -> bool {
    const POLLS_BETWEEN_CLOCK_READS: u32 = 64;
    let start = Instant::now();
    loop {
        for _ in 0..POLLS_BETWEEN_CLOCK_READS {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= budget {
            return done();
        }
    }
}

/// The pool's state stays consistent under every panic (none are expected), so a
/// poisoned lock is used as is rather than propagating a panic into C code.
fn lock(mutex: &Mutex<State>) -> MutexGuard<'_, State> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counts_after(pool: &ThreadPool, n: u64) -> Vec<u32> {
        let counts: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        pool.for_each(n, |i| {
            counts[i as usize].fetch_add(1, Ordering::Relaxed);
        });
        counts.into_iter().map(AtomicU32::into_inner).collect()
    }

    #[test]
    fn every_index_runs_once_for_small_and_edge_sizes() {
        for threads in [0, 1, 2, 3, 5] {
            let pool = ThreadPool::new(threads).expect("spawning workers");
            for n in [0, 1, 2, 3, 4, 7, 64, 1000] {
                assert_eq!(counts_after(&pool, n), vec![1; n as usize], "threads={threads} n={n}");
            }
        }
    }

    #[test]
    fn nested_loops_run_inline_and_complete() {
        let pool = ThreadPool::new(3).expect("spawning workers");
        let total = AtomicU64::new(0);
        pool.for_each(8, |_| {
            pool.for_each(5, |j| {
                total.fetch_add(j + 1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.into_inner(), 8 * (1 + 2 + 3 + 4 + 5));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_loop() {
        let pool = ThreadPool::new(2).expect("spawning workers");
        let ran = AtomicU64::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.for_each(10, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert_ne!(i, 3, "task 3 fails");
            })
        }));
        assert!(result.is_err());
        assert_eq!(ran.into_inner(), 10);
        // The pool is still usable.
        assert_eq!(counts_after(&pool, 5), vec![1; 5]);
    }

    #[test]
    fn host_reports_thread_count() {
        let pool = ThreadPool::new(4).expect("spawning workers");
        let host = pool.host();
        assert_eq!(host.num_threads, 4);
        assert!(host.parallel_for.is_some());
        assert!(!host.user.is_null());
    }
}
