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
    };

    /// Every level this CPU has, lowest (portable) first.
    pub fn available() -> Vec<Isa> {
        let mut all = vec![Isa::PORTABLE];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            all.push(Isa { level: Level::Avx2 });
            if is_x86_feature_detected!("avx512f") {
                all.push(Isa {
                    level: Level::Avx512,
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

    /// Whether this level has hand-written x86 kernels (AVX2 or AVX-512).
    pub(crate) fn is_simd(self) -> bool {
        self.level != Level::Portable
    }
}

/// A kernel body to compile at each level. Every implementation marks [`Recompile::run`]
/// `#[inline(always)]`: it is then compiled into each copy of the caller built with
/// `#[target_feature]`, and the one portable source becomes AVX2 or AVX-512 code.
pub(crate) trait Recompile {
    type Output;
    fn run(self) -> Self::Output;
}

/// Runs `f` once at every level this CPU has, lowest (portable) first: tests compare each
/// level's result with the portable one, in the spirit of candle's `test_device!`. The x86
/// levels this CPU lacks are named on the terminal, so that a run on an AVX2-only machine
/// does not pass in silence for code it never reached.
#[cfg(test)]
pub(crate) fn for_each_isa(mut f: impl FnMut(Isa)) {
    let available = Isa::available();
    for &isa in &available {
        f(isa);
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
}
