//! What the QEMU in use can do, asked of QEMU itself over QMP rather than assumed from its
//! version: Ubuntu 24.04's 8.2 has `file:` migration but no mapped-ram, Debian 12's own 7.2
//! has neither. A compatibility profile ([`super::compat`]) then takes away what the
//! release it names did not have.

use std::os::fd::AsRawFd;

use serde::Serialize;
use serde_json::Value;

use super::compat::{self, CompatError, Feature, QemuRelease};
use super::process::QemuProcess;
use super::qmp::{Qmp, QmpError};
use super::transcript::Transcript;
use crate::sys::deadline;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Capabilities {
    pub version: String,
    pub package: String,
    /// Migration to a `file:` URI (QEMU 8.2+).
    pub file_migration: bool,
    /// The mapped-ram migration capability (QEMU 9.0+): a fixed-offset state file.
    pub mapped_ram: bool,
    pub multifd: bool,
    pub blockdev_snapshot: bool,
    pub block_commit: bool,
    pub transaction: bool,
    /// `blockdev-set-active` (QEMU 10.0+): reactivates disks after a save without running the VM.
    pub blockdev_set_active: bool,
    /// `query-named-block-nodes` says whether each node is active (QEMU 10.0+).
    pub node_activity: bool,
    pub migrate_capabilities: Vec<String>,
    /// The compatibility profile applied, if any: the release this QEMU is taken for.
    pub profile: Option<QemuRelease>,
    /// What this QEMU has but the profile hides.
    pub hidden: Vec<Feature>,
}

impl Capabilities {
    /// Whether quiesce may use `feature` with this QEMU (and profile).
    pub fn has(&self, feature: Feature) -> bool {
        match feature {
            Feature::FileMigration => self.file_migration,
            Feature::MappedRam => self.mapped_ram,
            Feature::MultifdToFile => self.mapped_ram && self.multifd,
            Feature::BlockdevSetActive => self.blockdev_set_active,
            Feature::NodeActivity => self.node_activity,
        }
    }

    /// What a QEMU of `release` would have: every feature that came after it is taken away
    /// (and listed in `hidden` if this QEMU has it). None leaves everything as probed.
    pub fn limited_to(mut self, release: Option<QemuRelease>) -> Self {
        let Some(r) = release else { return self };
        self.profile = Some(r);
        let had: Vec<Feature> = Feature::ALL.into_iter().filter(|f| self.has(*f)).collect();
        for f in had {
            if compat::allows_in(release, f) {
                continue;
            }
            self.hidden.push(f);
            match f {
                Feature::FileMigration => self.file_migration = false,
                Feature::MappedRam => self.mapped_ram = false,
                // multifd itself is older; to a file it needs mapped-ram, taken away above.
                Feature::MultifdToFile => {}
                Feature::BlockdevSetActive => self.blockdev_set_active = false,
                Feature::NodeActivity => self.node_activity = false,
            }
        }
        if !self.mapped_ram {
            self.migrate_capabilities.retain(|c| c != "mapped-ram");
        }
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// QEMU could not be started: it is not installed, or not at that path.
    #[error("could not start {program} to probe its capabilities: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// QEMU started but did not answer its monitor's questions as expected. Its QMP
    /// transcript, its output and its command line are kept in `evidence`.
    #[error("probing QEMU capabilities: {source} (the probe's transcript, output and command line: {evidence})")]
    Qmp { source: QmpError, evidence: String },
    /// A temporary folder or socket for the probe could not be made.
    #[error("probing QEMU capabilities: {0}")]
    Io(#[from] std::io::Error),
    /// The compatibility profile asked for (`QUIESCE_QEMU_COMPAT`) is not a QEMU release.
    #[error("QEMU compatibility profile: {0}")]
    Compat(#[from] CompatError),
}

/// Starts a machine-less QEMU and asks it, then applies the compatibility profile in force.
pub async fn probe(qemu: &str) -> Result<Capabilities, CapsError> {
    let profile = compat::profile()?;
    Ok(probe_qemu(qemu).await?.limited_to(profile))
}

/// What each QEMU binary has, probed once per process: a binary does not change under a
/// running quiesce, and `quiesce run` asked again for every scenario, starting a QEMU each
/// time. A failed probe is not kept; the next caller probes again.
static PROBED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Capabilities>>> =
    std::sync::OnceLock::new();

/// What the QEMU at `qemu` itself has, whatever profile is in force.
pub async fn probe_qemu(qemu: &str) -> Result<Capabilities, CapsError> {
    let probed = PROBED.get_or_init(Default::default);
    if let Some(c) = probed.lock().unwrap_or_else(|e| e.into_inner()).get(qemu) {
        return Ok(c.clone());
    }
    let caps = probe_once(qemu).await?;
    probed.lock().unwrap_or_else(|e| e.into_inner()).insert(qemu.to_owned(), caps.clone());
    Ok(caps)
}

/// Starts a machine-less QEMU and asks it.
async fn probe_once(qemu: &str) -> Result<Capabilities, CapsError> {
    let dir = tempfile::Builder::new().prefix("quiesce-caps-").tempdir()?;
    let path = dir.path().join("qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let stream = std::os::unix::net::UnixStream::connect(&path)?;
    let args: Vec<String> = [
        "-M",
        "none",
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", listener.as_raw_fd()),
        "-mon",
        "chardev=qmp,mode=control",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cmdline = crate::sys::shell_line(qemu, &args);
    let mut proc = QemuProcess::spawn(qemu, &args, &[listener.as_raw_fd()], &dir.path().join("qemu.out"))
        .map_err(|source| CapsError::Spawn { program: qemu.to_owned(), source })?;
    drop(listener);
    stream.set_nonblocking(true)?;
    let transcript = Transcript::create(&dir.path().join("transcript.log"))?;
    let t = deadline::QMP_COMMAND;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let result = async {
        let qmp = Qmp::connect(stream, transcript, deadline::qmp_connect()).await?;
        let version = qmp.execute_raw("query-version", Value::Null, t).await?;
        let schema = qmp.execute_raw("query-qmp-schema", Value::Null, t).await?;
        let migrate = qmp.execute_raw("query-migrate-capabilities", Value::Null, t).await?;
        Ok::<_, QmpError>(from_replies(&version, &schema, &migrate))
    }
    .await;
    proc.terminate(deadline::QEMU_QUIT);
    result.map_err(|source| {
        // The probe's folder is kept, with the command line beside the transcript and
        // QEMU's output: a QEMU that does not answer is rare and must say why.
        let _ = std::fs::write(dir.path().join("cmdline.sh"), format!("{cmdline}\n"));
        let evidence = dir.keep().display().to_string();
        CapsError::Qmp { source, evidence }
    })
}

/// Pure: the capabilities from QEMU's replies (unit tested with recorded replies).
pub fn from_replies(version: &Value, schema: &Value, migrate: &Value) -> Capabilities {
    let q = &version["qemu"];
    let v = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
    let entries = schema.as_array().map(Vec::as_slice).unwrap_or(&[]);
    let has_command = |name: &str| entries.iter().any(|e| e["meta-type"] == "command" && e["name"] == name);
    // Type names are masked in query-qmp-schema; the migration address enum is the one
    // listing these transports side by side.
    let file_migration = entries.iter().any(|e| {
        let vals: Vec<&str> =
            e["values"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        e["meta-type"] == "enum" && vals.contains(&"file") && vals.contains(&"exec") && vals.contains(&"socket")
    });
    let migrate_capabilities: Vec<String> = migrate
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["capability"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let has_cap = |c: &str| migrate_capabilities.iter().any(|x| x == c);
    // Member names are not masked: the object with a node's `backing_file_depth` is the
    // one that gained `active` in 10.0.
    let node_activity = entries.iter().any(|e| {
        let members: Vec<&str> =
            e["members"].as_array().map(|a| a.iter().filter_map(|m| m["name"].as_str()).collect()).unwrap_or_default();
        e["meta-type"] == "object" && members.contains(&"backing_file_depth") && members.contains(&"active")
    });
    Capabilities {
        version: v,
        package: version["package"].as_str().unwrap_or("").trim().to_owned(),
        file_migration,
        mapped_ram: has_cap("mapped-ram"),
        multifd: has_cap("multifd"),
        blockdev_snapshot: has_command("blockdev-snapshot"),
        block_commit: has_command("block-commit"),
        transaction: has_command("transaction"),
        blockdev_set_active: has_command("blockdev-set-active"),
        node_activity,
        migrate_capabilities,
        profile: None,
        hidden: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_probe_that_gets_no_answer_keeps_its_evidence_and_is_not_remembered() {
        // `true` exits at once: the connection closes with no greeting, as a QEMU that dies
        // at start-up would leave it.
        for _ in 0..2 {
            let e = probe_qemu("true").await.unwrap_err();
            let CapsError::Qmp { evidence, .. } = &e else { panic!("{e:?}") };
            let dir = std::path::Path::new(evidence);
            let cmdline = std::fs::read_to_string(dir.join("cmdline.sh")).unwrap();
            assert!(cmdline.starts_with("true -M none"), "{cmdline}");
            assert!(dir.join("transcript.log").exists() && dir.join("qemu.out").exists(), "{e}");
            assert!(e.to_string().contains(evidence.as_str()), "{e}");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn qemu_8_2_like_replies_have_no_mapped_ram() {
        let version = json!({"qemu": {"major": 8, "minor": 2, "micro": 2}, "package": "Debian 1:8.2.2"});
        let schema = json!([
            {"name": "block-commit", "meta-type": "command"},
            {"name": "blockdev-snapshot", "meta-type": "command"},
            {"name": "42", "meta-type": "enum", "values": ["socket", "exec", "rdma", "file"]}
        ]);
        let migrate = json!([{"capability": "multifd", "state": false}, {"capability": "xbzrle", "state": false}]);
        let c = from_replies(&version, &schema, &migrate);
        assert_eq!(c.version, "8.2.2");
        assert!(c.file_migration && c.multifd && c.block_commit && c.blockdev_snapshot);
        assert!(!c.mapped_ram && !c.transaction);
    }

    /// QEMU 10.0's answers, cut down to what the probe reads.
    fn qemu_10() -> Capabilities {
        let version = json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "Debian 1:10.0.2"});
        let schema = json!([
            {"name": "block-commit", "meta-type": "command"},
            {"name": "blockdev-snapshot", "meta-type": "command"},
            {"name": "transaction", "meta-type": "command"},
            {"name": "blockdev-set-active", "meta-type": "command"},
            {"name": "42", "meta-type": "enum", "values": ["socket", "exec", "rdma", "file"]},
            {"name": "7", "meta-type": "object", "members": [{"name": "backing_file_depth"}, {"name": "active"}]}
        ]);
        let migrate = json!([{"capability": "multifd"}, {"capability": "mapped-ram"}, {"capability": "events"}]);
        from_replies(&version, &schema, &migrate)
    }

    #[test]
    fn qemu_10_has_everything_and_an_8_2_profile_takes_back_what_came_after() {
        let c = qemu_10();
        assert!(Feature::ALL.iter().all(|f| c.has(*f)), "{c:?}");
        assert_eq!(c.clone().limited_to(None), c);
        let old = c.limited_to(Some(QemuRelease::new(8, 2)));
        assert!(old.file_migration && old.multifd && old.block_commit && old.transaction);
        assert!(!old.mapped_ram && !old.blockdev_set_active && !old.node_activity);
        assert!(!old.has(Feature::MultifdToFile));
        assert!(!old.migrate_capabilities.iter().any(|c| c == "mapped-ram"), "{:?}", old.migrate_capabilities);
        assert_eq!(old.profile, Some(QemuRelease::new(8, 2)));
        assert_eq!(
            old.hidden,
            [Feature::MappedRam, Feature::MultifdToFile, Feature::BlockdevSetActive, Feature::NodeActivity]
        );
        // The version stays the real one: reports say which QEMU ran, and under which profile.
        assert_eq!(old.version, "10.0.2");
    }

    #[test]
    fn a_profile_cannot_add_what_qemu_lacks() {
        let version = json!({"qemu": {"major": 8, "minor": 2, "micro": 2}});
        let c = from_replies(&version, &json!([]), &json!([]));
        let same = c.clone().limited_to(Some(QemuRelease::new(10, 0)));
        assert!(!same.file_migration && !same.mapped_ram && same.hidden.is_empty());
    }

    #[test]
    fn odd_replies_do_not_panic() {
        let c = from_replies(&json!(null), &json!({"x": 1}), &json!("nope"));
        assert!(!c.file_migration && !c.mapped_ram);
    }
}
