//! Tests of the tokenizer: a tiny byte-level vocabulary built here, and the real model's.

use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;

use super::bpe::{byte_level_char_to_byte, parse_merges};
use super::pre::PreSplit;
use super::*;
use crate::gguf::GgufFile;
use crate::gguf::meta::Metadata;
use crate::testing::{gguf_content, real_model_content};

fn real() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let content = real_model_content()?;
    Some(TOK.get_or_init(|| Tokenizer::from_gguf(content).expect("build tokenizer")))
}

/// The byte-level symbol for a byte (GPT-2 `bytes_to_unicode`).
fn byte_to_byte_level_char(byte: u8) -> char {
    (0..=0x143u32)
        .filter_map(char::from_u32)
        .find(|&c| byte_level_char_to_byte(c) == Some(byte))
        .unwrap_or(char::REPLACEMENT_CHARACTER)
}

fn id(tok: &Tokenizer, token: &str) -> u32 {
    tok.token_id(token)
        .unwrap_or_else(|| panic!("{token:?} is not in the vocabulary"))
}

fn strings(items: &[&str]) -> Value {
    Value::Array(items.iter().map(|s| Value::String((*s).into())).collect())
}

/// A tiny byte-level vocabulary: all 256 byte symbols, a few merges, two control tokens.
fn tiny_metadata(pre: &str) -> Metadata {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
    tokens.extend((0..=255u8).map(|b| byte_to_byte_level_char(b).to_string()));
    let merged = ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "ĠĠ"];
    tokens.extend(merged.iter().map(|s| (*s).to_string()));
    let mut types = vec![Value::I32(3), Value::I32(3)];
    types.resize(tokens.len(), Value::I32(1));
    let mut md = Metadata::new();
    md.insert(KEY_MODEL.into(), Value::String("gpt2".into()));
    md.insert(KEY_PRE.into(), Value::String(pre.into()));
    md.insert(
        KEY_TOKENS.into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert(KEY_TOKEN_TYPE.into(), Value::Array(types));
    md.insert(
        KEY_MERGES.into(),
        strings(&["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "Ġ Ġ"]),
    );
    md.insert(KEY_BOS.into(), Value::U32(1));
    md.insert(KEY_EOS.into(), Value::U32(0));
    md
}

#[test]
fn types_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Tokenizer>();
    send_sync::<TokenStream>();
    send_sync::<crate::chat::ChatTemplate>();
}

#[test]
fn debug_output_is_short() {
    let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
    let shown = format!("{tok:?}");
    assert!(
        shown.contains("vocab_size: 265") && shown.len() < 300,
        "{shown}"
    );
}

#[test]
fn byte_level_table_is_a_bijection() {
    let mut seen = [false; 256];
    for c in (0..=0x143u32).filter_map(char::from_u32) {
        if let Some(b) = byte_level_char_to_byte(c) {
            assert!(!seen[usize::from(b)], "byte {b} mapped twice");
            seen[usize::from(b)] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
    assert_eq!(byte_level_char_to_byte('Ġ'), Some(b' '));
    assert_eq!(byte_level_char_to_byte('Ċ'), Some(b'\n'));
    assert_eq!(byte_level_char_to_byte('ĉ'), Some(b'\t'));
    assert_eq!(byte_level_char_to_byte('A'), Some(b'A'));
    assert_eq!(byte_level_char_to_byte('Ń'), Some(0xAD));
    assert_eq!(byte_level_char_to_byte('ń'), None);
}

#[test]
fn llama3_turn_ends_stop_generation() {
    // A Llama 3 vocabulary whose EOS is `<|end_of_text|>`: its turns end with `<|eot_id|>`,
    // or `<|eom_id|>` after a tool call.
    let mut md = tiny_metadata("llama-bpe");
    let Some(Value::Array(tokens)) = md.get_mut(KEY_TOKENS) else {
        panic!("tokens")
    };
    for (slot, text) in [(0, "<|end_of_text|>"), (1, "<|eot_id|>")] {
        tokens[slot] = Value::String(text.into());
    }
    tokens.push(Value::String("<|eom_id|>".into()));
    let Some(Value::Array(types)) = md.get_mut(KEY_TOKEN_TYPE) else {
        panic!("types")
    };
    types.push(Value::I32(3));
    md.insert(KEY_BOS.into(), Value::U32(2));
    let tok = Tokenizer::from_gguf(&gguf_content(md)).expect("tiny llama 3");
    assert_eq!(tok.eos_id(), 0);
    let eom = tok.vocab_size() as u32 - 1;
    assert_eq!(tok.stop_ids(), vec![0, 1, eom]);
    // No `tokenizer.ggml.add_bos_token`: Llama 3's family adds BOS, as llama.cpp does.
    assert!(tok.add_bos_token());
    assert_eq!(tok.add_special(vec![7]), vec![2, 7]);
}

#[test]
fn tiny_vocab_encodes_decodes_and_streams() {
    let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
    assert_eq!(tok.vocab_size(), 2 + 256 + 7);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), 0);
    assert_eq!(tok.stop_ids(), vec![0]);
    assert!(!tok.add_bos_token());

    let ids = tok.encode("<|im_start|>hello wo").expect("encode");
    assert_eq!(
        ids,
        vec![1, id(&tok, "hello"), id(&tok, "Ġwo")],
        "control token text must map to its id"
    );
    // Digits are split one by one before BPE in the smollm pre-tokenizer.
    assert_eq!(
        tok.encode("12").expect("encode"),
        vec![id(&tok, "1"), id(&tok, "2")]
    );
    for text in [
        "hello  world\n\t",
        "ü ñ 日本 🦀",
        "<|endoftext|>x<|im_start|>",
    ] {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), text);
        let mut stream = TokenStream::new();
        let mut streamed = String::new();
        for &i in &ids {
            streamed.push_str(&stream.push(&tok, i).expect("push"));
        }
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, text);
    }
}

#[test]
fn plain_encoding_keeps_control_text_as_text() {
    let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
    let text = "<|im_start|>hello<|endoftext|>";
    let ids = tok.encode_plain(text).expect("encode");
    assert!(!ids.contains(&0) && !ids.contains(&1), "{ids:?}");
    assert_eq!(tok.decode(&ids).expect("decode"), text);
    assert_eq!(
        tok.encode(text).expect("encode"),
        vec![1, id(&tok, "hello"), 0]
    );
    // Without control text the two agree.
    assert_eq!(
        tok.encode_plain("hello wo").expect("encode"),
        tok.encode("hello wo").expect("encode")
    );
    assert_eq!(tok.control_text_in(text), Some("<|endoftext|>"));
    assert_eq!(tok.control_text_in("<|im_start"), None);
}

#[test]
fn pre_tokenizer_families_split_differently() {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let pieces = |pre: PreSplit, text: &str| -> Vec<String> {
        let mut s = PreTokenizedString::from(text);
        pre.build()
            .expect("build")
            .pre_tokenize(&mut s)
            .expect("pre-tokenize");
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(piece, _, _)| piece.to_owned())
            .collect()
    };
    assert_eq!(pieces(PreSplit::Gpt2, "x 2024"), ["x", "Ġ2024"]);
    assert_eq!(
        pieces(PreSplit::DigitsThenGpt2, "x 2024"),
        ["x", "Ġ", "2", "0", "2", "4"]
    );
    // llama.cpp's `default` list cuts digit runs into threes after the GPT-2 split.
    assert_eq!(
        pieces(PreSplit::LlamaDefault, "x 12345"),
        ["x", "Ġ", "123", "45"]
    );
    // `\s+(?!\S)` leaves the last space of a run for the next word.
    assert_eq!(pieces(PreSplit::Gpt2, "a   b"), ["a", "ĠĠ", "Ġb"]);
}

#[test]
fn pre_names_follow_llama_cpp() {
    assert_eq!(
        PreSplit::from_name("smollm"),
        Some(PreSplit::DigitsThenGpt2)
    );
    assert_eq!(
        PreSplit::from_name("starcoder"),
        Some(PreSplit::DigitsThenGpt2)
    );
    assert_eq!(PreSplit::from_name("gpt-2"), Some(PreSplit::Gpt2));
    assert_eq!(PreSplit::from_name("default"), Some(PreSplit::LlamaDefault));
    assert_eq!(PreSplit::from_name("gpt2"), None);
    assert_eq!(PreSplit::from_name("llama-bpe"), Some(PreSplit::Llama3));
    assert_eq!(PreSplit::from_name("qwen2"), Some(PreSplit::Qwen2));
    assert_eq!(PreSplit::from_name("deepseek-llm"), None);
}

#[test]
fn bad_metadata_gives_typed_errors() {
    let build = |md: Metadata| Tokenizer::from_gguf(&gguf_content(md)).err();

    let mut md = tiny_metadata("smollm");
    md.remove(KEY_MODEL);
    let err = build(md);
    assert!(
        matches!(&err, Some(TokenizerError::Metadata(MetadataError::Missing { key })) if key == KEY_MODEL),
        "{err:?}"
    );
    assert!(
        err.map(|e| e.to_string())
            .is_some_and(|m| m.contains(KEY_MODEL))
    );

    let mut md = tiny_metadata("smollm");
    md.remove(KEY_TOKENS);
    assert!(matches!(
        build(md),
        Some(TokenizerError::Metadata(MetadataError::Missing { key })) if key == KEY_TOKENS
    ));

    let mut md = tiny_metadata("smollm");
    md.insert(KEY_MODEL.into(), Value::String("bert".into()));
    assert!(matches!(
        build(md),
        Some(TokenizerError::UnsupportedModel { model }) if model == "bert"
    ));

    let mut md = tiny_metadata("smollm");
    md.remove(KEY_BOS);
    md.insert(KEY_ADD_BOS.into(), Value::Bool(true));
    assert!(matches!(
        build(md),
        Some(TokenizerError::AddWithoutId {
            flag: KEY_ADD_BOS,
            key: KEY_BOS
        })
    ));

    let err = build(tiny_metadata("deepseek-llm"));
    assert!(
        matches!(&err, Some(TokenizerError::UnsupportedPreTokenizer { name }) if name == "deepseek-llm")
    );
    assert!(
        err.map(|e| e.to_string())
            .is_some_and(|m| m.contains("`deepseek-llm`")
                && m.contains("smollm")
                && m.contains("llama-bpe")
                && m.contains("qwen2"))
    );

    let mut md = tiny_metadata("smollm");
    md.insert(KEY_MERGES.into(), strings(&["h e", "noSpace"]));
    assert!(matches!(
        build(md),
        Some(TokenizerError::MalformedMerge { index: 1, .. })
    ));

    let mut md = tiny_metadata("smollm");
    md.insert(KEY_MERGES.into(), strings(&["q zz"]));
    assert!(matches!(build(md), Some(TokenizerError::Build { .. })));

    let mut md = tiny_metadata("smollm");
    md.insert(KEY_TOKEN_TYPE.into(), Value::Array(vec![Value::I32(1)]));
    assert!(matches!(
        build(md),
        Some(TokenizerError::TokenTypeCount { types: 1, .. })
    ));

    let mut md = tiny_metadata("smollm");
    md.insert(KEY_EOS.into(), Value::U32(100_000));
    assert!(matches!(
        build(md),
        Some(TokenizerError::SpecialIdOutOfRange { id: 100_000, .. })
    ));

    let mut md = tiny_metadata("smollm");
    if let Some(Value::Array(tokens)) = md.get_mut(KEY_TOKENS) {
        tokens.push(Value::String("hello".into()));
    }
    if let Some(Value::Array(types)) = md.get_mut(KEY_TOKEN_TYPE) {
        types.push(Value::I32(1));
    }
    assert!(matches!(
        build(md),
        Some(TokenizerError::DuplicateToken { token, .. }) if token == "hello"
    ));

    let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
    assert!(matches!(
        tok.decode(&[0, 9999]),
        Err(TokenizerError::UnknownId { id: 9999, .. })
    ));
}

#[test]
fn merges_split_like_llama_cpp() {
    let merges = parse_merges(&["Ġ t", "a b c", "  x"]).expect("parse");
    assert_eq!(merges[0], ("Ġ".to_owned(), "t".to_owned()));
    // Only the first space (after byte 0) separates: the right side may hold spaces.
    assert_eq!(merges[1], ("a".to_owned(), "b c".to_owned()));
    // A leading space is part of the left token (`find(' ', 1)`).
    assert_eq!(merges[2], (" ".to_owned(), "x".to_owned()));
    assert!(parse_merges(&["ab "]).is_err());
}

#[test]
fn fingerprint_is_stable_and_sensitive() {
    let a = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("a");
    let b = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("b");
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint().len(), 32);
    assert!(a.fingerprint().chars().all(|c| c.is_ascii_hexdigit()));

    let other_pre = Tokenizer::from_gguf(&gguf_content(tiny_metadata("gpt-2"))).expect("c");
    assert_ne!(a.fingerprint(), other_pre.fingerprint());

    let mut md = tiny_metadata("smollm");
    md.insert(
        KEY_MERGES.into(),
        strings(&["h e", "l l", "he ll", "hell o", "Ġ w", "Ġ Ġ", "Ġw o"]),
    );
    let reordered = Tokenizer::from_gguf(&gguf_content(md)).expect("d");
    assert_ne!(a.fingerprint(), reordered.fingerprint());

    let mut md = tiny_metadata("smollm");
    if let Some(Value::Array(types)) = md.get_mut(KEY_TOKEN_TYPE) {
        types[1] = Value::I32(1);
    }
    let retyped = Tokenizer::from_gguf(&gguf_content(md)).expect("e");
    assert_ne!(a.fingerprint(), retyped.fingerprint());
}

#[test]
fn stream_holds_back_split_characters() {
    let tok = Tokenizer::from_gguf(&gguf_content(tiny_metadata("smollm"))).expect("tiny");
    // 🦀 is F0 9F A6 80: feed it one byte token at a time.
    let crab: Vec<u32> = "🦀"
        .bytes()
        .map(|b| id(&tok, &byte_to_byte_level_char(b).to_string()))
        .collect();
    let mut stream = TokenStream::new();
    for &i in &crab[..3] {
        assert_eq!(stream.push(&tok, i).expect("push"), "");
    }
    assert_eq!(stream.push(&tok, crab[3]).expect("push"), "🦀");
    assert_eq!(stream.finish(), "");

    // An invalid byte is replaced right away; an unfinished tail only at the end.
    let ff = id(&tok, &byte_to_byte_level_char(0xFF).to_string());
    let mut stream = TokenStream::new();
    let mut out = stream.push(&tok, ff).expect("push");
    out.push_str(&stream.push(&tok, crab[0]).expect("push"));
    assert_eq!(out, "\u{FFFD}");
    out.push_str(&stream.finish());
    assert_eq!(out, "\u{FFFD}\u{FFFD}");
    assert_eq!(tok.decode(&[ff, crab[0]]).expect("decode"), out);
}

// ---- tests against the real SmolLM2 vocabulary ----

#[test]
fn real_metadata_is_read() {
    let Some(tok) = real() else { return };
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.pre_tokenizer_name(), "smollm");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), 2);
    assert!(!tok.add_bos_token());
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    // eos is <|im_end|> in this file, so it is listed once.
    assert_eq!(tok.stop_ids(), vec![2]);
}

#[test]
fn real_digits_are_split_one_by_one() {
    let Some(tok) = real() else { return };
    let expected: Vec<u32> = ["2", "0", "2", "4"].iter().map(|t| id(tok, t)).collect();
    assert_eq!(tok.encode("2024").expect("encode"), expected);
    // Checked with the python gguf reader: tokens[34] == "2", [32] == "0", [36] == "4".
    assert_eq!(expected, vec![34, 32, 34, 36]);
}

#[test]
fn real_words_take_their_leading_space() {
    let Some(tok) = real() else { return };
    assert_eq!(
        tok.encode("Hello world").expect("encode"),
        vec![id(tok, "Hello"), id(tok, "Ġworld")]
    );
    // Checked with the python gguf reader: tokens[19556] == "Hello", [905] == "Ġworld".
    assert_eq!(id(tok, "Hello"), 19556);
    assert_eq!(id(tok, "Ġworld"), 905);
}

#[test]
fn real_whitespace_run_leaves_last_space_to_next_word() {
    let Some(tok) = real() else { return };
    // The regex gives "a", "  ", " b": `\s+(?!\S)` backs off one space so the last one
    // joins the word. "ĠĠ" is a single token (merge "Ġ Ġ" is rank 4) and so is "Ġb".
    assert_eq!(
        tok.encode("a   b").expect("encode"),
        vec![id(tok, "a"), id(tok, "ĠĠ"), id(tok, "Ġb")]
    );
}

#[test]
fn real_control_tokens_are_recognized_in_text() {
    let Some(tok) = real() else { return };
    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>")
        .expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert!(ids.contains(&2));
    assert_eq!(
        ids,
        vec![1, id(tok, "user"), id(tok, "Ċ"), id(tok, "Hi"), 2]
    );
}

/// Ids from an independent Python re-implementation of llama.cpp's BPE (regex split with
/// `\p{N}` then the GPT-2 regex, rank-ordered merges) run over this GGUF's arrays.
#[test]
fn real_matches_reference_implementation() {
    let Some(tok) = real() else { return };
    let cases: &[(&str, &[u32])] = &[
        (
            "naïve café 日本語 🦀",
            &[
                3546, 46494, 37366, 17097, 241, 115, 40993, 179, 120, 248, 15107, 116, 218,
            ],
        ),
        (
            "fn main() {\n\tprintln!(\"hi\");\n}",
            &[
                7853, 1085, 1000, 1662, 198, 197, 3272, 34115, 17, 1470, 6004, 21646, 198, 109,
            ],
        ),
        (
            "I dont think they'll say 3.14159",
            &[
                57, 35047, 1510, 502, 3060, 1643, 216, 35, 30, 33, 36, 33, 37, 41,
            ],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text).expect("encode"), *want, "{text:?}");
    }
}

const ROUND_TRIP: &[&str] = &[
    "",
    " ",
    "Hello, world!",
    "  leading and trailing  ",
    "a   b\t\tc\n\n\nd \n e\r\n",
    "Café naïve résumé Ångström façade",
    "日本語のテキスト 你好，世界！ 한국어",
    "emoji: 🦀🎉👍🏽🇺🇸 ❤️ and zwj 👩‍👩‍👧",
    "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{x:?}\");\n}\n",
    "numbers 1234567890 and 3.14159 and 1,000,000 ١٢٣",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "text<|endoftext|>more<repo_name>x",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "tabs\tand\u{a0}nbsp and zero\u{200b}width",
];

#[test]
fn real_round_trip_is_exact() {
    let Some(tok) = real() else { return };
    for text in ROUND_TRIP {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), *text, "ids {ids:?}");
    }
}

#[test]
fn real_plain_encoding_round_trips_without_control_tokens() {
    let Some(tok) = real() else { return };
    for text in ROUND_TRIP {
        let ids = tok.encode_plain(text).expect("encode");
        assert_eq!(tok.decode(&ids).expect("decode"), *text, "ids {ids:?}");
        // SmolLM2's control tokens are ids 0..=16.
        assert!(ids.iter().all(|&i| i > 16), "{text:?} gave {ids:?}");
        if tok.control_text_in(text).is_none() {
            assert_eq!(ids, tok.encode(text).expect("encode"));
        }
    }
    let Model::Bpe(bpe) = &tok.model else {
        panic!("SmolLM2 is byte-level bpe")
    };
    let control: Vec<u32> = bpe.control.iter().filter_map(|t| tok.token_id(t)).collect();
    assert_eq!(control.len(), 17);
    assert!(control.iter().all(|&i| i <= 16), "{control:?}");
    assert_eq!(
        tok.control_text_in("x<|im_end|>y<repo_name>"),
        Some("<repo_name>")
    );
}

#[test]
fn real_stream_matches_decode() {
    let Some(tok) = real() else { return };
    for text in ROUND_TRIP {
        let ids = tok.encode(text).expect("encode");
        let mut stream = TokenStream::new();
        let mut streamed = String::new();
        for &i in &ids {
            let piece = stream.push(tok, i).expect("push");
            assert!(
                !piece.contains('\u{FFFD}'),
                "{text:?} gave U+FFFD mid-stream"
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, tok.decode(&ids).expect("decode"));
    }
}

#[test]
fn real_emoji_spans_tokens_without_replacement_chars() {
    let Some(tok) = real() else { return };
    let ids = tok.encode("🦀").expect("encode");
    // The crab is 4 bytes and not one token here, so the stream must hold bytes back.
    assert!(ids.len() > 1, "{ids:?}");
    let mut stream = TokenStream::new();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| stream.push(tok, i).expect("push"))
        .collect();
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    assert_eq!(pieces.concat(), "🦀");
    assert_eq!(stream.finish(), "");
}

#[test]
fn real_unrepresentable_control_byte_is_dropped() {
    let Some(tok) = real() else { return };
    // SmolLM2 has no symbol for byte 0x04 ("Ą"); llama.cpp drops it as well.
    assert_eq!(tok.token_id("Ą"), None);
    assert_eq!(
        tok.encode("a\u{4}b").expect("encode"),
        vec![id(tok, "a"), id(tok, "b")]
    );
}

#[test]
fn real_fingerprint_is_stable() {
    let Some(content) = real_model_content() else {
        return;
    };
    let tok = real().expect("the model is there");
    let again = Tokenizer::from_gguf(content).expect("rebuild");
    assert_eq!(tok.fingerprint(), again.fingerprint());
    let tiny = Tokenizer::from_gguf(&content_tiny()).expect("tiny");
    assert_ne!(tok.fingerprint(), tiny.fingerprint());
}

fn content_tiny() -> GgufFile {
    gguf_content(tiny_metadata("smollm"))
}
