//! Object file to shared library, by the system C compiler.

use std::path::Path;
use std::process::Command;

use target_lexicon::Triple;

use crate::kernels::CodegenError;
use crate::target::TargetSpec;

/// The C compiler driver that links for `target`: `cc` for the host, otherwise the
/// usual cross prefix (`aarch64-linux-gnu-gcc`). `CNNC_CC` overrides it.
pub fn linker_for(target: &TargetSpec) -> String {
    if let Ok(cc) = std::env::var("CNNC_CC")
        && !cc.is_empty()
    {
        return cc;
    }
    let host = Triple::host();
    if target.triple.architecture == host.architecture && target.triple.operating_system == host.operating_system {
        return "cc".to_string();
    }
    format!(
        "{}-{}-gnu-gcc",
        target.triple.architecture, target.triple.operating_system
    )
}

/// Links `object` into the shared library `out` (`cc -shared -o out obj.o -lm`).
pub fn link_shared(object: &[u8], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    link_shared_objects(&[object], out, target)
}

/// Links several objects into one shared library (a training library: one object per
/// entry point's graph, whose local symbols may repeat between objects).
pub fn link_shared_objects(objects: &[&[u8]], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    let dir = std::env::temp_dir().join(format!("cnnc-link-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| CodegenError(format!("cannot create {}: {e}", dir.display())))?;
    let result = link_in(&dir, objects, out, target);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn link_in(dir: &Path, objects: &[&[u8]], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    let mut obj_paths = Vec::with_capacity(objects.len());
    for (k, object) in objects.iter().enumerate() {
        let obj_path = dir.join(if k == 0 { "model.o".to_string() } else { format!("model{k}.o") });
        std::fs::write(&obj_path, object).map_err(|e| CodegenError(format!("cannot write {}: {e}", obj_path.display())))?;
        obj_paths.push(obj_path);
    }
    let cc = linker_for(target);
    let output = Command::new(&cc)
        .arg("-shared")
        .arg("-o")
        .arg(out)
        .args(&obj_paths)
        .arg("-lm")
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CodegenError(format!(
                    "the C compiler '{cc}' needed to link for {} is not installed (set CNNC_CC to another driver)",
                    target.triple
                ))
            } else {
                CodegenError(format!("cannot run '{cc}': {e}"))
            }
        })?;
    if !output.status.success() {
        return Err(CodegenError(format!(
            "'{cc} -shared -o {} ... -lm' failed ({}):\n{}",
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        )));
    }
    Ok(())
}
