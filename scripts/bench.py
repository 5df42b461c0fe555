#!/usr/bin/env python3
"""cnnc against ONNX Runtime on the same models, in the same run, alternating.

usage: python3 scripts/bench.py [--threads 1] [--rounds 3] [--out docs/benchmarks.md] [MODEL_DIR ...]

MODEL_DIR holds model.onnx (and meta.json with `macs` for GFLOP/s); default: the
models under ../shared/zoo/models. Needs `pip install onnxruntime numpy` and a
release build of cnnc (cargo build --release). A benchmark, not a test: it is not
run by CI.
"""
import argparse, json, math, os, platform, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ort_median_ms(model, threads, runs, batch):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    feeds = {}
    rng = np.random.default_rng(0)
    for i in s.get_inputs():
        shape = [batch if (k == 0 and not isinstance(d, int)) else (d if isinstance(d, int) else 1) for k, d in enumerate(i.shape)]
        feeds[i.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
    # Like cnnc bench: inputs and outputs in buffers prepared once (I/O binding), so
    # the timed call is the inference itself, without per-call allocation.
    outputs = s.run(None, feeds)
    io = s.io_binding()
    for name, arr in feeds.items():
        io.bind_cpu_input(name, arr)
    for o, arr in zip(s.get_outputs(), outputs):
        io.bind_output(o.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    t_end = time.perf_counter() + 0.3
    n = 0
    while n < 3 or time.perf_counter() < t_end:
        s.run_with_iobinding(io)
        n += 1
    times = []
    t0 = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - t0 < 2.0 and len(times) < 10000):
        t = time.perf_counter()
        s.run_with_iobinding(io)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cnnc_median_ms(cnnc, model, threads, runs):
    out = subprocess.run([str(cnnc), "bench", str(model), "--threads", str(threads), "--runs", str(runs)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cnnc bench {model}: {out.stderr.strip()}")
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("median_ms="), last
    return float(last.split("=", 1)[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    models = [Path(m) for m in a.models] or sorted((ROOT.parent / "shared/zoo/models").iterdir())
    cnnc = ROOT / "target/release/cnnc"
    if not cnnc.exists():
        sys.exit("build cnnc first: cargo build --release")
    import onnxruntime
    rows = []
    for m in models:
        meta = json.loads((m / "meta.json").read_text()) if (m / "meta.json").exists() else {}
        macs = meta.get("macs")
        for t in a.threads:
            c, o = [], []
            for _ in range(a.rounds):  # alternate so drift on a shared machine hits both
                o.append(ort_median_ms(m / "model.onnx", t, a.runs, 1))
                c.append(cnnc_median_ms(cnnc, m / "model.onnx", t, a.runs))
            cm, om = min(c), min(o)
            gf = (lambda ms: f"{2 * macs / ms / 1e6:.1f}" if macs else "-")
            rows.append((m.name, t, cm, om, cm / om, gf(cm), gf(om)))
            print(f"{m.name:22s} threads={t} cnnc {cm:9.3f} ms  ORT {om:9.3f} ms  ratio {cm / om:6.2f}", flush=True)
    lines = [
        f"Command: `python3 scripts/bench.py --threads {' '.join(map(str, a.threads))} --rounds {a.rounds}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; ONNX Runtime {onnxruntime.__version__}; "
        f"batch 1; each figure the best of {a.rounds} alternating rounds of a median over >= {a.runs} runs.",
        "",
        "| model | threads | cnnc ms | ORT ms | cnnc/ORT | cnnc GFLOP/s | ORT GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f} | {r[5]} | {r[6]} |" for r in rows]
    for t in a.threads:
        ratios = [r[4] for r in rows if r[1] == t]
        if ratios:
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            lines.append(f"\nGeometric mean of cnnc/ORT over the {len(ratios)} models at {t} thread(s): {geo:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Keep the training section scripts/bench_train.py maintains.
        old = out.read_text() if out.exists() else ""
        begin, end = "<!-- training-benchmark:begin -->", "<!-- training-benchmark:end -->"
        training = old[old.index(begin):old.index(end) + len(end)] + "\n" if begin in old and end in old else ""
        out.write_text("# Benchmarks\n\n" + text + ("\n" + training if training else ""))


if __name__ == "__main__":
    main()
