//! Does this process's CPU run a model's code: the target triple's architecture and
//! the CPU features the code was compiled to use.
//!
//! Feature names are those of `std::is_x86_feature_detected!` and
//! `std::arch::is_aarch64_feature_detected!`. The macros only take literals, so each
//! known name is spelled out once below; a name missing from these lists is reported
//! as unknown rather than assumed present.

/// The architecture a target triple names, in `std::env::consts::ARCH` spelling.
pub fn triple_arch(target: &str) -> &str {
    let arch = target.split('-').next().unwrap_or(target);
    match arch {
        "arm64" => "aarch64",
        "i386" | "i486" | "i586" | "i686" => "x86",
        other => other,
    }
}

/// Whether the running CPU has `feature`; `None` when the name is not one this runtime
/// can check on this architecture.
pub fn has_feature(feature: &str) -> Option<bool> {
    detect(feature)
}

/// Splits the ABI's comma-separated feature string, dropping blanks.
pub fn parse_feature_list(list: &str) -> Vec<String> {
    list.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect()
}

macro_rules! feature_table {
    ($detect:ident; $($name:tt),* $(,)?) => {
        fn detect(feature: &str) -> Option<bool> {
            match feature {
                $($name => Some($detect!($name)),)*
                _ => None,
            }
        }
    };
}

#[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
feature_table!(is_x86_feature_detected;
    "aes", "pclmulqdq", "rdrand", "rdseed", "tsc", "mmx", "sse", "sse2", "sse3", "ssse3",
    "sse4.1", "sse4.2", "sse4a", "sha", "sha512", "sm3", "sm4", "avx", "avx2", "f16c", "fma",
    "bmi1", "bmi2", "abm", "lzcnt", "tbm", "popcnt", "fxsr", "xsave", "xsaveopt", "xsaves",
    "xsavec", "cmpxchg16b", "adx", "rtm", "movbe", "ermsb", "kl", "widekl",
    "avx512f", "avx512cd", "avx512er", "avx512pf", "avx512bw", "avx512dq", "avx512vl",
    "avx512ifma", "avx512vbmi", "avx512vpopcntdq", "avx512vbmi2", "avx512vnni",
    "avx512bitalg", "avx512bf16", "avx512vp2intersect", "avx512fp16",
    "gfni", "vaes", "vpclmulqdq", "avxvnni", "avxifma", "avxneconvert", "avxvnniint8",
    "avxvnniint16",
);

// The names stable since Rust 1.60 (not compiled on the x86-64 development machines).
#[cfg(target_arch = "aarch64")]
use std::arch::is_aarch64_feature_detected;
#[cfg(target_arch = "aarch64")]
feature_table!(is_aarch64_feature_detected;
    "neon", "asimd", "pmull", "fp", "fp16", "sve", "crc", "lse", "lse2", "rdm", "rcpc",
    "rcpc2", "dotprod", "tme", "fhm", "dit", "flagm", "ssbs", "sb", "paca", "pacg", "dpb",
    "dpb2", "sve2", "sve2-aes", "sve2-sm4", "sve2-sha3", "sve2-bitperm", "frintts", "i8mm",
    "f32mm", "f64mm", "bf16", "rand", "bti", "mte", "jsconv", "fcma", "aes", "sha2", "sha3",
    "sm4",
);

#[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
fn detect(_feature: &str) -> Option<bool> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triple_arch_normalises_aliases() {
        assert_eq!(triple_arch("x86_64-unknown-linux-gnu"), "x86_64");
        assert_eq!(triple_arch("arm64-apple-darwin"), "aarch64");
        assert_eq!(triple_arch("aarch64-unknown-linux-gnu"), "aarch64");
        assert_eq!(triple_arch("i686-unknown-linux-gnu"), "x86");
        assert_eq!(triple_arch("riscv64gc-unknown-linux-gnu"), "riscv64gc");
        assert_eq!(triple_arch(""), "");
    }

    #[test]
    fn feature_list_splits_and_trims() {
        assert_eq!(parse_feature_list(""), Vec::<String>::new());
        assert_eq!(parse_feature_list("avx2, fma,,"), vec!["avx2", "fma"]);
    }

    #[test]
    fn unknown_feature_names_are_not_assumed_present() {
        assert_eq!(has_feature("made-up-feature"), None);
        assert_eq!(has_feature(""), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_baseline_features_are_present() {
        assert_eq!(has_feature("sse"), Some(true));
        assert_eq!(has_feature("sse2"), Some(true));
    }
}
