//! Tests of the SentencePiece tokenizer: a tiny vocabulary built here, and Gemma 3's against
//! ids recorded from llama.cpp (`../testdata/gemma3_reference.py`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;
use proptest::prelude::*;

use super::attr;
use crate::gguf::meta::Metadata;
use crate::testing::{gguf_content, real_gemma_content};
use crate::tokenizer::{
    KEY_ADD_BOS, KEY_ADD_EOS, KEY_ADD_SPACE_PREFIX, KEY_BOS, KEY_EOS, KEY_MODEL, KEY_SCORES,
    KEY_TOKEN_TYPE, KEY_TOKENS, Model, TokenStream, Tokenizer, TokenizerError,
};

/// Special tokens of the tiny vocabulary: text and GGUF token type.
const SPECIALS: &[(&str, i32)] = &[
    ("<unk>", 2),
    ("<s>", 3),
    ("</s>", 3),
    ("<start_of_turn>", 3),
    ("<b>", 4),
    ("\n", 4),
    ("\n\n", 4),
    // User-defined in the file, made control by llama.cpp's end-of-generation list.
    ("<end_of_turn>", 4),
    ("qrs", 4),
    ("pq", 4),
];

/// Normal tokens of the tiny vocabulary with their scores: the merge paths to "▁hello" and
/// "▁world", and "ab" / "bc" tied.
const PIECES: &[(&str, f32)] = &[
    ("\u{2581}", -1.0),
    ("h", -2.0),
    ("e", -2.0),
    ("l", -2.0),
    ("o", -2.0),
    ("w", -2.0),
    ("r", -2.0),
    ("d", -2.0),
    ("a", -2.0),
    ("b", -2.0),
    ("c", -2.0),
    ("he", -3.0),
    ("ll", -4.0),
    ("hell", -5.0),
    ("hello", -6.0),
    ("\u{2581}hello", -7.0),
    ("\u{2581}w", -8.0),
    ("or", -9.0),
    ("\u{2581}wor", -10.0),
    ("ld", -11.0),
    ("\u{2581}world", -12.0),
    ("ab", -20.0),
    ("bc", -20.0),
];

/// Id of the first byte token `<0x00>`.
const BYTE_BASE: u32 = SPECIALS.len() as u32;

fn tiny_metadata() -> Metadata {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|(t, _)| (*t).to_owned()).collect();
    let mut types: Vec<i32> = SPECIALS.iter().map(|&(_, ty)| ty).collect();
    let mut scores = vec![0.0f32; SPECIALS.len()];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (text, score) in PIECES {
        tokens.push((*text).to_owned());
        types.push(1);
        scores.push(*score);
    }
    let mut md = Metadata::new();
    md.insert(KEY_MODEL.into(), Value::String("llama".into()));
    md.insert(
        KEY_TOKENS.into(),
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    md.insert(
        KEY_TOKEN_TYPE.into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    md.insert(
        KEY_SCORES.into(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    md.insert(KEY_BOS.into(), Value::U32(1));
    md.insert(KEY_EOS.into(), Value::U32(2));
    md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(true));
    md
}

fn build(md: Metadata) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&gguf_content(md))
}

fn tiny() -> Tokenizer {
    build(tiny_metadata()).expect("tiny spm")
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text)
        .unwrap_or_else(|| panic!("{text:?} is not in the vocabulary"))
}

fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts.iter().map(|t| id(tok, t)).collect()
}

/// Replaces entry `index` of the array under `key`.
fn set(md: &mut Metadata, key: &str, index: usize, value: Value) {
    match md.get_mut(key) {
        Some(Value::Array(items)) => items[index] = value,
        _ => panic!("{key} is not an array"),
    }
}

fn attrs_of(tok: &Tokenizer) -> &[u8] {
    match &tok.model {
        Model::Spm(spm) => &spm.attrs,
        Model::Bpe(_) => panic!("not a sentencepiece tokenizer"),
    }
}

#[test]
fn tiny_merges_by_score_with_space_prefix() {
    let tok = tiny();
    assert_eq!(
        tok.encode("hello world").expect("encode"),
        ids(&tok, &["\u{2581}hello", "\u{2581}world"])
    );
    // Without the prefix the first word has no "▁".
    let mut md = tiny_metadata();
    md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
    let bare = build(md).expect("no prefix");
    assert_eq!(
        bare.encode("hello world").expect("encode"),
        ids(&bare, &["hello", "\u{2581}world"])
    );
    assert_eq!(bare.encode("").expect("encode"), Vec::<u32>::new());
    assert_eq!(tok.encode("").expect("encode"), Vec::<u32>::new());
}

#[test]
fn tiny_ties_go_to_the_leftmost_pair() {
    let mut md = tiny_metadata();
    md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
    let tok = build(md.clone()).expect("tiny");
    assert_eq!(tok.encode("abc").expect("encode"), ids(&tok, &["ab", "c"]));

    // "bc" scored above "ab" wins although it is further right.
    let bc = SPECIALS.len() + 256 + PIECES.len() - 1;
    set(&mut md, KEY_SCORES, bc, Value::F32(-19.0));
    let tok = build(md).expect("tiny");
    assert_eq!(tok.encode("abc").expect("encode"), ids(&tok, &["a", "bc"]));
}

#[test]
fn tiny_unknown_characters_fall_back_to_bytes() {
    let tok = tiny();
    // "é" is C3 A9 and no token: the prefix space is "▁", the rest two byte tokens.
    let want = vec![id(&tok, "\u{2581}"), BYTE_BASE + 0xC3, BYTE_BASE + 0xA9];
    assert_eq!(tok.encode("é").expect("encode"), want);
    assert_eq!(tok.decode(&want).expect("decode"), "é");
    assert_eq!(
        tok.token_bytes(BYTE_BASE + 0xC3).expect("bytes"),
        vec![0xC3]
    );

    // A byte token missing from the vocabulary is an error when a text needs it.
    let mut md = tiny_metadata();
    let c3 = (BYTE_BASE + 0xC3) as usize;
    set(&mut md, KEY_TOKENS, c3, Value::String("xC3".into()));
    set(&mut md, KEY_TOKEN_TYPE, c3, Value::I32(1));
    let tok = build(md).expect("tiny");
    assert!(matches!(
        tok.encode("é"),
        Err(TokenizerError::MissingByteToken { byte: 0xC3 })
    ));
    assert!(tok.encode("hello").is_ok());
}

#[test]
fn tiny_special_tokens_are_cut_out_like_llama_cpp() {
    let tok = tiny();
    // A control token is matched; the text after it gets the space prefix again.
    assert_eq!(
        tok.encode("<s>hello").expect("encode"),
        vec![1, id(&tok, "\u{2581}hello")]
    );
    // The longest special token is cut out first wherever it is, not the leftmost: "qrs"
    // before "pq" in "pqrs".
    assert_eq!(
        tok.encode("pqrs").expect("encode"),
        vec![
            id(&tok, "\u{2581}"),
            BYTE_BASE + u32::from(b'p'),
            id(&tok, "qrs")
        ]
    );
    assert_eq!(
        tok.encode("\n\n\n").expect("encode"),
        ids(&tok, &["\n\n", "\n"])
    );
    // User-defined tokens are cut out of data too; control and unknown ones are not.
    let plain = tok.encode_plain("a<b>b").expect("encode");
    assert!(plain.contains(&id(&tok, "<b>")), "{plain:?}");
    for text in ["<s>", "</s>", "<unk>", "<start_of_turn>x", "<end_of_turn>"] {
        let special = tok.encode(text).expect("encode");
        assert!(special.contains(&id(&tok, text.trim_end_matches('x'))));
        let plain = tok.encode_plain(text).expect("encode");
        let attrs = attrs_of(&tok);
        assert!(
            plain
                .iter()
                .all(|&i| attrs[i as usize] & (attr::CONTROL | attr::UNKNOWN) == 0),
            "{text:?} gave {plain:?}"
        );
        assert_eq!(tok.decode(&plain).expect("decode"), text);
    }
    assert_eq!(
        tok.control_text_in("x<end_of_turn>y<s>"),
        Some("<end_of_turn>")
    );
    assert_eq!(tok.control_text_in("<b>\n\n"), None);
    assert_eq!(tok.control_text_in("<unk>"), Some("<unk>"));
}

#[test]
fn tiny_plain_never_merges_into_a_control_token() {
    // A control token reachable by merges: "hell" + "o" would make it.
    let mut md = tiny_metadata();
    md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
    set(
        &mut md,
        KEY_TOKEN_TYPE,
        SPECIALS.len() + 256 + 14,
        Value::I32(3),
    );
    let tok = build(md).expect("tiny");
    let hello = id(&tok, "hello");
    assert_eq!(tok.encode("hello").expect("encode"), vec![hello]);
    let plain = tok.encode_plain("hello").expect("encode");
    assert_eq!(plain, ids(&tok, &["hell", "o"]));
    assert_eq!(tok.decode(&plain).expect("decode"), "hello");
}

#[test]
fn tiny_decode_removes_only_the_first_prefix_space() {
    let tok = tiny();
    let hello = id(&tok, "\u{2581}hello");
    let world = id(&tok, "\u{2581}world");
    assert_eq!(tok.decode(&[hello, world]).expect("decode"), "hello world");
    assert_eq!(tok.token_bytes(hello).expect("bytes"), b" hello");
    // After a leading control token nothing is removed, as in llama.cpp.
    assert_eq!(tok.decode(&[1, hello]).expect("decode"), "<s> hello");
    assert!(matches!(
        tok.decode(&[hello, 9999]),
        Err(TokenizerError::UnknownId { id: 9999, .. })
    ));
}

#[test]
fn tiny_stream_joins_byte_tokens() {
    let tok = tiny();
    let mut stream = TokenStream::new();
    assert_eq!(stream.push(&tok, BYTE_BASE + 0xC3).expect("push"), "");
    assert_eq!(stream.push(&tok, BYTE_BASE + 0xA9).expect("push"), "é");
    assert_eq!(
        stream.push(&tok, id(&tok, "\u{2581}world")).expect("push"),
        " world"
    );
    assert_eq!(stream.finish(), "");
}

#[test]
fn tiny_special_ids_and_their_defaults() {
    let tok = tiny();
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), 2));
    assert!(tok.add_bos_token() && !tok.add_eos_token());
    assert_eq!(tok.add_special(vec![7]), vec![1, 7]);
    assert_eq!(tok.stop_ids(), vec![2, id(&tok, "<end_of_turn>")]);

    // llama.cpp's SentencePiece defaults: BOS 1, EOS 2, BOS added.
    let mut md = tiny_metadata();
    md.remove(KEY_BOS);
    md.remove(KEY_EOS);
    md.insert(KEY_ADD_EOS.into(), Value::Bool(true));
    let tok = build(md).expect("defaults");
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), 2));
    assert_eq!(tok.add_special(vec![7]), vec![1, 7, 2]);

    let mut md = tiny_metadata();
    md.insert(KEY_ADD_BOS.into(), Value::Bool(false));
    assert_eq!(build(md).expect("no bos").add_special(vec![7]), vec![7]);
}

#[test]
fn tiny_bad_metadata_gives_typed_errors() {
    let mut md = tiny_metadata();
    if let Some(Value::Array(scores)) = md.get_mut(KEY_SCORES) {
        scores.pop();
    }
    let err = build(md).err();
    assert!(
        matches!(&err, Some(TokenizerError::ScoreCount { scores, tokens }) if scores + 1 == *tokens),
        "{err:?}"
    );

    let mut md = tiny_metadata();
    set(&mut md, KEY_SCORES, 3, Value::F32(f32::NAN));
    assert!(matches!(
        build(md),
        Err(TokenizerError::ScoreNotANumber { id: 3 })
    ));

    let mut md = tiny_metadata();
    set(
        &mut md,
        KEY_TOKENS,
        BYTE_BASE as usize,
        Value::String("<0x+0>".into()),
    );
    assert!(matches!(
        build(md),
        Err(TokenizerError::MalformedByteToken { id, .. }) if id == BYTE_BASE
    ));

    let mut md = tiny_metadata();
    set(&mut md, KEY_TOKENS, 4, Value::String("<s>".into()));
    assert!(matches!(
        build(md),
        Err(TokenizerError::DuplicateToken {
            first: 1,
            second: 4,
            ..
        })
    ));

    let mut md = tiny_metadata();
    md.insert(KEY_BOS.into(), Value::U32(100_000));
    assert!(matches!(
        build(md),
        Err(TokenizerError::SpecialIdOutOfRange {
            key: KEY_BOS,
            id: 100_000,
            ..
        })
    ));

    let mut md = tiny_metadata();
    md.insert(KEY_SCORES.into(), Value::String("high".into()));
    assert!(matches!(build(md), Err(TokenizerError::Metadata(_))));

    let mut md = tiny_metadata();
    md.insert(KEY_MODEL.into(), Value::String("t5".into()));
    let err = build(md).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("`t5`") && err.contains("`gpt2`") && err.contains("`llama`"),
        "{err}"
    );
}

#[test]
fn tiny_fingerprint_follows_scores_and_space_prefix() {
    let a = tiny();
    assert_eq!(a.fingerprint(), tiny().fingerprint());
    let mut md = tiny_metadata();
    set(
        &mut md,
        KEY_SCORES,
        BYTE_BASE as usize + 256,
        Value::F32(-1.5),
    );
    assert_ne!(a.fingerprint(), build(md).expect("rescored").fingerprint());
    let mut md = tiny_metadata();
    md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
    assert_ne!(a.fingerprint(), build(md).expect("no prefix").fingerprint());
    let shown = format!("{a:?}");
    assert!(shown.contains("\"llama\"") && shown.len() < 300, "{shown}");
}

/// The merge as it is defined: while the text of some pair of neighbours is a token, merge
/// the pair whose token scores highest, the leftmost of equals. Returns the pieces.
fn merge_by_definition(scores: &BTreeMap<String, f32>, text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = text.chars().map(String::from).collect();
    loop {
        let mut best: Option<(f32, usize)> = None;
        for i in 1..pieces.len() {
            let merged = format!("{}{}", pieces[i - 1], pieces[i]);
            if let Some(&score) = scores.get(&merged)
                && best.is_none_or(|(s, _)| score > s)
            {
                best = Some((score, i - 1));
            }
        }
        let Some((_, i)) = best else {
            return pieces;
        };
        let right = pieces.remove(i + 1);
        pieces[i].push_str(&right);
    }
}

proptest! {
    /// Random vocabularies over a few letters, with tied scores: the heap-driven merge gives
    /// what the definition gives, and every text decodes back.
    #[test]
    fn merge_agrees_with_its_definition(
        merged in prop::collection::btree_map("[ab\u{2581}c]{2,4}", -2i8..=2, 0..40),
        text in "[abc é]{0,24}",
        prefix in any::<bool>(),
    ) {
        let scores: BTreeMap<String, f32> =
            merged.into_iter().map(|(t, s)| (t, f32::from(s))).collect();
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.resize(tokens.len(), 6);
        tokens.extend(["a", "b", "c", "\u{2581}"].map(String::from));
        tokens.extend(scores.keys().cloned());
        types.resize(tokens.len(), 1);
        let mut token_scores = vec![0.0f32; tokens.len() - scores.len()];
        token_scores.extend(scores.values());
        let mut md = tiny_metadata();
        md.insert(KEY_TOKENS.into(), Value::Array(tokens.into_iter().map(Value::String).collect()));
        md.insert(KEY_TOKEN_TYPE.into(), Value::Array(types.into_iter().map(Value::I32).collect()));
        md.insert(KEY_SCORES.into(), Value::Array(token_scores.into_iter().map(Value::F32).collect()));
        md.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(prefix));
        let tok = build(md).expect("random vocabulary");

        let spaced = if prefix && !text.is_empty() { format!(" {text}") } else { text.clone() };
        let want: Vec<u32> = merge_by_definition(&scores, &spaced.replace(' ', "\u{2581}"))
            .iter()
            .flat_map(|piece| match tok.token_id(piece) {
                Some(id) => vec![id],
                None => piece.bytes().map(|b| 3 + u32::from(b)).collect(),
            })
            .collect();
        let got = tok.encode_plain(&text).expect("encode");
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(tok.decode(&got).expect("decode"), text);
    }
}

// ---- Gemma 3 against llama.cpp ----

/// What `gemma3_reference.py` records.
#[derive(serde::Deserialize)]
struct Reference {
    model: String,
    bos: u32,
    eos: u32,
    add_bos: bool,
    add_eos: bool,
    cases: Vec<Case>,
}

/// One text: llama.cpp's ids with BOS added, control text taken as data (`plain`) or as
/// control tokens (`special`), and `llama_detokenize` of each.
#[derive(serde::Deserialize)]
struct Case {
    text: String,
    plain: Vec<u32>,
    special: Vec<u32>,
    plain_detokenized: String,
    special_detokenized: String,
}

fn reference() -> Reference {
    serde_json::from_str(include_str!("../testdata/gemma3_reference.json"))
        .expect("gemma3_reference.json parses")
}

fn gemma() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let content = real_gemma_content()?;
    Some(TOK.get_or_init(|| Tokenizer::from_gguf(content).expect("build gemma 3's tokenizer")))
}

#[test]
fn real_gemma_metadata_is_read() {
    let Some(tok) = gemma() else { return };
    let r = reference();
    assert_eq!(r.model, crate::GEMMA3_270M_FILE);
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(r.bos), r.eos));
    assert_eq!(
        (tok.add_bos_token(), tok.add_eos_token()),
        (r.add_bos, r.add_eos)
    );
    assert_eq!(tok.token_id("<start_of_turn>"), Some(105));
    assert_eq!(tok.token_id("<end_of_turn>"), Some(106));
    assert_eq!(tok.stop_ids(), vec![1, 106]);
    // `</s>` is user-defined in the file and control to llama.cpp; `<table>` stays user-defined.
    assert_eq!(tok.control_text_in("a</s>b"), Some("</s>"));
    assert_eq!(tok.control_text_in("<table>\n\n  "), None);
    assert_eq!(
        tok.control_text_in("<start_of_turn>user"),
        Some("<start_of_turn>")
    );
}

#[test]
fn real_gemma_ids_match_llama_cpp() {
    let Some(tok) = gemma() else { return };
    let r = reference();
    assert!(r.cases.len() > 80);
    let mut failures = Vec::new();
    for case in &r.cases {
        for (mode, want, detokenized) in [
            ("plain", &case.plain, &case.plain_detokenized),
            ("special", &case.special, &case.special_detokenized),
        ] {
            let got = if mode == "plain" {
                tok.encode_plain(&case.text)
            } else {
                tok.encode(&case.text)
            }
            .map(|ids| tok.add_special(ids));
            match got {
                Ok(got) if got == *want => {}
                Ok(got) => failures.push(format!(
                    "{mode} {:?}: llama.cpp {want:?}, ours {got:?}",
                    case.text
                )),
                Err(e) => failures.push(format!("{mode} {:?}: {e}", case.text)),
            }
            match tok.decode(want) {
                Ok(text) if text == *detokenized => {}
                other => failures.push(format!(
                    "{mode} {:?}: llama.cpp detokenizes to {detokenized:?}, we decode {other:?}",
                    case.text
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn real_gemma_round_trips_where_llama_cpp_does() {
    let Some(tok) = gemma() else { return };
    let mut round_trips = 0;
    for case in reference().cases {
        if case.special_detokenized != format!("<bos>{}", case.text) {
            // Only "▁" in the text, which is a space to SentencePiece.
            assert!(case.text.contains('\u{2581}'), "{:?}", case.text);
            continue;
        }
        for ids in [
            tok.encode(&case.text).expect("encode"),
            tok.encode_plain(&case.text).expect("encode"),
        ] {
            assert_eq!(tok.decode(&ids).expect("decode"), case.text);
        }
        round_trips += 1;
    }
    assert!(round_trips > 80);
}

#[test]
fn real_gemma_plain_encoding_makes_no_control_token() {
    let Some(tok) = gemma() else { return };
    let attrs = attrs_of(tok);
    let control: Vec<u32> = (0u32..)
        .zip(attrs)
        .filter(|&(_, &a)| a & attr::CONTROL != 0)
        .map(|(id, _)| id)
        .collect();
    // 7 control tokens, </s>, and 6242 <unusedN>.
    assert_eq!(control.len(), 7 + 1 + 6242);
    let mut texts: Vec<String> = reference().cases.into_iter().map(|c| c.text).collect();
    texts.extend(control.iter().map(|&id| {
        let text = String::from_utf8(tok.token_bytes(id).expect("bytes")).expect("utf-8");
        format!("x{text}y {text}")
    }));
    for text in &texts {
        let ids = tok.encode_plain(text).expect("encode");
        assert!(
            ids.iter().all(|&i| attrs[i as usize] & attr::CONTROL == 0),
            "{text:?} gave {ids:?}"
        );
        assert_eq!(tok.decode(&ids).expect("decode"), tok_text(text));
    }
}

/// What a text decodes to: SentencePiece reads "▁" as a space.
fn tok_text(text: &str) -> String {
    text.replace('\u{2581}', " ")
}

#[test]
fn real_gemma_stream_matches_decode() {
    let Some(tok) = gemma() else { return };
    for case in reference().cases {
        let mut stream = TokenStream::new();
        let mut streamed = String::new();
        for &i in &case.special {
            let piece = stream.push(tok, i).expect("push");
            assert!(
                !piece.contains('\u{FFFD}'),
                "{:?} gave U+FFFD mid-stream",
                case.text
            );
            streamed.push_str(&piece);
        }
        streamed.push_str(&stream.finish());
        assert_eq!(streamed, tok.decode(&case.special).expect("decode"));
    }
}

#[test]
fn real_gemma_fingerprint_is_its_own() {
    let (Some(tok), Some(content)) = (gemma(), real_gemma_content()) else {
        return;
    };
    let again = Tokenizer::from_gguf(content).expect("rebuild");
    assert_eq!(tok.fingerprint(), again.fingerprint());
    assert_ne!(tok.fingerprint(), tiny().fingerprint());
}
