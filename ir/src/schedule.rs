//! How a node is to be executed, as data chosen by passes and shown in IR dumps.
//! Code generators read it; the reference interpreter ignores it.

/// Memory layout of a 4-D-or-higher activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// Dense row-major, channels second (NCHW, NCDHW, ...).
    #[default]
    Plain,
    /// Channels split into blocks of `block` innermost (NCHWc): [N, C/c, H, W, c].
    Blocked { block: u32 },
}

/// Execution choices for one node. The default is what the unoptimised path does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Schedule {
    /// Layout of the node's activation input and output.
    pub layout_in: Layout,
    pub layout_out: Layout,
    /// SIMD width in f32 lanes (0 = the code generator's default).
    pub vector_width: u32,
    /// Named tile sizes, e.g. [("oc", 16), ("ow", 6)], in loop order.
    pub tiles: Vec<(String, usize)>,
    /// Which microkernel family the code generator should use (empty = generic).
    pub kernel: String,
}

impl Schedule {
    pub fn is_default(&self) -> bool {
        *self == Schedule::default()
    }
}
