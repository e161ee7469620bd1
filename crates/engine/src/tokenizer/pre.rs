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

/// `tokenizer.ggml.pre` names that llama.cpp splits with the Llama 3 regex
/// (`LLAMA_VOCAB_PRE_TYPE_LLAMA3`): Llama 3.x, Falcon 3, Pixtral and others. llama.cpp also
/// ignores merges for them and adds BOS when the file does not say (see [`PreSplit::Llama3`]).
pub(super) const LLAMA3_FAMILY: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
];

/// `tokenizer.ggml.pre` names that llama.cpp splits with the Qwen2 regex
/// (`LLAMA_VOCAB_PRE_TYPE_QWEN2`, `_STABLELM2`, `_HUNYUAN`): Qwen2, Qwen2.5, Qwen3 and the
/// DeepSeek-R1 distillations of Qwen among them.
pub(super) const QWEN2_FAMILY: &[&str] = &[
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "megrez",
    "stablelm2",
    "hunyuan",
];

/// The Llama 3 split regex as llama.cpp runs it: the model's own `(?i:'s|'t|'re|'ve|'m|'ll|'d)`
/// spelt out case by case, a run of letters with at most one other character (not a newline)
/// before it, digits in threes, symbols with the newlines after them, newlines with the spaces
/// before them, then spaces.
const LLAMA3_REGEX: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// Qwen2's: [`LLAMA3_REGEX`] with each digit alone.
const QWEN2_REGEX: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

/// How text is split into words before BPE, one variant per llama.cpp regex list we support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PreSplit {
    /// The GPT-2 regex only.
    Gpt2,
    /// Every digit alone, then the GPT-2 regex (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// llama.cpp's fallback list for `default` or an absent `tokenizer.ggml.pre`.
    LlamaDefault,
    /// The Llama 3 regex alone; a word that is itself a token is that token, whatever the
    /// merges would make of it (llama.cpp's `ignore_merges`, as the model's tokenizer.json).
    Llama3,
    /// The Qwen2 regex alone.
    Qwen2,
}

impl PreSplit {
    pub(super) fn from_name(name: &str) -> Option<Self> {
        if name == "default" {
            Some(Self::LlamaDefault)
        } else if GPT2_FAMILY.contains(&name) {
            Some(Self::Gpt2)
        } else if DIGITS_GPT2_FAMILY.contains(&name) {
            Some(Self::DigitsThenGpt2)
        } else if LLAMA3_FAMILY.contains(&name) {
            Some(Self::Llama3)
        } else if QWEN2_FAMILY.contains(&name) {
            Some(Self::Qwen2)
        } else {
            None
        }
    }

    /// Whether a word that is a token of the vocabulary is taken whole, without merges
    /// (llama.cpp's `ignore_merges`).
    pub(super) fn ignores_merges(self) -> bool {
        self == Self::Llama3
    }

    /// Whether llama.cpp adds BOS for this family when `tokenizer.ggml.add_bos_token` is
    /// absent (for the other BPE families it does not).
    pub(super) fn adds_bos(self) -> bool {
        self == Self::Llama3
    }

    /// The `tokenizers` pre-tokenizer equivalent to llama.cpp's regex list.
    ///
    /// llama.cpp applies its regexes one after another, each splitting the pieces left by the
    /// previous one into matches and the text between them; that is `Split` with `Isolated`.
    pub(super) fn build(self) -> Result<PreTokenizerWrapper> {
        // add_prefix_space = false: GGUF `tokenizer.ggml.add_space_prefix` is false for every
        // byte-level family here, and llama.cpp never adds one for BPE.
        let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(Into::into)
            .map_err(|source| TokenizerError::Build { source })
        };
        Ok(match self {
            Self::Gpt2 => byte_level(true).into(),
            // This is also the pipeline in SmolLM2's tokenizer.json. `Digits` tests
            // `char::is_numeric`, i.e. \p{N}, so each number character becomes its own piece.
            Self::DigitsThenGpt2 => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            Self::LlamaDefault => Sequence::new(vec![
                split(r"[\p{P}\$\+<=>\^~\|]+")?,
                split(GPT2_REGEX)?,
                split(r"\p{N}+")?,
                split("[0-9][0-9][0-9]")?,
                byte_level(false).into(),
            ])
            .into(),
            Self::Llama3 => {
                Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false).into()]).into()
            }
            Self::Qwen2 => {
                Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false).into()]).into()
            }
        })
    }
}
