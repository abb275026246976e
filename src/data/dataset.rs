//! Training datasets: rows of prompts plus the fields graders need, read from JSONL or built by a
//! task generator; a seeded train/validation split; and the epoch-based shuffling
//! [`PromptSampler`] that yields B prompt indices per step and resumes exactly from a saved
//! [`SamplerState`].
//!
//! JSONL rows follow `rft generate` inputs ([`crate::data::input`]): one JSON object per
//! non-empty line with exactly one of `"prompt"` (text), `"messages"` (chat, rendered with the
//! chat template) or `"prompt_ids"`. Every other field (`answer`, `tests`, ...) is for graders;
//! an optional `"completion"` string is the labelled answer used by `rft sft`. The whole row,
//! prompt key included, is kept in [`Item::fields`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::data::input::{parse_inputs, PromptSpec};
use crate::error::{Error, Result};

/// One training prompt and the fields its graders read.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub prompt: PromptSpec,
    /// The whole JSON row (a JSON object): prompt key, reference answers, tests, metadata.
    pub fields: Json,
}

impl Item {
    /// An item whose `fields` are `extra` plus the prompt under its usual key (`"prompt"`,
    /// `"messages"` or `"prompt_ids"`), put first.
    pub fn new(prompt: PromptSpec, extra: Map<String, Json>) -> Item {
        let mut row = Map::new();
        match &prompt {
            PromptSpec::Text(s) => row.insert("prompt".into(), Json::String(s.clone())),
            PromptSpec::Messages(m) => row.insert("messages".into(), m.clone()),
            PromptSpec::Ids(ids) => row.insert("prompt_ids".into(), Json::from(ids.clone())),
        };
        for (k, v) in extra {
            row.entry(k).or_insert(v);
        }
        Item {
            prompt,
            fields: Json::Object(row),
        }
    }

    /// A field of the row.
    pub fn get(&self, key: &str) -> Option<&Json> {
        self.fields.get(key)
    }

    /// The labelled answer (`"completion"` string), if the row has one.
    pub fn completion(&self) -> Option<&str> {
        self.get("completion").and_then(Json::as_str)
    }

    /// The row as one JSONL line (no newline).
    pub fn to_jsonl(&self) -> String {
        self.fields.to_string()
    }
}

/// A (prompt, completion) pair for supervised warm-up (`rft sft`). The completion does not
/// include the end-of-sequence token: the SFT step appends the tokenizer's EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct SftPair {
    pub prompt: PromptSpec,
    pub completion: String,
}

/// An ordered list of items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub items: Vec<Item>,
}

/// How to carve a validation set out of a training file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSplit {
    /// No validation set.
    None,
    /// `round(fraction * len)` items, at least 1; fraction in (0, 1).
    Fraction(f64),
    /// Exactly this many items.
    Size(usize),
}

impl Dataset {
    pub fn new(items: Vec<Item>) -> Dataset {
        Dataset { items }
    }

    /// Reads a JSONL dataset; errors are [`Error::Input`] with the file and 1-based line.
    pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Dataset> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Dataset::parse_jsonl(&bytes, path)
    }

    /// [`Dataset::read_jsonl`] on bytes already read; `path` is only used in error messages.
    pub fn parse_jsonl(bytes: &[u8], path: &Path) -> Result<Dataset> {
        // input.rs validates every line (JSON, one prompt key, types) and reports file:line;
        // the rows are then re-read whole so that `fields` keeps the file's key order.
        let lines = parse_inputs(bytes, path, false)?;
        let body = bytes.strip_prefix(b"\xef\xbb\xbf".as_slice()).unwrap_or(bytes);
        let raw: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
        let items = lines
            .into_iter()
            .map(|l| {
                let fields: Json = serde_json::from_slice(raw[l.line - 1]).map_err(|e| Error::Input {
                    path: path.to_path_buf(),
                    line: l.line,
                    msg: format!("invalid JSON: {e}"),
                })?;
                Ok(Item {
                    prompt: l.prompt,
                    fields,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Dataset { items })
    }

    /// Writes one JSON row per line.
    pub fn write_jsonl(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut s = String::new();
        for it in &self.items {
            s.push_str(&it.to_jsonl());
            s.push('\n');
        }
        std::fs::write(path, s).map_err(|e| Error::io(path, e))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Item> {
        self.items.get(i)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Item> {
        self.items.iter()
    }

    /// Splits off a validation set: a seeded random choice of rows (deterministic for a given
    /// seed and length); both parts keep the file order. Rows are split by position, so
    /// duplicate rows in the file may land on both sides. At least one training row must remain.
    pub fn split(self, how: ValSplit, seed: u64) -> Result<(Dataset, Dataset)> {
        let n = self.items.len();
        let n_val = match how {
            ValSplit::None => 0,
            ValSplit::Fraction(f) => {
                if !(f > 0.0 && f < 1.0) {
                    return Err(Error::invalid(format!(
                        "data.val_fraction must be in (0, 1), got {f}"
                    )));
                }
                ((f * n as f64).round() as usize).max(1)
            }
            ValSplit::Size(k) => k,
        };
        if n_val == 0 {
            return Ok((self, Dataset::default()));
        }
        if n_val >= n {
            let asked = match how {
                ValSplit::Fraction(f) => format!("data.val_fraction = {f}: "),
                ValSplit::Size(k) => format!("data.val_size = {k}: "),
                ValSplit::None => String::new(),
            };
            return Err(Error::invalid(format!(
                "{asked}a validation split of {n_val} rows leaves no training rows (the dataset has {n})"
            )));
        }
        let perm = permutation(n, seed, SPLIT_STREAM);
        let mut is_val = vec![false; n];
        for &i in &perm[..n_val] {
            is_val[i] = true;
        }
        let (mut train, mut val) = (Vec::with_capacity(n - n_val), Vec::with_capacity(n_val));
        for (item, v) in self.items.into_iter().zip(is_val) {
            if v {
                val.push(item)
            } else {
                train.push(item)
            }
        }
        Ok((Dataset::new(train), Dataset::new(val)))
    }

    /// SFT pairs from the rows' `"completion"` strings (the first `n`, or all with `None`).
    pub fn sft_pairs(&self, n: Option<usize>) -> Result<Vec<SftPair>> {
        let n = n.unwrap_or(self.items.len());
        if n > self.items.len() {
            return Err(Error::invalid(format!(
                "asked for {n} SFT examples but the dataset has {} rows",
                self.items.len()
            )));
        }
        self.items[..n]
            .iter()
            .enumerate()
            .map(|(i, it)| match it.completion() {
                Some(c) => Ok(SftPair {
                    prompt: it.prompt.clone(),
                    completion: c.to_string(),
                }),
                None => Err(Error::invalid(format!(
                    "dataset row {} has no \"completion\" string: SFT needs labelled answers",
                    i + 1
                ))),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

const SPLIT_STREAM: u64 = 0x5350_4c49_5400_0001;
const SAMPLER_STREAM: u64 = 0x5341_4d50_4c45_0002;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small seeded generator (splitmix64) for data: deterministic across platforms, no
/// statistical claims beyond what shuffling and toy-task generation need.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator for one (seed, stream, index) triple: independent streams for the train
    /// items, validation items, epochs, ...
    pub(crate) fn new(seed: u64, stream: u64, index: u64) -> Rng {
        Rng(splitmix(splitmix(seed ^ splitmix(stream)) ^ index))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), unbiased (Lemire's method).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = self.next_u64() as u128 * n as u128;
        if (m as u64) < n {
            let t = n.wrapping_neg() % n;
            while (m as u64) < t {
                m = self.next_u64() as u128 * n as u128;
            }
        }
        (m >> 64) as u64
    }

    /// Uniform in `lo..=hi` (lo <= hi).
    pub(crate) fn range(&mut self, lo: i64, hi: i64) -> i64 {
        let span = (hi as i128 - lo as i128) as u128 + 1;
        if span > u64::MAX as u128 {
            return self.next_u64() as i64;
        }
        (lo as i128 + self.below(span as u64) as i128) as i64
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    Rng::new(seed, stream, 0).shuffle(&mut p);
    p
}

// ---------------------------------------------------------------------------------------------
// Prompt sampler
// ---------------------------------------------------------------------------------------------

/// Where a [`PromptSampler`] stands: the next index handed out is
/// `permutation(seed, epoch)[position]`. Save it with a checkpoint to resume exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerState {
    pub seed: u64,
    pub epoch: u64,
    pub position: usize,
}

/// Yields batches of B dataset indices per step. Each epoch visits every row once in a fresh
/// seeded permutation; a batch that runs past the end of an epoch continues into the next one,
/// so every batch has exactly B indices (with B > len a batch spans several epochs and repeats
/// rows).
#[derive(Debug, Clone)]
pub struct PromptSampler {
    len: usize,
    batch_size: usize,
    state: SamplerState,
    perm: Vec<usize>,
}

impl PromptSampler {
    /// A sampler at the start of epoch 0.
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Result<PromptSampler> {
        PromptSampler::from_state(
            len,
            batch_size,
            SamplerState {
                seed,
                epoch: 0,
                position: 0,
            },
        )
    }

    /// Resumes from a saved state; `len` must be the same dataset length as when it was saved.
    pub fn from_state(len: usize, batch_size: usize, state: SamplerState) -> Result<PromptSampler> {
        if len == 0 {
            return Err(Error::invalid("the prompt sampler needs a non-empty dataset"));
        }
        if batch_size == 0 {
            return Err(Error::invalid("the prompt batch size must be at least 1"));
        }
        if state.position > len {
            return Err(Error::invalid(format!(
                "sampler state position {} is past the dataset's {len} rows (was the dataset changed?)",
                state.position
            )));
        }
        let mut s = PromptSampler {
            len,
            batch_size,
            state,
            perm: PromptSampler::permutation(len, state.seed, state.epoch),
        };
        s.roll();
        Ok(s)
    }

    /// The order of epoch `epoch`.
    pub fn permutation(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let mut p: Vec<usize> = (0..len).collect();
        Rng::new(seed, SAMPLER_STREAM, epoch).shuffle(&mut p);
        p
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn roll(&mut self) {
        if self.state.position == self.len {
            self.state.epoch += 1;
            self.state.position = 0;
            self.perm = PromptSampler::permutation(self.len, self.state.seed, self.state.epoch);
        }
    }

    /// The next B indices into the dataset.
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch_size);
        while out.len() < self.batch_size {
            let take = (self.batch_size - out.len()).min(self.len - self.state.position);
            out.extend_from_slice(&self.perm[self.state.position..self.state.position + take]);
            self.state.position += take;
            self.roll();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<Dataset> {
        Dataset::parse_jsonl(s.as_bytes(), Path::new("train.jsonl"))
    }

    #[test]
    fn reads_rows_with_all_fields() {
        let d = parse(
            "{\"id\": 1, \"prompt\": \"2+2=\", \"answer\": \"4\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"tests\": [\"assert f()\"], \"completion\": \"ok\"}\r\n",
        )
        .unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d.items[0].prompt, PromptSpec::Text("2+2=".into()));
        assert_eq!(
            d.items[0].fields,
            json!({"id": 1, "prompt": "2+2=", "answer": "4"})
        );
        let keys: Vec<&String> = d.items[0].fields.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "prompt", "answer"], "file order kept");
        assert!(matches!(d.items[1].prompt, PromptSpec::Messages(_)));
        assert_eq!(d.items[1].get("tests"), Some(&json!(["assert f()"])));
        assert_eq!(d.items[1].completion(), Some("ok"));
        let sft = d.sft_pairs(Some(2));
        assert!(sft
            .unwrap_err()
            .to_string()
            .contains("row 1 has no \"completion\""));
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        for (src, want) in [
            (
                "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"",
                "train.jsonl:2: invalid JSON",
            ),
            (
                "{\"prompt\": \"a\"}\n\n{\"answer\": 3}",
                "train.jsonl:3: missing prompt",
            ),
            ("{\"prompt\": [1]}", "train.jsonl:1: \"prompt\" must be a string"),
            (
                "{\"messages\": \"hi\"}",
                "train.jsonl:1: \"messages\" must be an array",
            ),
            ("\"just a string\"", "train.jsonl:1: expected a JSON object"),
            ("", "train.jsonl:1: no inputs"),
        ] {
            let e = parse(src).unwrap_err();
            assert!(matches!(e, Error::Input { .. }), "{e:?}");
            assert!(e.to_string().starts_with(want), "{src:?}: {e}");
        }
        let missing = Dataset::read_jsonl("/nonexistent/x.jsonl").unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/x.jsonl"));
    }

    #[test]
    fn jsonl_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = parse("{\"prompt\": \"a\", \"x\": 1}\n{\"prompt_ids\": [5, 6], \"y\": null}").unwrap();
        let p = dir.path().join("d.jsonl");
        d.write_jsonl(&p).unwrap();
        assert_eq!(Dataset::read_jsonl(&p).unwrap(), d);
    }

    fn numbered(n: usize) -> Dataset {
        Dataset::new(
            (0..n)
                .map(|i| {
                    let mut m = Map::new();
                    m.insert("i".into(), json!(i));
                    Item::new(PromptSpec::Text(format!("q{i}")), m)
                })
                .collect(),
        )
    }

    fn ids(d: &Dataset) -> Vec<u64> {
        d.iter()
            .map(|it| it.get("i").unwrap().as_u64().unwrap())
            .collect()
    }

    #[test]
    fn split_is_seeded_disjoint_and_ordered() {
        let (t, v) = numbered(50).split(ValSplit::Fraction(0.2), 7).unwrap();
        assert_eq!((t.len(), v.len()), (40, 10));
        let (ti, vi) = (ids(&t), ids(&v));
        assert!(ti.windows(2).all(|w| w[0] < w[1]) && vi.windows(2).all(|w| w[0] < w[1]));
        assert!(vi.iter().all(|x| !ti.contains(x)));
        let (t2, v2) = numbered(50).split(ValSplit::Fraction(0.2), 7).unwrap();
        assert_eq!((ids(&t2), ids(&v2)), (ti, vi.clone()));
        let (_, v3) = numbered(50).split(ValSplit::Fraction(0.2), 8).unwrap();
        assert_ne!(ids(&v3), vi);
        let (t4, v4) = numbered(50).split(ValSplit::Size(3), 1).unwrap();
        assert_eq!((t4.len(), v4.len()), (47, 3));
        let (t5, v5) = numbered(5).split(ValSplit::None, 1).unwrap();
        assert_eq!((t5.len(), v5.len()), (5, 0));
        assert_eq!(numbered(3).split(ValSplit::Fraction(0.01), 0).unwrap().1.len(), 1);
        assert!(numbered(3).split(ValSplit::Size(3), 0).is_err());
        assert!(numbered(3).split(ValSplit::Fraction(1.0), 0).is_err());
    }

    #[test]
    fn sampler_epochs_are_permutations() {
        let mut s = PromptSampler::new(10, 4, 3).unwrap();
        let got: Vec<usize> = (0..5).flat_map(|_| s.next_batch()).collect();
        // 20 indices = exactly two epochs, each a permutation, and different ones.
        for e in got.chunks(10) {
            let mut sorted = e.to_vec();
            sorted.sort();
            assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(got[..10], got[10..]);
        assert_eq!(
            s.state(),
            SamplerState {
                seed: 3,
                epoch: 2,
                position: 0
            }
        );
        assert_eq!(&got[..10], PromptSampler::permutation(10, 3, 0).as_slice());
        let other: Vec<usize> = PromptSampler::new(10, 4, 4).unwrap().next_batch();
        assert_ne!(other, got[..4]);
        // B > len spans epochs.
        let mut big = PromptSampler::new(3, 7, 0).unwrap();
        assert_eq!(big.next_batch().len(), 7);
        assert_eq!(
            big.state(),
            SamplerState {
                seed: 0,
                epoch: 2,
                position: 1
            }
        );
    }

    #[test]
    fn sampler_resume_continues_exactly() {
        let mut a = PromptSampler::new(13, 5, 11).unwrap();
        for _ in 0..7 {
            a.next_batch();
        }
        let saved = serde_json::to_string(&a.state()).unwrap();
        let want: Vec<Vec<usize>> = (0..9).map(|_| a.next_batch()).collect();
        let state: SamplerState = serde_json::from_str(&saved).unwrap();
        let mut b = PromptSampler::from_state(13, 5, state).unwrap();
        let got: Vec<Vec<usize>> = (0..9).map(|_| b.next_batch()).collect();
        assert_eq!(got, want);
        let bad = SamplerState {
            seed: 0,
            epoch: 0,
            position: 14,
        };
        assert!(PromptSampler::from_state(13, 5, bad).is_err());
        assert!(PromptSampler::new(0, 5, 0).is_err());
        assert!(PromptSampler::new(5, 0, 0).is_err());
    }

    #[test]
    fn rng_below_is_in_range_and_covers() {
        let mut r = Rng::new(1, 2, 3);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            seen[r.below(7) as usize] += 1;
        }
        // Each count is Binomial(7000, 1/7): mean 1000, sd 29; 800 is 6.8 sd below, while a
        // generator that misses a value (or favours some by 2×) fails.
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
        for _ in 0..1000 {
            let x = r.range(-3, 3);
            assert!((-3..=3).contains(&x));
        }
    }
}
