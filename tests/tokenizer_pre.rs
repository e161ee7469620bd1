//! The pre-tokenizer families of byte-level BPE vocabularies (`tokenizer.ggml.pre`: gpt-2,
//! smollm, default, llama-bpe for Llama 3, qwen2), each held to llama.cpp's token ids on the
//! same file: texts whose words each family splits its own way (digits alone, in threes or in
//! runs; contractions in upper case; a symbol before letters; newlines after symbols and
//! spaces), the words Llama 3 takes whole instead of merging, and whether BOS is added when
//! the file does not say.
//!
//! The files are `tests/data/vocab-*.gguf`, written by `tests/data/vocabs.py`; the reference
//! is `tests/data/vocabs_reference.json`, written by `tests/data/vocabs_reference.py`. Neither
//! script is needed to run the tests.

use std::path::PathBuf;

use engine::Tokenizer;
use serde_json::Value;

fn reference() -> Value {
    serde_json::from_str(include_str!("data/vocabs_reference.json")).expect("the reference is json")
}

fn ids(v: &Value) -> Vec<u32> {
    let list = v.as_array().expect("a list of ids");
    list.iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

#[test]
fn every_family_tokenizes_as_llama_cpp() {
    let r = reference();
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .expect("the texts")
        .iter()
        .map(|t| t.as_str().expect("a text"))
        .collect();
    let files = r["files"].as_object().expect("the files");
    assert_eq!(files.len(), 5, "one file per family");
    let mut outputs = Vec::new();
    for (file, want) in files {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("data")
            .join(file);
        let tok = Tokenizer::from_file(&path).expect("loading the vocabulary");
        assert_eq!(
            tok.pre_tokenizer_name(),
            want["pre"].as_str().expect("a name")
        );
        let theirs = want["ids"].as_array().expect("the ids");
        assert_eq!(theirs.len(), texts.len());
        let mut ours_all = Vec::new();
        for (text, theirs) in texts.iter().zip(theirs) {
            let ours = tok.encode_plain(text).expect("encoding");
            assert_eq!(ours, ids(theirs), "{file}: {text:?}");
            ours_all.push(ours);
        }
        let bos = want["add_bos"].as_bool().expect("a flag");
        assert_eq!(tok.add_bos_token(), bos, "{file}: BOS by default");
        assert_eq!(
            tok.add_special(Vec::new()),
            tok.bos_id().filter(|_| bos).into_iter().collect::<Vec<_>>()
        );
        outputs.push(ours_all);
    }
    // The texts tell the families apart: no two files give the same ids.
    for (i, a) in outputs.iter().enumerate() {
        for b in &outputs[i + 1..] {
            assert_ne!(a, b, "two families tokenized every text alike");
        }
    }
}
