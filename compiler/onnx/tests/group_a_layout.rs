//! Group A data-movement ops (Flatten, Squeeze, Unsqueeze, Transpose, Expand, Tile,
//! DepthToSpace, SpaceToDepth, Concat, Split, Slice, Pad, Gather), including the forms that
//! changed between opsets, against values worked out by hand.

mod common;

use cnnc_ir::{DType, Tensor};
use cnnc_onnx::{FrontendError, ModelBuilder, attr};
use common::*;

fn shape_after(
    op_type: &str,
    opset: i64,
    shape: &[usize],
    extra: &[(&str, Tensor)],
    attrs: Vec<cnnc_onnx::proto::AttributeProto>,
) -> Vec<usize> {
    let mut m = single_input("x", DType::F32, shape, opset);
    let mut inputs = vec!["x"];
    for (name, t) in extra {
        m.initializer(name, t);
        inputs.push(name);
    }
    m.node(op_type, &inputs, &["y"], attrs).output_untyped("y", DType::F32);
    let y = eval(&m, &[iota(shape)]);
    assert_eq!(y[0].data, iota(shape).data, "{op_type} keeps the elements in order");
    y[0].shape.clone()
}

#[test]
fn flatten_squeeze_unsqueeze() {
    assert_eq!(shape_after("Flatten", 13, &[2, 3, 4], &[], vec![]), [2, 12]);
    assert_eq!(shape_after("Flatten", 13, &[2, 3, 4], &[], vec![attr::int("axis", 0)]), [1, 24]);
    assert_eq!(shape_after("Flatten", 13, &[2, 3, 4], &[], vec![attr::int("axis", -1)]), [6, 4]);
    assert_eq!(shape_after("Flatten", 13, &[2, 3, 4], &[], vec![attr::int("axis", 3)]), [24, 1]);

    assert_eq!(shape_after("Squeeze", 11, &[1, 3, 1, 2], &[], vec![attr::ints("axes", &[-2])]), [1, 3, 2]);
    assert_eq!(shape_after("Squeeze", 13, &[1, 3, 1, 2], &[("axes", i64s(&[1], &[0]))], vec![]), [3, 1, 2]);
    assert_eq!(shape_after("Squeeze", 13, &[1, 3, 1, 2], &[], vec![]), [3, 2]);

    assert_eq!(shape_after("Unsqueeze", 11, &[3, 2], &[], vec![attr::ints("axes", &[0, -1])]), [1, 3, 2, 1]);
    assert_eq!(shape_after("Unsqueeze", 13, &[3, 2], &[("axes", i64s(&[2], &[3, 1]))], vec![]), [3, 1, 2, 1]);

    let mut m = single_input("x", DType::F32, &[2, 3], 13);
    m.initializer("axes", &i64s(&[1], &[1]))
        .node("Squeeze", &["x", "axes"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    assert!(load_err(&m).to_string().contains("axis 1 of extent 3"));
}

#[test]
fn transpose_default_reverses() {
    let mut m = single_input("x", DType::F32, &[2, 3], 13);
    m.node("Transpose", &["x"], &["y"], vec![]).node("Transpose", &["x"], &["z"], vec![attr::ints("perm", &[1, 0])]);
    m.output_untyped("y", DType::F32).output_untyped("z", DType::F32);
    let out = eval(&m, &[iota(&[2, 3])]);
    let want = f32s(&[3, 2], &[0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(out[0], want);
    assert_eq!(out[1], want);
    let mut m = single_input("x", DType::F32, &[2, 3, 4], 13);
    m.node("Transpose", &["x"], &["y"], vec![attr::ints("perm", &[1, 2, 0])]).output_untyped("y", DType::F32);
    let y = &eval(&m, &[iota(&[2, 3, 4])])[0];
    assert_eq!(y.shape, vec![3, 4, 2]);
    // y[i][j][k] = x[k][i][j] = 12k + 4i + j; check y[2][1][1] (index 2·8 + 1·2 + 1 = 19).
    assert_eq!(y.data.get(19).as_f64(), 12.0 + 8.0 + 1.0);
}

#[test]
fn expand_broadcasts_both_ways_and_tile_repeats() {
    let mut m = single_input("x", DType::F32, &[3, 1], 13);
    m.initializer("s", &i64s(&[3], &[2, 1, 2]))
        .node("Expand", &["x", "s"], &["y"], vec![])
        .output_untyped("y", DType::F32);
    let y = &eval(&m, &[f32s(&[3, 1], &[1.0, 2.0, 3.0])])[0];
    assert_eq!(*y, f32s(&[2, 3, 2], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]));

    let mut m = single_input("x", DType::F32, &[2, 2], 13);
    m.initializer("r", &i64s(&[2], &[2, 3])).node("Tile", &["x", "r"], &["y"], vec![]).output_untyped("y", DType::F32);
    let y = &eval(&m, &[f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0])])[0];
    #[rustfmt::skip]
    let want = f32s(&[4, 6], &[
        1.0, 2.0, 1.0, 2.0, 1.0, 2.0,
        3.0, 4.0, 3.0, 4.0, 3.0, 4.0,
        1.0, 2.0, 1.0, 2.0, 1.0, 2.0,
        3.0, 4.0, 3.0, 4.0, 3.0, 4.0,
    ]);
    assert_eq!(*y, want);
    let mut m = single_input("x", DType::F32, &[2, 2], 13);
    m.initializer("r", &i64s(&[1], &[2])).node("Tile", &["x", "r"], &["y"], vec![]).output_untyped("y", DType::F32);
    assert!(matches!(load_err(&m), FrontendError::Invalid(_)));
}

#[test]
fn depth_to_space_and_back() {
    let x = iota(&[1, 8, 1, 1]);
    let d2s = |mode: Option<&str>| {
        let mut attrs = vec![attr::int("blocksize", 2)];
        attrs.extend(mode.map(|m| attr::string("mode", m)));
        let mut m = single_input("x", DType::F32, &[1, 8, 1, 1], 13);
        m.node("DepthToSpace", &["x"], &["y"], attrs).output_untyped("y", DType::F32);
        eval(&m, &[x.clone()]).remove(0)
    };
    // DCR: out[c][h][w] = x[(h·2 + w)·2 + c]; CRD: out[c][h][w] = x[c·4 + h·2 + w].
    assert_eq!(d2s(None), f32s(&[1, 2, 2, 2], &[0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]));
    assert_eq!(d2s(Some("CRD")), f32s(&[1, 2, 2, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]));

    let mut m = single_input("x", DType::F32, &[1, 1, 2, 2], 13);
    m.node("SpaceToDepth", &["x"], &["y"], vec![attr::int("blocksize", 2)]).output_untyped("y", DType::F32);
    assert_eq!(eval(&m, &[iota(&[1, 1, 2, 2])])[0], iota(&[1, 4, 1, 1]));
    // SpaceToDepth inverts DepthToSpace (DCR) on a larger case.
    let mut m = single_input("x", DType::F32, &[2, 12, 2, 3], 13);
    m.node("DepthToSpace", &["x"], &["s"], vec![attr::int("blocksize", 2)])
        .node("SpaceToDepth", &["s"], &["y"], vec![attr::int("blocksize", 2)])
        .output_untyped("y", DType::F32);
    assert_eq!(eval(&m, &[iota(&[2, 12, 2, 3])])[0], iota(&[2, 12, 2, 3]));
}

#[test]
fn concat_along_a_negative_axis() {
    let mut m = ModelBuilder::new("t", 13);
    m.input("a", DType::F32, &[2, 1]).input("b", DType::F32, &[2, 2]).initializer("c", &f32s(&[2, 0], &[]));
    m.node("Concat", &["a", "c", "b"], &["y"], vec![attr::int("axis", -1)]).output_untyped("y", DType::F32);
    let y = eval(&m, &[f32s(&[2, 1], &[1.0, 2.0]), f32s(&[2, 2], &[3.0, 4.0, 5.0, 6.0])]);
    assert_eq!(y[0], f32s(&[2, 3], &[1.0, 3.0, 4.0, 2.0, 5.0, 6.0]));
}

fn split(
    opset: i64,
    extent: usize,
    outputs: usize,
    sizes_attr: Option<&[i64]>,
    sizes_input: Option<&[i64]>,
    num_outputs: Option<i64>,
) -> Result<Vec<Tensor>, FrontendError> {
    let mut m = single_input("x", DType::F32, &[extent], opset);
    let mut attrs = vec![];
    attrs.extend(sizes_attr.map(|s| attr::ints("split", s)));
    attrs.extend(num_outputs.map(|n| attr::int("num_outputs", n)));
    let mut inputs = vec!["x"];
    if let Some(s) = sizes_input {
        m.initializer("split", &i64s(&[s.len()], s));
        inputs.push("split");
    }
    let names: Vec<String> = (0..outputs).map(|i| format!("y{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    m.node("Split", &inputs, &refs, attrs);
    for n in &names {
        m.output_untyped(n, DType::F32);
    }
    let g = cnnc_onnx::load_model_bytes(&m.to_bytes(), &Default::default())?;
    Ok(run(&g, &[iota(&[extent])]))
}

#[test]
fn split_forms_by_opset() {
    let parts = |r: Result<Vec<Tensor>, FrontendError>| -> Vec<Vec<f64>> {
        r.unwrap().iter().map(|t| (0..t.numel()).map(|i| t.data.get(i).as_f64()).collect()).collect()
    };
    assert_eq!(parts(split(11, 6, 3, None, None, None)), vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![4.0, 5.0]]);
    assert_eq!(parts(split(11, 5, 2, Some(&[1, 4]), None, None)), vec![vec![0.0], vec![1.0, 2.0, 3.0, 4.0]]);
    assert_eq!(parts(split(13, 5, 2, None, Some(&[3, 2]), None)), vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0]]);
    assert_eq!(parts(split(18, 5, 3, None, None, Some(3))), vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![4.0]]);
    assert_eq!(parts(split(13, 4, 3, None, Some(&[2, 0, 2]), None)), vec![vec![0.0, 1.0], vec![], vec![2.0, 3.0]]);
    assert!(
        matches!(split(13, 5, 2, None, None, None), Err(FrontendError::Invalid(_))),
        "5 does not split in 2 before opset 18"
    );
    assert!(matches!(split(13, 5, 2, None, Some(&[1, 1]), None), Err(FrontendError::Invalid(_))));
}

fn slice_1d(
    opset: i64,
    extent: usize,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Vec<f64> {
    let mut m = single_input("x", DType::F32, &[extent], opset);
    if opset < 10 {
        let mut attrs = vec![attr::ints("starts", starts), attr::ints("ends", ends)];
        attrs.extend(axes.map(|a| attr::ints("axes", a)));
        m.node("Slice", &["x"], &["y"], attrs);
    } else {
        m.initializer("s", &i64s(&[starts.len()], starts)).initializer("e", &i64s(&[ends.len()], ends));
        let mut inputs = vec!["x", "s", "e"];
        if let Some(a) = axes {
            m.initializer("a", &i64s(&[a.len()], a));
            inputs.push("a");
        }
        if let Some(st) = steps {
            if axes.is_none() {
                inputs.push("");
            }
            m.initializer("st", &i64s(&[st.len()], st));
            inputs.push("st");
        }
        m.node("Slice", &inputs, &["y"], vec![]);
    }
    m.output_untyped("y", DType::F32);
    let y = &eval(&m, &[iota(&[extent])])[0];
    (0..y.numel()).map(|i| y.data.get(i).as_f64()).collect()
}

#[test]
fn slice_forms_by_opset() {
    assert_eq!(slice_1d(9, 6, &[1], &[4], None, None), [1.0, 2.0, 3.0]);
    assert_eq!(slice_1d(9, 6, &[-2], &[100], Some(&[0]), None), [4.0, 5.0]);
    assert_eq!(slice_1d(13, 6, &[1], &[i64::MAX], None, Some(&[2])), [1.0, 3.0, 5.0]);
    assert_eq!(slice_1d(13, 6, &[-1], &[i64::MIN], Some(&[-1]), Some(&[-1])), [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
    assert_eq!(slice_1d(13, 6, &[10], &[0], None, Some(&[-2])), [5.0, 3.0, 1.0]);
    assert_eq!(slice_1d(13, 6, &[7], &[9], None, None), Vec::<f64>::new());
    assert_eq!(slice_1d(10, 6, &[0], &[-1], None, None), [0.0, 1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn slice_two_axes() {
    let mut m = single_input("x", DType::F32, &[3, 4], 13);
    m.initializer("s", &i64s(&[2], &[1, 0]))
        .initializer("e", &i64s(&[2], &[3, 4]))
        .initializer("a", &i64s(&[2], &[1, 0]));
    m.initializer("st", &i64s(&[2], &[2, -1]));
    m.node("Slice", &["x", "s", "e", "a", "st"], &["y"], vec![]).output_untyped("y", DType::F32);
    // axis 1: from 1 to 3 by 2 -> col 1; axis 0: from 0 down to 4 (clamped to 2) -> nothing.
    let y = &eval(&m, &[iota(&[3, 4])])[0];
    assert_eq!(y.shape, vec![0, 1]);
    let mut m = single_input("x", DType::F32, &[3, 4], 13);
    m.initializer("s", &i64s(&[2], &[1, 2]))
        .initializer("e", &i64s(&[2], &[3, -10]))
        .initializer("st", &i64s(&[2], &[2, -1]));
    m.node("Slice", &["x", "s", "e", "", "st"], &["y"], vec![]).output_untyped("y", DType::F32);
    // axis 0: row 1; axis 1: cols 2, 1, 0 -> x[1][2], x[1][1], x[1][0] = 6, 5, 4.
    assert_eq!(eval(&m, &[iota(&[3, 4])])[0], f32s(&[1, 3], &[6.0, 5.0, 4.0]));
}

fn pad(
    opset: i64,
    shape: &[usize],
    pads: &[i64],
    mode: Option<&str>,
    value: Option<f32>,
    axes: Option<&[i64]>,
) -> Tensor {
    let mut m = single_input("x", DType::F32, shape, opset);
    let mut attrs: Vec<_> = mode.map(|md| attr::string("mode", md)).into_iter().collect();
    if opset < 11 {
        attrs.push(attr::ints("pads", pads));
        attrs.extend(value.map(|v| attr::float("value", v)));
        m.node("Pad", &["x"], &["y"], attrs);
    } else {
        m.initializer("p", &i64s(&[pads.len()], pads));
        let mut inputs = vec!["x", "p"];
        match value {
            Some(v) => {
                m.initializer("v", &f32s(&[], &[v]));
                inputs.push("v");
            }
            None if axes.is_some() => inputs.push(""),
            None => {}
        }
        if let Some(a) = axes {
            m.initializer("a", &i64s(&[a.len()], a));
            inputs.push("a");
        }
        m.node("Pad", &inputs, &["y"], attrs);
    }
    m.output_untyped("y", DType::F32);
    eval(&m, &[iota(shape)]).remove(0)
}

#[test]
fn pad_forms_and_modes() {
    let x3 = [3usize];
    assert_eq!(pad(6, &x3, &[1, 2], None, Some(9.0), None), f32s(&[6], &[9.0, 0.0, 1.0, 2.0, 9.0, 9.0]));
    assert_eq!(pad(13, &x3, &[1, 2], None, Some(9.0), None), f32s(&[6], &[9.0, 0.0, 1.0, 2.0, 9.0, 9.0]));
    assert_eq!(pad(13, &x3, &[2, 0], None, None, None), f32s(&[5], &[0.0, 0.0, 0.0, 1.0, 2.0]));
    assert_eq!(pad(13, &x3, &[2, 2], Some("reflect"), None, None), f32s(&[7], &[2.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0]));
    assert_eq!(pad(13, &x3, &[2, 1], Some("edge"), None, None), f32s(&[6], &[0.0, 0.0, 0.0, 1.0, 2.0, 2.0]));
    assert_eq!(pad(19, &x3, &[2, 1], Some("wrap"), None, None), f32s(&[6], &[1.0, 2.0, 0.0, 1.0, 2.0, 0.0]));
    assert_eq!(pad(13, &x3, &[-1, 1], None, None, None), f32s(&[3], &[1.0, 2.0, 0.0]));
    // opset 18 axes: pad only axis -1 of a [2, 2].
    assert_eq!(pad(18, &[2, 2], &[1, 0], None, Some(5.0), Some(&[-1])), f32s(&[2, 3], &[5.0, 0.0, 1.0, 5.0, 2.0, 3.0]));
    assert_eq!(pad(18, &[2, 2], &[0, 0, 1, 0], None, None, None), f32s(&[3, 2], &[0.0, 1.0, 2.0, 3.0, 0.0, 0.0]));
}

#[test]
fn gather_with_negative_and_2d_indices() {
    let mut m = single_input("x", DType::F32, &[2, 3], 13);
    m.initializer("i", &i64s(&[2, 2], &[0, -1, 2, 1]))
        .node("Gather", &["x", "i"], &["y"], vec![attr::int("axis", 1)])
        .output_untyped("y", DType::F32);
    let y = &eval(&m, &[iota(&[2, 3])])[0];
    assert_eq!(*y, f32s(&[2, 2, 2], &[0.0, 2.0, 2.0, 1.0, 3.0, 5.0, 5.0, 4.0]));
    let mut m = single_input("x", DType::F32, &[2, 3], 13);
    m.initializer("i", &i32s(&[], &[1])).node("Gather", &["x", "i"], &["y"], vec![]).output_untyped("y", DType::F32);
    assert_eq!(eval(&m, &[iota(&[2, 3])])[0], f32s(&[3], &[3.0, 4.0, 5.0]));
    let mut m = single_input("x", DType::F32, &[2, 3], 13);
    m.initializer("i", &i64s(&[1], &[3]))
        .node("Gather", &["x", "i"], &["y"], vec![attr::int("axis", 1)])
        .output_untyped("y", DType::F32);
    assert!(load_err(&m).to_string().contains("out of range"));
}
