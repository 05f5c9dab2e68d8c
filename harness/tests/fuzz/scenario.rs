//! Scenario files are input too (a colleague's, one written by hand): every scenario of
//! scenarios/, mutated line by line (lines dropped, doubled, swapped, taken from another
//! file, values and keys changed) and sometimes byte by byte. Parsing never panics, stays
//! within its memory bound, and a mistake is reported at a line and column of the file,
//! in a message of bounded length.

use std::path::Path;

use super::engine::{self, mutate_bytes, Rng};
use quiesce::scenario::format;

/// Parsing a file of at most a few MiB, with serde's and toml's own structures.
const MEMORY: usize = 64 << 20;

/// Values a mutated line puts after its `=`.
const VALUES: &[&str] = &[
    "\"\"",
    "\"x\"",
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551616",
    "1e999",
    "nan",
    "true",
    "[]",
    "[1, \"a\"]",
    "{}",
    "{ a = 1 }",
    "\"../../etc\"",
    "\"/etc/passwd\"",
    "\"64M\"",
    "\"0\"",
    "\"999999T\"",
    "\"1K\"",
    "\"12 parsecs\"",
    "\"qcow2\"",
    "\"raw\"",
    "\"vhd\"",
    "\"vhdx\"",
    "\"ext4\"",
    "\"ntfs\"",
    "\"vfat\"",
    "\"none\"",
    "\"gpt\"",
    "\"mbr\"",
    "\"data\"",
    "\"root\"",
    "\"vm1\"",
    "\"vm2\"",
    "\"auto\"",
    "\"saved-state\"",
    "\"child-snapshot\"",
    "\"mismatch\"",
    "\"interrupted\"",
    "\"paused\"",
    "\"running\"",
    "[\"blocks-match-backup\"]",
    "[\"/journal\", \"*.log\"]",
    "{ counter = true, journal = \"data\" }",
    "{ \"a.txt\" = \"a\" }",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "1979-05-27T07:32:00Z",
    "'literal'",
    "'''multi\nline'''",
    "\"\\u0000\"",
    "\"é\"",
];

/// Lines a mutated file gains: the tables a scenario has.
const HEADERS: &[&str] = &[
    "[[vm]]",
    "[[vm.disk]]",
    "[backup]",
    "[restore]",
    "[[restore.manifest]]",
    "[[fault]]",
    "[rollback]",
    "[vm]",
    "[[backup]]",
    "[",
];

fn corpus() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let texts: Vec<String> = files.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    assert!(texts.len() >= 10, "the scenario files are the corpus; found {} in {}", texts.len(), dir.display());
    texts
}

/// One line-level change.
fn mutate_lines(rng: &mut Rng, lines: &mut Vec<String>, corpus: &[String]) {
    let i = rng.below(lines.len());
    match rng.below(8) {
        0 if !lines.is_empty() => {
            lines.remove(i);
        }
        1 if !lines.is_empty() => {
            let l = lines[i].clone();
            lines.insert(i, l);
        }
        2 if lines.len() > 1 => {
            let j = rng.below(lines.len());
            lines.swap(i, j);
        }
        3 => {
            // A line of another scenario, so tables and keys meet other files' values.
            let other: Vec<&str> = rng.pick(corpus).lines().collect();
            lines.insert(i, rng.pick(&other).to_string());
        }
        4 => lines.insert(i, rng.pick(HEADERS).to_string()),
        5 | 6 if !lines.is_empty() => {
            if let Some(eq) = lines[i].find('=') {
                let key = lines[i][..eq].to_owned();
                lines[i] = format!("{key}= {}", rng.pick(VALUES));
            }
        }
        _ if !lines.is_empty() => {
            // A key with a typo, or a value's text with a character dropped.
            let l = &mut lines[i];
            if !l.is_empty() {
                let mut at = rng.below(l.len());
                while !l.is_char_boundary(at) {
                    at -= 1;
                }
                l.remove(at);
            }
        }
        _ => lines.push(rng.pick(VALUES).to_string()),
    }
}

#[test]
fn scenario() {
    let _turn = engine::turn();
    let corpus = corpus();
    let file = Path::new("scenarios/fuzzed.toml");
    let stats = engine::run("scenario", |rng, input| {
        let mut lines: Vec<String> = rng.pick(&corpus).lines().map(str::to_owned).collect();
        for _ in 0..1 + rng.below(4) {
            mutate_lines(rng, &mut lines, &corpus);
        }
        let mut bytes = lines.join("\n").into_bytes();
        if rng.one_in(5) {
            for _ in 0..1 + rng.below(3) {
                mutate_bytes(rng, &mut bytes, 1 << 20);
            }
        }
        *input = bytes;
        // A file that is not UTF-8 is refused as it is read, before parsing.
        let Ok(text) = std::str::from_utf8(input) else { return Ok("not-utf8".into()) };
        let (result, peak) = engine::measure(|| format::parse(file, text));
        if peak > MEMORY {
            return Err(format!("parsing held {peak} bytes at once (bound {MEMORY})"));
        }
        match result {
            Ok(_) => Ok("ok".into()),
            Err(e) => {
                let lines = text.split('\n').count();
                if e.line == 0 || e.line > lines || e.column == 0 {
                    return Err(format!(
                        "the mistake is placed at {}:{} in a file of {lines} lines: {e}",
                        e.line, e.column
                    ));
                }
                let text = e.to_string();
                if e.message.is_empty() || text.len() > 2048 {
                    return Err(format!("a message of {} bytes: {}", text.len(), engine::cut(&text, 300)));
                }
                Ok(format!("err:line-{}", if e.line == 1 { "1" } else { "n" }))
            }
        }
    });
    assert!(
        engine::replaying() || stats.get("ok").copied().unwrap_or(0) > 0,
        "no mutated scenario parsed, so none reached the checks: {stats:?}"
    );
}

/// The `=`, `,`, `[`, `{` and `.` of `text`, as the scenario parser counts them.
fn items(text: &str) -> usize {
    text.bytes().filter(|b| b"=,[{.".contains(b)).count()
}

/// A file of `unit` repeated (`N` in it numbered) between `head` and `tail`, as long as it
/// stays within the parser's bound on bytes and `max_items`.
fn repeated(head: &str, unit: &str, tail: &str, max_items: usize) -> String {
    let max_bytes = format::MAX_FILE_BYTES as usize;
    let mut s = String::from(head);
    let mut n = items(head) + items(tail);
    for i in 0.. {
        let next = unit.replace('N', &i.to_string());
        if s.len() + next.len() + tail.len() > max_bytes || n + items(&next) > max_items {
            break;
        }
        n += items(&next);
        s.push_str(&next);
    }
    s.push_str(tail);
    s
}

/// The shapes that cost the parser most per byte, each as a file of 1 MiB and as the
/// largest file of it within the bound on items: within the memory bound. The first is what
/// the fuzzer found (150 MB for 1 MiB: an inline table's duplicate key is found only after
/// all its pairs are built). One item more than the bound is refused at that item.
#[test]
fn scenario_worst_shapes() {
    let _turn = engine::turn();
    let nest = format!("{}{},", "[".repeat(70), "]".repeat(70));
    let shapes = [
        ("duplicate keys in an inline table", "description = \"x\"\nw = { ", "r = true,", "z = 1 }\n"),
        ("keys in an inline table", "w = { ", "rN = 1,", "z = 1 }\n"),
        ("integers in an array", "w = [", "1,", "1]\n"),
        ("empty arrays in an array", "w = [", "[],", "1]\n"),
        ("empty tables in an array", "w = [", "{},", "{}]\n"),
        ("nested arrays", "w = [", nest.as_str(), "1]\n"),
        ("top-level keys", "", "kN=1\n", ""),
        ("arrays of tables", "", "[[t]]\n", ""),
        ("tables", "", "[tN]\n", ""),
        ("dotted keys", "", "a.b.c.d.e.f.g.h.N=1\n", ""),
        ("dotted keys in an inline table", "w = {", "a.b.c.d.e.f.g.N=1,", "z=1}\n"),
        ("a long string", "w = \"", "x", "\"\n"),
        ("a string of escapes", "w = \"", "\\u00e9", "\"\n"),
        ("VMs", "", "[[vm]]\nname=\"a\"\n", ""),
        ("disks", "[[vm]]\n", "[[vm.disk]]\n", ""),
    ];
    let file = Path::new("scenarios/worst.toml");
    let mut failures = Vec::new();
    for (name, head, unit, tail) in shapes {
        for text in [repeated(head, unit, tail, usize::MAX), repeated(head, unit, tail, format::MAX_ITEMS)] {
            let (result, peak) = engine::measure(|| format::parse(file, &text));
            let said = result.map_or_else(|e| engine::cut(&e.to_string(), 100).to_owned(), |_| "parsed".into());
            eprintln!("{name}: {} bytes, {} items: held {peak} bytes; {said}", text.len(), items(&text));
            if peak > MEMORY {
                failures.push(format!("{name} ({} bytes) held {peak} bytes (bound {MEMORY})", text.len()));
            }
        }
        let text = repeated(head, unit, tail, format::MAX_ITEMS);
        // One more of it is refused at that item, before the parser sees any.
        let over = format!("{text}{}", unit.replace('N', "x"));
        if items(&over) > format::MAX_ITEMS && over.len() as u64 <= format::MAX_FILE_BYTES {
            let e = format::parse(file, &over).expect_err("one item too many");
            assert!(e.message.contains("more than 10000 keys, values and tables"), "{name}: {e}");
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
