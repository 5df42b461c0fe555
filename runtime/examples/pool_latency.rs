//! Measures the cost of one `parallel_for` on the pool with near-empty tasks, the
//! overhead a model pays per parallel layer: `cargo run --release -p cnnc-runtime
//! --example pool_latency [threads]`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cnnc_runtime::ThreadPool;

fn main() {
    let threads = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let pool = ThreadPool::new(threads).expect("spawning workers");
    let sink = AtomicU64::new(0);
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
                sink.fetch_add(x & 1, Ordering::Relaxed);
                if std::thread::current().id() != caller {
                    on_workers.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        for _ in 0..1000 {
            run();
        }
        on_workers.store(0, Ordering::Relaxed);
        let start = Instant::now();
        for _ in 0..calls {
            run();
        }
        let per_call = start.elapsed().as_secs_f64() / calls as f64;
        let worker_share = on_workers.load(Ordering::Relaxed) as f64 / (calls as u64 * n) as f64;
        println!(
            "threads={threads} n={n} work={work}: {:.2} us per parallel_for, {:.0}% of indices on workers",
            per_call * 1e6,
            worker_share * 100.0
        );
    }
    black_box(sink.load(Ordering::Relaxed));
}
