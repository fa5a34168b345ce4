//! Renders chat templates as `peft` does, for scripts/hf/check_chat_templates.py to compare
//! with transformers. Reads `{"template", "cases": [{"messages", "tools"?,
//! "add_generation_prompt", "special": {name: token}, "kwargs"?}]}` on stdin and prints one JSON list:
//! per case `{"text", "spans"}` (the character ranges of `{% generation %}` blocks) or
//! `{"error": ...}`.

use peft_models::chat_template::{render_tracked, TemplateInputs};
use peft_models::tokenizer::ChatMessage;
use serde_json::{json, Value};

fn main() -> anyhow::Result<()> {
    let input: Value = serde_json::from_reader(std::io::stdin().lock())?;
    let template = input["template"].as_str().unwrap_or_default();
    let mut out = Vec::new();
    for case in input["cases"].as_array().into_iter().flatten() {
        let result = (|| {
            let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone())?;
            let special: Vec<(String, Option<String>)> = case["special"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned)))
                .collect();
            let special: Vec<(&str, Option<&str>)> = special
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_deref()))
                .collect();
            render_tracked(
                template,
                &messages,
                TemplateInputs {
                    tools: case.get("tools").filter(|t| !t.is_null()),
                    kwargs: case.get("kwargs").and_then(Value::as_object),
                },
                case["add_generation_prompt"].as_bool().unwrap_or(false),
                &special,
            )
        })();
        out.push(match result {
            // Spans of `{% generation %}` text in characters, as transformers counts them.
            Ok((text, spans)) => {
                let chars = |b: usize| text[..b].chars().count();
                let spans: Vec<[usize; 2]> = spans
                    .iter()
                    .map(|r| [chars(r.start), chars(r.end)])
                    .collect();
                json!({ "text": text, "spans": spans })
            }
            Err(e) => json!({ "error": format!("{e:#}") }),
        });
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
