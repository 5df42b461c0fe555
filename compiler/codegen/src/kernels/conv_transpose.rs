//! Transposed convolution (`Op::ConvTranspose`) over any number of spatial axes, f32.
//!
//! The output is first set to the bias (or 0). Then, per batch, group, block of up
//! to 4 output channels and kernel tap, the inputs whose tap lands inside the output
//! form a box known at compile time (`window::transposed_input_range`), so no bounds
//! are tested: a tile of consecutive inputs along the innermost axis loads the
//! outputs it feeds (stride apart), accumulates over the group's input channels in
//! registers, and stores them back. Taps are unrolled, so code size grows with the
//! kernel volume.

use cnnc_ir::{ConvGeometry, DType, Op};
use cranelift_codegen::ir::{
    FuncRef, InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value,
    types::{F32, F32X4, I64},
};
use cranelift_frontend::FunctionBuilder;

use super::compute::window::transposed_input_range;
use super::compute::{
    F32_BYTES, LANES, counted_loop, index_ptr, input_flags, load, load_f32x4_strided, mul_add,
    offset_ptr, require_buffers, require_dtype, require_plain_layout, scalar_flags, splat_f32,
    store, store_f32x4_strided, tiled_loop, vector_flags,
};
use super::compute::misrouted;
use super::{CodegenError, KernelCtx};
use super::conv_transpose_depthwise::StridedDepthwise;
use crate::microkernel::conv_transpose_x86::{self, TransposedSpec};

const CHANNEL_BLOCK: usize = 4;

/// Code-size bound: tiles one transposed convolution may emit (taps × 3 tile widths
/// × 2 channel-block sizes); ordinary layers need < 200.
const MAX_TILE_BODIES: usize = 20_000;

fn vectors_per_channel(channels: usize) -> usize {
    match channels {
        4 => 2,
        3 => 3,
        _ => 4,
    }
}

fn bytes(elements: usize) -> i64 {
    elements as i64 * F32_BYTES
}

pub fn emit(k: &mut KernelCtx) -> Result<(), CodegenError> {
    let Op::ConvTranspose(geometry) = &k.node.op else {
        return Err(misrouted(k, "conv_transpose"));
    };
    require_plain_layout(k)?;
    require_buffers(k, 2, 3, 1)?;
    let x = k.graph.ty(k.node.inputs[0]);
    let w = k.graph.ty(k.node.inputs[1]);
    let y = k.graph.ty(k.node.outputs[0]);
    require_dtype(k, "input", x, DType::F32)?;
    require_dtype(k, "weight", w, DType::F32)?;
    require_dtype(k, "output", y, DType::F32)?;
    if let Some(&bias) = k.node.inputs.get(2) {
        require_dtype(k, "bias", k.graph.ty(bias), DType::F32)?;
    }
    if let Some(plan) = StridedDepthwise::of_node(k.graph, k.node) {
        plan.emit(k.b, k.inputs[0], k.inputs[1], k.inputs.get(2).copied(), k.outputs[0]);
        return Ok(());
    }
    if let Some(spec) = TransposedSpec::of_node(k.graph, k.node)
        && let Some(code) = conv_transpose_x86::import(k.b.func, &spec)
    {
        let batch = x.shape[0];
        emit_gather(k.b, &spec, code, batch, k.inputs[0], k.inputs[1], k.inputs.get(2).copied(), k.outputs[0]);
        return Ok(());
    }
    let plan = Plan::new(&x.shape, &w.shape, &y.shape, geometry)
        .map_err(|e| CodegenError(format!("conv_transpose node '{}': {e}", k.node.name)))?;
    let bodies = plan.kernel_size.saturating_mul(6);
    if bodies > MAX_TILE_BODIES {
        return Err(CodegenError(format!(
            "conv_transpose node '{}': a kernel of {} taps would need {bodies} specialised tiles (limit {MAX_TILE_BODIES})",
            k.node.name, plan.kernel_size
        )));
    }
    let plan = Plan {
        weight_flags: input_flags(k, 1, scalar_flags()),
        bias_flags: input_flags(k, 2, scalar_flags()),
        ..plan
    };
    plan.emit(
        k.b,
        k.inputs[0],
        k.inputs[1],
        k.inputs.get(2).copied(),
        k.outputs[0],
    );
    Ok(())
}

/// Stride-1 transposed convolutions on AVX2+FMA (`microkernel::conv_transpose_x86`):
/// per image, the input is copied into a column-padded buffer on the stack (its pad
/// columns zeroed once, the copy rewriting only the interior), then the machine code
/// gathers every output row from it.
#[allow(clippy::too_many_arguments)]
fn emit_gather(
    b: &mut FunctionBuilder,
    spec: &TransposedSpec,
    code: FuncRef,
    batch: usize,
    x: Value,
    w: Value,
    bias: Option<Value>,
    y: Value,
) {
    let padded_bytes = spec.padded_bytes();
    let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, padded_bytes as u32, 5));
    let xp = b.ins().stack_addr(I64, slot, 0);
    let zero = splat_f32(b, 0.0);
    let zero_scalar = b.ins().f32const(0.0);
    let (tail, rest) = tiled_loop(b, padded_bytes / 4, LANES, vec![xp], |b, _, p| {
        store(b, vector_flags(), zero, p[0], 0);
        vec![b.ins().iadd_imm_s(p[0], bytes(LANES))]
    });
    counted_loop(b, rest, tail, |b, _, p| {
        store(b, scalar_flags(), zero_scalar, p[0], 0);
        vec![b.ins().iadd_imm_s(p[0], F32_BYTES)]
    });

    let shift = spec.padded_shift();
    let padded_width = spec.padded_width() as isize;
    let first = shift.max(0) as usize;
    let end = (spec.in_w as isize).min(padded_width + shift).max(first as isize) as usize;
    let columns = end - first;
    let x_image = bytes(spec.in_channels * spec.in_h * spec.in_w);
    let y_image = bytes(spec.out_channels * spec.out_h * spec.out_w);
    let bias = bias.unwrap_or_else(|| b.ins().iconst(I64, 0));
    counted_loop(b, batch, vec![], |b, n, _| {
        let x_n = index_ptr(b, x, n, x_image);
        let y_n = index_ptr(b, y, n, y_image);
        let src = offset_ptr(b, x_n, bytes(first));
        let dst = offset_ptr(b, xp, (first as isize - shift) as i64 * F32_BYTES);
        counted_loop(b, spec.in_channels * spec.in_h, vec![src, dst], |b, _, rows| {
            let (at, rest) = tiled_loop(b, columns, LANES, rows.to_vec(), |b, _, c| {
                let v = load(b, F32X4, vector_flags(), c[0], 0);
                store(b, vector_flags(), v, c[1], 0);
                vec![b.ins().iadd_imm_s(c[0], bytes(LANES)), b.ins().iadd_imm_s(c[1], bytes(LANES))]
            });
            counted_loop(b, rest, at, |b, _, c| {
                let v = load(b, F32, scalar_flags(), c[0], 0);
                store(b, scalar_flags(), v, c[1], 0);
                vec![b.ins().iadd_imm_s(c[0], F32_BYTES), b.ins().iadd_imm_s(c[1], F32_BYTES)]
            });
            vec![
                b.ins().iadd_imm_s(rows[0], bytes(spec.in_w)),
                b.ins().iadd_imm_s(rows[1], bytes(spec.padded_width())),
            ]
        });
        b.ins().call(code, &[xp, w, y_n, bias]);
        vec![]
    });
}

struct Plan {
    batch: usize,
    groups: usize,
    in_per_group: usize,
    out_per_group: usize,
    g: ConvGeometry,
    in_sp: Vec<usize>,
    out_sp: Vec<usize>,
    k_sp: Vec<usize>,
    in_strides: Vec<usize>,
    out_strides: Vec<usize>,
    in_plane: usize,
    out_plane: usize,
    kernel_size: usize,
    /// Load flags of the weight and bias (movable when immutable during the call).
    weight_flags: MemFlagsData,
    bias_flags: MemFlagsData,
}

/// A block of output channels and one kernel tap.
#[derive(Clone, Copy)]
struct TapBlock {
    channels: usize,
    /// Weight of input channel 0, the block's first output channel, this tap.
    w: Value,
}

#[derive(Clone, Copy, PartialEq)]
enum Width {
    Vectors(usize),
    Scalar,
}

impl Plan {
    fn new(x: &[usize], w: &[usize], y: &[usize], g: &ConvGeometry) -> Result<Plan, String> {
        let rank = x.len();
        if rank < 3 || w.len() != rank || y.len() != rank {
            return Err(format!(
                "input {x:?}, weight {w:?} and output {y:?} must share a rank >= 3"
            ));
        }
        let spatial = rank - 2;
        if [
            g.strides.len(),
            g.dilations.len(),
            g.pads_begin.len(),
            g.pads_end.len(),
        ] != [spatial; 4]
        {
            return Err(format!(
                "geometry needs {spatial} strides, dilations and pads"
            ));
        }
        let groups = g.groups;
        if groups == 0
            || x[1] != w[0]
            || !x[1].is_multiple_of(groups)
            || y[1] != w[1] * groups
            || y[0] != x[0]
        {
            return Err(format!(
                "input {x:?}, weight {w:?}, output {y:?} disagree for groups={groups}"
            ));
        }
        if g.strides.contains(&0) || g.dilations.contains(&0) || w[2..].contains(&0) {
            return Err("zero kernel size, stride or dilation".into());
        }
        let (in_sp, out_sp, k_sp) = (x[2..].to_vec(), y[2..].to_vec(), w[2..].to_vec());
        Ok(Plan {
            batch: x[0],
            groups,
            in_per_group: x[1] / groups,
            out_per_group: w[1],
            g: g.clone(),
            in_strides: cnnc_ir::strides(&in_sp),
            out_strides: cnnc_ir::strides(&out_sp),
            in_plane: in_sp.iter().product(),
            out_plane: out_sp.iter().product(),
            kernel_size: k_sp.iter().product(),
            weight_flags: scalar_flags(),
            bias_flags: scalar_flags(),
            in_sp,
            out_sp,
            k_sp,
        })
    }

    fn emit(&self, b: &mut FunctionBuilder, x: Value, w: Value, bias: Option<Value>, y: Value) {
        let out_channels = self.groups * self.out_per_group;
        self.emit_init(b, bias, y, out_channels);
        let x_batch = bytes(self.groups * self.in_per_group * self.in_plane);
        let y_batch = bytes(out_channels * self.out_plane);
        counted_loop(b, self.batch, vec![], |b, n, _| {
            let x_n = index_ptr(b, x, n, x_batch);
            let y_n = index_ptr(b, y, n, y_batch);
            counted_loop(b, self.groups, vec![], |b, g, _| {
                let x_g = index_ptr(b, x_n, g, bytes(self.in_per_group * self.in_plane));
                let w_g = index_ptr(
                    b,
                    w,
                    g,
                    bytes(self.in_per_group * self.out_per_group * self.kernel_size),
                );
                let y_g = index_ptr(b, y_n, g, bytes(self.out_per_group * self.out_plane));
                let block = CHANNEL_BLOCK.min(self.out_per_group.max(1));
                let (_, rest) = tiled_loop(b, self.out_per_group, block, vec![], |b, i, _| {
                    let w_block = index_ptr(b, w_g, i, bytes(block * self.kernel_size));
                    let y_block = index_ptr(b, y_g, i, bytes(block * self.out_plane));
                    self.emit_taps(b, block, x_g, w_block, y_block);
                    vec![]
                });
                if rest > 0 {
                    let first = self.out_per_group - rest;
                    let w_block = offset_ptr(b, w_g, bytes(first * self.kernel_size));
                    let y_block = offset_ptr(b, y_g, bytes(first * self.out_plane));
                    self.emit_taps(b, rest, x_g, w_block, y_block);
                }
                vec![]
            });
            vec![]
        });
    }

    /// Every output plane set to its channel's bias, or zero.
    fn emit_init(
        &self,
        b: &mut FunctionBuilder,
        bias: Option<Value>,
        y: Value,
        out_channels: usize,
    ) {
        let plane = bytes(self.out_plane);
        let y_batch = bytes(out_channels * self.out_plane);
        counted_loop(b, self.batch, vec![], |b, n, _| {
            let y_n = index_ptr(b, y, n, y_batch);
            counted_loop(b, out_channels, vec![y_n], |b, m, c| {
                let (vector, scalar) = match bias {
                    Some(p) => {
                        let at = index_ptr(b, p, m, F32_BYTES);
                        let v = load(b, F32, self.bias_flags, at, 0);
                        (b.ins().splat(F32X4, v), v)
                    }
                    None => (splat_f32(b, 0.0), b.ins().f32const(0.0)),
                };
                let (tail, rest) = tiled_loop(b, self.out_plane, LANES, vec![c[0]], |b, _, p| {
                    store(b, vector_flags(), vector, p[0], 0);
                    vec![b.ins().iadd_imm_s(p[0], bytes(LANES))]
                });
                counted_loop(b, rest, tail, |b, _, p| {
                    store(b, scalar_flags(), scalar, p[0], 0);
                    vec![b.ins().iadd_imm_s(p[0], F32_BYTES)]
                });
                vec![b.ins().iadd_imm_s(c[0], plane)]
            });
            vec![]
        });
    }

    /// Every kernel tap for one block of output channels.
    fn emit_taps(&self, b: &mut FunctionBuilder, channels: usize, x: Value, w: Value, y: Value) {
        let spatial = self.in_sp.len();
        for tap in 0..self.kernel_size {
            let mut rem = tap;
            let mut kk = vec![0; spatial];
            for d in (0..spatial).rev() {
                kk[d] = rem % self.k_sp[d];
                rem /= self.k_sp[d];
            }
            let ranges: Vec<(usize, usize)> = (0..spatial)
                .map(|d| {
                    transposed_input_range(
                        self.in_sp[d],
                        self.out_sp[d],
                        self.g.strides[d],
                        self.g.dilations[d],
                        self.g.pads_begin[d],
                        kk[d],
                    )
                })
                .collect();
            if ranges.iter().any(|&(begin, end)| begin == end) {
                continue;
            }
            let mut x_off = 0i64;
            let mut y_off = 0i64;
            for d in 0..spatial {
                let i = ranges[d].0;
                let o = (i * self.g.strides[d] + kk[d] * self.g.dilations[d]) as i64
                    - self.g.pads_begin[d] as i64;
                x_off += (i * self.in_strides[d]) as i64;
                y_off += o * self.out_strides[d] as i64;
            }
            let block = TapBlock {
                channels,
                w: offset_ptr(b, w, bytes(tap)),
            };
            let x0 = offset_ptr(b, x, x_off * F32_BYTES);
            let y0 = offset_ptr(b, y, y_off * F32_BYTES);
            self.emit_region(b, &block, 0, &ranges, x0, y0);
        }
    }

    /// The box of inputs `ranges` from axis `axis` inward.
    fn emit_region(
        &self,
        b: &mut FunctionBuilder,
        block: &TapBlock,
        axis: usize,
        ranges: &[(usize, usize)],
        x: Value,
        y: Value,
    ) {
        let count = ranges[axis].1 - ranges[axis].0;
        let stride = self.g.strides[axis];
        let x_step = bytes(self.in_strides[axis]);
        let y_step = bytes(stride * self.out_strides[axis]);
        if axis + 1 < ranges.len() {
            counted_loop(b, count, vec![x, y], |b, _, c| {
                self.emit_region(b, block, axis + 1, ranges, c[0], c[1]);
                vec![
                    b.ins().iadd_imm_s(c[0], x_step),
                    b.ins().iadd_imm_s(c[1], y_step),
                ]
            });
            return;
        }
        let vectors = vectors_per_channel(block.channels);
        let mut widths = vec![Width::Vectors(vectors)];
        if vectors > 1 {
            widths.push(Width::Vectors(1));
        }
        widths.push(Width::Scalar);
        let mut cursors = vec![x, y];
        let mut left = count;
        for width in widths {
            let positions = match width {
                Width::Vectors(n) => n * LANES,
                Width::Scalar => 1,
            };
            let (c, rest) = tiled_loop(b, left, positions, cursors, |b, _, c| {
                self.emit_tile(b, block, width, c[0], c[1]);
                vec![
                    b.ins().iadd_imm_s(c[0], positions as i64 * x_step),
                    b.ins().iadd_imm_s(c[1], positions as i64 * y_step),
                ]
            });
            cursors = c;
            left = rest;
        }
    }

    /// Outputs fed by `width` consecutive inputs, for each channel of the block.
    fn emit_tile(
        &self,
        b: &mut FunctionBuilder,
        block: &TapBlock,
        width: Width,
        x: Value,
        y: Value,
    ) {
        let stride = *self.g.strides.last().expect("at least one spatial axis");
        let per_channel = match width {
            Width::Vectors(n) => n,
            Width::Scalar => 1,
        };
        let out_offset = |r: usize, v: usize| bytes(r * self.out_plane + v * LANES * stride);
        let mut carried = vec![x, block.w];
        for r in 0..block.channels {
            for v in 0..per_channel {
                carried.push(match width {
                    Width::Vectors(_) => {
                        load_f32x4_strided(b, vector_flags(), y, out_offset(r, v), stride)
                    }
                    Width::Scalar => load(b, F32, scalar_flags(), y, out_offset(r, v)),
                });
            }
        }
        let w_channel = bytes(self.kernel_size);
        let done = counted_loop(b, self.in_per_group, carried, |b, _, c| {
            let (xc, wc) = (c[0], c[1]);
            let mut accs = c[2..].to_vec();
            let inputs: Vec<Value> = (0..per_channel)
                .map(|v| match width {
                    Width::Vectors(_) => load(b, F32X4, vector_flags(), xc, bytes(v * LANES)),
                    Width::Scalar => load(b, F32, scalar_flags(), xc, 0),
                })
                .collect();
            for r in 0..block.channels {
                let s = load(b, F32, self.weight_flags, wc, r as i64 * w_channel);
                let wv = if width == Width::Scalar {
                    s
                } else {
                    b.ins().splat(F32X4, s)
                };
                for (v, &input) in inputs.iter().enumerate() {
                    let i = r * per_channel + v;
                    accs[i] = mul_add(b, accs[i], input, wv);
                }
            }
            let mut next = vec![
                b.ins().iadd_imm_s(xc, bytes(self.in_plane)),
                b.ins()
                    .iadd_imm_s(wc, bytes(self.out_per_group * self.kernel_size)),
            ];
            next.extend(accs);
            next
        });
        for r in 0..block.channels {
            for v in 0..per_channel {
                let acc = done[2 + r * per_channel + v];
                match width {
                    Width::Vectors(_) => store_f32x4_strided(b, acc, y, out_offset(r, v), stride),
                    Width::Scalar => store(b, scalar_flags(), acc, y, out_offset(r, v)),
                }
            }
        }
    }
}
