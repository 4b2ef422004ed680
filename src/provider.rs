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
    /// it knows (lower case text in the body), for `doctor`: only a body with
    /// it reads "Host not forwarded". Empty when no source says what the
    /// provider answers; then `doctor` never blames the Host header for it.
    pub wrong_host_marker: &'static str,
    /// How `doctor` names that answer.
    pub wrong_host_page: &'static str,
    /// Where this is documented.
    pub source: &'static str,
    /// The path and query `doctor` fetches when `--url` is not given: the
    /// shape of an open pixel or tracked link the provider serves on a
    /// branded host, with a token it never issued.
    pub probe_path: &'static str,
    /// Where that shape is shown.
    pub probe_source: &'static str,
    /// What switches the provider's tracking links to https once every
    /// branding passes, for `doctor`'s summary; empty when its documentation
    /// does not say for a proxy (then [`Preset::https_source`] is the place to read).
    pub https_switch: &'static str,
    /// Where the provider documents https tracking behind a proxy or CDN.
    pub https_source: &'static str,
    /// The provider's account API per region (same names as
    /// [`Preset::regions`]), for `doctor` and `import` to list every branding
    /// of the account ([`crate::account`]); empty when linkgate does not read
    /// the provider's API.
    pub api: &'static [(&'static str, &'static str)],
}

/// The default when `[upstream]` names neither `provider` nor `url`.
pub const DEFAULT: &str = "sendgrid";

pub static PRESETS: &[Preset] = &[
    Preset {
        name: "sendgrid",
        display: "SendGrid",
        // "served from your domain rather than sendgrid.net for Global Email
        // send or eu.sendgrid.net for Regional Email send" (the API
        // reference's link branding pages, e.g. the one cited for `api`).
        regions: &[("global", "https://sendgrid.net"), ("eu", "https://eu.sendgrid.net")],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "wrong link",
        wrong_host_page: "SendGrid's \"Wrong Link\" page",
        source: "https://www.twilio.com/docs/sendgrid/ui/account-and-settings/custom-ssl-configurations",
        probe_path: "/wf/open?upn=linkgate-doctor",
        // Open pixels `/wf/open?upn=<token>`, as a tracker blocker lists them.
        probe_source: "https://github.com/apparition47/MailTrackerBlocker/blob/master/Source/MTBBlockedMessage.m",
        https_switch: "ask SendGrid Support to enable SSL click and open tracking",
        https_source:
            "https://support.sendgrid.com/hc/en-us/articles/4447646844187-Enabling-SSL-for-Click-and-Open-Tracking-for-Your-Account",
        // "Base url: https://api.sendgrid.com (for global users and subusers)",
        // "https://api.eu.sendgrid.com (for EU regional subusers)":
        // https://www.twilio.com/docs/sendgrid/api-reference/link-branding/retrieve-all-branded-links
        api: &[
            ("global", "https://api.sendgrid.com"),
            ("eu", "https://api.eu.sendgrid.com"),
        ],
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
        probe_path: "/I0/linkgate-doctor",
        // Open pixels `r.<region>.awstrack.me/I0/<message id>/<signature>`, as
        // a tracker blocker lists them.
        probe_source: "https://github.com/apparition47/MailTrackerBlocker/blob/master/Source/MTBBlockedMessage.m",
        https_switch: "set HttpsPolicy = REQUIRE in the configuration set's tracking options",
        https_source: "https://docs.aws.amazon.com/ses/latest/APIReference-V2/API_PutConfigurationSetTrackingOptions.html",
        api: &[],
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
        probe_path: "/q/linkgate-doctor~~/",
        // "The paths /f/ and /q/ are SparkPost tracked clicks and opens", tokens ending in `~~/`.
        probe_source: "https://support.sparkpost.com/docs/tech-resources/deep-links-self-serve",
        https_switch: "set the tracking domain to \"secure\": true (Tracking Domains API)",
        https_source: "https://support.sparkpost.com/docs/tech-resources/using-proxy-https-tracking-domain",
        api: &[],
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
        probe_path: "/o/linkgate-doctor",
        // Open pixels `/o/<token>`, as a tracker blocker lists them; Mailgun
        // does not document the shape.
        probe_source: "https://github.com/apparition47/MailTrackerBlocker/blob/master/Source/MTBBlockedMessage.m",
        https_switch: "",
        https_source: "https://help.mailgun.com/hc/en-us/articles/360011566033-HTTPS-Tracking-Links",
        api: &[],
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
        probe_path: "/u/linkgate-doctor",
        // Tracked links `/u/<id>?_e=...&_m=...` (`/a/` when rewritten as deep
        // links), from Iterable's own SDK tests.
        probe_source:
            "https://github.com/Iterable/iterable-swift-sdk/blob/master/Tests/swift-sdk-swift-tests/DeepLinkTests.swift",
        https_switch: "",
        https_source: "https://support.iterable.com/hc/en-us/articles/115000427446-Configuring-HTTPS-for-Link-Tracking-Domains",
        api: &[],
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
        probe_path: "/e/o/linkgate-doctor",
        // Open pixels `/e/o/<token>`, as a tracker blocker lists them.
        probe_source: "https://github.com/apparition47/MailTrackerBlocker/blob/master/Source/MTBBlockedMessage.m",
        https_switch: "",
        https_source: "https://docs.customer.io/journeys/https-link-verification/",
        api: &[],
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Result<&'static Preset, String> {
    PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
        format!("unknown provider {name:?} (known: {})", known.join(", "))
    })
}

/// The preset whose tracking endpoint `url` names (same host), for a
/// `[upstream] url` written out instead of a preset: `http://sendgrid.net`
/// is SendGrid to `doctor`.
pub fn by_endpoint(url: &str) -> Option<&'static Preset> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.split(['/', ':', '?']).next()?.to_ascii_lowercase();
    PRESETS.iter().find(|p| {
        p.regions.iter().any(|(_, endpoint)| {
            let endpoint = endpoint.split_once("://").map_or(*endpoint, |(_, h)| h);
            match endpoint.split_once("{region}") {
                Some((before, after)) => host
                    .strip_prefix(before)
                    .and_then(|h| h.strip_suffix(after))
                    .is_some_and(|region| !region.is_empty() && !region.contains('.')),
                None => host == endpoint,
            }
        })
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

    /// The account API's base URL for `region` (the default region when
    /// `None`); `None` when the preset has no API linkgate reads, or no API
    /// for that region.
    pub fn api_base(&self, region: Option<&str>) -> Option<&'static str> {
        match region {
            None => self.api.first(),
            Some(r) => self.api.iter().find(|(name, _)| *name == r),
        }
        .map(|(_, url)| *url)
    }

    /// The region whose tracking endpoint is `url` (same host), if any.
    pub fn region_of_endpoint(&self, url: &str) -> Option<&'static str> {
        let host = |u: &str| {
            let rest = u.split_once("://").map_or(u, |(_, rest)| rest);
            rest.split(['/', ':', '?']).next().unwrap_or("").to_ascii_lowercase()
        };
        let wanted = host(url);
        self.regions
            .iter()
            .find(|(name, endpoint)| *name != "*" && host(endpoint) == wanted)
            .map(|(name, _)| *name)
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
            ("sendgrid", Some("global"), "https://sendgrid.net"),
            ("sendgrid", Some("eu"), "https://eu.sendgrid.net"),
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

    #[test]
    fn a_url_naming_a_preset_endpoint_is_that_provider() {
        let cases = [
            ("http://sendgrid.net", Some("sendgrid")),
            ("https://SendGrid.net:443", Some("sendgrid")),
            ("http://eu.mailgun.org", Some("mailgun")),
            ("https://eu.sendgrid.net", Some("sendgrid")),
            ("https://r.eu-west-1.awstrack.me", Some("amazon-ses")),
            ("https://x.r.eu-west-1.awstrack.me", None),
            ("https://r.awstrack.me", None),
            ("https://sendgrid.net.example.com", None),
            ("http://upstream.example.test", None),
        ];
        for (url, name) in cases {
            assert_eq!(by_endpoint(url).map(|p| p.name), name, "{url}");
        }
    }

    #[test]
    fn sendgrid_has_an_account_api_per_region() {
        let sendgrid = find("sendgrid").expect("sendgrid");
        assert_eq!(sendgrid.api_base(None), Some("https://api.sendgrid.com"));
        assert_eq!(sendgrid.api_base(Some("eu")), Some("https://api.eu.sendgrid.com"));
        assert_eq!(sendgrid.api_base(Some("us")), None);
        assert_eq!(sendgrid.region_of_endpoint("https://eu.sendgrid.net"), Some("eu"));
        assert_eq!(sendgrid.region_of_endpoint("http://sendgrid.net:80"), Some("global"));
        assert_eq!(sendgrid.region_of_endpoint("https://other.example"), None);
        for (region, _) in sendgrid.api {
            assert!(sendgrid.url(Some(region)).is_ok(), "{region}");
        }
        // Only presets whose API linkgate reads have one.
        assert!(PRESETS
            .iter()
            .filter(|p| p.name != "sendgrid")
            .all(|p| p.api.is_empty()));
    }

    #[test]
    fn every_preset_has_its_own_probe_path_and_sources() {
        let mut paths: Vec<&str> = PRESETS.iter().map(|p| p.probe_path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), PRESETS.len(), "{paths:?}");
        for p in PRESETS {
            assert!(p.probe_path.starts_with('/'), "{}", p.name);
            assert!(p.probe_path.parse::<http::Uri>().is_ok(), "{}", p.name);
            assert!(p.probe_source.starts_with("https://"), "{}", p.name);
            assert!(p.https_source.starts_with("https://"), "{}", p.name);
            assert!(p.wrong_host_marker == p.wrong_host_marker.to_lowercase(), "{}", p.name);
        }
    }
}
