//! What a scenario file may hold before the TOML parser sees it. toml_edit keeps every key,
//! value and table of a document with its spans and formatting, a few hundred bytes each,
//! and builds all of an inline table's pairs (and reserves room for them) before it finds a
//! duplicate key: a 1 MiB file of `r = true,` held 150 MB at once (found by the fuzz test).
//! What the parser holds grows with the number of items, not with the bytes, so the items
//! are bounded.
//!
//! Every key, value and table needs one of `=` (a key's value), `,` (the next element of an
//! array or inline table), `[` (an array, or a table header), `{` (an inline table) or `.`
//! (a dotted key's next table). They are counted anywhere in the file, inside strings and
//! comments too: a count that never skips anything cannot be fooled by a string the parser
//! reads differently, and a scenario has a few hundred of them at most.

/// At most this many `=`, `,`, `[`, `{` and `.` in a scenario file. The largest in
/// scenarios/ has 79. The parser holds at most about 0.8 KiB per item (measured by the fuzz
/// test's `scenario_worst_shapes`: 8 MB for 10,000 duplicate keys in an inline table).
pub const MAX_ITEMS: usize = 10_000;

/// The byte offset of the first structural character past [`MAX_ITEMS`], and why.
pub fn check(text: &str) -> Result<(), (usize, String)> {
    let mut seen = 0usize;
    for (at, b) in text.bytes().enumerate() {
        if matches!(b, b'=' | b',' | b'[' | b'{' | b'.') {
            seen += 1;
            if seen > MAX_ITEMS {
                return Err((
                    at,
                    format!(
                        "the scenario has more than {MAX_ITEMS} keys, values and tables (counted as `=`, `,`, \
                         `[`, `{{` and `.`, in strings and comments too); no scenario needs that many, and \
                         parsing them all would take memory without limit"
                    ),
                ));
            }
        }
    }
    Ok(())
}
