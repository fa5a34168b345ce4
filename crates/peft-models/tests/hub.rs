//! Models and data sets by Hub id, against a stand-in Hub on a local port: what is
//! downloaded (and what is not), the cache Python's `huggingface_hub` shares, offline use,
//! gated repositories and the errors a user sees.

#[path = "support/mock_hub.rs"]
mod mock_hub;

use candle_core::{DType, Device};
use mock_hub::{Content, MockHub, MockRepo};
use peft_models::hub::{Hub, HubName, Wanted};
use peft_models::load_model;
use peft_models::testing::{max_abs_diff, tiny_llama};
use std::path::Path;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn hub(mock: &MockHub, cache: &Path) -> Hub {
    Hub {
        cache: cache.to_path_buf(),
        endpoint: Some(mock.url.clone()),
        token: None,
        offline: false,
    }
}

/// A tiny model folder served as `org/tiny`, with files a model load does not need.
fn serve_tiny_model(mock: &MockHub, dir: &Path, token: Option<&str>) {
    let mut model = tiny_llama(7, false).unwrap();
    peft_models::save::save_hf_model(&mut model, None, dir, DType::F32).unwrap();
    let mut files: Vec<(String, Content)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, Content::File(path))
        })
        .collect();
    files.push(("README.md".into(), Content::Bytes(b"# tiny".to_vec())));
    files.push(("onnx/model.onnx".into(), Content::Bytes(vec![0; 64])));
    mock.add(
        "models",
        "org/tiny",
        MockRepo {
            files,
            token: token.map(str::to_string),
            commit: COMMIT.into(),
        },
    );
}

fn resolves(log: &[String]) -> Vec<&str> {
    log.iter()
        .filter(|l| l.contains("/resolve/"))
        .map(|l| l.rsplit('/').next().unwrap())
        .collect()
}

#[test]
fn a_model_downloads_once_into_the_shared_cache_and_loads_offline() {
    let mock = MockHub::start();
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    serve_tiny_model(&mock, src.path(), None);
    let name = HubName::parse("org/tiny").unwrap();
    let files = hub(&mock, cache.path())
        .fetch(&name, Wanted::Model)
        .unwrap();
    // The folder as huggingface_hub lays it out: a snapshot per commit, a ref to it.
    let snapshot = cache
        .path()
        .join("models--org--tiny/snapshots")
        .join(COMMIT);
    assert_eq!(files[0], snapshot.join("config.json"));
    assert_eq!(
        std::fs::read_to_string(cache.path().join("models--org--tiny/refs/main")).unwrap(),
        COMMIT
    );
    let mut fetched = resolves(&mock.take_log()).join(" ");
    fetched = fetched.replace("model.safetensors", "weights");
    assert!(
        !fetched.contains("README") && !fetched.contains("onnx"),
        "{fetched}"
    );
    assert!(fetched.contains("weights"), "{fetched}");

    let ours = load_model(&snapshot, &Device::Cpu, DType::F32).unwrap();
    let theirs = load_model(src.path(), &Device::Cpu, DType::F32).unwrap();
    let key = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(max_abs_diff(&ours.weights[key], &theirs.weights[key]), 0.0);

    // Again: the listing only, nothing downloaded.
    hub(&mock, cache.path())
        .fetch(&name, Wanted::Model)
        .unwrap();
    let log = mock.take_log();
    assert_eq!(resolves(&log), Vec::<&str>::new(), "{log:?}");
    assert_eq!(log.len(), 1, "{log:?}");

    // Offline, and with the Hub out of reach: the cached snapshot, no request.
    let offline = Hub {
        offline: true,
        ..hub(&mock, cache.path())
    };
    assert_eq!(offline.fetch(&name, Wanted::Model).unwrap(), files);
    let unreachable = Hub {
        endpoint: Some("http://127.0.0.1:1".into()),
        ..hub(&mock, cache.path())
    };
    assert_eq!(unreachable.fetch(&name, Wanted::Model).unwrap(), files);
    assert!(mock.take_log().is_empty());
}

#[test]
fn gated_missing_and_uncached_repositories_and_revisions_say_what_to_do() {
    let mock = MockHub::start();
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    serve_tiny_model(&mock, src.path(), Some("hf_secret"));
    let tiny = HubName::parse("org/tiny").unwrap();
    let err = |h: &Hub, n: &str| {
        let n = HubName::parse(n).unwrap();
        format!("{:#}", h.fetch(&n, Wanted::Model).unwrap_err())
    };

    // Gated: the listing is open, the files are not.
    let e = err(&hub(&mock, cache.path()), "org/tiny");
    assert!(
        e.contains(&format!(
            "model org/tiny is gated on the Hub: accept its terms at {}/org/tiny and set HF_TOKEN",
            mock.url
        )),
        "{e}"
    );
    let with_token = Hub {
        token: Some("hf_secret".into()),
        ..hub(&mock, cache.path())
    };
    let files = with_token.fetch(&tiny, Wanted::Model).unwrap();
    assert!(files[0].ends_with("config.json") && files[0].exists());

    // A revision by its commit, and one the repository does not have.
    let pinned = HubName::parse(&format!("org/tiny@{COMMIT}")).unwrap();
    assert_eq!(with_token.fetch(&pinned, Wanted::Model).unwrap(), files);
    let e = err(&with_token, "org/tiny@v2");
    assert_eq!(e, "model org/tiny has no revision \"v2\" on the Hub");

    // The Hub answers 401 for a repository it does not have, as for a private one.
    let e = err(&hub(&mock, cache.path()), "org/none");
    assert_eq!(
        e,
        "model not found: no local file or folder org/none, and no repository org/none on the Hub (a private one needs HF_TOKEN)"
    );
    let unreachable = Hub {
        endpoint: Some("http://127.0.0.1:1".into()),
        ..hub(&mock, cache.path())
    };
    let e = err(&unreachable, "org/other");
    assert!(
        e.starts_with("model not found: no local file or folder org/other, and the Hub at http://127.0.0.1:1 cannot be reached"),
        "{e}"
    );
    let offline = Hub {
        offline: true,
        ..hub(&mock, cache.path())
    };
    let e = err(&offline, "org/other");
    assert!(e.contains("model org/other is not in the Hub cache"), "{e}");
}

/// A cache Python's `huggingface_hub` filled (files linked to blobs, a ref naming the
/// snapshot) serves offline as it is.
#[test]
fn a_cache_python_filled_is_read_as_it_is() {
    let (src, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut model = tiny_llama(3, true).unwrap();
    peft_models::save::save_hf_model(&mut model, None, src.path(), DType::F32).unwrap();
    let repo = cache.path().join("models--Org--Py");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    for (i, entry) in std::fs::read_dir(src.path()).unwrap().enumerate() {
        let path = entry.unwrap().path();
        let blob = repo.join("blobs").join(format!("blob{i}"));
        std::fs::copy(&path, &blob).unwrap();
        let link = snapshot.join(path.file_name().unwrap());
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), link).unwrap();
    }
    let offline = Hub {
        cache: cache.path().to_path_buf(),
        endpoint: None,
        token: None,
        offline: true,
    };
    let files = offline
        .fetch(&HubName::parse("Org/Py").unwrap(), Wanted::Model)
        .unwrap();
    assert_eq!(files[0], snapshot.join("config.json"));
    let ours = load_model(&snapshot, &Device::Cpu, DType::F32).unwrap();
    let theirs = load_model(src.path(), &Device::Cpu, DType::F32).unwrap();
    let key = "model.embed_tokens.weight";
    assert_eq!(max_abs_diff(&ours.weights[key], &theirs.weights[key]), 0.0);
}

#[test]
fn a_data_set_downloads_its_training_split() {
    let mock = MockHub::start();
    let cache = tempfile::tempdir().unwrap();
    let file =
        |name: &str, text: &str| (name.to_string(), Content::Bytes(text.as_bytes().to_vec()));
    mock.add(
        "datasets",
        "org/qa",
        MockRepo {
            files: vec![
                file("README.md", "# qa"),
                file("data/train-00000-of-00002.jsonl", "{\"q\": 1}\n"),
                file("data/train-00001-of-00002.jsonl", "{\"q\": 2}\n"),
                file("data/test-00000-of-00001.jsonl", "{\"q\": 3}\n"),
            ],
            token: None,
            commit: COMMIT.into(),
        },
    );
    let name = HubName::parse("org/qa").unwrap();
    let files = hub(&mock, cache.path())
        .fetch(&name, Wanted::Dataset)
        .unwrap();
    let text: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(text, ["{\"q\": 1}\n", "{\"q\": 2}\n"]);
    assert!(files[0].starts_with(cache.path().join("datasets--org--qa/snapshots")));
    // Two requests a file (its metadata, then its bytes), none for the test split.
    let mut fetched = resolves(&mock.take_log())
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    fetched.dedup();
    assert_eq!(
        fetched,
        ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"]
    );
}
