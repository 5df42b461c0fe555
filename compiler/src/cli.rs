//! The `cnnc` command line (contract: ../shared/DESIGN.md). Exit status 0 success,
//! 1 a check failed or an internal error, 2 bad input or usage.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cnnc_codegen::TargetSpec;
use cnnc_ir::print::{PrintOptions, print_with};

use crate::driver::{self, Error, ScratchDir};
use crate::{passes, verify};

const USAGE: &str = "\
cnnc: an ahead-of-time compiler for convolutional neural networks

usage:
  cnnc compile MODEL.onnx -o OUT.so [--target TRIPLE] [--cpu NAME] [--batch N] [--header FILE.h]
               [--train [--optimizer sgd|adam] [--lr X] [--momentum X] [--weight-decay X] [--freeze GLOB ...]]
  cnnc export-trained MODEL.onnx --train-so TRAIN.so --state STATE.bin -o TRAINED.onnx
  cnnc run OUT.so --input FILE.pb [--input FILE.pb ...] --out DIR [--threads T]
  cnnc verify DIR ... [--jobs J] [--cpu NAME]
  cnnc verify-train DIR ... [--cpu NAME]
  cnnc bench MODEL.onnx|MODEL.so [--threads T] [--batch N] [--runs N] [--cpu NAME] [--train]
  cnnc bench-gemm            # the GEMM microkernel against this core's FMA peak, same run
  cnnc dump MODEL.onnx [--after PASS | --all | --list-passes | --train] [--batch N] [--full] [--cpu NAME] [--target TRIPLE]

  compile --train: a training library (cnnc_train_step, cnnc_compute_gradients, cnnc_apply_update
    on one state buffer); --batch sets the batch of the data inputs, --header describes the state.
  export-trained: MODEL.onnx with its initializers replaced by the parameters and BatchNorm running
    statistics of STATE.bin (the raw state buffer of TRAIN.so after training), in inference mode.
  --cpu: host (default), x86-64, x86-64-v2, x86-64-v3, x86-64-v4 (x86_64), generic (aarch64)
  --no-nchwc (compile, bench, dump, verify): no blocked NCHWc8 regions, every node plain (A/B runs)
";

/// Parsed flags: positional arguments plus `--name value` / `--flag` options.
struct Args {
    positional: Vec<String>,
    options: Vec<(String, Option<String>)>,
}

const VALUED: &[&str] = &[
    "-o", "--target", "--cpu", "--batch", "--header", "--input", "--out", "--threads", "--jobs", "--runs", "--after",
    "--optimizer", "--lr", "--momentum", "--weight-decay", "--freeze", "--train-so", "--state",
];
const SWITCHES: &[&str] = &["--all", "--list-passes", "--full", "--train", "--no-nchwc"];

impl Args {
    fn parse(raw: &[String]) -> Result<Args, Error> {
        let mut a = Args { positional: vec![], options: vec![] };
        let mut it = raw.iter();
        while let Some(s) = it.next() {
            if VALUED.contains(&s.as_str()) {
                let v = it.next().ok_or_else(|| usage(&format!("{s} needs a value")))?;
                a.options.push((s.clone(), Some(v.clone())));
            } else if SWITCHES.contains(&s.as_str()) {
                a.options.push((s.clone(), None));
            } else if s.starts_with('-') && s.len() > 1 {
                return Err(usage(&format!("unknown option {s}")));
            } else {
                a.positional.push(s.clone());
            }
        }
        Ok(a)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), Error> {
        match self.options.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(usage(&format!("option {k} does not apply to this command"))),
            None => Ok(()),
        }
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.options.iter().rev().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
    }

    fn values(&self, name: &str) -> Vec<&str> {
        self.options.iter().filter(|(k, _)| k == name).filter_map(|(_, v)| v.as_deref()).collect()
    }

    fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(k, _)| k == name)
    }

    fn number(&self, name: &str) -> Result<Option<usize>, Error> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err(usage(&format!("{name} wants a positive integer, got `{v}`"))),
            },
        }
    }

    fn one_positional(&self, what: &str) -> Result<PathBuf, Error> {
        match self.positional.as_slice() {
            [p] => Ok(PathBuf::from(p)),
            [] => Err(usage(&format!("missing {what}"))),
            _ => Err(usage(&format!("expected one {what}, got {}", self.positional.len()))),
        }
    }

    fn target(&self) -> Result<TargetSpec, Error> {
        TargetSpec::parse(self.value("--target"), self.value("--cpu")).map_err(|e| Error::Input(e.to_string()))
    }
}

/// `--no-nchwc` (compile, bench, dump, verify): the pipeline without blocked layout
/// regions, for A/B runs. Set as the environment variable the driver reads, so that
/// child processes (`verify`'s cases) inherit it.
fn apply_layout_switch(a: &Args) {
    if a.flag("--no-nchwc") {
        // Only the main thread runs at this point: nothing reads the environment concurrently.
        unsafe { std::env::set_var(driver::NO_NCHWC_VAR, "1") };
    }
}

fn usage(msg: &str) -> Error {
    Error::Input(format!("{msg}\n\n{USAGE}"))
}

/// Entry point: returns the process exit status.
pub fn main(raw: Vec<String>) -> i32 {
    let Some((cmd, rest)) = raw.split_first() else {
        eprint!("{USAGE}");
        return 2;
    };
    let result = match cmd.as_str() {
        "compile" => Args::parse(rest).and_then(|a| compile(&a)),
        "run" => Args::parse(rest).and_then(|a| run(&a)),
        "verify" => Args::parse(rest).and_then(|a| verify_cmd(&a)),
        "verify-train" => Args::parse(rest).and_then(|a| verify_train_cmd(&a)),
        "bench" => Args::parse(rest).and_then(|a| bench(&a)),
        "dump" => Args::parse(rest).and_then(|a| dump(&a)),
        "bench-gemm" => Args::parse(rest).and_then(|a| bench_gemm(&a)),
        "export-trained" => Args::parse(rest).and_then(|a| export_trained(&a)),
        "__verify-case" => Args::parse(rest).and_then(|a| verify_case(&a)),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        "--version" | "version" => {
            println!("cnnc {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        other => Err(usage(&format!("unknown command `{other}`"))),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cnnc: {e}");
            e.exit_code()
        }
    }
}

fn compile(a: &Args) -> Result<(), Error> {
    a.only(&[
        "-o", "--target", "--cpu", "--batch", "--header", "--train", "--optimizer", "--lr", "--momentum", "--weight-decay", "--freeze",
        "--no-nchwc",
    ])?;
    apply_layout_switch(a);
    if a.flag("--train") {
        return compile_train(a);
    }
    if let Some(k) = ["--optimizer", "--lr", "--momentum", "--weight-decay", "--freeze"].into_iter().find(|k| a.value(k).is_some()) {
        return Err(usage(&format!("{k} needs --train")));
    }
    let model = a.one_positional("MODEL.onnx")?;
    let out = PathBuf::from(a.value("-o").ok_or_else(|| usage("compile needs -o OUT.so"))?);
    let target = a.target()?;
    let (g, report) = driver::compile_file(&model, a.number("--batch")?, &target, &out)?;
    if let Some(h) = a.value("--header") {
        std::fs::write(h, crate::header::model_header(&g, &target)).map_err(|e| Error::Input(format!("writing {h}: {e}")))?;
    }
    eprintln!(
        "cnnc: compiled {} -> {} ({} kernels, {:.1} MB of weights, {:.2} s)",
        model.display(),
        out.display(),
        report.kernels,
        report.weight_bytes as f64 / 1e6,
        report.seconds
    );
    Ok(())
}

fn run(a: &Args) -> Result<(), Error> {
    a.only(&["--input", "--out", "--threads"])?;
    let so = a.one_positional("OUT.so")?;
    let out_dir = PathBuf::from(a.value("--out").ok_or_else(|| usage("run needs --out DIR"))?);
    let threads = a.number("--threads")?.unwrap_or(1);
    let model = cnnc_runtime::Model::load(&so).map_err(|e| Error::Input(e.to_string()))?;
    let info = model.info().clone();
    let input_files = a.values("--input");
    if input_files.len() != info.inputs.len() {
        let names: Vec<&str> = info.inputs.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::Input(format!(
            "the model takes {} input(s) ({}), {} --input given",
            info.inputs.len(),
            names.join(", "),
            input_files.len()
        )));
    }
    let mut inputs = Vec::new();
    for f in input_files {
        let (_, t) = cnnc_onnx::read_tensor_pb(Path::new(f)).map_err(|e| Error::Input(format!("{f}: {e}")))?;
        inputs.push(t);
    }
    let mut session = cnnc_runtime::Session::new(&model, threads).map_err(|e| Error::Failed(e.to_string()))?;
    let outputs = driver::run_model(&mut session, &info, &inputs)?;
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::Input(format!("creating {}: {e}", out_dir.display())))?;
    for (k, (t, spec)) in outputs.iter().zip(&info.outputs).enumerate() {
        let p = out_dir.join(format!("output_{k}.pb"));
        cnnc_onnx::write_tensor_pb(&p, &spec.name, t).map_err(|e| Error::Failed(format!("writing {}: {e}", p.display())))?;
    }
    Ok(())
}

/// `compile --train`. The learning rate, momentum and weight decay are per-call
/// hyper-parameters (`cnnc_hyper`); the flags are checked here and do not change the code.
fn compile_train(a: &Args) -> Result<(), Error> {
    use crate::train::cli_train;
    let model = a.one_positional("MODEL.onnx")?;
    let out = PathBuf::from(a.value("-o").ok_or_else(|| usage("compile needs -o OUT.so"))?);
    let batch = a.number("--batch")?;
    if batch == Some(0) {
        return Err(usage("--batch must be at least 1"));
    }
    for k in ["--lr", "--momentum", "--weight-decay"] {
        if let Some(v) = a.value(k)
            && !v.parse::<f32>().is_ok_and(|x| x.is_finite() && x >= 0.0)
        {
            return Err(usage(&format!("{k} wants a non-negative number, got `{v}`")));
        }
    }
    let options = cli_train::TrainCompileOptions {
        optimizer: Some(cli_train::optimizer_kind(a.value("--optimizer"))?),
        freeze: a.values("--freeze").into_iter().map(String::from).collect(),
        batch,
        header: a.value("--header").map(PathBuf::from),
    };
    let target = a.target()?;
    let start = Instant::now();
    let (tensors, bytes) = cli_train::compile_training(&model, &options, &target, &out)?;
    eprintln!(
        "cnnc: compiled {} -> {} for training ({tensors} state tensors, {:.1} MB of state, {:.2} s)",
        model.display(),
        out.display(),
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn verify_train_cmd(a: &Args) -> Result<(), Error> {
    a.only(&["--cpu", "--target"])?;
    if a.positional.is_empty() {
        return Err(usage("verify-train needs at least one DIR"));
    }
    let target = a.target()?;
    let dirs: Vec<PathBuf> = a.positional.iter().map(PathBuf::from).collect();
    crate::train::cli_train::verify_train_all(&dirs, &target)
}

fn verify_cmd(a: &Args) -> Result<(), Error> {
    a.only(&["--jobs", "--cpu", "--target", "--no-nchwc"])?;
    apply_layout_switch(a);
    if a.positional.is_empty() {
        return Err(usage("verify needs at least one DIR"));
    }
    a.target()?;
    let dirs: Vec<PathBuf> = a.positional.iter().map(PathBuf::from).collect();
    let cases = verify::collect_cases(&dirs)?;
    let jobs = a.number("--jobs")?.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let mut pass_on = Vec::new();
    for k in ["--cpu", "--target"] {
        if let Some(v) = a.value(k) {
            pass_on.extend([k.to_string(), v.to_string()]);
        }
    }
    let (_, failed, _) = verify::verify_all(&cases, jobs, &pass_on);
    if failed > 0 { Err(Error::Failed(format!("{failed} case(s) failed"))) } else { Ok(()) }
}

fn verify_case(a: &Args) -> Result<(), Error> {
    let dir = a.one_positional("case DIR")?;
    let target = a.target()?;
    // A panic inside the case is reported as that case's failure, without a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = std::panic::catch_unwind(|| verify::verify_case(&dir, &target)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        verify::Outcome::Fail(format!("internal error (panic): {msg}"))
    });
    println!("{}", outcome.line(&verify::case_name(&dir)));
    Ok(())
}

fn bench(a: &Args) -> Result<(), Error> {
    a.only(&["--threads", "--batch", "--runs", "--cpu", "--target", "--train", "--no-nchwc"])?;
    apply_layout_switch(a);
    let model = a.one_positional("MODEL.onnx")?;
    let threads = a.number("--threads")?.unwrap_or(1);
    if a.flag("--train") {
        let batch = a.number("--batch")?;
        if batch == Some(0) {
            return Err(usage("--batch must be at least 1"));
        }
        let times =
            crate::train::cli_train::bench_training(&model, batch, &a.target()?, threads, a.number("--runs")?.unwrap_or(10))?;
        println!("runs={} min_ms={:.4} max_ms={:.4} threads={threads}", times.len(), times[0], times[times.len() - 1]);
        println!("median_ms={:.4}", times[times.len() / 2]);
        return Ok(());
    }
    let scratch = ScratchDir::new("bench")?;
    // An already compiled .so is timed as it is (and keeps its symbols for `perf`).
    let so = if model.extension().is_some_and(|e| e == "so") {
        for k in ["--batch", "--cpu", "--target"] {
            if a.value(k).is_some() {
                return Err(usage(&format!("{k} does not apply to a compiled .so")));
            }
        }
        model.clone()
    } else {
        let so = scratch.0.join("model.so");
        let (_, report) = driver::compile_file(&model, a.number("--batch")?, &a.target()?, &so)?;
        eprintln!("compiled in {:.2} s", report.seconds);
        so
    };
    let loaded = cnnc_runtime::Model::load(&so).map_err(|e| Error::Failed(e.to_string()))?;
    let info = loaded.info().clone();
    let mut session = cnnc_runtime::Session::new(&loaded, threads).map_err(|e| Error::Failed(e.to_string()))?;
    let inputs: Vec<cnnc_ir::Tensor> = info.inputs.iter().enumerate().map(|(i, s)| random_tensor(driver::ir_dtype(s.dtype), &s.shape, i as u64)).collect();
    // The call as an embedding program makes it: buffers prepared once, the inference
    // entry point timed. Warm up for at least 3 runs or 0.3 s, then time at least `runs`
    // runs or 2 s.
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|t| t.data.to_le_bytes()).collect();
    let in_refs: Vec<&[u8]> = in_bytes.iter().map(Vec::as_slice).collect();
    let mut out_bytes: Vec<Vec<u8>> = info.outputs.iter().map(|s| vec![0u8; s.byte_len()]).collect();
    let mut run = || -> Result<(), Error> {
        let mut out_refs: Vec<&mut [u8]> = out_bytes.iter_mut().map(Vec::as_mut_slice).collect();
        session.run(&in_refs, &mut out_refs).map_err(|e| Error::Failed(format!("running the model: {e}")))
    };
    let warm = Instant::now();
    let mut n = 0;
    while n < 3 || warm.elapsed().as_secs_f64() < 0.3 {
        run()?;
        n += 1;
    }
    let min_runs = a.number("--runs")?.unwrap_or(10);
    let mut times = Vec::new();
    let total = Instant::now();
    while times.len() < min_runs || (total.elapsed().as_secs_f64() < 2.0 && times.len() < 10_000) {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!("runs={} min_ms={:.4} max_ms={:.4} threads={threads}", times.len(), times[0], times[times.len() - 1]);
    println!("median_ms={median:.4}");
    Ok(())
}

/// Deterministic pseudo-random inputs (values in [-1, 1); ints in [0, 10)).
fn random_tensor(dtype: cnnc_ir::DType, shape: &[usize], seed: u64) -> cnnc_ir::Tensor {
    let n: usize = shape.iter().product();
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    use cnnc_ir::{DType, TensorData};
    let data = match dtype {
        DType::F32 => TensorData::F32((0..n).map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()),
        DType::I64 => TensorData::I64((0..n).map(|_| (next() % 10) as i64).collect()),
        DType::I32 => TensorData::I32((0..n).map(|_| (next() % 10) as i32).collect()),
        DType::Bool => TensorData::Bool((0..n).map(|_| next() & 1 == 1).collect()),
    };
    cnnc_ir::Tensor::new(shape.to_vec(), data)
}

fn dump(a: &Args) -> Result<(), Error> {
    a.only(&["--after", "--all", "--list-passes", "--batch", "--full", "--cpu", "--target", "--train", "--optimizer", "--freeze", "--no-nchwc"])?;
    apply_layout_switch(a);
    if a.flag("--train") {
        return dump_training(a);
    }
    let pipeline = passes::inference_pipeline();
    if a.flag("--list-passes") {
        for p in &pipeline {
            println!("{:<24} {}", p.name, p.summary);
        }
        return Ok(());
    }
    let model = a.one_positional("MODEL.onnx")?;
    let after = a.value("--after");
    if let Some(name) = after
        && !pipeline.iter().any(|p| p.name == name)
    {
        let names: Vec<&str> = pipeline.iter().map(|p| p.name).collect();
        return Err(usage(&format!("no pass named `{name}` (passes: {})", names.join(", "))));
    }
    let opts = PrintOptions { elide_constant_data: !a.flag("--full") };
    let all = a.flag("--all");
    let mut g = driver::load_onnx(&model, a.number("--batch")?)?;
    if all {
        println!("# after frontend\n{}", print_with(&g, &opts));
    }
    let target = a.target()?;
    driver::optimize(&mut g, &passes::TargetDesc::from_target(&target), |name, g| {
        if all {
            println!("# after {name}\n{}", print_with(g, &opts));
        } else if after == Some(name) {
            print!("{}", print_with(g, &opts));
        }
    })?;
    if !all && after.is_none() {
        print!("{}", print_with(&g, &opts));
    }
    Ok(())
}

/// `dump --train`: the fused training step (forward, backward, update) after the training
/// pipeline, as it is compiled; node i is kernel `cnnc_k<i>_*` in profiles.
fn dump_training(a: &Args) -> Result<(), Error> {
    if a.value("--after").is_some() || a.flag("--all") || a.flag("--list-passes") {
        return Err(usage("dump --train prints the optimised training graph only (no --after, --all, --list-passes)"));
    }
    let model = a.one_positional("MODEL.onnx")?;
    let options = crate::train::TrainOptions { freeze: a.values("--freeze").into_iter().map(String::from).collect() };
    let optimizer = crate::train::cli_train::optimizer_kind(a.value("--optimizer"))?;
    let tg = crate::train::model::load_training_graph_batched(&model, &options, a.number("--batch")?)
        .map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let fused = crate::train::fused::fused_train_step(&tg, optimizer).map_err(|e| Error::Input(format!("{}: {e}", model.display())))?;
    let mut g = fused.graph.clone();
    crate::train::optimize::optimize_for_target(&mut g, &a.target()?).map_err(Error::Failed)?;
    print!("{}", print_with(&g, &PrintOptions { elide_constant_data: !a.flag("--full") }));
    Ok(())
}

/// The host's GEMM microkernel on L1-resident panels against a register-only FMA loop
/// of the same vector width, measured in the same run.
fn bench_gemm(a: &Args) -> Result<(), Error> {
    a.only(&[])?;
    let result = cnnc_codegen::microkernel::peak::measure_gemm_vs_peak().map_err(|e| Error::Failed(e.to_string()))?;
    println!("{result}");
    Ok(())
}

/// `export-trained`: the trained state written back into the ONNX model's initializers.
fn export_trained(a: &Args) -> Result<(), Error> {
    a.only(&["--train-so", "--state", "-o"])?;
    let model = a.one_positional("MODEL.onnx")?;
    let train_so = PathBuf::from(a.value("--train-so").ok_or_else(|| usage("export-trained needs --train-so TRAIN.so"))?);
    let state = PathBuf::from(a.value("--state").ok_or_else(|| usage("export-trained needs --state STATE.bin"))?);
    let out = PathBuf::from(a.value("-o").ok_or_else(|| usage("export-trained needs -o TRAINED.onnx"))?);
    let report = crate::train::cli_train::export_trained(&model, &train_so, &state, &out)?;
    eprintln!(
        "cnnc: wrote {} ({} initializers trained, {} nodes switched to inference mode)",
        out.display(),
        report.replaced.len(),
        report.switched_to_inference
    );
    Ok(())
}
