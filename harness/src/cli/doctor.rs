use super::progress::Progress;
use super::CliResult;
use quiesce::image::recipe;
use quiesce::qemu::caps::{self, Capabilities};
use quiesce::qemu::compat::Feature;
use quiesce::qemu::config::default_qemu_binary;
use quiesce::qemu::programs::{self, QemuProgram};
use quiesce::sys::{deadline, Tool};
use quiesce::testguest::accel_for;

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// The first line of `program --version`, or why there is none.
fn version_of(program: QemuProgram) -> Result<String, String> {
    let out = Tool::new(program.path(), deadline::QEMU_VERSION).arg("--version").run().map_err(|e| e.to_string())?;
    let text = out.stdout_text();
    Ok(text.lines().next().unwrap_or("").trim().to_owned())
}

/// The `x.y.z` in a `--version` line.
fn version_number(line: &str) -> Option<&str> {
    line.split_whitespace().skip_while(|w| *w != "version").nth(1)
}

pub async fn run(
    accel: Option<quiesce::qemu::accel::AccelChoice>,
    no_build: bool,
    report_dir: &std::path::Path,
) -> CliResult {
    let qemu = default_qemu_binary();
    let mut p = Progress::new();
    p.step("asking QEMU what it can do");
    let caps = caps::probe(&qemu).await;
    let image = if no_build {
        recipe::cached("linux")?
    } else {
        p.step("making sure the linux guest image is built");
        Some(tokio::task::block_in_place(|| recipe::ensure("linux", false, &mut |s| p.step(s)))?)
    };
    let verdict = match &image {
        Some(img) => {
            p.step("choosing the accelerator");
            Some(tokio::task::block_in_place(|| accel_for(img, accel))?)
        }
        None => None,
    };
    p.finish();
    let mut ok = true;
    match &caps {
        Ok(c) => {
            println!("qemu          {qemu} {} ({})", c.version, c.package);
            ok &= print_programs(&c.version);
            print_caps(c);
            ok &= print_limits(c);
        }
        Err(e) => {
            println!("qemu          {qemu}: {e}");
            println!("              nothing will work without it: install QEMU (sh ci/setup-debian.sh), or point $QUIESCE_QEMU at one");
            ok = false;
        }
    }
    match &verdict {
        Some(v) => println!(
            "accelerator   {} — {}{}",
            v.accel.as_str().to_uppercase(),
            v.reason,
            if v.cached { " (cached verdict)" } else { "" }
        ),
        None => println!("accelerator   undetermined: auto probes KVM by booting the guest kernel, which is not built"),
    }
    match &image {
        Some(img) => println!(
            "image cache   linux {} built in {} (guest kernel {})",
            img.key,
            img.dir.display(),
            img.kernel_release().unwrap_or_else(|| "unknown".into())
        ),
        None => {
            println!("image cache   linux {} not built (run `quiesce image build linux`)", recipe::recipe_key("linux")?)
        }
    }
    match quiesce::image::windows::cache::latest() {
        Some(w) => {
            println!("              windows {} built in {} ({})", w.info.input_key, w.dir.display(), w.info.edition)
        }
        None => println!(
            "              windows not built (Windows scenarios are skipped); on a KVM host run `{}`",
            quiesce::image::windows::BUILD_COMMAND
        ),
    }
    println!("cache folder  {}", quiesce::image::cache::cache_dir().display());
    // Runs a killed quiesce left behind (SIGKILL: no undo ran); each is removed here.
    let work = report_dir.join("work");
    let leftovers = quiesce::scenario::stale::sweep(&work);
    if leftovers.is_empty() {
        println!("leftovers     none in {}", work.display());
    }
    for left in &leftovers {
        println!("leftovers     {left}");
        if !matches!(left.outcome, quiesce::scenario::stale::Swept::Removed) {
            ok = false;
        }
    }
    ok &= print_journals();
    ok &= super::backup::libvirt::print_journals().await;
    Ok(if ok { 0 } else { super::EXIT_FAILED })
}

/// The recovery journals a killed `quiesce backup --qmp` left (read only: nothing is undone
/// or removed here); false if one names a VM that still runs, whose leftovers need undoing.
fn print_journals() -> bool {
    use quiesce::backup::recovery::{self, Liveness};
    let (dir, journals) = match recovery::list() {
        Ok(found) => found,
        Err(e) => {
            println!("journals      {e}");
            return true;
        }
    };
    if journals.is_empty() {
        println!("journals      none in {}", dir.display());
    }
    let mut ok = true;
    for (path, r) in journals {
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                println!("journal       {e}");
                continue;
            }
        };
        let vm = format!("VM {} (QMP {}, pid {})", r.vm.name, r.vm.qmp.display(), r.vm.pid);
        let run = format!("`quiesce backup --qmp {}`", r.vm.qmp.display());
        let file = path.display();
        match r.vm.liveness() {
            Liveness::Live => {
                ok = false;
                println!("journal       {vm}: live, left by a killed quiesce (pid {}): {}", r.writer_pid, r.left);
                println!("              the next {run} undoes it first ({file})");
            }
            Liveness::Gone => {
                println!("journal       {vm}: stale, its QEMU is gone (it named: {})", r.left);
                println!("              the next {run} removes it, touching no VM ({file})");
            }
            Liveness::OtherProcess => {
                println!("journal       {vm}: stale, pid {} is another process now (it named: {})", r.vm.pid, r.left);
                println!("              the next {run} removes it, touching no VM ({file})");
            }
        }
    }
    ok
}

/// The QEMU tools and their versions; false if one is missing. A tool of another version
/// than the emulator is worth a word: the two are meant to be used together.
fn print_programs(emulator_version: &str) -> bool {
    let mut ok = true;
    for prog in [QemuProgram::Img, QemuProgram::Io, QemuProgram::StorageDaemon] {
        let path = prog.path();
        match version_of(prog) {
            Ok(line) => {
                let v = version_number(&line).unwrap_or("?");
                let note = if v == emulator_version {
                    String::new()
                } else {
                    format!(" (not the emulator's {emulator_version})")
                };
                println!("{:<13} {} {v}{note}", prog.name().trim_start_matches("qemu-"), path.display());
            }
            Err(e) => {
                println!("{:<13} MISSING: {e}", prog.name().trim_start_matches("qemu-"));
                println!("              set ${} or install it (sh ci/setup-debian.sh)", prog.env());
                ok = false;
            }
        }
    }
    if let Some(d) = programs::datadir() {
        println!("firmware      {} (${})", d.display(), programs::DATADIR_ENV);
    }
    ok
}

fn print_caps(c: &Capabilities) {
    if let Some(r) = c.profile {
        let hidden: Vec<&str> = c.hidden.iter().map(|f| f.name()).collect();
        println!(
            "profile       QEMU {r} (${}): {}",
            quiesce::qemu::compat::ENV,
            if hidden.is_empty() {
                "hides nothing this QEMU has".to_owned()
            } else {
                format!("hides {}", hidden.join(", "))
            }
        );
    }
    println!(
        "capabilities  file: migration {}, mapped-ram {}, multifd {}, blockdev-snapshot {}, block-commit {}, transaction {}, blockdev-set-active {}, node activity {}",
        yes(c.file_migration),
        yes(c.mapped_ram),
        yes(c.multifd),
        yes(c.blockdev_snapshot),
        yes(c.block_commit),
        yes(c.transaction),
        yes(c.blockdev_set_active),
        yes(c.node_activity)
    );
}

/// What will not work, or works otherwise, with what this QEMU lacks; false if a backup
/// method cannot be used at all.
fn print_limits(c: &Capabilities) -> bool {
    let mut ok = true;
    let snapshot_missing: Vec<&str> =
        [("blockdev-snapshot", c.blockdev_snapshot), ("block-commit", c.block_commit), ("transaction", c.transaction)]
            .iter()
            .filter(|(_, has)| !has)
            .map(|(n, _)| *n)
            .collect();
    if !snapshot_missing.is_empty() {
        println!("WILL NOT WORK Child VM Snapshot: this QEMU has no {}", snapshot_missing.join(", "));
        ok = false;
    }
    for f in Feature::ALL.into_iter().filter(|f| !c.has(*f)) {
        let (label, fatal) = match f {
            Feature::FileMigration => ("WILL NOT WORK", true),
            _ => ("works without", false),
        };
        println!("{label:<13} {} (QEMU {}+): {}", f.name(), f.since(), f.without());
        ok &= !fatal;
    }
    if snapshot_missing.is_empty() && !c.file_migration {
        println!("works         Child VM Snapshot; a VM it cannot take (paused, no agent...) is refused, not saved");
    }
    if !ok {
        println!("              quiesce is developed on QEMU 10.0; on Debian 12 take it from bookworm-backports (sh ci/setup-debian.sh)");
    }
    ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_numbers_are_read_from_version_lines() {
        assert_eq!(super::version_number("qemu-img version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u16)"), Some("7.2.15"));
        assert_eq!(super::version_number("QEMU emulator version 10.0.2"), Some("10.0.2"));
        assert_eq!(super::version_number("nothing here"), None);
    }
}
