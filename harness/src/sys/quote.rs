//! Shell quoting, for command lines people read and paste (evidence, error messages) and
//! for the words of scripts run in a guest's shell.

/// `s` as one word of a POSIX shell: bare if it holds only characters no shell treats
/// specially, else in single quotes (a `'` inside becomes `'\''`).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=,.:/+@".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A command line as a shell would need it.
pub fn shell_line<S: AsRef<str>>(program: &str, args: &[S]) -> String {
    std::iter::once(program).chain(args.iter().map(AsRef::as_ref)).map(shell_quote).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_line_quotes_what_needs_it() {
        let line = shell_line("qemu", &["-append", "a b", "it's", "x=1,y", ""]);
        assert_eq!(line, r"qemu -append 'a b' 'it'\''s' x=1,y ''");
    }

    #[test]
    fn quoted_words_survive_a_real_shell() {
        for word in ["plain", "a b", "it's", "$HOME", "`x`", "a\nb", "*", "", "'", "\\"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word, "{word:?}");
        }
    }
}
