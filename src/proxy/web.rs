//! Static files for `--web DIR` (noVNC's page): path safety, content types, responses.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::{self, Request};
use super::token::percent_decode;

/// Why a path cannot be served.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `..`, NUL, backslash or a hidden (dot) segment, or a symlink leading out of the root: 403.
    Forbidden,
    /// Nothing there (or not a regular file): 404.
    NotFound,
    /// Broken percent-escapes or not UTF-8: 400.
    BadPath,
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Forbidden => 403,
            Refusal::NotFound => 404,
            Refusal::BadPath => 400,
        }
    }
}

/// Turn the path of a request into a path relative to the web root, refusing anything that
/// could leave it. Purely lexical; [`resolve`] also checks symlinks.
pub fn relative_path(url_path: &str) -> Result<PathBuf, Refusal> {
    let decoded = percent_decode(url_path).ok_or(Refusal::BadPath)?;
    let decoded = String::from_utf8(decoded).map_err(|_| Refusal::BadPath)?;
    if decoded.contains(['\0', '\\']) {
        return Err(Refusal::Forbidden);
    }
    let mut rel = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            s if s.starts_with('.') => return Err(Refusal::Forbidden),
            s => rel.push(s),
        }
    }
    Ok(rel)
}

/// Find the file to serve for `url_path` under the canonical `root`. A directory serves its
/// `index.html`. The result is canonical, inside `root` and a regular file: a FIFO would
/// block the reader forever, a device (a symlink to /dev/zero, say) would stream without
/// end, and a directory has nothing to send.
pub async fn resolve(root: &Path, url_path: &str) -> Result<PathBuf, Refusal> {
    let rel = relative_path(url_path)?;
    let mut path = tokio::fs::canonicalize(root.join(&rel))
        .await
        .map_err(|_| Refusal::NotFound)?;
    if !path.starts_with(root) {
        return Err(Refusal::Forbidden);
    }
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|_| Refusal::NotFound)?;
    if meta.is_dir() {
        path = tokio::fs::canonicalize(path.join("index.html"))
            .await
            .map_err(|_| Refusal::NotFound)?;
        if !path.starts_with(root) {
            return Err(Refusal::Forbidden);
        }
    }
    let meta = tokio::fs::metadata(&path)
        .await
        .map_err(|_| Refusal::NotFound)?;
    if !meta.is_file() {
        return Err(Refusal::NotFound);
    }
    Ok(path)
}

/// Content-Type for a file name, by extension.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        // Module scripts (noVNC 1.3 is ES modules) require a JavaScript type.
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("ico") => "image/x-icon",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("txt") => "text/plain; charset=utf-8",
        Some("woff") => "font/woff",
        Some("woff2") => "font/woff2",
        Some("ttf") => "font/ttf",
        Some("oga" | "ogg") => "audio/ogg",
        Some("mp3") => "audio/mpeg",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// Answer a non-websocket request. Returns the number of body bytes sent.
pub async fn serve<S: AsyncWrite + Unpin>(
    stream: &mut S,
    root: Option<&Path>,
    req: &Request,
    keep_alive: bool,
) -> io::Result<u64> {
    let head_only = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            http::write_plain(
                stream,
                405,
                "only GET and HEAD are served",
                "Allow: GET, HEAD\r\n",
                keep_alive,
            )
            .await?;
            return Ok(0);
        }
    };
    let Some(root) = root else {
        http::write_plain(
            stream,
            404,
            "this proxy serves no files (no --web)",
            "",
            keep_alive,
        )
        .await?;
        return Ok(0);
    };
    let path = match resolve(root, req.path()).await {
        Ok(p) => p,
        Err(r) => {
            let msg = match r {
                Refusal::Forbidden => "path refused",
                Refusal::NotFound => "no such file",
                Refusal::BadPath => "undecodable path",
            };
            http::write_plain(stream, r.status(), msg, "", keep_alive).await?;
            return Ok(0);
        }
    };
    let Some((mut file, len)) = open_regular(&path).await else {
        http::write_plain(stream, 404, "no such file", "", keep_alive).await?;
        return Ok(0);
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: {}\r\n\r\n",
        content_type(&path),
        if keep_alive { "keep-alive" } else { "close" },
    );
    stream.write_all(head.as_bytes()).await?;
    if head_only {
        stream.flush().await?;
        return Ok(0);
    }
    // Never send more than the announced Content-Length, even if the file grew meanwhile.
    let sent = tokio::io::copy(&mut (&mut file).take(len), stream).await?;
    stream.flush().await?;
    Ok(sent)
}

/// Opens a file [`resolve`] chose, refusing anything that changed under it since: a
/// symlink (O_NOFOLLOW) or something that is no longer a regular file (checked on the open
/// descriptor; O_NONBLOCK so that opening a FIFO swapped in cannot block).
async fn open_regular(path: &Path) -> Option<(tokio::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    meta.is_file()
        .then(|| (tokio::fs::File::from_std(file), meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_safety() {
        assert_eq!(relative_path("/vnc.html"), Ok(PathBuf::from("vnc.html")));
        assert_eq!(relative_path("/app//ui.js"), Ok(PathBuf::from("app/ui.js")));
        assert_eq!(relative_path("/./a/./b"), Ok(PathBuf::from("a/b")));
        assert_eq!(relative_path("/"), Ok(PathBuf::new()));
        for bad in [
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2fetc",
            "/a/..",
            "/..%5c..%5cwindows",
            "/a%00b",
            "/.git/config",
        ] {
            assert_eq!(relative_path(bad), Err(Refusal::Forbidden), "{bad}");
        }
        assert_eq!(relative_path("/%zz"), Err(Refusal::BadPath));
        assert_eq!(relative_path("/%ff"), Err(Refusal::BadPath));
    }

    #[test]
    fn types() {
        for (f, t) in [
            ("vnc.html", "text/html; charset=utf-8"),
            ("a/ui.JS", "text/javascript; charset=utf-8"),
            ("base.css", "text/css; charset=utf-8"),
            ("x.png", "image/png"),
            ("x.svg", "image/svg+xml"),
            ("package.json", "application/json"),
            ("favicon.ico", "image/x-icon"),
            ("blob", "application/octet-stream"),
        ] {
            assert_eq!(content_type(Path::new(f)), t, "{f}");
        }
    }

    #[tokio::test]
    async fn resolve_stays_inside_root() {
        let outer = tempfile::tempdir().expect("tempdir");
        let root = outer.path().join("web");
        std::fs::create_dir_all(root.join("app")).expect("mkdir");
        std::fs::write(root.join("vnc.html"), "<html>").expect("write");
        std::fs::write(root.join("app/index.html"), "i").expect("write");
        std::fs::write(outer.path().join("secret"), "s").expect("write");
        std::os::unix::fs::symlink(outer.path().join("secret"), root.join("leak"))
            .expect("symlink");
        let root = std::fs::canonicalize(&root).expect("canon");

        assert_eq!(resolve(&root, "/vnc.html").await, Ok(root.join("vnc.html")));
        assert_eq!(
            resolve(&root, "/app/").await,
            Ok(root.join("app/index.html"))
        );
        assert_eq!(resolve(&root, "/").await, Err(Refusal::NotFound));
        assert_eq!(resolve(&root, "/nope").await, Err(Refusal::NotFound));
        assert_eq!(resolve(&root, "/leak").await, Err(Refusal::Forbidden));
        assert_eq!(resolve(&root, "/../secret").await, Err(Refusal::Forbidden));
        // Only regular files: no FIFOs, devices or directories without an index.
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        std::os::unix::fs::symlink("/dev/zero", root.join("zero")).expect("symlink");
        std::fs::create_dir(root.join("empty")).expect("mkdir");
        assert_eq!(resolve(&root, "/fifo").await, Err(Refusal::NotFound));
        assert_eq!(resolve(&root, "/zero").await, Err(Refusal::Forbidden));
        assert_eq!(resolve(&root, "/empty/").await, Err(Refusal::NotFound));
    }
}
