//! The pool through the ABI's function pointer, as generated code calls it.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use cnnc_runtime::ThreadPool;

struct Counters {
    hits: Vec<AtomicU32>,
    calls: AtomicU64,
}

unsafe extern "C" fn count_index(ctx: *mut c_void, index: u64) {
    let counters = unsafe { &*(ctx as *const Counters) };
    counters.hits[index as usize].fetch_add(1, Ordering::Relaxed);
    counters.calls.fetch_add(1, Ordering::Relaxed);
}

/// Many loops of varying length, each index exactly once, through `host.parallel_for`.
#[test]
fn every_index_runs_exactly_once_over_many_loops() {
    for threads in [1, 2, 4] {
        let pool = ThreadPool::new(threads).expect("spawning workers");
        let host = pool.host();
        let parallel_for = host.parallel_for.expect("a pool provides parallel_for");
        let max_n = 300;
        let counters = Counters { hits: (0..max_n).map(|_| AtomicU32::new(0)).collect(), calls: AtomicU64::new(0) };
        let mut expected_calls = 0u64;
        // A cheap deterministic sequence of lengths, including 0, 1 and < threads.
        let mut seed = 12345u64;
        for round in 0..3000u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let n = match round % 4 {
                0 => round % 3,
                1 => (seed >> 33) % 8,
                _ => (seed >> 33) % max_n as u64,
            };
            for hit in &counters.hits {
                hit.store(0, Ordering::Relaxed);
            }
            unsafe { parallel_for(host.user, n, count_index, &counters as *const Counters as *mut c_void) };
            expected_calls += n;
            for (i, hit) in counters.hits.iter().enumerate() {
                let want = u32::from((i as u64) < n);
                assert_eq!(hit.load(Ordering::Relaxed), want, "threads={threads} round={round} n={n} index={i}");
            }
        }
        assert_eq!(counters.calls.load(Ordering::Relaxed), expected_calls, "threads={threads}");
    }
}

/// Work really is shared: with slow tasks, more than one thread takes part.
#[test]
fn slow_tasks_spread_over_threads() {
    let pool = ThreadPool::new(2).expect("spawning workers");
    let threads_seen = std::sync::Mutex::new(std::collections::HashSet::new());
    for _attempt in 0..20 {
        pool.for_each(16, |_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            threads_seen.lock().unwrap().insert(std::thread::current().id());
        });
        if threads_seen.lock().unwrap().len() > 1 {
            return;
        }
    }
    panic!("20 loops of 16 sleeping tasks all ran on one thread");
}

/// Workers park when idle and the pool shuts down promptly.
#[test]
fn idle_pool_parks_and_drops() {
    let pool = ThreadPool::new(4).expect("spawning workers");
    pool.for_each(100, |_| {});
    std::thread::sleep(std::time::Duration::from_millis(20));
    let start = std::time::Instant::now();
    drop(pool);
    assert!(start.elapsed() < std::time::Duration::from_secs(1), "dropping the pool took {:?}", start.elapsed());
}
