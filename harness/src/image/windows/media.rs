//! The provisioning CD: the answer file made from the recipe's template at its root (where
//! Windows Setup looks for `autounattend.xml` on every removable drive), and the recipe's
//! `media/` tree beside it (the first-logon script and the workloads). Built with xorriso
//! as an ISO 9660 image with Joliet names, which Windows reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Edition, VirtioOs, WindowsImageError, RECIPE};
use crate::image::recipe::RECIPES;
use crate::sys::Tool;

/// `xorriso -as mkisofs` of a few small files: a second.
const MKISOFS: Duration = Duration::from_secs(120);

/// The Administrator password of the test guest. It is a private, throwaway test VM that
/// nobody reaches over a network (it has no NIC); the password only has to satisfy
/// Windows' complexity rules for autologon to work.
pub const ADMIN_PASSWORD: &str = "Quiesce-Test-1";
/// The guest's host name.
pub const COMPUTER_NAME: &str = "QUIESCE-WIN";
/// The provisioning CD's volume label.
pub const VOLUME_ID: &str = "QUIESCE_PROVISION";

/// What fills the template's placeholders.
#[derive(Debug, Clone)]
pub struct AnswerVars {
    pub image_name: String,
    pub virtio_os: VirtioOs,
    pub admin_password: String,
    pub computer_name: String,
}

impl AnswerVars {
    pub fn for_edition(edition: &Edition, os: VirtioOs) -> Self {
        AnswerVars {
            image_name: edition.name.clone(),
            virtio_os: os,
            admin_password: ADMIN_PASSWORD.into(),
            computer_name: COMPUTER_NAME.into(),
        }
    }
}

/// The files of the Windows recipe, as built into this quiesce.
pub fn recipe_files() -> &'static [(&'static str, &'static [u8])] {
    RECIPES.iter().find(|(n, _)| *n == RECIPE).map(|(_, f)| *f).unwrap_or(&[])
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

/// The answer file: the template with each placeholder filled in (XML-escaped), checked to
/// be well-formed XML with the elements Setup needs, and no placeholder left.
pub fn render_answer_file(template: &str, vars: &AnswerVars) -> Result<String, WindowsImageError> {
    let out = template
        .replace("@@IMAGE_NAME@@", &xml_escape(&vars.image_name))
        .replace("@@VIRTIO_OS@@", &xml_escape(vars.virtio_os.dir()))
        .replace("@@ADMIN_PASSWORD@@", &xml_escape(&vars.admin_password))
        .replace("@@COMPUTER_NAME@@", &xml_escape(&vars.computer_name));
    check_answer_file(&out)?;
    Ok(out)
}

/// Well-formed, an `<unattend>` root, the three passes, DriverPaths and the first-logon
/// command, and no `@@NAME@@` placeholder left anywhere (comments included).
pub fn check_answer_file(xml: &str) -> Result<(), WindowsImageError> {
    let bad = |m: String| WindowsImageError::AnswerFile(m);
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(format!("not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "unattend" {
        return Err(bad(format!("the root element is <{}>, not <unattend>", root.tag_name().name())));
    }
    for pass in ["windowsPE", "specialize", "oobeSystem"] {
        if !root.children().any(|s| s.has_tag_name("settings") && s.attribute("pass") == Some(pass)) {
            return Err(bad(format!("it has no <settings pass=\"{pass}\">")));
        }
    }
    for needed in ["DriverPaths", "FirstLogonCommands", "AutoLogon", "AdministratorPassword", "InstallFrom"] {
        if !doc.descendants().any(|n| n.tag_name().name() == needed) {
            return Err(bad(format!("it has no <{needed}>")));
        }
    }
    // Placeholders are ASCII words between @@ pairs; the template's own comment spells them
    // with their names, so look for the exact markers.
    for ph in ["@@IMAGE_NAME@@", "@@VIRTIO_OS@@", "@@ADMIN_PASSWORD@@", "@@COMPUTER_NAME@@"] {
        if doc.descendants().any(|n| n.is_text() && n.text().is_some_and(|t| t.contains(ph))) {
            return Err(bad(format!("the placeholder {ph} was left in it")));
        }
    }
    Ok(())
}

/// The answer file for `vars`, from the recipe built into this quiesce.
pub fn answer_file(vars: &AnswerVars) -> Result<String, WindowsImageError> {
    let template = recipe_files()
        .iter()
        .find(|(p, _)| *p == "autounattend.xml")
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .ok_or_else(|| WindowsImageError::AnswerFile("this quiesce was built without the recipe's template".into()))?;
    render_answer_file(&template, vars)
}

/// Lays the CD's files out in `stage`: `autounattend.xml` and the recipe's `media/` tree.
pub fn stage(vars: &AnswerVars, stage: &Path) -> Result<Vec<PathBuf>, WindowsImageError> {
    let mut written = Vec::new();
    let mut put = |rel: &str, bytes: &[u8]| -> Result<(), WindowsImageError> {
        let p = stage.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(WindowsImageError::io("creating", parent))?;
        }
        std::fs::write(&p, bytes).map_err(WindowsImageError::io("writing", &p))?;
        written.push(p);
        Ok(())
    };
    put("autounattend.xml", answer_file(vars)?.as_bytes())?;
    for (rel, bytes) in recipe_files() {
        if let Some(inner) = rel.strip_prefix("media/") {
            put(inner, bytes)?;
        }
    }
    Ok(written)
}

/// Builds the provisioning CD at `iso` from the files laid out in `stage`.
pub fn build_iso(stage: &Path, iso: &Path) -> Result<(), WindowsImageError> {
    Tool::new("xorriso", MKISOFS)
        .args(["-as", "mkisofs", "-quiet", "-J", "-joliet-long", "-r", "-V", VOLUME_ID, "-o"])
        .arg(iso)
        .arg(stage)
        .output()
        .and_then(|o| o.into_success())
        .map_err(WindowsImageError::tool("xorriso", "xorriso"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> AnswerVars {
        AnswerVars {
            image_name: "Windows Server 2022 SERVERSTANDARD & <friends>".into(),
            virtio_os: VirtioOs::Server2022,
            admin_password: ADMIN_PASSWORD.into(),
            computer_name: COMPUTER_NAME.into(),
        }
    }

    #[test]
    fn the_recipe_template_renders_to_a_valid_answer_file() {
        let xml = answer_file(&vars()).unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let value = doc
            .descendants()
            .find(|n| n.has_tag_name("Value") && n.parent().is_some_and(|p| p.has_tag_name("MetaData")));
        assert_eq!(value.and_then(|v| v.text()), Some("Windows Server 2022 SERVERSTANDARD & <friends>"));
        let paths: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("Path")).filter_map(|n| n.text()).collect();
        for d in ["viostor", "vioscsi", "NetKVM", "vioserial"] {
            assert!(paths.contains(&format!("E:\\{d}\\2k22\\amd64").as_str()), "{d}: {paths:?}");
        }
    }

    #[test]
    fn a_broken_template_is_refused() {
        let err = render_answer_file("<unattend><settings pass=\"windowsPE\">", &vars()).unwrap_err();
        assert!(err.to_string().contains("not well-formed"), "{err}");
        let left =
            "<unattend><settings pass=\"windowsPE\"/><settings pass=\"specialize\"/><settings pass=\"oobeSystem\">\
                    <DriverPaths/><FirstLogonCommands/><AutoLogon/><AdministratorPassword/><InstallFrom/>\
                    <X>@@UNKNOWN@@ @@IMAGE_NAME@@</X></settings></unattend>";
        assert!(check_answer_file(left).unwrap_err().to_string().contains("@@IMAGE_NAME@@ was left"));
        let no_drivers = left.replace("<DriverPaths/>", "").replace("@@IMAGE_NAME@@", "");
        assert!(check_answer_file(&no_drivers).unwrap_err().to_string().contains("<DriverPaths>"));
    }
}
