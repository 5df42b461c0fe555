//! Object file to shared library, by the system C compiler.
//!
//! The object is mostly weights (~100 MB for a ResNet-50), which GNU ld copies
//! slowly; when a faster linker is installed (mold, lld, gold) the C compiler is asked
//! to use it (`-fuse-ld=`), falling back to its default linker if that fails.
//! `CNNC_FUSE_LD` names the linker to use instead (empty or `default`: the C compiler's
//! own choice).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    format!("{}-{}-gnu-gcc", target.triple.architecture, target.triple.operating_system)
}

/// Links `object` into the shared library `out` (`cc -shared -o out obj.o -lm`).
pub fn link_shared(object: &[u8], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    link_shared_objects(&[object], out, target)
}

/// Links several objects into one shared library (a training library: one object per
/// entry point's graph, whose local symbols may repeat between objects).
pub fn link_shared_objects(objects: &[&[u8]], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    with_scratch_dir(|dir| {
        let mut obj_paths = Vec::with_capacity(objects.len());
        for (k, object) in objects.iter().enumerate() {
            let obj_path = dir.join(if k == 0 { "model.o".to_string() } else { format!("model{k}.o") });
            std::fs::write(&obj_path, object)
                .map_err(|e| CodegenError(format!("cannot write {}: {e}", obj_path.display())))?;
            obj_paths.push(obj_path);
        }
        link_object_files(&obj_paths, out, target)
    })
}

/// Runs `f` with a fresh scratch directory, removed afterwards.
pub fn with_scratch_dir<R>(f: impl FnOnce(&Path) -> Result<R, CodegenError>) -> Result<R, CodegenError> {
    let dir = std::env::temp_dir().join(format!("cnnc-link-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir).map_err(|e| CodegenError(format!("cannot create {}: {e}", dir.display())))?;
    let result = f(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Links object files into the shared library `out` (`cc -shared -o out *.o -lm`).
pub fn link_object_files(obj_paths: &[PathBuf], out: &Path, target: &TargetSpec) -> Result<(), CodegenError> {
    let cc = linker_for(target);
    let run = |fuse_ld: Option<&str>| -> Result<Output, CodegenError> {
        let mut command = Command::new(&cc);
        if let Some(linker) = fuse_ld {
            command.arg(format!("-fuse-ld={linker}"));
        }
        command.arg("-shared").arg("-o").arg(out).args(obj_paths).arg("-lm").output().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CodegenError(format!(
                    "the C compiler '{cc}' needed to link for {} is not installed (set CNNC_CC to another driver)",
                    target.triple
                ))
            } else {
                CodegenError(format!("cannot run '{cc}': {e}"))
            }
        })
    };
    let fast = fast_linker(target);
    let mut output = run(fast.as_deref())?;
    if !output.status.success() && fast.is_some() {
        output = run(None)?;
    }
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

/// The `-fuse-ld=` value to try: `CNNC_FUSE_LD` if set, else for the host's own C
/// compiler the first of mold, lld and gold found on `PATH`.
fn fast_linker(target: &TargetSpec) -> Option<String> {
    if let Ok(choice) = std::env::var("CNNC_FUSE_LD") {
        let choice = choice.trim();
        return (!choice.is_empty() && choice != "default").then(|| choice.to_string());
    }
    if linker_for(target) != "cc" {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    ["mold", "lld", "gold"]
        .into_iter()
        .find(|name| std::env::split_paths(&path).any(|dir| dir.join(format!("ld.{name}")).is_file()))
        .map(str::to_string)
}
