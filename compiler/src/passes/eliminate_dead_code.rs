//! Removes nodes, constants and values that no graph output depends on.

use cnnc_ir::Graph;

use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "eliminate-dead-code",
    summary: "drop nodes and constants no output depends on",
    run,
};

fn run(g: &mut Graph, _: &PassContext) -> Result<(), String> {
    g.remove_dead();
    Ok(())
}
