//! The README's two commands, read from the README itself, so that the benchmark times what
//! a new user is told to type and follows the README when it changes.

/// The heading of the README section that holds the two commands.
pub const SECTION: &str = "## Two commands";

/// The README's two commands: the main job, then the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commands {
    pub main: Command,
    pub test: Command,
}

/// One command line as the README gives it, and its parts: the command runs them in order
/// and stops at the first that fails, as the shell's `&&` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub line: String,
    pub parts: Vec<String>,
}

impl Command {
    fn parse(line: &str) -> Command {
        let parts = line.split("&&").map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
        Command { line: line.trim().to_owned(), parts }
    }

    /// The last part: for the main command, the run of the scenarios alone, which is the
    /// warm run once the first has built everything.
    pub fn last_part(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or_default()
    }
}

/// Why the README's commands could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadmeError {
    /// The README has no section of that name: the benchmark cannot know what to time.
    #[error("the README has no \"{SECTION}\" section")]
    NoSection,
    /// The section's first `sh` block does not hold exactly two commands (comments aside).
    #[error("the README's \"{SECTION}\" block holds {0} commands where two were expected (main job, tests)")]
    Count(usize),
    /// A command uses shell syntax the benchmark does not split (`||`, `;`, a line
    /// continuation): it times each `&&` part on its own.
    #[error("the README's command `{0}` uses `||`, `;` or `\\`: only `&&` between parts is understood")]
    Syntax(String),
}

/// The two commands of [`SECTION`]: the lines of its first ```` ```sh ```` block that are
/// neither blank nor comments.
pub fn commands(readme: &str) -> Result<Commands, ReadmeError> {
    if !readme.lines().any(|l| l.trim() == SECTION) {
        return Err(ReadmeError::NoSection);
    }
    let section = readme.lines().skip_while(|l| l.trim() != SECTION).skip(1);
    let mut lines = Vec::new();
    let mut in_block = false;
    for l in section {
        let t = l.trim();
        if !in_block {
            if t.starts_with("## ") {
                break;
            }
            in_block = t == "```sh";
            continue;
        }
        if t.starts_with("```") {
            break;
        }
        if !t.is_empty() && !t.starts_with('#') {
            lines.push(t.to_owned());
        }
    }
    if lines.len() != 2 {
        return Err(ReadmeError::Count(lines.len()));
    }
    for l in &lines {
        if l.contains("||") || l.contains(';') || l.ends_with('\\') {
            return Err(ReadmeError::Syntax(l.clone()));
        }
    }
    Ok(Commands { main: Command::parse(&lines[0]), test: Command::parse(&lines[1]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const README: &str = "# quiesce\n\n## Two commands\n\nOn a fresh machine:\n\n```sh\n\
        # Set up, then run the main job.\nsh ci/setup-debian.sh && cargo run --release -p quiesce -- run scenarios/\n\n\
        # Set up, then run the tests.\nsh ci/setup-debian.sh && sh ci/test.sh\n```\n\n```sh\nnot this one\n```\n";

    #[test]
    fn the_two_commands_and_their_parts_are_read_from_the_section() {
        let c = commands(README).unwrap();
        assert_eq!(c.main.parts, ["sh ci/setup-debian.sh", "cargo run --release -p quiesce -- run scenarios/"]);
        assert_eq!(c.main.last_part(), "cargo run --release -p quiesce -- run scenarios/");
        assert_eq!(c.test.line, "sh ci/setup-debian.sh && sh ci/test.sh");
        assert_eq!(c.test.parts, ["sh ci/setup-debian.sh", "sh ci/test.sh"]);
    }

    #[test]
    fn the_real_readme_gives_two_commands() {
        let readme = include_str!("../../../README.md");
        let c = commands(readme).unwrap();
        assert!(c.main.last_part().contains("run scenarios/"), "{c:?}");
        assert!(c.test.last_part().contains("ci/test.sh"), "{c:?}");
    }

    #[test]
    fn a_readme_the_benchmark_cannot_follow_is_refused_by_name() {
        assert_eq!(commands("# quiesce\n"), Err(ReadmeError::NoSection));
        assert_eq!(commands("## Two commands\n```sh\na\n```\n"), Err(ReadmeError::Count(1)));
        // A block in the next section is not the README's commands.
        assert_eq!(commands("## Two commands\ntext\n## Other\n```sh\na\nb\n```\n"), Err(ReadmeError::Count(0)));
        assert!(matches!(commands("## Two commands\n```sh\na || b\nc\n```\n"), Err(ReadmeError::Syntax(_))));
    }
}
