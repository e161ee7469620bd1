//! Typed reads of GGUF metadata values, with errors that name the key and the type found.
//!
//! GGUF writers are not consistent about integer widths (a token id may be stored as
//! `u32` by one converter and `i32` by another), so the integer readers accept any
//! integer type whose value fits, and reject the rest with [`MetadataError::OutOfRange`].

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// The metadata map of a GGUF file (`gguf_file::Content::metadata`).
pub type Metadata = HashMap<String, Value>;

/// Result of a metadata read.
pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// A metadata key that is absent or holds the wrong kind of value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// A required key is not in the file.
    #[error(
        "gguf metadata has no `{key}`; the file was converted without it, \
         re-convert the model with a current llama.cpp convert_hf_to_gguf.py"
    )]
    Missing {
        /// The key that was looked up.
        key: String,
    },
    /// The key holds a value of another type.
    #[error("gguf metadata `{key}` is {found}, expected {expected}")]
    WrongType {
        /// The key that was looked up.
        key: String,
        /// The type the reader wanted.
        expected: &'static str,
        /// The type stored in the file.
        found: &'static str,
    },
    /// An element of an array value has the wrong type.
    #[error("gguf metadata `{key}`[{index}] is {found}, expected {expected}")]
    WrongElementType {
        /// The key of the array.
        key: String,
        /// Position of the offending element.
        index: usize,
        /// The element type the reader wanted.
        expected: &'static str,
        /// The element type stored in the file.
        found: &'static str,
    },
    /// An integer value does not fit the type the reader wanted.
    #[error("gguf metadata `{key}` holds {value}, which does not fit in {expected}")]
    OutOfRange {
        /// The key that was looked up (with `[index]` for array elements).
        key: String,
        /// The stored value, printed.
        value: String,
        /// The type the reader wanted.
        expected: &'static str,
    },
    /// A value of the right type that the model cannot use (inconsistent with another key, say).
    #[error("gguf metadata `{key}` is invalid: {reason}")]
    Invalid {
        /// The key that was looked up.
        key: String,
        /// Why the value cannot be used.
        reason: String,
    },
}

impl MetadataError {
    /// A value of the right type that cannot be used, and why.
    pub fn invalid(key: &str, reason: impl Into<String>) -> MetadataError {
        MetadataError::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A short name for the type of a stored value, for error messages.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// The value under `key`, or [`MetadataError::Missing`].
pub fn get<'a>(md: &'a Metadata, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| MetadataError::Missing {
        key: key.to_owned(),
    })
}

/// The string under `key`.
pub fn string<'a>(md: &'a Metadata, key: &str) -> Result<&'a str> {
    as_str(key, get(md, key)?)
}

/// The string under `key`, or `None` when the key is absent (a present key of another type
/// is still an error).
pub fn opt_string<'a>(md: &'a Metadata, key: &str) -> Result<Option<&'a str>> {
    md.get(key).map(|v| as_str(key, v)).transpose()
}

/// The integer under `key` as `u32`.
pub fn u32(md: &Metadata, key: &str) -> Result<u32> {
    as_u32(key, get(md, key)?)
}

/// The integer under `key` as `u32`, or `None` when the key is absent.
pub fn opt_u32(md: &Metadata, key: &str) -> Result<Option<u32>> {
    md.get(key).map(|v| as_u32(key, v)).transpose()
}

/// The integer under `key` as a count in `1..=max` (a layer count, a width).
pub fn count(md: &Metadata, key: &str, max: usize) -> Result<usize> {
    as_count(key, get(md, key)?, max)
}

/// [`count`], or `None` when the key is absent.
pub fn opt_count(md: &Metadata, key: &str, max: usize) -> Result<Option<usize>> {
    md.get(key).map(|v| as_count(key, v, max)).transpose()
}

/// The float (`f32`, or `f64` narrowed) under `key`, or `None` when the key is absent.
pub fn opt_f32(md: &Metadata, key: &str) -> Result<Option<f32>> {
    md.get(key)
        .map(|v| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            ref other => Err(wrong_type(key, "float", other)),
        })
        .transpose()
}

/// The boolean under `key`, or `None` when the key is absent.
pub fn opt_bool(md: &Metadata, key: &str) -> Result<Option<bool>> {
    md.get(key)
        .map(|v| match v {
            Value::Bool(b) => Ok(*b),
            other => Err(wrong_type(key, "bool", other)),
        })
        .transpose()
}

/// The array of strings under `key`.
pub fn string_array<'a>(md: &'a Metadata, key: &str) -> Result<Vec<&'a str>> {
    array(md, key)?
        .iter()
        .enumerate()
        .map(|(index, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(MetadataError::WrongElementType {
                key: key.to_owned(),
                index,
                expected: "string",
                found: type_name(other),
            }),
        })
        .collect()
}

/// The array of integers under `key`, each converted to `i32`.
pub fn i32_array(md: &Metadata, key: &str) -> Result<Vec<i32>> {
    array(md, key)?
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let wide = as_i128(v).ok_or_else(|| MetadataError::WrongElementType {
                key: key.to_owned(),
                index,
                expected: "integer",
                found: type_name(v),
            })?;
            i32::try_from(wide).map_err(|_| MetadataError::OutOfRange {
                key: format!("{key}[{index}]"),
                value: wide.to_string(),
                expected: "i32",
            })
        })
        .collect()
}

/// The array of numbers under `key` as `f32`: floats (`f64` narrowed) or integers, since
/// llama.cpp accepts `tokenizer.ggml.scores` stored either way.
pub fn f32_array(md: &Metadata, key: &str) -> Result<Vec<f32>> {
    array(md, key)?
        .iter()
        .enumerate()
        .map(|(index, v)| match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => Ok(x as f32),
            ref other => as_i128(other).map(|wide| wide as f32).ok_or_else(|| {
                MetadataError::WrongElementType {
                    key: key.to_owned(),
                    index,
                    expected: "number",
                    found: type_name(other),
                }
            }),
        })
        .collect()
}

fn array<'a>(md: &'a Metadata, key: &str) -> Result<&'a [Value]> {
    match get(md, key)? {
        Value::Array(items) => Ok(items),
        other => Err(wrong_type(key, "array", other)),
    }
}

fn as_str<'a>(key: &str, value: &'a Value) -> Result<&'a str> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(key, "string", other)),
    }
}

fn as_u32(key: &str, value: &Value) -> Result<u32> {
    let wide = as_i128(value).ok_or_else(|| wrong_type(key, "integer", value))?;
    u32::try_from(wide).map_err(|_| MetadataError::OutOfRange {
        key: key.to_owned(),
        value: wide.to_string(),
        expected: "u32",
    })
}

fn as_count(key: &str, value: &Value, max: usize) -> Result<usize> {
    let wide = as_i128(value).ok_or_else(|| wrong_type(key, "integer", value))?;
    if wide < 1 || wide > max as i128 {
        return Err(MetadataError::invalid(
            key,
            format!("{wide} is outside 1..={max}"),
        ));
    }
    Ok(wide as usize)
}

/// Every GGUF integer type fits in an `i128`, so range checks happen in one place.
fn as_i128(value: &Value) -> Option<i128> {
    Some(match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => v.into(),
        Value::I64(v) => v.into(),
        _ => return None,
    })
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> MetadataError {
    MetadataError::WrongType {
        key: key.to_owned(),
        expected,
        found: type_name(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md() -> Metadata {
        let mut md = Metadata::new();
        md.insert("s".into(), Value::String("smollm".into()));
        md.insert("u".into(), Value::U32(7));
        md.insert("i".into(), Value::I32(9));
        md.insert("neg".into(), Value::I32(-1));
        md.insert("b".into(), Value::Bool(true));
        md.insert(
            "strs".into(),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        md.insert(
            "mixed".into(),
            Value::Array(vec![Value::String("a".into()), Value::U8(1)]),
        );
        md.insert(
            "ints".into(),
            Value::Array(vec![Value::I32(1), Value::U8(3), Value::I64(-2)]),
        );
        md.insert("big".into(), Value::Array(vec![Value::U64(u64::MAX)]));
        md
    }

    #[test]
    fn reads_typed_values() {
        let md = md();
        assert_eq!(string(&md, "s").ok(), Some("smollm"));
        assert_eq!(u32(&md, "u").ok(), Some(7));
        // An i32-stored id is accepted when it fits.
        assert_eq!(u32(&md, "i").ok(), Some(9));
        assert_eq!(opt_bool(&md, "b").ok(), Some(Some(true)));
        assert_eq!(opt_bool(&md, "nope").ok(), Some(None));
        assert_eq!(opt_string(&md, "nope").ok(), Some(None));
        assert_eq!(string_array(&md, "strs").ok(), Some(vec!["a", "b"]));
        assert_eq!(i32_array(&md, "ints").ok(), Some(vec![1, 3, -2]));
        assert_eq!(f32_array(&md, "ints").ok(), Some(vec![1.0, 3.0, -2.0]));
        assert!(matches!(
            f32_array(&md, "mixed"),
            Err(MetadataError::WrongElementType { index: 0, .. })
        ));
    }

    #[test]
    fn counts_and_floats_are_checked() {
        let mut md = md();
        md.insert("f".into(), Value::F64(0.5));
        assert_eq!(count(&md, "u", 7).ok(), Some(7));
        assert_eq!(opt_count(&md, "nope", 7).ok(), Some(None));
        assert_eq!(opt_f32(&md, "f").ok(), Some(Some(0.5)));
        for (key, max) in [("u", 6), ("neg", 10)] {
            let err = count(&md, key, max).expect_err("out of 1..=max");
            assert!(
                matches!(&err, MetadataError::Invalid { key: k, .. } if k == key),
                "{err}"
            );
        }
        assert!(matches!(
            count(&md, "s", 9),
            Err(MetadataError::WrongType {
                expected: "integer",
                ..
            })
        ));
        assert!(matches!(
            opt_f32(&md, "u"),
            Err(MetadataError::WrongType {
                expected: "float",
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_key_and_types() {
        let md = md();
        let err = string(&md, "absent").map(|_| ()).err();
        assert!(matches!(&err, Some(MetadataError::Missing { key }) if key == "absent"));
        assert!(
            err.map(|e| e.to_string())
                .is_some_and(|m| m.contains("`absent`"))
        );

        let err = string(&md, "u").map(|_| ()).err();
        assert!(matches!(
            err,
            Some(MetadataError::WrongType {
                expected: "string",
                found: "u32",
                ..
            })
        ));

        let err = u32(&md, "neg").err();
        assert!(matches!(
            err,
            Some(MetadataError::OutOfRange {
                expected: "u32",
                ..
            })
        ));

        let err = string_array(&md, "mixed").err();
        assert!(matches!(
            err,
            Some(MetadataError::WrongElementType {
                index: 1,
                found: "u8",
                ..
            })
        ));

        let err = i32_array(&md, "big").err();
        assert!(matches!(&err, Some(MetadataError::OutOfRange { key, .. }) if key == "big[0]"));

        let err = opt_u32(&md, "s").err();
        assert!(matches!(err, Some(MetadataError::WrongType { .. })));
    }
}
