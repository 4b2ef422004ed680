//! What an answer means: a pass, the provider's page for an unknown host
//! (Host not forwarded), linkgate's own 502/504, a 421, or a body that did
//! not end.

use super::fetch::Answer;
use super::Outcome;
use crate::provider::Preset;

/// The verdict on an answer; one whose body did not end fails, with its status.
pub(super) fn classify(answer: Answer, scheme: &str, preset: Option<&'static Preset>) -> Outcome {
    let mut outcome = verdict(&answer, scheme, preset);
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

fn verdict(answer: &Answer, scheme: &str, preset: Option<&'static Preset>) -> Outcome {
    let status = answer.status;
    let lower = answer.body.to_ascii_lowercase();
    let marker = preset.map_or("", |p| p.wrong_host_marker);
    if (!marker.is_empty() && lower.contains(marker)) || status == 404 {
        Outcome::fail(
            format!(
                "{scheme} answered {status}: {}",
                preset.map_or("the provider's answer for an unknown tracking host", |p| p.wrong_host_page)
            ),
            "the Host header is not forwarded: the proxy must send Host = the branded name (linkgate does; check what is in front of it)",
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
    } else {
        Outcome::fail(
            format!("{scheme} answered {status}"),
            "check linkgate's log and the provider's answer",
        )
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

    #[test]
    fn an_unfinished_body_keeps_the_status_and_fails() {
        let sendgrid = provider::find(provider::DEFAULT).ok();
        let done = classify(answer(200, "GIF89a", None), "https", sendgrid);
        assert_eq!((done.status, done.message.as_str()), ("pass", "https answered 200"));

        let stalled = classify(
            answer(200, "GIF89a", Some("the body did not end within 3s")),
            "https",
            sendgrid,
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
