//! The account audit's section of `linkgate doctor`'s text report: a
//! table of every branding on the account, then each one's problems with
//! their fixes, the `[[host]]` entry to add, its DNS records and notes.

use super::account::AccountReport;
use crate::account::Listed;
use crate::text::printable;

/// The account section of the text report.
pub(super) fn render(report: &AccountReport, out: &mut String) {
    use std::fmt::Write as _;
    let display = crate::provider::find(report.provider).map_or(report.provider, |p| p.display);
    // The summary line after this says why the account could not be read.
    if report.error.is_some() {
        return;
    }
    let whose = report.listed.iter().map(Listed::whose).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        out,
        "ACCOUNT {display}: {} link brandings ({whose})",
        report.brandings.len()
    );
    let text = |s: &str| printable(s).into_owned();
    let rows: Vec<[String; 7]> = report
        .brandings
        .iter()
        .map(|b| {
            [
                b.branding.id.to_string(),
                text(&b.branding.host),
                text(&b.branding.user),
                b.branding.region.to_owned(),
                if b.branding.valid { "valid" } else { "INVALID" }.to_owned(),
                if b.served { "served" } else { "NOT SERVED" }.to_owned(),
                if b.branding.default { "default" } else { "-" }.to_owned(),
            ]
        })
        .collect();
    let head = ["ID", "HOST", "USER", "REGION", display, "LINKGATE", "DEFAULT"].map(str::to_owned);
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            rows.iter()
                .chain([&head])
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in [&head].into_iter().chain(rows.iter()) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    for b in &report.brandings {
        let host = text(&b.branding.host);
        let who = format!("{display} id {}, user {}", b.branding.id, text(&b.branding.user));
        for p in &b.problems {
            let _ = writeln!(out, "{host} ({who}): {} — fix: {}", p.message, p.fix);
        }
        if let Some(entry) = &b.add {
            for line in entry.lines() {
                let _ = writeln!(out, "    {line}");
            }
        }
        let _ = writeln!(out, "{host} records: {}", b.dns_advice);
        for note in &b.notes {
            let _ = writeln!(out, "{host} ({who}): {note}");
        }
    }
}
