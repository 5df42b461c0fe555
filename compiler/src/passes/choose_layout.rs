//! Chooses blocked (NCHWc8) regions: connected sets of nodes that all have a blocked
//! kernel run on [N, C/8, H, W, 8] values, with `reorder` nodes only where a region's
//! values meet plain producers or consumers (see `cnnc_ir::verify` for the layout rules
//! and `Op::Reorder`).
//!
//! A node can be blocked when its output is an f32 [N, C, H, W] with C a multiple of 8
//! and its kernel takes the blocked layout: 1x1 convolutions
//! (`kernels::conv_blocked`), depthwise convolutions (`kernels::depthwise_blocked`),
//! global Mean/Sum reductions and pooling (`kernels::pool_blocked`), f32 unary and
//! binary elementwise ops (with their epilogues). Regions are the connected
//! components of such nodes along data edges (a value one reads as its data operand,
//! `verify::is_data_operand`) whose value is not layout-free ([N, C, 1, 1] values
//! have the same bytes in both layouts and connect nothing). A region is worth its
//! reorders when its convolutions gain more than its reorders cost (a depthwise
//! convolution counts three, a 1x1 one, each reorder three): a lone 1x1 convolution
//! never is, MobileNet's body is.
//!
//! The kernels are AVX2+FMA machine code (blocks of 8, AVX-512 machines included):
//! targets with narrower vectors keep every node plain. Inference only; the driver
//! leaves the pass out with `--no-nchwc` (or `CNNC_NO_NCHWC=1`).

use cnnc_codegen::kernels::{conv_blocked, conv_direct_blocked, conv_gemm, depthwise_blocked, movement, pool_blocked};
use cnnc_ir::verify::{is_data_operand, is_layout_free};
use cnnc_ir::{DType, Graph, Layout, Node, Op, Schedule, ValueId};

use super::{Pass, PassContext};

pub const PASS: Pass = Pass {
    name: "choose-layout",
    summary: "run connected 1x1/depthwise conv, pooling and elementwise regions in the blocked NCHWc8 layout",
    run,
};

/// Channels per block: one AVX2 register of f32.
pub const BLOCK: usize = 8;

fn blocked() -> Layout {
    Layout::Blocked { block: BLOCK as u32 }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pointwise,
    Depthwise,
    /// A KxK (or padded) ungrouped convolution on the direct kernel.
    Direct,
    /// A convolution reading a plain input of at most 8 channels (a stem) and writing
    /// blocked: no reorder at the region's start.
    Stem,
    /// One the plain path runs as Winograd F(2x2, 3x3), with few input channels.
    DirectForWinogradFewChannels,
    /// One the plain path runs as Winograd, with more input channels.
    DirectForWinograd,
    Other,
}

/// What kind of blocked node `node` can be, if any.
fn blockable(g: &Graph, node: &Node) -> Option<Kind> {
    let [out] = node.outputs[..] else { return None };
    let ty = g.ty(out);
    if ty.dtype != DType::F32 || ty.rank() != 4 || ty.shape[1] % BLOCK != 0 || ty.numel() == 0 {
        return None;
    }
    match node.op {
        Op::Conv(_) if depthwise_blocked::supports_node(g, node) => Some(Kind::Depthwise),
        Op::Conv(_) if conv_blocked::is_pointwise(g, node) => Some(Kind::Pointwise),
        Op::Conv(_) if !conv_blocked::is_pointwise(g, node) && conv_blocked::supports_node(g, node) => {
            if !plain_runs_winograd(g, node) {
                Some(Kind::Direct)
            } else if g.ty(node.inputs[0]).shape[1] <= WINOGRAD_FEW_CHANNELS {
                Some(Kind::DirectForWinogradFewChannels)
            } else {
                Some(Kind::DirectForWinograd)
            }
        }
        Op::Conv(_) if g.ty(node.inputs[0]).shape[1] % BLOCK != 0 && stem_fits(g, node) => Some(Kind::Stem),
        // ShuffleNet's concats feed a channel shuffle (reshape, transpose), which reads
        // them plain anyway: blocked, their regions ran no faster.
        Op::Concat { .. } if movement::supports_blocked_concat(g, node) && node.epilogue.is_empty() && !shuffled(g, out) => {
            Some(Kind::Other)
        }
        Op::Reduce { .. } if pool_blocked::supports_global_reduce(g, node) => Some(Kind::Other),
        // A pool right after a plain producer runs plain: the reorder after it moves
        // a quarter of the bytes (SqueezeNet's and ResNet's stems).
        Op::Pool(_) if pool_blocked::supports_pool(g, node) && produced_blockable(g, node) => Some(Kind::Other),
        Op::Unary(_) | Op::Binary(_) => {
            let inputs_f32 = node.inputs.iter().all(|&v| g.ty(v).dtype == DType::F32);
            inputs_f32.then_some(Kind::Other)
        }
        _ => None,
    }
}

/// Whether the plain GEMM path would run the convolution as Winograd F(2x2, 3x3).
fn plain_runs_winograd(g: &Graph, node: &Node) -> bool {
    let (mr, nr) = (6, 16);
    conv_gemm::plan(g, node, (mr, nr)).is_some_and(|plan| plan.winograd.is_some())
}

/// Whether `node` can read its few plain channels and write blocked
/// (`conv_direct_blocked::supports_plain_input`), with no binary epilogue operand (the
/// verifier's rule for layout-changing convolutions), not better off as Winograd.
fn stem_fits(g: &Graph, node: &Node) -> bool {
    let binary = node.epilogue.iter().any(|e| matches!(e, cnnc_ir::EpilogueStep::Binary { .. }));
    !binary && conv_direct_blocked::supports_plain_input(g, node) && !plain_runs_winograd(g, node)
}

/// Whether a reshape or transpose reads `v`.
fn shuffled(g: &Graph, v: ValueId) -> bool {
    g.nodes.iter().any(|n| n.inputs.contains(&v) && matches!(n.op, Op::Reshape | Op::Transpose { .. }))
}

/// Whether the node's data input comes from a node that could run blocked.
fn produced_blockable(g: &Graph, node: &Node) -> bool {
    let Some(&x) = node.inputs.first() else { return false };
    g.nodes.iter().find(|p| p.outputs.contains(&x)).is_some_and(|p| !matches!(p.op, Op::Pool(_)) && blockable(g, p).is_some())
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

fn run(g: &mut Graph, ctx: &PassContext) -> Result<(), String> {
    if ctx.target.vector_width < BLOCK {
        return Ok(());
    }
    let chosen = choose_regions(g);
    if chosen.iter().any(|&c| c) {
        let stems: Vec<bool> = g.nodes.iter().map(|node| blockable(g, node) == Some(Kind::Stem)).collect();
        rewrite(g, &chosen, &stems);
    }
    Ok(())
}

/// Which nodes run blocked.
fn choose_regions(g: &Graph) -> Vec<bool> {
    let n = g.nodes.len();
    let kinds: Vec<Option<Kind>> = g.nodes.iter().map(|node| blockable(g, node)).collect();
    let producers = g.producers();
    let mut parent: Vec<usize> = (0..n).collect();
    for (i, node) in g.nodes.iter().enumerate() {
        if kinds[i].is_none() {
            continue;
        }
        for (slot, &v) in node.inputs.iter().enumerate() {
            let Some(p) = producers[v.index()] else { continue };
            if kinds[p].is_some() && is_data_operand(g, node, slot) && !is_layout_free(g.ty(v)) {
                let (a, b) = (find(&mut parent, i), find(&mut parent, p));
                parent[a] = b;
            }
        }
    }
    // Per region: the weight of its convolutions against its reorders.
    let mut gain = vec![0isize; n];
    for i in 0..n {
        let Some(kind) = kinds[i] else { continue };
        let root = find(&mut parent, i);
        gain[root] += match kind {
            Kind::Depthwise => DEPTHWISE_GAIN,
            Kind::Pointwise => POINTWISE_GAIN,
            Kind::Direct => DIRECT_GAIN,
            Kind::Stem => STEM_GAIN,
            Kind::DirectForWinogradFewChannels => WINOGRAD_FEW_CHANNELS_GAIN,
            Kind::DirectForWinograd => WINOGRAD_GAIN,
            Kind::Other => 0,
        };
    }
    let mut crossings: Vec<std::collections::BTreeSet<(usize, bool)>> = vec![Default::default(); n];
    let mut root_of = vec![None; n];
    for i in 0..n {
        if kinds[i].is_some() {
            root_of[i] = Some(find(&mut parent, i));
        }
    }
    for (j, node) in g.nodes.iter().enumerate() {
        for (slot, &v) in node.inputs.iter().enumerate() {
            if is_layout_free(g.ty(v)) {
                continue;
            }
            let from = producers[v.index()].and_then(|p| root_of[p]);
            let data = is_data_operand(g, node, slot) && kinds[j] != Some(Kind::Stem);
            let to = root_of[j].filter(|_| data);
            if from != to {
                if let Some(r) = to {
                    crossings[r].insert((v.index(), true));
                }
                if let Some(r) = from {
                    crossings[r].insert((v.index(), false));
                }
            }
        }
    }
    for &o in &g.outputs {
        if let Some(r) = producers[o.index()].and_then(|p| root_of[p])
            && !is_layout_free(g.ty(o))
        {
            crossings[r].insert((o.index(), false));
        }
    }
    (0..n)
        .map(|i| root_of[i].is_some_and(|root| gain[root] > (crossings[root].len() * REORDER_COST) as isize))
        .collect()
}

/// What a region must gain over its reorders, in passes over an activation: the blocked
/// depthwise kernel saves several (it is ~2-3x faster than the plain one), a 1x1
/// convolution about one (it reads and writes its activations once either way, but the
/// blocked one needs no packing). A reorder counts three: besides its own pass it is a
/// single-threaded strided copy, and the nodes at a region's border (ShuffleNet's channel
/// shuffles, ResNet-50's 3x3 convolutions) lose their plain kernels' fusion. Measured:
/// ShuffleNet's regions (a depthwise and two 1x1 convolutions between two reorders) and
/// ResNet-50's (36 against 33 reorders) ran 5-10% and 0% faster plain; SqueezeNet's fire
/// modules ~20%. MobileNet-v2's and EfficientNet-B0's bodies (one reorder each) stay
/// blocked.
const DEPTHWISE_GAIN: isize = 3;
const POINTWISE_GAIN: isize = 1;
const REORDER_COST: usize = 3;
/// A KxK convolution on the direct kernel (`kernels::conv_direct_blocked`, ~90% of the
/// FMA peak) against im2col + GEMM: no im2col pass.
const DIRECT_GAIN: isize = 3;
/// A stem on the direct kernel: no im2col pass, and no reorder after it.
const STEM_GAIN: isize = 3;
/// A 3x3 stride-1 convolution the plain path runs as Winograd F(2x2, 3x3) (2.25x fewer
/// multiply-adds) loses by running direct, the more the more input channels it has (the
/// transforms' cost per channel is amortised over more products). Measured (one thread,
/// same run, all of a model's eligible nodes blocked against none): SqueezeNet-1.1 (3x3
/// expands over 16-64 channels, 17 1x1 convolutions) 4% faster blocked; ResNet-18
/// (64-512 channels) 34%, ResNet-50 12% and GoogLeNet 18% slower.
const WINOGRAD_FEW_CHANNELS: usize = 64;
const WINOGRAD_FEW_CHANNELS_GAIN: isize = -1;
const WINOGRAD_GAIN: isize = -6;

/// Sets the chosen nodes' layouts and inserts the reorders their edges need: one per
/// value and direction, right after the value's producer (graph inputs: first).
/// A chosen stem reads its input plain.
fn rewrite(g: &mut Graph, chosen: &[bool], stems: &[bool]) {
    let old_nodes = std::mem::take(&mut g.nodes);
    let n_values = g.values.len();
    // The layout each value is produced in.
    let mut produced_blocked = vec![false; n_values];
    for (i, node) in old_nodes.iter().enumerate() {
        if chosen[i] {
            for &o in &node.outputs {
                produced_blocked[o.index()] = true;
            }
        }
    }
    // Which copies each value needs.
    let mut want_blocked = vec![false; n_values];
    let mut want_plain = vec![false; n_values];
    let needs = |v: ValueId, read_blocked: bool, want_blocked: &mut [bool], want_plain: &mut [bool]| {
        if produced_blocked[v.index()] == read_blocked || is_layout_free(g.ty(v)) {
            return;
        }
        if read_blocked {
            want_blocked[v.index()] = true;
        } else {
            want_plain[v.index()] = true;
        }
    };
    for (i, node) in old_nodes.iter().enumerate() {
        for (slot, &v) in node.inputs.iter().enumerate() {
            let read_blocked = chosen[i] && !stems[i] && is_data_operand(g, node, slot);
            needs(v, read_blocked, &mut want_blocked, &mut want_plain);
        }
    }
    for &o in &g.outputs {
        needs(o, false, &mut want_blocked, &mut want_plain);
    }
    // Copies: value -> (blocked copy, plain copy).
    let mut blocked_copy: Vec<Option<ValueId>> = vec![None; n_values];
    let mut plain_copy: Vec<Option<ValueId>> = vec![None; n_values];
    let mut reorders_after: Vec<Vec<Node>> = vec![Vec::new(); old_nodes.len()];
    let mut reorders_first: Vec<Node> = Vec::new();
    let producers = {
        let mut p = vec![None; n_values];
        for (i, node) in old_nodes.iter().enumerate() {
            for &o in &node.outputs {
                p[o.index()] = Some(i);
            }
        }
        p
    };
    for v in 0..n_values {
        for to_blocked in [true, false] {
            let wanted = if to_blocked { want_blocked[v] } else { want_plain[v] };
            if !wanted {
                continue;
            }
            let value = ValueId(v as u32);
            let ty = g.ty(value).clone();
            let base = match (&g.values[v].name, producers[v]) {
                (name, _) if !name.is_empty() => name.clone(),
                (_, Some(p)) => old_nodes[p].name.clone(),
                _ => format!("%{v}"),
            };
            let (suffix, from, to) = if to_blocked {
                ("to_nchwc8", Layout::Plain, blocked())
            } else {
                ("to_nchw", blocked(), Layout::Plain)
            };
            let copy = g.add_value(ty, String::new());
            let node = Node {
                name: format!("{base}.{suffix}"),
                op: Op::Reorder,
                inputs: vec![value],
                outputs: vec![copy],
                epilogue: Vec::new(),
                schedule: Schedule { layout_in: from, layout_out: to, ..Schedule::default() },
            };
            if to_blocked {
                blocked_copy[v] = Some(copy);
            } else {
                plain_copy[v] = Some(copy);
            }
            match producers[v] {
                Some(p) => reorders_after[p].push(node),
                None => reorders_first.push(node),
            }
        }
    }
    let mut nodes = reorders_first;
    for (i, mut node) in old_nodes.into_iter().enumerate() {
        let reads: Vec<bool> =
            (0..node.inputs.len()).map(|slot| chosen[i] && !stems[i] && is_data_operand(g, &node, slot)).collect();
        for (slot, v) in node.inputs.iter_mut().enumerate() {
            let copy = if reads[slot] { blocked_copy[v.index()] } else { plain_copy[v.index()] };
            if let Some(c) = copy {
                *v = c;
            }
        }
        if chosen[i] {
            node.schedule.layout_in = if stems[i] { Layout::Plain } else { blocked() };
            node.schedule.layout_out = blocked();
        }
        nodes.push(node);
        nodes.append(&mut reorders_after[i]);
    }
    for o in &mut g.outputs {
        if let Some(c) = plain_copy[o.index()] {
            *o = c;
        }
    }
    g.nodes = nodes;
}
