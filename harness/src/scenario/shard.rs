//! Splitting a run's scenarios over N machines: `quiesce run --shard K/N` runs the K-th of N
//! shares. The CI system's own matrix is the distributed engine; quiesce only has to split
//! the same way on every machine, so that the N jobs together run every scenario once.
//!
//! The split is a pure function of the scenario names and the recorded durations, never of
//! the order files are listed in or of the machine: scenarios are taken longest first (by
//! name among equals) and each goes to the share with the least time so far (the lowest K
//! among equals), which keeps the shares within one scenario's time of each other. A
//! scenario with no recorded time counts as the median of those recorded.
//!
//! Durations live beside the scenarios (`scenarios/durations.txt`), one `NAME SECONDS` line
//! each, and are updated from reports with `quiesce durations REPORT_DIR --write FILE`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The file of recorded durations, beside the scenario files.
pub const DURATIONS_FILE: &str = "durations.txt";

/// Most shares a run can be split into; far more than any CI matrix runs.
const MAX_SHARDS: u32 = 1000;
/// A durations file larger than this is not one (it holds a line per scenario).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest a recorded duration can be: a day.
const MAX_SECONDS: f64 = 86_400.0;
/// What a scenario counts for when nothing is recorded at all.
const UNKNOWN_SECONDS: f64 = 60.0;

/// The K-th of N shares (both from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// Why `--shard` or a durations file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// `--shard` is written K/N, with 1 <= K <= N <= 1000.
    #[error("{given:?} is not a shard: write it K/N, with 1 <= K <= N <= {MAX_SHARDS} (such as 2/4)")]
    NotAShard { given: String },
    /// The durations file could not be read.
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// The durations file is not a list of `NAME SECONDS` lines; the line is named.
    #[error("{path}:{line}: {what}")]
    Malformed { path: String, line: usize, what: String },
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::NotAShard { given: s.to_owned() };
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let num = |t: &str| t.parse::<u32>().ok().filter(|_| t.bytes().all(|b| b.is_ascii_digit()));
        let (index, count) = (num(k).ok_or_else(bad)?, num(n).ok_or_else(bad)?);
        if index == 0 || index > count || count > MAX_SHARDS {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Seconds each scenario took, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durations(pub BTreeMap<String, f64>);

impl Durations {
    /// Reads a durations file; a missing file is no durations (every share then gets the
    /// same number of scenarios, give or take one).
    pub fn load(path: &Path) -> Result<Durations, ShardError> {
        let shown = path.display().to_string();
        let read = |source| ShardError::Read { path: shown.clone(), source };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Durations::default()),
            Err(e) => return Err(read(e)),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut text).map_err(read)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ShardError::Malformed {
                path: shown,
                line: 0,
                what: format!("larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        Durations::parse(&text).map_err(|(line, what)| ShardError::Malformed { path: shown, line, what })
    }

    /// Pure: `NAME SECONDS` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Durations, (usize, String)> {
        let mut map = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(secs), None) = (words.next(), words.next(), words.next()) else {
                return Err((i + 1, format!("expected `NAME SECONDS`, found {line:?}")));
            };
            let secs: f64 = secs.parse().map_err(|_| (i + 1, format!("{secs:?} is not a number of seconds")))?;
            if !(0.0..=MAX_SECONDS).contains(&secs) {
                return Err((i + 1, format!("{secs} seconds is out of range (0 to {MAX_SECONDS})")));
            }
            if map.insert(name.to_owned(), secs).is_some() {
                return Err((i + 1, format!("{name} is listed twice")));
            }
        }
        Ok(Durations(map))
    }

    /// The file's text: a header, then one line per scenario, sorted by name.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Seconds each scenario took, for `quiesce run --shard K/N` to balance its shares.\n\
             # Updated from reports: quiesce durations quiesce-reports --write scenarios/durations.txt\n",
        );
        for (name, secs) in &self.0 {
            out.push_str(&format!("{name} {secs:.1}\n"));
        }
        out
    }

    /// The seconds a scenario counts for: its own, else the median of those recorded.
    fn weight(&self, name: &str, median: f64) -> f64 {
        self.0.get(name).copied().unwrap_or(median)
    }

    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.values().copied().collect();
        if v.is_empty() {
            return UNKNOWN_SECONDS;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// The durations recorded beside the scenarios given to a run: `durations.txt` in the
/// first folder given, or beside the first file.
pub fn durations_beside(paths: &[std::path::PathBuf]) -> Result<Durations, ShardError> {
    let Some(first) = paths.first() else { return Ok(Durations::default()) };
    let dir = if first.is_dir() { first.as_path() } else { first.parent().unwrap_or(Path::new(".")) };
    Durations::load(&dir.join(DURATIONS_FILE))
}

/// Pure: the share (1..=count) of each name, in the order given.
pub fn assign(names: &[String], durations: &Durations, count: u32) -> Vec<u32> {
    let median = durations.median();
    let order = longest_first(names, durations);
    let mut load = vec![0.0f64; count.max(1) as usize];
    let mut share = vec![0u32; names.len()];
    for i in order {
        let least = (0..load.len()).min_by(|&x, &y| load[x].total_cmp(&load[y]).then(x.cmp(&y))).unwrap_or(0);
        load[least] += durations.weight(&names[i], median);
        share[i] = least as u32 + 1;
    }
    share
}

/// Pure: the indexes of `names`, longest recorded time first (a name with none counts as
/// the median); equal times by name, so the order the files came in plays no part. The
/// shares are filled in this order, and `quiesce run -j N` starts scenarios in it, so that
/// the longest does not start last and keep one worker busy alone at the end.
pub fn longest_first(names: &[String], durations: &Durations) -> Vec<usize> {
    let median = durations.median();
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by(|&a, &b| {
        let (wa, wb) = (durations.weight(&names[a], median), durations.weight(&names[b], median));
        wb.total_cmp(&wa).then_with(|| names[a].cmp(&names[b]))
    });
    order
}

/// The items of `shard`'s share, in their order, named by `name`.
pub fn select<T>(items: Vec<T>, name: impl Fn(&T) -> String, shard: Shard, durations: &Durations) -> Vec<T> {
    let names: Vec<String> = items.iter().map(&name).collect();
    let shares = assign(&names, durations, shard.count);
    items.into_iter().zip(shares).filter(|(_, s)| *s == shard.index).map(|(t, _)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("scenario-{i:02}")).collect()
    }

    #[test]
    fn shards_parse() {
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        assert_eq!("1/1".parse::<Shard>().unwrap().to_string(), "1/1");
        for bad in ["0/4", "5/4", "4", "/4", "2/", "a/b", "-1/4", "+1/4", "1/1001", "2/4/6", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn every_scenario_lands_in_exactly_one_share_whatever_the_order() {
        let all = names(31);
        let d = Durations::default();
        for count in 1..=7 {
            let mut seen: Vec<String> = Vec::new();
            for index in 1..=count {
                seen.extend(select(all.clone(), |s| s.clone(), Shard { index, count }, &d));
            }
            seen.sort();
            assert_eq!(seen, all, "count {count}");
        }
        // The listing order changes nothing: each name keeps its share.
        let mut reversed = all.clone();
        reversed.reverse();
        let a = assign(&all, &d, 4);
        let b = assign(&reversed, &d, 4);
        for (i, n) in all.iter().enumerate() {
            let j = reversed.iter().position(|r| r == n).unwrap();
            assert_eq!(a[i], b[j], "{n}");
        }
    }

    #[test]
    fn recorded_durations_balance_the_shares() {
        // One long scenario and many short ones: by count, shares would be 4 and 4; by
        // time, the long one gets a share nearly to itself.
        let all = names(8);
        let mut d = Durations::default();
        d.0.insert("scenario-00".into(), 300.0);
        for n in &all[1..] {
            d.0.insert(n.clone(), 20.0);
        }
        let shares = assign(&all, &d, 2);
        let time = |k: u32| -> f64 { all.iter().zip(&shares).filter(|(_, s)| **s == k).map(|(n, _)| d.0[n]).sum() };
        assert_eq!(shares[0], 1);
        assert_eq!(shares.iter().filter(|s| **s == 1).count(), 1, "{shares:?}");
        assert_eq!((time(1), time(2)), (300.0, 140.0));
        // Unknown scenarios count as the median, not as nothing.
        let mut with_new = all.clone();
        with_new.push("zz-new".into());
        let shares = assign(&with_new, &d, 2);
        assert_eq!(shares.last(), Some(&2));
    }

    #[test]
    fn the_durations_file_round_trips_and_bad_lines_are_named() {
        let text = "# comment\n\nsaved-state-running 20.1\nrollback-cycles 120\n";
        let d = Durations::parse(text).unwrap();
        assert_eq!(d.0.len(), 2);
        assert_eq!(Durations::parse(&d.render()).unwrap(), d);
        assert_eq!(Durations::parse("a 1\nb x\n").unwrap_err().0, 2);
        assert_eq!(Durations::parse("a 1 2\n").unwrap_err().0, 1);
        assert_eq!(Durations::parse("a -1\n").unwrap_err().0, 1);
        assert_eq!(Durations::parse("a NaN\n").unwrap_err().0, 1);
        assert_eq!(Durations::parse("a 1\na 2\n").unwrap_err().0, 2);
        let missing = Durations::load(Path::new("/nonexistent/durations.txt")).unwrap();
        assert!(missing.0.is_empty());
    }
}
