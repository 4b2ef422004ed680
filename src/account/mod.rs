//! Every link branding on the provider's account, read from its API: what
//! `linkgate doctor` audits against the config and what `linkgate import`
//! turns into `[[host]]` entries.
//!
//! A provider's switch to https tracking covers every branding of the
//! account (SendGrid: "a setting that affects all link brandings in your
//! account"), including the one someone created last month or a subuser
//! owns, so the config alone cannot say whether the switch will pass.
//!
//! The shape here is the provider's neutral one: [`Brandings`] (what was
//! listed, and each [`Branding`] with its DNS records and which of them
//! moves to the proxy), [`Ask`] (the key, whose brandings, where, how long),
//! [`AccountError`] (one line each, never the key). A provider is one file
//! that turns its API into that shape: `sendgrid/` (the only one so far;
//! Mailgun's domains API, which lists each domain's tracking settings, would
//! be another), over the bounded HTTPS client in `https.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::provider::Preset;

mod https;
mod sendgrid;

pub use sendgrid::API_KEY_ENV as SENDGRID_API_KEY_ENV;

/// An API key, from the provider's environment variable or a file. It is
/// never printed: no `Display`, a `Debug` that hides it, and every error text
/// built with it in reach goes through [`ApiKey::redact`].
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// The key from `file` (its text, trimmed) when given, else from the
    /// environment variable `env` when set and not empty; `None` when neither.
    pub fn read(env: &str, file: Option<&Path>) -> Result<Option<Self>, AccountError> {
        let text = match file {
            Some(path) => {
                // The key itself given where its file's name belongs: refused
                // without showing it, and never shown in any other error.
                let given = path.to_string_lossy();
                let key_like =
                    looks_like_key(&given) || path.file_name().is_some_and(|n| looks_like_key(&n.to_string_lossy()));
                if key_like && !path.exists() {
                    return Err(AccountError::Usage(format!(
                        "--api-key-file: the value given looks like an API key, not a file name (it is not shown \
                         here): put the key in a file and give that file's path, or set {env}"
                    )));
                }
                let shown = if key_like {
                    "<the file given>".into()
                } else {
                    path.display().to_string()
                };
                let text = std::fs::read_to_string(path)
                    .map_err(|e| AccountError::Usage(format!("--api-key-file {shown}: cannot read: {e}")))?;
                let key = text.trim().to_owned();
                if key.is_empty() {
                    return Err(AccountError::Usage(format!(
                        "--api-key-file {shown}: the file is empty"
                    )));
                }
                key
            }
            None => match std::env::var(env) {
                Ok(key) if !key.trim().is_empty() => key.trim().to_owned(),
                _ => return Ok(None),
            },
        };
        // It goes into a header: a line break or control character in it
        // (a file with two lines, say) is refused without showing it.
        if text.bytes().any(|b| b.is_ascii_control() || !b.is_ascii()) {
            return Err(AccountError::Usage(
                "the API key holds a line break, control or non-ASCII character: give the key alone".into(),
            ));
        }
        Ok(Some(Self(text)))
    }

    /// A key given as it is (tests).
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the key, and of its secret part (a
    /// SendGrid key is `SG.<id>.<secret>`), replaced whatever their case, for
    /// text that came from the provider (an error message could echo what it
    /// was sent, or part of it) or from the command line.
    pub fn redact(&self, text: &str) -> String {
        let mut needles: Vec<&str> = vec![&self.0];
        if let Some(secret) = self.0.splitn(3, '.').nth(2).filter(|s| s.len() >= MIN_SECRET) {
            needles.push(secret);
        }
        let mut out = text.to_owned();
        for needle in needles.into_iter().filter(|n| !n.is_empty()) {
            out = replace_ignoring_case(&out, needle, "<api key>");
        }
        out
    }
}

/// The shortest secret part redacted on its own: shorter, it could match
/// ordinary words of a message.
const MIN_SECRET: usize = 8;

/// `text` with every ASCII-case-insensitive occurrence of `needle` replaced.
fn replace_ignoring_case(text: &str, needle: &str, with: &str) -> String {
    // ASCII lower-casing keeps every byte offset, so offsets found in the
    // lowered text cut the original at the same (char) boundaries.
    let (lower, needle) = (text.to_ascii_lowercase(), needle.to_ascii_lowercase());
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(at) = lower[from..].find(&needle) {
        out.push_str(&text[from..from + at]);
        out.push_str(with);
        from += at + needle.len();
    }
    out.push_str(&text[from..]);
    out
}

/// Whether `value` looks like a SendGrid API key (`SG.<id>.<secret>`): it
/// starts with `SG.` (any case), or it is three dot-separated runs of the
/// key's alphabet (letters, digits, `-`, `_`) with a long last one. For a
/// value given where something else belongs (a file name, an argument), so
/// that it is refused or scrubbed instead of printed.
pub fn looks_like_key(value: &str) -> bool {
    if value.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("SG.")) {
        return true;
    }
    let parts: Vec<&str> = value.split('.').collect();
    let alphabet = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    parts.len() == 3 && parts.iter().all(|p| alphabet(p)) && parts[2].len() >= 20
}

/// What to list, where, and how long each request may take.
#[derive(Debug)]
pub struct Ask {
    pub key: ApiKey,
    /// Also list these users' brandings through the provider's default
    /// region (`on-behalf-of`: a subuser's username, or `account-id <id>`).
    pub on_behalf_of: Vec<String>,
    /// Also list these EU regional subusers' brandings, through the
    /// provider's EU API.
    pub eu_subusers: Vec<String>,
    /// Every request goes to this base instead of the provider's (tests, a
    /// gateway); the region of each listing still comes from whose it is.
    pub api: Option<String>,
    /// Trust these roots for the API instead of the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Brandings asked for per request.
    pub page_size: usize,
    /// Bounds the connection, and each request with its answer.
    pub timeout: Duration,
}

/// What the command line says about the account, before the key is read.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Read the key from this file instead of the provider's variable.
    pub api_key_file: Option<PathBuf>,
    pub on_behalf_of: Vec<String>,
    pub eu_subusers: Vec<String>,
    pub api: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub page_size: usize,
}

impl Wanted {
    /// The request, with the key from `--api-key-file` or `provider`'s
    /// variable; `None` when neither holds one. Every argument is checked
    /// here, before any request.
    pub fn ask(self, provider: &Preset, timeout: Duration) -> Result<Option<Ask>, AccountError> {
        let Some(env) = key_env(provider) else {
            return Err(AccountError::Usage(format!(
                "linkgate does not read {}'s account API",
                provider.display
            )));
        };
        let Some(key) = ApiKey::read(env, self.api_key_file.as_deref())? else {
            return Ok(None);
        };
        if !(1..=500).contains(&self.page_size) {
            return Err(AccountError::Usage(format!(
                "--api-page-size {}: between 1 and 500",
                self.page_size
            )));
        }
        let ask = Ask {
            key,
            on_behalf_of: self.on_behalf_of,
            eu_subusers: self.eu_subusers,
            api: self.api,
            ca_file: self.ca_file,
            page_size: self.page_size,
            timeout,
        };
        sendgrid::plan(provider, &ask)?;
        Ok(Some(ask))
    }
}

/// Every branding the API listed, and how it was asked.
#[derive(Debug, Serialize)]
pub struct Brandings {
    #[serde(skip)]
    pub provider: &'static Preset,
    pub listed: Vec<Listed>,
    pub brandings: Vec<Branding>,
}

/// One listing: one user's brandings through one API base.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// `on-behalf-of`, for a subuser's listing; `None` for the key's own account.
    pub on_behalf_of: Option<String>,
    pub region: &'static str,
    /// The API base asked.
    pub api: String,
    pub pages: usize,
    pub brandings: usize,
}

impl Listed {
    /// Whose listing it is, as a user reads it.
    pub fn whose(&self) -> String {
        match (&self.on_behalf_of, self.region) {
            (None, _) => "the API key's own account".to_owned(),
            (Some(user), "eu") => format!("EU subuser {}", crate::text::printable(user)),
            (Some(user), _) => format!("on behalf of {}", crate::text::printable(user)),
        }
    }
}

/// One branding on the account, as the provider's API describes it.
#[derive(Debug, Clone, Serialize)]
pub struct Branding {
    /// The provider's id for it.
    pub id: u64,
    /// The branded host name (lower case, no final dot).
    pub host: String,
    /// The user it belongs to (SendGrid's `username`).
    pub user: String,
    pub user_id: Option<u64>,
    /// `on-behalf-of` of the listing it came from.
    pub listed_for: Option<String>,
    /// `global` or `eu`: which of the provider's regions serves its links.
    pub region: &'static str,
    /// The provider uses it for mail whose From domain has no branding of its own.
    pub default: bool,
    /// The provider's own validation of its DNS records passed.
    pub valid: bool,
    /// Made with the provider's legacy tool.
    pub legacy: bool,
    pub records: Vec<DnsRecord>,
}

/// A DNS record the provider generated for a branding.
#[derive(Debug, Clone, Serialize)]
pub struct DnsRecord {
    /// The provider's name for it (SendGrid: `domain_cname`, `owner_cname`).
    pub record: String,
    /// `cname`, `txt`, ... as the provider says.
    #[serde(rename = "type")]
    pub kind: String,
    pub host: String,
    /// What it points to, as the provider generated it.
    pub data: String,
    /// The provider found it in DNS as generated, last time it validated.
    pub valid: bool,
    /// This is the record that points at the proxy; the others stay as the
    /// provider generated them.
    pub moves_to_proxy: bool,
}

/// Why the account could not be read: one line, never the key.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// The arguments cannot work (no such file, not an https URL, ...).
    #[error("{0}")]
    Usage(String),
    /// The provider refused the key (401, 403): which permission it needs.
    #[error("{0}")]
    Refused(String),
    /// Rate-limited for longer than linkgate waits.
    #[error("{0}")]
    RateLimited(String),
    /// No answer: connect, TLS, timeouts.
    #[error("{0}")]
    Unreachable(String),
    /// An answer that is not the documented one.
    #[error("{0}")]
    Answer(String),
}

impl AccountError {
    /// The arguments are at fault (exit status 2), not the account or the network.
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Usage(_))
    }
}

/// The presets whose account API linkgate reads.
pub fn providers() -> impl Iterator<Item = &'static Preset> {
    crate::provider::PRESETS.iter().filter(|p| !p.api.is_empty())
}

/// The environment variable that holds `provider`'s API key.
pub fn key_env(provider: &Preset) -> Option<&'static str> {
    match provider.name {
        "sendgrid" => Some(sendgrid::API_KEY_ENV),
        _ => None,
    }
}

/// Every branding on `provider`'s account that `ask` covers, every page.
pub async fn list(provider: &'static Preset, ask: &Ask) -> Result<Brandings, AccountError> {
    match provider.name {
        "sendgrid" => sendgrid::list(provider, ask).await,
        other => Err(AccountError::Usage(format!(
            "linkgate does not read {other}'s account API (it reads: {})",
            providers().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// [`list`] on a runtime of its own, for the commands.
pub fn list_blocking(provider: &'static Preset, ask: &Ask) -> Result<Brandings, AccountError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AccountError::Unreachable(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(list(provider, ask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_never_shown() {
        let key = ApiKey::new("SG.secret-value");
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(
            key.redact("bad key SG.secret-value, again SG.secret-value"),
            "bad key <api key>, again <api key>"
        );
        // Any case, and the secret part on its own.
        let key = ApiKey::new("SG.key-id.the-secret-part-0123");
        assert_eq!(
            key.redact("KEY SG.KEY-ID.THE-SECRET-PART-0123; secret The-Secret-Part-0123 é"),
            "KEY <api key>; secret <api key> é"
        );
    }

    #[test]
    fn what_looks_like_a_key() {
        for key in ["SG.abc.def", "sg.x", "abcdefgh.ijklmnop.qrstuvwxyz0123456789_-"] {
            assert!(looks_like_key(key), "{key}");
        }
        for not in ["key.txt", "/run/secrets/sendgrid", "a.b.c", "./keys/api.key"] {
            assert!(!looks_like_key(not), "{not}");
        }
    }

    #[test]
    fn a_key_file_is_read_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("linkgate-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("key");
        std::fs::write(&file, "SG.from-file\n").expect("write");
        let key = ApiKey::read("LINKGATE_TEST_UNSET_VARIABLE", Some(&file)).expect("read");
        assert_eq!(key.as_ref().map(ApiKey::expose), Some("SG.from-file"));
        std::fs::write(&file, "SG.line-one\nSG.line-two\n").expect("write");
        let two = ApiKey::read("LINKGATE_TEST_UNSET_VARIABLE", Some(&file)).expect_err("two lines");
        assert!(two.is_usage() && !two.to_string().contains("SG.line"), "{two}");
        std::fs::write(&file, "\n").expect("write");
        assert!(ApiKey::read("X", Some(&file)).is_err());
        assert!(ApiKey::read("X", Some(&dir.join("missing"))).is_err());
        assert!(ApiKey::read("LINKGATE_TEST_UNSET_VARIABLE", None)
            .expect("none")
            .is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
