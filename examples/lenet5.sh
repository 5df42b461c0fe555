#!/usr/bin/env bash
# Builds cnnc, generates the LeNet-5 example with cnnc's ONNX writer, compiles it to a
# shared library, checks it against the reference interpreter, and calls it from C.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p cnnc -p cnnc-examples
bin="${CARGO_TARGET_DIR:-target}/release"
out=out/lenet5
mkdir -p "$out"
"$bin"/make-lenet5 "$out"
"$bin"/cnnc compile "$out/model.onnx" -o "$out/lenet5.so" --header "$out/lenet5.h"
"$bin"/cnnc run "$out/lenet5.so" --input "$out/test_data_set_0/input_0.pb" --out "$out/result"
"$bin"/cnnc verify "$out"
cc -O2 -I "$out" examples/lenet5_main.c "$out/lenet5.so" -Wl,-rpath,"$PWD/$out" -o "$out/lenet5_main"
"$out/lenet5_main"
