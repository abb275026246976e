//! The model's tokenizer: `tokenizer.json` through the `tokenizers` crate, plus what
//! `tokenizer_config.json` / `chat_template.jinja` add (special-token strings, chat template).
//!
//! Semantics follow transformers: a raw prompt is encoded like `tokenizer(text)`
//! (`add_special_tokens=true`: the post-processor may add BOS), chat-templated text like
//! `apply_chat_template(..., tokenize=True)` (`add_special_tokens=false`: the template already
//! wrote the special tokens).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;

/// Named special tokens of transformers' `special_tokens_map`, in its order.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    /// (name, content) of the named special tokens found in tokenizer_config.json.
    special: Vec<(String, String)>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json` and
    /// `dir/chat_template.jinja` (which wins over a `chat_template` in the config, as in
    /// transformers). The config's `chat_template` may be a string or a list of
    /// `{name, template}` (the one named "default" is used).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::config(&tok_path, format!("not a valid tokenizer.json: {e}")))?;

        let mut special = Vec::new();
        let mut template_src: Option<String> = None;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut template_origin = cfg_path.clone();
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: Json = serde_json::from_str(&text)
                .map_err(|e| Error::config(&cfg_path, format!("invalid JSON: {e}")))?;
            let obj = cfg
                .as_object()
                .ok_or_else(|| Error::config(&cfg_path, "expected a JSON object"))?;
            for key in SPECIAL_TOKEN_KEYS {
                match obj.get(key) {
                    None | Some(Json::Null) => {}
                    Some(Json::String(s)) => special.push((key.to_string(), s.clone())),
                    Some(Json::Object(o)) => match o.get("content") {
                        Some(Json::String(s)) => special.push((key.to_string(), s.clone())),
                        _ => {
                            return Err(Error::config(
                                &cfg_path,
                                format!("{key}: expected a string or an object with a string \"content\""),
                            ))
                        }
                    },
                    Some(_) => {
                        return Err(Error::config(
                            &cfg_path,
                            format!("{key}: expected a string or an object with a string \"content\""),
                        ))
                    }
                }
            }
            template_src = match obj.get("chat_template") {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => {
                    let mut found = None;
                    for t in list {
                        if t.get("name").and_then(Json::as_str) == Some("default") {
                            found = t.get("template").and_then(Json::as_str).map(str::to_string);
                        }
                    }
                    if found.is_none() {
                        let names: Vec<&str> = list
                            .iter()
                            .filter_map(|t| t.get("name").and_then(Json::as_str))
                            .collect();
                        return Err(Error::config(
                            &cfg_path,
                            format!("chat_template: no template named \"default\" among {names:?}"),
                        ));
                    }
                    found
                }
                Some(_) => {
                    return Err(Error::config(
                        &cfg_path,
                        "chat_template: expected a string or a list of {name, template}",
                    ))
                }
            };
        }
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            template_src = Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?);
            template_origin = jinja_path;
        }
        let chat_template = match template_src {
            Some(src) => Some(
                ChatTemplate::new(src)
                    .map_err(|e| Error::config(&template_origin, e.to_string()))?
                    .with_special_tokens(special.clone()),
            ),
            None => None,
        };
        Ok(Tokenizer {
            inner,
            dir: dir.to_path_buf(),
            special,
            chat_template,
        })
    }

    /// The directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Text to ids. `add_special_tokens=true` is `tokenizer(text)` (raw prompts);
    /// `false` is what `apply_chat_template(tokenize=True)` uses on the rendered chat.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encode failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids to text. Ids outside the vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decode failed: {e}")))
    }

    /// Error naming the first id that is not below [`vocab_size`](Self::vocab_size).
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let n = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= n) {
            Some(id) => Err(Error::Tokenizer(format!(
                "token id {id} is out of range: the vocabulary has {n} tokens (ids 0..={})",
                n.saturating_sub(1)
            ))),
            None => Ok(()),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids, added tokens included (transformers' `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn special(&self, key: &str) -> Option<&str> {
        self.special
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special("eos_token")
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.special("pad_token")
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token().and_then(|t| self.token_to_id(t))
    }

    /// All named special tokens from tokenizer_config.json, as (name, content).
    pub fn special_tokens(&self) -> &[(String, String)] {
        &self.special
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Mutable access, e.g. to pin `strftime_now` with [`ChatTemplate::set_fixed_time`].
    pub fn chat_template_mut(&mut self) -> Option<&mut ChatTemplate> {
        self.chat_template.as_mut()
    }

    /// Replaces the chat template (e.g. one given on the command line); it sees this
    /// tokenizer's special tokens.
    pub fn set_chat_template(&mut self, source: impl Into<String>) -> Result<()> {
        self.chat_template = Some(ChatTemplate::new(source)?.with_special_tokens(self.special.clone()));
        Ok(())
    }

    /// Renders `messages` with the chat template; an error if the model has none.
    pub fn render_chat(&self, messages: &Json, add_generation_prompt: bool) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.render(messages, add_generation_prompt),
            None => Err(Error::Template(format!(
                "the model directory {} has no chat_template (none in tokenizer_config.json and no \
                 chat_template.jinja); give a raw \"prompt\" or \"prompt_ids\" instead of \"messages\"",
                self.dir.display()
            ))),
        }
    }

    /// `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`.
    pub fn apply_chat_template(&self, messages: &Json, add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
