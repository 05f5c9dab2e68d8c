//! What a failed machine leaves behind for the person reading the failure: the serial log,
//! the QMP and agent transcript, QEMU's own output, the command line, and `qemu-img info`
//! of each disk.

use super::config::MachineConfig;
use super::programs::QemuProgram;
use crate::sys::{deadline, Tool};
use std::path::{Path, PathBuf};

/// Copies the evidence of one machine into a fresh folder under the config's artifacts
/// folder and returns that folder.
pub fn keep(cfg: &MachineConfig, run_dir: &Path, cmdline: &str, why: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(&cfg.artifacts_dir)?;
    let dir = tempfile::Builder::new().prefix(&format!("{}-", cfg.name)).tempdir_in(&cfg.artifacts_dir)?.keep();
    for name in ["serial.log", "transcript.log", "qemu.out"] {
        let from = run_dir.join(name);
        if from.exists() {
            std::fs::copy(&from, dir.join(name))?;
        }
    }
    std::fs::write(dir.join("cmdline.sh"), format!("{cmdline}\n"))?;
    std::fs::write(dir.join("why.txt"), format!("{why}\n"))?;
    let mut info = String::new();
    for d in &cfg.disks {
        info.push_str(&format!("== {} ({})\n", d.node_name, d.path.display()));
        // -U: QEMU may still hold its image lock if it could not be stopped.
        let run = Tool::new(QemuProgram::Img.path(), deadline::QEMU_IMG_METADATA)
            .args(["info", "-U", "--backing-chain"])
            .arg(&d.path);
        match run.output() {
            Ok(o) => {
                info.push_str(&o.stdout_text());
                info.push_str(&o.stderr);
            }
            Err(e) => info.push_str(&format!("{e}\n")),
        }
    }
    std::fs::write(dir.join("qemu-img-info.txt"), info)?;
    Ok(dir)
}
