//! Disks the host cannot back up: pass-through disks (host_device or host_cdrom, or a `file`
//! node that is really a block device) and iSCSI disks. In Hyper-V they are invisible to the
//! host's VSS writer; they are excluded from the backup and reported, so the person knows
//! to back them up inside the guest. Found from QEMU's own block graph, or declared.

use std::os::unix::fs::FileTypeExt;

use qapi::qmp::query_named_block_nodes;
use serde::Serialize;

use crate::qemu::{Machine, MachineError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    PassThrough,
    Iscsi,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Excluded {
    pub vm: String,
    pub disk: String,
    pub kind: Kind,
    /// How it was found: QEMU's block graph, or the scenario's declaration.
    pub found_by: String,
    pub advice: &'static str,
}

pub const ADVICE: &str = "back this up inside the guest";

/// Classifies a block node of `query-named-block-nodes` by its driver (`drv`, QEMU's own
/// name for it) and the file it opens.
pub fn classify(drv: &str, file: &str) -> Option<Kind> {
    match drv {
        "host_device" | "host_cdrom" => Some(Kind::PassThrough),
        "iscsi" => Some(Kind::Iscsi),
        "file" => {
            let meta = std::fs::metadata(file).ok()?;
            meta.file_type().is_block_device().then_some(Kind::PassThrough)
        }
        _ => None,
    }
}

/// The disks of `m` that its block graph shows to be pass-through or iSCSI, and those
/// `declared` as iSCSI LUNs.
pub async fn find(m: &Machine, declared_iscsi: &[String]) -> Result<Vec<Excluded>, MachineError> {
    let nodes = m
        .qmp()
        .execute_within(query_named_block_nodes { flat: Some(true) }, crate::sys::deadline::QMP_COMMAND)
        .await
        .map_err(|e| m.qmp_err(e))?;
    let mut out = Vec::new();
    for d in &m.config().disks {
        if declared_iscsi.contains(&d.node_name) {
            out.push(Excluded {
                vm: m.name().to_owned(),
                disk: d.node_name.clone(),
                kind: Kind::Iscsi,
                found_by: "declared an iSCSI LUN in the scenario".into(),
                advice: ADVICE,
            });
            continue;
        }
        // The disk's own node and its protocol child.
        let names = [d.node_name.clone(), format!("{}-file", d.node_name)];
        let kind = nodes
            .iter()
            .filter(|n| n.node_name.as_ref().is_some_and(|x| names.contains(x)))
            .find_map(|n| classify(&n.drv, &n.file));
        if let Some(kind) = kind {
            out.push(Excluded {
                vm: m.name().to_owned(),
                disk: d.node_name.clone(),
                kind,
                found_by: "QEMU's block graph".into(),
                advice: ADVICE,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_block_graph_nodes() {
        assert_eq!(classify("host_device", "/dev/sdb"), Some(Kind::PassThrough));
        assert_eq!(classify("host_cdrom", "/dev/sr0"), Some(Kind::PassThrough));
        assert_eq!(classify("iscsi", "iscsi://10.0.0.1/iqn.x/0"), Some(Kind::Iscsi));
        assert_eq!(classify("qcow2", "/x.qcow2"), None);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(classify("file", tmp.path().to_str().unwrap()), None, "a regular file is not pass-through");
        assert_eq!(classify("file", "/dev/null"), None, "a character device is not a disk");
    }
}
