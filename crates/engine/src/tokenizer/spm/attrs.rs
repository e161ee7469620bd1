//! Token attributes as llama.cpp derives them (`llama_vocab::impl::load`): from the GGUF
//! token types, then adjusted by token text, which decides what counts as a control token.

use super::vocab::Vocab;
use crate::gguf::meta::{self as gguf_meta, Metadata};

/// llama.cpp's `llama_token_attr` bits, which it derives from the GGUF token types
/// (`tokenizer.ggml.token_type`) and then adjusts by token text.
pub(super) mod attr {
    pub(in crate::tokenizer::spm) const UNKNOWN: u8 = 1 << 0;
    pub(in crate::tokenizer::spm) const UNUSED: u8 = 1 << 1;
    pub(in crate::tokenizer::spm) const NORMAL: u8 = 1 << 2;
    pub(in crate::tokenizer::spm) const CONTROL: u8 = 1 << 3;
    pub(in crate::tokenizer::spm) const USER_DEFINED: u8 = 1 << 4;
    pub(in crate::tokenizer::spm) const BYTE: u8 = 1 << 5;
}

/// Token texts llama.cpp treats as end-of-generation whatever their type, and so makes
/// control tokens (`llama_vocab::impl::load`, the `special_eog_ids` list; its end-of-turn
/// and end-of-message lists are contained in this one). Gemma 3's `</s>`, stored as
/// user-defined, becomes control this way: with control text not recognized it is plain text.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// Fill-in-the-middle token texts llama.cpp makes control tokens when the file does not name
/// that token by id (its `special_fim_*_id` detection): the metadata keys, then the texts.
const FILL_IN_THE_MIDDLE: &[(&[&str], &[&str])] = &[
    (
        &[
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
        ],
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
            "<PRE>",
            "\u{2581}<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_suf_token_id",
            "tokenizer.ggml.suffix_token_id",
        ],
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
            "<SUF>",
            "\u{2581}<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.middle_token_id",
        ],
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
            "<MID>",
            "\u{2581}<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        &["tokenizer.ggml.fim_pad_token_id"],
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        &["tokenizer.ggml.fim_rep_token_id"],
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    (&["tokenizer.ggml.fim_sep_token_id"], &["<|file_sep|>"]),
];

/// Texts llama.cpp always renders and matches as user-defined tokens (its gpt-oss rule).
const ALWAYS_USER_DEFINED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// The attribute bits of every token: [`of_type`] of its GGUF type, then [`adjust_by_text`].
pub(super) fn of_tokens(md: &Metadata, vocab: &Vocab, token_types: &[i32]) -> Vec<u8> {
    let mut attrs: Vec<u8> = token_types.iter().map(|&ty| of_type(ty)).collect();
    adjust_by_text(md, vocab, &mut attrs);
    attrs
}

/// llama.cpp's attribute for a GGUF token type (`LLAMA_TOKEN_TYPE_*`).
fn of_type(token_type: i32) -> u8 {
    match token_type {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0,
    }
}

/// The attribute changes llama.cpp makes by token text after reading the types: end-of-
/// generation and (unnamed) fill-in-the-middle texts become control tokens, a few gpt-oss
/// texts user-defined ones, and two vocabulary-specific exceptions.
///
/// llama.cpp marks only the first fill-in-the-middle text of each kind it meets in hash-map
/// order; we mark all of them (a vocabulary holding two spellings of one is unlikely).
fn adjust_by_text(md: &Metadata, vocab: &Vocab, attrs: &mut [u8]) {
    let id_of = |text: &str| vocab.id(text).map(|id| id as usize);
    let make_control = |text: &str, attrs: &mut [u8]| {
        if let Some(a) = id_of(text).and_then(|id| attrs.get_mut(id)) {
            *a |= attr::CONTROL;
        }
    };
    for (keys, texts) in FILL_IN_THE_MIDDLE {
        if keys.iter().any(|key| named_in_vocab(md, key, attrs.len())) {
            continue;
        }
        for text in *texts {
            make_control(text, attrs);
        }
    }
    for text in END_OF_GENERATION_TEXTS {
        make_control(text, attrs);
    }
    for text in ALWAYS_USER_DEFINED {
        if let Some(a) = id_of(text).and_then(|id| attrs.get_mut(id)) {
            *a = attr::USER_DEFINED;
        }
    }
    let has = |text: &str| id_of(text).is_some();
    // gpt-oss and solar-open: `<|end|>` ends a message, not the generation.
    if has("<|end|>")
        && ((has("<|return|>") && has("<|call|>")) || (has("<|calls|>") && has("<|flush|>")))
        && let Some(a) = id_of("<|end|>").and_then(|id| attrs.get_mut(id))
    {
        *a = attr::USER_DEFINED;
    }
    // Gemma 4 and PaddleOCR: `</s>` is ordinary text there.
    if has("<|tool_response>")
        && let Some(a) = id_of("</s>").and_then(|id| attrs.get_mut(id))
    {
        *a = attr::NORMAL;
    }
}

/// Whether `key` holds a token id inside the vocabulary (llama.cpp ignores one outside it).
fn named_in_vocab(md: &Metadata, key: &str, vocab_size: usize) -> bool {
    gguf_meta::opt_u32(md, key)
        .ok()
        .flatten()
        .is_some_and(|id| (id as usize) < vocab_size)
}
