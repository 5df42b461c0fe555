//! Removes nodes, constants and values that no graph output depends on.

use cnnc_ir::Graph;

use super::Pass;

pub const PASS: Pass = Pass {
    name: "eliminate-dead-code",
    summary: "drop nodes and constants no output depends on",
    run,
};

fn run(g: &mut Graph) -> Result<(), String> {
    g.remove_dead();
    Ok(())
}
