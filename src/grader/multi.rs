//! `multi` (as OpenAI's): named sub-graders combined either by `weights` (weighted sum divided
//! by the sum of weights; the default is equal weights, i.e. the mean) or by a
//! `calculate_output` formula over the sub-grader names: numbers, names, `+ - * /`, unary
//! minus, parentheses, `min(…)`, `max(…)`, `abs(…)`. The formula's value is the score as is
//! (keep it in [0, 1] if the trainer expects that). Every sub-score is in `details` under its
//! name (`name.error` when that sub-grader failed; its score then counts as 0).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{bad, build, GradeResult, Grader, GraderConfig, Sample};
use crate::Result;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub graders: BTreeMap<String, GraderConfig>,
    #[serde(default)]
    pub weights: Option<BTreeMap<String, f32>>,
    #[serde(default)]
    pub calculate_output: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(f64),
    Var(usize),
    Neg(Box<Expr>),
    Bin(char, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

impl Expr {
    pub fn eval(&self, vars: &[f64]) -> std::result::Result<f64, String> {
        Ok(match self {
            Expr::Num(x) => *x,
            Expr::Var(i) => vars[*i],
            Expr::Neg(e) => -e.eval(vars)?,
            Expr::Bin(op, a, b) => {
                let (a, b) = (a.eval(vars)?, b.eval(vars)?);
                match op {
                    '+' => a + b,
                    '-' => a - b,
                    '*' => a * b,
                    _ if b == 0.0 => return Err("division by zero in calculate_output".into()),
                    _ => a / b,
                }
            }
            Expr::Call(f, args) => {
                let v: Vec<f64> = args
                    .iter()
                    .map(|a| a.eval(vars))
                    .collect::<std::result::Result<_, _>>()?;
                match f.as_str() {
                    "min" => v.iter().copied().fold(f64::INFINITY, f64::min),
                    "max" => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    _ => v[0].abs(),
                }
            }
        })
    }
}

/// Parses a formula; `names` are the allowed variables (their index is the variable id).
pub fn parse_expr(src: &str, names: &[String]) -> std::result::Result<Expr, String> {
    let mut p = Parser {
        s: src.as_bytes(),
        i: 0,
        names,
    };
    let e = p.sum()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected {:?} at offset {}", &src[p.i..], p.i));
    }
    Ok(e)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    names: &'a [String],
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn sum(&mut self) -> std::result::Result<Expr, String> {
        let mut e = self.product()?;
        loop {
            let op = if self.eat(b'+') {
                '+'
            } else if self.eat(b'-') {
                '-'
            } else {
                return Ok(e);
            };
            e = Expr::Bin(op, Box::new(e), Box::new(self.product()?));
        }
    }
    fn product(&mut self) -> std::result::Result<Expr, String> {
        let mut e = self.unary()?;
        loop {
            let op = if self.eat(b'*') {
                '*'
            } else if self.eat(b'/') {
                '/'
            } else {
                return Ok(e);
            };
            e = Expr::Bin(op, Box::new(e), Box::new(self.unary()?));
        }
    }
    fn unary(&mut self) -> std::result::Result<Expr, String> {
        if self.eat(b'-') {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat(b'+') {
            return self.unary();
        }
        self.atom()
    }
    fn atom(&mut self) -> std::result::Result<Expr, String> {
        self.ws();
        let start = self.i;
        let Some(&c) = self.s.get(self.i) else {
            return Err("unexpected end of formula".into());
        };
        if c == b'(' {
            self.i += 1;
            let e = self.sum()?;
            if !self.eat(b')') {
                return Err(format!("missing `)` for the `(` at offset {start}"));
            }
            return Ok(e);
        }
        if c.is_ascii_digit() || c == b'.' {
            while self.i < self.s.len() && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.') {
                self.i += 1;
            }
            let t = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            return t.parse().map(Expr::Num).map_err(|_| format!("bad number {t:?}"));
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_')
            {
                self.i += 1;
            }
            let name = std::str::from_utf8(&self.s[start..self.i])
                .unwrap_or("")
                .to_string();
            if self.eat(b'(') {
                if !matches!(name.as_str(), "min" | "max" | "abs") {
                    return Err(format!("unknown function {name:?} (min, max, abs)"));
                }
                let mut args = vec![self.sum()?];
                while self.eat(b',') {
                    args.push(self.sum()?);
                }
                if !self.eat(b')') {
                    return Err(format!("missing `)` after the arguments of {name}"));
                }
                if name == "abs" && args.len() != 1 {
                    return Err("abs takes one argument".into());
                }
                return Ok(Expr::Call(name, args));
            }
            return match self.names.iter().position(|n| *n == name) {
                Some(i) => Ok(Expr::Var(i)),
                None => Err(format!(
                    "unknown grader {name:?} (known: {})",
                    self.names.join(", ")
                )),
            };
        }
        Err(format!("unexpected {:?} at offset {start}", c as char))
    }
}

enum Combine {
    Weights(Vec<f32>, f32),
    Formula(Expr),
}

pub struct Multi {
    name: String,
    names: Vec<String>,
    graders: Vec<Box<dyn Grader>>,
    combine: Combine,
}

impl Multi {
    pub fn new(cfg: &MultiConfig) -> Result<Self> {
        if cfg.graders.is_empty() {
            return Err(bad("graders", "no sub-graders"));
        }
        let names: Vec<String> = cfg.graders.keys().cloned().collect();
        let mut graders = Vec::new();
        for (n, c) in &cfg.graders {
            graders.push(build(c).map_err(|e| bad(&format!("graders.{n}"), e))?);
        }
        let combine = match (&cfg.weights, &cfg.calculate_output) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "weights",
                    "give either `weights` or `calculate_output`, not both",
                ))
            }
            (None, Some(f)) => {
                Combine::Formula(parse_expr(f, &names).map_err(|e| bad("calculate_output", e))?)
            }
            (Some(w), None) => {
                if let Some(k) = w.keys().find(|k| !cfg.graders.contains_key(*k)) {
                    return Err(bad(&format!("weights.{k}"), "no sub-grader of that name"));
                }
                let ws: Vec<f32> = names.iter().map(|n| w.get(n).copied().unwrap_or(0.0)).collect();
                if ws.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(bad("weights", "weights must be finite and >= 0"));
                }
                let total: f32 = ws.iter().sum();
                if total <= 0.0 {
                    return Err(bad("weights", "the weights sum to 0"));
                }
                Combine::Weights(ws, total)
            }
            (None, None) => Combine::Weights(vec![1.0; names.len()], names.len() as f32),
        };
        Ok(Multi {
            name: cfg.name.clone().unwrap_or_else(|| "multi".into()),
            names,
            graders,
            combine,
        })
    }
}

impl Grader for Multi {
    fn name(&self) -> &str {
        &self.name
    }
    fn grade(&self, s: &Sample) -> GradeResult {
        let mut r = GradeResult::ok(0.0);
        let mut scores = Vec::with_capacity(self.graders.len());
        for (n, g) in self.names.iter().zip(&self.graders) {
            let sub = super::grade_one(g.as_ref(), s);
            r.details.insert(n.clone(), sub.score.into());
            if let Some(e) = sub.error {
                r.details.insert(format!("{n}.error"), e.into());
            }
            scores.push(sub.score as f64);
        }
        match &self.combine {
            Combine::Weights(w, total) => {
                r.score = scores.iter().zip(w).map(|(s, w)| *s as f32 * w).sum::<f32>() / total;
            }
            Combine::Formula(e) => match e.eval(&scores) {
                Ok(x) if x.is_finite() => r.score = x as f32,
                Ok(x) => r.error = Some(format!("calculate_output gave {x}")),
                Err(msg) => r.error = Some(msg),
            },
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::super::build_from_toml;
    use super::*;
    use serde_json::json;

    #[test]
    fn expressions() {
        let names = vec!["a".to_string(), "b_2".to_string()];
        let ev = |s: &str| parse_expr(s, &names).unwrap().eval(&[0.5, 2.0]).unwrap();
        assert_eq!(ev("a + b_2 * 2"), 4.5);
        assert_eq!(ev("(a + b_2) * 2"), 5.0);
        assert_eq!(ev("-a - -1"), 0.5);
        assert_eq!(ev("min(a, b_2, 0.25) + max(a, 1)"), 1.25);
        assert_eq!(ev("abs(a - b_2) / 3"), 0.5);
        assert_eq!(ev("2 - 1 - 1"), 0.0);
        assert_eq!(ev("8 / 4 / 2"), 1.0);
        assert!(parse_expr("a / (b_2 - 2)", &names)
            .unwrap()
            .eval(&[0.5, 2.0])
            .is_err());
        for bad in ["a +", "(a", "c", "foo(a)", "a b", "abs(a, b_2)", "1..2", ""] {
            assert!(parse_expr(bad, &names).is_err(), "{bad}");
        }
    }

    const TOML: &str = r#"
type = "multi"
{COMBINE}
[graders.correct]
type = "numeric"
reference = "{{ item.answer }}"
[graders.fmt]
type = "format"
tags = ["answer"]
"#;

    #[test]
    fn weights_and_formula() {
        let w = build_from_toml(&TOML.replace("{COMBINE}", "weights = { correct = 3, fmt = 1 }")).unwrap();
        let s = |c: &str| Sample::new("", c, json!({"answer": 7}));
        assert_eq!(w.grade(&s("<answer>7</answer>")).score, 1.0);
        let r = w.grade(&s("7"));
        assert_eq!(r.score, 0.75);
        assert_eq!(r.details["correct"], 1.0);
        assert_eq!(r.details["fmt"], 0.0);
        let f =
            build_from_toml(&TOML.replace("{COMBINE}", "calculate_output = \"correct * (0.5 + 0.5 * fmt)\""))
                .unwrap();
        assert_eq!(f.grade(&s("7")).score, 0.5);
        assert_eq!(f.grade(&s("<answer>8</answer>")).score, 0.0);
        let mean = build_from_toml(&TOML.replace("{COMBINE}", "")).unwrap();
        let r = mean.grade(&s("<answer>x</answer>"));
        assert_eq!(r.score, 0.5);
        assert!(r.details.contains_key("correct.error"));
        let e = build_from_toml(&TOML.replace("{COMBINE}", "calculate_output = \"corect + fmt\""))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("calculate_output") && e.contains("corect"), "{e}");
        let e = build_from_toml(&TOML.replace("{COMBINE}", "weights = { correct = 1, fmtt = 1 }"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("weights.fmtt"), "{e}");
        let e = build_from_toml(
            &TOML
                .replace("{COMBINE}", "")
                .replace("tags = [\"answer\"]", "tags = [\"a b\"]"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("graders.fmt"), "{e}");
    }
}
