//! A condition's reason repeats what the guest said: its OS's name, a mount point, a device.
//! The guest is untrusted, and a reason goes into the manifest, the report and the terminal,
//! so what it repeats is cut short, a list is cut to its first few, and control characters
//! (a newline, an escape sequence, a right-to-left override) are shown escaped, not obeyed.
//! The fuzz test found a reason that repeated 44 KB of a guest's OS name.

/// At most this many bytes of one thing the guest named, escapes included.
pub const MAX_BYTES: usize = 100;

/// At most this many items of a list the guest gave are named; the rest are counted.
pub const MAX_ITEMS: usize = 8;

/// `text` as a reason may repeat it: escaped, and cut at [`MAX_BYTES`] with its length said.
pub fn quote(text: &str) -> String {
    let mut out = String::new();
    for (at, c) in text.char_indices() {
        let before = out.len();
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > MAX_BYTES {
            out.truncate(before);
            out.push_str(&format!("… ({} bytes, {} shown)", text.len(), at));
            break;
        }
    }
    out
}

/// The first [`MAX_ITEMS`] of `items`, joined, and how many more there were.
pub fn list(items: &[String]) -> String {
    let mut out = items.iter().take(MAX_ITEMS).map(String::as_str).collect::<Vec<_>>().join(", ");
    if items.len() > MAX_ITEMS {
        out.push_str(&format!(", and {} more", items.len() - MAX_ITEMS));
    }
    out
}

/// Characters that reorder the text shown after them (Unicode's bidirectional controls).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept() {
        assert_eq!(quote("Debian GNU/Linux 12 (bookworm)"), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(quote("/mnt/données"), "/mnt/données");
    }

    #[test]
    fn long_text_is_cut_and_its_length_said() {
        let q = quote(&"U/".repeat(20_000));
        assert!(q.len() < MAX_BYTES + 40, "{q}");
        assert!(q.ends_with("… (40000 bytes, 100 shown)"), "{q}");
        // Cut at a character, not inside one.
        let q = quote(&"é".repeat(200));
        assert!(q.starts_with(&"é".repeat(50)) && q.contains("… (400 bytes, 100 shown)"), "{q}");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(quote("a\nb\x1b[2Jc\u{202e}d"), "a\\nb\\u{1b}[2Jc\\u{202e}d");
        let q = quote(&"\n".repeat(1000));
        assert!(q.len() < MAX_BYTES + 40 && q.starts_with("\\n\\n"), "{q}");
    }

    #[test]
    fn long_lists_are_cut_and_counted() {
        let items: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(list(&items), "0, 1, 2, 3, 4, 5, 6, 7, and 12 more");
        assert_eq!(list(&items[..2]), "0, 1");
    }
}
