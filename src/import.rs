//! `linkgate import sendgrid`: every branding on the account, as `[[host]]`
//! entries ready to paste into the config (or to redirect into a file and
//! append): one per branded link, with a comment naming its id and user,
//! and `region = "eu"` for an EU regional one. The entries give only the
//! name (and region): the certificate comes from `certs_dir/<name>/`, or
//! the operator adds `cert` and `key` or `acme = true`.

use std::process::ExitCode;

use crate::account::{self, Branding, Brandings};
use crate::host::HostName;
use crate::text::printable;

/// Lists `provider`'s account as `wanted` says and prints the entries.
/// Exit status: 0 printed, 1 the account could not be read, 2 unusable
/// arguments (no key, an unknown provider, a bad `--provider-api`).
pub fn command(provider: &str, wanted: account::Wanted, timeout: std::time::Duration) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display, code: u8| {
        eprintln!("linkgate: error: {e}");
        ExitCode::from(code)
    };
    let Some(preset) = account::providers().find(|p| p.name == provider) else {
        let known: Vec<&str> = account::providers().map(|p| p.name).collect();
        return fail(
            &format!(
                "import {provider}: linkgate reads the account API of {} only",
                known.join(", ")
            ),
            2,
        );
    };
    let ask = match wanted.ask(preset, timeout) {
        Ok(Some(ask)) => ask,
        Ok(None) => {
            return fail(
                &format!(
                    "import {provider}: no API key: set {} or give --api-key-file FILE (never the key itself on the \
                     command line)",
                    account::key_env(preset).unwrap_or("the provider's variable")
                ),
                2,
            )
        }
        Err(e) => return fail(&e, 2),
    };
    match account::list_blocking(preset, &ask) {
        Ok(listed) => {
            print!("{}", render(&listed));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, if e.is_usage() { 2 } else { 1 }),
    }
}

/// The TOML text: a header saying what it is and how to use it, then one
/// commented `[[host]]` per branding.
pub fn render(listed: &Brandings) -> String {
    let display = listed.provider.display;
    let whose = listed
        .listed
        .iter()
        .map(account::Listed::whose)
        .collect::<Vec<_>>()
        .join(", ");
    let apis: Vec<&str> = listed
        .listed
        .iter()
        .map(|l| l.api.as_str())
        .fold(Vec::new(), |mut seen, api| {
            if !seen.contains(&api) {
                seen.push(api);
            }
            seen
        });
    let mut out = format!(
        "# linkgate import {}: {} link brandings on the {display} account ({whose}), from {}.\n\
         # Paste these after [listen] (or redirect them into a file and append it). Each entry takes its\n\
         # certificate from certs_dir/<name>/ (tls.crt and tls.key, or fullchain.pem and privkey.pem);\n\
         # without certs_dir add cert and key, or acme = true. They forward to [upstream]'s provider,\n\
         # {display} unless it names another: then add provider = \"{}\" to each.\n",
        listed.provider.name,
        listed.brandings.len(),
        apis.join(" and "),
        listed.provider.name,
    );
    for b in &listed.brandings {
        out.push('\n');
        out.push_str(&entry(display, b));
    }
    out
}

/// One branding's comment and entry; a name that is not a host name is only a comment.
fn entry(display: &str, b: &Branding) -> String {
    let mut about = vec![format!("{display} branding {}, user {}", b.id, printable(&b.user))];
    if let Some(user) = &b.listed_for {
        about.push(format!("listed on behalf of {}", printable(user)));
    }
    if b.region == "eu" {
        about.push("EU regional".to_owned());
    }
    if b.default {
        about.push("the default branding".to_owned());
    }
    if !b.valid {
        about.push(format!(
            "{display} marks it invalid: `linkgate doctor` says how to fix it"
        ));
    }
    let comment = format!("# {}\n", about.join("; "));
    if HostName::parse(&b.host).is_err() {
        return format!(
            "{comment}# skipped: {} is not a host name linkgate can serve\n",
            printable(&b.host)
        );
    }
    format!("{comment}{}", host_entry(b))
}

/// The `[[host]]` entry for `branding`: its name, and its region when it
/// is not the default one (doctor prints it too, for a branding it lacks).
pub fn host_entry(branding: &Branding) -> String {
    let mut entry = format!("[[host]]\nname = {}\n", toml_string(&branding.host));
    if branding.region != "global" {
        entry.push_str(&format!("region = {}\n", toml_string(branding.region)));
    }
    entry
}

/// `s` as a one-line TOML basic string: quotes, backslashes and every
/// character a terminal acts on (controls, line separators, bidirectional
/// controls) escaped, so the entry is one line per key however odd the name.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if crate::text::acts_on_display(c) => {
                out.push_str(&format!("\\u{:04X}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branding(host: &str, region: &'static str) -> Branding {
        Branding {
            id: 1,
            host: host.to_owned(),
            user: "u".to_owned(),
            user_id: None,
            listed_for: None,
            region,
            default: false,
            valid: true,
            legacy: false,
            records: Vec::new(),
        }
    }

    #[test]
    fn an_entry_is_its_name_and_its_region_quoted_as_toml() {
        assert_eq!(
            host_entry(&branding("url1.example.com", "global")),
            "[[host]]\nname = \"url1.example.com\"\n"
        );
        assert_eq!(
            host_entry(&branding("url2.example.eu", "eu")),
            "[[host]]\nname = \"url2.example.eu\"\nregion = \"eu\"\n"
        );
        // Whatever the name holds stays inside its one-line string.
        let name = "a\"\\\n[[host]]\u{1b}[2J\u{202e}";
        let odd = host_entry(&branding(name, "global"));
        assert_eq!(odd, "[[host]]\nname = \"a\\\"\\\\\\n[[host]]\\u001B[2J\\u202E\"\n");
        let parsed: toml::Table = toml::from_str(&odd).expect("TOML");
        assert_eq!(parsed["host"][0]["name"].as_str(), Some(name));
    }
}
