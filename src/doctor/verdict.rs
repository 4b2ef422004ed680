//! What an answer means: a pass, the provider's page for an unknown host
//! (Host not forwarded), linkgate's own 502/504, a 421, a 4xx that says
//! nothing about the Host header, or a body that did not end.
//!
//! "Host not forwarded" needs the provider's own wrong-host page
//! ([`Preset::wrong_host_marker`] in the body). A provider whose page no
//! source describes has an empty marker, and then no answer blames the Host:
//! a 404 from it may as well mean that the probe path is not one it serves.

use super::fetch::Answer;
use super::Outcome;
use crate::provider::Preset;

/// The fix for a provider's wrong-host page.
const HOST_NOT_FORWARDED: &str = "the Host header is not forwarded: the proxy must send Host = the branded name \
     (linkgate does; check what is in front of it)";

/// The verdict on an answer to `GET path`; one whose body did not end fails, with its status.
pub(super) fn classify(answer: Answer, scheme: &str, preset: Option<&'static Preset>, path: &str) -> Outcome {
    let mut outcome = verdict(&answer, scheme, preset, path);
    if let Some(unfinished) = answer.unfinished {
        if outcome.passed() {
            outcome = Outcome::fail(
                format!("{}, but {unfinished}", outcome.message),
                "the answer started but did not end (it stalled, or kept flowing): check linkgate's log \
                 and the provider's answer (linkgate passes the provider's body on as it arrives)",
            );
        } else {
            outcome.message = format!("{}; {unfinished}", outcome.message);
        }
    }
    outcome
}

fn verdict(answer: &Answer, scheme: &str, preset: Option<&'static Preset>, path: &str) -> Outcome {
    let status = answer.status;
    let lower = answer.body.to_ascii_lowercase();
    let wrong_host = preset.filter(|p| !p.wrong_host_marker.is_empty() && lower.contains(p.wrong_host_marker));
    if let Some(p) = wrong_host {
        Outcome::fail(
            format!("{scheme} answered {status}: {}", p.wrong_host_page),
            HOST_NOT_FORWARDED,
        )
    } else if (status == 502 || status == 504)
        && [crate::proxy::UPSTREAM_UNAVAILABLE, crate::proxy::UPSTREAM_TIMED_OUT]
            .iter()
            .any(|body| lower.contains(body.trim_end()))
    {
        Outcome::fail(
            format!("{scheme} answered {status} from linkgate: the provider is unreachable from linkgate"),
            "check linkgate's outbound network and [upstream] url / connect_to; its log says why",
        )
    } else if status == 421 {
        Outcome::fail(
            format!("{scheme} answered 421"),
            "linkgate does not serve this host: add it as a [[host]]",
        )
    } else if (200..400).contains(&status) {
        Outcome::pass(format!("{scheme} answered {status}"))
    } else if (400..500).contains(&status) {
        Outcome::fail(
            format!("{scheme} answered {status} to GET {path}"),
            &not_served(preset, status),
        )
    } else {
        Outcome::fail(
            format!("{scheme} answered {status}"),
            "check linkgate's log and the provider's answer",
        )
    }
}

/// The fix for a 4xx that is not the provider's wrong-host page: what it
/// could mean, without blaming the Host header.
fn not_served(preset: Option<&'static Preset>, status: u16) -> String {
    match preset {
        Some(p) if !p.wrong_host_marker.is_empty() => format!(
            "not {}, so not a missing Host header: the probe path may not be one {} serves for this branding; \
             give --url with the path and query of a tracked link from a real {} email",
            p.wrong_host_page, p.display, p.display
        ),
        Some(p) => format!(
            "what {} answers for a wrong Host header is not known, so a {status} does not show one: the probe path \
             may not be one it serves, or the branding is not set up there; give --url with the path and query \
             of a tracked link from a real {} email",
            p.display, p.display
        ),
        None => "the upstream (a plain url) does not serve this path: give --url with the path and query \
                 of a tracked link from a real email"
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider;

    fn answer(status: u16, body: &str, unfinished: Option<&str>) -> Answer {
        Answer {
            status,
            body: body.to_owned(),
            unfinished: unfinished.map(str::to_owned),
        }
    }

    fn preset(name: &str) -> Option<&'static Preset> {
        provider::find(name).ok()
    }

    /// A provider whose wrong-host page is known, other than SendGrid: the
    /// marker decides for any preset that has one.
    static MARKED: Preset = Preset {
        name: "marked",
        display: "Marked",
        regions: &[("global", "https://marked.example")],
        http_only: false,
        max_header_bytes: None,
        wrong_host_marker: "no such tracking domain",
        wrong_host_page: "Marked's unknown-domain page",
        source: "https://marked.example/docs",
        probe_path: "/m/linkgate-doctor",
        probe_source: "https://marked.example/docs",
        https_switch: "",
        https_source: "https://marked.example/docs",
        api: &[],
    };

    /// (provider, status, body, verdict, in the message, the fix blames the Host header)
    type Case = (
        Option<&'static Preset>,
        u16,
        &'static str,
        &'static str,
        &'static str,
        bool,
    );

    #[test]
    fn only_the_providers_own_wrong_host_page_blames_the_host_header() {
        let wrong_link = "<html><title>Wrong Link</title></html>";
        let linkgate_502 = crate::proxy::UPSTREAM_UNAVAILABLE;
        let table: [Case; 17] = [
            (preset("sendgrid"), 200, "GIF89a", "pass", "https answered 200", false),
            (preset("sendgrid"), 302, "", "pass", "https answered 302", false),
            (
                preset("sendgrid"),
                404,
                wrong_link,
                "fail",
                "SendGrid's \"Wrong Link\" page",
                true,
            ),
            (
                preset("sendgrid"),
                200,
                wrong_link,
                "fail",
                "SendGrid's \"Wrong Link\" page",
                true,
            ),
            (
                preset("sendgrid"),
                404,
                "Not Found",
                "fail",
                "answered 404 to GET /p",
                false,
            ),
            (
                preset("mailgun"),
                404,
                "Not Found",
                "fail",
                "answered 404 to GET /p",
                false,
            ),
            // Another provider's page is not this provider's wrong-host page.
            (
                preset("mailgun"),
                404,
                wrong_link,
                "fail",
                "answered 404 to GET /p",
                false,
            ),
            (preset("mailgun"), 200, "ok", "pass", "https answered 200", false),
            (preset("amazon-ses"), 400, "", "fail", "answered 400 to GET /p", false),
            (
                Some(&MARKED),
                404,
                "No such tracking domain",
                "fail",
                "Marked's unknown-domain page",
                true,
            ),
            (Some(&MARKED), 404, "Not Found", "fail", "answered 404 to GET /p", false),
            (Some(&MARKED), 404, wrong_link, "fail", "answered 404 to GET /p", false),
            (None, 404, wrong_link, "fail", "answered 404 to GET /p", false),
            (None, 200, "ok", "pass", "https answered 200", false),
            (preset("mailgun"), 502, linkgate_502, "fail", "502 from linkgate", false),
            (preset("sendgrid"), 421, "", "fail", "https answered 421", false),
            (preset("iterable"), 500, "oops", "fail", "https answered 500", false),
        ];
        for (i, (p, status, body, verdict, said, blames_host)) in table.into_iter().enumerate() {
            let got = classify(answer(status, body, None), "https", p, "/p");
            let case = format!("case {i}: {:?} {status} {body:?}: {got:?}", p.map(|p| p.name));
            assert_eq!(got.status, verdict, "{case}");
            assert!(got.message.contains(said), "{case}");
            let fix = got.fix.unwrap_or_default();
            assert_eq!(fix.contains("Host header is not forwarded"), blames_host, "{case}");
            if verdict == "fail" && (400..500).contains(&status) && status != 421 && !blames_host {
                assert!(fix.contains("--url"), "{case}");
            }
        }
    }

    #[test]
    fn a_4xx_says_what_it_could_mean_for_the_provider() {
        let sendgrid = classify(answer(404, "", None), "https", preset("sendgrid"), "/p");
        assert!(sendgrid
            .fix
            .is_some_and(|f| f.contains("not SendGrid's \"Wrong Link\" page") && f.contains("a real SendGrid email")),);
        let mailgun = classify(answer(404, "", None), "http", preset("mailgun"), "/o/x");
        assert_eq!(mailgun.message, "http answered 404 to GET /o/x");
        assert!(mailgun
            .fix
            .is_some_and(|f| f.contains("what Mailgun answers for a wrong Host header is not known")));
        let plain = classify(answer(404, "", None), "https", None, "/");
        assert!(plain.fix.is_some_and(|f| f.contains("a plain url")));
    }

    #[test]
    fn an_unfinished_body_keeps_the_status_and_fails() {
        let sendgrid = preset(provider::DEFAULT);
        let done = classify(answer(200, "GIF89a", None), "https", sendgrid, "/p");
        assert_eq!((done.status, done.message.as_str()), ("pass", "https answered 200"));

        let stalled = classify(
            answer(200, "GIF89a", Some("the body did not end within 3s")),
            "https",
            sendgrid,
            "/p",
        );
        assert_eq!(stalled.status, "fail");
        assert_eq!(
            stalled.message,
            "https answered 200, but the body did not end within 3s"
        );
        assert!(stalled.fix.is_some_and(|f| f.contains("stalled")));

        // A failure recognised from the start of the body stays that failure, and says the body did not end.
        let wrong = classify(
            answer(200, "<title>Wrong Link</title>", Some("the body did not end within 3s")),
            "https",
            sendgrid,
            "/p",
        );
        assert_eq!(wrong.status, "fail");
        assert!(
            wrong.message.ends_with("; the body did not end within 3s"),
            "{}",
            wrong.message
        );
        assert!(wrong.fix.is_some_and(|f| f.contains("Host header")));
    }
}
