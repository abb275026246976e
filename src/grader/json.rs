//! `json`: the completion must contain a JSON document — the whole text, else the last
//! ```` ```json ```` (or plain ```` ``` ````) fence, else the last `<answer>…</answer>` — and,
//! with `schema` (an inline table, or `"{{ item.schema }}"`), conform to it. Score: 1 when valid
//! (and conforming); 0 when nothing parses; a non-conforming document scores 0, or with
//! `partial_credit = true` 0.5 × the fraction of the schema's top-level `required` keys it has
//! (so a conforming document always beats a non-conforming one).
//!
//! The validator implements the common JSON-Schema subset (draft 2020-12 / 7 names): `type`,
//! `enum`, `const`, `properties`, `required`, `additionalProperties`, `patternProperties`,
//! `items` (schema), `prefixItems`, `minItems`, `maxItems`, `uniqueItems`, `minLength`,
//! `maxLength`, `pattern`, `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`,
//! `multipleOf`, `minProperties`, `maxProperties`, `allOf`, `anyOf`, `oneOf`, `not`, and local
//! `$ref` (`#/$defs/…`, `#/definitions/…`). Other keywords (`format`, `if`, …) are ignored.

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use super::numeric::{last_tag, tag_regex};
use super::template;
use super::{bad, GradeResult, Grader, Sample};
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "super::string_check::default_input")]
    pub input: String,
    #[serde(default)]
    pub schema: Option<toml::Value>,
    #[serde(default)]
    pub partial_credit: bool,
}

pub struct JsonGrader {
    name: String,
    input: String,
    schema: Option<Value>,
    partial: bool,
    tag: Regex,
}

impl JsonGrader {
    pub fn new(cfg: &JsonConfig) -> Result<Self> {
        template::check("input", &cfg.input)?;
        let schema = match &cfg.schema {
            Some(s) => {
                let v = serde_json::to_value(s).map_err(|e| bad("schema", e))?;
                template::check_value("schema", &v)?;
                // A literal schema is checked now, so typos in patterns show at startup.
                if !matches!(&v, Value::String(_)) {
                    check_schema(&v).map_err(|e| bad("schema", e))?;
                }
                Some(v)
            }
            None => None,
        };
        Ok(JsonGrader {
            name: cfg.name.clone().unwrap_or_else(|| "json".into()),
            input: cfg.input.clone(),
            schema,
            partial: cfg.partial_credit,
            tag: tag_regex("answer"),
        })
    }
}

/// Finds and parses the JSON document in a completion.
pub fn extract_json(text: &str, tag: &Regex) -> std::result::Result<Value, String> {
    if let Ok(v) = serde_json::from_str(text.trim()) {
        return Ok(v);
    }
    let mut last_err = None;
    if let Some(body) = last_fence(text) {
        match serde_json::from_str(body.trim()) {
            Ok(v) => return Ok(v),
            Err(e) => last_err = Some(format!("the fenced block is not JSON: {e}")),
        }
    }
    if let Some(body) = last_tag(tag, text) {
        match serde_json::from_str(body.trim()) {
            Ok(v) => return Ok(v),
            Err(e) => last_err = Some(format!("the <answer> block is not JSON: {e}")),
        }
    }
    Err(
        last_err.unwrap_or_else(|| match serde_json::from_str::<Value>(text.trim()) {
            Err(e) => format!("not JSON: {e}"),
            Ok(_) => unreachable!(),
        }),
    )
}

fn last_fence(text: &str) -> Option<&str> {
    let mut found = None;
    let mut rest = text;
    let mut offset = 0;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let nl = after.find('\n')?;
        let lang = after[..nl].trim();
        if !(lang.is_empty() || lang.eq_ignore_ascii_case("json")) {
            // Some other language: skip its block.
            let body = &after[nl + 1..];
            let close = body.find("```")?;
            let consumed = open + 3 + nl + 1 + close + 3;
            offset += consumed;
            rest = &text[offset..];
            continue;
        }
        let body = &after[nl + 1..];
        let close = body.find("```")?;
        found = Some(&body[..close]);
        let consumed = open + 3 + nl + 1 + close + 3;
        offset += consumed;
        rest = &text[offset..];
    }
    found
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        _ => false,
    }
}

fn resolve_ref<'a>(root: &'a Value, r: &str) -> std::result::Result<&'a Value, String> {
    let ptr = r
        .strip_prefix('#')
        .ok_or_else(|| format!("only local $ref is supported, not {r:?}"))?;
    root.pointer(ptr)
        .ok_or_else(|| format!("$ref {r:?} points nowhere"))
}

/// Checks that a schema is usable (valid regex patterns, local refs, object/bool shape).
pub fn check_schema(schema: &Value) -> std::result::Result<(), String> {
    fn walk(root: &Value, s: &Value, path: &str) -> std::result::Result<(), String> {
        match s {
            Value::Bool(_) => return Ok(()),
            Value::Object(_) => {}
            _ => return Err(format!("{path}: a schema must be an object or a boolean")),
        }
        if let Some(p) = s.get("pattern").and_then(Value::as_str) {
            Regex::new(p).map_err(|e| format!("{path}/pattern: {e}"))?;
        }
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            resolve_ref(root, r).map_err(|e| format!("{path}: {e}"))?;
        }
        for key in ["properties", "patternProperties", "$defs", "definitions"] {
            if let Some(Value::Object(m)) = s.get(key) {
                for (k, sub) in m {
                    if key == "patternProperties" {
                        Regex::new(k).map_err(|e| format!("{path}/patternProperties: {e}"))?;
                    }
                    walk(root, sub, &format!("{path}/{key}/{k}"))?;
                }
            }
        }
        for key in ["items", "additionalProperties", "not"] {
            if let Some(sub) = s.get(key) {
                walk(root, sub, &format!("{path}/{key}"))?;
            }
        }
        for key in ["allOf", "anyOf", "oneOf", "prefixItems"] {
            if let Some(Value::Array(a)) = s.get(key) {
                for (i, sub) in a.iter().enumerate() {
                    walk(root, sub, &format!("{path}/{key}/{i}"))?;
                }
            }
        }
        Ok(())
    }
    walk(schema, schema, "#")
}

/// Validates `v` against `schema`; returns the first violation with its JSON pointer.
pub fn validate(schema: &Value, v: &Value) -> std::result::Result<(), String> {
    check_schema(schema)?;
    validate_at(schema, schema, v, "", 0)
}

fn validate_at(
    root: &Value,
    s: &Value,
    v: &Value,
    at: &str,
    depth: usize,
) -> std::result::Result<(), String> {
    if depth > 64 {
        return Err(format!("{at}: schema recursion too deep"));
    }
    let here = if at.is_empty() { "/" } else { at };
    let s = match s {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{here}: not allowed")),
        Value::Object(o) => o,
        _ => return Ok(()),
    };
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    let usz = |k: &str| s.get(k).and_then(Value::as_u64).map(|x| x as usize);
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        validate_at(root, resolve_ref(root, r)?, v, at, depth + 1)?;
    }
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => {
            return Err(format!("{here}: expected {t}, found {}", kind(v)))
        }
        Some(Value::Array(ts)) if !ts.iter().any(|t| t.as_str().is_some_and(|t| type_ok(t, v))) => {
            return Err(format!(
                "{here}: type {} not among {}",
                kind(v),
                Value::Array(ts.clone())
            ))
        }
        _ => {}
    }
    if let Some(Value::Array(e)) = s.get("enum") {
        if !e.iter().any(|x| json_eq(x, v)) {
            return Err(format!("{here}: {v} is not one of {}", Value::Array(e.clone())));
        }
    }
    if let Some(c) = s.get("const") {
        if !json_eq(c, v) {
            return Err(format!("{here}: expected {c}"));
        }
    }
    match v {
        Value::String(st) => {
            let n = st.chars().count();
            if usz("minLength").is_some_and(|m| n < m) || usz("maxLength").is_some_and(|m| n > m) {
                return Err(format!("{here}: string length {n} out of bounds"));
            }
            if let Some(p) = s.get("pattern").and_then(Value::as_str) {
                let re = Regex::new(p).map_err(|e| e.to_string())?;
                if !re.is_match(st) {
                    return Err(format!("{here}: {st:?} does not match {p:?}"));
                }
            }
        }
        Value::Number(_) => {
            let x = v.as_f64().unwrap_or(f64::NAN);
            let bad_num = num("minimum").is_some_and(|m| x < m)
                || num("maximum").is_some_and(|m| x > m)
                || num("exclusiveMinimum").is_some_and(|m| x <= m)
                || num("exclusiveMaximum").is_some_and(|m| x >= m)
                || num("multipleOf").is_some_and(|m| m > 0.0 && ((x / m) - (x / m).round()).abs() > 1e-9);
            if bad_num {
                return Err(format!("{here}: {x} violates a numeric bound"));
            }
        }
        Value::Array(a) => {
            if usz("minItems").is_some_and(|m| a.len() < m) || usz("maxItems").is_some_and(|m| a.len() > m) {
                return Err(format!("{here}: {} items out of bounds", a.len()));
            }
            if s.get("uniqueItems") == Some(&Value::Bool(true)) {
                for i in 0..a.len() {
                    if a[..i].iter().any(|y| json_eq(y, &a[i])) {
                        return Err(format!("{here}: items are not unique"));
                    }
                }
            }
            let prefix = s
                .get("prefixItems")
                .and_then(Value::as_array)
                .map(|p| p.len())
                .unwrap_or(0);
            for (i, x) in a.iter().enumerate() {
                let sub = if i < prefix {
                    s.get("prefixItems").and_then(|p| p.get(i))
                } else {
                    s.get("items")
                };
                if let Some(sub) = sub {
                    validate_at(root, sub, x, &format!("{at}/{i}"), depth + 1)?;
                }
            }
        }
        Value::Object(o) => {
            if let Some(Value::Array(req)) = s.get("required") {
                for k in req.iter().filter_map(Value::as_str) {
                    if !o.contains_key(k) {
                        return Err(format!("{here}: missing required key {k:?}"));
                    }
                }
            }
            if usz("minProperties").is_some_and(|m| o.len() < m)
                || usz("maxProperties").is_some_and(|m| o.len() > m)
            {
                return Err(format!("{here}: {} properties out of bounds", o.len()));
            }
            let props = s.get("properties").and_then(Value::as_object);
            let pats = s.get("patternProperties").and_then(Value::as_object);
            for (k, x) in o {
                let sub_at = format!("{at}/{k}");
                let mut matched = false;
                if let Some(sub) = props.and_then(|p| p.get(k)) {
                    matched = true;
                    validate_at(root, sub, x, &sub_at, depth + 1)?;
                }
                for (p, sub) in pats.into_iter().flatten() {
                    if Regex::new(p).map_err(|e| e.to_string())?.is_match(k) {
                        matched = true;
                        validate_at(root, sub, x, &sub_at, depth + 1)?;
                    }
                }
                if !matched {
                    if let Some(ap) = s.get("additionalProperties") {
                        validate_at(root, ap, x, &sub_at, depth + 1).map_err(|e| {
                            if ap == &Value::Bool(false) {
                                format!("{here}: unexpected key {k:?}")
                            } else {
                                e
                            }
                        })?;
                    }
                }
            }
        }
        _ => {}
    }
    if let Some(Value::Array(all)) = s.get("allOf") {
        for sub in all {
            validate_at(root, sub, v, at, depth + 1)?;
        }
    }
    if let Some(Value::Array(any)) = s.get("anyOf") {
        if !any
            .iter()
            .any(|sub| validate_at(root, sub, v, at, depth + 1).is_ok())
        {
            return Err(format!("{here}: matches none of anyOf"));
        }
    }
    if let Some(Value::Array(one)) = s.get("oneOf") {
        let n = one
            .iter()
            .filter(|sub| validate_at(root, sub, v, at, depth + 1).is_ok())
            .count();
        if n != 1 {
            return Err(format!("{here}: matches {n} of oneOf (need exactly 1)"));
        }
    }
    if let Some(not) = s.get("not") {
        if validate_at(root, not, v, at, depth + 1).is_ok() {
            return Err(format!("{here}: matches a `not` schema"));
        }
    }
    Ok(())
}

/// JSON equality with 1 == 1.0, as JSON Schema requires.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| json_eq(p, q)))
        }
        _ => a == b,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Grader for JsonGrader {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let text = match template::render(&self.input, s) {
            Ok(t) => t,
            Err(e) => return GradeResult::fail(e),
        };
        let doc = match extract_json(&text, &self.tag) {
            Ok(d) => d,
            Err(e) => return GradeResult::fail(e).with("valid_json", 0.0),
        };
        let Some(schema) = &self.schema else {
            return GradeResult::ok(1.0).with("valid_json", 1.0);
        };
        let schema = match template::resolve(schema, s) {
            Ok(Value::String(st)) => match serde_json::from_str::<Value>(&st) {
                Ok(v) => v,
                Err(e) => return GradeResult::fail(format!("schema from the item is not JSON: {e}")),
            },
            Ok(v) => v,
            Err(e) => return GradeResult::fail(e),
        };
        match validate(&schema, &doc) {
            Ok(()) => GradeResult::ok(1.0).with("valid_json", 1.0).with("schema", 1.0),
            Err(e) => {
                let mut r = GradeResult::ok(0.0)
                    .with("valid_json", 1.0)
                    .with("schema", 0.0)
                    .with("violation", e);
                if self.partial {
                    let req: Vec<&str> = schema
                        .get("required")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let have = req.iter().filter(|k| doc.get(**k).is_some()).count();
                    let frac = if req.is_empty() {
                        0.0
                    } else {
                        have as f32 / req.len() as f32
                    };
                    r.score = 0.5 * frac;
                    r = r.with("required_present", frac);
                }
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    #[test]
    fn extraction() {
        let t = tag_regex("answer");
        assert_eq!(extract_json(" {\"a\": 1} ", &t).unwrap(), json!({"a": 1}));
        let fenced = "Here:\n```python\nx = {1}\n```\nand\n```json\n[1, 2]\n```\ndone";
        assert_eq!(extract_json(fenced, &t).unwrap(), json!([1, 2]));
        assert_eq!(
            extract_json("<answer>{\"k\": null}</answer>", &t).unwrap(),
            json!({"k": null})
        );
        assert!(extract_json("{\"a\": 1", &t).is_err());
        assert!(extract_json("```json\n{oops}\n```", &t)
            .unwrap_err()
            .contains("fenced"));
    }

    #[test]
    fn schema_subset() {
        let s = json!({
            "type": "object",
            "required": ["name", "age"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "pattern": "^[A-Z]"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "uniqueItems": true},
                "kind": {"enum": ["a", "b"]}
            },
            "additionalProperties": false,
            "$defs": {"tag": {"type": "string", "maxLength": 3}}
        });
        assert!(validate(&s, &json!({"name": "Al", "age": 3, "tags": ["x", "y"]})).is_ok());
        assert!(validate(&s, &json!({"name": "Al", "age": 3.0})).is_ok());
        let e = |d: Value| validate(&s, &d).unwrap_err();
        assert!(e(json!({"name": "Al"})).contains("age"));
        assert!(e(json!({"name": "al", "age": 1})).contains("/name"));
        assert!(e(json!({"name": "Al", "age": 1.5})).contains("integer"));
        assert!(e(json!({"name": "Al", "age": 1, "x": 0})).contains("unexpected key"));
        assert!(e(json!({"name": "Al", "age": 1, "tags": ["long"]})).contains("/tags/0"));
        assert!(e(json!({"name": "Al", "age": 1, "tags": ["a", "a"]})).contains("unique"));
        assert!(e(json!({"name": "Al", "age": 1, "kind": "c"})).contains("one of"));
        assert!(e(json!([1])).contains("expected object"));
        let one = json!({"oneOf": [{"type": "integer"}, {"type": "number"}]});
        assert!(validate(&one, &json!(1.5)).is_ok());
        assert!(validate(&one, &json!(1)).is_err());
        assert!(validate(&json!({"not": {"type": "null"}}), &json!(null)).is_err());
        assert!(check_schema(&json!({"pattern": "("})).is_err());
        // Self-referencing schema on a deep document does not overflow the stack.
        let rec =
            json!({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"});
        let mut deep = json!([]);
        for _ in 0..200 {
            deep = json!([deep]);
        }
        assert!(validate(&rec, &deep).is_err());
    }

    #[test]
    fn grader() {
        let g = build_from_toml(
            r#"type = "json"
partial_credit = true
schema = { type = "object", required = ["a", "b"], properties = { a = { type = "integer" } } }"#,
        )
        .unwrap();
        let sc = |c: &str| g.grade(&Sample::new("", c, json!({}))).score;
        assert_eq!(sc("{\"a\": 1, \"b\": 2}"), 1.0);
        assert_eq!(sc("```json\n{\"a\": 1, \"b\": 2}\n```"), 1.0);
        assert_eq!(sc("{\"a\": \"x\", \"b\": 2}"), 0.5);
        assert_eq!(sc("{\"b\": 2}"), 0.25);
        assert_eq!(sc("not json"), 0.0);
        let from_item = build_from_toml("type = \"json\"\nschema = \"{{ item.schema }}\"").unwrap();
        let item = json!({"schema": {"type": "array", "maxItems": 1}});
        assert_eq!(from_item.grade(&Sample::new("", "[1]", item.clone())).score, 1.0);
        assert_eq!(from_item.grade(&Sample::new("", "[1, 2]", item)).score, 0.0);
        let plain = build_from_toml("type = \"json\"").unwrap();
        assert_eq!(plain.grade(&Sample::new("", "[1, 2]", json!({}))).score, 1.0);
        assert!(build_from_toml("type = \"json\"\nschema = { pattern = \"(\" }").is_err());
    }
}
