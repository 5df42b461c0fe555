//! What happens to an output tile once the microkernel has written it: edge tiles are
//! merged from a temporary into the output, and after the last reduction block the
//! node's epilogue (bias, activation, residual add, squeeze-and-excite scale) runs on
//! the tile while it is still in L1.
//!
//! A tile is `rows` output channels x `cols` consecutive output positions of one image,
//! rows `row_stride` floats apart. Epilogue operands are addressed per (image, channel,
//! position) with element strides; positions move by 1 (an operand of the output's
//! shape) or 0 (one value per channel or per image), which covers residuals and
//! per-channel scales. Other broadcasts are applied after the convolution instead.
//! On AVX2+FMA targets an epilogue of a bias and unary steps is one call to an 8-lane
//! machine-code function (`microkernel::activation`) per tile instead.

use cnnc_ir::{BinaryFn, DType, UnaryFn};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{Endianness, FuncRef, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::{repeat, scaled};
use crate::kernels::CodegenError;
use crate::kernels::compute::{LANES, scalar_flags, vector_flags};
use crate::kernels::elementwise::{binary_lane, unary_lane};
use crate::microkernel::activation::{self, ActivationSpec};

const F32_BYTES: i64 = 4;

/// Where a binary step's second operand lives, in element strides of the output's
/// (image, channel, position) axes.
#[derive(Clone, Debug, PartialEq)]
pub struct TileOperand {
    /// Index of the operand among the node's buffers.
    pub input: usize,
    pub image_stride: i64,
    pub channel_stride: i64,
    /// 1 or 0.
    pub position_stride: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TileStep {
    Unary(UnaryFn),
    Binary { func: BinaryFn, operand: TileOperand },
}

/// The epilogue of one node as emitted inside its task.
pub struct TileEpilogue<'a> {
    /// Base address of the per-channel bias, added first.
    pub bias: Option<Value>,
    pub steps: &'a [TileStep],
    /// Per step, the operand's base address (None for unary steps).
    pub operands: Vec<Option<Value>>,
    /// Floats between rows of the output.
    pub row_stride: i64,
}

impl TileEpilogue<'_> {
    pub fn is_empty(&self) -> bool {
        self.bias.is_none() && self.steps.is_empty()
    }

    /// Address of step `s`'s operand for (image, channel, position).
    pub fn operand_address(
        &self,
        b: &mut FunctionBuilder,
        s: usize,
        image: Value,
        channel: Value,
        position: Value,
    ) -> Value {
        let TileStep::Binary { operand, .. } = &self.steps[s] else {
            unreachable!("only binary steps have operands")
        };
        let base = self.operands[s].expect("binary steps have an operand address");
        let at = scaled(b, base, image, operand.image_stride * F32_BYTES);
        let at = scaled(b, at, channel, operand.channel_stride * F32_BYTES);
        scaled(b, at, position, operand.position_stride * F32_BYTES)
    }

    /// The epilogue of one value at output (image, channel, position): `y` an F32, or an
    /// F32X4 of the 4 consecutive positions from `position`.
    pub fn emit_at(
        &self,
        b: &mut FunctionBuilder,
        y: Value,
        image: Value,
        channel: Value,
        position: Value,
    ) -> Result<Value, CodegenError> {
        let vector = b.func.dfg.value_type(y) == F32X4;
        let widen = |b: &mut FunctionBuilder, v: Value| if vector { b.ins().splat(F32X4, v) } else { v };
        let bias = self.bias.map(|base| {
            let at = scaled(b, base, channel, F32_BYTES);
            let v = b.ins().load(F32, scalar_flags().with_readonly(), at, 0);
            widen(b, v)
        });
        self.apply(b, y, bias, &mut |b, s| {
            let TileStep::Binary { operand, .. } = &self.steps[s] else {
                unreachable!("only binary steps have operands")
            };
            let at = self.operand_address(b, s, image, channel, position);
            if vector && operand.position_stride == 1 {
                b.ins().load(F32X4, vector_flags().with_readonly(), at, 0)
            } else {
                let v = b.ins().load(F32, scalar_flags().with_readonly(), at, 0);
                widen(b, v)
            }
        })
    }

    /// Applies the steps to `y` (F32 or F32X4); `operand(b, s)` gives step `s`'s operand
    /// in the same type.
    fn apply(
        &self,
        b: &mut FunctionBuilder,
        mut y: Value,
        bias: Option<Value>,
        operand: &mut dyn FnMut(&mut FunctionBuilder, usize) -> Value,
    ) -> Result<Value, CodegenError> {
        if let Some(bias) = bias {
            y = b.ins().fadd(y, bias);
        }
        for (s, step) in self.steps.iter().enumerate() {
            y = match step {
                TileStep::Unary(f) => unary_lane(b, *f, DType::F32, y)?,
                TileStep::Binary { func, .. } => {
                    let x = operand(b, s);
                    binary_lane(b, *func, DType::F32, y, x)?
                }
            };
        }
        Ok(y)
    }

    /// The epilogue as one call to an AVX2+FMA function (`microkernel::activation`),
    /// when it is a bias and unary steps and the graph's functions include it.
    fn activation_function(&self, b: &mut FunctionBuilder) -> Option<FuncRef> {
        let steps: Vec<UnaryFn> = self
            .steps
            .iter()
            .map(|s| match s {
                TileStep::Unary(f) => Some(*f),
                TileStep::Binary { .. } => None,
            })
            .collect::<Option<_>>()?;
        let spec = ActivationSpec::new(self.bias.is_some(), &steps)?;
        activation::import(b.func, &spec)
    }

    /// Calls `function` over `rows` x `cols` at `tile`, rows from output channel `channel`.
    fn call_activation(
        &self,
        b: &mut FunctionBuilder,
        function: FuncRef,
        tile: Value,
        rows: Value,
        cols: Value,
        channel: Value,
    ) {
        let bias = match self.bias {
            Some(base) => scaled(b, base, channel, F32_BYTES),
            None => b.ins().iconst(I64, 0),
        };
        let row_bytes = b.ins().iconst(I64, self.row_stride * F32_BYTES);
        b.ins().call(function, &[tile, rows, cols, row_bytes, bias]);
    }

    /// The epilogue over `rows` rows of `cols` columns at `tile` (`cols` a compile-time
    /// multiple of 4): channel `channel + r` for row r, positions from `position`.
    #[allow(clippy::too_many_arguments)]
    pub fn emit_rows(
        &self,
        b: &mut FunctionBuilder,
        tile: Value,
        image: Value,
        channel: Value,
        position: Value,
        rows: Value,
        cols: usize,
    ) -> Result<(), CodegenError> {
        if let Some(function) = self.activation_function(b) {
            let cols = b.ins().iconst(I64, cols as i64);
            self.call_activation(b, function, tile, rows, cols, channel);
            return Ok(());
        }
        let row_bytes = self.row_stride * F32_BYTES;
        let mut failure = None;
        repeat(b, rows, &[tile, channel], |b, carried| {
            let (row, ch) = (carried[0], carried[1]);
            let bias = self.bias.map(|base| {
                let at = scaled(b, base, ch, F32_BYTES);
                let v = b.ins().load(F32, scalar_flags().with_readonly(), at, 0);
                b.ins().splat(F32X4, v)
            });
            // Per step: the operand's address at this row's first position, and for
            // operands constant along positions, the value itself.
            let mut row_operands: Vec<Option<(Value, Option<Value>)>> = Vec::new();
            for (s, step) in self.steps.iter().enumerate() {
                row_operands.push(match step {
                    TileStep::Unary(_) => None,
                    TileStep::Binary { operand, .. } => {
                        let at = self.operand_address(b, s, image, ch, position);
                        let splat = (operand.position_stride == 0).then(|| {
                            let v = b.ins().load(F32, scalar_flags().with_readonly(), at, 0);
                            b.ins().splat(F32X4, v)
                        });
                        Some((at, splat))
                    }
                });
            }
            for v in 0..cols / LANES {
                let offset = (v * LANES) as i32 * F32_BYTES as i32;
                let y = b.ins().load(F32X4, vector_flags(), row, offset);
                let result = self.apply(b, y, bias, &mut |b, s| match row_operands[s] {
                    Some((_, Some(splat))) => splat,
                    Some((at, None)) => b.ins().load(F32X4, vector_flags().with_readonly(), at, offset),
                    None => unreachable!("unary steps read no operand"),
                });
                match result {
                    Ok(y) => {
                        b.ins().store(vector_flags(), y, row, offset);
                    }
                    Err(e) => failure = Some(e),
                }
            }
            vec![b.ins().iadd_imm_s(row, row_bytes), b.ins().iadd_imm_s(ch, 1)]
        });
        failure.map_or(Ok(()), Err)
    }

    /// The epilogue over a `rows` x `cols` region of the output at `tile` (run-time
    /// extents), in place, one element at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn emit_region(
        &self,
        b: &mut FunctionBuilder,
        tile: Value,
        rows: Value,
        cols: Value,
        image: Value,
        channel: Value,
        position: Value,
    ) -> Result<(), CodegenError> {
        if let Some(function) = self.activation_function(b) {
            self.call_activation(b, function, tile, rows, cols, channel);
            return Ok(());
        }
        let from = Source {
            at: tile,
            row_bytes: self.row_stride * F32_BYTES,
            col_bytes: F32_BYTES,
        };
        self.emit_region_from(b, from, tile, rows, cols, image, channel, position)
    }

    /// Like `emit_region`, reading the values from `from` instead of the output (a
    /// transposed tile: channels along its columns) and writing them to `tile`.
    #[allow(clippy::too_many_arguments)]
    pub fn emit_region_from(
        &self,
        b: &mut FunctionBuilder,
        from: Source,
        tile: Value,
        rows: Value,
        cols: Value,
        image: Value,
        channel: Value,
        position: Value,
    ) -> Result<(), CodegenError> {
        let row_bytes = self.row_stride * F32_BYTES;
        let mut failure = None;
        repeat(b, rows, &[tile, from.at, channel], |b, carried| {
            let (row, src_row, ch) = (carried[0], carried[1], carried[2]);
            let bias = self.bias.map(|base| {
                let at = scaled(b, base, ch, F32_BYTES);
                b.ins().load(F32, scalar_flags().with_readonly(), at, 0)
            });
            let starts: Vec<Option<Value>> = (0..self.steps.len())
                .map(|s| match self.steps[s] {
                    TileStep::Unary(_) => None,
                    TileStep::Binary { .. } => Some(self.operand_address(b, s, image, ch, position)),
                })
                .collect();
            // Pointer slots: output, source, then one per binary step.
            let mut slots = Vec::with_capacity(starts.len());
            let mut next_slot = 2;
            for s in &starts {
                slots.push(next_slot);
                if s.is_some() {
                    next_slot += 1;
                }
            }
            let mut carried_cols = vec![row, src_row];
            carried_cols.extend(starts.iter().flatten().copied());
            repeat(b, cols, &carried_cols, |b, ptrs| {
                let y = b.ins().load(F32, scalar_flags(), ptrs[1], 0);
                let result = self.apply(b, y, bias, &mut |b, s| {
                    b.ins().load(F32, scalar_flags().with_readonly(), ptrs[slots[s]], 0)
                });
                match result {
                    Ok(y) => {
                        b.ins().store(scalar_flags(), y, ptrs[0], 0);
                    }
                    Err(e) => failure = Some(e),
                }
                let mut next = vec![
                    b.ins().iadd_imm_s(ptrs[0], F32_BYTES),
                    b.ins().iadd_imm_s(ptrs[1], from.col_bytes),
                ];
                for (s, step) in self.steps.iter().enumerate() {
                    if let TileStep::Binary { operand, .. } = step {
                        next.push(b.ins().iadd_imm_s(ptrs[slots[s]], operand.position_stride * F32_BYTES));
                    }
                }
                next
            });
            vec![
                b.ins().iadd_imm_s(row, row_bytes),
                b.ins().iadd_imm_s(src_row, from.row_bytes),
                b.ins().iadd_imm_s(ch, 1),
            ]
        });
        failure.map_or(Ok(()), Err)
    }
}

/// Where `emit_region_from` reads: the element of (row 0, column 0), and the byte steps
/// to the next row (output channel) and column (position).
#[derive(Clone, Copy)]
pub struct Source {
    pub at: Value,
    pub row_bytes: i64,
    pub col_bytes: i64,
}

/// Copies (or, when `accumulate != 0`, adds) the `rows` x `cols` valid part of a
/// temporary tile (`tmp_stride` floats per row) into the output tile at `dst`. Rows of
/// all `full_cols` columns (a multiple of 4: the tile's width) move as vectors.
#[allow(clippy::too_many_arguments)]
pub fn emit_merge(
    b: &mut FunctionBuilder,
    tmp: Value,
    tmp_stride: i64,
    dst: Value,
    dst_stride: i64,
    rows: Value,
    cols: Value,
    full_cols: usize,
    accumulate: Value,
) {
    let vector_rows = b.create_block();
    let scalar_rows = b.create_block();
    let done = b.create_block();
    let whole = b.ins().icmp_imm_s(IntCC::Equal, cols, full_cols as i64);
    b.ins().brif(whole, vector_rows, &[], scalar_rows, &[]);

    b.switch_to_block(vector_rows);
    b.seal_block(vector_rows);
    // Bits of the old value kept only when accumulating: before the first block the
    // output holds arbitrary bytes (NaN included), which must not reach the sum.
    let keep = b.ins().ineg(accumulate);
    let keep = b.ins().ireduce(I32, keep);
    let keep = b.ins().splat(I32X4, keep);
    let keep = b
        .ins()
        .bitcast(F32X4, MemFlagsData::new().with_endianness(Endianness::Little), keep);
    repeat(b, rows, &[tmp, dst], |b, ptrs| {
        for v in 0..full_cols / LANES {
            let offset = (v * LANES * 4) as i32;
            let t = b.ins().load(F32X4, vector_flags(), ptrs[0], offset);
            let old = b.ins().load(F32X4, vector_flags(), ptrs[1], offset);
            let old = b.ins().band(old, keep);
            let sum = b.ins().fadd(t, old);
            b.ins().store(vector_flags(), sum, ptrs[1], offset);
        }
        vec![
            b.ins().iadd_imm_s(ptrs[0], tmp_stride * F32_BYTES),
            b.ins().iadd_imm_s(ptrs[1], dst_stride * F32_BYTES),
        ]
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(scalar_rows);
    b.seal_block(scalar_rows);
    repeat(b, rows, &[tmp, dst], |b, carried| {
        repeat(b, cols, carried, |b, ptrs| {
            let t = b.ins().load(F32, scalar_flags(), ptrs[0], 0);
            // The output holds the earlier blocks' sum only when accumulating; before
            // that it is whatever the buffer held, read but discarded by the select.
            let old = b.ins().load(F32, scalar_flags(), ptrs[1], 0);
            let sum = b.ins().fadd(t, old);
            let v = b.ins().select(accumulate, sum, t);
            b.ins().store(scalar_flags(), v, ptrs[1], 0);
            vec![
                b.ins().iadd_imm_s(ptrs[0], F32_BYTES),
                b.ins().iadd_imm_s(ptrs[1], F32_BYTES),
            ]
        });
        vec![
            b.ins().iadd_imm_s(carried[0], tmp_stride * F32_BYTES),
            b.ins().iadd_imm_s(carried[1], dst_stride * F32_BYTES),
        ]
    });
    b.ins().jump(done, &[]);

    b.switch_to_block(done);
    b.seal_block(done);
}
