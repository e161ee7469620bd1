//! Chat prompts rendered with the model's own Jinja template (`tokenizer.chat_template`).
//!
//! The template is run with minijinja configured like Hugging Face `transformers` renders
//! chat templates (`trim_blocks`, `lstrip_blocks`, a `raise_exception` function), plus the
//! handful of Python string and dict methods that published templates call.
//!
//! A template sees `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, and no
//! clock: transformers and llama.cpp give templates `strftime_now`, and Llama 3.x's templates
//! then write the day's date into the system turn. Here those templates take their own
//! default date instead, so a conversation renders the same on every day and an agent's
//! saved cache stays a prefix of its next prompt (with the date, the first turn of each day
//! would recompute nearly all of the history).
//!
//! Message content is data: when a conversation becomes tokens, only the template's own text
//! may make control tokens such as `<|im_end|>`; see [`crate::Engine::chat_tokens`].

mod encode;
mod python;
#[cfg(test)]
mod tests;

use std::fmt;

use minijinja::{Environment, context};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use crate::gguf::GgufFile;
use crate::gguf::meta::{self as gguf_meta, MetadataError};
use crate::tokenizer::TokenizerError;
use python::{python_method, raise_exception};

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
    /// The token ids `content` had when the model generated it, if known. Not part of what the
    /// template sees or what is serialized; see [`Message::with_tokens`].
    #[serde(skip)]
    pub tokens: Option<Vec<u32>>,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tokens: None,
        }
    }

    /// This message with the token ids its content had when the model generated it.
    ///
    /// Rendering the conversation again then uses these ids for the content instead of
    /// tokenizing it, so the prompt holds exactly the tokens the model produced (a model's
    /// tokens are not always the canonical tokenization of their text) and a cache of the
    /// earlier turn stays a prefix of it. They are used only where the template inserts the
    /// content verbatim and only if they decode to exactly `content`; otherwise the content is
    /// tokenized as usual.
    pub fn with_tokens(self, tokens: Vec<u32>) -> Message {
        Message {
            tokens: Some(tokens),
            ..self
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

/// What can go wrong reading, compiling or rendering a chat template, or tokenizing what it
/// renders.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// A metadata key the template needs is of the wrong type.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The GGUF carries no `tokenizer.chat_template`.
    #[error(
        "gguf has no tokenizer.chat_template (a base model?): use a model converted with its \
         chat template, build one with ChatTemplate::new, or give the model raw text"
    )]
    Missing,
    /// The chat template does not parse.
    #[error("the chat template does not compile")]
    Syntax {
        /// The template engine's error, with line information.
        #[source]
        source: minijinja::Error,
    },
    /// Rendering the chat template failed, e.g. the template called `raise_exception`.
    #[error("rendering the chat template failed")]
    Render {
        /// The template engine's error.
        #[source]
        source: minijinja::Error,
    },
    /// Message content holds control-token text, and the chat template changes content as it
    /// renders it, so that text cannot be kept apart from the template's own control tokens.
    #[error(
        "message {index} ({role}) contains the control-token text {token:?}, and the chat \
         template does not insert message content verbatim, so it cannot be kept from acting \
         as a control token; remove that text from the message"
    )]
    ControlTextInContent {
        /// Position of the message in the conversation.
        index: usize,
        /// Its role (`"user"`, ...).
        role: &'static str,
        /// The control token whose text it contains.
        token: String,
    },
    /// The tokenizer failed on the rendered text, or a special token id is out of range.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Result of a chat-template operation.
pub type Result<T, E = TemplateError> = std::result::Result<T, E>;

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
    /// A file without a template is an error ([`TemplateError::Missing`]), not a
    /// silent fallback to some default format.
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        let md = file.metadata();
        let source = gguf_meta::opt_string(md, KEY_TEMPLATE)?.ok_or(TemplateError::Missing)?;
        let token_text = |key: &'static str| -> Result<String> {
            let Some(id) = gguf_meta::opt_u32(md, key)? else {
                return Ok(String::new());
            };
            let tokens = gguf_meta::string_array(md, KEY_TOKENS)?;
            let vocab_size = tokens.len();
            let out_of_range = TokenizerError::SpecialIdOutOfRange {
                key,
                id,
                vocab_size,
            };
            (tokens.get(id as usize).map(|t| (*t).to_owned())).ok_or(out_of_range.into())
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
            .map_err(|source| TemplateError::Syntax { source })?;
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
            .map_err(|source| TemplateError::Render { source })?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|source| TemplateError::Render { source })
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
