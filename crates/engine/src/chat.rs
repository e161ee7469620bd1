//! Chat prompts rendered with the model's own Jinja template (`tokenizer.chat_template`).
//!
//! The template is run with minijinja configured like Hugging Face `transformers` renders
//! chat templates (`trim_blocks`, `lstrip_blocks`, a `raise_exception` function), plus the
//! handful of Python string and dict methods that published templates call.

use std::fmt;

use candle_core::quantized::gguf_file::Content;
use minijinja::value::{Value, ValueKind, from_args};
use minijinja::{Environment, Error, ErrorKind, State, context};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use crate::gguf_meta;
use crate::tokenizer::{Result, TokenizerError};

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const TEMPLATE_NAME: &str = "chat_template";

/// Who wrote a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person (or program) talking to the model.
    User,
    /// The model.
    Assistant,
    /// Output of a tool the assistant called.
    Tool,
}

impl Role {
    /// The role name templates compare against (`"system"`, `"user"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One turn of a conversation, as chat templates see it: `{role, content}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written.
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fingerprint: String,
}

impl ChatTemplate {
    /// The template in `tokenizer.chat_template`, with `bos_token` / `eos_token` set to the
    /// text of the file's BOS / EOS tokens (empty when the file names none).
    ///
    /// A file without a template is an error ([`TokenizerError::MissingChatTemplate`]), not a
    /// silent fallback to some default format.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let source =
            gguf_meta::opt_string(md, KEY_TEMPLATE)?.ok_or(TokenizerError::MissingChatTemplate)?;
        let token_text = |key: &'static str| -> Result<String> {
            let Some(id) = gguf_meta::opt_u32(md, key)? else {
                return Ok(String::new());
            };
            let tokens = gguf_meta::string_array(md, KEY_TOKENS)?;
            let vocab_size = tokens.len();
            tokens.get(id as usize).map(|t| (*t).to_owned()).ok_or(
                TokenizerError::SpecialIdOutOfRange {
                    key,
                    id,
                    vocab_size,
                },
            )
        };
        Self::new(
            source.to_owned(),
            &token_text(KEY_BOS)?,
            &token_text(KEY_EOS)?,
        )
    }

    /// Compiles `source`; `bos_token` and `eos_token` are the texts the template sees under
    /// those names.
    pub fn new(source: String, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders chat templates with these two on; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|source| TokenizerError::TemplateSyntax { source })?;
        let fingerprint = {
            let mut tagged = b"agentkv-chat-template-v1\0".to_vec();
            tagged.extend_from_slice(source.as_bytes());
            format!("{:032x}", xxh3_128(&tagged))
        };
        Ok(Self {
            env,
            source,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            fingerprint,
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends with the opening
    /// of an assistant turn, ready for generation.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|source| TokenizerError::TemplateRender { source })?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|source| TokenizerError::TemplateRender { source })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Stable hex hash of the template source: a prompt cached under another template may
    /// render differently.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Templates call `raise_exception("...")` to reject conversations they cannot format.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The Python `str` and `dict` methods that published chat templates use, which minijinja
/// does not have (`message['content'].strip()`, `tool.items()`, ...).
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    match value.kind() {
        ValueKind::String => string_method(state, value, method, args),
        ValueKind::Map => map_method(state, value, method, args),
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn string_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    let s = value.as_str().unwrap_or_default();
    let strip_set = |args: &[Value]| -> std::result::Result<Option<Vec<char>>, Error> {
        let (chars,): (Option<&str>,) = from_args(args)?;
        Ok(chars.map(|c| c.chars().collect()))
    };
    Ok(match method {
        "strip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_matches(set.as_slice()),
            None => s.trim(),
        }),
        "lstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_start_matches(set.as_slice()),
            None => s.trim_start(),
        }),
        "rstrip" => Value::from(match strip_set(args)? {
            Some(set) => s.trim_end_matches(set.as_slice()),
            None => s.trim_end(),
        }),
        "startswith" | "endswith" => {
            let (affix,): (Value,) = from_args(args)?;
            // Python takes one string or a tuple of them.
            let affixes: Vec<Value> = match affix.kind() {
                ValueKind::Seq => affix.try_iter()?.collect(),
                _ => vec![affix],
            };
            let test = |a: &Value| {
                a.as_str().is_some_and(|a| {
                    if method == "startswith" {
                        s.starts_with(a)
                    } else {
                        s.ends_with(a)
                    }
                })
            };
            Value::from(affixes.iter().any(test))
        }
        "upper" | "lower" | "title" | "capitalize" => {
            let _: () = from_args(args)?;
            state.apply_filter(method, std::slice::from_ref(value))?
        }
        "replace" => {
            let (old, new): (&str, &str) = from_args(args)?;
            Value::from(s.replace(old, new))
        }
        "split" => {
            let (sep,): (Option<&str>,) = from_args(args)?;
            let parts: Vec<Value> = match sep {
                None => s.split_whitespace().map(Value::from).collect(),
                Some("") => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                Some(sep) => s.split(sep).map(Value::from).collect(),
            };
            Value::from(parts)
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

fn map_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, Error> {
    Ok(match method {
        "items" => {
            let _: () = from_args(args)?;
            state.apply_filter("items", std::slice::from_ref(value))?
        }
        "keys" => {
            let _: () = from_args(args)?;
            Value::from(value.try_iter()?.collect::<Vec<_>>())
        }
        "values" => {
            let _: () = from_args(args)?;
            let values = value
                .try_iter()?
                .map(|k| value.get_item(&k))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Value::from(values)
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            match value.get_item(&key)? {
                v if v.is_undefined() => default.unwrap_or(Value::from(())),
                v => v,
            }
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use candle_core::quantized::gguf_file::{Value as GgufValue, VersionedMagic};

    use super::*;
    use crate::tokenizer::Tokenizer;
    use crate::tokenizer::tests::real_content;

    fn real() -> Option<&'static ChatTemplate> {
        static TEMPLATE: OnceLock<Option<ChatTemplate>> = OnceLock::new();
        TEMPLATE
            .get_or_init(|| real_content().map(|c| ChatTemplate::from_gguf(c).expect("template")))
            .as_ref()
    }

    fn tiny(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.to_owned(), "<s>", "</s>").expect("compile")
    }

    fn render_err(t: &ChatTemplate) -> String {
        match t.render(&[Message::user("hi")], false) {
            Err(TokenizerError::TemplateRender { source }) => source.to_string(),
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    fn content(md: HashMap<String, GgufValue>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: md,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn real_renders_system_and_user_exactly() {
        let Some(t) = real() else { return };
        let messages = [
            Message::system("You are a helpful assistant."),
            Message::user("What is the capital of France?"),
        ];
        assert_eq!(
            t.render(&messages, true).expect("render"),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&messages, false).expect("render"),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        );
    }

    #[test]
    fn real_inserts_default_system_prompt() {
        let Some(t) = real() else { return };
        let rendered = t
            .render(&[Message::user("Hi"), Message::assistant("Hello!")], true)
            .expect("render");
        assert_eq!(
            rendered,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
             Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn real_rendered_prompt_tokenizes_with_control_tokens() {
        let (Some(t), Some(c)) = (real(), real_content()) else {
            return;
        };
        let tok = Tokenizer::from_gguf(c).expect("tokenizer");
        let prompt = t.render(&[Message::user("Hi")], true).expect("render");
        let ids = tok.encode(&prompt).expect("encode");
        assert_eq!(ids.first(), Some(&1), "starts with <|im_start|>");
        assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
        assert_eq!(tok.decode(&ids).expect("decode"), prompt);
    }

    #[test]
    fn real_fingerprint_is_stable() {
        let (Some(t), Some(c)) = (real(), real_content()) else {
            return;
        };
        let again = ChatTemplate::from_gguf(c).expect("template");
        assert_eq!(t.fingerprint(), again.fingerprint());
        assert_eq!(t.fingerprint().len(), 32);
        assert!(t.source().contains("<|im_start|>"));
    }

    #[test]
    fn gguf_without_template_is_an_error() {
        let err = ChatTemplate::from_gguf(&content(HashMap::new())).err();
        assert!(matches!(err, Some(TokenizerError::MissingChatTemplate)));

        let mut md = HashMap::new();
        md.insert(KEY_TEMPLATE.to_owned(), GgufValue::U32(3));
        let err = ChatTemplate::from_gguf(&content(md)).err();
        assert!(matches!(err, Some(TokenizerError::Metadata(_))));
    }

    #[test]
    fn gguf_template_sees_bos_and_eos_text() {
        let mut md = HashMap::new();
        md.insert(
            KEY_TEMPLATE.to_owned(),
            GgufValue::String("{{ bos_token }}|{{ eos_token }}".into()),
        );
        md.insert(
            KEY_TOKENS.to_owned(),
            GgufValue::Array(vec![
                GgufValue::String("<eos>".into()),
                GgufValue::String("<bos>".into()),
            ]),
        );
        md.insert(KEY_BOS.to_owned(), GgufValue::U32(1));
        md.insert(KEY_EOS.to_owned(), GgufValue::U32(0));
        let t = ChatTemplate::from_gguf(&content(md.clone())).expect("template");
        assert_eq!(t.render(&[], false).expect("render"), "<bos>|<eos>");

        md.insert(KEY_EOS.to_owned(), GgufValue::U32(7));
        let err = ChatTemplate::from_gguf(&content(md)).err();
        assert!(matches!(
            err,
            Some(TokenizerError::SpecialIdOutOfRange {
                key: KEY_EOS,
                id: 7,
                ..
            })
        ));
    }

    #[test]
    fn syntax_error_is_reported_at_load() {
        let err = ChatTemplate::new("{% for m in messages %}".to_owned(), "", "").err();
        assert!(matches!(err, Some(TokenizerError::TemplateSyntax { .. })));
    }

    #[test]
    fn chatml_template_renders_with_trim_blocks() {
        // A ChatML template laid out over several lines, as published templates are: with
        // trim_blocks/lstrip_blocks the block tags leave no stray whitespace.
        let t = tiny(
            "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'system' %}\n\
             [S]{{ m.content }}\n  {% else %}\n[{{ m.role }}]{{ m.content }}\n  {% endif %}\n\
             {% endfor %}\n{% if add_generation_prompt %}[assistant]{% endif %}",
        );
        let out = t
            .render(&[Message::system("be brief"), Message::user("hi")], true)
            .expect("render");
        assert_eq!(out, "<s>\n[S]be brief\n[user]hi\n[assistant]");
    }

    #[test]
    fn raise_exception_becomes_a_render_error() {
        let t = tiny("{{ raise_exception('roles must alternate') }}");
        assert!(render_err(&t).contains("roles must alternate"));
    }

    #[test]
    fn python_string_methods_work() {
        let t = tiny(
            "{% for m in messages %}{{ m.content.strip() }}|{{ m.content.lstrip() }}|\
             {{ m.content.rstrip(' !') }}|{{ m.content.strip().startswith('he') }}|\
             {{ m.content.endswith(('x', '! ')) }}|{{ m.content.upper() }}|\
             {{ m.content.replace('l', 'L') }}|{{ m.content.split() | join(',') }}|\
             {{ m.content.split('l') | length }}{% endfor %}",
        );
        let out = t
            .render(&[Message::user(" hello world! ")], false)
            .expect("render");
        assert_eq!(
            out,
            "hello world!|hello world! | hello world|True|True| HELLO WORLD! |\
             \u{20}heLLo worLd! |hello,world!|4"
        );
    }

    #[test]
    fn python_dict_methods_work() {
        let t = tiny(
            "{% for m in messages %}{% for k, v in m.items() %}{{ k }}={{ v }};{% endfor %}\
             {{ m.keys() | join(',') }};{{ m.values() | join(',') }};\
             {{ m.get('role') }};{{ m.get('name', 'anon') }};{{ m.get('name') is none }}\
             {% endfor %}",
        );
        let out = t.render(&[Message::user("hi")], false).expect("render");
        assert_eq!(
            out,
            "role=user;content=hi;role,content;user,hi;user;anon;True"
        );
    }

    #[test]
    fn unknown_methods_still_fail() {
        let t = tiny("{{ messages[0].content.frobnicate() }}");
        assert!(render_err(&t).contains("unknown method"));
    }

    #[test]
    fn fingerprint_follows_source() {
        let a = tiny("{{ 1 }}");
        let b = ChatTemplate::new("{{ 1 }}".to_owned(), "x", "y").expect("compile");
        let c = tiny("{{ 2 }}");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn message_serializes_as_role_and_content() {
        let m = Message::new(Role::Tool, "42");
        let json = serde_json::to_string(&m).expect("serialize");
        assert_eq!(json, r#"{"role":"tool","content":"42"}"#);
        let back: Message = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, m);
        assert_eq!(Role::Assistant.to_string(), "assistant");
        assert!(serde_json::from_str::<Message>(r#"{"role":"robot","content":""}"#).is_err());
    }
}
