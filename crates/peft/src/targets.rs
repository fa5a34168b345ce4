//! Which modules a tuner wraps: PEFT's `target_modules` / `exclude_modules` semantics.

use anyhow::{bail, Result};
use peft_models::Llama;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// `target_modules` as PEFT reads it: a list matches a module whose path equals an entry or
/// ends with `.entry`; a string is a regex that must match the whole path; `"all-linear"`
/// selects every linear layer but the output head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Pattern(String),
}

pub const ALL_LINEAR: &str = "all-linear";

impl TargetModules {
    /// Parses a command-line value: `all-linear`, a comma-separated list, or `re:<regex>`.
    pub fn parse_flag(s: &str) -> Self {
        match s.strip_prefix("re:") {
            Some(p) => Self::Pattern(p.to_string()),
            None if s == ALL_LINEAR => Self::Pattern(ALL_LINEAR.to_string()),
            None => Self::List(
                s.split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect(),
            ),
        }
    }
}

fn list_matches(list: &[String], path: &str) -> bool {
    list.iter()
        .any(|t| path == t || path.ends_with(&format!(".{t}")))
}

/// Whether `t` names the module at `path` (`all-linear`: any linear layer but `output_head`).
fn matches(t: &TargetModules, path: &str, output_head: &str) -> Result<bool> {
    Ok(match t {
        TargetModules::List(l) => list_matches(l, path),
        TargetModules::Pattern(p) if p == ALL_LINEAR => path != output_head,
        TargetModules::Pattern(p) => Regex::new(&format!("^(?:{p})$"))
            .map_err(|e| {
                // The parser's message spans lines (pattern, caret, reason): keep the reason.
                let text = e.to_string();
                let reason = text.lines().last().unwrap_or_default();
                anyhow::anyhow!(
                    "target_modules: invalid regex {p:?}: {}",
                    reason.trim_start_matches("error: ")
                )
            })?
            .is_match(path),
    })
}

/// Resolves `targets` minus `exclude` against the model's linear layer paths. An entry of a
/// target list that matches nothing is an error listing the model's linear layer names, unless
/// it names a module of `elsewhere` (an image-text model's vision tower, which HF PEFT's lists
/// may target too, and which is not loaded here).
pub fn select(
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
    linear_paths: &[String],
    elsewhere: &[String],
    output_head: &str,
) -> Result<Vec<String>> {
    let is_match = |t: &TargetModules, path: &str| matches(t, path, output_head);
    let names = || {
        let mut short: Vec<&str> = linear_paths
            .iter()
            .map(|p| p.rsplit('.').next().unwrap_or(p))
            .collect();
        short.sort();
        short.dedup();
        short.join(", ")
    };
    if let TargetModules::List(l) = targets {
        if l.is_empty() {
            bail!(
                "target_modules is empty (the model's linear modules: {})",
                names()
            );
        }
        for t in l {
            let matches = |p: &String| list_matches(std::slice::from_ref(t), p);
            if !linear_paths.iter().any(matches) && !elsewhere.iter().any(matches) {
                bail!(
                    "target module {t:?} not found in the model (its linear modules: {})",
                    names()
                );
            }
        }
    }
    let mut out = Vec::new();
    for path in linear_paths {
        let excluded = match exclude {
            Some(e) => is_match(e, path)?,
            None => false,
        };
        if is_match(targets, path)? && !excluded {
            out.push(path.clone());
        }
    }
    if out.is_empty() {
        bail!(
            "target_modules matches no module (the model's linear modules: {})",
            names()
        );
    }
    Ok(out)
}

/// [`select`] over the linear layers of `base` (its output head aside; the embedding, which
/// [`selects_module`] decides, and an image-text model's tower among the modules a target list
/// may name). Empty where the targets name the embedding alone.
pub fn select_linears(
    base: &mut Llama,
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
) -> Result<Vec<String>> {
    let embedding = crate::tokens::embedding_path(base);
    let mut paths: Vec<String> = base.linears_mut().into_iter().map(|(p, _)| p).collect();
    paths.push(embedding.clone());
    let mut selected = select(
        targets,
        exclude,
        &paths,
        &base.other_module_paths(),
        "lm_head",
    )?;
    selected.retain(|p| *p != embedding);
    Ok(selected)
}

/// Whether `targets` minus `exclude` select the module at `path` that is not a linear layer
/// (the embedding): by name or regex, never by `all-linear`.
pub fn selects_module(
    targets: &TargetModules,
    exclude: Option<&TargetModules>,
    path: &str,
) -> Result<bool> {
    let all_linear = matches!(targets, TargetModules::Pattern(p) if p == ALL_LINEAR);
    if all_linear {
        return Ok(false);
    }
    let excluded = match exclude {
        Some(e) => matches(e, path, "")?,
        None => false,
    };
    Ok(matches(targets, path, "")? && !excluded)
}

/// `exclude` widened to the modules under `parts` (an image-text model's `vision_tower`,
/// `multi_modal_projector`, ...), for HF PEFT, which sees the whole model where peft-rs sees
/// the language model: its `target_modules` then select the same modules there.
pub fn excluding_parts(exclude: Option<&TargetModules>, parts: &[String]) -> Option<TargetModules> {
    if parts.is_empty() {
        return exclude.cloned();
    }
    let names: Vec<String> = parts.iter().map(|p| regex::escape(p)).collect();
    let ours = format!(r"model\.(?:{})\..*", names.join("|"));
    Some(TargetModules::Pattern(match exclude {
        None => ours,
        Some(TargetModules::Pattern(p)) if p.contains(&ours) => p.clone(),
        Some(TargetModules::Pattern(p)) => format!("{ours}|(?:{p})"),
        // A list entry matches a path equal to it or ending with `.entry`.
        Some(TargetModules::List(l)) => {
            let l: Vec<String> = l.iter().map(|e| regex::escape(e)).collect();
            format!(r"{ours}|(?:.*\.)?(?:{})", l.join("|"))
        }
    }))
}

/// The index of the layer that module `path` lies in, as HF PEFT reads it for
/// `layers_to_transform`: the number in the last `.<name>.<number>.` of the path, where the
/// name is one of `patterns` (regexes; any name when there are none).
pub fn layer_index(path: &str, patterns: &[String]) -> Result<Option<usize>> {
    let any = [r"[^.]*".to_string()];
    let patterns = if patterns.is_empty() {
        &any[..]
    } else {
        patterns
    };
    for p in patterns {
        let re = Regex::new(&format!(r"^.*\.(?:{p})\.(\d+)\."))
            .map_err(|e| anyhow::anyhow!("layers_pattern: invalid pattern {p:?}: {e}"))?;
        if let Some(c) = re.captures(path) {
            return Ok(c[1].parse().ok());
        }
    }
    Ok(None)
}

/// Keeps the modules of `selected` in the layers `indices` (`layers_to_transform`), PEFT's way:
/// a module named in full in a target list stays wherever it is.
pub fn keep_layers(
    selected: &mut Vec<String>,
    targets: &TargetModules,
    indices: &[usize],
    patterns: &[String],
) -> Result<()> {
    let mut kept = Vec::new();
    for path in selected.drain(..) {
        let named = matches!(targets, TargetModules::List(l) if l.contains(&path));
        if named || layer_index(&path, patterns)?.is_some_and(|i| indices.contains(&i)) {
            kept.push(path);
        }
    }
    if kept.is_empty() {
        bail!(
            "layers_to_transform {indices:?} leaves no target module (layers_pattern {patterns:?})"
        );
    }
    *selected = kept;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<String> {
        let mut v = Vec::new();
        for l in 0..2 {
            for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
                v.push(format!("model.layers.{l}.{m}"));
            }
        }
        v.push("lm_head".into());
        v
    }

    #[test]
    fn list_is_suffix_match() {
        let t = TargetModules::parse_flag("q_proj,v_proj");
        let s = select(&t, None, &paths(), &[], "lm_head").unwrap();
        assert_eq!(s.len(), 4);
        assert!(s
            .iter()
            .all(|p| p.ends_with("q_proj") || p.ends_with("v_proj")));
    }

    #[test]
    fn all_linear_skips_head_and_exclude_applies() {
        let t = TargetModules::parse_flag("all-linear");
        let ex = TargetModules::List(vec!["down_proj".into()]);
        let s = select(&t, Some(&ex), &paths(), &[], "lm_head").unwrap();
        assert_eq!(s.len(), 4);
        assert!(!s.contains(&"lm_head".to_string()));
    }

    #[test]
    fn the_embedding_is_a_target_by_name_not_by_all_linear() {
        let embedding = "model.embed_tokens";
        let t = TargetModules::parse_flag("q_proj,embed_tokens");
        assert!(selects_module(&t, None, embedding).unwrap());
        let all = TargetModules::parse_flag("all-linear");
        assert!(!selects_module(&all, None, embedding).unwrap());
        let ex = TargetModules::List(vec!["embed_tokens".into()]);
        assert!(!selects_module(&t, Some(&ex), embedding).unwrap());
        let re = TargetModules::Pattern(r"model\.embed_tokens|.*q_proj".into());
        assert!(selects_module(&re, None, embedding).unwrap());
    }

    #[test]
    fn regex_is_full_match() {
        let t = TargetModules::Pattern(r"model\.layers\.1\..*_proj".into());
        let s = select(&t, None, &paths(), &[], "lm_head").unwrap();
        assert_eq!(s.len(), 3);
        let t = TargetModules::Pattern("q_proj".into());
        assert!(select(&t, None, &paths(), &[], "lm_head").is_err());
    }

    #[test]
    fn layer_index_reads_the_last_numbered_segment() {
        let p = "model.layers.12.self_attn.q_proj";
        assert_eq!(layer_index(p, &[]).unwrap(), Some(12));
        assert_eq!(layer_index(p, &["layers".into()]).unwrap(), Some(12));
        assert_eq!(
            layer_index(p, &["h".into(), "layers".into()]).unwrap(),
            Some(12)
        );
        assert_eq!(layer_index(p, &["h".into()]).unwrap(), None);
        assert_eq!(layer_index("lm_head", &[]).unwrap(), None);
    }

    #[test]
    fn keep_layers_filters_by_index_but_keeps_full_names() {
        let t = TargetModules::parse_flag("q_proj,mlp.down_proj,model.layers.0.self_attn.v_proj");
        let mut s = select(&t, None, &paths(), &[], "lm_head").unwrap();
        keep_layers(&mut s, &t, &[1], &[]).unwrap();
        assert_eq!(
            s,
            [
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
        let mut s = select(&t, None, &paths(), &[], "lm_head").unwrap();
        assert!(keep_layers(&mut s, &TargetModules::parse_flag("q_proj"), &[7], &[]).is_err());
    }

    #[test]
    fn unknown_target_lists_modules() {
        let t = TargetModules::parse_flag("qkv_proj");
        let e = select(&t, None, &paths(), &[], "lm_head")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("qkv_proj") && e.contains("down_proj, lm_head, q_proj, v_proj"),
            "{e}"
        );
    }
}
