//! The library's error type: every variant names what was wrong and where (file, key, line,
//! tensor) so the CLI can print one readable line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `err` is deliberately not named `source`: the message already includes it, and a
    /// `source` would make `{:#}` (anyhow's chain) print the OS error twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported architecture {found:?} in {path}; supported: {supported}")]
    UnsupportedArch {
        path: PathBuf,
        found: String,
        supported: String,
    },
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} (in {path})")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} is missing from {path}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}:{line}: {msg}")]
    Input { path: PathBuf, line: usize, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    #[error("CUDA backend unavailable: {0}")]
    CudaUnavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
