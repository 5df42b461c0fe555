//! Every ONNX backend-test model under ../shared decodes and loads without panicking.
//! Skipped (with a message) when ../shared is absent.

use std::path::{Path, PathBuf};

mod backend_cases;

use cnnc_onnx::{LoadOptions, decode_model, load_model};

fn cases(suite: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(suite) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("model.onnx").is_file()).collect();
    dirs.sort();
    dirs
}

#[test]
fn every_shared_model_decodes_and_loads_without_panicking() {
    let suites = backend_cases::suites_named(&["onnx-node", "onnx-pytorch", "onnx-light"]);
    if suites.is_empty() {
        return;
    }
    let (mut loaded, mut unsupported, mut invalid) = (0, 0, Vec::new());
    for suite in &suites {
        for case in cases(suite) {
            let bytes = std::fs::read(case.join("model.onnx")).unwrap();
            let model = decode_model(&bytes).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
            assert!(model.graph.is_some(), "{}: no graph", case.display());
            match load_model(case.join("model.onnx"), &LoadOptions::default()) {
                Ok(g) => match cnnc_ir::verify::verify(&g) {
                    Ok(()) => loaded += 1,
                    Err(e) => invalid.push(format!("{}: verifier: {e}", case.display())),
                },
                Err(e) if e.is_unsupported() => {
                    unsupported += 1;
                    if std::env::var_os("CNNC_SHOW").is_some() {
                        eprintln!("UNSUPPORTED {}: {e}", case.display());
                    }
                }
                Err(e) => invalid.push(format!("{}: {e}", case.display())),
            }
        }
    }
    eprintln!("loaded {loaded}, unsupported {unsupported}, invalid {}", invalid.len());
    // Every shared model is valid ONNX: each must load or be refused as unsupported.
    assert!(invalid.is_empty(), "{} model(s) rejected as invalid:\n{}", invalid.len(), invalid.join("\n"));
    assert!(loaded > 100, "only {loaded} models loaded");
}
