//! Models, adapters and data sets named by their Hugging Face Hub id (`org/name`), as
//! `from_pretrained` and `load_dataset` take them: read from the Hub's local cache (the one
//! Python's `huggingface_hub` fills, so files already downloaded there are not fetched again)
//! or downloaded into it. The environment is Python's: `HF_HUB_CACHE` / `HF_HOME` place the
//! cache, `HF_TOKEN` (or the token `hf auth login` saved) opens gated and private
//! repositories, `HF_ENDPOINT` names a mirror, `HF_HUB_OFFLINE=1` reads the cache alone.
//!
//! A name is a Hub id only where no local file or folder has it: `org/name`, optionally
//! `@revision` (a branch, tag or commit), optionally followed by a path inside the repository
//! (`org/name/model-Q8_0.gguf`, an adapter's subfolder, a data set's configuration).

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// What a Hub name is asked for: which of a repository's files are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// A base model: its JSON files (config, tokenizer, generation config), chat template and
    /// weights (safetensors, else PyTorch `.bin`), or one GGUF file.
    Model,
    /// A PEFT adapter: `adapter_config.json` and its weights.
    Adapter,
    /// A data set's training split: its data files (Parquet, JSON Lines, CSV, TSV).
    Dataset,
}

impl Wanted {
    fn noun(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Adapter => "adapter",
            Self::Dataset => "data set",
        }
    }

    fn repo_type(self) -> RepoType {
        match self {
            Self::Dataset => RepoType::Dataset,
            _ => RepoType::Model,
        }
    }
}

/// A Hub name taken apart: `org/name[@revision][/path]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubName {
    pub repo: String,
    pub revision: String,
    /// A file or folder inside the repository ("" for its root).
    pub path: String,
}

impl HubName {
    /// `s` as a Hub name, or `None` where it cannot be one (an absolute or explicitly relative
    /// path, a single word, characters a repository name cannot have).
    pub fn parse(s: &str) -> Option<Self> {
        if s.starts_with(['.', '/', '~']) || s.contains('\\') || s.contains("//") {
            return None;
        }
        let mut parts = s.splitn(3, '/');
        let (org, rest) = (parts.next()?, parts.next()?);
        let path = parts.next().unwrap_or("").trim_end_matches('/').to_string();
        let (name, revision) = match rest.split_once('@') {
            Some((name, rev)) if !rev.is_empty() => (name, rev.to_string()),
            Some(_) => return None,
            None => (rest, "main".to_string()),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 96
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
                && !part.contains("--")
                && !part.contains("..")
        };
        let path_ok = path.split('/').all(|p| p != ".." && p != ".");
        (valid(org) && valid(name) && path_ok).then(|| Self {
            repo: format!("{org}/{name}"),
            revision,
            path,
        })
    }
}

/// Where the Hub is and how it is reached (see the module documentation).
#[derive(Clone, Debug)]
pub struct Hub {
    /// The cache's `hub` folder (it holds `models--org--name` and `datasets--org--name`).
    pub cache: PathBuf,
    pub endpoint: Option<String>,
    pub token: Option<String>,
    pub offline: bool,
}

impl Hub {
    /// The Hub as Python's `huggingface_hub` finds it from the environment.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("huggingface")
        });
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        });
        Self {
            cache,
            endpoint: var("HF_ENDPOINT"),
            token,
            offline,
        }
    }

    fn api(&self) -> Result<Api> {
        // The client links cache files with relative paths, which it computes from absolute
        // ones only.
        let cache = std::path::absolute(&self.cache)
            .with_context(|| format!("bad Hub cache path {}", self.cache.display()))?;
        let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache))
            .with_token(self.token.clone())
            .with_retries(3);
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        builder
            .build()
            .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))
    }

    fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("https://huggingface.co")
    }

    /// The local files of `name` for `wanted`: a model or adapter folder (or a GGUF file), or
    /// a data set's training files, fetched into the cache where they are not there yet.
    pub fn fetch(&self, name: &HubName, wanted: Wanted) -> Result<Vec<PathBuf>> {
        let cached = CachedRepo::new(&self.cache, &name.repo, wanted);
        let listing = match self.offline {
            true => None,
            false => match self.list(name, wanted) {
                Ok(listing) => Some(listing),
                Err(Failure {
                    unreachable: Some(why),
                    ..
                }) if cached.snapshot(&name.revision).is_some() => {
                    eprintln!(
                        "note: the Hub at {} cannot be reached ({why}); using the cached copy of {}",
                        self.endpoint(),
                        name.repo
                    );
                    None
                }
                Err(why) => return Err(why.error),
            },
        };
        let Some((commit, files)) = listing else {
            return self.cached_files(name, wanted, &cached);
        };
        let chosen = choose(name, wanted, &files)?;
        let snapshot = cached.snapshots().join(&commit);
        let missing: Vec<&String> = chosen
            .iter()
            .filter(|f| !snapshot.join(f).exists())
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "downloading {} file{} of {} from {} into {}",
                missing.len(),
                if missing.len() == 1 { "" } else { "s" },
                name.repo,
                self.endpoint(),
                self.cache.display()
            );
            let api = self.api()?;
            let repo = api.repo(Repo::with_revision(
                name.repo.clone(),
                wanted.repo_type(),
                name.revision.clone(),
            ));
            for file in missing {
                repo.download(file)
                    .map_err(|e| self.describe(name, wanted, e).error)
                    .with_context(|| format!("cannot download {file} of {}", name.repo))?;
            }
        }
        let paths: Vec<PathBuf> = chosen.iter().map(|f| snapshot.join(f)).collect();
        if let Some(gone) = paths.iter().find(|p| !p.exists()) {
            bail!(
                "{} changed on the Hub while its files downloaded ({} is not in commit {commit}): run again",
                name.repo,
                gone.display()
            );
        }
        Ok(paths)
    }

    /// The commit `name`'s revision is at and the repository's files.
    fn list(&self, name: &HubName, wanted: Wanted) -> Result<(String, Vec<String>), Failure> {
        let api = self.api().map_err(|error| Failure {
            error,
            unreachable: None,
        })?;
        let repo = api.repo(Repo::with_revision(
            name.repo.clone(),
            wanted.repo_type(),
            name.revision.clone(),
        ));
        let info = repo.info().map_err(|e| self.describe(name, wanted, e))?;
        Ok((
            info.sha,
            info.siblings.into_iter().map(|s| s.rfilename).collect(),
        ))
    }

    /// `name`'s files from the cache alone (offline, or the Hub out of reach).
    fn cached_files(
        &self,
        name: &HubName,
        wanted: Wanted,
        cached: &CachedRepo,
    ) -> Result<Vec<PathBuf>> {
        let Some(snapshot) = cached.snapshot(&name.revision) else {
            bail!(
                "{} {} is not in the Hub cache {} (offline: HF_HUB_OFFLINE is set)",
                wanted.noun(),
                name.repo,
                self.cache.display()
            );
        };
        let files = files_under(&snapshot)?;
        let chosen = choose(name, wanted, &files)?;
        Ok(chosen.iter().map(|f| snapshot.join(f)).collect())
    }

    /// A one-line reason for a failed Hub request, and whether a cached copy may stand in.
    fn describe(&self, name: &HubName, wanted: Wanted, e: ApiError) -> Failure {
        let status = match &e {
            ApiError::RequestError(r) => match r.as_ref() {
                ureq::Error::Status(code, _) => Some(*code),
                _ => None,
            },
            _ => None,
        };
        let noun = wanted.noun();
        let repo = &name.repo;
        let (error, unreachable) = match status {
            Some(401 | 403) => (
                anyhow!(
                    "the Hub refused access to {noun} {repo} (gated or private: accept its terms on the Hub and set HF_TOKEN, or run `hf auth login`)"
                ),
                None,
            ),
            Some(404) => (
                anyhow!(
                    "{noun} not found: {repo} is neither a local path nor a repository on the Hub{}",
                    match name.revision.as_str() {
                        "main" => String::new(),
                        rev => format!(" with revision {rev:?}"),
                    }
                ),
                None,
            ),
            _ => (
                anyhow!(
                    "{noun} not found: {repo} is not a local path, and the Hub at {} cannot be reached ({e})",
                    self.endpoint()
                ),
                Some(e.to_string()),
            ),
        };
        Failure { error, unreachable }
    }
}

/// A failed Hub request: its message, and where the Hub was out of reach (not a refusal, so
/// that a cached copy may answer instead), why.
struct Failure {
    error: anyhow::Error,
    unreachable: Option<String>,
}

/// A repository's folder in the cache: `refs/<revision>` holds a commit, `snapshots/<commit>`
/// its files.
struct CachedRepo {
    dir: PathBuf,
}

impl CachedRepo {
    fn new(cache: &Path, repo: &str, wanted: Wanted) -> Self {
        let kind = match wanted.repo_type() {
            RepoType::Dataset => "datasets",
            _ => "models",
        };
        Self {
            dir: cache.join(format!("{kind}--{}", repo.replace('/', "--"))),
        }
    }

    fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    /// The cached snapshot of `revision`: a branch or tag through its ref, or a commit.
    fn snapshot(&self, revision: &str) -> Option<PathBuf> {
        let commit = std::fs::read_to_string(self.dir.join("refs").join(revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| revision.to_string());
        let dir = self.snapshots().join(commit);
        dir.is_dir().then_some(dir)
    }
}

/// The files below `dir`, as repository paths (`/`-separated).
fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The files of a repository's `files` that `wanted` reads from `name.path`; for a model or
/// an adapter, the first is the one to load (the folder's file, or the GGUF file).
fn choose(name: &HubName, wanted: Wanted, files: &[String]) -> Result<Vec<String>> {
    let repo = &name.repo;
    let noun = wanted.noun();
    if !name.path.is_empty() && files.contains(&name.path) {
        return Ok(vec![name.path.clone()]);
    }
    let prefix = match name.path.as_str() {
        "" => String::new(),
        p => format!("{p}/"),
    };
    let inside: Vec<&str> = files
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .collect();
    if inside.is_empty() {
        bail!("{noun} {repo} has no file or folder {:?}", name.path);
    }
    let ext = |f: &str| f.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let here: Vec<&str> = inside
        .iter()
        .copied()
        .filter(|f| !f.contains('/'))
        .collect();
    let with = |exts: &[&str]| -> Vec<String> {
        here.iter()
            .filter(|f| ext(f).is_some_and(|e| exts.contains(&e.as_str())))
            .map(|f| format!("{prefix}{f}"))
            .collect()
    };
    let config = match wanted {
        Wanted::Model => "config.json",
        Wanted::Adapter => "adapter_config.json",
        Wanted::Dataset => return choose_data(name, &prefix, &inside),
    };
    // The weights the loaders read, safetensors before PyTorch's: a model's single file or
    // its shards (`model-00001-of-00002.safetensors`), not a repository's other copies
    // (`consolidated.safetensors`, `training_args.bin`); an adapter's one file.
    let stem = match wanted {
        Wanted::Model => ["model", "pytorch_model"],
        _ => ["adapter_model", "adapter_model"],
    };
    let weights_of = |stem: &str, ext: &str| -> Vec<String> {
        with(&[ext])
            .into_iter()
            .filter(|f| {
                let base = f.rsplit('/').next().unwrap_or(f);
                let base = &base[..base.len() - ext.len() - 1];
                base == stem || (wanted == Wanted::Model && is_shard(base, stem))
            })
            .collect()
    };
    let weights = match weights_of(stem[0], "safetensors") {
        w if w.is_empty() => weights_of(stem[1], "bin"),
        w => w,
    };
    if here.contains(&config) && !weights.is_empty() {
        let first = format!("{prefix}{config}");
        let mut chosen = vec![first.clone()];
        chosen.extend(with(&["json", "jinja"]).into_iter().filter(|f| *f != first));
        chosen.extend(weights);
        return Ok(chosen);
    }
    let ggufs = with(&["gguf"]);
    match (wanted, ggufs.as_slice()) {
        (Wanted::Model, [one]) => Ok(vec![one.clone()]),
        (Wanted::Model, [_, ..]) => bail!(
            "model {repo} holds {} GGUF files; name one, e.g. {repo}/{}",
            ggufs.len(),
            ggufs.join(", ")
        ),
        _ => bail!(
            "{noun} {repo}{} has no {config} with safetensors or .bin weights{}",
            match name.path.as_str() {
                "" => String::new(),
                p => format!("/{p}"),
            },
            match wanted {
                Wanted::Model => " and no GGUF file",
                _ => "",
            }
        ),
    }
}

/// Whether `base` (a file name less its extension) is a shard of `stem`: `stem-00001-of-00004`.
fn is_shard(base: &str, stem: &str) -> bool {
    let Some(rest) = base.strip_prefix(stem).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.split_once("-of-")
        .is_some_and(|(i, n)| digits(i) && digits(n))
}

/// The training split of a data set's files below `prefix` (`inside` relative to it), as the
/// `datasets` library finds it without a loading script: files named for the split (`train`
/// as a word of the path: `train.jsonl`, `data/train-00000-of-00002.parquet`, `train/0.csv`),
/// or every data file where none is named for a split. One configuration at a time.
fn choose_data(name: &HubName, prefix: &str, inside: &[&str]) -> Result<Vec<String>> {
    const DATA: [&str; 5] = ["parquet", "jsonl", "json", "csv", "tsv"];
    let repo = &name.repo;
    let data: Vec<&str> = inside
        .iter()
        .copied()
        .filter(|f| {
            f.rsplit_once('.')
                .is_some_and(|(_, e)| DATA.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    let words = |f: &str| -> Vec<String> {
        f.to_ascii_lowercase()
            .split(|c: char| !c.is_ascii_alphabetic())
            .map(str::to_string)
            .collect()
    };
    let names_split =
        |f: &str, split: &[&str]| words(f).iter().any(|w| split.contains(&w.as_str()));
    const SPLITS: [&str; 6] = ["train", "test", "validation", "valid", "eval", "dev"];
    let any_split = data.iter().any(|f| names_split(f, &SPLITS));
    let train: Vec<&str> = match any_split {
        true => data
            .iter()
            .copied()
            .filter(|f| names_split(f, &["train"]))
            .collect(),
        false => data.clone(),
    };
    if train.is_empty() {
        bail!(
            "data set {repo} has no training split{} (Parquet, JSON Lines, CSV or TSV files)",
            match prefix {
                "" => String::new(),
                p => format!(" under {p}"),
            }
        );
    }
    // Configurations: the folders the training files sit in, less a trailing `train` folder.
    let config_of = |f: &str| -> String {
        let dir = f.rsplit_once('/').map_or("", |(d, _)| d);
        match dir {
            "train" => "",
            d => d.strip_suffix("/train").unwrap_or(d),
        }
        .to_string()
    };
    let mut configs: Vec<String> = train.iter().map(|f| config_of(f)).collect();
    configs.sort();
    configs.dedup();
    if configs.len() > 1 {
        bail!(
            "data set {repo} has {} configurations ({}); name one, e.g. {repo}/{}",
            configs.len(),
            configs.join(", "),
            format!("{prefix}{}", configs[0]).trim_end_matches('/')
        );
    }
    let mut chosen: Vec<String> = train.iter().map(|f| format!("{prefix}{f}")).collect();
    chosen.sort();
    Ok(chosen)
}

/// `path` as given where it exists; otherwise, where it can be a Hub name, the local copy of
/// that repository (a model folder or GGUF file for [`Wanted::Model`], an adapter folder for
/// [`Wanted::Adapter`]). Errors say which it was not.
pub fn locate(path: &Path, wanted: Wanted) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let name = path.to_str().and_then(HubName::parse);
    let Some(name) = name else {
        let what = match wanted {
            Wanted::Adapter => "adapter folder",
            other => other.noun(),
        };
        bail!("{what} not found: {}", path.display());
    };
    let files = Hub::from_env().fetch(&name, wanted)?;
    let first = files.first().context("the Hub listed no files")?;
    Ok(match (wanted, first.extension()) {
        (Wanted::Model, Some(e)) if e == "gguf" => first.clone(),
        _ => first
            .parent()
            .context("a cached file has no folder")?
            .to_path_buf(),
    })
}

/// The data files of `path`: itself where it exists, otherwise the training split of the
/// Hub data set it names (see [`choose_data`]).
pub fn locate_data(path: &Path) -> Result<Vec<PathBuf>> {
    if path.exists() {
        return Ok(vec![path.to_path_buf()]);
    }
    let Some(name) = path.to_str().and_then(HubName::parse) else {
        bail!("cannot read data file {}: not found", path.display());
    };
    Hub::from_env().fetch(&name, Wanted::Dataset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(repo: &str, revision: &str, path: &str) -> Option<HubName> {
        Some(HubName {
            repo: repo.into(),
            revision: revision.into(),
            path: path.into(),
        })
    }

    #[test]
    fn hub_names_and_paths() {
        assert_eq!(HubName::parse("org/name"), name("org/name", "main", ""));
        assert_eq!(
            HubName::parse("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0"),
            name("HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0", "")
        );
        assert_eq!(
            HubName::parse("org/name/sub/model.Q8_0.gguf"),
            name("org/name", "main", "sub/model.Q8_0.gguf")
        );
        assert_eq!(HubName::parse("org/name/"), name("org/name", "main", ""));
        for local in [
            "model",
            "./org/name",
            "../org/name",
            "/abs/path",
            "~/models/x",
            "org/na me",
            "org/-name",
            "org/name@",
            "org//name",
            "org/a--b",
            "org/name/../x",
        ] {
            assert_eq!(HubName::parse(local), None, "{local}");
        }
    }

    fn files(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_model_takes_its_json_template_and_weights() {
        let n = HubName::parse("org/m").unwrap();
        let repo = files(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.jinja",
            "training_args.bin",
            "onnx/model.onnx",
            "original/consolidated.safetensors",
            "consolidated.safetensors",
        ]);
        assert_eq!(
            choose(&n, Wanted::Model, &repo).unwrap(),
            files(&[
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "chat_template.jinja",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ])
        );
        // PyTorch weights where no safetensors are, and never training_args.bin.
        let bin = files(&["config.json", "pytorch_model.bin", "training_args.bin"]);
        assert_eq!(
            choose(&n, Wanted::Model, &bin).unwrap(),
            files(&["config.json", "pytorch_model.bin"])
        );
    }

    #[test]
    fn gguf_repositories_need_a_file_named_when_they_hold_several() {
        let n = HubName::parse("org/m-GGUF").unwrap();
        let one = files(&["README.md", "m-Q4_K_M.gguf"]);
        assert_eq!(
            choose(&n, Wanted::Model, &one).unwrap(),
            files(&["m-Q4_K_M.gguf"])
        );
        let two = files(&["m-Q4_K_M.gguf", "m-Q8_0.gguf"]);
        let e = choose(&n, Wanted::Model, &two).unwrap_err().to_string();
        assert!(
            e.contains("holds 2 GGUF files; name one, e.g. org/m-GGUF/m-Q4_K_M.gguf"),
            "{e}"
        );
        let q8 = HubName::parse("org/m-GGUF/m-Q8_0.gguf").unwrap();
        assert_eq!(
            choose(&q8, Wanted::Model, &two).unwrap(),
            files(&["m-Q8_0.gguf"])
        );
        let e = choose(&n, Wanted::Model, &files(&["README.md"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no config.json with safetensors or .bin weights and no GGUF"),
            "{e}"
        );
    }

    #[test]
    fn an_adapter_in_a_subfolder() {
        let repo = files(&[
            "README.md",
            "checkpoint-100/adapter_config.json",
            "checkpoint-100/adapter_model.safetensors",
            "checkpoint-100/optimizer.pt",
            "final/adapter_config.json",
            "final/adapter_model.bin",
            "final/expected.safetensors",
        ]);
        let n = HubName::parse("org/lora/final").unwrap();
        assert_eq!(
            choose(&n, Wanted::Adapter, &repo).unwrap(),
            files(&["final/adapter_config.json", "final/adapter_model.bin"])
        );
        let root = HubName::parse("org/lora").unwrap();
        let e = choose(&root, Wanted::Adapter, &repo)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter org/lora has no adapter_config.json"),
            "{e}"
        );
        let e = choose(
            &HubName::parse("org/lora/x").unwrap(),
            Wanted::Adapter,
            &repo,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("has no file or folder \"x\""), "{e}");
    }

    #[test]
    fn a_data_set_gives_its_training_split() {
        let n = HubName::parse("org/d").unwrap();
        let parquet = files(&[
            "README.md",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
        ]);
        assert_eq!(
            choose(&n, Wanted::Dataset, &parquet).unwrap(),
            files(&[
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"
            ])
        );
        // No file named for a split: all are training data.
        let plain = files(&["alpaca.jsonl", "README.md"]);
        assert_eq!(
            choose(&n, Wanted::Dataset, &plain).unwrap(),
            files(&["alpaca.jsonl"])
        );
        let folders = files(&["train/0.csv", "train/1.csv", "test/0.csv"]);
        assert_eq!(
            choose(&n, Wanted::Dataset, &folders).unwrap(),
            files(&["train/0.csv", "train/1.csv"])
        );
        let configs = files(&["en/train.jsonl", "fr/train.jsonl", "fr/test.jsonl"]);
        let e = choose(&n, Wanted::Dataset, &configs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2 configurations (en, fr); name one, e.g. org/d/en"),
            "{e}"
        );
        let fr = HubName::parse("org/d/fr").unwrap();
        assert_eq!(
            choose(&fr, Wanted::Dataset, &configs).unwrap(),
            files(&["fr/train.jsonl"])
        );
        let e = choose(&n, Wanted::Dataset, &files(&["test.jsonl"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no training split"), "{e}");
    }
}
