//! How text is split into words before BPE: llama.cpp's regex lists for the
//! `tokenizer.ggml.pre` names we support, as `tokenizers` pre-tokenizers.

use tokenizers::SplitDelimiterBehavior;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use super::{Result, TokenizerError};

/// The GPT-2 split regex, as llama.cpp and `tokenizers`' ByteLevel write it (llama.cpp leaves
/// out the final `|\s+`, but its hand-written GPT-2 splitter behaves as if it were there).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` names that llama.cpp splits with the GPT-2 regex alone
/// (`LLAMA_VOCAB_PRE_TYPE_GPT2`, `_MPT`, `_OLMO`, `_JAIS`). Note that `gpt2` (no dash) is not
/// one of them: llama.cpp falls back to `default` for it, and we refuse it instead.
pub(super) const GPT2_FAMILY: &[&str] = &[
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "roberta-bpe",
    "mpt",
    "olmo",
    "jais",
];

/// `tokenizer.ggml.pre` names that llama.cpp splits with `\p{N}` (each digit alone) and then
/// the GPT-2 regex (`LLAMA_VOCAB_PRE_TYPE_SMOLLM`, `_STARCODER`, `_REFACT`, `_COMMAND_R`,
/// `_CODESHELL`, `_EXAONE`, `_MINERVA`).
pub(super) const DIGITS_GPT2_FAMILY: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// How text is split into words before BPE, one variant per llama.cpp regex list we support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreSplit {
    /// The GPT-2 regex only.
    Gpt2,
    /// Every digit alone, then the GPT-2 regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// llama.cpp's fallback list for `default` or an absent `tokenizer.ggml.pre`.
    LlamaDefault,
}

impl PreSplit {
    pub(super) fn from_name(name: &str) -> Option<Self> {
        if name == "default" {
            Some(Self::LlamaDefault)
        } else if GPT2_FAMILY.contains(&name) {
            Some(Self::Gpt2)
        } else if DIGITS_GPT2_FAMILY.contains(&name) {
            Some(Self::DigitsThenGpt2)
        } else {
            None
        }
    }

    /// The `tokenizers` pre-tokenizer equivalent to llama.cpp's regex list.
    ///
    /// llama.cpp applies its regexes one after another, each splitting the pieces left by the
    /// previous one into matches and the text between them; that is `Split` with `Isolated`.
    pub(super) fn build(self) -> Result<PreTokenizerWrapper> {
        // add_prefix_space = false: GGUF `tokenizer.ggml.add_space_prefix` is false for every
        // byte-level family here, and llama.cpp never adds one for BPE.
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
        Ok(match self {
            Self::Gpt2 => byte_level(true).into(),
            // This is also the pipeline in SmolLM2's tokenizer.json. `Digits` tests
            // `char::is_numeric`, i.e. \p{N}, so each number character becomes its own piece.
            Self::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            Self::LlamaDefault => {
                let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
                    Split::new(
                        SplitPattern::Regex(pattern.to_owned()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map(Into::into)
                    .map_err(|source| TokenizerError::Build { source })
                };
                Sequence::new(vec![
                    split(r"[\p{P}\$\+<=>\^~\|]+")?,
                    split(GPT2_REGEX)?,
                    split(r"\p{N}+")?,
                    split("[0-9][0-9][0-9]")?,
                    byte_level(false).into(),
                ])
                .into()
            }
        })
    }
}
