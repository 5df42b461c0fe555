//! What the passes know about the machine: plain numbers chosen once per compile, so
//! that passes stay pure functions of (graph, target) and tests can pin the target.

use std::path::Path;

use cnnc_codegen::{CpuChoice, TargetSpec};
use target_lexicon::Triple;

/// The machine facts schedule choices depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetDesc {
    /// Shown in dumps and messages, e.g. "x86_64 avx2".
    pub name: String,
    /// f32 lanes of the widest vector the microkernels use.
    pub vector_width: usize,
    /// Rows (output channels) of the GEMM microkernel's register tile.
    pub gemm_mr: usize,
    /// Columns (output positions) of the GEMM microkernel's register tile.
    pub gemm_nr: usize,
    /// Level-1 data cache of one core, in bytes.
    pub l1d_bytes: usize,
    /// Level-2 cache of one core, in bytes.
    pub l2_bytes: usize,
}

/// Used when the cache sizes cannot be read (another machine, or no sysfs): small
/// enough to be right on every x86-64 and aarch64 core cnnc targets.
const DEFAULT_L1D_BYTES: usize = 32 * 1024;
const DEFAULT_L2_BYTES: usize = 512 * 1024;

/// Register-tile shapes per vector ISA. With 16 ymm registers, AVX2 keeps a 6x16 tile
/// of accumulators (12 registers) plus 2 for B and 1 broadcast of A; AVX-512's 32 zmm
/// registers hold a 14x32 tile (28 accumulators). Without either, 4x8 fits in 16 xmm.
struct Microkernel {
    isa: &'static str,
    vector_width: usize,
    mr: usize,
    nr: usize,
}

const AVX512: Microkernel = Microkernel { isa: "avx512", vector_width: 16, mr: 14, nr: 32 };
const AVX2: Microkernel = Microkernel { isa: "avx2", vector_width: 8, mr: 6, nr: 16 };
const PORTABLE: Microkernel = Microkernel { isa: "portable", vector_width: 4, mr: 4, nr: 8 };

impl TargetDesc {
    /// An AVX2 machine with 32 KiB L1d and 1 MiB L2, whatever the host: snapshots and
    /// tests must not depend on the machine that runs them.
    pub fn fixed_for_tests() -> TargetDesc {
        TargetDesc {
            name: "test-avx2".into(),
            vector_width: AVX2.vector_width,
            gemm_mr: AVX2.mr,
            gemm_nr: AVX2.nr,
            l1d_bytes: 32 * 1024,
            l2_bytes: 1024 * 1024,
        }
    }

    /// The description of `spec`: microkernel from its CPU features; cache sizes from
    /// sysfs when compiling for the host, defaults otherwise.
    pub fn from_target(spec: &TargetSpec) -> TargetDesc {
        let features = spec.cpu_features();
        let has = |f: &str| features.contains(&f);
        let kernel = if has("avx512f") {
            AVX512
        } else if has("avx2") && has("fma") {
            AVX2
        } else {
            PORTABLE
        };
        let is_host = spec.cpu == CpuChoice::Host && spec.triple.architecture == Triple::host().architecture;
        let caches = if is_host { host_cache_sizes(Path::new(HOST_CACHE_DIR)) } else { CacheSizes::default() };
        TargetDesc {
            name: format!("{} {} {}", spec.triple.architecture, spec.cpu_name(), kernel.isa),
            vector_width: kernel.vector_width,
            gemm_mr: kernel.mr,
            gemm_nr: kernel.nr,
            l1d_bytes: caches.l1d.unwrap_or(DEFAULT_L1D_BYTES),
            l2_bytes: caches.l2.unwrap_or(DEFAULT_L2_BYTES),
        }
    }
}

const HOST_CACHE_DIR: &str = "/sys/devices/system/cpu/cpu0/cache";

#[derive(Default, Debug, PartialEq)]
struct CacheSizes {
    l1d: Option<usize>,
    l2: Option<usize>,
}

/// Reads `index*/{level,type,size}` under a sysfs cache directory. Anything missing or
/// unreadable leaves that size unknown.
fn host_cache_sizes(dir: &Path) -> CacheSizes {
    let mut sizes = CacheSizes::default();
    let Ok(entries) = std::fs::read_dir(dir) else { return sizes };
    for entry in entries.flatten() {
        let path = entry.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).ok().map(|s| s.trim().to_string());
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size")) else { continue };
        let Some(bytes) = parse_cache_size(&size) else { continue };
        match (level.as_str(), kind.as_str()) {
            ("1", "Data" | "Unified") => sizes.l1d = Some(bytes),
            ("2", "Unified" | "Data") => sizes.l2 = Some(bytes),
            _ => {}
        }
    }
    sizes
}

/// "48K", "1024K", "2M" or a plain byte count.
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit.trim() {
        "" => 1,
        "K" | "k" | "KB" | "KiB" => 1024,
        "M" | "MB" | "MiB" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(scale).filter(|&b| b > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_in_sysfs_units() {
        assert_eq!(parse_cache_size("48K"), Some(48 * 1024));
        assert_eq!(parse_cache_size("1M"), Some(1024 * 1024));
        assert_eq!(parse_cache_size("32768"), Some(32768));
        assert_eq!(parse_cache_size("0K"), None);
        assert_eq!(parse_cache_size("lots"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    #[test]
    fn sysfs_layout_is_read_by_level_and_type() {
        let dir = std::env::temp_dir().join(format!("cnnc-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (index, level, kind, size) in [
            ("index0", "1", "Data", "48K"),
            ("index1", "1", "Instruction", "32K"),
            ("index2", "2", "Unified", "1024K"),
            ("index3", "3", "Unified", "32768K"),
        ] {
            let d = dir.join(index);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(host_cache_sizes(&dir), CacheSizes { l1d: Some(48 * 1024), l2: Some(1024 * 1024) });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(host_cache_sizes(&dir), CacheSizes::default());
    }

    #[test]
    fn named_levels_pick_their_microkernel_and_default_caches() {
        let v4 = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64-v4")).unwrap();
        let v3 = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64-v3")).unwrap();
        let v2 = TargetSpec::parse(Some("x86_64-unknown-linux-gnu"), Some("x86-64-v2")).unwrap();
        let arm = TargetSpec::parse(Some("aarch64-unknown-linux-gnu"), Some("generic")).unwrap();
        let shape = |t: &TargetDesc| (t.vector_width, t.gemm_mr, t.gemm_nr);
        assert_eq!(shape(&TargetDesc::from_target(&v4)), (16, 14, 32));
        assert_eq!(shape(&TargetDesc::from_target(&v3)), (8, 6, 16));
        assert_eq!(shape(&TargetDesc::from_target(&v2)), (4, 4, 8));
        let arm = TargetDesc::from_target(&arm);
        assert_eq!(shape(&arm), (4, 4, 8));
        assert_eq!((arm.l1d_bytes, arm.l2_bytes), (DEFAULT_L1D_BYTES, DEFAULT_L2_BYTES));
    }

    #[test]
    fn the_host_description_is_sane() {
        let host = TargetDesc::from_target(&TargetSpec::host());
        assert!(host.l1d_bytes >= 4096 && host.l2_bytes >= host.l1d_bytes, "{host:?}");
        assert!([4, 8, 16].contains(&host.vector_width), "{host:?}");
    }
}
