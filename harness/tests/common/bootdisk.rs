//! Disks laid out as installers lay them, from the cached Linux guest, made without root:
//! no loop device, no mount. The partition table is written here; FAT filesystems are
//! made and filled by mtools, which work on image files; the bootloader is installed by
//! `syslinux --install`, the mtools installer, which needs no mount either (extlinux
//! would).
//!
//! Each tool runs under a deadline. Where a tool or file is missing, [`bios_tools`] says
//! which, so a test can skip saying why; ci/setup-debian.sh installs them all.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use quiesce::image::GuestImage;
use quiesce::sys::Tool;

/// mformat, mcopy and syslinux on a 64 MiB image take well under a second.
const TOOL: Duration = Duration::from_secs(60);

/// Where partitions start: 1 MiB, as fdisk and parted align them; each following one at
/// the next MiB.
pub const ALIGN: u64 = 1 << 20;

/// An MBR partition type.
pub const LINUX: u8 = 0x83;
pub const FAT16_LBA: u8 = 0x0e;

/// One partition of an MBR disk: its type, whether it is the active (boot) one, and the
/// file whose bytes it holds.
pub struct Part<'a> {
    pub kind: u8,
    pub active: bool,
    pub bytes: &'a Path,
}

/// Writes `raw`: an MBR (with `boot_code` in its first 440 bytes, if given) and `parts`,
/// each at the next MiB boundary. Returns each partition's first sector.
pub fn mbr_disk(raw: &Path, boot_code: Option<&[u8]>, parts: &[Part]) -> Vec<u64> {
    assert!(parts.len() <= 4, "an MBR holds four primary partitions");
    let mut mbr = [0u8; 512];
    if let Some(code) = boot_code {
        assert!(code.len() <= 440, "MBR boot code is at most 440 bytes (it has {})", code.len());
        mbr[..code.len()].copy_from_slice(code);
    }
    let mut starts = Vec::new();
    let mut at = ALIGN;
    for (i, p) in parts.iter().enumerate() {
        let len = std::fs::metadata(p.bytes).unwrap().len();
        assert_eq!(len % 512, 0, "{} is not whole sectors", p.bytes.display());
        let entry = &mut mbr[446 + 16 * i..462 + 16 * i];
        entry[0] = if p.active { 0x80 } else { 0 };
        entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS unused: LBA only
        entry[4] = p.kind;
        entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        entry[8..12].copy_from_slice(&u32::try_from(at / 512).unwrap().to_le_bytes());
        entry[12..16].copy_from_slice(&u32::try_from(len / 512).unwrap().to_le_bytes());
        starts.push(at / 512);
        at = (at + len).div_ceil(ALIGN) * ALIGN;
    }
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    let mut out = std::fs::File::create(raw).unwrap();
    out.write_all(&mbr).unwrap();
    for (p, start) in parts.iter().zip(&starts) {
        out.seek(SeekFrom::Start(start * 512)).unwrap();
        std::io::copy(&mut std::fs::File::open(p.bytes).unwrap(), &mut out).unwrap();
    }
    out.set_len(at).unwrap();
    out.sync_all().unwrap();
    starts
}

/// The recipe's kernel command line with its root on `root` instead of the whole disk.
pub fn cmdline_on(img: &GuestImage, root: &str) -> String {
    let line: Vec<&str> =
        img.cmdline.split_whitespace().map(|arg| if arg == "root=/dev/vda" { root } else { arg }).collect();
    assert!(line.contains(&root), "the recipe's command line names no root=/dev/vda: {}", img.cmdline);
    line.join(" ")
}

/// The programs and files a BIOS-bootable disk is made with.
pub struct BiosTools {
    /// syslinux's MBR boot code (mbr.bin): it boots the active partition's boot sector.
    mbr: PathBuf,
}

/// `name`, if it is a file in one of PATH's folders.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The tools [`bios_disk`] needs, or why this machine lacks them.
pub fn bios_tools() -> Result<BiosTools, String> {
    let install = "apt-get install syslinux syslinux-common mtools (ci/setup-debian.sh does)";
    for p in ["syslinux", "mformat", "mcopy", "mmd", "mdir"] {
        if on_path(p).is_none() {
            return Err(format!("{p} is not on PATH: {install}"));
        }
    }
    // Debian's path, then Fedora's and Arch's.
    let mbrs = ["/usr/lib/syslinux/mbr/mbr.bin", "/usr/share/syslinux/mbr.bin", "/usr/lib/syslinux/bios/mbr.bin"];
    let mbr = mbrs.iter().map(PathBuf::from).find(|p| p.is_file());
    let mbr = mbr.ok_or_else(|| format!("syslinux's mbr.bin is in none of {mbrs:?}: {install}"))?;
    Ok(BiosTools { mbr })
}

/// Runs an mtools-based program to its successful end. MTOOLS_SKIP_CHECK: an image file's
/// geometry need not be a floppy's.
fn tool(program: &str, args: &[&str]) {
    Tool::new(program, TOOL)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .run()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
}

/// A FAT16 filesystem image of `mib` MiB at `fat`, labelled `label`, for a partition that
/// starts at sector `hidden` (its boot sector records where it is), holding `files` (host
/// path, path in the filesystem; folders are made as needed).
pub fn fat(fat: &Path, mib: u64, hidden: u64, label: &str, files: &[(&Path, &str)]) {
    let f = fat.to_str().unwrap();
    let sectors = (mib << 20) / 512;
    tool("mformat", &["-i", f, "-C", "-T", &sectors.to_string(), "-H", &hidden.to_string(), "-v", label, "::"]);
    for (from, to) in files {
        let mut made = String::new();
        let parents: Vec<&str> = to.split('/').collect();
        for dir in &parents[..parents.len() - 1] {
            made = format!("{made}/{dir}");
            let exists = Tool::new("mdir", TOOL)
                .args(["-i", f, &format!("::{made}")])
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .is_ok_and(|o| o.status.success());
            if !exists {
                tool("mmd", &["-i", f, &format!("::{made}")]);
            }
        }
        tool("mcopy", &["-i", f, from.to_str().unwrap(), &format!("::/{to}")]);
    }
}

/// Writes `raw` (its scratch files beside it, removed): the cached guest as a BIOS machine boots an installed Linux. syslinux's
/// MBR code boots the active partition, a FAT16 `/boot` with syslinux in its boot sector,
/// the kernel, the initrd and syslinux.cfg (root=/dev/vda2); partition 2 holds the root
/// filesystem. Nothing outside the disk says how to boot it.
pub fn bios_disk(t: &BiosTools, img: &GuestImage, raw: &Path) {
    let work = tempfile::tempdir_in(raw.parent().unwrap()).unwrap();
    let cfg = work.path().join("syslinux.cfg");
    let append = cmdline_on(img, "root=/dev/vda2");
    // SERIAL: syslinux's own messages go to the serial log, which a failed boot shows.
    let text = format!(
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  LINUX /vmlinuz\n  \
         INITRD /initrd.img\n  APPEND {append}\n"
    );
    std::fs::write(&cfg, text).unwrap();
    let boot = work.path().join("boot.fat");
    let files = [(img.kernel.as_path(), "vmlinuz"), (img.initrd.as_path(), "initrd.img"), (&cfg, "syslinux.cfg")];
    fat(&boot, 32, ALIGN / 512, "BOOT", &files);
    // ldlinux.sys and ldlinux.c32 into the filesystem, its boot sector patched to load them.
    tool("syslinux", &["--install", boot.to_str().unwrap()]);
    let code = std::fs::read(&t.mbr).unwrap();
    let parts =
        [Part { kind: FAT16_LBA, active: true, bytes: &boot }, Part { kind: LINUX, active: false, bytes: &img.root }];
    mbr_disk(raw, Some(&code), &parts);
}
