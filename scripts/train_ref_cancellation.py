#!/usr/bin/env python3
"""How much cancellation is in a BatchNorm weight gradient of a training reference? (a check)

usage: python3 scripts/train_ref_cancellation.py [NAME [BN_MODULE]]   (default: mobile_tiny expand.1)

Recomputes step 1 of ../shared/zoo/train/NAME in float64 PyTorch from the exact state in its
model.onnx and prints, for the BatchNorm module BN_MODULE, the gradient of its weight
(gamma = sum over batch and positions of dy * x_hat) against the sum of the terms' magnitudes.
When |gradient| / sum|terms| is far below float32's 6e-8 per rounding times the number of
terms, the reference value is mostly rounding noise of whoever computed it, and
../shared/DESIGN.md's elementwise bound cannot be met by any float32 implementation.
"""
import importlib.util, sys
from pathlib import Path
import numpy as np, onnx, onnx.numpy_helper as nh, torch, torch.nn.functional as F

ZOO = Path(__file__).resolve().parent.parent.parent / "shared" / "zoo"


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "mobile_tiny"
    module = sys.argv[2] if len(sys.argv) > 2 else "expand.1"
    d = ZOO / "train" / name
    if not d.is_dir():
        sys.exit(f"{d} is missing (../shared is not beside this checkout)")
    spec = importlib.util.spec_from_file_location("make_train_ref", ZOO / "make_train_ref.py")
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    load = lambda p: nh.to_array(onnx.load_tensor(str(p)))
    inits = {i.name: nh.to_array(i) for i in onnx.load(str(d / "model.onnx")).graph.initializer}
    x = torch.from_numpy(load(d / "step_1" / "x.pb").copy()).double()
    labels = torch.from_numpy(load(d / "step_1" / "labels.pb").copy())
    model = ref_mod.MODELS[name][0]()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in inits:
                v.copy_(torch.from_numpy(inits[k].copy()))
    model = model.double().train()
    bn = model.get_submodule(module)
    saved = {}

    def hook(mod, inputs, out):
        h = inputs[0].detach()
        mean = h.mean((0, 2, 3), keepdim=True)
        var = h.var((0, 2, 3), unbiased=False, keepdim=True)
        saved["x_hat"] = (h - mean) / torch.sqrt(var + mod.eps)
        out.register_hook(lambda g: saved.__setitem__("dy", g))

    bn.register_forward_hook(hook)
    F.cross_entropy(model(x), labels).backward()
    terms = (saved["dy"] * saved["x_hat"]).detach()
    grad = terms.sum((0, 2, 3)).abs()
    magnitude = terms.abs().sum((0, 2, 3))
    ref = load(d / "step_1" / "grad" / f"{module}.weight.pb")
    print(f"{name} {module}.weight: float64 |grad| max {grad.max():.3g} (reference max {np.abs(ref).max():.3g}); "
          f"sum|dy*x_hat| per channel {magnitude.min():.3g}..{magnitude.max():.3g}; "
          f"|grad|/sum|terms| max {(grad / magnitude).max():.3g}; "
          f"bound 1e-3|ref| + 1e-4 max|ref| ~ {1e-4 * np.abs(ref).max():.2g} absolute")


if __name__ == "__main__":
    main()
