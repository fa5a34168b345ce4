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
    /// A tokenizer (for its chat template): `tokenizer.json` and the JSON and Jinja files
    /// beside it, not the weights.
    Tokenizer,
}

impl Wanted {
    fn noun(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Adapter => "adapter",
            Self::Dataset => "data set",
            Self::Tokenizer => "tokenizer",
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
    /// path, a single word, characters a repository name cannot have). A revision is one
    /// branch, tag or commit name, or a `refs/pr/N` / `refs/convert/NAME` reference.
    pub fn parse(s: &str) -> Option<Self> {
        if s.starts_with(['.', '/', '~']) || s.contains('\\') || s.contains("//") {
            return None;
        }
        let (org, rest) = s.split_once('/')?;
        let (name, revision, path) = match rest.split_once('@') {
            Some((name, after)) => {
                let parts: Vec<&str> = after.splitn(4, '/').collect();
                let taken = match parts.as_slice() {
                    ["refs", "pr" | "convert", _, ..] => 3,
                    _ => 1,
                };
                let revision = parts[..taken.min(parts.len())].join("/");
                let path = parts.get(taken..).map(|p| p.join("/")).unwrap_or_default();
                (name, revision, path)
            }
            None => match rest.split_once('/') {
                Some((name, path)) => (name, "main".to_string(), path.to_string()),
                None => (rest, "main".to_string(), String::new()),
            },
        };
        let path = path.trim_end_matches('/').to_string();
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 96
                && part.chars().all(safe)
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.'])
                && !part.contains("--")
                && !part.contains("..")
        };
        let revision_ok = revision
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != ".." && p.chars().all(safe));
        // Only names a URL carries as they are (the Hub client does not escape them).
        let path_ok = path
            .split('/')
            .all(|p| p != ".." && p != "." && p.chars().all(|c| safe(c) || c == '+'));
        (valid(org) && valid(name) && revision_ok && path_ok).then(|| Self {
            repo: format!("{org}/{name}"),
            revision,
            path,
        })
    }

    /// The repository and revision as the Hub client names them.
    fn repo(&self, wanted: Wanted) -> Repo {
        Repo::with_revision(self.repo.clone(), wanted.repo_type(), self.revision.clone())
    }

    /// `path` as a Hub name, where it is not meant as a local path (see [`meant_local`]).
    fn of_missing(path: &Path) -> Option<Self> {
        path.to_str()
            .filter(|_| !meant_local(path))
            .and_then(Self::parse)
    }
}

fn safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether `path`, which does not exist, is meant as a local path rather than a Hub name: a
/// folder of it exists here (`out/my-lora` where `out/` does), or it names a file by the
/// extensions of data and weights files (`data/train.jsonl`).
fn meant_local(path: &Path) -> bool {
    let first = path.components().next().map(|c| Path::new(c.as_os_str()));
    let file_like = path.extension().is_some_and(|e| {
        let e = e.to_string_lossy().to_ascii_lowercase();
        [
            "jsonl",
            "json",
            "csv",
            "tsv",
            "parquet",
            "gguf",
            "safetensors",
            "bin",
        ]
        .contains(&e.as_str())
    });
    first.is_some_and(Path::is_dir) || (file_like && path.components().count() == 2)
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
        let home_dir = std::env::var("HOME").ok();
        // Paths expand a leading `~` as Python's `os.path.expanduser` does.
        let var = |name: &str| {
            let v = std::env::var(name).ok().filter(|v| !v.is_empty())?;
            Some(match (v.strip_prefix("~/"), &home_dir) {
                (Some(rest), Some(home)) => format!("{home}/{rest}"),
                _ => v,
            })
        };
        let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home_dir.as_ref().map(|h| Path::new(h).join(".cache")))
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
        let cached = CachedRepo::new(&self.cache, name, wanted);
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
        if let Some(bad) = missing
            .iter()
            .find(|f| !f.chars().all(|c| safe(c) || c == '/' || c == '+'))
        {
            bail!(
                "cannot download {bad} of {}: its name needs escaping in a URL, which this Hub client does not do",
                name.repo
            );
        }
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
            let repo = api.repo(name.repo(wanted));
            for file in missing {
                repo.download(file)
                    .map_err(|e| self.describe(name, wanted, Some(file), e).error)
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
        let repo = api.repo(name.repo(wanted));
        // A stalled connection (a proxy, a captive portal) fails in seconds, as Python's
        // client does, instead of hanging: the client itself sets no read timeout.
        let info: hf_hub::api::RepoInfo = repo
            .info_request()
            .timeout(std::time::Duration::from_secs(10))
            .call()
            .map_err(|e| ApiError::RequestError(Box::new(e)))
            .and_then(|r| r.into_json().map_err(ApiError::IoError))
            .map_err(|e| self.describe(name, wanted, None, e))?;
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

    /// A one-line reason for a failed Hub request (listing the repository, or downloading
    /// `file`), and whether a cached copy may stand in. The Hub names the reason in its
    /// `X-Error-Code` header: without a token it answers 401 for a repository that does not
    /// exist as for a private one.
    fn describe(&self, name: &HubName, wanted: Wanted, file: Option<&str>, e: ApiError) -> Failure {
        let (noun, repo, rev) = (wanted.noun(), &name.repo, &name.revision);
        let page = match wanted {
            Wanted::Dataset => format!("{}/datasets/{repo}", self.endpoint()),
            _ => format!("{}/{repo}", self.endpoint()),
        };
        let absent = match &self.token {
            None => "(a private one needs HF_TOKEN)",
            Some(_) => "that HF_TOKEN can see",
        };
        let not_here = format!("{noun} not found: no local file or folder {repo}");
        let refused = |error: anyhow::Error| Failure {
            error,
            unreachable: None,
        };
        let request = match &e {
            ApiError::RequestError(r) => r.as_ref(),
            _ => return refused(anyhow!("the Hub request for {noun} {repo} failed: {e}")),
        };
        let (code, header) = match request {
            ureq::Error::Status(code, response) => {
                (*code, response.header("x-error-code").map(str::to_string))
            }
            ureq::Error::Transport(t) => {
                let error = match file {
                    None => anyhow!(
                        "{not_here}, and the Hub at {} cannot be reached ({t})",
                        self.endpoint()
                    ),
                    Some(_) => anyhow!("the Hub at {} cannot be reached ({t})", self.endpoint()),
                };
                return Failure {
                    error,
                    unreachable: Some(t.to_string()),
                };
            }
        };
        refused(match (header.as_deref(), code) {
            (Some("GatedRepo"), _) => anyhow!(
                "{noun} {repo} is gated on the Hub: accept its terms at {page} and set HF_TOKEN (or run `hf auth login`)"
            ),
            (Some("RevisionNotFound"), _) => anyhow!("{noun} {repo} has no revision {rev:?} on the Hub"),
            (Some("EntryNotFound"), _) => anyhow!(
                "{noun} {repo} has no file {} at revision {rev:?}",
                file.unwrap_or("?")
            ),
            (Some("RepoNotFound"), _) | (None, 404) => {
                anyhow!("{not_here}, and no repository {repo} on the Hub {absent}")
            }
            (None, 401) if self.token.is_none() => {
                anyhow!("{not_here}, and no repository {repo} on the Hub {absent}")
            }
            (_, 401 | 403) if self.token.is_some() => anyhow!(
                "the Hub refused HF_TOKEN for {noun} {repo} (an invalid token, or one without access to it)"
            ),
            (_, code) => anyhow!("the Hub answered {code} for {noun} {repo}"),
        })
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
    fn new(cache: &Path, name: &HubName, wanted: Wanted) -> Self {
        Self {
            dir: cache.join(name.repo(wanted).folder_name()),
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
    if wanted == Wanted::Dataset {
        return choose_data(name, files);
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
        Wanted::Tokenizer => "tokenizer.json",
        Wanted::Dataset => unreachable!("data sets are chosen above"),
    };
    // The folder's config first, the JSON and Jinja files beside it, then `weights`.
    let folder = |weights: Vec<String>| {
        let first = format!("{prefix}{config}");
        let mut chosen = vec![first.clone()];
        chosen.extend(with(&["json", "jinja"]).into_iter().filter(|f| *f != first));
        chosen.extend(weights);
        chosen
    };
    if wanted == Wanted::Tokenizer {
        if !here.contains(&config) {
            bail!("{repo} has no {config} in {:?}", name.path);
        }
        return Ok(folder(Vec::new()));
    }
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
        return Ok(folder(weights));
    }
    let ggufs = with(&["gguf"]);
    match (wanted, ggufs.as_slice()) {
        (Wanted::Model, [one]) => Ok(vec![one.clone()]),
        (Wanted::Model, [_, ..]) => bail!(
            "model {repo} holds {} GGUF files ({}); name one, e.g. {repo}/{}",
            ggufs.len(),
            ggufs.join(", "),
            ggufs[0]
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

/// The files of a data set's split (`train`, or the one `name.path` ends with) in its
/// configuration (the folder `name.path` names, or the only one), as the `datasets` library
/// finds splits without a loading script: files named for the split, the name a word of the
/// path between `-`, `.`, `/`, spaces and digits (`train.jsonl`,
/// `data/train-00000-of-00002.parquet`, `train/0.csv`; `train_sft` is its own split), or
/// every data file where none is named for a split.
fn choose_data(name: &HubName, files: &[String]) -> Result<Vec<String>> {
    const DATA: [&str; 5] = ["parquet", "jsonl", "json", "csv", "tsv"];
    const SPLIT_WORDS: [&str; 10] = [
        "train",
        "training",
        "test",
        "testing",
        "eval",
        "evaluation",
        "validation",
        "valid",
        "val",
        "dev",
    ];
    let repo = &name.repo;
    let under = |dir: &str| -> Vec<&str> {
        files
            .iter()
            .filter_map(|f| match dir {
                "" => Some(f.as_str()),
                d => f.strip_prefix(d).and_then(|r| r.strip_prefix('/')),
            })
            .filter(|f| {
                f.rsplit_once('.')
                    .is_some_and(|(_, e)| DATA.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect()
    };
    // The path names a folder (a configuration), or ends with a split's name.
    let (dir, split) = match name.path.as_str() {
        "" => ("", "train"),
        p if !under(p).is_empty() => (p, "train"),
        p => match p.rsplit_once('/') {
            Some((dir, split)) => (dir, split),
            None => ("", p),
        },
    };
    let data = under(dir);
    let words = |f: &str| -> Vec<String> {
        f.to_ascii_lowercase()
            .split(|c: char| matches!(c, '-' | '.' | '/' | ' ') || c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    };
    let named = |f: &str, split: &str| {
        words(f)
            .iter()
            .any(|w| w == split || (split == "train" && w == "training"))
    };
    let mut chosen: Vec<&str> = data.iter().copied().filter(|f| named(f, split)).collect();
    if chosen.is_empty() {
        // Words that look like split names: `train_sft`, `test_gen`.
        let mut splits: Vec<String> = data
            .iter()
            .flat_map(|f| words(f))
            .filter(|w| SPLIT_WORDS.iter().any(|s| w.starts_with(s)))
            .collect();
        // Training splits first: the example the error gives is one of them.
        splits.sort_by_key(|w| (!w.starts_with("train"), w.clone()));
        splits.dedup();
        let repo_dir = match dir {
            "" => repo.to_string(),
            d => format!("{repo}/{d}"),
        };
        if data.is_empty() {
            bail!("data set {repo_dir} has no data files (Parquet, JSON Lines, JSON, CSV or TSV)");
        }
        if split != "train" || !splits.is_empty() {
            bail!(
                "data set {repo_dir} has no split {split:?}{}",
                match splits.first() {
                    Some(first) => format!(
                        " (its files name {}): name one, e.g. {repo_dir}/{first}",
                        splits.join(", ")
                    ),
                    None => String::new(),
                }
            );
        }
        chosen = data;
    }
    // Configurations: the folders the chosen files sit in, less a folder named for the split.
    let config_of = |f: &str| -> String {
        let folder = f.rsplit_once('/').map_or("", |(d, _)| d);
        match folder.rsplit_once('/') {
            Some((parent, last)) if last == split => parent.to_string(),
            None if folder == split => String::new(),
            _ => folder.to_string(),
        }
    };
    let mut configs: Vec<String> = chosen.iter().map(|f| config_of(f)).collect();
    configs.sort();
    configs.dedup();
    if configs.len() > 1 {
        let within = |c: &str| match dir {
            "" => c.to_string(),
            d => format!("{d}/{c}"),
        };
        bail!(
            "data set {repo} has {} configurations ({}); name one, e.g. {repo}/{}",
            configs.len(),
            configs.join(", "),
            within(&configs[0])
        );
    }
    let mut out: Vec<String> = chosen
        .iter()
        .map(|f| match dir {
            "" => f.to_string(),
            d => format!("{d}/{f}"),
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `path` as given where it exists; otherwise, where it can be a Hub name, the local copy of
/// that repository (a model folder or GGUF file for [`Wanted::Model`], an adapter folder for
/// [`Wanted::Adapter`]). Errors say which it was not.
pub fn locate(path: &Path, wanted: Wanted) -> Result<PathBuf> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let Some(name) = HubName::of_missing(path) else {
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
    let Some(name) = HubName::of_missing(path) else {
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
        assert_eq!(
            HubName::parse("org/name@refs/pr/12"),
            name("org/name", "refs/pr/12", "")
        );
        assert_eq!(
            HubName::parse("org/d@refs/convert/parquet/default/train"),
            name("org/d", "refs/convert/parquet", "default/train")
        );
        assert_eq!(
            HubName::parse("org/name@v2/sub"),
            name("org/name", "v2", "sub")
        );
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
            "org/name@..",
            "org/name@v 2",
            "org/name/a b.gguf",
        ] {
            assert_eq!(HubName::parse(local), None, "{local}");
        }
        // Missing paths meant as local ones: under a folder that exists, or a data file.
        assert!(meant_local(Path::new("src/no-such-adapter")));
        assert!(meant_local(Path::new("data/train.jsonl")));
        assert!(!meant_local(Path::new(
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        )));
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
            e.ends_with(
                "holds 2 GGUF files (m-Q4_K_M.gguf, m-Q8_0.gguf); name one, e.g. org/m-GGUF/m-Q4_K_M.gguf"
            ),
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
    fn a_tokenizer_without_the_weights() {
        let repo = files(&[
            "config.json",
            "merges.txt",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
        ]);
        let n = HubName::parse("Qwen/Qwen3-0.6B").unwrap();
        assert_eq!(
            choose(&n, Wanted::Tokenizer, &repo).unwrap(),
            files(&[
                "tokenizer.json",
                "config.json",
                "tokenizer_config.json",
                "vocab.json"
            ])
        );
        let e = choose(&n, Wanted::Tokenizer, &files(&["model.gguf"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("Qwen/Qwen3-0.6B has no tokenizer.json"), "{e}");
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
        assert!(
            e.contains("has no split \"train\" (its files name test): name one, e.g. org/d/test"),
            "{e}"
        );
        // Splits named otherwise (ultrachat_200k): one of them, by name.
        let named = files(&[
            "data/train_sft-00000-of-00001.parquet",
            "data/train_gen-00000-of-00001.parquet",
            "data/test_sft-00000-of-00001.parquet",
        ]);
        let e = choose(&n, Wanted::Dataset, &named).unwrap_err().to_string();
        assert!(
            e.contains(
                "(its files name train_gen, train_sft, test_sft): name one, e.g. org/d/train_gen"
            ),
            "{e}"
        );
        let sft = HubName::parse("org/d/train_sft").unwrap();
        assert_eq!(
            choose(&sft, Wanted::Dataset, &named).unwrap(),
            files(&["data/train_sft-00000-of-00001.parquet"])
        );
    }
}
