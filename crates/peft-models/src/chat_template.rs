//! Chat templates rendered as transformers renders them (`apply_chat_template`): the same Jinja
//! settings and the same globals (`raise_exception`, `strftime_now`, a `tojson` that writes
//! Python's `json.dumps`), messages with all their fields, and `tools`. Training text must be
//! byte for byte what TRL renders, or the model learns another format than the one it is
//! prompted with.

use crate::tokenizer::ChatMessage;
use anyhow::{anyhow, Result};
use minijinja::value::Kwargs;
use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// What a template sees besides the messages, as TRL passes it per record.
#[derive(Clone, Copy, Default)]
pub struct TemplateInputs<'a> {
    /// JSON schemas of the tools the conversation may call (`tools` column).
    pub tools: Option<&'a Json>,
    /// More template variables (`chat_template_kwargs` column, e.g. `enable_thinking`).
    pub kwargs: Option<&'a serde_json::Map<String, Json>>,
}

/// Renders `template` over `messages` and `inputs` with `special_tokens` as named variables
/// (unset ones stay undefined, as in transformers, so templates can test `is defined`).
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    inputs: TemplateInputs,
    add_generation_prompt: bool,
    special_tokens: &[(&str, Option<&str>)],
) -> Result<String> {
    Ok(render_tracked(
        template,
        messages,
        inputs,
        add_generation_prompt,
        special_tokens,
    )?
    .0)
}

/// Whether `template` marks assistant text with `{% generation %}` blocks (TRL's training
/// templates), so that [`render_tracked`] finds the text to train on.
pub fn has_generation_blocks(template: &str) -> bool {
    generation_tag().is_match(template)
}

/// [`render`], and the byte ranges of the text inside `{% generation %}` blocks (transformers'
/// `return_assistant_tokens_mask`, which TRL's `assistant_only_loss` trains on).
pub fn render_tracked(
    template: &str,
    messages: &[ChatMessage],
    inputs: TemplateInputs,
    add_generation_prompt: bool,
    special_tokens: &[(&str, Option<&str>)],
) -> Result<(String, Vec<std::ops::Range<usize>>)> {
    let mut env = minijinja::Environment::new();
    // transformers renders with these settings; templates rely on them for their whitespace.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Python string and dict methods such as .strip() or .items().
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |message: String| -> Result<(), Error> {
        Err(Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", |format: String| {
        chrono::Local::now().format(&format).to_string()
    });
    env.add_filter("tojson", tojson);
    let source = marked_generation_blocks(template);
    let template = env
        .template_from_str(&source)
        .map_err(|e| anyhow!("invalid chat template: {e}"))?;

    let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
    for (name, token) in special_tokens {
        if let Some(token) = token {
            ctx.insert(name, Value::from(*token));
        }
    }
    for (name, v) in inputs.kwargs.into_iter().flatten() {
        ctx.insert(name, Value::from_serialize(v));
    }
    ctx.insert(
        "messages",
        Value::from_serialize(template_messages(messages)),
    );
    ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
    if let Some(tools) = inputs.tools {
        ctx.insert("tools", Value::from_serialize(tools));
    }
    let marked = template
        .render(ctx)
        .map_err(|e| anyhow!("cannot render chat template: {e}"))?;
    // Take the markers out, noting where each block's text starts and ends.
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut start = None;
    for c in marked.chars() {
        match c {
            GENERATION_START => start = Some(text.len()),
            GENERATION_END => {
                if let Some(s) = start.take() {
                    spans.push(s..text.len());
                }
            }
            c => text.push(c),
        }
    }
    Ok((text, spans))
}

/// Markers for the ends of `{% generation %}` blocks in rendered text (private-use code points,
/// which no tokenizer's text carries).
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';

fn generation_tag() -> regex::Regex {
    regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid regex")
}

/// Messages as transformers hands them to the template: keys whose value is `null` dropped,
/// and a reasoning given under any of its names (`reasoning_content`, `thinking`, `reasoning`)
/// also under `thinking` and `reasoning_content`, the names templates read.
fn template_messages(messages: &[ChatMessage]) -> Vec<Json> {
    const REASONING: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];
    messages
        .iter()
        .map(|m| {
            let mut map = m.fields().clone();
            map.retain(|_, x| !x.is_null());
            if let Some(r) = REASONING.iter().find_map(|k| map.get(*k).cloned()) {
                // transformers: {"thinking": r, **message, "reasoning_content": r}.
                if !map.contains_key("thinking") {
                    map.shift_insert(0, "thinking".into(), r.clone());
                }
                map.insert("reasoning_content".into(), r);
            }
            Json::Object(map)
        })
        .collect()
}

/// TRL's training templates mark assistant text with `{% generation %}` ... `{% endgeneration %}`
/// (transformers' `AssistantTracker` extension), and tokenizers saved after such a training
/// keep them. Each tag becomes a block printing a marker, with the tag's whitespace control,
/// so the text is the same and the markers show where the block was.
fn marked_generation_blocks(template: &str) -> String {
    generation_tag()
        .replace_all(template, |c: &regex::Captures| {
            let marker = if c.get(2).is_some() {
                GENERATION_END
            } else {
                GENERATION_START
            };
            format!(
                "{{%{} if true %}}{{{{ '{marker}' }}}}{{% endif {}%}}",
                &c[1], &c[3]
            )
        })
        .into_owned()
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, so `", "` and `": "` between items on one line, or `indent` spaces per
/// level, keys in their given order. (Jinja's and minijinja's own `tojson` write compact JSON
/// with HTML characters escaped: other text than transformers'.)
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    if value.is_undefined() {
        // Python's json.dumps fails on jinja's Undefined too.
        return Err(Error::new(
            ErrorKind::UndefinedError,
            "tojson: the value is undefined",
        ));
    }
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item, key)",
            ))
        }
        // Python's defaults: no trailing space after "," when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.close(level, out);
                out.push(']');
            }
            Json::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key);
                    self.write(x, level + 1, out);
                }
                self.close(level, out);
                out.push('}');
            }
            Json::String(s) => self.string(s, out),
            Json::Number(n) if n.is_f64() => out.push_str(&python_float(n.as_f64().unwrap_or(0.0))),
            // Other scalars, `[]` and `{}` print as serde_json prints them: Python's text.
            other => out.push_str(&other.to_string()),
        }
    }

    /// Before the `i`-th item of a list or object.
    fn separate(&self, i: usize, level: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item);
        }
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    /// Before the closing bracket of a non-empty list or object.
    fn close(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = Json::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
}

/// Python's `repr` of a float, which `json.dumps` writes: the shortest digits that read back
/// to the same value, positional from 1e-4 up to 1e16 (with a `.0` when whole), else
/// scientific with a signed exponent of at least two digits (`1e-05`, `1.5e+16`).
fn python_float(x: f64) -> String {
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let positional = format!("{x}");
        if positional.contains('.') {
            positional
        } else {
            positional + ".0"
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The expected strings below are what transformers 5.24's `render_jinja_template` returns
    /// for the same template and inputs.
    fn messages() -> Vec<ChatMessage> {
        serde_json::from_value(json!([
            {"role": "user", "content": "Café <b> & \"q\""},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function",
                "function": {"name": "f", "arguments": {"z": 1, "a": [1.5, null, true]}}}]},
            {"role": "assistant", "reasoning": "hmm", "content": "ok"}
        ]))
        .unwrap()
    }

    fn tools() -> Json {
        json!([{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}])
    }

    fn render_all(template: &str) -> String {
        let tools = tools();
        let kwargs = json!({"flavour": "mint"});
        let inputs = TemplateInputs {
            tools: Some(&tools),
            kwargs: kwargs.as_object(),
        };
        render(
            template,
            &messages(),
            inputs,
            false,
            &[("bos_token", Some("<s>"))],
        )
        .unwrap()
    }

    #[test]
    fn tojson_writes_python_json_dumps() {
        let out = render_all(
            "{% for m in messages %}{{ m | tojson }}|{% endfor %}{{ tools | tojson(indent=2) }}|\
             {{ tools | tojson(sort_keys=true, ensure_ascii=true) }}|\
             {{ tools[0] | tojson(separators=[',', ':']) }}",
        );
        let expected = "{\"role\": \"user\", \"content\": \"Café <b> & \\\"q\\\"\"}|\
            {\"role\": \"assistant\", \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"z\": 1, \"a\": [1.5, null, true]}}}]}|\
            {\"thinking\": \"hmm\", \"role\": \"assistant\", \"reasoning\": \"hmm\", \"content\": \"ok\", \"reasoning_content\": \"hmm\"}|\
            [\n  {\n    \"type\": \"function\",\n    \"function\": {\n      \"name\": \"f\",\n      \"description\": \"d\",\n      \"parameters\": {}\n    }\n  }\n]|\
            [{\"function\": {\"description\": \"d\", \"name\": \"f\", \"parameters\": {}}, \"type\": \"function\"}]|\
            {\"type\":\"function\",\"function\":{\"name\":\"f\",\"description\":\"d\",\"parameters\":{}}}";
        assert_eq!(out, expected);
        let err = render(
            "{{ nothing | tojson }}",
            &[],
            TemplateInputs::default(),
            false,
            &[],
        );
        assert!(err.unwrap_err().to_string().contains("undefined"));
    }

    #[test]
    fn floats_print_as_python_prints_them() {
        // Python: [repr(x) for x in ...]
        for (x, py) in [
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5, "1.5"),
            (1.0, "1.0"),
            (-2.0, "-2.0"),
            (0.1, "0.1"),
            (123456789.125, "123456789.125"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (-2.5e100, "-2.5e+100"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float(x), py);
        }
    }

    #[test]
    fn generation_tags_render_their_body() {
        let out = render_all(
            "{% for m in messages %}{{ m.role }}:{%- if m.role == 'assistant' %}{% generation -%}\n  \
             {{ m.content }}\n{%- endgeneration %}{% else %}{{ m.content }}{% endif %};{% endfor %}",
        );
        assert_eq!(out, "user:Café <b> & \"q\";assistant:;assistant:ok;");
    }

    #[test]
    fn messages_keep_their_fields_and_variables_reach_the_template() {
        let out = render_all(
            "{% for m in messages %}[{{ m.role }}|{{ 'content' in m }}|\
             {{ m.tool_calls[0].function.name if m.tool_calls else '' }}|{{ m.thinking }}|\
             {{ m.reasoning_content }}|{{ flavour }}]{% endfor %}\
             {% for x in range(3) %}{% if x == 1 %}{% break %}{% endif %}{{ x }}{% endfor %}{{ bos_token }}",
        );
        assert_eq!(
            out,
            "[user|True||||mint][assistant|False|f|||mint][assistant|True||hmm|hmm|mint]0<s>"
        );
    }

    #[test]
    fn strftime_now_is_todays_date() {
        let before = chrono::Local::now().format("%d %b %Y").to_string();
        let out = render(
            "{{ strftime_now('%d %b %Y') }}",
            &[],
            TemplateInputs::default(),
            false,
            &[],
        )
        .unwrap();
        // The date as transformers' `datetime.now().strftime` gives it (either side of a
        // midnight passing during the test).
        let after = chrono::Local::now().format("%d %b %Y").to_string();
        assert!(out == before || out == after, "{out}");
        assert_eq!(out.len(), "29 Nov 2026".len());
    }
}
