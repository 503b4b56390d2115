//! Qwen3 ChatML rendering of OpenAI-style `messages` and the assistant loss mask.
//!
//! What is rendered is exactly the Qwen3 `chat_template` from `tokenizer_config.json` (checked
//! against jinja2 on the committed fixtures), with `add_generation_prompt=false` and no tools:
//!
//! - `system` first: `<|im_start|>system\n{content}<|im_end|>\n`; a later system message and
//!   every `user` message: `<|im_start|>{role}\n{content}<|im_end|>\n`.
//! - `assistant`: reasoning is `reasoning_content` when present; otherwise, when the content
//!   holds `</think>`, the text between `<think>` and `</think>` is the reasoning and the content
//!   is what follows `</think>` (leading newlines dropped).
//!   - For assistant turns after the last user message, when the turn is the last message or
//!     has non-empty reasoning: `<|im_start|>assistant\n<think>\n{reasoning stripped of
//!     newlines}\n</think>\n\n{content without leading newlines}<|im_end|>\n`. So the final
//!     assistant turn always carries a (possibly empty) think block, as at inference.
//!   - Every other assistant turn (earlier in the conversation): `<|im_start|>assistant\n
//!     {content}<|im_end|>\n` — the template drops the reasoning of earlier turns.
//!
//! The loss mask is 1 on every token that overlaps an assistant turn's body (everything after
//! `<|im_start|>assistant\n`, think block included) or its closing `<|im_end|>`, and 0 elsewhere
//! (headers, the `\n` after `<|im_end|>`, system and user turns).

use serde::{Deserialize, Serialize};

/// One chat message. `reasoning_content` (Qwen3 / DeepSeek style) is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

/// A rendered conversation: the text and the byte ranges that the loss covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    /// Byte ranges `[start, end)` of assistant bodies including their closing `<|im_end|>`.
    pub assistant_spans: Vec<(usize, usize)>,
}

/// Why a conversation cannot be rendered: the message index and an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatError {
    UnknownRole { index: usize, role: String },
}

const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

fn is_tool_response(content: &str) -> bool {
    content.starts_with("<tool_response>") && content.ends_with("</tool_response>")
}

/// Split reasoning from content the way the template does.
fn split_reasoning(msg: &Message) -> (String, String) {
    if let Some(r) = &msg.reasoning_content {
        return (msg.content.clone(), r.clone());
    }
    if msg.content.contains("</think>") {
        let after = msg.content.rsplit("</think>").next().unwrap_or("");
        let content = after.trim_start_matches('\n').to_string();
        let before = msg.content.split("</think>").next().unwrap_or("");
        let before = before.trim_end_matches('\n');
        let reasoning = before
            .rsplit("<think>")
            .next()
            .unwrap_or("")
            .trim_start_matches('\n');
        return (content, reasoning.to_string());
    }
    (msg.content.clone(), String::new())
}

/// Render `messages` with the Qwen3 template (see the module docs for exactly what).
pub fn render(messages: &[Message]) -> Result<RenderedChat, ChatError> {
    for (index, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ChatError::UnknownRole {
                index,
                role: m.role.clone(),
            });
        }
    }
    // Index of the last real user query (the template's `ns.last_query_index`).
    let last_query = messages
        .iter()
        .rposition(|m| m.role == "user" && !is_tool_response(&m.content))
        .unwrap_or(messages.len().saturating_sub(1));

    let mut text = String::new();
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "assistant" => {
                text.push_str(IM_START);
                text.push_str("assistant\n");
                let start = text.len();
                let (content, reasoning) = split_reasoning(m);
                let last = i + 1 == messages.len();
                if i > last_query && (last || !reasoning.is_empty()) {
                    text.push_str("<think>\n");
                    text.push_str(reasoning.trim_matches('\n'));
                    text.push_str("\n</think>\n\n");
                    text.push_str(content.trim_start_matches('\n'));
                } else {
                    text.push_str(&content);
                }
                text.push_str(IM_END);
                spans.push((start, text.len()));
                text.push('\n');
            }
            role => {
                text.push_str(IM_START);
                text.push_str(role);
                text.push('\n');
                text.push_str(&m.content);
                text.push_str(IM_END);
                text.push('\n');
            }
        }
    }
    Ok(RenderedChat {
        text,
        assistant_spans: spans,
    })
}

/// `messages` rendered as a prompt for generation: the template with `add_generation_prompt`,
/// i.e. [`render`]'s text followed by `<|im_start|>assistant\n`, and with `enable_thinking`
/// false the empty think block `<think>\n\n</think>\n\n` (the model then answers directly).
pub fn render_generation_prompt(
    messages: &[Message],
    enable_thinking: bool,
) -> Result<String, ChatError> {
    let mut text = render(messages)?.text;
    text.push_str(IM_START);
    text.push_str("assistant\n");
    if !enable_thinking {
        text.push_str("<think>\n\n</think>\n\n");
    }
    Ok(text)
}

/// The per-token loss mask: 1 where the token's byte range overlaps an assistant span.
/// `offsets` are the tokens' byte ranges in `chat.text`, in order.
pub fn loss_mask(chat: &RenderedChat, offsets: &[(usize, usize)]) -> Vec<u8> {
    let mut mask = Vec::with_capacity(offsets.len());
    let mut span = 0;
    for &(s, e) in offsets {
        while span < chat.assistant_spans.len() && chat.assistant_spans[span].1 <= s {
            span += 1;
        }
        let hit = chat
            .assistant_spans
            .get(span)
            .is_some_and(|&(a, b)| s < b && a < e.max(s + 1));
        mask.push(u8::from(hit));
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            reasoning_content: None,
        }
    }

    #[test]
    fn renders_last_turn_with_empty_think_block() {
        let r = render(&[msg("user", "hi"), msg("assistant", "yo")]).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyo<|im_end|>\n"
        );
        let (a, b) = r.assistant_spans[0];
        assert_eq!(&r.text[a..b], "<think>\n\n</think>\n\nyo<|im_end|>");
    }

    #[test]
    fn generation_prompt_opens_the_assistant_turn() {
        let m = [msg("system", "s"), msg("user", "hi")];
        let head = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n";
        let thinking = render_generation_prompt(&m, true).unwrap();
        assert_eq!(thinking, format!("{head}<|im_start|>assistant\n"));
        let direct = render_generation_prompt(&m, false).unwrap();
        assert_eq!(
            direct,
            format!("{head}<|im_start|>assistant\n<think>\n\n</think>\n\n")
        );
    }

    #[test]
    fn earlier_reasoning_is_dropped() {
        let mut a1 = msg("assistant", "A");
        a1.reasoning_content = Some("r".into());
        let r = render(&[
            msg("user", "q"),
            a1,
            msg("user", "q2"),
            msg("assistant", "B"),
        ])
        .unwrap();
        assert!(r.text.contains("<|im_start|>assistant\nA<|im_end|>"));
        assert_eq!(r.assistant_spans.len(), 2);
    }

    #[test]
    fn unknown_role_is_rejected() {
        let e = render(&[msg("user", "q"), msg("robot", "x")]).unwrap_err();
        assert_eq!(
            e,
            ChatError::UnknownRole {
                index: 1,
                role: "robot".into()
            }
        );
    }

    #[test]
    fn mask_covers_overlapping_tokens() {
        let chat = RenderedChat {
            text: "abcdef".into(),
            assistant_spans: vec![(2, 4)],
        };
        let m = loss_mask(&chat, &[(0, 1), (1, 3), (3, 4), (4, 6)]);
        assert_eq!(m, vec![0, 1, 1, 0]);
    }
}
