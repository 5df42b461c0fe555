//! What machine the code is for: a target triple plus a CPU level, turned into a
//! Cranelift ISA with the exact feature flags the generated code may rely on.

use std::str::FromStr;

use cranelift_codegen::isa::{self, OwnedTargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use target_lexicon::{Architecture, Endianness, PointerWidth, Triple};

use crate::kernels::CodegenError;

/// Which instruction-set extensions to compile for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuChoice {
    /// Whatever the machine running the compiler has (`cranelift_native`).
    Host,
    /// A named level: "x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4" or, for
    /// aarch64, "generic".
    Named(String),
}

/// The triple and CPU level code is generated for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub triple: Triple,
    pub cpu: CpuChoice,
}

/// x86-64 micro-architecture levels: each adds Cranelift flags and the feature names
/// (as `is_x86_feature_detected!` spells them) to the previous level.
const X86_LEVELS: [(&str, &[&str], &[&str]); 4] = [
    ("x86-64", &[], &[]),
    (
        "x86-64-v2",
        &[
            "has_sse3",
            "has_ssse3",
            "has_sse41",
            "has_sse42",
            "has_popcnt",
            "has_cmpxchg16b",
        ],
        &["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "cmpxchg16b"],
    ),
    (
        "x86-64-v3",
        // The presets of Cranelift leave has_avx unset, which turns every fma into a
        // libcall; the flags are therefore listed one by one.
        &["has_avx", "has_avx2", "has_fma", "has_bmi1", "has_bmi2", "has_lzcnt"],
        &["avx", "avx2", "fma", "bmi1", "bmi2", "lzcnt", "f16c", "movbe"],
    ),
    (
        "x86-64-v4",
        &["has_avx512f", "has_avx512dq", "has_avx512vl"],
        // avx512bw/cd have no Cranelift flag but belong to the level; hand-written
        // kernels may use them.
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// Host features worth reporting when compiling for the host: those that change
/// code Cranelift (or a later hand-written kernel) may emit.
#[cfg(target_arch = "x86_64")]
fn host_x86_features() -> Vec<&'static str> {
    let mut found = Vec::new();
    macro_rules! probe {
        ($($name:tt),*) => {
            $( if std::is_x86_feature_detected!($name) { found.push($name); } )*
        };
    }
    probe!(
        "sse3",
        "ssse3",
        "sse4.1",
        "sse4.2",
        "popcnt",
        "cmpxchg16b",
        "avx",
        "avx2",
        "fma",
        "bmi1",
        "bmi2",
        "lzcnt",
        "f16c",
        "movbe",
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl"
    );
    found
}

#[cfg(not(target_arch = "x86_64"))]
fn host_x86_features() -> Vec<&'static str> {
    Vec::new()
}

impl TargetSpec {
    /// The machine running the compiler, with all of its features.
    pub fn host() -> TargetSpec {
        TargetSpec {
            triple: Triple::host(),
            cpu: CpuChoice::Host,
        }
    }

    /// Parses a `--target` / `--cpu` pair. No triple means the host's; no CPU means
    /// "host" for the host triple and the architecture's baseline otherwise. "native"
    /// and "host" name the host CPU.
    pub fn parse(triple: Option<&str>, cpu: Option<&str>) -> Result<TargetSpec, CodegenError> {
        let triple = match triple {
            None => Triple::host(),
            Some(t) => Triple::from_str(t).map_err(|e| CodegenError(format!("invalid target triple '{t}': {e}")))?,
        };
        let is_host_arch = triple.architecture == Triple::host().architecture;
        let cpu = match cpu {
            None if is_host_arch => CpuChoice::Host,
            None => CpuChoice::Named(baseline_cpu(&triple)?.to_string()),
            Some("native" | "host") => CpuChoice::Host,
            Some(name) => CpuChoice::Named(name.to_string()),
        };
        let spec = TargetSpec { triple, cpu };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), CodegenError> {
        let t = &self.triple;
        if !matches!(t.architecture, Architecture::X86_64 | Architecture::Aarch64(_)) {
            return Err(CodegenError(format!(
                "unsupported target '{t}': cnnc generates code for x86_64 and aarch64 only"
            )));
        }
        if t.pointer_width() != Ok(PointerWidth::U64) || t.endianness() != Ok(Endianness::Little) {
            return Err(CodegenError(format!(
                "unsupported target '{t}': needs 64-bit little-endian"
            )));
        }
        match &self.cpu {
            CpuChoice::Host if t.architecture != Triple::host().architecture => Err(CodegenError(format!(
                "--cpu host/native is only valid for the host architecture, not '{t}'; name a CPU level"
            ))),
            CpuChoice::Host => Ok(()),
            CpuChoice::Named(name) => self.named_level(name).map(|_| ()),
        }
    }

    /// Cranelift flags and reported features of a named CPU level.
    fn named_level(&self, name: &str) -> Result<(Vec<&'static str>, Vec<&'static str>), CodegenError> {
        match self.triple.architecture {
            Architecture::X86_64 => {
                let Some(level) = X86_LEVELS.iter().position(|(n, _, _)| *n == name) else {
                    let known: Vec<&str> = X86_LEVELS.iter().map(|l| l.0).collect();
                    return Err(CodegenError(format!(
                        "unknown x86_64 CPU '{name}'; known: {}, native",
                        known.join(", ")
                    )));
                };
                let mut flags = Vec::new();
                let mut features = Vec::new();
                for (_, f, names) in &X86_LEVELS[..=level] {
                    flags.extend_from_slice(f);
                    features.extend_from_slice(names);
                }
                Ok((flags, features))
            }
            Architecture::Aarch64(_) if name == "generic" => Ok((vec![], vec!["neon"])),
            _ => Err(CodegenError(format!(
                "unknown CPU '{name}' for {}; known: generic",
                self.triple
            ))),
        }
    }

    /// The features the generated code may use, named as `is_x86_feature_detected!`
    /// (or `is_aarch64_feature_detected!`) names them.
    pub fn cpu_features(&self) -> Vec<&'static str> {
        match &self.cpu {
            CpuChoice::Host => match self.triple.architecture {
                Architecture::X86_64 => host_x86_features(),
                _ => vec!["neon"],
            },
            CpuChoice::Named(name) => self.named_level(name).map(|(_, f)| f).unwrap_or_default(),
        }
    }

    /// Human-readable CPU name ("native" for the host).
    pub fn cpu_name(&self) -> &str {
        match &self.cpu {
            CpuChoice::Host => "native",
            CpuChoice::Named(n) => n,
        }
    }

    /// A Cranelift ISA for this target. `pic` must be true for objects that become a
    /// shared library and false for the JIT (which, in Cranelift 0.135, wants non-PIC).
    pub fn isa(&self, pic: bool) -> Result<OwnedTargetIsa, CodegenError> {
        self.check()?;
        let mut shared = settings::builder();
        let set = |b: &mut settings::Builder, k: &str, v: &str| {
            b.set(k, v)
                .map_err(|e| CodegenError(format!("cranelift setting {k}={v}: {e}")))
        };
        set(&mut shared, "opt_level", "speed")?;
        set(&mut shared, "is_pic", if pic { "true" } else { "false" })?;
        set(
            &mut shared,
            "enable_verifier",
            if cfg!(debug_assertions) { "true" } else { "false" },
        )?;
        let flags = settings::Flags::new(shared);

        let builder = match &self.cpu {
            CpuChoice::Host => {
                cranelift_native::builder().map_err(|e| CodegenError(format!("cannot target the host CPU: {e}")))?
            }
            CpuChoice::Named(name) => {
                let mut b = isa::lookup(self.triple.clone())
                    .map_err(|e| CodegenError(format!("unsupported target '{}': {e}", self.triple)))?;
                let (cranelift_flags, _) = self.named_level(name)?;
                for flag in cranelift_flags {
                    b.enable(flag)
                        .map_err(|e| CodegenError(format!("cranelift flag {flag}: {e}")))?;
                }
                b
            }
        };
        builder
            .finish(flags)
            .map_err(|e| CodegenError(format!("cannot build the ISA for '{}': {e}", self.triple)))
    }
}

fn baseline_cpu(triple: &Triple) -> Result<&'static str, CodegenError> {
    match triple.architecture {
        Architecture::X86_64 => Ok("x86-64"),
        Architecture::Aarch64(_) => Ok("generic"),
        _ => Err(CodegenError(format!(
            "unsupported target '{triple}': cnnc targets x86_64 and aarch64"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_levels_accumulate_features() {
        let v3 = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64-v3")).unwrap();
        let f = v3.cpu_features();
        for want in ["sse4.2", "avx", "avx2", "fma"] {
            assert!(f.contains(&want), "{want} missing from {f:?}");
        }
        assert!(!f.contains(&"avx512f"));
        let base = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64")).unwrap();
        assert!(base.cpu_features().is_empty());
    }

    #[test]
    fn v3_enables_avx_and_fma_in_cranelift() {
        let v3 = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64-v3")).unwrap();
        let isa = v3.isa(true).unwrap();
        let flags: Vec<String> = isa
            .isa_flags()
            .iter()
            .filter(|v| v.as_bool() == Some(true))
            .map(|v| v.name.to_string())
            .collect();
        for want in ["has_avx", "has_fma", "has_avx2", "has_sse41"] {
            assert!(flags.iter().any(|f| f == want), "{want} not set: {flags:?}");
        }
        assert!(isa.flags().is_pic());
    }

    #[test]
    fn bad_names_are_clear_errors() {
        let e = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("pentium")).unwrap_err();
        assert!(e.0.contains("unknown x86_64 CPU 'pentium'"), "{e}");
        let e = TargetSpec::parse(Some("riscv64gc-unknown-linux-gnu"), Some("generic")).unwrap_err();
        assert!(e.0.contains("unsupported target"), "{e}");
        let e = TargetSpec::parse(Some("not-a-triple-at-all-x"), None).unwrap_err();
        assert!(e.0.contains("invalid target triple"), "{e}");
    }

    #[test]
    fn aarch64_generic_builds() {
        let t = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), None).unwrap();
        assert_eq!(t.cpu, CpuChoice::Named("generic".into()));
        t.isa(true).unwrap();
    }
}
