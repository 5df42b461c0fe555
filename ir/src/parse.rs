//! The IR's text form, read (see `crate::print` for the format). Parsing checks
//! syntax and that the text describes a complete value table; whether the graph
//! makes sense is `crate::verify`'s job, so a broken graph that was printed for
//! debugging reads back as the same broken graph.

mod lex;

use std::collections::HashMap;
use std::fmt;

use lex::{Lexer, Tok, Token};

use crate::graph::{ConstId, ConstValue, Constant, Graph, Node, Value, ValueId};
use crate::op::{
    ArgKind, BinaryFn, ConvGeometry, EpilogueStep, Op, PadMode, PoolAttrs, PoolKind, ReduceKind, UnaryFn,
};
use crate::print::{ALL_BINARY_FNS, ALL_REDUCE_KINDS, CANONICAL_NAN_BITS, binary_name, reduce_name, unary_parts};
use crate::schedule::{Layout, Schedule};
use crate::types::{DType, Scalar, TensorData, TensorType};

/// Where and why the text could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Reads a graph printed by `crate::print::print` (or written by hand in that form).
///
/// ```
/// let text = "graph \"g\"\ninputs:\n  %0 \"x\": f32[2]\nnodes:\n  %1: f32[2] = unary relu %0 \"r\"\noutputs: %1\n";
/// let g = cnnc_ir::parse(text).unwrap();
/// assert_eq!(g.nodes[0].op, cnnc_ir::Op::Unary(cnnc_ir::UnaryFn::Relu));
/// assert_eq!(cnnc_ir::print(&g), text);
/// let e = cnnc_ir::parse("graph \"g\"\nnodes:\n  %0: f32[2] = relu\n").unwrap_err();
/// assert_eq!(e.to_string(), "line 3, column 16: unknown op `relu`");
/// ```
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut parser = Parser { text, lexer: Lexer::new(text), lookahead: Vec::new() };
    parser.graph().map_err(|e| {
        let (line, column) = lex::line_column(text, e.at);
        ParseError { line, column, message: e.message }
    })
}

/// A failure at a byte offset; turned into line and column once, at the end.
struct Failure {
    at: usize,
    message: String,
}

type PResult<T> = Result<T, Failure>;

fn fail<T>(at: usize, message: impl Into<String>) -> PResult<T> {
    Err(Failure { at, message: message.into() })
}

struct Parser<'a> {
    text: &'a str,
    lexer: Lexer<'a>,
    /// Tokens lexed but not consumed, next first.
    lookahead: Vec<Token<'a>>,
}

/// Where a value was declared, to check that repeated declarations agree.
struct Declaration {
    value: Value,
    at: usize,
}

#[derive(Default)]
struct GraphBuilder {
    values: HashMap<u32, Declaration>,
    /// Operands and graph outputs, checked against the declarations at the end.
    uses: Vec<(ValueId, usize)>,
    constants: Vec<Constant>,
    nodes: Vec<Node>,
    inputs: Vec<ValueId>,
    outputs: Vec<ValueId>,
}

impl GraphBuilder {
    fn declare(&mut self, id: ValueId, value: Value, at: usize, text: &str) -> PResult<()> {
        if let Some(first) = self.values.get(&id.0) {
            if first.value != value {
                let (line, _) = lex::line_column(text, first.at);
                return fail(at, format!("{id} is declared again with a different type or name (first declared on line {line})"));
            }
            return Ok(());
        }
        self.values.insert(id.0, Declaration { value, at });
        Ok(())
    }

    /// The value table: ids must be exactly 0..n, each declared.
    fn finish(mut self, name: String, end: usize) -> PResult<Graph> {
        for &(id, at) in &self.uses {
            if !self.values.contains_key(&id.0) {
                return fail(at, format!("{id} is used but never declared (declare it as an input, a node output or under `values:`)"));
            }
        }
        let count = self.values.len();
        if let Some(missing) = (0..count as u32).find(|i| !self.values.contains_key(i)) {
            let highest = self.values.iter().max_by_key(|(id, _)| **id).map_or(end, |(_, d)| d.at);
            return fail(highest, format!("value ids must be dense, but %{missing} is never declared"));
        }
        let values = (0..count as u32).filter_map(|i| self.values.remove(&i)).map(|d| d.value).collect();
        Ok(Graph {
            name,
            values,
            constants: self.constants,
            nodes: self.nodes,
            inputs: self.inputs,
            outputs: self.outputs,
        })
    }
}

impl<'a> Parser<'a> {
    fn fill(&mut self, n: usize) -> PResult<()> {
        while self.lookahead.len() < n {
            let t = self.lexer.next_token().map_err(|e| Failure { at: e.at, message: e.message })?;
            self.lookahead.push(t);
        }
        Ok(())
    }

    fn peek(&mut self) -> PResult<&Token<'a>> {
        self.peek_nth(0)
    }

    fn peek_nth(&mut self, n: usize) -> PResult<&Token<'a>> {
        self.fill(n + 1)?;
        Ok(&self.lookahead[n])
    }

    fn next(&mut self) -> PResult<Token<'a>> {
        self.fill(1)?;
        Ok(self.lookahead.remove(0))
    }

    fn at(&mut self) -> PResult<usize> {
        Ok(self.peek()?.at)
    }

    fn unexpected<T>(&self, token: &Token, wanted: &str) -> PResult<T> {
        fail(token.at, format!("expected {wanted}, found {}", describe(&token.tok)))
    }

    fn eat_punct(&mut self, c: char) -> PResult<bool> {
        if self.peek()?.tok == Tok::Punct(c) {
            self.next()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn expect_punct(&mut self, c: char) -> PResult<()> {
        let t = self.next()?;
        if t.tok != Tok::Punct(c) {
            return self.unexpected(&t, &format!("`{c}`"));
        }
        Ok(())
    }

    fn word(&mut self, wanted: &str) -> PResult<(&'a str, usize)> {
        let t = self.next()?;
        match t.tok {
            Tok::Word(w) => Ok((w, t.at)),
            _ => self.unexpected(&t, wanted),
        }
    }

    fn keyword(&mut self, kw: &str) -> PResult<()> {
        let t = self.next()?;
        if t.tok != Tok::Word(kw) {
            return self.unexpected(&t, &format!("`{kw}`"));
        }
        Ok(())
    }

    fn string(&mut self, wanted: &str) -> PResult<String> {
        let t = self.next()?;
        match t.tok {
            Tok::Str(s) => Ok(s),
            _ => self.unexpected(&t, wanted),
        }
    }

    fn optional_string(&mut self) -> PResult<String> {
        if let Tok::Str(_) = self.peek()?.tok {
            return self.string("a string");
        }
        Ok(String::new())
    }

    fn end_of_line(&mut self) -> PResult<()> {
        let t = self.next()?;
        match t.tok {
            Tok::Newline | Tok::Eof => Ok(()),
            _ => self.unexpected(&t, "end of line"),
        }
    }

    fn skip_newlines(&mut self) -> PResult<()> {
        while self.peek()?.tok == Tok::Newline {
            self.next()?;
        }
        Ok(())
    }

    fn graph(&mut self) -> PResult<Graph> {
        self.skip_newlines()?;
        self.keyword("graph")?;
        let name = self.string("the graph's name as a string")?;
        self.end_of_line()?;
        let mut b = GraphBuilder::default();
        let mut seen: Vec<&str> = Vec::new();
        loop {
            self.skip_newlines()?;
            let t = self.next()?;
            let section = match t.tok {
                Tok::Eof => break,
                Tok::Word(w @ ("inputs" | "constants" | "nodes" | "values" | "outputs")) => w,
                _ => return self.unexpected(&t, "a section (`inputs:`, `constants:`, `nodes:`, `values:` or `outputs:`)"),
            };
            if seen.contains(&section) {
                return fail(t.at, format!("section `{section}` appears twice"));
            }
            seen.push(section);
            self.expect_punct(':')?;
            if section == "outputs" {
                b.outputs = self.operands(&mut b)?;
                self.end_of_line()?;
                continue;
            }
            self.end_of_line()?;
            loop {
                self.skip_newlines()?;
                let starts_item = matches!(
                    (&self.peek()?.tok, section),
                    (Tok::Value(_), "inputs" | "values" | "nodes") | (Tok::Punct('('), "nodes") | (Tok::Const(_), "constants")
                );
                if !starts_item {
                    break;
                }
                match section {
                    "inputs" | "values" => {
                        let at = self.at()?;
                        let (id, value) = self.value_decl()?;
                        b.declare(id, value, at, self.text)?;
                        if section == "inputs" {
                            b.inputs.push(id);
                        }
                    }
                    "constants" => {
                        let c = self.constant(b.constants.len())?;
                        b.constants.push(c);
                    }
                    _ => {
                        let node = self.node(&mut b)?;
                        b.nodes.push(node);
                    }
                }
                self.end_of_line()?;
            }
        }
        let end = self.text.len();
        b.finish(name, end)
    }

    /// `%N "name": type`, the name optional.
    fn value_decl(&mut self) -> PResult<(ValueId, Value)> {
        let t = self.next()?;
        let Tok::Value(id) = t.tok else {
            return self.unexpected(&t, "a value (`%N`)");
        };
        let name = self.optional_string()?;
        self.expect_punct(':')?;
        let ty = self.tensor_type()?;
        Ok((ValueId(id), Value { ty, name }))
    }

    /// `f32[1,3,224,224]`
    fn tensor_type(&mut self) -> PResult<TensorType> {
        let dtype = self.dtype()?;
        let shape = self.list(|p| p.usize())?;
        Ok(TensorType { dtype, shape })
    }

    fn dtype(&mut self) -> PResult<DType> {
        let (w, at) = self.word("a dtype")?;
        DType::from_name(w).map_or_else(|| fail(at, format!("unknown dtype `{w}` (expected f32, i64, i32 or bool)")), Ok)
    }

    fn peek_dtype(&mut self) -> PResult<Option<DType>> {
        Ok(match self.peek()?.tok {
            Tok::Word(w) => DType::from_name(w),
            _ => None,
        })
    }

    /// `@N "name": type = splat [dtype] v` or `= dense [dtype] [v, ...]`.
    fn constant(&mut self, index: usize) -> PResult<Constant> {
        let t = self.next()?;
        match t.tok {
            Tok::Const(id) if id as usize == index => {}
            Tok::Const(id) => {
                return fail(t.at, format!("constants must be numbered in order: expected @{index}, found @{id}"));
            }
            _ => return self.unexpected(&t, "a constant (`@N`)"),
        }
        let name = self.optional_string()?;
        self.expect_punct(':')?;
        let ty = self.tensor_type()?;
        self.expect_punct('=')?;
        let (kind, at) = self.word("`splat` or `dense`")?;
        let dtype = match self.peek_dtype()? {
            Some(d) => {
                self.next()?;
                d
            }
            None => ty.dtype,
        };
        let value = match kind {
            "splat" => ConstValue::Splat(self.scalar(dtype)?),
            "dense" => {
                if let Tok::Word("elided") = self.peek()?.tok {
                    let at = self.at()?;
                    return fail(at, format!(
                        "the data of constant @{index} was elided when printed (PrintOptions::elide_constant_data); \
                         only a full print (`print`) parses back"
                    ));
                }
                ConstValue::Dense(self.dense(dtype)?)
            }
            _ => return fail(at, format!("expected `splat` or `dense`, found `{kind}`")),
        };
        Ok(Constant { name, ty, value })
    }

    fn dense(&mut self, dtype: DType) -> PResult<TensorData> {
        Ok(match dtype {
            DType::F32 => TensorData::F32(self.list(|p| p.f32())?),
            DType::I64 => TensorData::I64(self.list(|p| p.int())?),
            DType::I32 => TensorData::I32(self.list(|p| p.int())?),
            DType::Bool => TensorData::Bool(self.list(|p| p.bool())?),
        })
    }

    fn scalar(&mut self, dtype: DType) -> PResult<Scalar> {
        Ok(match dtype {
            DType::F32 => Scalar::F32(self.f32()?),
            DType::I64 => Scalar::I64(self.int()?),
            DType::I32 => Scalar::I32(self.int()?),
            DType::Bool => Scalar::Bool(self.bool()?),
        })
    }

    /// `[a, b, ...]`, possibly empty.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> PResult<T>) -> PResult<Vec<T>> {
        self.expect_punct('[')?;
        let mut items = Vec::new();
        if self.eat_punct(']')? {
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            if !self.eat_punct(',')? {
                break;
            }
        }
        self.expect_punct(']')?;
        Ok(items)
    }

    fn usize(&mut self) -> PResult<usize> {
        let (w, at) = self.word("a non-negative integer")?;
        w.parse().map_or_else(|_| fail(at, format!("expected a non-negative integer, found `{w}`")), Ok)
    }

    fn int<T: std::str::FromStr>(&mut self) -> PResult<T> {
        let (w, at) = self.word("an integer")?;
        w.parse().map_or_else(|_| fail(at, format!("expected an integer in range, found `{w}`")), Ok)
    }

    fn bool(&mut self) -> PResult<bool> {
        match self.word("`true` or `false`")? {
            ("true", _) => Ok(true),
            ("false", _) => Ok(false),
            (w, at) => fail(at, format!("expected `true` or `false`, found `{w}`")),
        }
    }

    /// A decimal float as Rust prints it, `inf`, `-inf`, `NaN`, or a bit pattern `0xHHHHHHHH`.
    fn f32(&mut self) -> PResult<f32> {
        let (w, at) = self.word("a float")?;
        if w == "NaN" {
            return Ok(f32::from_bits(CANONICAL_NAN_BITS));
        }
        if let Some(hex) = w.strip_prefix("0x") {
            return u32::from_str_radix(hex, 16)
                .map(f32::from_bits)
                .map_or_else(|_| fail(at, format!("`{w}` is not a 32-bit float bit pattern")), Ok);
        }
        w.parse().map_or_else(|_| fail(at, format!("expected a float, found `{w}`")), Ok)
    }

    /// `%a, %b, ...`, possibly none; recorded as uses.
    fn operands(&mut self, b: &mut GraphBuilder) -> PResult<Vec<ValueId>> {
        let mut operands = Vec::new();
        while let Tok::Value(id) = self.peek()?.tok {
            let at = self.next()?.at;
            operands.push(ValueId(id));
            b.uses.push((ValueId(id), at));
            if !self.eat_punct(',')? {
                break;
            }
        }
        Ok(operands)
    }

    /// `outputs = mnemonic [kind] operands attributes [epilogue] [schedule] ["name"]`
    fn node(&mut self, b: &mut GraphBuilder) -> PResult<Node> {
        let mut outputs = Vec::new();
        if self.eat_punct('(')? {
            self.expect_punct(')')?;
        } else {
            loop {
                let at = self.at()?;
                let (id, value) = self.value_decl()?;
                b.declare(id, value, at, self.text)?;
                outputs.push(id);
                if !self.eat_punct(',')? {
                    break;
                }
            }
        }
        self.expect_punct('=')?;
        let (mnemonic, op_at) = self.word("an op")?;
        let head = self.op_head(mnemonic, op_at)?;
        let inputs = self.operands(b)?;
        let mut attrs = self.attributes()?;
        let op = build_op(mnemonic, head, &mut attrs).or_else(|m| fail(op_at, m))?;
        let epilogue = attrs.take_epilogue();
        let schedule = attrs.take_schedule();
        if let Some(extra) = attrs.unused() {
            return fail(extra.at, format!("`{mnemonic}` does not take attribute `{}`", extra.key));
        }
        let name = self.optional_string()?;
        Ok(Node { name, op, inputs, outputs, epilogue, schedule })
    }

    /// What follows the mnemonic before the operands: a function, kind or constant id.
    fn op_head(&mut self, mnemonic: &str, at: usize) -> PResult<Head> {
        Ok(match mnemonic {
            "constant" => {
                let t = self.next()?;
                match t.tok {
                    Tok::Const(c) => Head::Constant(ConstId(c)),
                    _ => return self.unexpected(&t, "a constant (`@N`)"),
                }
            }
            "unary" => Head::Unary(self.unary_fn()?),
            "binary" => {
                let (w, at) = self.word("a binary function")?;
                Head::Binary(binary_from_name(w).map_or_else(|| fail(at, format!("unknown binary function `{w}`")), Ok)?)
            }
            "reduce" => {
                let (w, at) = self.word("a reduction (sum, mean, max, min, prod)")?;
                let kind = ALL_REDUCE_KINDS.into_iter().find(|&k| reduce_name(k) == w);
                Head::Reduce(kind.map_or_else(|| fail(at, format!("unknown reduction `{w}`")), Ok)?)
            }
            "arg_reduce" => match self.word("`max` or `min`")? {
                ("max", _) => Head::Arg(ArgKind::Max),
                ("min", _) => Head::Arg(ArgKind::Min),
                (w, at) => return fail(at, format!("expected `max` or `min`, found `{w}`")),
            },
            "pool" | "pool_grad" => match self.word("`max` or `avg`")? {
                ("max", _) => Head::Pool(PoolKind::Max),
                ("avg", _) => {
                    self.expect_punct('(')?;
                    self.keyword("count_include_pad")?;
                    self.expect_punct('=')?;
                    let count_include_pad = self.bool()?;
                    self.expect_punct(')')?;
                    Head::Pool(PoolKind::Avg { count_include_pad })
                }
                (w, at) => return fail(at, format!("expected `max` or `avg`, found `{w}`")),
            },
            "where" | "cast" | "matmul" | "conv" | "conv_transpose" | "reshape" | "transpose" | "slice" | "pad"
            | "concat" | "broadcast" | "gather" | "gather_elements" | "resample" | "random_uniform"
            | "conv_weight_grad" | "reorder" => Head::None,
            _ => return fail(at, format!("unknown op `{mnemonic}`")),
        })
    }

    /// `relu` or `leaky_relu(alpha=0.01)`.
    fn unary_fn(&mut self) -> PResult<UnaryFn> {
        let (name, at) = self.word("a unary function")?;
        let mut params = Vec::new();
        if self.eat_punct('(')? {
            loop {
                let (key, key_at) = self.word("a parameter name")?;
                self.expect_punct('=')?;
                params.push((key, key_at, self.f32()?));
                if !self.eat_punct(',')? {
                    break;
                }
            }
            self.expect_punct(')')?;
        }
        unary_from_parts(name, at, &params)
    }

    /// `key=value` pairs up to the node name or the end of the line.
    fn attributes(&mut self) -> PResult<Attributes> {
        let mut attrs = Attributes::default();
        while let Tok::Word(key) = self.peek()?.tok {
            if self.peek_nth(1)?.tok != Tok::Punct('=') {
                break;
            }
            let at = self.next()?.at;
            self.next()?;
            if attrs.items.iter().any(|a| a.key == key) {
                return fail(at, format!("attribute `{key}` is given twice"));
            }
            let value = match key {
                "strides" | "dilations" | "pads_begin" | "pads_end" | "kernel" | "axes" | "perm" | "starts" | "lo"
                | "hi" => AttrValue::Usizes(self.list(|p| p.usize())?),
                "steps" | "begins" | "ends" => AttrValue::I64s(self.list(|p| p.int())?),
                "weight_hi" => AttrValue::F32s(self.list(|p| p.f32())?),
                "groups" | "axis" | "seed" => AttrValue::Usize(self.usize()?),
                "select_last_index" => AttrValue::Bool(self.bool()?),
                "to" => AttrValue::DType(self.dtype()?),
                "mode" => AttrValue::PadMode(self.pad_mode()?),
                "epilogue" => AttrValue::Epilogue(self.list(|p| p.epilogue_step())?),
                "schedule" => AttrValue::Schedule(self.schedule()?),
                _ => return fail(at, format!("unknown attribute `{key}`")),
            };
            attrs.items.push(Attribute { key: key.to_string(), at, value, used: false });
        }
        Ok(attrs)
    }

    fn pad_mode(&mut self) -> PResult<PadMode> {
        Ok(match self.word("a pad mode (constant, reflect, edge, wrap)")? {
            ("reflect", _) => PadMode::Reflect,
            ("edge", _) => PadMode::Edge,
            ("wrap", _) => PadMode::Wrap,
            ("constant", _) => {
                self.expect_punct('(')?;
                let dtype = self.dtype()?;
                let value = self.scalar(dtype)?;
                self.expect_punct(')')?;
                PadMode::Constant(value)
            }
            (w, at) => return fail(at, format!("unknown pad mode `{w}` (expected constant(DTYPE VALUE), reflect, edge or wrap)")),
        })
    }

    /// `relu`, `clip(min=0.0, max=6.0)` or `add(input=3)`.
    fn epilogue_step(&mut self) -> PResult<EpilogueStep> {
        if let Tok::Word(w) = self.peek()?.tok
            && let Some(func) = binary_from_name(w)
        {
            self.next()?;
            self.expect_punct('(')?;
            self.keyword("input")?;
            self.expect_punct('=')?;
            let operand = self.usize()?;
            self.expect_punct(')')?;
            return Ok(EpilogueStep::Binary { func, operand });
        }
        Ok(EpilogueStep::Unary(self.unary_fn()?))
    }

    /// `{layout_in=blocked(16), layout_out=plain, vector_width=8, tiles=["oc"=16], kernel="k"}`
    fn schedule(&mut self) -> PResult<Schedule> {
        self.expect_punct('{')?;
        let mut s = Schedule::default();
        let mut seen: Vec<&str> = Vec::new();
        if self.eat_punct('}')? {
            return Ok(s);
        }
        loop {
            let (key, at) = self.word("a schedule field")?;
            if seen.contains(&key) {
                return fail(at, format!("schedule field `{key}` is given twice"));
            }
            seen.push(key);
            self.expect_punct('=')?;
            match key {
                "layout_in" => s.layout_in = self.layout()?,
                "layout_out" => s.layout_out = self.layout()?,
                "vector_width" => s.vector_width = self.int()?,
                "tiles" => {
                    s.tiles = self.list(|p| {
                        let name = p.string("a tile name as a string")?;
                        p.expect_punct('=')?;
                        Ok((name, p.usize()?))
                    })?
                }
                "kernel" => s.kernel = self.string("a kernel name as a string")?,
                _ => {
                    return fail(at, format!(
                        "unknown schedule field `{key}` (expected layout_in, layout_out, vector_width, tiles or kernel)"
                    ));
                }
            }
            if !self.eat_punct(',')? {
                break;
            }
        }
        self.expect_punct('}')?;
        Ok(s)
    }

    fn layout(&mut self) -> PResult<Layout> {
        match self.word("a layout (plain or blocked(N))")? {
            ("plain", _) => Ok(Layout::Plain),
            ("blocked", _) => {
                self.expect_punct('(')?;
                let block = self.int()?;
                self.expect_punct(')')?;
                Ok(Layout::Blocked { block })
            }
            (w, at) => fail(at, format!("unknown layout `{w}` (expected plain or blocked(N))")),
        }
    }
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Newline => "end of line".into(),
        Tok::Word(w) => format!("`{w}`"),
        Tok::Str(s) => format!("string {}", crate::print::quote(s)),
        Tok::Value(v) => format!("`%{v}`"),
        Tok::Const(c) => format!("`@{c}`"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Eof => "end of input".into(),
    }
}

fn binary_from_name(name: &str) -> Option<BinaryFn> {
    ALL_BINARY_FNS.into_iter().find(|&f| binary_name(f) == name)
}

/// Inverts `print::unary_parts`, insisting on exactly the parameters the function has.
fn unary_from_parts(name: &str, at: usize, params: &[(&str, usize, f32)]) -> PResult<UnaryFn> {
    let get = |key: &str| params.iter().find(|p| p.0 == key).map_or(f32::NAN, |p| p.2);
    use UnaryFn::*;
    let f = match name {
        "neg" => Neg,
        "abs" => Abs,
        "sqrt" => Sqrt,
        "exp" => Exp,
        "log" => Log,
        "reciprocal" => Reciprocal,
        "floor" => Floor,
        "ceil" => Ceil,
        "relu" => Relu,
        "sigmoid" => Sigmoid,
        "tanh" => Tanh,
        "erf" => Erf,
        "softplus" => Softplus,
        "softsign" => Softsign,
        "mish" => Mish,
        "hard_swish" => HardSwish,
        "gelu_erf" => GeluErf,
        "gelu_tanh" => GeluTanh,
        "not" => Not,
        "leaky_relu" => LeakyRelu { alpha: get("alpha") },
        "elu" => Elu { alpha: get("alpha") },
        "selu" => Selu { alpha: get("alpha"), gamma: get("gamma") },
        "celu" => Celu { alpha: get("alpha") },
        "hard_sigmoid" => HardSigmoid { alpha: get("alpha"), beta: get("beta") },
        "swish" => Swish { alpha: get("alpha") },
        "clip" => Clip { min: get("min"), max: get("max") },
        "affine" => Affine { scale: get("scale"), shift: get("shift") },
        "pow_const" => PowConst { exponent: get("exponent") },
        _ => return fail(at, format!("unknown unary function `{name}`")),
    };
    let expected: Vec<&str> = unary_parts(f).1.iter().map(|(k, _)| *k).collect();
    for (i, &(key, key_at, _)) in params.iter().enumerate() {
        if !expected.contains(&key) {
            let takes = if expected.is_empty() { "no parameters".to_string() } else { format!("parameters {}", expected.join(", ")) };
            return fail(key_at, format!("`{name}` takes {takes}, not `{key}`"));
        }
        if params[..i].iter().any(|p| p.0 == key) {
            return fail(key_at, format!("parameter `{key}` is given twice"));
        }
    }
    if let Some(missing) = expected.iter().find(|k| !params.iter().any(|p| p.0 == **k)) {
        return fail(at, format!("`{name}` needs parameter `{missing}`"));
    }
    Ok(f)
}

/// What `op_head` read.
enum Head {
    None,
    Constant(ConstId),
    Unary(UnaryFn),
    Binary(BinaryFn),
    Reduce(ReduceKind),
    Arg(ArgKind),
    Pool(PoolKind),
}

enum AttrValue {
    Usizes(Vec<usize>),
    I64s(Vec<i64>),
    F32s(Vec<f32>),
    Usize(usize),
    Bool(bool),
    DType(DType),
    PadMode(PadMode),
    Epilogue(Vec<EpilogueStep>),
    Schedule(Schedule),
}

struct Attribute {
    key: String,
    at: usize,
    value: AttrValue,
    used: bool,
}

#[derive(Default)]
struct Attributes {
    items: Vec<Attribute>,
}

/// Typed accessors: each takes the attribute or explains that it is missing.
macro_rules! accessor {
    ($name:ident, $variant:ident, $ty:ty) => {
        fn $name(&mut self, op: &str, key: &str) -> Result<$ty, String> {
            match self.take(key) {
                Some(AttrValue::$variant(v)) => Ok(v),
                Some(_) => Err(format!("attribute `{key}` of `{op}` has the wrong kind of value")),
                None => Err(format!("`{op}` needs attribute `{key}`")),
            }
        }
    };
}

impl Attributes {
    fn take(&mut self, key: &str) -> Option<AttrValue> {
        let a = self.items.iter_mut().find(|a| a.key == key && !a.used)?;
        a.used = true;
        // The value is moved out; a placeholder keeps the entry for `unused`.
        Some(std::mem::replace(&mut a.value, AttrValue::Usizes(Vec::new())))
    }

    accessor!(usizes, Usizes, Vec<usize>);
    accessor!(i64s, I64s, Vec<i64>);
    accessor!(f32s, F32s, Vec<f32>);
    accessor!(usize, Usize, usize);
    accessor!(bool, Bool, bool);
    accessor!(dtype, DType, DType);
    accessor!(pad_mode, PadMode, PadMode);

    fn take_epilogue(&mut self) -> Vec<EpilogueStep> {
        match self.take("epilogue") {
            Some(AttrValue::Epilogue(steps)) => steps,
            _ => Vec::new(),
        }
    }

    fn take_schedule(&mut self) -> Schedule {
        match self.take("schedule") {
            Some(AttrValue::Schedule(s)) => s,
            _ => Schedule::default(),
        }
    }

    fn unused(&self) -> Option<&Attribute> {
        self.items.iter().find(|a| !a.used)
    }
}

fn build_op(mnemonic: &str, head: Head, a: &mut Attributes) -> Result<Op, String> {
    let m = mnemonic;
    let geometry = |a: &mut Attributes| -> Result<ConvGeometry, String> {
        Ok(ConvGeometry {
            strides: a.usizes(m, "strides")?,
            dilations: a.usizes(m, "dilations")?,
            pads_begin: a.usizes(m, "pads_begin")?,
            pads_end: a.usizes(m, "pads_end")?,
            groups: a.usize(m, "groups")?,
        })
    };
    Ok(match (mnemonic, head) {
        (_, Head::Constant(c)) => Op::Constant(c),
        (_, Head::Unary(f)) => Op::Unary(f),
        (_, Head::Binary(f)) => Op::Binary(f),
        (_, Head::Reduce(kind)) => Op::Reduce { kind, axes: a.usizes(m, "axes")? },
        (_, Head::Arg(kind)) => Op::ArgReduce {
            kind,
            axis: a.usize(m, "axis")?,
            select_last_index: a.bool(m, "select_last_index")?,
        },
        (_, Head::Pool(kind)) => {
            let attrs = PoolAttrs {
                kind,
                kernel: a.usizes(m, "kernel")?,
                strides: a.usizes(m, "strides")?,
                dilations: a.usizes(m, "dilations")?,
                pads_begin: a.usizes(m, "pads_begin")?,
                pads_end: a.usizes(m, "pads_end")?,
            };
            if m == "pool_grad" { Op::PoolGrad(attrs) } else { Op::Pool(attrs) }
        }
        ("where", _) => Op::Where,
        ("cast", _) => Op::Cast { to: a.dtype(m, "to")? },
        ("matmul", _) => Op::MatMul,
        ("conv", _) => Op::Conv(geometry(a)?),
        ("conv_transpose", _) => Op::ConvTranspose(geometry(a)?),
        ("conv_weight_grad", _) => Op::ConvWeightGrad(geometry(a)?),
        ("reshape", _) => Op::Reshape,
        ("transpose", _) => Op::Transpose { perm: a.usizes(m, "perm")? },
        ("slice", _) => Op::Slice { starts: a.usizes(m, "starts")?, steps: a.i64s(m, "steps")? },
        ("pad", _) => Op::Pad { begins: a.i64s(m, "begins")?, ends: a.i64s(m, "ends")?, mode: a.pad_mode(m, "mode")? },
        ("concat", _) => Op::Concat { axis: a.usize(m, "axis")? },
        ("broadcast", _) => Op::Broadcast,
        ("reorder", _) => Op::Reorder,
        ("gather", _) => Op::Gather { axis: a.usize(m, "axis")? },
        ("random_uniform", _) => Op::RandomUniform { seed: a.usize(m, "seed")? as u64 },
        ("gather_elements", _) => Op::GatherElements { axis: a.usize(m, "axis")? },
        ("resample", _) => Op::Resample {
            axis: a.usize(m, "axis")?,
            lo: a.usizes(m, "lo")?,
            hi: a.usizes(m, "hi")?,
            weight_hi: a.f32s(m, "weight_hi")?,
        },
        _ => return Err(format!("unknown op `{mnemonic}`")),
    })
}
