use std::path::PathBuf;

use clap::Subcommand;

use super::progress::Progress;
use super::CliResult;
use quiesce::image::recipe;
use quiesce::qemu::accel::AccelChoice;
use quiesce::windows::build::{self, BuildOptions, Built, Step};
use quiesce::windows::install;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a guest image into the cache (rebuilds it if it is there already).
    ///
    /// `windows` builds the Windows test guest from your own ISOs:
    /// `quiesce image build windows --iso WIN.iso --virtio-win VIRTIO.iso [--edition NAME]`.
    /// It needs a KVM host (20-60 min); it refuses TCG unless --accel tcg is given.
    Build {
        /// The recipe: a folder name under guest-images/ (linux, windows).
        recipe: String,
        /// windows: the Windows installation ISO (a Server evaluation ISO needs no key).
        #[arg(long, value_name = "WIN.iso")]
        iso: Option<PathBuf>,
        /// windows: the virtio-win ISO (drivers, guest tools, qemu-ga).
        #[arg(long, value_name = "VIRTIO.iso")]
        virtio_win: Option<PathBuf>,
        /// windows: the edition to install (its name, display name or index in
        /// sources/install.wim); by default the first Server Standard edition.
        #[arg(long, value_name = "NAME")]
        edition: Option<String>,
        /// windows: check the ISOs and build the provisioning CD, print QEMU's command
        /// line, and boot nothing.
        #[arg(long)]
        dry_run: bool,
        /// windows: how long the install may take, in minutes.
        #[arg(long, value_name = "MINUTES", default_value_t = 120)]
        deadline_min: u64,
    },
    /// Print the cache folder of a built image, or fail if it is not built.
    Path { recipe: String },
}

pub async fn run(cmd: ImageCommand, accel: Option<AccelChoice>) -> CliResult {
    match cmd {
        ImageCommand::Build { recipe: name, iso, virtio_win, edition, dry_run, deadline_min } => {
            if name == quiesce::image::windows::RECIPE {
                let (Some(windows_iso), Some(virtio_iso)) = (iso, virtio_win) else {
                    eprintln!(
                        "quiesce: the Windows image is built from your ISOs: {}",
                        quiesce::image::windows::BUILD_COMMAND
                    );
                    return Ok(super::EXIT_USAGE);
                };
                let opts = BuildOptions {
                    windows_iso,
                    virtio_iso,
                    edition,
                    accel,
                    deadline: std::time::Duration::from_secs(deadline_min * 60),
                    dry_run,
                    artifacts_dir: quiesce::qemu::config::default_artifacts_dir(),
                };
                return build_windows(&opts).await;
            }
            if iso.is_some() || virtio_win.is_some() || edition.is_some() || dry_run {
                eprintln!("quiesce: --iso, --virtio-win, --edition and --dry-run are for `image build windows` only");
                return Ok(super::EXIT_USAGE);
            }
            let mut p = Progress::new();
            p.step(&format!("building guest image {name}"));
            let img = tokio::task::block_in_place(|| recipe::ensure(&name, true, &mut |s| p.step(s)))?;
            p.finish();
            println!("built {} ({}) in {}", img.recipe, img.key, img.dir.display());
            Ok(0)
        }
        ImageCommand::Path { recipe: name } if name == quiesce::image::windows::RECIPE => {
            match quiesce::image::windows::cache::latest() {
                Some(img) => {
                    println!("{}", img.dir.display());
                    Ok(0)
                }
                None => {
                    eprintln!(
                        "quiesce: no Windows guest image is built; run `{}`",
                        quiesce::image::windows::BUILD_COMMAND
                    );
                    Ok(super::EXIT_FAILED)
                }
            }
        }
        ImageCommand::Path { recipe: name } => match recipe::cached(&name)? {
            Some(img) => {
                println!("{}", img.dir.display());
                Ok(0)
            }
            None => {
                eprintln!("quiesce: guest image {name} is not built; run `quiesce image build {name}`");
                Ok(super::EXIT_FAILED)
            }
        },
    }
}

/// Builds the Windows image, showing the phase, each serial line of the guest as it
/// comes, and the elapsed time against the deadline.
async fn build_windows(opts: &BuildOptions) -> CliResult {
    let mut p = Progress::new();
    let mut last = String::from("starting");
    let built = build::build(opts, &mut |step| match step {
        Step::Phase(what) => {
            p.step(&what);
            last = what;
        }
        Step::Install(install::Progress::Serial(line)) => {
            p.finish();
            eprintln!("  guest: {line}");
        }
        Step::Install(install::Progress::Elapsed { elapsed, deadline }) => {
            p.step(&format!("{last} — {} of {} min", elapsed.as_secs() / 60, deadline.as_secs() / 60));
        }
    })
    .await;
    p.finish();
    match built? {
        Built::DryRun(d) => {
            println!("edition       {} (build {})", d.edition.name, d.edition.build.unwrap_or(0));
            println!("drivers       virtio-win {}", d.os);
            println!("media         {}", d.media.display());
            if let Some(why) = &d.would_refuse {
                println!("note          a real run would stop here: {why}");
            }
            println!("qemu (not started: --dry-run)\n{}", d.command_line);
            Ok(0)
        }
        Built::Image(img) => {
            println!("built windows ({}) in {}", img.info.edition, img.dir.display());
            println!("guest said: {}", img.info.ready_line);
            Ok(0)
        }
    }
}
