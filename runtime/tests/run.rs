//! Session::run against the fake model: numbers, buffer checks, status, threads.

mod common;

use cnnc_runtime::{DType, Direction, Model, RunError, Session, TensorBuf, TensorRef};
use common::{FakeModel, TempDir, expected_sum, f32_bytes, f32_from_bytes, have_cc};

const A: [f32; 6] = [1.0, -2.5, 3.0, 0.0, 1e6, -7.25];

fn fake_model(tag: &str) -> (TempDir, Model) {
    let dir = TempDir::new(tag);
    let path = FakeModel::default().build(&dir, tag);
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (dir, model)
}

fn run_raw(session: &mut Session, a: &[f32], b: i64) -> Result<Vec<f32>, RunError> {
    let a_bytes = f32_bytes(a);
    let b_bytes = b.to_le_bytes();
    let mut out = vec![0u8; 24];
    session.run(&[&a_bytes, &b_bytes], &mut [&mut out])?;
    Ok(f32_from_bytes(&out))
}

#[test]
fn raw_run_computes_a_plus_b() {
    if !have_cc("raw_run_computes_a_plus_b") {
        return;
    }
    let (_dir, model) = fake_model("raw");
    let mut session = Session::new(&model, 1).expect("session");
    assert_eq!(run_raw(&mut session, &A, 3), Ok(expected_sum(&A, 3)));
    // The session is reusable and keeps no state between calls.
    assert_eq!(run_raw(&mut session, &A, -4), Ok(expected_sum(&A, -4)));
}

#[test]
fn unaligned_buffers_are_accepted() {
    if !have_cc("unaligned_buffers_are_accepted") {
        return;
    }
    let (_dir, model) = fake_model("unaligned");
    let mut session = Session::new(&model, 1).expect("session");
    let mut a_store = [0u8; 25];
    a_store[1..].copy_from_slice(&f32_bytes(&A));
    let mut b_store = [0u8; 9];
    b_store[1..].copy_from_slice(&5i64.to_le_bytes());
    let mut out_store = [0u8; 25];
    session.run(&[&a_store[1..], &b_store[1..]], &mut [&mut out_store[1..]]).expect("run");
    assert_eq!(f32_from_bytes(&out_store[1..]), expected_sum(&A, 5));
}

#[test]
fn typed_run_computes_a_plus_b() {
    if !have_cc("typed_run_computes_a_plus_b") {
        return;
    }
    let (_dir, model) = fake_model("typed");
    let mut session = Session::new(&model, 2).expect("session");
    let b = [9i64];
    let outputs = session.run_typed(&[TensorRef::from(&A[..]), TensorRef::from(&b[..])]).expect("run");
    assert_eq!(outputs, vec![TensorBuf::F32(expected_sum(&A, 9))]);
}

#[test]
fn typed_run_checks_dtypes() {
    if !have_cc("typed_run_checks_dtypes") {
        return;
    }
    let (_dir, model) = fake_model("dtypes");
    let mut session = Session::new(&model, 1).expect("session");
    let b_as_f64_bits = [0i32, 0];
    let err = session.run_typed(&[TensorRef::F32(&A), TensorRef::I32(&b_as_f64_bits)]).unwrap_err();
    assert_eq!(
        err,
        RunError::DTypeMismatch {
            direction: Direction::Input,
            index: 1,
            name: "b".into(),
            expected: DType::I64,
            given: DType::I32
        }
    );
    assert_eq!(err.to_string(), "input 1 `b` is i64, but a i32 buffer was given");
    // run_f32 refuses the i64 input the same way.
    let err = session.run_f32(&[&A, &[0.0, 0.0]]).unwrap_err();
    assert!(matches!(err, RunError::DTypeMismatch { index: 1, .. }), "{err:?}");
}

#[test]
fn wrong_buffer_counts_are_refused() {
    if !have_cc("wrong_buffer_counts_are_refused") {
        return;
    }
    let (_dir, model) = fake_model("counts");
    let mut session = Session::new(&model, 1).expect("session");
    let a = f32_bytes(&A);
    let b = 1i64.to_le_bytes();
    let mut out = vec![0u8; 24];
    let err = session.run(&[&a], &mut [&mut out]).unwrap_err();
    assert_eq!(err, RunError::BufferCount { direction: Direction::Input, expected: 2, given: 1 });
    assert_eq!(err.to_string(), "the model has 2 input(s), but 1 input buffer(s) were given");
    let mut out2 = vec![0u8; 24];
    let err = session.run(&[&a, &b], &mut [&mut out, &mut out2]).unwrap_err();
    assert_eq!(err, RunError::BufferCount { direction: Direction::Output, expected: 1, given: 2 });
    let err = session.run(&[&a, &b], &mut []).unwrap_err();
    assert_eq!(err, RunError::BufferCount { direction: Direction::Output, expected: 1, given: 0 });
}

#[test]
fn wrong_buffer_sizes_are_refused() {
    if !have_cc("wrong_buffer_sizes_are_refused") {
        return;
    }
    let (_dir, model) = fake_model("sizes");
    let mut session = Session::new(&model, 1).expect("session");
    let a = f32_bytes(&A);
    let short_a = &a[..20];
    let b = 1i64.to_le_bytes();
    let mut out = vec![0u8; 24];
    let err = session.run(&[short_a, &b], &mut [&mut out]).unwrap_err();
    assert_eq!(
        err,
        RunError::BufferSize {
            direction: Direction::Input,
            index: 0,
            name: "a".into(),
            dtype: DType::F32,
            shape: vec![2, 3],
            expected_bytes: 24,
            given_bytes: 20
        }
    );
    assert_eq!(err.to_string(), "input 0 `a` is f32 [2, 3] (24 bytes), but its buffer has 20 bytes");
    let b_i32 = 1i32.to_le_bytes();
    let err = session.run(&[&a, &b_i32], &mut [&mut out]).unwrap_err();
    assert!(matches!(&err, RunError::BufferSize { index: 1, expected_bytes: 8, given_bytes: 4, .. }), "{err:?}");
    let mut long_out = vec![0u8; 28];
    let err = session.run(&[&a, &b], &mut [&mut long_out]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "output 0 `sum` is f32 [2, 3] (24 bytes), but its buffer has 28 bytes"
    );
    // Nothing was written to the refused output.
    assert!(long_out.iter().all(|&byte| byte == 0));
}

#[test]
fn nonzero_status_is_an_error() {
    if !have_cc("nonzero_status_is_an_error") {
        return;
    }
    let (_dir, model) = fake_model("status");
    let mut session = Session::new(&model, 1).expect("session");
    let err = run_raw(&mut session, &A, -999).unwrap_err();
    assert_eq!(err, RunError::Status(7));
    assert_eq!(err.to_string(), "cnnc_infer failed with status 7");
}

#[test]
fn host_reaches_the_model() {
    if !have_cc("host_reaches_the_model") {
        return;
    }
    let (_dir, model) = fake_model("host");
    // The probe value makes the model return 100 + num_threads when it got a
    // parallel_for, 100 when it must run alone.
    for (threads, status) in [(1, 100), (2, 102), (3, 103)] {
        let mut session = Session::new(&model, threads).expect("session");
        assert_eq!(session.num_threads(), threads);
        assert_eq!(run_raw(&mut session, &A, -1000), Err(RunError::Status(status)), "threads={threads}");
    }
}

#[test]
fn one_and_two_threads_agree() {
    if !have_cc("one_and_two_threads_agree") {
        return;
    }
    let (_dir, model) = fake_model("threads");
    let mut single = Session::new(&model, 1).expect("session");
    let mut double = Session::new(&model, 2).expect("session");
    for step in 0..200i64 {
        let a: Vec<f32> = A.iter().map(|x| x * step as f32 + 0.5).collect();
        let one = run_raw(&mut single, &a, step - 100).expect("1 thread");
        let two = run_raw(&mut double, &a, step - 100).expect("2 threads");
        assert_eq!(one, two, "step {step}");
        assert_eq!(one, expected_sum(&a, step - 100), "step {step}");
    }
}

#[test]
fn sessions_run_concurrently_and_outlive_the_model_handle() {
    if !have_cc("sessions_run_concurrently_and_outlive_the_model_handle") {
        return;
    }
    let (_dir, model) = fake_model("concurrent");
    let sessions: Vec<Session> = (1..=3).map(|threads| Session::new(&model, threads).expect("session")).collect();
    // The sessions keep the library loaded on their own.
    drop(model);
    std::thread::scope(|scope| {
        for (i, mut session) in sessions.into_iter().enumerate() {
            scope.spawn(move || {
                for step in 0..100i64 {
                    let b = step * 3 + i as i64;
                    assert_eq!(run_raw(&mut session, &A, b), Ok(expected_sum(&A, b)));
                }
            });
        }
    });
}

#[test]
fn handles_can_move_between_threads() {
    fn send_and_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_and_sync::<Model>();
    send::<Session>();
    send_and_sync::<cnnc_runtime::ThreadPool>();
}
