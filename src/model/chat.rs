//! Chat templates: Hugging Face's Jinja chat templates rendered with minijinja the way
//! transformers' `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does.
//!
//! What transformers sets up, and what this module mirrors:
//! - Jinja2 with `trim_blocks=True, lstrip_blocks=True`, loop controls (`break`/`continue`),
//!   and no trailing-newline keeping (Jinja2's default);
//! - globals `raise_exception(msg)` (a template error carrying `msg`) and `strftime_now(fmt)`;
//! - a `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False, indent=None,
//!   separators=None, sort_keys=False)`: no HTML escaping, `", "`/`": "` separators, `indent=`;
//! - context `messages`, `tools` and `documents` (none unless given), `add_generation_prompt`,
//!   the named special tokens (`bos_token`, `eos_token`, ...) and any extra keyword arguments;
//! - messages are normalized first: keys whose value is null are dropped, and reasoning fields
//!   (`reasoning_content` / `thinking` / `reasoning`) are aliased to each other.
//!
//! Python string methods (`.strip()`, `.split()`, `.items()`, ...) come from minijinja-contrib's
//! pycompat, and printed values follow Python's `str()` (`True`, `None`, `['a', 1]`).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State};
use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};

const NAME: &str = "chat_template";
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// Optional inputs of a render beyond `messages` and `add_generation_prompt`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// JSON-schema tool list (`tools=` of `apply_chat_template`); `none` in the template if absent.
    pub tools: Option<&'a Json>,
    /// Documents for RAG templates; `none` in the template if absent.
    pub documents: Option<&'a Json>,
    /// Extra template keyword arguments (`date_string`, `enable_thinking`, ...); they override
    /// the special tokens of the same name, as in transformers.
    pub extra: Option<&'a Map<String, Json>>,
}

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    special_tokens: Vec<(String, String)>,
    fixed_time: Option<i64>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("special_tokens", &self.special_tokens)
            .field("fixed_time", &self.fixed_time)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is an `Error::Template` naming the line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson_filter);
        env.add_template_owned(NAME, source.clone())
            .map_err(template_error)?;
        let mut t = ChatTemplate {
            source,
            env,
            special_tokens: Vec::new(),
            fixed_time: None,
        };
        t.set_fixed_time(None);
        Ok(t)
    }

    /// Sets the named special tokens (`bos_token`, `eos_token`, ...) the template sees.
    pub fn with_special_tokens<K, V>(mut self, tokens: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.special_tokens = tokens.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        self
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens passed to the template as variables.
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special_tokens
    }

    /// Pins what `strftime_now` sees (seconds since the Unix epoch, UTC) for reproducible
    /// renders; `None` (the default) uses the current time. Note: transformers uses local time,
    /// this uses UTC.
    pub fn set_fixed_time(&mut self, unix_secs: Option<i64>) {
        self.fixed_time = unix_secs;
        self.env.add_function("strftime_now", move |fmt: &str| -> Value {
            let secs = unix_secs.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            });
            Value::from(strftime_utc(fmt, secs))
        });
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &RenderOptions::default())
    }

    /// Like [`render`](Self::render) with tools, documents or extra keyword arguments.
    pub fn render_with(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        opts: &RenderOptions<'_>,
    ) -> Result<String> {
        let messages = normalize_messages(messages)?;
        let mut ctx = Map::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        if let Some(extra) = opts.extra {
            for (k, v) in extra {
                ctx.insert(k.clone(), v.clone());
            }
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), opts.tools.cloned().unwrap_or(Json::Null));
        ctx.insert("documents".into(), opts.documents.cloned().unwrap_or(Json::Null));
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_generation_prompt));
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        tmpl.render(Value::from_serialize(&ctx)).map_err(template_error)
    }
}

fn template_error(e: minijinja::Error) -> Error {
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            if let Some(msg) = detail.strip_prefix(RAISED) {
                return Error::Template(msg.to_string());
            }
        }
    }
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        let _ = write!(msg, ": {s}");
        src = s.source();
    }
    Error::Template(msg)
}

const RAISED: &str = "raise_exception: ";

fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    let text = msg
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| msg.to_string());
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{text}"),
    ))
}

/// What transformers does to messages before rendering: every message must be an object; keys
/// whose value is null are dropped; reasoning fields are aliased (`thinking` first, then the
/// original keys, then `reasoning_content`).
fn normalize_messages(messages: &Json) -> Result<Json> {
    let list = messages
        .as_array()
        .ok_or_else(|| Error::Template("messages must be a list of message objects".into()))?;
    if list.is_empty() {
        return Err(Error::Template(
            "cannot apply chat template to an empty conversation; provide at least one message".into(),
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| {
            Error::Template(format!("messages[{i}] must be an object, found {}", json_kind(m)))
        })?;
        let mut msg: Map<String, Json> = obj
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(reasoning) = REASONING_FIELDS.iter().find_map(|k| msg.get(*k).cloned()) {
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), reasoning.clone());
            for (k, v) in msg {
                aliased.insert(k, v);
            }
            // Python `{**m, "reasoning_content": r}`: an existing key keeps its place.
            aliased.insert("reasoning_content".into(), reasoning);
            msg = aliased;
        }
        out.push(Json::Object(msg));
    }
    Ok(Json::Array(out))
}

pub(crate) fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------------
// Printing values like Python's str()

fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s, true)?;
            out.write_str(&s)
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python `str(value)` (top-level) / `repr(value)` (nested).
fn python_repr(value: &Value, out: &mut String, top: bool) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::String if top => out.push_str(value.as_str().unwrap_or_default()),
        ValueKind::String => py_str_repr(value.as_str().unwrap_or_default(), out),
        ValueKind::Number => write_number(value, out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out, false)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out, false)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out, false)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

fn write_number(value: &Value, out: &mut String) {
    if let Some(i) = value.as_i64() {
        if value.is_integer() {
            let _ = write!(out, "{i}");
            return;
        }
    }
    match f64::try_from(value.clone()) {
        Ok(f) if !value.is_integer() => out.push_str(&py_float_repr(f)),
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for 1e-4 <= |x| < 1e16,
/// scientific (`1e+16`, `1.5e-05`) otherwise.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{f:e}"); // e.g. "-1.2345e-7", shortest round-trip digits
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            s.push_str("0.");
            for _ in 0..(-exp - 1) {
                s.push('0');
            }
            s.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                s.push_str(&digits);
                for _ in digits.len()..int_len {
                    s.push('0');
                }
                s.push_str(".0");
            } else {
                s.push_str(&digits[..int_len]);
                s.push('.');
                s.push_str(&digits[int_len..]);
            }
        }
    } else {
        s.push_str(&digits[..1]);
        if digits.len() > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        let _ = write!(s, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    s
}

// ---------------------------------------------------------------------------------------------
// tojson: Python json.dumps

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson_filter(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.kind() {
            ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
            ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap().to_string(), b.as_str().unwrap().to_string())
                }
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    dump_json(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn dump_json(
    value: &Value,
    style: &JsonStyle,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: Object of type Undefined is not JSON serializable",
            ))
        }
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(value, out),
        ValueKind::String => json_str(value.as_str().unwrap_or_default(), style.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(style, level + 1, out);
                dump_json(item, style, level + 1, out)?;
            }
            newline_indent(style, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::Number => {
                        let mut s = String::new();
                        write_number(&key, &mut s);
                        s
                    }
                    _ => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: keys must be str, int, float, bool or None",
                        ))
                    }
                };
                entries.push((k, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline_indent(style, level + 1, out);
                json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                dump_json(v, style, level + 1, out)?;
            }
            newline_indent(style, level, out);
            out.push('}');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: value of kind {} is not JSON serializable", value.kind()),
            ))
        }
    }
    Ok(())
}

fn newline_indent(style: &JsonStyle, level: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
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
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime (C locale, UTC)

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Python's `datetime.strftime` for the common directives, C locale, at `unix_secs` UTC.
/// Unknown directives are copied through unchanged.
pub fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let jan1 = days_from_civil(y, 1, 1);
    let yday = days - jan1 + 1;
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{y}");
            }
            Some('y') => {
                let _ = write!(out, "{:02}", y.rem_euclid(100));
            }
            Some('m') => {
                let _ = write!(out, "{m:02}");
            }
            Some('d') => {
                let _ = write!(out, "{d:02}");
            }
            Some('e') => {
                let _ = write!(out, "{d:>2}");
            }
            Some('H') => {
                let _ = write!(out, "{hh:02}");
            }
            Some('I') => {
                let _ = write!(out, "{:02}", if hh % 12 == 0 { 12 } else { hh % 12 });
            }
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => {
                let _ = write!(out, "{mm:02}");
            }
            Some('S') => {
                let _ = write!(out, "{ss:02}");
            }
            Some('j') => {
                let _ = write!(out, "{yday:03}");
            }
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('w') => {
                let _ = write!(out, "{}", (weekday + 1) % 7);
            }
            Some('F') => {
                let _ = write!(out, "{y}-{m:02}-{d:02}");
            }
            Some('T') => {
                let _ = write!(out, "{hh:02}:{mm:02}:{ss:02}");
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<ChatTemplate>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strftime_matches_python() {
        // 2025-03-07T12:00:00Z is a Friday, day 66.
        let t = 1_741_348_800;
        assert_eq!(strftime_utc("%d %b %Y", t), "07 Mar 2025");
        assert_eq!(
            strftime_utc("%A %B %e %j %H:%M:%S %p %y %%", t),
            "Friday March  7 066 12:00:00 PM 25 %"
        );
        assert_eq!(strftime_utc("%F %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime_utc("%F", 951_782_400), "2000-02-29");
    }

    #[test]
    fn float_repr_like_python() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(2.5), "2.5");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(0.00001), "1e-05");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(123456789012345.6), "123456789012345.6");
        assert_eq!(py_float_repr(-0.1), "-0.1");
        assert_eq!(py_float_repr(1.5e-7), "1.5e-07");
    }

    #[test]
    fn python_printing_and_errors() {
        let t = ChatTemplate::new(
            "{{ add_generation_prompt }} {{ none }} {{ messages[0] }} {{ [1.5, 'it\\'s', true] }} {{ 1.0 }} {{ 1e20 }} {{ 3 }}",
        )
        .unwrap();
        let out = t
            .render(&json!([{"role": "user", "content": "hi", "drop": null}]), true)
            .unwrap();
        assert_eq!(
            out,
            "True None {'role': 'user', 'content': 'hi'} [1.5, \"it's\", True] 1.0 1e+20 3"
        );

        let t = ChatTemplate::new("{{ raise_exception('nope: ' + messages[0].role) }}").unwrap();
        match t.render(&json!([{"role": "x", "content": ""}]), false) {
            Err(Error::Template(m)) => assert_eq!(m, "nope: x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% if %}"), Err(Error::Template(_))));
        let t = ChatTemplate::new("x").unwrap();
        assert!(t.render(&json!([]), false).is_err());
        assert!(t.render(&json!(["str"]), false).is_err());
    }

    #[test]
    fn reasoning_aliases() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}").unwrap();
        let out = t
            .render(
                &json!([{"role": "assistant", "reasoning": "r", "content": "c"}]),
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            r#"{"thinking": "r", "role": "assistant", "reasoning": "r", "content": "c", "reasoning_content": "r"}"#
        );
    }

    #[test]
    fn tojson_options() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson(sort_keys=true, separators=[',', ':']) }}|{{ messages[0] | tojson(ensure_ascii=true) }}|{{ messages[0].x | tojson(indent='\\t') }}",
        )
        .unwrap();
        let out = t
            .render(&json!([{"role": "é🙂", "content": "c", "x": [1]}]), false)
            .unwrap();
        assert_eq!(
            out,
            "{\"content\":\"c\",\"role\":\"é🙂\",\"x\":[1]}|{\"role\": \"\\u00e9\\ud83d\\ude42\", \"content\": \"c\", \"x\": [1]}|[\n\t1\n]"
        );
    }
}
