#!/usr/bin/env python3
"""How much does ONNX Runtime gain from its blocked (NCHWc) layout on this machine? (a check)

usage: python3 scripts/ort_layout_gain.py MODEL_DIR ...

Times each model (batch 1, one thread) in two ORT sessions that differ only in the graph
optimisation level: ORT_ENABLE_EXTENDED (fusions, NCHW kernels) and ORT_ENABLE_ALL (adds the
layout transformer: NCHWc regions with reorders at their borders). Alternates the two over 5
rounds of 20 runs and prints the best median of each and their ratio.
"""
import sys, time
from pathlib import Path
import numpy as np, onnxruntime as ort

LEVELS = [("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
          ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for d in map(Path, sys.argv[1:]):
        sessions = {}
        for name, level in LEVELS:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.graph_optimization_level = level
            sessions[name] = ort.InferenceSession(str(d / "model.onnx"), so, providers=["CPUExecutionProvider"])
        inp = sessions["all"].get_inputs()[0]
        x = np.random.rand(*[v if isinstance(v, int) else 1 for v in inp.shape]).astype(np.float32)
        best = {name: float("inf") for name in sessions}
        for _ in range(5):
            for name, s in sessions.items():
                for _ in range(3):
                    s.run(None, {inp.name: x})
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    s.run(None, {inp.name: x})
                    times.append(time.perf_counter() - t)
                best[name] = min(best[name], float(np.median(times)) * 1e3)
        print(f"{d.name}: extended {best['extended']:.2f} ms, all {best['all']:.2f} ms, "
              f"extended/all {best['extended'] / best['all']:.2f}")


if __name__ == "__main__":
    main()
