//! Small helpers every view shares: escaping for HTML and SVG, durations for people.

use std::fmt::Write;

/// `s` safe as HTML or SVG text and as a quoted attribute value. Every piece of text the
/// pages show goes through here: scenario names and descriptions come from files, check
/// details and errors may quote what a guest said.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in HTML text (but for tab and newline);
            // shown as the replacement character rather than passed on.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A relative path as a link target: each byte outside the unreserved set (and `/`)
/// percent-encoded, so a name with `#`, `?` or a blank still points at its file.
pub fn href(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A duration as a person reads it: `312 ms`, `2.31 s`, `1 min 12 s`.
pub fn duration(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        return "-".into();
    }
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 10_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0).round() as u64;
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// At most `max` characters of `s`, with an ellipsis when cut.
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_controls() {
        assert_eq!(
            esc(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
        assert_eq!(esc("a\u{1b}[31mb\nc"), "a\u{FFFD}[31mb\nc");
    }

    #[test]
    fn links_encode_what_would_end_or_change_them() {
        assert_eq!(href("artifacts/s 1/vm1-#x?/why.txt"), "artifacts/s%201/vm1-%23x%3F/why.txt");
        assert_eq!(href("a\"><script>"), "a%22%3E%3Cscript%3E");
    }

    #[test]
    fn durations_and_cuts() {
        assert_eq!(duration(312.4), "312 ms");
        assert_eq!(duration(2310.0), "2.31 s");
        assert_eq!(duration(45_170.0), "45.2 s");
        assert_eq!(duration(72_000.0), "1 min 12 s");
        assert_eq!(duration(f64::NAN), "-");
        assert_eq!(cut("héllo", 2), "hé…");
        assert_eq!(cut("hé", 2), "hé");
    }
}
