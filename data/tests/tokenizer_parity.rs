//! Token ids and chat rendering equal Python `tokenizers` + the real Qwen3 jinja template.

mod common;

use moeru_data::chat::{render, Message};
use moeru_data::tokenizer::TextTokenizer;
use serde_json::Value;

#[test]
fn token_ids_match_python_tokenizers() {
    let tok = TextTokenizer::from_file(&common::tokenizer_path()).unwrap();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("tokenizer_parity.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        fixture["vocab_size"].as_u64().unwrap() as usize,
        tok.vocab_size()
    );
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode_ids(text).unwrap(), want, "text {text:?}");
    }
}

#[test]
fn chat_rendering_matches_qwen3_jinja_template() {
    let tok = TextTokenizer::from_file(&common::tokenizer_path()).unwrap();
    let expected: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("chat_expected.json")).unwrap(),
    )
    .unwrap();
    let convs = std::fs::read_to_string(common::fixtures().join("chat.jsonl")).unwrap();
    let convs: Vec<&str> = convs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(convs.len(), expected.len());
    for (line, want) in convs.iter().zip(&expected) {
        let v: Value = serde_json::from_str(line).unwrap();
        let msgs: Vec<Message> = serde_json::from_value(v["messages"].clone()).unwrap();
        let r = render(&msgs).unwrap();
        assert_eq!(r.text, want["text"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
        assert_eq!(tok.encode_ids(&r.text).unwrap(), ids);
    }
}
