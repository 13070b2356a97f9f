//! JSON text exactly as Python's `json.dumps` writes it (default arguments), and a tolerant reader.
//!
//! Optuna stores distributions, user attributes and system attributes as `json.dumps(...)` text.
//! Writing the same bytes keeps our databases indistinguishable from Optuna's: `", "` and `": "`
//! separators, floats in `repr` form (`1e-06`, `0.3`, `16.0`), `NaN`/`Infinity` for non-finite
//! floats, and `\uXXXX` escapes for every non-ASCII character (`ensure_ascii=True`).

use anyhow::{Context, Result};
use serde_json::Value;

/// Python's `repr(float)`: the shortest digits that round-trip, positional notation for decimal
/// exponents in [-4, 16), scientific (`1e-06`, `1.5e+16`) otherwise. Non-finite values use the
/// JSON spellings Python's `json` module writes (`NaN`, `Infinity`, `-Infinity`).
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".to_string() } else { "-Infinity".to_string() };
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-7", "0e0", "1e16".
    let sci = format!("{x:e}");
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n_digits = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n_digits {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n_digits) as usize))
        } else {
            let (int_part, frac_part) = digits.split_at((exp + 1) as usize);
            format!("{int_part}.{frac_part}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mant = if rest.is_empty() { first.to_string() } else { format!("{first}.{rest}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{exp_sign}{:02}", exp.abs())
    }
}

/// A JSON string literal with Python's `ensure_ascii=True` escaping.
pub fn string_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `json.dumps(value)` for a serde_json value. Object keys keep the map's iteration order.
pub fn dumps(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => out.push_str(&string_literal(s)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&string_literal(k));
                out.push_str(": ");
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// Parses JSON written by Python. Python also writes the bare tokens `NaN`, `Infinity` and
/// `-Infinity`, which JSON (and serde_json) lacks; they are read as `null` — a lossy but safe
/// reading for attributes, which are only displayed or compared as a whole.
pub fn loads(text: &str) -> Result<Value> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(first_err) => {
            let cleaned = replace_non_finite_tokens(text);
            serde_json::from_str(&cleaned).with_context(|| format!("invalid JSON {text:?}: {first_err}"))
        }
    }
}

/// Replaces `NaN`, `Infinity` and `-Infinity` outside string literals with `null`.
fn replace_non_finite_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let token = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t));
        match token {
            Some(t) => {
                out.push_str("null");
                rest = &rest[t.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3.11's repr(x) / json.dumps(x).
        let cases: &[(f64, &str)] = &[
            (1e-6, "1e-06"),
            (1e-4, "0.0001"),
            (0.0001234, "0.0001234"),
            (0.00001234, "1.234e-05"),
            (0.3, "0.3"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (16.0, "16.0"),
            (123456.0, "123456.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (5.02518980759823e-06, "5.02518980759823e-06"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-2.5e-300, "-2.5e-300"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(*x), *want, "repr of {x:e}");
        }
    }

    #[test]
    fn dumps_matches_python_layout() {
        let v = json!({"a": [1, 2.5, "x", null, true], "b": {"c": 1e-6}});
        assert_eq!(dumps(&v), r#"{"a": [1, 2.5, "x", null, true], "b": {"c": 1e-06}}"#);
        assert_eq!(string_literal("é\"\n\u{1F600}"), r#""\u00e9\"\n\ud83d\ude00""#);
    }

    #[test]
    fn loads_accepts_python_non_finite_tokens() {
        let v = loads(r#"{"x": NaN, "y": [-Infinity, Infinity], "s": "NaN Infinity"}"#).unwrap();
        assert_eq!(v, json!({"x": null, "y": [null, null], "s": "NaN Infinity"}));
        let err = loads("{\"x\": ").unwrap_err().to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }
}
