//! A stand-in for the Hugging Face Hub on a local port, for tests: the three requests the Hub
//! client makes (a repository's listing, a file's metadata by a one-byte range, the file from
//! an offset), answered from files given per repository, with a log of what was asked. It
//! fails as the Hub does: 401 for a repository it does not have (without saying whether it
//! exists), the listing of a gated repository open but its files refused, the reason named in
//! `X-Error-Code`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A repository's files: in memory, or read from disk when asked for.
pub enum Content {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Bytes(b) => b.clone(),
            Content::File(p) => std::fs::read(p).expect("a served file is readable"),
        }
    }
}

pub struct MockRepo {
    pub files: Vec<(String, Content)>,
    /// The bearer token a gated repository asks for to download its files, if any.
    pub token: Option<String>,
    /// Its one commit, which `main` (and the commit's own name) resolve to.
    pub commit: String,
}

#[derive(Default)]
struct State {
    /// By `models/org/name` or `datasets/org/name`.
    repos: HashMap<String, MockRepo>,
    log: Vec<String>,
}

pub struct MockHub {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl MockHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        Self { url, state }
    }

    /// Adds a repository (`kind` "models" or "datasets").
    pub fn add(&self, kind: &str, id: &str, repo: MockRepo) {
        let mut s = self.state.lock().unwrap();
        s.repos.insert(format!("{kind}/{id}"), repo);
    }

    /// The requests so far, as `GET path` lines, and forgets them.
    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.state.lock().unwrap().log)
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    if reader.read_line(&mut head).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, extra, body) = answer(&path, &headers, state);
    let mut out = stream;
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        response.push_str(&format!("{k}: {v}\r\n"));
    }
    response.push_str("\r\n");
    let _ = out.write_all(response.as_bytes());
    let _ = out.write_all(&body);
    let _ = out.flush();
    // Drain what the client may still send, so that closing does not reset the connection.
    let _ = reader.read(&mut [0; 1]);
}

type Answer = (&'static str, Vec<(String, String)>, Vec<u8>);

fn answer(path: &str, headers: &HashMap<String, String>, state: &Mutex<State>) -> Answer {
    let mut s = state.lock().unwrap();
    s.log.push(format!("GET {path}"));
    let error = |status: &'static str, code: &str| -> Answer {
        let header = vec![("X-Error-Code".to_string(), code.to_string())];
        (status, header, code.as_bytes().to_vec())
    };
    let not_found = error("401 Unauthorized", "RepoNotFound");
    // /api/{kind}/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/") {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() != 5 || parts[3] != "revision" {
            return not_found;
        }
        let Some(repo) = s.repos.get(&parts[..3].join("/")) else {
            return not_found;
        };
        if parts[4] != "main" && parts[4] != repo.commit {
            return error("404 Not Found", "RevisionNotFound");
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(f, _)| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "sha": repo.commit, "siblings": siblings });
        return ("200 OK", vec![], body.to_string().into_bytes());
    }
    // /{datasets/}?{org}/{name}/resolve/{rev}/{file}
    let rest = path.trim_start_matches('/');
    let (kind, rest) = match rest.strip_prefix("datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", rest),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return not_found;
    }
    let Some(repo) = s.repos.get(&format!("{kind}/{}/{}", parts[0], parts[1])) else {
        return not_found;
    };
    if parts[3] != "main" && parts[3] != repo.commit {
        return error("404 Not Found", "RevisionNotFound");
    }
    if !authorized(repo, headers) {
        return error("401 Unauthorized", "GatedRepo");
    }
    let Some((_, content)) = repo.files.iter().find(|(f, _)| f == parts[4]) else {
        return error("404 Not Found", "EntryNotFound");
    };
    let bytes = content.bytes();
    let total = bytes.len();
    let etag = format!("{:016x}{total:x}", fnv(&bytes));
    let mut extra = vec![
        ("ETag".to_string(), format!("\"{etag}\"")),
        ("X-Repo-Commit".to_string(), repo.commit.clone()),
    ];
    let range = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'));
    match range {
        Some((from, to)) => {
            let from: usize = from.parse().unwrap_or(0).min(total);
            let to: usize = to
                .parse::<usize>()
                .map(|t| (t + 1).min(total))
                .unwrap_or(total);
            extra.push((
                "Content-Range".to_string(),
                format!("bytes {from}-{}/{total}", to.max(from + 1) - 1),
            ));
            ("206 Partial Content", extra, bytes[from..to].to_vec())
        }
        None => ("200 OK", extra, bytes),
    }
}

fn authorized(repo: &MockRepo, headers: &HashMap<String, String>) -> bool {
    match &repo.token {
        None => true,
        Some(t) => headers.get("authorization") == Some(&format!("Bearer {t}")),
    }
}

/// FNV-1a: a content hash for the etag.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}
