//! The conditions' Windows cases: what a Windows guest's agent adds to conditions 1 and 4.
//!
//! - Condition 1 (the agent can freeze) also needs VSS: a Windows agent whose VSS failed to
//!   initialise answers and lists the freeze commands, and still cannot freeze. Its
//!   `guest-fsfreeze-status` says so, and the condition fails in the agent's own words.
//! - Condition 4 (basic disks only), guest side: qemu-ga's `guest-get-disks` says nothing
//!   of dynamic disks on Windows, so the guest's storage stack is asked through PowerShell
//!   (`Get-Partition`, `Get-Disk`): a partition of MBR type 0x42 or of an LDM GPT type on
//!   one of the VM's disks makes it dynamic.
//!
//! Pure functions over typed replies, like the Linux cases. NEVER RUN AGAINST A LIVE
//! WINDOWS GUEST: the replies are built from qemu-ga's Windows code and PowerShell's
//! documented output, and replayed by a scripted agent in the tests.

use std::time::Duration;

use serde::Deserialize;

use super::Finding;
use crate::backup::vss::VssError;

/// `guest-get-osinfo`'s `id` on Windows.
pub const WINDOWS_ID: &str = "mswindows";

/// How long the partition query may take: PowerShell alone takes seconds to start.
pub const QUERY_DEADLINE: Duration = Duration::from_secs(120);

/// The PowerShell query for the guest's partitions, one JSON array.
pub const PARTITIONS_QUERY: &str = "$p = @(Get-Partition | ForEach-Object { $d = Get-Disk -Number $_.DiskNumber; \
     [pscustomobject]@{ Disk = $_.DiskNumber; Partition = $_.PartitionNumber; Serial = $d.SerialNumber; \
     Style = [string]$d.PartitionStyle; MbrType = $_.MbrType; GptType = $_.GptType } }); \
     ConvertTo-Json -Compress -InputObject $p";

const LDM_METADATA: &str = "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3";
const LDM_DATA: &str = "af9b60a0-1431-4f62-bc68-3311714a69ad";
const MBR_DYNAMIC: u32 = 0x42;

/// One partition, as [`PARTITIONS_QUERY`] prints it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WinPartition {
    pub disk: u32,
    pub partition: u32,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub style: Option<String>,
    #[serde(default)]
    pub mbr_type: Option<u32>,
    #[serde(default)]
    pub gpt_type: Option<String>,
}

/// Reads [`PARTITIONS_QUERY`]'s output; anything else is an error that says what it was.
pub fn parse_partitions(json: &str) -> Result<Vec<WinPartition>, String> {
    let text = json.trim();
    let text = if text.is_empty() { "[]" } else { text };
    serde_json::from_str(text).map_err(|e| format!("the guest's partition list is not what PowerShell prints ({e})"))
}

/// What the Windows guest adds to the six conditions.
#[derive(Debug, Clone)]
pub struct WindowsFacts {
    /// Err when `guest-fsfreeze-status` says VSS failed to initialise.
    pub vss: Result<(), VssError>,
    /// The guest's partitions, or why they could not be listed.
    pub partitions: Result<Vec<WinPartition>, String>,
}

/// Condition 1 for a Windows guest, after the agent's own check held.
pub fn vss_usable(agent: Finding, facts: &WindowsFacts) -> Finding {
    match (agent, &facts.vss) {
        (Finding::Held(r), Ok(())) => Finding::Held(format!("{r}; VSS is ready")),
        (Finding::Held(_), Err(e)) => Finding::Failed(e.to_string()),
        (other, _) => other,
    }
}

/// Condition 4, guest side, for a Windows guest: no dynamic disk among the VM's disks.
pub fn disks_basic(parts: &[WinPartition], serials: &[&str]) -> Finding {
    for p in parts {
        let ours = p.serial.as_deref().map(str::trim).is_some_and(|s| serials.contains(&s));
        if !ours {
            continue;
        }
        let gpt = p.gpt_type.as_deref().map(|g| g.trim_matches(['{', '}']).to_ascii_lowercase());
        let dynamic = if p.mbr_type == Some(MBR_DYNAMIC) {
            Some("MBR type 0x42")
        } else if gpt.as_deref() == Some(LDM_METADATA) {
            Some("the LDM metadata GPT type")
        } else if gpt.as_deref() == Some(LDM_DATA) {
            Some("the LDM data GPT type")
        } else {
            None
        };
        if let Some(what) = dynamic {
            return Finding::Failed(format!(
                "guest disk {} ({}) partition {} has {what}: a Windows dynamic disk",
                p.disk,
                p.serial.as_deref().unwrap_or("").trim(),
                p.partition
            ));
        }
    }
    Finding::Held("no dynamic disks in the Windows guest".into())
}

/// Condition 4's guest side, from what could be learnt.
pub fn guest_disks(facts: &WindowsFacts, serials: &[&str]) -> Finding {
    match &facts.partitions {
        Ok(p) => disks_basic(p, serials),
        Err(why) => Finding::Failed(format!("the Windows guest's disks could not be listed: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::vss;

    /// As PowerShell 5.1's ConvertTo-Json prints the query on a Server 2022 guest with a
    /// boot disk (System Reserved + C:) and a dynamic data disk (constructed from the
    /// Storage module's documented fields, not from a live guest).
    const REPLY: &str = r#"[{"Disk":0,"Partition":1,"Serial":"root","Style":"MBR","MbrType":7,"GptType":null},
        {"Disk":0,"Partition":2,"Serial":"root","Style":"MBR","MbrType":7,"GptType":null},
        {"Disk":1,"Partition":1,"Serial":"data","Style":"GPT","MbrType":null,"GptType":"{5808C8AA-7E8F-42E0-85D2-E1E90434CFB3}"}]"#;

    #[test]
    fn dynamic_disks_are_found_on_the_vms_disks_only() {
        let parts = parse_partitions(REPLY).unwrap();
        assert!(disks_basic(&parts, &["root"]).held());
        match disks_basic(&parts, &["root", "data"]) {
            Finding::Failed(r) => {
                assert_eq!(r, "guest disk 1 (data) partition 1 has the LDM metadata GPT type: a Windows dynamic disk")
            }
            other => panic!("{other:?}"),
        }
        let mbr = parse_partitions(r#"[{"Disk":1,"Partition":1,"Serial":"data ","MbrType":66}]"#).unwrap();
        assert!(!disks_basic(&mbr, &["data"]).held());
        assert!(parse_partitions("").unwrap().is_empty());
        assert!(parse_partitions("Get-Partition : Access denied").is_err());
    }

    #[test]
    fn vss_that_failed_to_initialise_fails_condition_one_in_the_agents_words() {
        let e = vss::parse("fsfreeze not possible as VSS failed to initialize").unwrap();
        let facts = WindowsFacts { vss: Err(e), partitions: Ok(vec![]) };
        match vss_usable(Finding::Held("qemu-ga 109.1.0 answers and can freeze and thaw".into()), &facts) {
            Finding::Failed(r) => {
                assert!(r.ends_with("the agent said: fsfreeze not possible as VSS failed to initialize"), "{r}")
            }
            other => panic!("{other:?}"),
        }
        let ok = WindowsFacts { vss: Ok(()), partitions: Err("timeout".into()) };
        assert!(vss_usable(Finding::Held("x".into()), &ok).held());
        assert!(!guest_disks(&ok, &["root"]).held());
    }
}
