//! `quiesce bench saved-state` (to be written).

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub accel: Option<crate::qemu::accel::AccelChoice>,
    /// Guest RAM to fill, in MiB.
    pub memory_mib: u32,
    /// Where state files and dd output go (the filesystem being measured).
    pub work_dir: std::path::PathBuf,
    /// Run the libvirt comparison (needs libvirt installed; its daemon is started by hand).
    pub libvirt: bool,
}

pub async fn run(_opts: &BenchOptions, _progress: &mut dyn FnMut(&str)) -> Result<String, Box<dyn std::error::Error>> {
    Err("not written yet".into())
}
