//! A Hugging Face `tokenizer.json` loaded with the pure-Rust `tokenizers` crate, plus the facts
//! the pipeline needs about it: vocabulary size, special token ids, and a content hash.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{DataError, Result};

/// A loaded tokenizer. Encoding never adds special tokens (Qwen has no BOS); the chat template
/// and the pretraining EOS are added explicitly by the caller.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    sha256: String,
    vocab_size: usize,
}

/// Token ids with the byte range (in the encoded string) each token covers.
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

impl TextTokenizer {
    /// Load `tokenizer.json`; the hash is the sha256 of the file's bytes.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "reading tokenizer", e))?;
        // Parse the JSON first, then build the tokenizer from the parsed value: `tokenizers`
        // panics (instead of failing) when parsing the text itself fails inside some sections
        // (`decoder`: `.expect("Helper")` in tokenizers 0.23), e.g. a trailing comma or a bad
        // `\u` escape there.
        let bad = |msg: String| DataError::Tokenizer {
            path: path.to_path_buf(),
            msg,
        };
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "invalid JSON ({e}); the file is truncated or edited"
            ))
        })?;
        let inner: tokenizers::Tokenizer = serde_json::from_value(json)
            .map_err(|e| bad(crate::error::one_line(&e.to_string())))?;
        let sha256 = hex(&Sha256::digest(&bytes));
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            sha256,
            vocab_size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// sha256 of the tokenizer.json bytes, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Vocabulary size including added tokens: every valid id is `< vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token such as `<|endoftext|>`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of `ids` with special tokens (`<|im_end|>`, …) left out, as transformers'
    /// `decode(skip_special_tokens=True)`; ids outside the vocabulary are dropped.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode(text)?.ids)
    }

    fn encode_error(&self, e: impl std::fmt::Display) -> DataError {
        DataError::Tokenizer {
            path: self.path.clone(),
            msg: format!(
                "encoding failed: {}",
                crate::error::one_line(&e.to_string())
            ),
        }
    }

    /// Token ids and byte offsets of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| self.encode_error(e))?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            offsets: enc.get_offsets().to_vec(),
        })
    }

    /// Encode many texts at once (in parallel inside `tokenizers`).
    pub fn encode_batch(&self, texts: Vec<&str>) -> Result<Vec<Encoded>> {
        let encs = self
            .inner
            .encode_batch(texts, false)
            .map_err(|e| self.encode_error(e))?;
        Ok(encs
            .into_iter()
            .map(|e| Encoded {
                ids: e.get_ids().to_vec(),
                offsets: e.get_offsets().to_vec(),
            })
            .collect())
    }
}

/// Lowercase hex of a byte slice.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
