//! Reward functions: `exact_match` (the answer after `#### `, in the last `\boxed{}`, in the
//! last `<answer>` tag, or the last number, against a field of the prompt row), `format` (a
//! regex over the whole completion), `overlong` (DAPO's soft length penalty) and `command` (a
//! program that reads one JSON object per completion on stdin and writes one score per line).
//!
//! A score is a number or `None` (unscored: TRL's `None`, NaN in the advantages).
//!
//! Owns: scoring one generation batch's completions. Must not: touch tensors or the model.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moeru_data::prompts::PromptRow;
use regex::Regex;
use serde_json::{json, Value};

use crate::error::TrainError;
use crate::recipe::grpo::{Extract, RewardKind, RewardSpec};

/// One completion as the rewards see it.
pub struct Completion<'a> {
    pub prompt: &'a PromptRow,
    /// The decoded completion, without the stop token.
    pub text: String,
    /// The completion's token ids, the stop token included when it stopped.
    pub ids: Vec<i64>,
    /// Whether it stopped at a stop id (else it ran to `generation.max_new_tokens`).
    pub stopped: bool,
}

/// A reward function ready to score.
pub struct Reward {
    pub name: String,
    pub weight: f64,
    kind: Kind,
}

enum Kind {
    ExactMatch {
        extract: Extract,
        field: String,
    },
    Format(Regex),
    Overlong {
        max_len: usize,
        cache: usize,
    },
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
}

impl Reward {
    /// The function `spec` describes (its keys were checked by the recipe's validation).
    pub fn new(spec: &RewardSpec) -> Result<Self, TrainError> {
        let missing =
            |key: &str| TrainError::BadRecipe(format!("`rewards`: {:?} needs `{key}`", spec.name));
        let kind = match spec.kind {
            RewardKind::ExactMatch => Kind::ExactMatch {
                extract: spec.extract.unwrap_or(Extract::Hash),
                field: spec.field.clone().ok_or_else(|| missing("field"))?,
            },
            RewardKind::Format => {
                let pattern = spec.pattern.as_deref().ok_or_else(|| missing("pattern"))?;
                let full = format!("(?s)^(?:{pattern})$");
                Kind::Format(Regex::new(&full).map_err(|e| {
                    TrainError::BadRecipe(format!(
                        "`rewards`: {:?} has pattern {pattern:?}, which is not a valid regex ({}); fix the pattern",
                        spec.name,
                        e.to_string().replace('\n', " ")
                    ))
                })?)
            }
            RewardKind::Overlong => Kind::Overlong {
                max_len: spec.max_len.ok_or_else(|| missing("max_len"))?,
                cache: spec.cache.ok_or_else(|| missing("cache"))?,
            },
            RewardKind::Command => Kind::Command {
                argv: spec.argv.clone().ok_or_else(|| missing("argv"))?,
                timeout: Duration::from_secs_f64(spec.timeout_s.unwrap_or(60.0).max(0.001)),
            },
        };
        Ok(Self {
            name: spec.name.clone(),
            weight: spec.weight,
            kind,
        })
    }

    /// The prompt field this function reads, if any (checked on every row at start).
    pub fn field(&self) -> Option<&str> {
        match &self.kind {
            Kind::ExactMatch { field, .. } => Some(field),
            _ => None,
        }
    }

    /// One score per completion.
    pub fn score(&self, batch: &[Completion]) -> Result<Vec<Option<f64>>, TrainError> {
        Ok(match &self.kind {
            Kind::ExactMatch { extract, field } => batch
                .iter()
                .map(|c| {
                    Some(exact_match(
                        &c.text,
                        *extract,
                        &c.prompt.fields[field.as_str()],
                    ))
                })
                .collect(),
            Kind::Format(re) => (batch.iter())
                .map(|c| Some(f64::from(u8::from(re.is_match(&c.text)))))
                .collect(),
            Kind::Overlong { max_len, cache } => (batch.iter())
                .map(|c| Some(overlong(c.ids.len(), *max_len, *cache)))
                .collect(),
            Kind::Command { argv, timeout } => run_command(&self.name, argv, *timeout, batch)?,
        })
    }
}

/// 1 when the answer `extract` finds in `text` equals `want` (after trimming and removing
/// commas; numerically when both are numbers), else 0.
pub fn exact_match(text: &str, extract: Extract, want: &Value) -> f64 {
    let want = match want {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let Some(got) = extract_answer(text, extract) else {
        return 0.0;
    };
    let norm = |s: &str| s.trim().replace(',', "");
    let (got, want) = (norm(&got), norm(&want));
    let same = match (got.parse::<f64>(), want.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => got == want,
    };
    f64::from(u8::from(same))
}

/// The answer `extract` finds in `text`, if any.
pub fn extract_answer(text: &str, extract: Extract) -> Option<String> {
    match extract {
        Extract::Hash => text.rsplit_once("####").map(|(_, a)| a.trim().to_string()),
        Extract::AnswerTag => {
            let (before, _) = text.rsplit_once("</answer>")?;
            let (_, inner) = before.rsplit_once("<answer>")?;
            Some(inner.trim().to_string())
        }
        Extract::Boxed => last_boxed(text),
        Extract::LastNumber => {
            let re = Regex::new(r"-?\d[\d,]*(\.\d+)?").expect("a valid regex");
            re.find_iter(text).last().map(|m| m.as_str().to_string())
        }
    }
}

/// The contents of the last balanced `\boxed{…}`.
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1;
    for (i, ch) in text[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// DAPO's soft overlong penalty (TRL's `get_soft_overlong_punishment`).
pub fn overlong(len: usize, max_len: usize, cache: usize) -> f64 {
    let free = max_len - cache;
    if len <= free {
        0.0
    } else if len <= max_len {
        (free as f64 - len as f64) / cache as f64
    } else {
        -1.0
    }
}

/// Runs `argv` once over `batch`: one JSON object per completion on stdin, one score per line
/// back (a number, `null` or `{"reward": x}`); any failure names the command and its stderr.
fn run_command(
    name: &str,
    argv: &[String],
    timeout: Duration,
    batch: &[Completion],
) -> Result<Vec<Option<f64>>, TrainError> {
    let fail = |why: String, stderr: &str| {
        let tail: String = stderr
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join(" | ");
        let shown = if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends: {tail}")
        };
        TrainError::Reward(format!(
            "reward {name:?} (`{}`): {why}{shown}",
            argv.join(" ")
        ))
    };
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(
                format!("cannot start it ({e}); check the path in `argv`"),
                "",
            )
        })?;
    let mut input = String::new();
    for (i, c) in batch.iter().enumerate() {
        let mut row = json!({
            "index": i,
            "completion": c.text,
            "completion_ids": c.ids,
            "finish_reason": if c.stopped { "stop" } else { "length" },
        });
        let obj = row.as_object_mut().expect("an object");
        for (k, v) in &c.prompt.fields {
            obj.entry(k.clone()).or_insert(v.clone());
        }
        input.push_str(&row.to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = reader(child.stdout.take().expect("piped"));
    let err = reader(child.stderr.take().expect("piped"));
    let began = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if began.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err.join().unwrap_or_default();
                return Err(fail(
                    format!(
                        "did not finish within {:.1} s (`timeout_s`)",
                        timeout.as_secs_f64()
                    ),
                    &stderr,
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(fail(format!("waiting for it failed: {e}"), "")),
        }
    };
    let _ = writer.join();
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        return Err(fail(format!("exited with {status}"), &stderr));
    }
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != batch.len() {
        return Err(fail(
            format!(
                "wrote {} score lines for {} completions; write exactly one line per completion",
                lines.len(),
                batch.len()
            ),
            &stderr,
        ));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            parse_score(line).ok_or_else(|| {
                fail(format!("line {} is {line:?}; each line must be a number, null or {{\"reward\": x}}", i + 1), &stderr)
            })
        })
        .collect()
}

/// A stream read to its end on its own thread (so neither pipe can fill and block the child).
fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// A command's line: a number, `null` or `{"reward": x}`; `None` when it is none of these.
fn parse_score(line: &str) -> Option<Option<f64>> {
    match serde_json::from_str::<Value>(line.trim()).ok()? {
        Value::Null => Some(None),
        Value::Number(n) => n.as_f64().map(Some),
        Value::Object(o) => match o.get("reward")? {
            Value::Null => Some(None),
            Value::Number(n) => n.as_f64().map(Some),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_and_compared() {
        let n = |x: i64| Value::from(x);
        assert_eq!(exact_match("so #### 7", Extract::Hash, &n(7)), 1.0);
        assert_eq!(
            exact_match("#### 1,000", Extract::Hash, &Value::from("1000")),
            1.0
        );
        assert_eq!(exact_match("#### 7.0", Extract::Hash, &n(7)), 1.0);
        assert_eq!(exact_match("the answer is 7", Extract::Hash, &n(7)), 0.0);
        assert_eq!(
            exact_match(
                "x \\boxed{\\frac{1}{2}} y",
                Extract::Boxed,
                &Value::from("\\frac{1}{2}")
            ),
            1.0
        );
        assert_eq!(
            exact_match(
                "<answer>3</answer><answer> 4 </answer>",
                Extract::AnswerTag,
                &n(4)
            ),
            1.0
        );
        assert_eq!(
            exact_match(
                "3 then -12.5 end",
                Extract::LastNumber,
                &Value::from("-12.5")
            ),
            1.0
        );
    }

    #[test]
    fn overlong_penalty_is_dapos() {
        assert_eq!(overlong(6, 10, 4), 0.0);
        assert_eq!(overlong(8, 10, 4), -0.5);
        assert_eq!(overlong(10, 10, 4), -1.0);
        assert_eq!(overlong(11, 10, 4), -1.0);
    }

    #[test]
    fn command_lines_parse() {
        assert_eq!(parse_score("0.5"), Some(Some(0.5)));
        assert_eq!(parse_score("null"), Some(None));
        assert_eq!(parse_score("{\"reward\": 1}"), Some(Some(1.0)));
        assert_eq!(parse_score("yes"), None);
    }
}
