//! The results people use, made from real reports (`tests/data/reports`, see the README
//! there): the JUnit file against the JUnit schema, and the HTML page in a real browser
//! (headless Chromium), whose rendered DOM is checked and which is photographed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCaseStatus};
use quiesce::report::{self, Entry, ScenarioReport, Status};
use quiesce::sys::Tool;

/// Chromium's cold start on a loaded CI machine takes seconds; this bounds a hung one.
const BROWSER: Duration = Duration::from_secs(120);
const XMLLINT: Duration = Duration::from_secs(60);

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The fixture reports copied to a fresh folder (the page is written beside them).
fn fixture_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&data().join("reports"), dir.path());
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn entries(dir: &Path) -> Vec<Entry> {
    report::entries(dir, report::load_dir(dir).unwrap())
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

/// The fixture set has what the tests need: passed, failed (a check; an error) and skipped.
#[test]
fn the_fixtures_cover_every_status() {
    let dir = fixture_dir();
    let e = entries(dir.path());
    let n = |s: Status| e.iter().filter(|x| x.report.status() == s).count();
    assert!(n(Status::Passed) >= 4 && n(Status::Failed) >= 2 && n(Status::Skipped) >= 1);
    assert!(e.iter().any(|x| x.report.checks.iter().any(|c| !c.passed)));
    assert!(e.iter().any(|x| x.report.vms.iter().any(|v| v.methods.len() > 1)), "a rollback with both methods");
}

#[test]
fn junit_has_a_case_per_scenario_and_says_what_failed_where() {
    let dir = fixture_dir();
    let e = entries(dir.path());
    let xml = report::junit::of(&e, Path::new("quiesce-reports")).to_string().unwrap();
    let back = quick_junit::Report::deserialize_from_str(&xml).unwrap();
    let cases = &back.test_suites[0].test_cases;
    assert_eq!(cases.len(), e.len());
    for (case, x) in cases.iter().zip(&e) {
        let r = &x.report;
        assert_eq!(case.name.as_str(), r.scenario);
        assert_eq!(case.classname.as_ref().map(|c| c.as_str()), Some(report::junit::CLASSNAME));
        match (&case.status, r.status()) {
            (TestCaseStatus::Success { .. }, Status::Passed) => {
                assert!(case.time.is_some_and(|t| t > Duration::from_secs(1)), "{}: {:?}", r.scenario, case.time)
            }
            (TestCaseStatus::Skipped { message: Some(m), .. }, Status::Skipped) => {
                assert_eq!(Some(m.as_str()), r.skipped.as_deref())
            }
            (TestCaseStatus::NonSuccess { kind: NonSuccessKind::Failure, message: Some(m), .. }, Status::Failed) => {
                let m = m.as_str();
                let first = r.first_failure().unwrap();
                assert!(m.starts_with(&first.headline()), "{m}");
                let vm = report::junit::vm_of(r);
                assert!(r.vms.iter().any(|v| vm.contains(&v.name)), "{vm}");
                assert!(m.contains(&format!("VM: {vm}")), "{m}");
                let evidence = match x.evidence.first() {
                    Some(ev) => format!("evidence: {}", Path::new("quiesce-reports").join(&ev.dir).display()),
                    None => "evidence: none kept".to_owned(),
                };
                assert!(m.contains(&evidence), "{m}");
            }
            (status, want) => panic!("{}: {status:?}, expected {want:?}", r.scenario),
        }
    }
}

/// Validates `quiesce report --junit` output with xmllint against Jenkins' JUnit schema.
/// quick-junit (like nextest) also writes the number of skipped tests on the root
/// `<testsuites>`, which GitHub's and GitLab's parsers read but that schema predates: the
/// test allows that one attribute, and checks that it is the only complaint of the schema
/// as published.
#[test]
fn junit_validates_against_the_junit_schema() {
    let Some(xmllint) = find_program(&["xmllint"]) else {
        eprintln!("skipped: xmllint is not installed (apt-get install libxml2-utils; ci/setup-debian.sh does)");
        return;
    };
    let dir = fixture_dir();
    let junit = dir.path().join("junit.xml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_quiesce"))
        .arg("report")
        .arg(dir.path())
        .arg("--junit")
        .arg(&junit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let xsd = std::fs::read_to_string(data().join("junit-10.xsd")).unwrap();
    let anchor = r#"<xs:attribute name="errors" type="xs:string" />
        </xs:complexType>
    </xs:element>

</xs:schema>"#;
    assert!(xsd.contains(anchor), "the schema's <testsuites> is not where this test expects it");
    let extended = xsd.replace(
        anchor,
        &anchor.replacen("/>", "/>\n            <xs:attribute name=\"skipped\" type=\"xs:string\" />", 1),
    );
    let extended_path = dir.path().join("junit-10-with-skipped.xsd");
    std::fs::write(&extended_path, extended).unwrap();
    let lint = |schema: &Path, file: &Path| {
        Tool::new(&xmllint, XMLLINT).arg("--noout").arg("--schema").arg(schema).arg(file).output().unwrap()
    };
    let ok = lint(&extended_path, &junit);
    assert_eq!(ok.code(), Some(0), "the JUnit file does not validate:\n{}", ok.stderr);
    let published = lint(&data().join("junit-10.xsd"), &junit);
    let complaints: Vec<&str> = published.stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(
        !complaints.is_empty() && complaints.iter().all(|l| l.contains("'testsuites'") && l.contains("'skipped'")),
        "{}",
        published.stderr
    );
    // The validator can say no: a test case without its name is refused.
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, std::fs::read_to_string(&junit).unwrap().replacen("<testcase name=", "<testcase nom=", 1))
        .unwrap();
    assert_ne!(lint(&extended_path, &bad).code(), Some(0));
}

/// The sections of the page, by scenario: (id, the serialized DOM of its section).
fn sections(dom: &str) -> Vec<(&str, &str)> {
    dom.split("<section ")
        .skip(1)
        .filter_map(|s| {
            let id = s.split("id=\"").nth(1)?.split('"').next()?;
            Some((id, s.split("</section>").next()?))
        })
        .collect()
}

#[test]
fn the_page_renders_in_a_real_browser() {
    let Some(chromium) = find_program(&["chromium", "chromium-browser", "google-chrome"]) else {
        eprintln!("skipped: no Chromium on PATH (apt-get install chromium; ci/setup-debian.sh does)");
        return;
    };
    let dir = fixture_dir();
    let e = entries(dir.path());
    let page = report::write_html(dir.path(), &e).unwrap();
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let browser = |extra: &[&str]| {
        Tool::new(&chromium, BROWSER)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .run()
            .unwrap()
    };
    let dom = browser(&["--dump-dom"]).stdout_text();

    // The untrusted description's markup stayed text: no element, no script ran.
    assert!(dom.contains("<title>quiesce report</title>"), "a script renamed the page");
    assert!(!dom.contains("<img") && !dom.contains("<script"), "markup from a report became elements");
    assert!(dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"));

    let secs = sections(&dom);
    assert_eq!(secs.len(), e.len(), "a section per scenario");
    for x in &e {
        let r: &ScenarioReport = &x.report;
        let (_, sec) = secs
            .iter()
            .find(|(_, s)| s.contains(&format!(">{}</h2>", r.scenario)))
            .unwrap_or_else(|| panic!("no section for {}", r.scenario));
        assert!(sec.contains(&format!("data-status=\"{}\"", r.status().as_str())), "{}", r.scenario);
        match r.status() {
            Status::Failed => assert!(sec.contains("class=\"problem\"") && sec.contains("First failure:"), "{sec}"),
            Status::Skipped => assert!(sec.contains(r.skipped.as_deref().unwrap()) && !sec.contains("<svg")),
            Status::Passed => assert!(!sec.contains("class=\"problem\"")),
        }
        for vm in r.vms.iter().filter(|v| r.steps.iter().any(|s| s.vm.as_deref() == Some(v.name.as_str()))) {
            let svg = sec
                .split(&format!("<svg class=\"timeline\" data-vm=\"{}\"", vm.name))
                .nth(1)
                .and_then(|s| s.split("</svg>").next())
                .unwrap_or_else(|| panic!("{}: no timeline of {}", r.scenario, vm.name));
            assert!(svg.contains("data-lane=\"steps\"") && svg.contains("<rect class=\"bar"), "{svg}");
            if r.steps.iter().any(|s| s.name == "PrepareForSnapshot") {
                assert!(svg.contains("data-lane=\"phases\"") && svg.contains("k-phase0"), "{}", r.scenario);
            }
            if vm.timings.as_ref().is_some_and(|t| t.freeze_window_ms.is_some()) {
                assert!(svg.contains("data-lane=\"freeze-window\"") && svg.contains("k-frozen"), "{}", r.scenario);
            }
            if vm.timings.as_ref().is_some_and(|t| t.downtime_ms.is_some()) {
                assert!(svg.contains("k-stopped"), "{}: saved-state downtime", r.scenario);
            }
            if r.restores_of(&vm.name).next().is_some() {
                assert!(svg.contains("data-lane=\"restore\""), "{}: {}", r.scenario, vm.name);
            }
        }
    }
    let killed = secs.iter().find(|(id, _)| *id == "s-qemu-killed-unexpectedly").unwrap().1;
    assert!(killed.contains("href=\"artifacts/qemu-killed-unexpectedly/doomed-Xq3T9a/\""), "{killed}");

    // A picture, for a person to look at: kept in the target folder.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    let _ = std::fs::remove_file(&shot);
    browser(&["--window-size=1280,4200", &format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank page compresses to a few KiB; the report's colours and text do not.
    assert!(png.len() > 50_000, "{} bytes: is the page blank?", png.len());
    eprintln!("screenshot: {}", shot.display());
}
