//! What a recipient sees when the provider cannot be reached: linkgate's
//! `502` and `504` answers. A browser navigating (its Accept ranks
//! `text/html` above `text/plain`, see [`prefers_html`]) gets an HTML page,
//! the built-in one (`page.html`) or the brand's own (`error_page`, read
//! with the configuration by [`ErrorPage::load`]); every other client gets
//! the short text body as before, which is also how `doctor` recognises
//! linkgate's own failures. Both carry `Retry-After`, `Cache-Control:
//! no-store` and `Vary: Accept`.

mod accept;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

pub use accept::prefers_html;

use crate::response::Local;

/// The built-in page: no script, no outside resource, nothing dynamic.
pub const BUILTIN: &str = include_str!("page.html");

/// The most an `error_page` file may hold: a page, not a site.
pub const MAX_BYTES: u64 = 64 * 1024;

/// `Retry-After` on linkgate's upstream-failure answers, in seconds.
pub const RETRY_AFTER_SECONDS: u32 = 60;

/// An `error_page` file, read once when the configuration is loaded.
#[derive(Debug)]
pub struct ErrorPage {
    pub path: PathBuf,
    body: Bytes,
}

impl ErrorPage {
    /// Reads `path`: at most [`MAX_BYTES`], UTF-8 (it is served as
    /// `text/html; charset=utf-8`), not empty. Blocking.
    pub fn load(path: &Path) -> Result<Self, String> {
        let cannot_read = |e: std::io::Error| format!("{}: cannot read: {e}", path.display());
        let file = std::fs::File::open(path).map_err(cannot_read)?;
        let mut body = Vec::new();
        // One byte past the cap tells an oversized file, however it grows while read.
        file.take(MAX_BYTES + 1).read_to_end(&mut body).map_err(cannot_read)?;
        if body.len() as u64 > MAX_BYTES {
            return Err(format!(
                "{}: larger than {} KiB: an error page must be one small file (inline its CSS and images)",
                path.display(),
                MAX_BYTES / 1024
            ));
        }
        if let Err(e) = std::str::from_utf8(&body) {
            return Err(format!(
                "{}: not UTF-8 text (byte {} is not): it is served as text/html; charset=utf-8",
                path.display(),
                e.valid_up_to()
            ));
        }
        if body.trim_ascii().is_empty() {
            return Err(format!("{}: empty: a browser would show a blank page", path.display()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            body: Bytes::from(body),
        })
    }
}

/// linkgate's answer to a request the upstream failed: `status` with the
/// HTML page when `html` says so (the host's `page`, else the built-in
/// one), with the plain `text` otherwise.
pub(crate) fn upstream_failure(
    status: StatusCode,
    text: &'static str,
    html: bool,
    page: Option<&ErrorPage>,
) -> Response<Bytes> {
    let answer = Local::new(status)
        .header(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS))
        .header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
        .header(header::VARY, HeaderValue::from_static("accept"));
    if !html {
        return answer.text(Bytes::from_static(text.as_bytes()));
    }
    let body = page.map_or(Bytes::from_static(BUILTIN.as_bytes()), |p| p.body.clone());
    answer
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_page_is_small_self_contained_and_says_what_to_do() {
        assert!(BUILTIN.len() < 2048, "{} bytes", BUILTIN.len());
        assert!(BUILTIN.contains("<meta name=\"viewport\""));
        assert!(BUILTIN.contains("<meta charset=\"utf-8\">"));
        assert!(BUILTIN.contains("This link can't be opened right now"));
        assert!(BUILTIN.contains("Please try again in a minute."));
        for outside in ["<script", "src=", "href=", "url(", "@import", "linkgate"] {
            assert!(!BUILTIN.contains(outside), "{outside}");
        }
    }

    #[test]
    fn an_answer_is_the_page_or_the_text_with_the_same_headers() {
        let page = upstream_failure(StatusCode::BAD_GATEWAY, "upstream unavailable\n", true, None);
        let text = upstream_failure(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n", false, None);
        assert_eq!((page.status().as_u16(), text.status().as_u16()), (502, 504));
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(page.body(), BUILTIN.as_bytes());
        assert_eq!(text.headers()[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(&text.body()[..], b"upstream timed out\n");
        for resp in [&page, &text] {
            assert_eq!(resp.headers()[header::RETRY_AFTER], "60");
            assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
            assert_eq!(resp.headers()[header::VARY], "accept");
        }
    }

    #[test]
    fn a_page_file_is_read_whole_or_refused_with_its_name() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let path = dir.path().join("brand.html");
        std::fs::write(&path, "<p>Brand: bientôt</p>\n").expect("write");
        let page = ErrorPage::load(&path).expect("load");
        let resp = upstream_failure(StatusCode::BAD_GATEWAY, "x\n", true, Some(&page));
        assert_eq!(resp.body(), "<p>Brand: bientôt</p>\n".as_bytes());
        // The text answer does not change with a page configured.
        let resp = upstream_failure(StatusCode::BAD_GATEWAY, "x\n", false, Some(&page));
        assert_eq!(&resp.body()[..], b"x\n");

        let refused = |contents: &[u8]| {
            std::fs::write(&path, contents).expect("write");
            ErrorPage::load(&path).expect_err("refused")
        };
        let name = path.display().to_string();
        let e = refused(&vec![b'a'; 64 * 1024 + 1]);
        assert!(e.starts_with(&name) && e.contains("larger than 64 KiB"), "{e}");
        std::fs::write(&path, vec![b'a'; 64 * 1024]).expect("write");
        assert!(ErrorPage::load(&path).is_ok(), "exactly 64 KiB is allowed");
        let e = refused(b"<p>caf\xe9</p>");
        assert!(e.starts_with(&name) && e.contains("not UTF-8 text (byte 6"), "{e}");
        let e = refused(b" \n\t\n");
        assert!(e.starts_with(&name) && e.contains("empty"), "{e}");
        let e = ErrorPage::load(&dir.path().join("missing.html")).expect_err("missing");
        assert!(e.contains("missing.html: cannot read"), "{e}");
    }
}
