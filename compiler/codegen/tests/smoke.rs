mod common;
use cnnc_ir::*;
use common::*;

#[test]
fn relu_add() {
    let mut g = Graph::new("smoke");
    let x = g.add_input(TensorType::f32([2, 3, 5]), "x");
    let b = g.add_input(TensorType::f32([3, 1]), "b");
    let y = g.push1("add", Op::Binary(BinaryFn::Add), &[x, b]).unwrap();
    let z = g.push1("relu", Op::Unary(UnaryFn::Relu), &[y]).unwrap();
    g.outputs.push(z);
    let mut rng = Rng(7);
    let xs = random_tensor(&mut rng, DType::F32, &[2, 3, 5], -1.0, 1.0);
    let bs = random_tensor(&mut rng, DType::F32, &[3, 1], -1.0, 1.0);
    check_graph(&g, &[xs, bs]).unwrap();
}
