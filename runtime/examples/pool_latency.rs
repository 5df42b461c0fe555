//! Measures the cost of one `parallel_for` on the pool with near-empty tasks, the
//! overhead a model pays per parallel layer: `cargo run --release -p cnnc-runtime
//! --example pool_latency [threads]`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cnnc_runtime::ThreadPool;

thread_local! {
    static WORKER_INDICES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn main() {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads).expect("spawning workers");
    let caller = std::thread::current().id();
    let on_workers = AtomicU64::new(0);
    for (n, work) in [(2u64, 0u64), (16, 0), (16, 2000), (256, 200)] {
        let calls = 20_000;
        let run = || {
            pool.for_each(n, |i| {
                let mut x = i;
                for _ in 0..work {
                    x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                black_box(x);
                // Counted per thread: a shared counter would bounce its cache line
                // between cores on every index and measure that instead of the pool.
                if std::thread::current().id() != caller {
                    WORKER_INDICES.with(|c| c.set(c.get() + 1));
                }
            })
        };
        for _ in 0..1000 {
            run();
        }
        // Slow tasks, so that every worker takes part in the reset.
        pool.for_each(64, |_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            WORKER_INDICES.with(|c| c.set(0));
        });
        on_workers.store(0, Ordering::Relaxed);
        let start = Instant::now();
        for _ in 0..calls {
            run();
        }
        let per_call = start.elapsed().as_secs_f64() / calls as f64;
        // Every worker reports its count in a loop of slow tasks, so each takes part.
        pool.for_each(64, |_| {
            std::thread::sleep(std::time::Duration::from_millis(1));
            if std::thread::current().id() != caller {
                on_workers.fetch_add(WORKER_INDICES.with(|c| c.replace(0)), Ordering::Relaxed);
            }
        });
        let worker_share = on_workers.load(Ordering::Relaxed) as f64 / (calls as u64 * n) as f64;
        println!(
            "threads={threads} n={n} work={work}: {:.2} us per parallel_for, {:.0}% of indices on workers",
            per_call * 1e6,
            worker_share * 100.0
        );
    }
}
