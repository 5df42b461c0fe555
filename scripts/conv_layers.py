#!/usr/bin/env python3
"""Per-layer timing of a model's GEMM convolutions: each non-depthwise Conv of the model
(with its bias and a directly following Relu/Clip, BatchNormalization folded away) as a
one-node model, compiled by one or more cnnc binaries and timed with `cnnc bench`
(1 thread), alternating the binaries per round so machine noise hits them alike; ONNX
Runtime (1 thread, I/O binding) on the same one-node model as a reference. Times are
minima of single runs (`cnnc bench`'s min_ms over the rounds; ORT's runs): the machine
is shared, and the minimum is the figure least disturbed by other work.

usage: conv_layers.py MODEL_DIR_OR_ONNX --cnnc NAME=PATH [--cnnc NAME=PATH ...]
                      [--runs N] [--rounds R] [--only SUBSTRING] [--no-ort]
Prints one row per layer: shape, MFLOP, then per binary the minimum ms and GFLOP/s, and
ORT's; a last row sums the times.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference


def conv_layers(model_path):
    model = onnx.load(model_path)
    model = shape_inference.infer_shapes(model)
    graph = model.graph
    shapes = {}
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        shapes[v.name] = dims
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    layers = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        group = attrs.get("group", 1)
        weight = inits.get(node.input[1])
        x_shape = shapes.get(node.input[0])
        if weight is None or not x_shape or 0 in x_shape:
            continue
        if group > 1 and weight.shape[1] == 1:
            continue  # depthwise: not the GEMM path
        activation = None
        nxt = only_consumer(node.output[0])
        if nxt is not None and nxt.op_type == "BatchNormalization":
            nxt = only_consumer(nxt.output[0])
        if nxt is not None and nxt.op_type in ("Relu", "Clip"):
            activation = nxt.op_type
        layers.append((node.name or node.output[0], x_shape, weight.shape, attrs, activation))
    return layers


def one_conv_model(x_shape, w_shape, attrs, activation, path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32) * 0.1
    bias = rng.standard_normal(w_shape[0]).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y0"], **attrs)]
    out = "y0"
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["y0"], ["y"]))
        out = "y"
    elif activation == "Clip":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["y0", "lo", "hi"], ["y"]))
        out = "y"
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)


def bench_so(cnnc, so, runs):
    out = subprocess.run([cnnc, "bench", so, "--threads", "1", "--runs", str(runs)],
                         capture_output=True, text=True, check=True).stdout
    for word in out.split():
        if word.startswith("min_ms="):
            return float(word.split("=")[1])
    raise RuntimeError(f"no min_ms in {out!r}")


def bench_ort(path, x_shape, runs):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    outputs = session.run(None, {"x": x})
    # Buffers bound once (as scripts/bench.py), so the timed call is the convolution.
    io = session.io_binding()
    io.bind_cpu_input("x", x)
    for o, arr in zip(session.get_outputs(), outputs):
        io.bind_output(o.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
    for _ in range(5):
        session.run_with_iobinding(io)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - t)
    return float(np.min(times)) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--cnnc", action="append", required=True, help="NAME=PATH of a cnnc binary")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=None)
    parser.add_argument("--no-ort", action="store_true")
    args = parser.parse_args()
    model = args.model
    if os.path.isdir(model):
        model = os.path.join(model, "model.onnx")
    binaries = [tuple(spec.split("=", 1)) for spec in args.cnnc]
    tmp = tempfile.mkdtemp(prefix="conv_layers_")
    header = f"{'layer':<44} {'shape':<34} {'MFLOP':>7}"
    for name, _ in binaries:
        header += f" {name + ' ms':>10} {'GF/s':>6}"
    if not args.no_ort:
        header += f" {'ort ms':>9} {'GF/s':>6}"
    print(header)
    totals = [0.0] * (len(binaries) + 1)
    for index, (name, x_shape, w_shape, attrs, activation) in enumerate(conv_layers(model)):
        if args.only and args.only not in name:
            continue
        path = os.path.join(tmp, f"l{index}.onnx")
        one_conv_model(x_shape, w_shape, attrs, activation, path)
        sos = []
        for bname, binary in binaries:
            so = os.path.join(tmp, f"l{index}_{bname}.so")
            subprocess.run([binary, "compile", path, "-o", so], capture_output=True, check=True)
            sos.append(so)
        times = [[] for _ in binaries]
        for _ in range(args.rounds):
            for i, (_, binary) in enumerate(binaries):
                times[i].append(bench_so(binary, sos[i], args.runs))
        import onnxruntime  # noqa: F401  (fail early if missing)
        ort_ms = None if args.no_ort else bench_ort(path, x_shape, args.runs)
        strides = attrs.get("strides", [1, 1])
        out_h = (x_shape[2] + sum(attrs.get("pads", [0, 0, 0, 0])[0::2]) - w_shape[2]) // strides[0] + 1
        out_w = (x_shape[3] + sum(attrs.get("pads", [0, 0, 0, 0])[1::2]) - w_shape[3]) // strides[1] + 1
        flop = 2 * x_shape[0] * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3] * out_h * out_w
        shape = (f"{w_shape[1] * attrs.get('group', 1)}->{w_shape[0]} {x_shape[2]}x{x_shape[3]} "
                 f"k{w_shape[2]}s{strides[0]}" + (f"g{attrs['group']}" if attrs.get("group", 1) > 1 else "")
                 + (f" {activation}" if activation else ""))
        row = f"{name[-44:]:<44} {shape:<34} {flop / 1e6:7.1f}"
        for i in range(len(binaries)):
            ms = min(times[i])
            totals[i] += ms
            row += f" {ms:10.4f} {flop / ms / 1e6:6.1f}"
        if ort_ms is not None:
            totals[-1] += ort_ms
            row += f" {ort_ms:9.4f} {flop / ort_ms / 1e6:6.1f}"
        print(row, flush=True)
    row = f"{'total':<44} {'':<34} {'':>7}"
    for i in range(len(binaries)):
        row += f" {totals[i]:10.4f} {'':>6}"
    if not args.no_ort:
        row += f" {totals[-1]:9.4f}"
    print(row)


if __name__ == "__main__":
    sys.exit(main())
