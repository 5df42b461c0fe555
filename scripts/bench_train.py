#!/usr/bin/env python3
"""Training-step speed: cnnc against PyTorch on the CPU, in the same run, alternating.

usage: python3 scripts/bench_train.py [--rounds 2] [--runs 5] [--out docs/benchmarks.md] [MODEL ...]

MODEL is one of lenet5, resnet_tiny, mobile_tiny (batch 64, 32x32 inputs as in
../shared/zoo/train) and resnet18, mobilenet_v2 (batch 16, 224x224); default: all five.
Each model is built by ../shared/zoo/make_train_ref.py's constructors (same seed), exported
in training mode (BatchNormalization kept) at the benchmark batch, and timed
- in PyTorch: one SGD step with momentum (zero_grad, forward, cross-entropy, backward,
  step) with torch.set_num_threads(1);
- in cnnc: `cnnc bench MODEL.onnx --train --threads 1` (the compiled fused step, SGD with
  momentum), whose median is the figure.
GFLOP/s counts 3x the forward pass's multiply-adds (forward, grad-input, grad-weight) as
2 flops each. The table goes to the file given by --out between the markers
<!-- training-benchmark:begin --> and <!-- training-benchmark:end --> (appended if absent),
leaving the rest of the file (the inference benchmark of scripts/bench.py) as it is.
A benchmark, not a test: CI does not run it.
"""
import argparse, importlib.util, os, platform, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT.parent / "shared" / "zoo"
BATCH = {"lenet5": 64, "resnet_tiny": 64, "mobile_tiny": 64, "resnet18": 16, "mobilenet_v2": 16}
BEGIN, END = "<!-- training-benchmark:begin -->", "<!-- training-benchmark:end -->"


def zoo_module():
    spec = importlib.util.spec_from_file_location("make_train_ref", ZOO / "make_train_ref.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(ref, name, batch):
    """The model (seeded as make_train_ref.py does) and its input shape at `batch`."""
    import torch
    ctor, shape = ref.MODELS[name]
    torch.manual_seed(0)
    model = ctor()
    model.train()
    return model, (batch,) + tuple(shape[1:])


def export(ref, name, batch, cache):
    """The training-mode ONNX export at `batch` (cached under `cache`)."""
    import torch
    # Dropout is kept (cnnc compiles training-mode Dropout; the masks are random on both
    # sides): such exports get their own cache entry apart from older ones made without it.
    has_dropout = any(isinstance(m, torch.nn.Dropout) for m in build(ref, name, batch)[0].modules())
    path = cache / (f"{name}_b{batch}" + ("_dropout" if has_dropout else "")) / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    model, shape = build(ref, name, batch)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    import warnings
    warnings.filterwarnings("ignore")  # the exporter warns about every BatchNorm's num_batches_tracked
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.TRAINING, dynamo=False)
    return path


def forward_macs(onnx_path):
    """Multiply-adds of the forward pass: Conv, Gemm and MatMul."""
    import onnx
    from onnx import shape_inference
    m = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            w, y = shapes[n.input[1]], shapes[n.output[0]]
            k = 1
            for d in w[1:]:
                k *= d
            out = 1
            for d in y:
                out *= d
            total += out * k
        elif n.op_type in ("Gemm", "MatMul"):
            a, y = shapes[n.input[0]], shapes[n.output[0]]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            out = 1
            for d in y:
                out *= d
            total += out * k
    return total


def torch_median_ms(ref, name, batch, runs):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    model, shape = build(ref, name, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(*shape, generator=g) * 2 - 1
    labels = torch.randint(0, 10 if name in ("lenet5", "resnet_tiny", "mobile_tiny") else 1000, (batch,), generator=g)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        opt.step()

    warm = time.perf_counter()
    n = 0
    while n < 3 or time.perf_counter() - warm < 0.3:
        step()
        n += 1
    times = []
    t0 = time.perf_counter()
    while len(times) < runs or (time.perf_counter() - t0 < 2.0 and len(times) < 1000):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cnnc_median_ms(cnnc, model, runs):
    out = subprocess.run([str(cnnc), "bench", str(model), "--train", "--threads", "1", "--runs", str(runs)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cnnc bench --train {model}: {out.stderr.strip()}")
    last = out.stdout.strip().splitlines()[-1]
    if not last.startswith("median_ms="):
        raise RuntimeError(f"cnnc bench --train {model}: unexpected output {last!r}")
    return float(last.split("=", 1)[1])


def write_section(path, lines):
    text = path.read_text() if path.exists() else ""
    section = "\n".join([BEGIN] + lines + [END]) + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cache", default="/tmp/cnnc_bench_train")
    ap.add_argument("--out")
    a = ap.parse_args()
    models = a.models or list(BATCH)
    unknown = [m for m in models if m not in BATCH]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {list(BATCH)}")
    cnnc = ROOT / "target/release/cnnc"
    if not cnnc.exists():
        sys.exit("build cnnc first: cargo build --release -p cnnc")
    import torch
    ref = zoo_module()
    cache = Path(a.cache)
    rows = []
    for name in models:
        batch = BATCH[name]
        onnx_path = export(ref, name, batch, cache)
        macs = forward_macs(onnx_path)
        c, t = [], []
        for _ in range(a.rounds):  # alternate so drift on a shared machine hits both
            t.append(torch_median_ms(ref, name, batch, a.runs))
            c.append(cnnc_median_ms(cnnc, onnx_path, a.runs))
        cm, tm = min(c), min(t)
        gf = lambda ms: 3 * 2 * macs / ms / 1e6
        rows.append((name, batch, cm, tm, tm / cm, batch / cm * 1e3, batch / tm * 1e3, gf(cm), gf(tm)))
        print(f"{name:14s} batch {batch:3d}  cnnc {cm:9.2f} ms  PyTorch {tm:9.2f} ms  speed-up {tm / cm:5.2f}x", flush=True)
    lines = [
        "## Training",
        "",
        f"Command: `python3 scripts/bench_train.py --rounds {a.rounds} --runs {a.runs}{' ' + ' '.join(a.models) if a.models else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1 thread; PyTorch {torch.__version__}; one SGD step with "
        "momentum (forward, softmax cross-entropy, backward, update) on a training-mode export (BatchNorm with batch "
        f"statistics); each figure the best of {a.rounds} alternating rounds of a median over >= {a.runs} steps. "
        "GFLOP/s = 3 x forward multiply-adds x 2 / step time. Dropout (mobilenet_v2's classifier) runs on both "
        "sides, with each side's own random masks.",
        "",
        "| model | batch | cnnc ms/step | PyTorch ms/step | speed-up (PyTorch/cnnc) | cnnc images/s | PyTorch images/s | cnnc GFLOP/s | PyTorch GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]:.1f} | {r[8]:.1f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    lines += ["", f"Measured at commit {commit} on {time.strftime('%Y-%m-%d')}; load average at the end {load} "
              f"(1/5/15 min, {os.cpu_count()} cores): other jobs shared the machine, so only the ratios of one run compare."]
    print("\n".join(lines))
    if a.out:
        write_section(Path(a.out), lines)


if __name__ == "__main__":
    main()
