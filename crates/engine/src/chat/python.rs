//! What chat templates call that minijinja does not have: `raise_exception`, and the Python
//! `str` and `dict` methods published templates use.

use minijinja::value::{Value, ValueKind, from_args};
use minijinja::{Error, ErrorKind, State};

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
pub(super) fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The Python `str` and `dict` methods that published chat templates use, which minijinja
/// does not have (`message['content'].strip()`, `tool.items()`, ...).
pub(super) fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    match value.kind() {
        ValueKind::String => string_method(state, value, method, args),
        ValueKind::Map => map_method(state, value, method, args),
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn string_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    let s = value.as_str().unwrap_or_default();
    let strip_set = |args: &[Value]| -> std::result::Result<Option<Vec<char>>, Error> {
        let (chars,): (Option<&str>,) = from_args(args)?;
        Ok(chars.map(|c| c.chars().collect()))
    };
    Ok(match method {
        "strip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_matches(set.as_slice()),
            None => s.trim(),
        }),
        "lstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_start_matches(set.as_slice()),
            None => s.trim_start(),
        }),
        "rstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_end_matches(set.as_slice()),
            None => s.trim_end(),
        }),
        "startswith" | "endswith" => {
            let (affix,): (Value,) = from_args(args)?;
            // Python takes one string or a tuple of them.
            let affixes: Vec<Value> = match affix.kind() {
                ValueKind::Seq => affix.try_iter()?.collect(),
                _ => vec![affix],
            };
            let test = |a: &Value| {
                a.as_str().is_some_and(|a| {
                    if method == "startswith" {
                        s.starts_with(a)
                    } else {
                        s.ends_with(a)
                    }
                })
            };
            Value::from(affixes.iter().any(test))
        }
        "upper" | "lower" | "title" | "capitalize" => {
            let _: () = from_args(args)?;
            state.apply_filter(method, std::slice::from_ref(value))?
        }
        "replace" => {
            let (old, new): (&str, &str) = from_args(args)?;
            Value::from(s.replace(old, new))
        }
        "split" => {
            let (sep,): (Option<&str>,) = from_args(args)?;
            let parts: Vec<Value> = match sep {
                None => s.split_whitespace().map(Value::from).collect(),
                Some("") => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                Some(sep) => s.split(sep).map(Value::from).collect(),
            };
            Value::from(parts)
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

fn map_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    Ok(match method {
        "items" => {
            let _: () = from_args(args)?;
            state.apply_filter("items", std::slice::from_ref(value))?
        }
        "keys" => {
            let _: () = from_args(args)?;
            Value::from(value.try_iter()?.collect::<Vec<_>>())
        }
        "values" => {
            let _: () = from_args(args)?;
            let values = value
                .try_iter()?
                .map(|k| value.get_item(&k))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Value::from(values)
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            match value.get_item(&key)? {
                v if v.is_undefined() => default.unwrap_or(Value::from(())),
                v => v,
            }
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}
