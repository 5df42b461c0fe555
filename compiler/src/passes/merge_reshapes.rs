//! A Reshape of a Reshape reads the first one's input directly: the intermediate
//! copy disappears (dead code removes the first if nothing else reads it).

use cnnc_ir::{Graph, Op};

use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "merge-reshapes",
    summary: "reshape(reshape(x)) -> reshape(x)",
    run,
};

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    let producers = g.producers();
    for i in 0..g.nodes.len() {
        if g.nodes[i].op != Op::Reshape || !g.nodes[i].epilogue.is_empty() {
            continue;
        }
        let src = g.nodes[i].inputs[0];
        let Some(p) = producers[src.index()] else { continue };
        let inner = &g.nodes[p];
        if inner.op == Op::Reshape && inner.epilogue.is_empty() {
            let original = inner.inputs[0];
            g.nodes[i].inputs[0] = original;
        }
    }
    Ok(())
}
