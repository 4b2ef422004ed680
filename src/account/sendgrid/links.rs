//! A page of SendGrid's answer to "Retrieve all branded links", as its
//! reference documents it (`LinkBranding200` in the OpenAPI file), turned
//! into the provider-neutral [`Branding`]: which record moves to the proxy,
//! and which region serves it.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::account::{Branding, DnsRecord};

/// A branded link as the API describes it.
#[derive(Debug, Deserialize)]
pub(super) struct RawLink {
    pub(super) id: u64,
    domain: String,
    #[serde(default)]
    subdomain: Option<String>,
    #[serde(default)]
    username: String,
    #[serde(default)]
    user_id: Option<u64>,
    #[serde(default, deserialize_with = "flag")]
    default: bool,
    #[serde(deserialize_with = "flag")]
    valid: bool,
    #[serde(default, deserialize_with = "flag")]
    legacy: bool,
    dns: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RawRecord {
    #[serde(default, deserialize_with = "flag")]
    valid: bool,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    host: String,
    data: String,
}

/// A page: the array, each link with its `dns.domain_cname`.
pub(super) fn parse(body: &[u8]) -> Result<Vec<RawLink>, String> {
    let links: Vec<RawLink> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    for link in &links {
        let ok = link
            .dns
            .get("domain_cname")
            .is_some_and(|r| serde_json::from_value::<RawRecord>(r.clone()).is_ok());
        if !ok {
            return Err(format!(
                "branded link {} has no dns.domain_cname with host and data",
                link.id
            ));
        }
    }
    Ok(links)
}

/// `true`, `false`, or the strings `"true"`, `"false"`.
fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Text(t) if t == "true" => Ok(true),
        Flag::Text(t) if t == "false" => Ok(false),
        Flag::Text(t) => Err(serde::de::Error::custom(format!("{t:?} is neither true nor false"))),
    }
}

/// The neutral shape of `link`, listed for `user` through `region`'s base.
pub(super) fn branding(link: RawLink, user: Option<&str>, region: &'static str) -> Branding {
    let normalise = |s: &str| s.trim().trim_end_matches('.').to_ascii_lowercase();
    let mut records: Vec<DnsRecord> = Vec::new();
    // domain_cname first, owner_cname next, then the rest by name.
    let mut names: Vec<&String> = link.dns.keys().collect();
    names.sort_by_key(|n| (n.as_str() != "domain_cname", n.as_str() != "owner_cname", n.as_str()));
    for name in names {
        let Some(record) = link
            .dns
            .get(name)
            .and_then(|v| serde_json::from_value::<RawRecord>(v.clone()).ok())
        else {
            continue;
        };
        records.push(DnsRecord {
            record: name.clone(),
            kind: record.kind.unwrap_or_else(|| "cname".to_owned()),
            host: normalise(&record.host),
            data: normalise(&record.data),
            valid: record.valid,
            moves_to_proxy: name == "domain_cname",
        });
    }
    let host = records
        .iter()
        .find(|r| r.moves_to_proxy)
        .map(|r| r.host.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| match link.subdomain.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => normalise(&format!("{sub}.{}", link.domain)),
            None => normalise(&link.domain),
        });
    let eu_target = records
        .iter()
        .any(|r| r.moves_to_proxy && (r.data == "eu.sendgrid.net" || r.data.ends_with(".eu.sendgrid.net")));
    Branding {
        id: link.id,
        host,
        user: link.username,
        user_id: link.user_id,
        listed_for: user.map(str::to_owned),
        region: if eu_target { "eu" } else { region },
        default: link.default,
        valid: link.valid,
        legacy: link.legacy,
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's example answer, its second link's flags written as
    /// strings (as the schema types them) and its CNAME at eu.sendgrid.net.
    const EXAMPLE: &str = r#"[
      {"id": 1, "domain": "example.com", "subdomain": "mail", "username": "john@example.com", "user_id": 7,
       "default": true, "valid": true, "legacy": false,
       "dns": {"domain_cname": {"valid": true, "type": "cname", "host": "mail.example.com", "data": "sendgrid.net"},
               "owner_cname": {"valid": true, "type": "cname", "host": "7.example.com", "data": "sendgrid.net"}}},
      {"id": 2, "domain": "example2.com", "subdomain": "news", "username": "john@example.com", "user_id": 8,
       "default": "false", "valid": "false", "legacy": false,
       "dns": {"owner_cname": {"valid": false, "type": "cname", "host": "8.example2.com", "data": "sendgrid.net"},
               "domain_cname": {"valid": true, "type": "cname", "host": "News.Example2.com.", "data": "eu.sendgrid.net"}}}
    ]"#;

    #[test]
    fn the_references_example_reads_as_two_brandings() {
        let links = parse(EXAMPLE.as_bytes()).expect("the example parses");
        let got: Vec<Branding> = links.into_iter().map(|l| branding(l, None, "global")).collect();
        assert_eq!(got[0].host, "mail.example.com");
        assert!(got[0].default && got[0].valid && !got[0].legacy);
        assert_eq!(got[0].region, "global");
        assert_eq!(got[0].records[0].record, "domain_cname");
        assert!(got[0].records[0].moves_to_proxy && !got[0].records[1].moves_to_proxy);
        assert_eq!(got[0].records[1].host, "7.example.com");
        // Flags written as strings, records in any order, a name in capitals with a final dot.
        assert_eq!(got[1].host, "news.example2.com");
        assert!(!got[1].default && !got[1].valid);
        assert_eq!(got[1].records[0].record, "domain_cname");
        // Its domain_cname points at eu.sendgrid.net: an EU branding whatever the base.
        assert_eq!(got[1].region, "eu");
    }

    #[test]
    fn a_link_listed_through_the_eu_api_is_an_eu_one() {
        let mut links = parse(EXAMPLE.as_bytes()).expect("the example parses");
        let first = links.remove(0);
        let got = branding(first, Some("eusub"), "eu");
        assert_eq!((got.region, got.listed_for.as_deref()), ("eu", Some("eusub")));
    }

    #[test]
    fn a_link_without_its_domain_cname_is_not_the_documented_shape() {
        let err = parse(br#"[{"id": 3, "domain": "x.com", "valid": true, "dns": {}}]"#).expect_err("refused");
        assert!(err.contains("branded link 3 has no dns.domain_cname"), "{err}");
        assert!(parse(br#"{"errors": []}"#).is_err());
        assert!(parse(br#"[{"id": 4, "domain": "x.com", "valid": "maybe", "dns": {}}]"#).is_err());
    }
}
