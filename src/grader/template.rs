//! The tiny `{{ path }}` resolver used by every grader's templated fields (OpenAI grader
//! style): `{{ item.answer }}`, `{{ item.a.b.0 }}` (dataset row), `{{ sample.output_text }}` /
//! `{{ completion }}` (the model's text), `{{ sample.prompt }}` / `{{ prompt }}`.
//! A string that is exactly one placeholder resolves to the referenced JSON value itself
//! (so `schema = "{{ item.schema }}"` yields an object); otherwise values are interpolated
//! (strings raw, anything else as compact JSON). No filters, no logic: predictable on purpose.

use serde_json::Value;

use super::{bad, Sample};
use crate::Result;

/// The default `input`: the completion.
pub const OUTPUT_TEXT: &str = "{{ sample.output_text }}";

enum Piece<'a> {
    Lit(&'a str),
    Var(&'a str),
}

fn pieces(s: &str) -> std::result::Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Piece::Lit(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed `{{{{` in {s:?}"))?;
        let path = after[..end].trim();
        if path.is_empty() {
            return Err(format!("empty `{{{{ }}}}` in {s:?}"));
        }
        out.push(Piece::Var(path));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Lit(rest));
    }
    Ok(out)
}

fn check_path(path: &str) -> std::result::Result<(), String> {
    let root = path.split('.').next().unwrap_or("");
    match root {
        "item" | "prompt" | "completion" | "output_text" => Ok(()),
        "sample" if matches!(path, "sample.output_text" | "sample.prompt") => Ok(()),
        _ => Err(format!(
            "unknown template variable `{path}` (use item.…, sample.output_text, sample.prompt, prompt, completion)"
        )),
    }
}

/// Validates every placeholder in `s` (at build time), naming `key` on error.
pub fn check(key: &str, s: &str) -> Result<()> {
    for p in pieces(s).map_err(|e| bad(key, e))? {
        if let Piece::Var(path) = p {
            check_path(path).map_err(|e| bad(key, e))?;
        }
    }
    Ok(())
}

/// The dataset fields (`item.<field>…`, first segment) that a template refers to; an
/// unparsable template refers to none (its error comes from [`check`]).
pub fn item_fields(s: &str) -> Vec<&str> {
    pieces(s)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(path) => path.strip_prefix("item.")?.split('.').next(),
            Piece::Lit(_) => None,
        })
        .collect()
}

/// Validates placeholders in every string inside a JSON value.
pub fn check_value(key: &str, v: &Value) -> Result<()> {
    match v {
        Value::String(s) => check(key, s),
        Value::Array(a) => a.iter().try_for_each(|x| check_value(key, x)),
        Value::Object(o) => o.values().try_for_each(|x| check_value(key, x)),
        _ => Ok(()),
    }
}

fn lookup(path: &str, s: &Sample) -> std::result::Result<Value, String> {
    let mut segs = path.split('.');
    let root = segs.next().unwrap_or("");
    let mut cur: &Value = match root {
        "item" => &s.item,
        "prompt" => return Ok(Value::String(s.prompt.clone())),
        "completion" | "output_text" => return Ok(Value::String(s.completion.clone())),
        "sample" => {
            return match segs.next() {
                Some("output_text") => Ok(Value::String(s.completion.clone())),
                Some("prompt") => Ok(Value::String(s.prompt.clone())),
                _ => Err(format!("unknown template variable `{path}`")),
            }
        }
        _ => return Err(format!("unknown template variable `{path}`")),
    };
    for seg in segs {
        cur = match cur {
            Value::Object(o) => o.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("`{path}`: the item has no `{seg}`"))?;
    }
    Ok(cur.clone())
}

fn to_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Renders a template to text.
pub fn render(t: &str, s: &Sample) -> std::result::Result<String, String> {
    let ps = pieces(t)?;
    let mut out = String::with_capacity(t.len());
    for p in ps {
        match p {
            Piece::Lit(l) => out.push_str(l),
            Piece::Var(path) => out.push_str(&to_text(lookup(path, s)?)),
        }
    }
    Ok(out)
}

/// Resolves a templated JSON value: a string that is exactly one placeholder becomes the
/// referenced value; other strings are rendered; arrays and objects are resolved recursively.
pub fn resolve(v: &Value, s: &Sample) -> std::result::Result<Value, String> {
    Ok(match v {
        Value::String(t) => {
            let ps = pieces(t)?;
            match ps.as_slice() {
                [Piece::Var(path)] => lookup(path, s)?,
                _ => Value::String(render(t, s)?),
            }
        }
        Value::Array(a) => Value::Array(a.iter().map(|x| resolve(x, s)).collect::<Result<_, _>>()?),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), resolve(x, s)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_and_resolves() {
        let s = Sample::new(
            "P",
            "C",
            json!({"answer": 42, "a": {"b": ["x", "y"]}, "s": "str"}),
        );
        assert_eq!(render("{{ item.answer }}", &s).unwrap(), "42");
        assert_eq!(
            render("{{item.a.b.1}}-{{ sample.output_text }}-{{prompt}}", &s).unwrap(),
            "y-C-P"
        );
        assert_eq!(
            resolve(&json!("{{ item.a }}"), &s).unwrap(),
            json!({"b": ["x", "y"]})
        );
        assert_eq!(
            resolve(&json!(["{{ item.s }}!", 3]), &s).unwrap(),
            json!(["str!", 3])
        );
        assert!(render("{{ item.missing }}", &s).unwrap_err().contains("missing"));
        assert!(render("{{ item.answer", &s).is_err());
        assert!(check("reference", "{{ itme.answer }}").is_err());
        assert!(check("reference", "{{ sample.output_text }} {{ item.x }}").is_ok());
    }
}
