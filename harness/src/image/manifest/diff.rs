//! Comparing two manifests path by path, as virt-diff does: what was added, removed, or
//! changed (type, size, mode, content, link target). Paths a caller knows to be volatile
//! are left out with simple patterns ([`ignored`], [`Ignore`]), matched by `globset`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;

use super::{place, Entry, EntryKind, FsManifest, Manifest};

/// What differs about a path present on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    Type,
    Size,
    Mode,
    Content,
    Target,
}

/// One difference. `partition` is None when each side has a single filesystem (they are
/// compared whatever their partition numbers), else the partition the path is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "lowercase")]
pub enum Change {
    Added {
        partition: Option<u32>,
        entry: Entry,
    },
    Removed {
        partition: Option<u32>,
        entry: Entry,
    },
    Changed {
        partition: Option<u32>,
        fields: Vec<Field>,
        before: Entry,
        after: Entry,
    },
    /// A difference of the filesystems themselves: one only on one side, a label, a UUID.
    Filesystem {
        partition: Option<u32>,
        what: String,
    },
}

impl Change {
    /// The path this change is about (None for a filesystem change).
    pub fn path(&self) -> Option<&str> {
        match self {
            Change::Added { entry, .. } | Change::Removed { entry, .. } => Some(&entry.path),
            Change::Changed { after, .. } => Some(&after.path),
            Change::Filesystem { .. } => None,
        }
    }

    /// The fields that changed (empty unless this is a [`Change::Changed`]).
    pub fn fields(&self) -> &[Field] {
        match self {
            Change::Changed { fields, .. } => fields,
            _ => &[],
        }
    }
}

fn shown(partition: Option<u32>, path: &str) -> String {
    match partition {
        Some(n) => format!("p{n}:{path}"),
        None => path.to_owned(),
    }
}

fn kind_name(e: &Entry) -> String {
    match e.kind {
        EntryKind::File => "file".into(),
        EntryKind::Dir => "dir".into(),
        EntryKind::Symlink => "symlink".into(),
        EntryKind::Other => e.note.clone().unwrap_or_else(|| "other".into()),
    }
}

fn describe(e: &Entry) -> String {
    match e.kind {
        EntryKind::File => format!("({} bytes)", e.size),
        EntryKind::Dir => "(dir)".into(),
        EntryKind::Symlink => format!("-> {}", e.target.as_deref().unwrap_or("?")),
        EntryKind::Other => format!("({})", kind_name(e)),
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Added { partition, entry } => write!(f, "+ {} {}", shown(*partition, &entry.path), describe(entry)),
            Change::Removed { partition, entry } => {
                write!(f, "- {} {}", shown(*partition, &entry.path), describe(entry))
            }
            Change::Changed { partition, fields, before, after } => {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|field| match field {
                        Field::Type => format!("type {} -> {}", kind_name(before), kind_name(after)),
                        Field::Size => format!("size {} -> {}", before.size, after.size),
                        Field::Mode => format!("mode {:04o} -> {:04o}", before.mode, after.mode),
                        Field::Content => match (&before.blake3, &after.blake3) {
                            (Some(_), Some(_)) => "content".into(),
                            _ => format!(
                                "content (not compared: {})",
                                before.note.as_deref().or(after.note.as_deref()).unwrap_or("not read")
                            ),
                        },
                        Field::Target => format!(
                            "target {} -> {}",
                            before.target.as_deref().unwrap_or("?"),
                            after.target.as_deref().unwrap_or("?")
                        ),
                    })
                    .collect();
                write!(f, "~ {} {}", shown(*partition, &after.path), parts.join(", "))
            }
            Change::Filesystem { partition, what } => write!(f, "! {}: {what}", place(*partition)),
        }
    }
}

/// Counts of a list of changes, printed as the summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
    pub filesystems: usize,
}

impl Summary {
    pub fn of(changes: &[Change]) -> Self {
        let mut s = Summary::default();
        for c in changes {
            match c {
                Change::Added { .. } => s.added += 1,
                Change::Removed { .. } => s.removed += 1,
                Change::Changed { .. } => s.changed += 1,
                Change::Filesystem { .. } => s.filesystems += 1,
            }
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        *self == Summary::default()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} added, {} removed, {} changed", self.added, self.removed, self.changed)?;
        if self.filesystems > 0 {
            write!(f, ", {} filesystem difference(s)", self.filesystems)?;
        }
        Ok(())
    }
}

/// The differences from `a` to `b`, leaving out paths that match a pattern of `ignore`
/// (see [`ignored`]).
pub fn diff(a: &Manifest, b: &Manifest, ignore: &[String]) -> Vec<Change> {
    let ignore = &Ignore::lenient(ignore);
    let mut out = Vec::new();
    if a.filesystems.len() == 1 && b.filesystems.len() == 1 {
        let (fa, fb) = (&a.filesystems[0], &b.filesystems[0]);
        if fa.partition != fb.partition {
            let what = format!("the filesystem moved from {} to {}", place(fa.partition), place(fb.partition));
            out.push(Change::Filesystem { partition: fb.partition, what });
        }
        diff_fs(None, fa, fb, ignore, &mut out);
    } else {
        let pa: BTreeMap<Option<u32>, &FsManifest> = a.filesystems.iter().map(|f| (f.partition, f)).collect();
        let pb: BTreeMap<Option<u32>, &FsManifest> = b.filesystems.iter().map(|f| (f.partition, f)).collect();
        let parts: BTreeSet<_> = pa.keys().chain(pb.keys()).copied().collect();
        for p in parts {
            match (pa.get(&p), pb.get(&p)) {
                (Some(fa), Some(fb)) => diff_fs(p, fa, fb, ignore, &mut out),
                (Some(fa), None) => out.push(Change::Filesystem {
                    partition: p,
                    what: format!("{} filesystem {:?} only in A ({} paths)", fa.kind, fa.label, fa.entries.len()),
                }),
                (None, Some(fb)) => out.push(Change::Filesystem {
                    partition: p,
                    what: format!("{} filesystem {:?} only in B ({} paths)", fb.kind, fb.label, fb.entries.len()),
                }),
                (None, None) => {}
            }
        }
    }
    let unread = |m: &Manifest| -> BTreeSet<(Option<u32>, u64, String)> {
        m.unread.iter().map(|u| (u.partition, u.size, u.content.clone())).collect()
    };
    let (ua, ub) = (unread(a), unread(b));
    for (p, size, content) in ua.difference(&ub) {
        out.push(Change::Filesystem { partition: *p, what: format!("{content} volume of {size} bytes only in A") });
    }
    for (p, size, content) in ub.difference(&ua) {
        out.push(Change::Filesystem { partition: *p, what: format!("{content} volume of {size} bytes only in B") });
    }
    out
}

fn diff_fs(partition: Option<u32>, a: &FsManifest, b: &FsManifest, ignore: &Ignore, out: &mut Vec<Change>) {
    let at = partition.or(b.partition);
    if a.kind != b.kind {
        out.push(Change::Filesystem { partition: at, what: format!("filesystem {} -> {}", a.kind, b.kind) });
    }
    if a.label != b.label {
        out.push(Change::Filesystem { partition: at, what: format!("label {:?} -> {:?}", a.label, b.label) });
    }
    if a.uuid != b.uuid {
        out.push(Change::Filesystem { partition: at, what: format!("UUID {} -> {}", a.uuid, b.uuid) });
    }
    let ea: BTreeMap<&str, &Entry> = a.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let eb: BTreeMap<&str, &Entry> = b.entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let paths: BTreeSet<&str> = ea.keys().chain(eb.keys()).copied().collect();
    for path in paths {
        if ignore.is_match(path) {
            continue;
        }
        match (ea.get(path), eb.get(path)) {
            (Some(x), None) => out.push(Change::Removed { partition, entry: (*x).clone() }),
            (None, Some(y)) => out.push(Change::Added { partition, entry: (*y).clone() }),
            (Some(x), Some(y)) => {
                let fields = compare(x, y);
                if !fields.is_empty() {
                    out.push(Change::Changed { partition, fields, before: (*x).clone(), after: (*y).clone() });
                }
            }
            (None, None) => {}
        }
    }
}

fn compare(x: &Entry, y: &Entry) -> Vec<Field> {
    let mut f = Vec::new();
    let same_type = x.kind == y.kind && (x.kind != EntryKind::Other || x.note == y.note);
    if !same_type {
        f.push(Field::Type);
    }
    if x.size != y.size {
        f.push(Field::Size);
    }
    if x.mode != y.mode {
        f.push(Field::Mode);
    }
    if same_type && x.kind == EntryKind::File {
        // Content a side could not read (a compressed NTFS file) is never taken as equal.
        let both_unread = x.blake3.is_none() && y.blake3.is_none() && x.note == y.note;
        if x.blake3 != y.blake3 || (x.blake3.is_none() && !both_unread) {
            f.push(Field::Content);
        }
    }
    if same_type && x.target != y.target {
        f.push(Field::Target);
    }
    f
}

/// True if `path` is to be left out by one of `patterns`:
///
/// - a pattern without `*` or `?` is a path prefix, by whole components: `/var/log` leaves
///   out `/var/log` and everything under it, not `/var/logs`;
/// - otherwise it is a glob over the whole path, where `*` matches any run of characters
///   (`/` included) and `?` one character; a path is also left out when one of its parent
///   directories matches: `/home/*/.cache` leaves out `/home/u/.cache/x`, `*.tmp` leaves
///   out every `.tmp` file. Every other character is itself (`[`, `{` and `\` included).
///
/// This compiles the patterns on every call; to test many paths, make an [`Ignore`] once. A
/// pattern [`Ignore::new`] refuses leaves nothing out here, so that a diff reports more,
/// never less; callers that take patterns from a user check them with [`Ignore::new`].
pub fn ignored(path: &str, patterns: &[String]) -> bool {
    !patterns.is_empty() && Ignore::lenient(patterns).is_match(path)
}

/// Why a set of ignore patterns could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    /// The glob matcher could not compile the patterns. No pattern can be malformed (every
    /// character but `*` and `?` stands for itself), so this means a pattern too large to
    /// compile: shorten it.
    #[error("ignore pattern {pattern} cannot be used: {reason}")]
    Compile { pattern: String, reason: String },
}

impl PatternError {
    /// The pattern as shown: quoted, and cut short if it is long.
    fn compile(pattern: &str, e: &globset::Error) -> PatternError {
        const SHOWN: usize = 80;
        let pattern = match pattern.char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("{:?}... ({} characters)", &pattern[..cut], pattern.chars().count()),
            None => format!("{pattern:?}"),
        };
        PatternError::Compile { pattern, reason: e.kind().to_string() }
    }
}

/// Ignore patterns, compiled once (see [`ignored`] for what a pattern means).
#[derive(Debug, Clone)]
pub struct Ignore {
    /// The patterns without `*` or `?`: path prefixes, by whole components.
    prefixes: Vec<String>,
    /// The others, each compiled both as itself and followed by `/*`, which is what leaves
    /// out everything under a directory that matches.
    globs: GlobSet,
}

impl Ignore {
    /// Compiles `patterns`.
    pub fn new(patterns: &[String]) -> Result<Ignore, PatternError> {
        let (globs, prefixes): (Vec<&String>, Vec<&String>) = patterns.iter().partition(|p| is_glob(p));
        let mut set = GlobSetBuilder::new();
        for p in &globs {
            let escaped = escape(p);
            for g in [escaped.clone(), format!("{escaped}/*")] {
                let glob = GlobBuilder::new(&g).literal_separator(false).backslash_escape(true).build();
                set.add(glob.map_err(|e| PatternError::compile(p, &e))?);
            }
        }
        let globs = set.build().map_err(|e| {
            // The set is compiled as one; name the pattern that cannot be compiled alone.
            let culprit = match globs.as_slice() {
                [one] => Some(one),
                many => many.iter().find(|p| Ignore::new(std::slice::from_ref(**p)).is_err()),
            };
            PatternError::compile(culprit.map_or("(the patterns together)", |p| p.as_str()), &e)
        })?;
        Ok(Ignore { prefixes: prefixes.into_iter().cloned().collect(), globs })
    }

    /// [`Ignore::new`], where a pattern that cannot be compiled leaves nothing out.
    fn lenient(patterns: &[String]) -> Ignore {
        Ignore::new(patterns).unwrap_or_else(|_| {
            // One at a time, so that one pattern too large to compile does not disable the rest.
            let usable: Vec<String> =
                patterns.iter().filter(|p| Ignore::new(std::slice::from_ref(*p)).is_ok()).cloned().collect();
            Ignore::new(&usable).unwrap_or_else(|_| Ignore { prefixes: Vec::new(), globs: GlobSet::empty() })
        })
    }

    /// True if `path` is left out by one of the patterns.
    pub fn is_match(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| under_prefix(p, path)) || self.globs.is_match(path)
    }
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// `path` is `prefix` or under it, by whole components; `/` is the prefix of every path,
/// and an empty pattern leaves nothing out.
fn under_prefix(pattern: &str, path: &str) -> bool {
    let p = pattern.trim_end_matches('/');
    if p.is_empty() {
        return pattern == "/";
    }
    path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
}

/// The pattern in globset's syntax, meaning what it always meant here: `*` and `?` as
/// wildcards, every other character itself. globset would read `[...]` as a class, `{a,b}`
/// as alternatives and `\` as an escape, so those are escaped; and a run of stars is one
/// star, since globset gives `/**/` a meaning of its own (zero or more directories).
fn escape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 8);
    for c in pattern.chars() {
        match c {
            '*' if out.ends_with('*') => {}
            '*' | '?' => out.push(c),
            '[' | ']' | '{' | '}' | ',' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{FsKind, UnreadVolume};
    use super::*;

    fn fs(partition: Option<u32>, entries: Vec<Entry>) -> FsManifest {
        FsManifest { partition, kind: FsKind::Ext4, label: "data".into(), uuid: "u".into(), entries }
    }

    fn m(f: Vec<FsManifest>) -> Manifest {
        Manifest { filesystems: f, unread: vec![] }
    }

    fn base() -> Vec<Entry> {
        vec![
            Entry::dir("/", 0o755),
            Entry::file("/a", 10, 0o644, "h1".into()),
            Entry::symlink("/l", 1, 0o777, "a".into()),
            Entry::file("/var/log/x", 3, 0o644, "h2".into()),
        ]
    }

    #[test]
    fn identical_manifests_have_no_changes() {
        let a = m(vec![fs(None, base())]);
        assert!(diff(&a, &a.clone(), &[]).is_empty());
    }

    #[test]
    fn each_kind_of_change_is_named() {
        let a = m(vec![fs(Some(1), base())]);
        let mut e = base();
        e[1] = Entry::file("/a", 12, 0o600, "h9".into());
        e[2] = Entry::symlink("/l", 1, 0o777, "b".into());
        e.remove(3);
        e.push(Entry::file("/new", 5, 0o644, "h3".into()));
        let b = m(vec![fs(Some(2), e)]);
        let c = diff(&a, &b, &[]);
        let text: Vec<String> = c.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            text,
            vec![
                "! partition 2: the filesystem moved from partition 1 to partition 2",
                "~ /a size 10 -> 12, mode 0644 -> 0600, content",
                "~ /l target a -> b",
                "+ /new (5 bytes)",
                "- /var/log/x (3 bytes)",
            ],
        );
        assert_eq!(c[1].fields(), &[Field::Size, Field::Mode, Field::Content]);
        assert_eq!(Summary::of(&c).to_string(), "1 added, 1 removed, 2 changed, 1 filesystem difference(s)");
        let quiet = diff(&a, &b, &["/var/log".into(), "/n*".into(), "/l".into()]);
        assert_eq!(quiet.len(), 2, "{quiet:?}");
    }

    #[test]
    fn type_changes_and_unread_content() {
        let a =
            m(vec![fs(None, vec![Entry::file("/x", 0, 0o644, "h".into()), Entry::unread("/c", 5, 1, "compressed")])]);
        let b = m(vec![fs(None, vec![Entry::dir("/x", 0o644), Entry::unread("/c", 5, 1, "compressed")])]);
        let c = diff(&a, &b, &[]);
        assert_eq!(c.len(), 1, "content neither side could read is not reported: {c:?}");
        assert_eq!(c[0].to_string(), "~ /x type file -> dir");
        let b = m(vec![fs(None, vec![Entry::file("/x", 0, 0o644, "h".into()), Entry::file("/c", 5, 1, "h".into())])]);
        let c = diff(&a, &b, &[]);
        assert_eq!(c.len(), 1, "content one side could not read is never taken as equal: {c:?}");
        assert_eq!(c[0].to_string(), "~ /c content (not compared: compressed)");
        let o1 = m(vec![fs(None, vec![Entry::other("/p", 0o644, "fifo")])]);
        let o2 = m(vec![fs(None, vec![Entry::other("/p", 0o644, "socket")])]);
        assert_eq!(diff(&o1, &o2, &[])[0].fields(), &[Field::Type]);
    }

    #[test]
    fn several_filesystems_pair_by_partition() {
        let a = m(vec![fs(Some(1), base()), fs(Some(2), base())]);
        let mut b = m(vec![fs(Some(1), base()), fs(Some(3), base())]);
        b.unread.push(UnreadVolume { partition: Some(4), size: 100, content: "swap".into() });
        let c: Vec<String> = diff(&a, &b, &[]).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            c,
            vec![
                "! partition 2: ext4 filesystem \"data\" only in A (4 paths)",
                "! partition 3: ext4 filesystem \"data\" only in B (4 paths)",
                "! partition 4: swap volume of 100 bytes only in B",
            ]
        );
        let mut e = base();
        e[1].mode = 0o600;
        let b = m(vec![fs(Some(1), base()), fs(Some(2), e)]);
        assert_eq!(diff(&a, &b, &[])[0].to_string(), "~ p2:/a mode 0644 -> 0600");
    }

    #[test]
    fn patterns() {
        let p = |pats: &[&str], path: &str| ignored(path, &pats.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(p(&["/var/log"], "/var/log"));
        assert!(p(&["/var/log/"], "/var/log/syslog"));
        assert!(!p(&["/var/log"], "/var/logs"));
        assert!(p(&["/tmp/*"], "/tmp/a/b"));
        assert!(!p(&["/tmp/*"], "/tmp"));
        assert!(p(&["*.swp"], "/home/u/.x.swp"));
        assert!(p(&["/home/*/.cache"], "/home/u/.cache/deep/file"));
        assert!(!p(&["/home/*/.cache"], "/home/u/.cachet"));
        assert!(p(&["/a?c"], "/abc"));
        assert!(!p(&["/a?c"], "/abbc"));
        assert!(p(&["/"], "/anything"));
        assert!(!p(&[], "/x"));
        assert!(!p(&[""], "/x"), "an empty pattern leaves nothing out");
        // Many stars on a long path stay fast.
        let long = "/".to_string() + &"a".repeat(3000);
        assert!(!p(&["*a*a*a*a*a*a*a*a*b"], &long));
    }

    fn pats(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs_match_across_folders_and_leave_out_what_is_under_a_match() {
        // As the hand-written matcher did: `*` crosses `/`, `?` is one character, and a
        // path under a directory that matches is left out with it.
        let ig = Ignore::new(&pats(&["/srv/*/cache/*.tmp", "/logs/app-?.d"])).unwrap();
        assert!(ig.is_match("/srv/a/cache/x.tmp"));
        assert!(ig.is_match("/srv/a/b/cache/x.tmp"), "* crosses folders");
        assert!(ig.is_match("/srv/a/cache/x.tmp/inside"), "under a match");
        assert!(!ig.is_match("/srv/cache/x.tmp"), "each * sits between two slashes here");
        assert!(!ig.is_match("/srv/a/cache/x.tmpfile"));
        assert!(ig.is_match("/logs/app-1.d/today"));
        assert!(!ig.is_match("/logs/app-10.d"));
        // One compiled set answers like the function that compiles every time.
        for path in ["/srv/a/cache/x.tmp", "/srv/cache/x.tmp", "/logs/app-1.d"] {
            assert_eq!(ig.is_match(path), ignored(path, &pats(&["/srv/*/cache/*.tmp", "/logs/app-?.d"])), "{path}");
        }
    }

    #[test]
    fn only_star_and_question_mark_are_special() {
        let p = |pat: &str, path: &str| ignored(path, &pats(&[pat]));
        // globset would read these as a class, alternatives and an escape: here they are
        // the characters themselves, as they always were.
        assert!(p("/data/[old]*", "/data/[old]-1"));
        assert!(!p("/data/[old]*", "/data/o-1"));
        assert!(p("/a/{x,y}*", "/a/{x,y}z"));
        assert!(!p("/a/{x,y}*", "/a/x"));
        assert!(p("/win\\*", "/win\\dir"));
        // `**` is two stars, not globset's "zero or more folders": `/a/**/b` needs a
        // folder between `/a` and `/b`.
        assert!(p("/a/**/b", "/a/x/y/b"));
        assert!(!p("/a/**/b", "/a/b"));
        // A pattern too large to compile is refused by `Ignore::new`, and leaves nothing
        // out where patterns cannot be refused, without disabling the others.
        // (256 Ki `?`: more than a command-line argument can hold, so only a scenario file
        // can bring one.)
        let huge = "?".repeat(1 << 18);
        let e = Ignore::new(&pats(&["/ok/*", &huge])).unwrap_err().to_string();
        assert!(
            e.starts_with(r#"ignore pattern "????"#) && e.contains("... (262144 characters) cannot be used: "),
            "{e}"
        );
        let ig = Ignore::lenient(&pats(&[&huge, "/var/log", "*.tmp"]));
        assert!(ig.is_match("/var/log/x") && ig.is_match("/a.tmp") && !ig.is_match("/a"));
    }
}
