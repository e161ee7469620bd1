//! The instruction-set level the kernels run at, as a value: detected once (by whoever loads
//! the model), held by the model and handed to every kernel call, so that a test can run any
//! kernel at every level the CPU has and compare it with the portable build bit for bit.

use crate::error::{EngineError, Result};

/// How a kernel call is compiled: the portable build (what a CPU without AVX2, or another
/// architecture, runs), or the same source compiled for AVX2 and FMA or for AVX-512 (plus the
/// hand-written kernels of those levels). Every level computes the same bits; only the speed
/// differs.
///
/// A value exists only for a level this CPU has: [`Isa::available`], [`Isa::best`] and
/// [`Isa::named`] detect before they hand one out, and the x86 code relies on that before it
/// runs AVX instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa {
    level: Level,
    /// At AVX2: the CPU runs each 256-bit operation as two 128-bit halves, so the kernels that
    /// are faster in 128-bit registers there take them (see [`Isa::halves`]).
    halves: bool,
}

/// The levels, lowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Level {
    Portable,
    /// AVX2, FMA and F16C: 16 lanes are two registers.
    Avx2,
    /// AVX-512F (with AVX2 and FMA): 16 lanes are one register, and there are 32 of them.
    Avx512,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

impl Isa {
    /// The portable build: every CPU has it.
    pub const PORTABLE: Isa = Isa {
        level: Level::Portable,
        halves: false,
    };

    /// Every level this CPU has, lowest (portable) first.
    pub fn available() -> Vec<Isa> {
        let mut all = vec![Isa::PORTABLE];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            all.push(Isa {
                level: Level::Avx2,
                halves: splits_256_bit_operations(),
            });
            if is_x86_feature_detected!("avx512f") {
                all.push(Isa {
                    level: Level::Avx512,
                    halves: false,
                });
            }
        }
        all
    }

    /// The fastest level this CPU has.
    pub fn best() -> Isa {
        Isa::available().pop().unwrap_or(Isa::PORTABLE)
    }

    /// The level called `name` (`portable` or `none`, `avx2`, `avx512`), if this CPU has it.
    pub fn named(name: &str) -> Result<Isa> {
        let wanted = match name {
            "portable" | "none" => Level::Portable,
            "avx2" => Level::Avx2,
            "avx512" => Level::Avx512,
            _ => return Err(Isa::unsupported(name)),
        };
        Isa::available()
            .into_iter()
            .find(|isa| isa.level == wanted)
            .ok_or_else(|| Isa::unsupported(name))
    }

    /// The level `AGENTKV_SIMD` names (to compare the levels on one machine: they compute the
    /// same bits), or the best this CPU has when it is unset or empty. Read where a model is
    /// loaded; nothing below that reads the environment.
    pub fn from_env() -> Result<Isa> {
        match std::env::var("AGENTKV_SIMD") {
            Ok(name) if !name.is_empty() => Isa::named(&name),
            _ => Ok(Isa::best()),
        }
    }

    fn unsupported(name: &str) -> EngineError {
        let available: Vec<&str> = Isa::available().into_iter().map(Isa::name).collect();
        EngineError::UnsupportedIsa {
            requested: name.to_owned(),
            available: available.join(", "),
        }
    }

    /// `portable`, `avx2` or `avx512`: what benchmarks report.
    pub fn name(self) -> &'static str {
        self.level.name()
    }

    pub(crate) fn level(self) -> Level {
        self.level
    }

    /// At AVX2, whether the CPU runs each 256-bit operation as two 128-bit halves (AMD's Zen 1
    /// and Zen+, and Hygon's Dhyana built on them): a 256-bit instruction is then two
    /// micro-ops, and a kernel written in 128-bit registers can be faster (the gemv and the
    /// dequantization of Q8_0 and Q4_1 are). Either form computes the same bits.
    pub(crate) fn halves(self) -> bool {
        self.halves
    }

    /// This level with the other form of its 256-bit kernels (see [`Isa::halves`]), so that
    /// tests run both on any AVX2 machine.
    #[cfg(test)]
    pub(crate) fn other_halves(self) -> Isa {
        assert_eq!(self.level, Level::Avx2, "only AVX2 has two forms");
        Isa {
            halves: !self.halves,
            ..self
        }
    }

    /// Whether this level has hand-written x86 kernels (AVX2 or AVX-512).
    pub(crate) fn is_simd(self) -> bool {
        self.level != Level::Portable
    }
}

/// Whether this CPU executes a 256-bit AVX operation as two 128-bit halves: AMD family 0x17
/// below model 0x30 (Zen 1 and Zen+; Zen 2 starts at 0x30 with full-width units) and Hygon
/// family 0x18 (Dhyana, a Zen 1). Other CPUs, and any this does not recognize, are taken to
/// have full-width units: the 128-bit kernels are then never chosen, only slower there.
#[cfg(target_arch = "x86_64")]
fn splits_256_bit_operations() -> bool {
    use std::arch::x86_64::__cpuid;
    let vendor = __cpuid(0);
    let mut name = [0u8; 12];
    for (chunk, word) in name.chunks_mut(4).zip([vendor.ebx, vendor.edx, vendor.ecx]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    splits_256_bit(&name, __cpuid(1).eax)
}

/// [`splits_256_bit_operations`] for the CPUID vendor string `vendor` and the processor
/// signature `signature` (leaf 1's EAX).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn splits_256_bit(vendor: &[u8; 12], signature: u32) -> bool {
    let base_family = (signature >> 8) & 0xF;
    let (family, model) = if base_family == 0xF {
        (
            base_family + ((signature >> 20) & 0xFF),
            ((signature >> 4) & 0xF) | (((signature >> 16) & 0xF) << 4),
        )
    } else {
        (base_family, (signature >> 4) & 0xF)
    };
    match (vendor, family) {
        (b"AuthenticAMD", 0x17) => model < 0x30,
        (b"HygonGenuine", 0x18) => true,
        _ => false,
    }
}

/// A kernel body to compile at each level. Every implementation marks [`Recompile::run`]
/// `#[inline(always)]`: it is then compiled into each copy of the caller built with
/// `#[target_feature]`, and the one portable source becomes AVX2 or AVX-512 code.
pub(crate) trait Recompile {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `f` once at every level this CPU has, lowest (portable) first, and AVX2 in both its
/// forms (see [`Isa::halves`]): tests compare each
/// level's result with the portable one, in the spirit of candle's `test_device!`. The x86
/// levels this CPU lacks are named on the terminal, so that a run on an AVX2-only machine
/// does not pass in silence for code it never reached.
#[cfg(test)]
pub(crate) fn for_each_isa(mut f: impl FnMut(Isa)) {
    let available = Isa::available();
    for &isa in &available {
        f(isa);
        if isa.level == Level::Avx2 {
            f(isa.other_halves());
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let missing: Vec<&str> = [Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&level| !available.iter().any(|isa| isa.level == level))
            .map(Level::name)
            .collect();
        thread_local! {
            // Each test runs on its own thread: say it once per test, not once per call.
            static WARNED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if !missing.is_empty() && !WARNED.replace(true) {
            use std::io::Write;
            // Straight to the terminal: the test harness captures `eprintln!` of passing tests.
            let test = std::thread::current().name().unwrap_or("a test").to_owned();
            let _ = writeln!(
                std::io::stderr(),
                "warning: {test} did not run at {}: this CPU lacks it",
                missing.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_named_and_only_present_ones_are_handed_out() {
        let available = Isa::available();
        assert_eq!(available[0], Isa::PORTABLE);
        assert_eq!(Isa::best(), *available.last().expect("portable at least"));
        for isa in &available {
            assert_eq!(Isa::named(isa.name()).expect("present"), *isa);
        }
        assert_eq!(Isa::named("none").expect("always"), Isa::PORTABLE);
        for name in ["avx2", "avx512"] {
            let present = available.iter().any(|isa| isa.name() == name);
            assert_eq!(Isa::named(name).is_ok(), present, "{name}");
        }
        let err = Isa::named("sse9").expect_err("unknown");
        let message = err.to_string();
        assert!(
            message.contains("sse9") && message.contains("portable"),
            "{message}"
        );
    }

    #[test]
    fn only_zen_1_and_its_kin_run_256_bit_operations_as_halves() {
        let (amd, hygon, intel) = (b"AuthenticAMD", b"HygonGenuine", b"GenuineIntel");
        // EPYC 7551 (Zen 1, family 0x17 model 0x01), Ryzen 7 2700X (Zen+, model 0x08),
        // EPYC 7742 (Zen 2, model 0x31), EPYC 9654 (Zen 4, family 0x19), Dhyana, a Xeon.
        assert!(splits_256_bit(amd, 0x0080_0F12));
        assert!(splits_256_bit(amd, 0x0080_0F82));
        assert!(!splits_256_bit(amd, 0x0083_0F10));
        assert!(!splits_256_bit(amd, 0x00A1_0F11));
        assert!(splits_256_bit(hygon, 0x0090_0F01));
        assert!(!splits_256_bit(intel, 0x0005_0654));
        assert!(
            !splits_256_bit(intel, 0x0080_0F12),
            "the family is read with the vendor"
        );
    }
}
