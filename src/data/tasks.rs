//! Built-in generated tasks and their checkers, and the `[data]` table of the TOML config.
//!
//! - **countdown** (the TinyZero / Predibase experiment): given 3–4 numbers and a target, write
//!   an expression that uses each number exactly once with `+ - * /` and equals the target.
//!   Items are built from a random expression tree over the numbers, so every item is solvable;
//!   the generating expression is kept in the item (`solution`). By default every intermediate
//!   result of that tree is a positive integer (Countdown-game rules: division only when exact,
//!   subtraction only when positive); `rationals = true` allows any non-zero division and
//!   negative intermediates (the target is still an integer). The checker
//!   [`countdown_score`] evaluates the answer with exact rationals, whatever the generator rules.
//! - **arithmetic**: "What is 47 + 38?" with `digits`, `ops` (+ − ×) and `num_terms`; the usual
//!   precedence applies (× before + −); the answer is an exact integer.
//!
//! Prompt formats ([`PromptFormat`]): `chat` (one user message, rendered with the chat
//! template), `text` (the same instruction as raw text) and `plain`, a short form for a tiny
//! model trained from scratch: `"47+38="` → `"85"`, `"3 5 7 -> 24:"` → `"(3+5)*7-32"` style
//! expressions; the completion is the bare answer followed by EOS.
//!
//! Every item's `fields` hold what its checker needs (`task`, `answer_format`, `numbers` and
//! `target`, or `answer`), plus a worked `completion` for SFT; [`score_item`] grades a
//! completion from those fields alone.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value as Json};

use crate::data::dataset::{Dataset, Item, Rng, SftPair, ValSplit};
use crate::data::input::PromptSpec;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Exact rationals and expressions
// ---------------------------------------------------------------------------------------------

/// An exact rational `num / den` in lowest terms, `den > 0`; i128 with overflow checks (an
/// overflow makes the whole evaluation fail, never wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio {
    num: i128,
    den: i128,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Ratio {
    pub fn int(n: i64) -> Ratio {
        Ratio {
            num: n as i128,
            den: 1,
        }
    }

    /// `num / den` reduced; `None` for a zero denominator or an overflow.
    pub fn new(num: i128, den: i128) -> Option<Ratio> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1);
        let g = i128::try_from(g).ok()?;
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg()?;
            den = den.checked_neg()?;
        }
        Some(Ratio { num, den })
    }

    pub fn numer(self) -> i128 {
        self.num
    }

    pub fn denom(self) -> i128 {
        self.den
    }

    /// The value as an integer, if it is one.
    pub fn to_int(self) -> Option<i64> {
        (self.den == 1).then(|| i64::try_from(self.num).ok()).flatten()
    }

    pub fn checked_add(self, o: Ratio) -> Option<Ratio> {
        let n = self
            .num
            .checked_mul(o.den)?
            .checked_add(o.num.checked_mul(self.den)?)?;
        Ratio::new(n, self.den.checked_mul(o.den)?)
    }

    pub fn checked_sub(self, o: Ratio) -> Option<Ratio> {
        self.checked_add(Ratio {
            num: o.num.checked_neg()?,
            den: o.den,
        })
    }

    pub fn checked_mul(self, o: Ratio) -> Option<Ratio> {
        Ratio::new(self.num.checked_mul(o.num)?, self.den.checked_mul(o.den)?)
    }

    /// `None` when dividing by zero.
    pub fn checked_div(self, o: Ratio) -> Option<Ratio> {
        Ratio::new(self.num.checked_mul(o.den)?, self.den.checked_mul(o.num)?)
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{}", self.num, self.den)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    fn prec(self) -> u8 {
        match self {
            Op::Add | Op::Sub => 1,
            Op::Mul | Op::Div => 2,
        }
    }

    fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }

    pub fn apply(self, a: Ratio, b: Ratio) -> Option<Ratio> {
        match self {
            Op::Add => a.checked_add(b),
            Op::Sub => a.checked_sub(b),
            Op::Mul => a.checked_mul(b),
            Op::Div => a.checked_div(b),
        }
    }
}

/// An arithmetic expression over integer literals.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(i64),
    Neg(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
}

/// Longest answer expression the checker parses (characters, after trimming).
pub const MAX_EXPR_CHARS: usize = 1000;
/// Deepest nesting of parentheses and unary minus the checker accepts.
pub const MAX_EXPR_DEPTH: usize = 64;
/// Longest integer literal (digits); longer literals are rejected.
pub const MAX_LITERAL_DIGITS: usize = 18;

impl Expr {
    /// Exact value; `None` on division by zero or overflow.
    pub fn eval(&self) -> Option<Ratio> {
        match self {
            Expr::Num(n) => Some(Ratio::int(*n)),
            Expr::Neg(e) => Ratio::int(0).checked_sub(e.eval()?),
            Expr::Bin(op, a, b) => op.apply(a.eval()?, b.eval()?),
        }
    }

    /// The integer literals, left to right.
    pub fn literals(&self) -> Vec<i64> {
        let mut out = Vec::new();
        fn walk(e: &Expr, out: &mut Vec<i64>) {
            match e {
                Expr::Num(n) => out.push(*n),
                Expr::Neg(x) => walk(x, out),
                Expr::Bin(_, a, b) => {
                    walk(a, out);
                    walk(b, out)
                }
            }
        }
        walk(self, &mut out);
        out
    }

    fn prec(&self) -> u8 {
        match self {
            Expr::Bin(op, ..) => op.prec(),
            Expr::Neg(_) => 3,
            Expr::Num(_) => 4,
        }
    }

    /// ASCII rendering with the fewest parentheses; `spaced` puts spaces around operators.
    pub fn render(&self, spaced: bool) -> String {
        let mut s = String::new();
        self.render_into(&mut s, spaced);
        s
    }

    fn render_into(&self, s: &mut String, spaced: bool) {
        let paren = |e: &Expr, yes: bool, s: &mut String| {
            if yes {
                s.push('(');
                e.render_into(s, spaced);
                s.push(')');
            } else {
                e.render_into(s, spaced);
            }
        };
        match self {
            Expr::Num(n) => s.push_str(&n.to_string()),
            Expr::Neg(e) => {
                s.push('-');
                paren(e, e.prec() < 3, s);
            }
            Expr::Bin(op, a, b) => {
                paren(a, a.prec() < op.prec(), s);
                if spaced {
                    s.push(' ');
                    s.push(op.symbol());
                    s.push(' ');
                } else {
                    s.push(op.symbol());
                }
                let right =
                    b.prec() < op.prec() || (b.prec() == op.prec() && matches!(op, Op::Sub | Op::Div));
                paren(b, right, s);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tok {
    Num(i64),
    Op(Op),
    Open,
    Close,
}

fn tokenize(s: &str) -> std::result::Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let t = match c {
            c if c.is_whitespace() => continue,
            '0'..='9' => {
                let mut end = i + 1;
                while let Some(&(j, d)) = chars.peek() {
                    if !d.is_ascii_digit() {
                        break;
                    }
                    end = j + 1;
                    chars.next();
                }
                let digits = &s[i..end];
                if digits.len() > MAX_LITERAL_DIGITS {
                    return Err(format!("number with {} digits is too long", digits.len()));
                }
                Tok::Num(digits.parse().map_err(|_| format!("bad number {digits:?}"))?)
            }
            '+' => Tok::Op(Op::Add),
            '-' | '\u{2212}' => Tok::Op(Op::Sub),
            '*' | '\u{d7}' | 'x' | 'X' => Tok::Op(Op::Mul),
            '/' | '\u{f7}' => Tok::Op(Op::Div),
            '(' => Tok::Open,
            ')' => Tok::Close,
            other => return Err(format!("unexpected character {other:?}")),
        };
        out.push(t);
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<Tok> {
        self.toks.get(self.pos).copied()
    }

    fn expr(&mut self) -> std::result::Result<Expr, String> {
        let mut e = self.term()?;
        while let Some(Tok::Op(op @ (Op::Add | Op::Sub))) = self.peek() {
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.term()?));
        }
        Ok(e)
    }

    fn term(&mut self) -> std::result::Result<Expr, String> {
        let mut e = self.unary()?;
        while let Some(Tok::Op(op @ (Op::Mul | Op::Div))) = self.peek() {
            self.pos += 1;
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn nest(&mut self) -> std::result::Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return Err(format!("nested deeper than {MAX_EXPR_DEPTH}"));
        }
        Ok(())
    }

    fn unary(&mut self) -> std::result::Result<Expr, String> {
        match self.peek() {
            Some(Tok::Op(Op::Sub)) => {
                self.pos += 1;
                self.nest()?;
                let e = Expr::Neg(Box::new(self.unary()?));
                self.depth -= 1;
                Ok(e)
            }
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(Expr::Num(n))
            }
            Some(Tok::Open) => {
                self.pos += 1;
                self.nest()?;
                let e = self.expr()?;
                if self.peek() != Some(Tok::Close) {
                    return Err("unbalanced parentheses".into());
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(e)
            }
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("unexpected end of expression".into()),
        }
    }
}

/// Parses an arithmetic expression: non-negative integer literals, `+`, `-` (also `−`, and
/// unary minus), `*` (also `×`, `x`, `X`), `/` (also `÷`), parentheses and whitespace; anything
/// else (`^`, `**`, `=`, decimals, letters) is an error, as are inputs over
/// [`MAX_EXPR_CHARS`] characters, literals over [`MAX_LITERAL_DIGITS`] digits and nesting over
/// [`MAX_EXPR_DEPTH`].
pub fn parse_expression(s: &str) -> std::result::Result<Expr, String> {
    let s = s.trim();
    if s.chars().count() > MAX_EXPR_CHARS {
        return Err(format!("expression longer than {MAX_EXPR_CHARS} characters"));
    }
    let mut p = Parser {
        toks: tokenize(s)?,
        pos: 0,
        depth: 0,
    };
    let e = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(format!("unexpected {:?} after the expression", p.toks[p.pos]));
    }
    Ok(e)
}

// ---------------------------------------------------------------------------------------------
// Answer extraction and checkers
// ---------------------------------------------------------------------------------------------

/// Where the answer is in a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerFormat {
    /// The content of the last complete `<answer>…</answer>` pair.
    Tags,
    /// The last integer in the text (arithmetic only; countdown treats it as `Tags`).
    LastNumber,
    /// The text before the first newline or `<` (where a decoded EOS such as `</s>` or
    /// `<|endoftext|>` would start), trimmed: the tiny model's format.
    Plain,
}

impl AnswerFormat {
    fn name(self) -> &'static str {
        match self {
            AnswerFormat::Tags => "tags",
            AnswerFormat::LastNumber => "last_number",
            AnswerFormat::Plain => "plain",
        }
    }
}

/// The content of the last complete `<answer>…</answer>` pair (like a non-greedy regex's last
/// match), untrimmed.
pub fn last_answer_tag(text: &str) -> Option<&str> {
    const OPEN: &str = "<answer>";
    const CLOSE: &str = "</answer>";
    let mut found = None;
    let mut from = 0;
    while let Some(o) = text[from..].find(OPEN) {
        let start = from + o + OPEN.len();
        let Some(c) = text[start..].find(CLOSE) else { break };
        found = Some(&text[start..start + c]);
        from = start + c + CLOSE.len();
    }
    found
}

fn plain_answer(text: &str) -> &str {
    let end = text.find(['\n', '<']).unwrap_or(text.len());
    text[..end].trim()
}

fn last_integer(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 && b[start - 1].is_ascii_digit() {
        start -= 1;
    }
    // A minus sign directly before the digits, not itself after a digit or letter ("5-3").
    if start > 0 && b[start - 1] == b'-' && (start < 2 || !b[start - 2].is_ascii_alphanumeric()) {
        start -= 1;
    }
    Some(&text[start..end])
}

/// The answer text of a completion in the given format, if there is one.
pub fn extract_answer(completion: &str, format: AnswerFormat) -> Option<&str> {
    match format {
        AnswerFormat::Tags => last_answer_tag(completion),
        AnswerFormat::LastNumber => last_integer(completion),
        AnswerFormat::Plain => Some(plain_answer(completion)).filter(|s| !s.is_empty()),
    }
}

/// Countdown checker with `<answer>` tags and no format credit: 1.0 if the last answer tag
/// holds an expression that uses exactly the given numbers (as a multiset) and evaluates
/// exactly to `target`, else 0.0.
pub fn countdown_score(completion: &str, numbers: &[i64], target: i64) -> f32 {
    countdown_score_with(completion, numbers, target, AnswerFormat::Tags, 0.0)
}

/// [`countdown_score`] for any answer format, with `format_credit` (default 0 in configs)
/// given when an answer is present (tags found / non-empty plain line) but wrong.
pub fn countdown_score_with(
    completion: &str,
    numbers: &[i64],
    target: i64,
    format: AnswerFormat,
    format_credit: f32,
) -> f32 {
    let format = if format == AnswerFormat::LastNumber {
        AnswerFormat::Tags
    } else {
        format
    };
    let Some(answer) = extract_answer(completion, format) else {
        return 0.0;
    };
    if countdown_correct(answer, numbers, target) {
        1.0
    } else {
        format_credit
    }
}

/// Whether `answer` is an expression over exactly `numbers` equal to `target`.
pub fn countdown_correct(answer: &str, numbers: &[i64], target: i64) -> bool {
    let Ok(e) = parse_expression(answer) else {
        return false;
    };
    let mut used = e.literals();
    let mut given = numbers.to_vec();
    used.sort_unstable();
    given.sort_unstable();
    used == given && e.eval() == Some(Ratio::int(target))
}

/// Arithmetic checker: 1.0 if the answer (per `format`) is exactly `answer`, else 0.0. Tags:
/// the tag's trimmed content parsed as an integer (`+85`/`085` accepted, `85.0` not); last
/// number: the last integer in the text; plain: the text before the newline/EOS must be
/// exactly `answer.to_string()`.
pub fn arithmetic_score(completion: &str, answer: i64, format: AnswerFormat) -> f32 {
    let ok = match extract_answer(completion, format) {
        None => false,
        Some(a) if format == AnswerFormat::Plain => a == answer.to_string(),
        Some(a) => a.trim().parse::<i64>() == Ok(answer),
    };
    if ok {
        1.0
    } else {
        0.0
    }
}

fn field<'a>(fields: &'a Json, key: &str) -> Result<&'a Json> {
    fields
        .get(key)
        .ok_or_else(|| Error::invalid(format!("item has no \"{key}\" field")))
}

fn int_field(v: &Json, key: &str) -> Result<i64> {
    v.as_i64()
        .ok_or_else(|| Error::invalid(format!("item field \"{key}\" must be an integer, found {v}")))
}

/// Grades a completion of a built-in task item from its fields (`task`, `answer_format`,
/// `numbers`/`target`/`format_credit` or `answer`).
pub fn score_item(fields: &Json, completion: &str) -> Result<f32> {
    let task = field(fields, "task")?;
    let format = match fields.get("answer_format") {
        None => AnswerFormat::Tags,
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            Error::invalid(format!(
                "item field \"answer_format\" must be \"tags\", \"last_number\" or \"plain\", found {v}"
            ))
        })?,
    };
    match task.as_str() {
        Some("countdown") => {
            let numbers = field(fields, "numbers")?
                .as_array()
                .ok_or_else(|| Error::invalid("item field \"numbers\" must be an array of integers"))?
                .iter()
                .map(|v| int_field(v, "numbers"))
                .collect::<Result<Vec<_>>>()?;
            let target = int_field(field(fields, "target")?, "target")?;
            let credit = fields.get("format_credit").and_then(Json::as_f64).unwrap_or(0.0) as f32;
            Ok(countdown_score_with(completion, &numbers, target, format, credit))
        }
        Some("arithmetic") => {
            let answer = int_field(field(fields, "answer")?, "answer")?;
            Ok(arithmetic_score(completion, answer, format))
        }
        _ => Err(Error::invalid(format!(
            "item field \"task\" must be \"countdown\" or \"arithmetic\", found {task}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Task options
// ---------------------------------------------------------------------------------------------

/// How a generated prompt is presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// One user message with the instruction (needs a chat template).
    #[default]
    Chat,
    /// The same instruction as raw text.
    Text,
    /// A short plain form for a tiny model: `"47+38="` → `"85"`.
    Plain,
}

/// Where a `chat`/`text` arithmetic answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerStyle {
    /// `<answer>85</answer>`.
    #[default]
    Tags,
    /// The last number in the reply.
    LastNumber,
}

/// An inclusive integer range, written `n` or `[min, max]` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntRange {
    pub min: i64,
    pub max: i64,
}

impl IntRange {
    pub const fn new(min: i64, max: i64) -> IntRange {
        IntRange { min, max }
    }

    fn check(&self, key: &str, lo: i64, hi: i64) -> std::result::Result<(), String> {
        if self.min > self.max || self.min < lo || self.max > hi {
            return Err(format!(
                "data.{key} must be a range within [{lo}, {hi}] with min <= max, got {self}"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for IntRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.min, self.max)
    }
}

impl Serialize for IntRange {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        [self.min, self.max].serialize(s)
    }
}

impl<'de> Deserialize<'de> for IntRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = IntRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a [min, max] pair of integers")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<IntRange, E> {
                Ok(IntRange::new(v, v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<IntRange, E> {
                let v = i64::try_from(v).map_err(|_| E::custom("integer too large"))?;
                Ok(IntRange::new(v, v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<IntRange, A::Error> {
                use serde::de::Error as _;
                let min: i64 = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let max: i64 = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                if a.next_element::<i64>()?.is_some() {
                    return Err(A::Error::invalid_length(3, &self));
                }
                Ok(IntRange::new(min, max))
            }
        }
        d.deserialize_any(V)
    }
}

/// An arithmetic operator of the `arithmetic` task: `"+"`, `"-"`, `"*"` (also `"x"`, `"×"`,
/// `"−"`, `"add"`, `"sub"`, `"mul"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
}

impl ArithOp {
    fn op(self) -> Op {
        match self {
            ArithOp::Add => Op::Add,
            ArithOp::Sub => Op::Sub,
            ArithOp::Mul => Op::Mul,
        }
    }
}

impl Serialize for ArithOp {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.op().symbol().to_string())
    }
}

impl<'de> Deserialize<'de> for ArithOp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "+" | "add" => Ok(ArithOp::Add),
            "-" | "\u{2212}" | "sub" => Ok(ArithOp::Sub),
            "*" | "x" | "\u{d7}" | "mul" => Ok(ArithOp::Mul),
            _ => Err(serde::de::Error::custom(format!(
                "unknown op {s:?}: expected \"+\", \"-\" or \"*\""
            ))),
        }
    }
}

/// Options of the countdown task.
#[derive(Debug, Clone, PartialEq)]
pub struct CountdownConfig {
    /// How many numbers per item (2..=6). Default [3, 4].
    pub count: IntRange,
    /// Range of each number (1..=10^6). Default [1, 99].
    pub number_range: IntRange,
    /// Range of the target (integers, |t| <= 10^9). Default [1, 100].
    pub target_range: IntRange,
    /// Allow non-integer and negative intermediates in the generating expression. Default false.
    pub rationals: bool,
    pub format: PromptFormat,
    /// Reward for a present but wrong answer. Default 0.
    pub format_credit: f32,
}

impl Default for CountdownConfig {
    fn default() -> Self {
        CountdownConfig {
            count: IntRange::new(3, 4),
            number_range: IntRange::new(1, 99),
            target_range: IntRange::new(1, 100),
            rationals: false,
            format: PromptFormat::Chat,
            format_credit: 0.0,
        }
    }
}

/// Options of the arithmetic task.
#[derive(Debug, Clone, PartialEq)]
pub struct ArithmeticConfig {
    /// Digits per operand (1..=15; 1 digit means 0..=9). Default 2.
    pub digits: IntRange,
    /// Operators drawn uniformly between terms. Default `["+"]`.
    pub ops: Vec<ArithOp>,
    /// Terms per question (2..=10). Default 2.
    pub num_terms: IntRange,
    pub format: PromptFormat,
    /// Where a chat/text answer goes (plain format: the bare number). Default tags.
    pub answer: AnswerStyle,
}

impl Default for ArithmeticConfig {
    fn default() -> Self {
        ArithmeticConfig {
            digits: IntRange::new(2, 2),
            ops: vec![ArithOp::Add],
            num_terms: IntRange::new(2, 2),
            format: PromptFormat::Chat,
            answer: AnswerStyle::Tags,
        }
    }
}

impl CountdownConfig {
    pub fn validate(&self) -> Result<()> {
        let v = || -> std::result::Result<(), String> {
            self.count.check("count", 2, 6)?;
            self.number_range.check("number_range", 1, 1_000_000)?;
            self.target_range
                .check("target_range", -1_000_000_000, 1_000_000_000)?;
            let c = self.format_credit;
            if !(0.0..=1.0).contains(&c) {
                return Err(format!("data.format_credit must be in [0, 1], got {c}"));
            }
            Ok(())
        };
        v().map_err(Error::Invalid)
    }
}

impl ArithmeticConfig {
    pub fn validate(&self) -> Result<()> {
        let v = || -> std::result::Result<(), String> {
            self.digits.check("digits", 1, 15)?;
            self.num_terms.check("num_terms", 2, 10)?;
            if self.ops.is_empty() {
                return Err("data.ops must list at least one of \"+\", \"-\", \"*\"".into());
            }
            if self.ops.contains(&ArithOp::Mul) && self.digits.max * self.num_terms.max > 18 {
                return Err(format!(
                    "data.digits × data.num_terms must be at most 18 with \"*\" (answers must fit \
                     in 64 bits), got {} × {}",
                    self.digits.max, self.num_terms.max
                ));
            }
            Ok(())
        };
        v().map_err(Error::Invalid)
    }

    fn answer_format(&self) -> AnswerFormat {
        match (self.format, self.answer) {
            (PromptFormat::Plain, _) => AnswerFormat::Plain,
            (_, AnswerStyle::Tags) => AnswerFormat::Tags,
            (_, AnswerStyle::LastNumber) => AnswerFormat::LastNumber,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------------

/// Which stream of a task an item comes from: train and validation items are drawn from
/// independent seeded streams, and validation items that repeat a training problem are skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Val,
}

/// A built-in generated task. Items are a deterministic function of (seed, split, index): the
/// stream is infinite and random-access; datasets take its first N items.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    Countdown(CountdownConfig),
    Arithmetic(ArithmeticConfig),
}

const COUNTDOWN_TRIES: usize = 10_000;

fn prompt_for(format: PromptFormat, text: String) -> PromptSpec {
    match format {
        PromptFormat::Chat => PromptSpec::Messages(json!([{"role": "user", "content": text}])),
        PromptFormat::Text | PromptFormat::Plain => PromptSpec::Text(text),
    }
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::Countdown(_) => "countdown",
            Task::Arithmetic(_) => "arithmetic",
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Task::Countdown(c) => c.validate(),
            Task::Arithmetic(c) => c.validate(),
        }
    }

    /// Item `index` of the given split's stream.
    pub fn item(&self, seed: u64, split: Split, index: u64) -> Result<Item> {
        let stream = match split {
            Split::Train => 0x7472_6169_6e00,
            Split::Val => 0x7661_6c00,
        };
        let mut rng = Rng::new(seed, stream, index);
        match self {
            Task::Countdown(c) => countdown_item(c, &mut rng),
            Task::Arithmetic(c) => Ok(arithmetic_item(c, &mut rng)),
        }
    }

    /// The first `num_train` training items, and `num_val` validation items whose problems
    /// (countdown: numbers as a multiset and target; arithmetic: the question) appear neither
    /// in the training set nor twice in the validation set.
    pub fn generate(&self, seed: u64, num_train: usize, num_val: usize) -> Result<(Dataset, Dataset)> {
        self.validate()?;
        let train = (0..num_train as u64)
            .map(|i| self.item(seed, Split::Train, i))
            .collect::<Result<Vec<_>>>()?;
        let mut seen: HashSet<String> = train.iter().map(problem_key).collect();
        let mut val = Vec::with_capacity(num_val);
        let max_tries = 50 * num_val as u64 + 1000;
        let mut i = 0;
        while val.len() < num_val {
            if i == max_tries {
                return Err(Error::invalid(format!(
                    "data.num_val: found only {} validation problems distinct from the {} training \
                     items in {max_tries} draws; widen the task's ranges or lower num_val/num_train",
                    val.len(),
                    train.len()
                )));
            }
            let it = self.item(seed, Split::Val, i)?;
            i += 1;
            if seen.insert(problem_key(&it)) {
                val.push(it);
            }
        }
        Ok((Dataset::new(train), Dataset::new(val)))
    }

    /// `n` correct worked (prompt, completion) pairs: the first `n` training items.
    pub fn sft_pairs(&self, seed: u64, n: usize) -> Result<Vec<SftPair>> {
        self.generate(seed, n, 0)?.0.sft_pairs(None)
    }
}

/// The identity of an item's problem, for train/val disjointness.
fn problem_key(it: &Item) -> String {
    let f = &it.fields;
    match f.get("task").and_then(Json::as_str) {
        Some("countdown") => {
            let mut nums: Vec<i64> = f["numbers"]
                .as_array()
                .map(|a| a.iter().filter_map(Json::as_i64).collect())
                .unwrap_or_default();
            nums.sort_unstable();
            format!("countdown {nums:?} {}", f["target"])
        }
        Some("arithmetic") => format!("arithmetic {}", f["question"]),
        _ => it.to_jsonl(),
    }
}

/// One random expression tree over `nums` (all of them), or `None` when no allowed operation
/// applies at some step. Without `rationals` every intermediate is a positive integer.
fn random_tree(nums: &[i64], rationals: bool, rng: &mut Rng) -> Option<(Expr, Ratio)> {
    let mut pool: Vec<(Expr, Ratio)> = nums.iter().map(|&n| (Expr::Num(n), Ratio::int(n))).collect();
    while pool.len() > 1 {
        let i = rng.below(pool.len() as u64) as usize;
        let a = pool.swap_remove(i);
        let j = rng.below(pool.len() as u64) as usize;
        let b = pool.swap_remove(j);
        let allowed: Vec<(Op, Ratio)> = [Op::Add, Op::Sub, Op::Mul, Op::Div]
            .into_iter()
            .filter_map(|op| {
                let v = op.apply(a.1, b.1)?;
                (rationals || (v.denom() == 1 && v.numer() > 0)).then_some((op, v))
            })
            .collect();
        if allowed.is_empty() {
            return None;
        }
        let (op, v) = allowed[rng.below(allowed.len() as u64) as usize];
        pool.push((Expr::Bin(op, Box::new(a.0), Box::new(b.0)), v));
    }
    pool.pop()
}

/// The worked steps of a tree, one `a op b = c` line per operation, innermost first.
fn steps(e: &Expr, out: &mut Vec<String>) -> Option<Ratio> {
    match e {
        Expr::Num(n) => Some(Ratio::int(*n)),
        Expr::Neg(x) => Ratio::int(0).checked_sub(steps(x, out)?),
        Expr::Bin(op, a, b) => {
            let (x, y) = (steps(a, out)?, steps(b, out)?);
            let v = op.apply(x, y)?;
            out.push(format!("{x} {} {y} = {v}", op.symbol()));
            Some(v)
        }
    }
}

fn countdown_item(c: &CountdownConfig, rng: &mut Rng) -> Result<Item> {
    let t = c.target_range;
    for _ in 0..COUNTDOWN_TRIES {
        let n = rng.range(c.count.min, c.count.max) as usize;
        let mut nums: Vec<i64> = (0..n)
            .map(|_| rng.range(c.number_range.min, c.number_range.max))
            .collect();
        let Some((expr, value)) = random_tree(&nums, c.rationals, rng) else {
            continue;
        };
        let Some(target) = value.to_int().filter(|v| (t.min..=t.max).contains(v)) else {
            continue;
        };
        rng.shuffle(&mut nums);
        return Ok(countdown_row(c, &nums, target, &expr));
    }
    Err(Error::invalid(format!(
        "data.target_range {t}: no countdown problem with a target in range found in \
         {COUNTDOWN_TRIES} tries (numbers {}, count {}); widen the ranges",
        c.number_range, c.count
    )))
}

fn countdown_row(c: &CountdownConfig, nums: &[i64], target: i64, expr: &Expr) -> Item {
    let list: Vec<String> = nums.iter().map(i64::to_string).collect();
    let (text, answer_format, completion) = match c.format {
        PromptFormat::Plain => (
            format!("{} -> {target}:", list.join(" ")),
            AnswerFormat::Plain,
            expr.render(false),
        ),
        PromptFormat::Chat | PromptFormat::Text => {
            let text = format!(
                "Using the numbers [{}], create an equation that equals {target}. You can use basic \
                 arithmetic operations (+, -, *, /) and each number must be used exactly once. Show \
                 your work in <think> </think> tags, then give the final equation in <answer> \
                 </answer> tags, for example <answer>(1 + 2) / 3</answer>.",
                list.join(", ")
            );
            let mut work = Vec::new();
            steps(expr, &mut work);
            let completion = format!(
                "<think>\n{}\n</think>\n<answer>{}</answer>",
                work.join("\n"),
                expr.render(true)
            );
            (text, AnswerFormat::Tags, completion)
        }
    };
    let mut f = Map::new();
    f.insert("task".into(), json!("countdown"));
    f.insert("numbers".into(), json!(nums));
    f.insert("target".into(), json!(target));
    f.insert("answer_format".into(), json!(answer_format.name()));
    if c.format_credit > 0.0 {
        f.insert("format_credit".into(), json!(c.format_credit));
    }
    f.insert("solution".into(), json!(expr.render(true)));
    f.insert("completion".into(), json!(completion));
    Item::new(prompt_for(c.format, text), f)
}

fn arithmetic_item(c: &ArithmeticConfig, rng: &mut Rng) -> Item {
    let n = rng.range(c.num_terms.min, c.num_terms.max) as usize;
    let operand = |rng: &mut Rng| {
        let d = rng.range(c.digits.min, c.digits.max) as u32;
        let lo = if d == 1 { 0 } else { 10i64.pow(d - 1) };
        rng.range(lo, 10i64.pow(d) - 1)
    };
    let mut expr = Expr::Num(operand(rng));
    let mut terms = vec![expr.clone()];
    let mut ops = Vec::new();
    for _ in 1..n {
        ops.push(c.ops[rng.below(c.ops.len() as u64) as usize].op());
        terms.push(Expr::Num(operand(rng)));
    }
    // Build with the usual precedence: fold × runs first, then + and − left to right.
    let mut sums: Vec<(Op, Expr)> = Vec::new();
    let mut cur = terms[0].clone();
    for (op, t) in ops.iter().zip(terms.into_iter().skip(1)) {
        if *op == Op::Mul {
            cur = Expr::Bin(Op::Mul, Box::new(cur), Box::new(t));
        } else {
            sums.push((*op, std::mem::replace(&mut cur, t)));
        }
    }
    sums.push((Op::Add, cur));
    let mut it = sums.into_iter();
    let (mut pending, first) = it.next().expect("at least one term");
    expr = first;
    for (next_op, t) in it {
        expr = Expr::Bin(pending, Box::new(expr), Box::new(t));
        pending = next_op;
    }
    let answer = expr
        .eval()
        .and_then(Ratio::to_int)
        .expect("validated sizes keep answers within i64");
    let question = expr.render(true);
    let answer_format = c.answer_format();
    let (text, completion) = match answer_format {
        AnswerFormat::Plain => (format!("{}=", expr.render(false)), answer.to_string()),
        AnswerFormat::Tags => (
            format!(
                "What is {question}? Give the final answer as a number in <answer> </answer> tags, \
                 for example <answer>42</answer>."
            ),
            format!("{question} = {answer}\n<answer>{answer}</answer>"),
        ),
        AnswerFormat::LastNumber => (
            format!("What is {question}? End your reply with the final answer as a number."),
            format!("{question} = {answer}"),
        ),
    };
    let mut f = Map::new();
    f.insert("task".into(), json!("arithmetic"));
    f.insert("question".into(), json!(question));
    f.insert("answer".into(), json!(answer));
    f.insert("answer_format".into(), json!(answer_format.name()));
    f.insert("completion".into(), json!(completion));
    Item::new(prompt_for(c.format, text), f)
}

// ---------------------------------------------------------------------------------------------
// The [data] table
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Countdown,
    Arithmetic,
}

/// The `[data]` table. Either a built-in task or a JSONL file:
///
/// ```toml
/// [data]
/// task = "countdown"        # or "arithmetic"
/// seed = 0
/// num_train = 1000          # default 1000
/// num_val = 100             # default 100
/// format = "chat"           # "chat" | "text" | "plain"
/// # countdown: count = [3, 4], number_range = [1, 99], target_range = [1, 100],
/// #            rationals = false, format_credit = 0.0
/// # arithmetic: digits = 2 (or [1, 3]), ops = ["+"] (any of "+", "-", "*"), num_terms = 2,
/// #             answer = "tags" | "last_number"
///
/// [data]
/// path = "train.jsonl"      # relative to the config file
/// val_path = "val.jsonl"    # or val_fraction = 0.1, or val_size = 20 (seeded by `seed`)
/// num_train = 100           # optional: keep only the first N training rows
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    pub task: Option<TaskKind>,
    pub path: Option<PathBuf>,
    pub val_path: Option<PathBuf>,
    pub val_fraction: Option<f64>,
    pub val_size: Option<usize>,
    pub num_train: Option<usize>,
    pub num_val: Option<usize>,
    pub seed: u64,
    pub format: Option<PromptFormat>,
    // countdown
    pub count: Option<IntRange>,
    pub number_range: Option<IntRange>,
    pub target_range: Option<IntRange>,
    pub rationals: Option<bool>,
    pub format_credit: Option<f32>,
    // arithmetic
    pub digits: Option<IntRange>,
    pub ops: Option<Vec<ArithOp>>,
    pub num_terms: Option<IntRange>,
    pub answer: Option<AnswerStyle>,
}

/// Training and validation data (validation may be empty), and the task that made them.
#[derive(Debug, Clone)]
pub struct DataSplits {
    pub train: Dataset,
    pub val: Dataset,
    pub task: Option<Task>,
}

const DEFAULT_NUM_TRAIN: usize = 1000;
const DEFAULT_NUM_VAL: usize = 100;

impl TaskConfig {
    fn set_keys(&self, keys: &[(&'static str, bool)]) -> Vec<&'static str> {
        keys.iter().filter(|(_, set)| *set).map(|(k, _)| *k).collect()
    }

    fn reject(&self, keys: &[(&'static str, bool)], why: &str) -> Result<()> {
        match self.set_keys(keys).first() {
            Some(k) => Err(Error::invalid(format!("data.{k} {why}"))),
            None => Ok(()),
        }
    }

    fn countdown_keys(&self) -> [(&'static str, bool); 5] {
        [
            ("count", self.count.is_some()),
            ("number_range", self.number_range.is_some()),
            ("target_range", self.target_range.is_some()),
            ("rationals", self.rationals.is_some()),
            ("format_credit", self.format_credit.is_some()),
        ]
    }

    fn arithmetic_keys(&self) -> [(&'static str, bool); 4] {
        [
            ("digits", self.digits.is_some()),
            ("ops", self.ops.is_some()),
            ("num_terms", self.num_terms.is_some()),
            ("answer", self.answer.is_some()),
        ]
    }

    /// The configured built-in task (validated), or `None` for a JSONL file. Errors name the key.
    pub fn task(&self) -> Result<Option<Task>> {
        match (self.task, &self.path) {
            (None, None) => {
                return Err(Error::invalid(
                    "data: set `task` (\"countdown\" or \"arithmetic\") or `path` (a JSONL file)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "data.path: give either `task` or `path`, not both",
                ))
            }
            (None, Some(_)) => {
                let mut task_keys: Vec<(&'static str, bool)> = vec![
                    ("num_val", self.num_val.is_some()),
                    ("format", self.format.is_some()),
                ];
                task_keys.extend(self.countdown_keys());
                task_keys.extend(self.arithmetic_keys());
                self.reject(&task_keys, "applies to built-in tasks, not to `path` datasets")?;
                let split = self.set_keys(&[
                    ("val_path", self.val_path.is_some()),
                    ("val_fraction", self.val_fraction.is_some()),
                    ("val_size", self.val_size.is_some()),
                ]);
                if split.len() > 1 {
                    return Err(Error::invalid(format!(
                        "data.{}: give at most one of val_path, val_fraction, val_size",
                        split[1]
                    )));
                }
                return Ok(None);
            }
            (Some(_), None) => {}
        }
        self.reject(
            &[
                ("val_path", self.val_path.is_some()),
                ("val_fraction", self.val_fraction.is_some()),
                ("val_size", self.val_size.is_some()),
            ],
            "applies to `path` datasets; generated tasks use num_val",
        )?;
        let format = self.format.unwrap_or_default();
        let task = match self.task {
            Some(TaskKind::Countdown) => {
                self.reject(
                    &self.arithmetic_keys(),
                    "applies to task = \"arithmetic\", not \"countdown\"",
                )?;
                let d = CountdownConfig::default();
                Task::Countdown(CountdownConfig {
                    count: self.count.unwrap_or(d.count),
                    number_range: self.number_range.unwrap_or(d.number_range),
                    target_range: self.target_range.unwrap_or(d.target_range),
                    rationals: self.rationals.unwrap_or(d.rationals),
                    format,
                    format_credit: self.format_credit.unwrap_or(d.format_credit),
                })
            }
            _ => {
                self.reject(
                    &self.countdown_keys(),
                    "applies to task = \"countdown\", not \"arithmetic\"",
                )?;
                if format == PromptFormat::Plain && self.answer.is_some() {
                    return Err(Error::invalid(
                        "data.answer does not apply to format = \"plain\" (the answer is the bare number)",
                    ));
                }
                let d = ArithmeticConfig::default();
                Task::Arithmetic(ArithmeticConfig {
                    digits: self.digits.unwrap_or(d.digits),
                    ops: self.ops.clone().unwrap_or(d.ops),
                    num_terms: self.num_terms.unwrap_or(d.num_terms),
                    format,
                    answer: self.answer.unwrap_or(d.answer),
                })
            }
        };
        task.validate()?;
        Ok(Some(task))
    }

    /// Builds the datasets. Relative paths are resolved against `base_dir` (the config file's
    /// directory).
    pub fn load(&self, base_dir: &Path) -> Result<DataSplits> {
        if let Some(task) = self.task()? {
            let n_train = self.num_train.unwrap_or(DEFAULT_NUM_TRAIN);
            if n_train == 0 {
                return Err(Error::invalid("data.num_train must be at least 1"));
            }
            let (train, val) = task.generate(self.seed, n_train, self.num_val.unwrap_or(DEFAULT_NUM_VAL))?;
            return Ok(DataSplits {
                train,
                val,
                task: Some(task),
            });
        }
        let path = base_dir.join(self.path.as_ref().expect("checked by task()"));
        let data = Dataset::read_jsonl(&path)?;
        let (mut train, val) = if let Some(v) = &self.val_path {
            (data, Dataset::read_jsonl(base_dir.join(v))?)
        } else if let Some(how) = self
            .val_fraction
            .map(ValSplit::Fraction)
            .or(self.val_size.map(ValSplit::Size))
        {
            data.split(how, self.seed)
                .map_err(|e| Error::invalid(format!("{e} (data.path = {})", path.display())))?
        } else {
            (data, Dataset::default())
        };
        if let Some(n) = self.num_train {
            if n == 0 || n > train.len() {
                return Err(Error::invalid(format!(
                    "data.num_train = {n}: the training set of {} has {} rows",
                    path.display(),
                    train.len()
                )));
            }
            train.items.truncate(n);
        }
        Ok(DataSplits {
            train,
            val,
            task: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cd() -> Task {
        Task::Countdown(CountdownConfig::default())
    }

    #[test]
    fn ratio_arithmetic_is_exact() {
        let r = |a, b| Ratio::new(a, b).unwrap();
        assert_eq!(r(6, -4), r(-3, 2));
        assert_eq!(r(1, 3).checked_add(r(1, 6)), Some(r(1, 2)));
        assert_eq!(r(1, 3).checked_div(r(0, 5)), None);
        assert_eq!(
            Ratio::int(8)
                .checked_div(r(1, 3))
                .unwrap()
                .checked_mul(Ratio::int(1)),
            Some(Ratio::int(24))
        );
        let big = Ratio::new(i128::MAX / 2, 1).unwrap();
        assert_eq!(
            big.checked_mul(Ratio::int(3)),
            None,
            "overflow is an error, not a wrap"
        );
        assert_eq!(r(7, 2).to_string(), "7/2");
    }

    #[test]
    fn parser_accepts_the_documented_grammar() {
        let v = |s: &str| parse_expression(s).unwrap().eval().unwrap().to_string();
        assert_eq!(v("(3 + 5) * 7 - 32"), "24");
        assert_eq!(v("8 / (3 - 8 / 3)"), "24");
        assert_eq!(v("2 x 3 × 4 ÷ 6 − 1"), "3");
        assert_eq!(v("-(2 - 5) * 8"), "24");
        assert_eq!(v("10 - 4 - 3"), "3");
        assert_eq!(v("24 / 4 / 2"), "3");
        for bad in [
            "2 ^ 3",
            "2 ** 3",
            "3 + 5 = 8",
            "1.5 * 2",
            "abs(3)",
            "(1 + 2",
            "1 + 2)",
            "",
            "3 4",
        ] {
            assert!(parse_expression(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(parse_expression(&"9".repeat(19)).is_err());
        assert!(parse_expression(&format!("{}1{}", "(".repeat(100), ")".repeat(100))).is_err());
        assert!(parse_expression(&"-".repeat(100_000)).is_err());
        assert!(
            parse_expression(&"1+".repeat(600)).is_err(),
            "over MAX_EXPR_CHARS"
        );
    }

    #[test]
    fn render_round_trips_through_the_parser() {
        let mut rng = Rng::new(5, 6, 7);
        for _ in 0..2000 {
            let nums: Vec<i64> = (0..4).map(|_| rng.range(1, 20)).collect();
            if let Some((e, v)) = random_tree(&nums, true, &mut rng) {
                for spaced in [true, false] {
                    let back = parse_expression(&e.render(spaced)).unwrap();
                    assert_eq!(back.eval(), Some(v), "{}", e.render(spaced));
                }
            }
        }
    }

    #[test]
    fn countdown_checker_adversarial() {
        let nums = [3, 5, 7, 32];
        let s = |c: &str| countdown_score(c, &nums, 24);
        assert_eq!(s("<answer>(3 + 5) * 7 - 32</answer>"), 1.0);
        assert_eq!(s("<think>hmm</think>\n<answer> 7*(5+3)-32 </answer>"), 1.0);
        assert_eq!(s("<answer>(3 + 5) * 7 - 32 = 24</answer>"), 0.0, "'=' rejected");
        assert_eq!(s("<answer>24</answer>"), 0.0, "echoing the target");
        assert_eq!(s("(3 + 5) * 7 - 32"), 0.0, "no tags");
        assert_eq!(s("<answer>(3 + 5) * 7 - 32"), 0.0, "unclosed tag");
        assert_eq!(
            s("<answer>(3+5)*7-32</answer> wait <answer>3+5+7+32</answer>"),
            0.0,
            "last tag wins"
        );
        assert_eq!(
            s("<answer>3+5+7+32</answer> no: <answer>(3+5)*7-32</answer>"),
            1.0,
            "last tag wins"
        );
        assert_eq!(
            s("<answer>(3 + 5) * 7 - 32 + 0</answer>"),
            0.0,
            "number not given"
        );
        assert_eq!(
            s("<answer>(3 + 5) * 7 - 32 + 3 - 3</answer>"),
            0.0,
            "number used twice"
        );
        assert_eq!(s("<answer>(5 + 5) * 7 - 32 - 14</answer>"), 0.0);
        assert_eq!(s("<answer>(3 + 5) * 7</answer>"), 0.0, "number unused");
        assert_eq!(s("<answer>32 / (7 - 7) + 3 + 5</answer>"), 0.0);
        assert_eq!(
            countdown_score("<answer>7 / (5 - 5) * 3</answer>", &[7, 5, 5, 3], 24),
            0.0,
            "div by 0"
        );
        assert_eq!(s("<answer>2**100000</answer>"), 0.0);
        assert_eq!(s("<answer>3^5</answer>"), 0.0);
        assert_eq!(s(&format!("<answer>{}</answer>", "9".repeat(5000))), 0.0);
        assert_eq!(
            s(&format!("<answer>{}3+5)*7-32</answer>", "(".repeat(10_000))),
            0.0
        );
        assert_eq!(s(&"<answer>".repeat(10_000)), 0.0);
        // Rationals: 8 / (3 - 8/3) = 24 uses fractions on the way.
        assert_eq!(
            countdown_score("<answer>8 / (3 - 8 / 3)</answer>", &[8, 3, 8, 3], 24),
            1.0
        );
        // Overflowing products evaluate to nothing rather than wrapping.
        let huge = [999_999_999_999_999_999i64; 5];
        let e = "<answer>999999999999999999*999999999999999999*999999999999999999*999999999999999999*999999999999999999</answer>";
        assert_eq!(countdown_score(e, &huge, 1), 0.0);
        // Format credit only when an answer is present.
        let c = |t: &str| countdown_score_with(t, &nums, 24, AnswerFormat::Tags, 0.1);
        assert_eq!(
            (
                c("<answer>1</answer>"),
                c("nothing"),
                c("<answer>(3+5)*7-32</answer>")
            ),
            (0.1, 0.0, 1.0)
        );
        // Plain format: the line before the EOS.
        let p = |t: &str| countdown_score_with(t, &nums, 24, AnswerFormat::Plain, 0.0);
        assert_eq!(p("(3+5)*7-32"), 1.0);
        assert_eq!(p(" (3+5)*7-32</s>junk"), 1.0);
        assert_eq!(p("(3+5)*7-32\n24"), 1.0);
        assert_eq!(p("24\n(3+5)*7-32"), 0.0);
    }

    #[test]
    fn every_countdown_item_is_solvable() {
        for (cfg, n) in [
            (CountdownConfig::default(), 500),
            (
                CountdownConfig {
                    rationals: true,
                    count: IntRange::new(2, 6),
                    format: PromptFormat::Plain,
                    ..Default::default()
                },
                300,
            ),
            (
                CountdownConfig {
                    number_range: IntRange::new(1, 9),
                    target_range: IntRange::new(10, 30),
                    format: PromptFormat::Text,
                    ..Default::default()
                },
                300,
            ),
        ] {
            let task = Task::Countdown(cfg.clone());
            let (train, _) = task.generate(42, n, 0).unwrap();
            for it in train.iter() {
                let f = &it.fields;
                let nums: Vec<i64> = f["numbers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                let target = f["target"].as_i64().unwrap();
                assert!((cfg.count.min..=cfg.count.max).contains(&(nums.len() as i64)));
                assert!(nums
                    .iter()
                    .all(|n| (cfg.number_range.min..=cfg.number_range.max).contains(n)));
                assert!((cfg.target_range.min..=cfg.target_range.max).contains(&target));
                let sol = f["solution"].as_str().unwrap();
                let e = parse_expression(sol).unwrap();
                assert_eq!(e.eval(), Some(Ratio::int(target)), "{sol}");
                assert!(countdown_correct(sol, &nums, target));
                let completion = it.completion().unwrap();
                assert_eq!(score_item(f, completion).unwrap(), 1.0, "{f}");
                assert_eq!(score_item(f, "<answer>1 + 1</answer>").unwrap(), 0.0);
                match cfg.format {
                    PromptFormat::Chat => assert!(matches!(it.prompt, PromptSpec::Messages(_))),
                    _ => assert!(matches!(it.prompt, PromptSpec::Text(_))),
                }
            }
        }
    }

    #[test]
    fn generation_is_deterministic_and_seeded() {
        for task in [cd(), Task::Arithmetic(ArithmeticConfig::default())] {
            let a = task.generate(1, 50, 20).unwrap();
            let b = task.generate(1, 50, 20).unwrap();
            assert_eq!(a, b);
            let c = task.generate(2, 50, 20).unwrap();
            assert_ne!(a.0, c.0);
            assert_ne!(a.1, c.1);
            // Random access: item i does not depend on how many were generated.
            assert_eq!(task.item(1, Split::Train, 7).unwrap(), a.0.items[7]);
        }
    }

    #[test]
    fn train_and_val_are_disjoint() {
        // A small problem space (100 sums of two one-digit numbers) forces the dedup to work.
        let task = Task::Arithmetic(ArithmeticConfig {
            digits: IntRange::new(1, 1),
            ..Default::default()
        });
        let (train, val) = task.generate(3, 60, 20).unwrap();
        let tk: HashSet<String> = train.iter().map(problem_key).collect();
        let vk: Vec<String> = val.iter().map(problem_key).collect();
        assert!(vk.iter().all(|k| !tk.contains(k)));
        assert_eq!(vk.iter().collect::<HashSet<_>>().len(), vk.len());
        let err = task.generate(3, 60, 100).unwrap_err().to_string();
        assert!(err.starts_with("data.num_val"), "{err}");
        let (train, val) = cd().generate(0, 300, 100).unwrap();
        let tk: HashSet<String> = train.iter().map(problem_key).collect();
        assert!(val.iter().all(|it| !tk.contains(&problem_key(it))));
    }

    #[test]
    fn arithmetic_items_and_checker() {
        let task = Task::Arithmetic(ArithmeticConfig {
            digits: IntRange::new(1, 3),
            ops: vec![ArithOp::Add, ArithOp::Sub, ArithOp::Mul],
            num_terms: IntRange::new(2, 4),
            ..Default::default()
        });
        let (train, _) = task.generate(9, 300, 0).unwrap();
        for it in train.iter() {
            let f = &it.fields;
            let q = f["question"].as_str().unwrap();
            let want = f["answer"].as_i64().unwrap();
            assert_eq!(parse_expression(q).unwrap().eval(), Some(Ratio::int(want)), "{q}");
            assert_eq!(score_item(f, it.completion().unwrap()).unwrap(), 1.0);
            assert_eq!(
                score_item(f, &format!("<answer>{}</answer>", want + 1)).unwrap(),
                0.0
            );
        }
        let t = |c: &str| arithmetic_score(c, 85, AnswerFormat::Tags);
        assert_eq!(
            (t("<answer>85</answer>"), t("<answer> 85 </answer>"), t("85")),
            (1.0, 1.0, 0.0)
        );
        assert_eq!(
            (
                t("<answer>85.0</answer>"),
                t("<answer>84</answer><answer>85</answer>")
            ),
            (0.0, 1.0)
        );
        let l = |c: &str| arithmetic_score(c, -18, AnswerFormat::LastNumber);
        assert_eq!(
            (l("12 - 30 = -18."), l("it is -18"), l("-18 or 5"), l("no number")),
            (1.0, 1.0, 0.0, 0.0)
        );
        let p = |c: &str| arithmetic_score(c, 19, AnswerFormat::Plain);
        assert_eq!(
            (p("19"), p("19\n"), p(" 19<|endoftext|>"), p("19\n20")),
            (1.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(
            (p("190"), p("019"), p("+19"), p("1 9"), p("")),
            (0.0, 0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(arithmetic_score("-5", -5, AnswerFormat::Plain), 1.0);
    }

    #[test]
    fn plain_format_is_short() {
        let task = Task::Arithmetic(ArithmeticConfig {
            format: PromptFormat::Plain,
            ..Default::default()
        });
        let it = task.item(0, Split::Train, 0).unwrap();
        let PromptSpec::Text(p) = &it.prompt else { panic!() };
        let q = it.fields["question"].as_str().unwrap().replace(' ', "");
        assert_eq!(p, &format!("{q}="));
        assert_eq!(it.completion().unwrap(), it.fields["answer"].to_string());
        assert_eq!(it.fields["answer_format"], "plain");
        let pairs = task.sft_pairs(0, 10).unwrap();
        assert_eq!(pairs.len(), 10);
        assert_eq!(pairs[0].prompt, it.prompt);
        assert_eq!(pairs[0].completion, it.fields["answer"].to_string());
        let cd_plain = Task::Countdown(CountdownConfig {
            format: PromptFormat::Plain,
            ..Default::default()
        });
        let it = cd_plain.item(0, Split::Train, 0).unwrap();
        let PromptSpec::Text(p) = &it.prompt else { panic!() };
        assert!(p.ends_with(&format!(" -> {}:", it.fields["target"])), "{p}");
        assert!(!it.completion().unwrap().contains(' '));
    }

    #[test]
    fn generated_rows_round_trip_through_jsonl() {
        let (train, _) = cd().generate(4, 20, 0).unwrap();
        let text: String = train.iter().map(|it| it.to_jsonl() + "\n").collect();
        let back = Dataset::parse_jsonl(text.as_bytes(), Path::new("x.jsonl")).unwrap();
        assert_eq!(back, train);
    }

    fn cfg(json: Json) -> std::result::Result<TaskConfig, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = cfg(json!({"task": "countdown", "digts": 2})).unwrap_err();
        assert!(e.contains("unknown field `digts`"), "{e}");
        let e = cfg(json!({"task": "sudoku"})).unwrap_err();
        assert!(e.contains("sudoku"), "{e}");
        let e = cfg(json!({"task": "arithmetic", "ops": ["+", "/"]})).unwrap_err();
        assert!(e.contains("unknown op \"/\""), "{e}");
        let e = cfg(json!({"task": "arithmetic", "digits": [1, 2, 3]})).unwrap_err();
        assert!(e.contains("[min, max]"), "{e}");

        let bad = |j: Json, want: &str| {
            let c = cfg(j.clone()).unwrap();
            let e = c.task().map(|_| ()).unwrap_err().to_string();
            assert!(e.starts_with(want), "{j}: {e}");
        };
        bad(json!({}), "data: set `task`");
        bad(json!({"task": "countdown", "path": "x.jsonl"}), "data.path");
        bad(
            json!({"task": "countdown", "digits": 3}),
            "data.digits applies to task = \"arithmetic\"",
        );
        bad(
            json!({"task": "arithmetic", "target_range": [1, 9]}),
            "data.target_range applies to task = \"countdown\"",
        );
        bad(json!({"task": "countdown", "count": 1}), "data.count must be");
        bad(
            json!({"task": "countdown", "number_range": [9, 1]}),
            "data.number_range must be",
        );
        bad(
            json!({"task": "countdown", "format_credit": 2.0}),
            "data.format_credit",
        );
        bad(json!({"task": "arithmetic", "ops": []}), "data.ops");
        bad(
            json!({"task": "arithmetic", "ops": ["*"], "digits": 9, "num_terms": 3}),
            "data.digits × data.num_terms",
        );
        bad(
            json!({"task": "arithmetic", "format": "plain", "answer": "tags"}),
            "data.answer",
        );
        bad(
            json!({"task": "countdown", "val_fraction": 0.1}),
            "data.val_fraction applies to `path`",
        );
        bad(
            json!({"path": "a.jsonl", "num_val": 3}),
            "data.num_val applies to built-in tasks",
        );
        bad(
            json!({"path": "a.jsonl", "digits": 3}),
            "data.digits applies to built-in tasks",
        );
        bad(
            json!({"path": "a.jsonl", "val_size": 3, "val_fraction": 0.1}),
            "data.val_size: give at most one",
        );

        let e = cfg(json!({"task": "countdown", "target_range": [5000, 6000], "number_range": [1, 3], "num_train": 1}))
            .unwrap()
            .load(Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("data.target_range"), "{e}");
    }

    #[test]
    fn config_loads_tasks_and_files() {
        let c = cfg(
            json!({"task": "arithmetic", "digits": [1, 2], "ops": ["+", "x", "-"], "num_terms": 3,
                           "format": "plain", "num_train": 30, "num_val": 5, "seed": 9}),
        )
        .unwrap();
        let s = c.load(Path::new("/nonexistent")).unwrap();
        assert_eq!((s.train.len(), s.val.len()), (30, 5));
        assert_eq!(
            s.task,
            Some(Task::Arithmetic(ArithmeticConfig {
                digits: IntRange::new(1, 2),
                ops: vec![ArithOp::Add, ArithOp::Mul, ArithOp::Sub],
                num_terms: IntRange::new(3, 3),
                format: PromptFormat::Plain,
                answer: AnswerStyle::Tags,
            }))
        );
        let d = cfg(json!({"task": "countdown"}))
            .unwrap()
            .load(Path::new("."))
            .unwrap();
        assert_eq!((d.train.len(), d.val.len()), (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL));

        let dir = tempfile::tempdir().unwrap();
        let rows: String = (0..10)
            .map(|i| format!("{{\"prompt\": \"q{i}\", \"answer\": {i}}}\n"))
            .collect();
        std::fs::write(dir.path().join("t.jsonl"), rows).unwrap();
        std::fs::write(dir.path().join("v.jsonl"), "{\"prompt\": \"v\"}\n").unwrap();
        let f = cfg(json!({"path": "t.jsonl", "val_size": 3, "num_train": 5})).unwrap();
        let s = f.load(dir.path()).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.task.is_none()), (5, 3, true));
        let f = cfg(json!({"path": "t.jsonl", "val_path": "v.jsonl"})).unwrap();
        let s = f.load(dir.path()).unwrap();
        assert_eq!((s.train.len(), s.val.len()), (10, 1));
        let e = cfg(json!({"path": "t.jsonl", "num_train": 11}))
            .unwrap()
            .load(dir.path())
            .unwrap_err();
        assert!(e.to_string().starts_with("data.num_train"), "{e}");
        assert!(e.to_string().contains("t.jsonl"), "{e}");
        // A split that leaves no training rows names the key and the file.
        for (key, val) in [("val_size", json!(10)), ("val_fraction", json!(0.99))] {
            let e = cfg(json!({"path": "t.jsonl", key: val}))
                .unwrap()
                .load(dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("data.{key} = ")), "{e}");
            assert!(e.contains("no training rows") && e.contains("t.jsonl"), "{e}");
        }
    }
}
