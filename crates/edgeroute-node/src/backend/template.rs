//! A model's chat template: how its conversation becomes prompt text.
//!
//! Needed to continue a partial answer on upstreams that do not take `continue_final_message`
//! (llama.cpp's servers start a new assistant turn after a trailing assistant message): the
//! node renders the conversation itself, cuts the prompt right after the partial answer, and
//! asks the upstream's completions endpoint to go on from there. That is what vLLM does inside
//! for `continue_final_message`, and what llama.cpp does inside for a chat request, so with
//! greedy decoding the continued answer is the one the model would have written uncut.
//!
//! Templates are Jinja, rendered as Hugging Face's `transformers` and llama.cpp's Python server
//! render them: `trim_blocks` and `lstrip_blocks` on, Python string methods available
//! (`.strip()`, `.startswith()`…), `raise_exception(msg)` defined, `bos_token`/`eos_token` set.

use std::path::Path;

use edgeroute_proto::chat::{ChatMessage, Role};
use minijinja::{Environment, ErrorKind, Value};

const TEMPLATE: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template failed to render: {0}")]
    Render(String),
    #[error("cannot continue the answer: {0}")]
    Continue(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Loads a template from a GGUF model (`tokenizer.chat_template`), a Hugging Face
    /// `tokenizer_config.json` (`chat_template`, `bos_token`, `eos_token`), or a plain Jinja file.
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let fail =
            |reason: String| TemplateError::Load { path: path.display().to_string(), reason };
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("gguf") {
            let meta = super::gguf::read_chat(path).map_err(|e| fail(e.to_string()))?;
            let source = meta
                .chat_template
                .ok_or_else(|| fail("the model has no tokenizer.chat_template".into()))?;
            return Self::new(
                source,
                meta.bos_token.unwrap_or_default(),
                meta.eos_token.unwrap_or_default(),
            );
        }
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        if ext.eq_ignore_ascii_case("json") {
            let (source, bos, eos) = from_tokenizer_config(&text).map_err(fail)?;
            return Self::new(source, bos, eos);
        }
        Self::new(text, String::new(), String::new())
    }

    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE, source)
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt for `messages`, as the model's chat template writes it.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let tmpl =
            self.env.get_template(TEMPLATE).map_err(|e| TemplateError::Render(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| TemplateError::Render(e.to_string()))
    }

    /// The prompt that makes a model go on with the final (assistant) message: the rendered
    /// conversation cut right after that message's text, with no end-of-turn marker after it.
    pub fn continuation_prompt(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let Some(last) = messages.last().filter(|m| m.role == Role::Assistant) else {
            return Err(TemplateError::Continue(
                "the final message must be the assistant's partial answer".into(),
            ));
        };
        let partial = last.text();
        if partial.trim().is_empty() {
            return Err(TemplateError::Continue("the partial answer is empty".into()));
        }
        let rendered = self.render(messages, false)?;
        if let Some(i) = rendered.rfind(&partial) {
            return Ok(rendered[..i + partial.len()].to_owned());
        }
        // Templates that trim message content (`| trim`): find the trimmed text, then put back
        // the whitespace the answer really ended with, so no character of it is lost.
        let trimmed = partial.trim();
        match rendered.rfind(trimmed) {
            Some(i) => {
                let tail = &partial[partial.trim_end().len()..];
                Ok(format!("{}{tail}", &rendered[..i + trimmed.len()]))
            }
            None => Err(TemplateError::Continue(
                "the chat template does not write the final message's text verbatim".into(),
            )),
        }
    }
}

/// `chat_template` (a string, or a list of named templates of which `default` is taken),
/// `bos_token`, `eos_token` (strings or `{ "content": … }` objects).
fn from_tokenizer_config(text: &str) -> Result<(String, String, String), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let source = match &v["chat_template"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| named.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_owned)
            .ok_or("chat_template lists no template")?,
        _ => return Err("no chat_template".into()),
    };
    let token = |key: &str| match &v[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other["content"].as_str().unwrap_or_default().to_owned(),
    };
    Ok((source, token("bos_token"), token("eos_token")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, byte for byte as its GGUF carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A Llama-3-style template: trims content, uses bos_token and Python string methods.
    const LLAMA3: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn convo(partial: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::new(Role::User, "Name one city in Canada."),
            ChatMessage::new(Role::Assistant, partial),
        ]
    }

    #[test]
    fn renders_a_chat_as_the_model_expects() {
        let t = ChatTemplate::new(SMOLLM2.into(), String::new(), "<|im_end|>".into()).unwrap();
        let prompt = t.render(&convo("x")[..1], true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nName one city in Canada.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_continuation_prompt_is_the_generation_prompt_plus_the_partial_answer() {
        let t = ChatTemplate::new(SMOLLM2.into(), String::new(), "<|im_end|>".into()).unwrap();
        let start = t.render(&convo("x")[..1], true).unwrap();
        for partial in ["Toronto", "Toronto is a city in ", " Toronto\n\n"] {
            let p = t.continuation_prompt(&convo(partial)).unwrap();
            assert_eq!(p, format!("{start}{partial}"), "partial {partial:?}");
        }
    }

    #[test]
    fn a_trimming_template_keeps_the_partial_answers_trailing_whitespace() {
        let t =
            ChatTemplate::new(LLAMA3.into(), "<|begin_of_text|>".into(), String::new()).unwrap();
        let start = t.render(&convo("x")[..1], true).unwrap();
        assert!(start.starts_with("<|begin_of_text|><|start_header_id|>user"));
        let p = t.continuation_prompt(&convo("Toronto is ")).unwrap();
        assert_eq!(p, format!("{start}Toronto is "));
    }

    #[test]
    fn refuses_what_it_cannot_continue() {
        let t = ChatTemplate::new(LLAMA3.into(), String::new(), String::new()).unwrap();
        let user_last = vec![ChatMessage::new(Role::User, "hi")];
        assert!(matches!(t.continuation_prompt(&user_last), Err(TemplateError::Continue(_))));
        assert!(matches!(t.continuation_prompt(&convo("  ")), Err(TemplateError::Continue(_))));
        let mut tool = convo("ok");
        tool.insert(0, ChatMessage::new(Role::Tool, "x"));
        assert!(
            matches!(t.continuation_prompt(&tool), Err(TemplateError::Render(m)) if m.contains("bad role"))
        );
        // A template that does not write the content at all cannot be continued.
        let blind = ChatTemplate::new(
            "{% for m in messages %}[{{ m.role }}]{% endfor %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(matches!(
            blind.continuation_prompt(&convo("Toronto")),
            Err(TemplateError::Continue(_))
        ));
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), String::new(), String::new()),
            Err(TemplateError::Compile(_))
        ));
    }

    #[test]
    fn reads_hugging_face_tokenizer_configs() {
        let (src, bos, eos) = from_tokenizer_config(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
                "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        assert_eq!((src.as_str(), bos.as_str(), eos.as_str()), ("D", "<s>", "</s>"));
        assert!(from_tokenizer_config(r#"{"eos_token": "</s>"}"#).is_err());
    }
}
