//! The one mapping between module paths and adapter file keys, used by save and load alike.
//!
//! PEFT names a LoRA weight of module `model.layers.0.self_attn.q_proj` as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` on disk: the PeftModel and
//! tuner wrappers add `base_model.model.`, the adapter name (`default`) is dropped.

const PREFIX: &str = "base_model.model.";

/// File key of parameter `param` (e.g. `lora_A.weight`) of the module at `module_path`.
pub fn file_key(module_path: &str, param: &str) -> String {
    format!("{PREFIX}{module_path}.{param}")
}

/// Inverse of [`file_key`] for a known parameter name: `Some(module_path)` when `key` names
/// `param` of some module. Keys written with an adapter name (`lora_A.default.weight`, as
/// in-memory PEFT state dicts and some other tools have them) are accepted too.
pub fn module_path<'a>(key: &'a str, param: &str) -> Option<&'a str> {
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    if let Some(path) = rest.strip_suffix(param).and_then(|p| p.strip_suffix('.')) {
        return Some(path);
    }
    // `lora_A.weight` may appear as `lora_A.<adapter>.weight`.
    let (stem, leaf) = param.rsplit_once('.').unwrap_or((param, ""));
    let without_leaf = if leaf.is_empty() {
        rest
    } else {
        rest.strip_suffix(leaf)?.strip_suffix('.')?
    };
    let (head, _adapter) = without_leaf.rsplit_once('.')?;
    head.strip_suffix(stem)?.strip_suffix('.')
}

/// `key` in transformers' current module names: adapters HF PEFT saved for an image-text
/// model before transformers 4.52 name its language model `language_model.model` and its head
/// `language_model.lm_head`, which are `model.language_model` and `lm_head` now (HF PEFT
/// renames them on load too), as the model's own checkpoint names are renamed
/// ([`peft_models::loader::language_model_name`]).
pub fn in_current_layout(key: String) -> String {
    let renamed = key
        .strip_prefix(PREFIX)
        .and_then(peft_models::loader::language_model_name);
    match renamed {
        Some(name) => format!("{PREFIX}{name}"),
        None => key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let path = "model.layers.3.self_attn.q_proj";
        let key = file_key(path, "lora_A.weight");
        assert_eq!(
            key,
            "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(module_path(&key, "lora_A.weight"), Some(path));
        assert_eq!(module_path(&key, "lora_B.weight"), None);
    }

    #[test]
    fn old_image_text_keys_take_the_current_names() {
        let old = "base_model.model.language_model.model.layers.2.mlp.up_proj.lora_A.weight";
        assert_eq!(
            in_current_layout(old.into()),
            "base_model.model.model.language_model.layers.2.mlp.up_proj.lora_A.weight"
        );
        let head = "base_model.model.language_model.lm_head.weight";
        assert_eq!(
            in_current_layout(head.into()),
            "base_model.model.lm_head.weight"
        );
        let causal = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
        assert_eq!(in_current_layout(causal.into()), causal);
    }

    #[test]
    fn accepts_adapter_name_in_key() {
        let key = "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight";
        assert_eq!(
            module_path(key, "lora_B.weight"),
            Some("model.layers.3.mlp.up_proj")
        );
        let key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector";
        assert_eq!(
            module_path(key, "lora_magnitude_vector"),
            Some("model.layers.0.self_attn.v_proj")
        );
    }
}
