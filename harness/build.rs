//! Embeds the guest image recipes (guest-images/*/) in the binary, so `quiesce` can build
//! and key its image cache from anywhere, and a changed recipe means a new cache key.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).expect("read recipe dir").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_none_or(|e| e != "md") {
            // READMEs document the recipe; they are not part of it.
            out.push(p);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut code = String::from(
        "/// (relative path, bytes) of each file of a recipe.\npub type RecipeFiles = &'static [(&'static str, &'static [u8])];\n/// (recipe, files) for each guest image recipe.\npub static RECIPES: &[(&str, RecipeFiles)] = &[\n",
    );
    let mut recipes: Vec<_> =
        std::fs::read_dir(&root).expect("guest-images/").map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    recipes.sort();
    for dir in recipes {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut list = Vec::new();
        files(&dir, &mut list);
        writeln!(code, "    ({name:?}, &[").unwrap();
        for f in list {
            println!("cargo:rerun-if-changed={}", f.display());
            let rel = f.strip_prefix(&dir).unwrap().to_string_lossy().into_owned();
            let abs = f.canonicalize().unwrap();
            writeln!(code, "        ({rel:?}, include_bytes!({:?})),", abs.to_string_lossy()).unwrap();
        }
        code.push_str("    ]),\n");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("recipes.rs");
    std::fs::write(out, code).unwrap();
}
