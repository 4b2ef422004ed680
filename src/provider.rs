//! The email providers linkgate knows, as data: where each one's click and
//! open tracking is served, per region, what it accepts, and how `doctor`
//! recognises it. Adding a provider is one entry in [`PRESETS`].

/// One provider's tracking endpoint and quirks.
#[derive(Debug)]
pub struct Preset {
    /// The name used in `provider = "..."`.
    pub name: &'static str,
    /// The provider's name as people write it.
    pub display: &'static str,
    /// Tracking endpoint per region, the default region first. A `{region}`
    /// in the only entry (region name `*`) takes any region name, which is
    /// then required.
    pub regions: &'static [(&'static str, &'static str)],
    /// The provider refuses HTTPS from proxies: only an http url is valid.
    pub http_only: bool,
    /// Largest request head (request line and headers) the provider accepts;
    /// linkgate answers 431 above it instead of forwarding.
    pub max_header_bytes: Option<usize>,
    /// What the provider answers when the Host header is not a branded name
    /// it knows (lower case text in the body; empty when unknown), for `doctor`.
    pub wrong_host_marker: &'static str,
    /// How `doctor` names that answer.
    pub wrong_host_page: &'static str,
    /// Where this is documented.
    pub source: &'static str,
}

/// The default when `[upstream]` names neither `provider` nor `url`.
pub const DEFAULT: &str = "sendgrid";

pub static PRESETS: &[Preset] = &[
    Preset {
        name: "sendgrid",
        display: "SendGrid",
        regions: &[("global", "https://sendgrid.net")],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "wrong link",
        wrong_host_page: "SendGrid's \"Wrong Link\" page",
        source: "https://www.twilio.com/docs/sendgrid/ui/account-and-settings/custom-ssl-configurations",
    },
    Preset {
        name: "amazon-ses",
        display: "Amazon SES",
        regions: &[("*", "https://r.{region}.awstrack.me")],
        http_only: false,
        max_header_bytes: Some(8 * 1024),
        wrong_host_marker: "",
        wrong_host_page: "the provider's answer for an unknown tracking host",
        source: "https://docs.aws.amazon.com/ses/latest/dg/configure-custom-open-click-domains.html",
    },
    Preset {
        name: "sparkpost",
        display: "SparkPost",
        regions: &[("us", "https://spgo.io"), ("eu", "https://eu.spgo.io")],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "",
        wrong_host_page: "the provider's answer for an unknown tracking host",
        source: "https://support.sparkpost.com/docs/tech-resources/enabling-https-engagement-tracking-on-sparkpost",
    },
    Preset {
        name: "mailgun",
        display: "Mailgun",
        regions: &[("us", "http://mailgun.org"), ("eu", "http://eu.mailgun.org")],
        http_only: true,
        max_header_bytes: None,
        wrong_host_marker: "",
        wrong_host_page: "the provider's answer for an unknown tracking host",
        source:
            "https://documentation.mailgun.com/docs/mailgun/user-manual/tracking-messages/#secure-tracking-with-https",
    },
    Preset {
        name: "iterable",
        display: "Iterable",
        regions: &[
            ("us", "https://links.iterable.com"),
            ("eu", "https://links.eu.iterable.com"),
        ],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "",
        wrong_host_page: "the provider's answer for an unknown tracking host",
        source: "https://support.iterable.com/hc/en-us/articles/115002651226-Configuring-Link-Tracking-Domains",
    },
    Preset {
        name: "customer-io",
        display: "Customer.io",
        regions: &[
            ("us", "https://track.customer.io"),
            ("eu", "https://track-eu.customer.io"),
        ],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "",
        wrong_host_page: "the provider's answer for an unknown tracking host",
        source: "https://docs.customer.io/journeys/link-tracking-ssl/",
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Result<&'static Preset, String> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!("unknown provider {name:?} (known: {})", known.join(", "))
    })
}

impl Preset {
    /// The tracking endpoint for `region` (the default region when `None`).
    pub fn url(&self, region: Option<&str>) -> Result<String, String> {
        if let [("*", template)] = self.regions {
            let region = region
                .ok_or_else(|| format!("provider {:?} needs region = \"...\" (e.g. \"us-east-1\")", self.name))?;
            let valid = !region.is_empty()
                && region.len() <= 32
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(format!("region {region:?} is not a region name (like \"us-east-1\")"));
            }
            return Ok(template.replace("{region}", region));
        }
        match region {
            None => Ok(self.regions[0].1.to_owned()),
            Some(r) => self
                .regions
                .iter()
                .find(|(name, _)| *name == r)
                .map(|(_, url)| (*url).to_owned())
                .ok_or_else(|| {
                    let known: Vec<&str> = self.regions.iter().map(|(n, _)| *n).collect();
                    format!(
                        "provider {:?} has no region {r:?} (known: {})",
                        self.name,
                        known.join(", ")
                    )
                }),
        }
    }

    /// The host names a branding's CNAME points at before it is switched to
    /// the proxy: every region's endpoint host (for a `{region}` template,
    /// the part after the placeholder).
    pub fn cname_suffixes(&self) -> Vec<String> {
        self.regions
            .iter()
            .map(|(_, url)| {
                let host = url.split("://").nth(1).unwrap_or(url);
                host.rsplit_once("{region}.").map_or(host, |(_, rest)| rest).to_owned()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_resolves() {
        let cases = [
            ("sendgrid", None, "https://sendgrid.net"),
            ("amazon-ses", Some("us-east-1"), "https://r.us-east-1.awstrack.me"),
            ("sparkpost", None, "https://spgo.io"),
            ("sparkpost", Some("eu"), "https://eu.spgo.io"),
            ("mailgun", None, "http://mailgun.org"),
            ("mailgun", Some("eu"), "http://eu.mailgun.org"),
            ("iterable", None, "https://links.iterable.com"),
            ("iterable", Some("eu"), "https://links.eu.iterable.com"),
            ("customer-io", None, "https://track.customer.io"),
            ("customer-io", Some("eu"), "https://track-eu.customer.io"),
        ];
        for (name, region, url) in cases {
            assert_eq!(
                find(name).and_then(|p| p.url(region)).as_deref(),
                Ok(url),
                "{name} {region:?}"
            );
        }
        assert!(find("amazon-ses").and_then(|p| p.url(None)).is_err());
        assert!(find("amazon-ses").and_then(|p| p.url(Some("US_EAST"))).is_err());
        assert!(find("sparkpost").and_then(|p| p.url(Some("ap"))).is_err());
        assert!(find("postmark").is_err());
        assert_eq!(
            find("amazon-ses").map(Preset::cname_suffixes),
            Ok(vec!["awstrack.me".to_owned()])
        );
        assert_eq!(
            find("mailgun").map(Preset::cname_suffixes),
            Ok(vec!["mailgun.org".to_owned(), "eu.mailgun.org".to_owned()])
        );
    }
}
