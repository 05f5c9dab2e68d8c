use clap::Subcommand;

use super::progress::Progress;
use super::CliResult;
use quiesce::image::recipe;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build a guest image into the cache (rebuilds it if it is there already).
    Build {
        /// The recipe: a folder name under guest-images/ (e.g. linux).
        recipe: String,
    },
    /// Print the cache folder of a built image, or fail if it is not built.
    Path { recipe: String },
}

pub async fn run(cmd: ImageCommand) -> CliResult {
    match cmd {
        ImageCommand::Build { recipe: name } => {
            let mut p = Progress::new();
            p.step(&format!("building guest image {name}"));
            let img = tokio::task::block_in_place(|| recipe::ensure(&name, true, &mut |s| p.step(s)))?;
            p.finish();
            println!("built {} ({}) in {}", img.recipe, img.key, img.dir.display());
            Ok(0)
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
