//! `cargo xtask inlining`: no SIMD intrinsic of our kernels is left as a function call in the
//! release build.
//!
//! Each kernel is a `#[target_feature]` function whose intrinsics must be inlined into it. A
//! helper without the attribute (an `#[inline(always)]` reduction, a closure handed to
//! `array::from_fn` or `map`) keeps its intrinsics inline only as long as the compiler inlines
//! the helper too; where it does not, each intrinsic becomes a call to a function compiled
//! without the feature, moving registers through memory. Nothing else notices: results stay
//! bitwise the same. It happened once: a reduction used by a third kernel stopped being
//! inlined into the attention's score kernel as well, and a resume turn of Gemma 3 270M took
//! 1.5 times as long. This check reads the disassembly of the release binary the benchmark
//! runs (`objdump`, from binutils) and fails on any call from our code to an intrinsic.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::Program;

/// The crates whose functions (closures included) are held to the rule.
const OURS: [&str; 2] = ["engine::", "kv_extract::"];

pub(crate) fn inlining() -> Result<()> {
    eprintln!("==> inlining");
    let started = std::time::Instant::now();
    // Built as the engine benchmark builds it: the same binary it measures.
    let program = Program::build("engine", "--example", "bench_speed")?;
    let binary = program.path();
    let out = Command::new("objdump")
        .args(["-d", "-C", "--no-show-raw-insn"])
        .arg(binary)
        .output()
        .context("running objdump: install binutils")?;
    if !out.status.success() {
        bail!(
            "objdump failed on {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let calls = outlined_intrinsics(&text);
    if !calls.is_empty() {
        // Each caller and intrinsic once, with how many calls.
        let mut pairs = std::collections::BTreeMap::new();
        for call in &calls {
            *pairs.entry(call).or_insert(0) += 1;
        }
        let list: Vec<String> = pairs
            .iter()
            .map(|((caller, callee), n)| format!("  {caller}\n    calls {callee} ({n}x)"))
            .collect();
        bail!(
            "{} call(s) from our code to SIMD intrinsics in the release build:\n{}\n\
             A helper of a #[target_feature] kernel was not inlined into it. Write the helper \
             without closures (loops over arrays instead of `from_fn` or `map`), or give it \
             the kernel's #[target_feature] attribute.",
            calls.len(),
            list.join("\n")
        );
    }
    let functions = text.lines().filter(|l| l.ends_with(">:")).count();
    eprintln!(
        "    no intrinsic called out of line ({functions} functions read; {:.1}s with the \
         release build)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `(caller, callee)` for every call in `disassembly` (`objdump -d -C`) from a function of
/// [`OURS`] to an x86 intrinsic.
fn outlined_intrinsics(disassembly: &str) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    let mut function = "";
    for line in disassembly.lines() {
        // A function starts with `<address> <name>:`.
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, name)| name)
        {
            function = name;
            continue;
        }
        // A call, or a jump to another function (a tail call).
        let Some((_, operand)) = line
            .split_once("\tcall")
            .or_else(|| line.split_once("\tjmp"))
        else {
            continue;
        };
        let Some(callee) = operand
            .split_once('<')
            .and_then(|(_, c)| c.strip_suffix('>'))
        else {
            continue;
        };
        let ours = OURS.iter().any(|c| function.contains(c));
        if ours && callee.contains("core::core_arch::x86") {
            calls.push((function.to_owned(), callee.to_owned()));
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_intrinsics_called_from_our_code_only() {
        let disassembly = "\
0000000000271f40 <engine::kernels::x86::gram::gram_quarters_avx512>:
  271f47:\tvmovups (%r14,%r11,1),%zmm24
  271f50:\tcall   2c3b00 <engine::kernels::x86::quarters_avx512>
  271f58:\tcall   2d3b90 <core::core_arch::x86::avx512f::_mm512_shuffle_f32x4>

00000000002d3c00 <engine::kernels::x86::reduce16::{{closure}}>:
  2d3c04:\tcall   2d3d00 <core::core_arch::x86::avx512f::_mm512_add_ps>
  2d3c09:\tjmp    2d3d40 <core::core_arch::x86::avx512f::_mm512_shuffle_ps>
  2d3c0e:\tjmp    2d3c04 <engine::kernels::x86::reduce16::{{closure}}+0x4>

0000000000235200 <<candle_core::cpu::avx::CurrentCpuBF16 as candle_core::cpu::CpuBF16>::load>:
  235260:\tcall   2071f0 <core::core_arch::x86::avx512bf16::_mm256_cvtpbh_ps>
";
        assert_eq!(
            outlined_intrinsics(disassembly),
            [
                (
                    "engine::kernels::x86::gram::gram_quarters_avx512".to_owned(),
                    "core::core_arch::x86::avx512f::_mm512_shuffle_f32x4".to_owned()
                ),
                (
                    "engine::kernels::x86::reduce16::{{closure}}".to_owned(),
                    "core::core_arch::x86::avx512f::_mm512_add_ps".to_owned()
                ),
                (
                    "engine::kernels::x86::reduce16::{{closure}}".to_owned(),
                    "core::core_arch::x86::avx512f::_mm512_shuffle_ps".to_owned()
                ),
            ]
        );
    }
}
