//! A walk over a GGUF header that candle's reader refused, to name the tensor whose type it
//! does not know: candle stops at the first unknown type number without saying which tensor
//! holds it. Only the failure path of [`super::GgufFile::open`] runs this, and it treats the
//! file as hostile: it reads every length before what it covers, keeps nothing longer than a
//! tensor name, and gives up (`None`) at the first thing that does not add up.

use std::io::{self, Read};

/// GGML's name for type number `id` (`ggml.h`'s `enum ggml_type`), if it has one.
pub(crate) fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// Longest tensor name read (GGML's own limit is 64 bytes).
const MAX_NAME: u64 = 1 << 16;
/// Deepest nesting of metadata arrays walked.
const MAX_DEPTH: u32 = 8;

/// The first tensor of the GGUF header in `r` whose type number `known` rejects, as
/// (name, type number); `None` if every type is known or the header is not well formed.
pub(crate) fn first_unknown_type(
    r: &mut impl Read,
    known: impl Fn(u32) -> bool,
) -> Option<(String, u32)> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" {
        return None;
    }
    let version = u32_le(r)?;
    // Version 1 counted in u32, later versions in u64.
    let count = |r: &mut dyn Read| match version {
        1 => u32_le(r).map(u64::from),
        _ => u64_le(r),
    };
    let tensors = count(r)?;
    let entries = count(r)?;
    for _ in 0..entries {
        skip_string(r, version)?;
        let ty = u32_le(r)?;
        skip_value(r, version, ty, 0)?;
    }
    for _ in 0..tensors {
        let name = string(r, version)?;
        let dims = u32_le(r)?;
        if dims > 8 {
            return None;
        }
        for _ in 0..dims {
            count(r)?;
        }
        let ty = u32_le(r)?;
        u64_le(r)?; // the data's offset
        if !known(ty) {
            return Some((name, ty));
        }
    }
    None
}

fn u32_le(r: &mut (impl Read + ?Sized)) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn u64_le(r: &mut (impl Read + ?Sized)) -> Option<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

/// Reads and drops exactly `n` bytes.
fn skip(r: &mut (impl Read + ?Sized), n: u64) -> Option<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink()).ok()?;
    (copied == n).then_some(())
}

fn string_len(r: &mut (impl Read + ?Sized), version: u32) -> Option<u64> {
    match version {
        1 => u32_le(r).map(u64::from),
        _ => u64_le(r),
    }
}

fn skip_string(r: &mut (impl Read + ?Sized), version: u32) -> Option<()> {
    let n = string_len(r, version)?;
    skip(r, n)
}

fn string(r: &mut (impl Read + ?Sized), version: u32) -> Option<String> {
    let n = string_len(r, version)?;
    if n > MAX_NAME {
        return None;
    }
    let mut b = vec![0u8; usize::try_from(n).ok()?];
    r.read_exact(&mut b).ok()?;
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// Bytes of a metadata value of type `ty` when that is fixed.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1), // u8, i8, bool
        2 | 3 => Some(2),     // u16, i16
        4..=6 => Some(4),     // u32, i32, f32
        10..=12 => Some(8),   // u64, i64, f64
        _ => None,
    }
}

/// Skips one metadata value of type `ty`.
fn skip_value(r: &mut (impl Read + ?Sized), version: u32, ty: u32, depth: u32) -> Option<()> {
    if let Some(n) = fixed_size(ty) {
        return skip(r, n);
    }
    match ty {
        8 => skip_string(r, version),
        9 if depth < MAX_DEPTH => {
            let elem = u32_le(r)?;
            let n = string_len(r, version)?;
            if let Some(size) = fixed_size(elem) {
                return skip(r, n.checked_mul(size)?);
            }
            // Each element takes at least a byte, so a count past the file's end fails at
            // the end of the file rather than spinning.
            for _ in 0..n {
                skip_value(r, version, elem, depth + 1)?;
            }
            Some(())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header: one metadata entry (a string array), then `tensors` as
    /// (name, type number), each 2-D.
    fn header(tensors: &[(&str, u32)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(1u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        for (name, ty) in tensors {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            b.extend(256u64.to_le_bytes());
            b.extend(4u64.to_le_bytes());
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn names_the_first_tensor_of_an_unknown_type() {
        let known = |t: u32| t <= 15 || t == 30;
        let bytes = header(&[("a.weight", 12), ("b.weight", 23), ("c.weight", 35)]);
        let found = first_unknown_type(&mut &bytes[..], known);
        assert_eq!(found, Some(("b.weight".to_owned(), 23)));
        assert_eq!(ggml_type_name(23), Some("IQ4_XS"));
        assert_eq!(ggml_type_name(35), Some("TQ2_0"));
        assert_eq!(ggml_type_name(4), None);
        let fine = header(&[("a.weight", 12), ("b.weight", 0)]);
        assert_eq!(first_unknown_type(&mut &fine[..], known), None);
    }

    #[test]
    fn bad_headers_give_up_without_panicking() {
        let bytes = header(&[("a.weight", 12), ("b.weight", 23)]);
        let known = |t: u32| t != 23;
        // Every truncation, down to nothing, ends in `None`.
        for cut in 0..bytes.len() {
            assert_eq!(
                first_unknown_type(&mut &bytes[..cut], known),
                None,
                "cut {cut}"
            );
        }
        assert!(first_unknown_type(&mut &bytes[..], known).is_some());
        // Lengths and counts far past the end of the data.
        let mut huge = header(&[("a.weight", 23)]);
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(first_unknown_type(&mut &huge[..], |_| false), None);
        let mut many = header(&[]);
        many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(first_unknown_type(&mut &many[..], |_| false), None);
        assert_eq!(first_unknown_type(&mut &b"GGUF"[..], |_| false), None);
        assert_eq!(
            first_unknown_type(&mut &b"junk junk junk"[..], |_| false),
            None
        );
    }
}
