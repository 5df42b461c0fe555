//! `cnnc compile --header`: the ABI header plus a description of this model's tensors.

use cnnc_codegen::TargetSpec;
use cnnc_ir::Graph;

pub fn model_header(g: &Graph, target: &TargetSpec) -> String {
    let mut s = String::new();
    s.push_str(&format!("/* Model `{}`, compiled by cnnc {} for {} (cpu {}).\n", g.name, env!("CARGO_PKG_VERSION"), target.triple, target.cpu_name()));
    let describe = |s: &mut String, kind: &str, vs: &[cnnc_ir::ValueId]| {
        for (k, &v) in vs.iter().enumerate() {
            let val = g.value(v);
            s.push_str(&format!(" *   {kind}[{k}] \"{}\": {}\n", val.name.replace("*/", "* /"), val.ty));
        }
    };
    describe(&mut s, "inputs", &g.inputs);
    describe(&mut s, "outputs", &g.outputs);
    s.push_str(" */\n");
    s.push_str(cnnc_runtime::abi::C_HEADER);
    s
}
