use super::progress::Progress;
use super::CliResult;
use quiesce::image::recipe;
use quiesce::qemu::{caps, config::default_qemu_binary};
use quiesce::testguest::accel_for;

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
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
            println!(
                "capabilities  file: migration {}, mapped-ram {}, multifd {}, blockdev-snapshot {}, block-commit {}, transaction {}",
                yes(c.file_migration), yes(c.mapped_ram), yes(c.multifd), yes(c.blockdev_snapshot), yes(c.block_commit), yes(c.transaction)
            );
            if !c.mapped_ram {
                println!("              (no mapped-ram: Saved State uses the plain stream format)");
            }
            if !c.file_migration || !c.block_commit || !c.blockdev_snapshot || !c.transaction {
                println!(
                    "              quiesce needs QEMU 8.2 or newer; on Debian 12 take 10.0 from bookworm-backports"
                );
                ok = false;
            }
        }
        Err(e) => {
            println!("qemu          {qemu}: {e}");
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
    Ok(if ok { 0 } else { super::EXIT_FAILED })
}
