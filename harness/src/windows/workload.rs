//! The Windows guest's workloads, with the Linux guest's vocabulary (`crate::workload`):
//! the RAM counter, the journal appender and the application-writer hook are the recipe's
//! PowerShell scripts (`guest-images/windows/media/quiesce/workloads/`, installed in
//! `C:\quiesce\workloads` by the first logon), started and read through
//! [`crate::qemu::winexec`]. The small one-line helpers (the boot id, a data disk's drive
//! letter, a file read back) are PowerShell passed inline.
//!
//! The journal is read back on the host, not here: [`flush_journal`] flushes the volume in
//! the guest, and the caller reads the data disk's image (see
//! [`crate::image::fsread::ntfs_file`]); [`journal_verdict`] judges what it read.
//!
//! NEVER RUN AGAINST A LIVE WINDOWS GUEST: the scripts were written from the .NET and
//! Windows documentation; the runner's use of them is driven in tests by a scripted agent.

use std::time::Duration;

use base64::Engine;
use qapi::qga::guest_exec;

use super::deadline::POWERSHELL;
use super::ready::{self, Vss};
use crate::qemu::winexec::{self, WinExecError};
use crate::qemu::{AgentError, GuestAgent};
use crate::workload::JournalCheck;

/// Where the first logon installs the workloads.
pub const WORKLOADS: &str = "C:\\quiesce\\workloads";
/// Where a Windows VM's journal file lives on its data disk.
pub const JOURNAL_FILE: &str = "journal";
/// The largest journal the host reads back (the guest is untrusted).
pub const JOURNAL_MAX: u64 = 64 << 20;

/// A PowerShell single-quoted string: `'` doubled, nothing else is special in it.
pub fn ps_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn script(name: &str) -> String {
    ps_quote(&format!("{WORKLOADS}\\{name}"))
}

/// The drive letter quiesce gives the `index`-th data disk (0 is `D:`): fixed, so that the
/// scenario, the restore and the journal path agree without asking the guest.
pub fn drive_letter(index: usize) -> Option<char> {
    (b'D'..=b'Z').nth(index).map(char::from)
}

/// The journal's path in the guest on the data disk with drive letter `letter`.
pub fn journal_path(letter: char) -> String {
    format!("{letter}:\\{JOURNAL_FILE}")
}

/// Gives the volume labelled `label` (a seeded data disk: mkntfs labels it with the disk's
/// name) the drive letter `letter`, unless it has it already. Windows brings new disks
/// online by itself (the first logon set `OnlineAll`).
pub async fn assign_letter(agent: &GuestAgent, label: &str, letter: char) -> Result<(), WinExecError> {
    let want = format!("{letter}:");
    let s = format!(
        "$v = @(Get-CimInstance -ClassName Win32_Volume | Where-Object {{ $_.Label -eq {label} }}); \
         if ($v.Count -ne 1) {{ throw ('{{0}} volumes labelled ' + {label} -f $v.Count) }}; \
         if ($v[0].DriveLetter -ne {want}) {{ Set-CimInstance -InputObject $v[0] -Property @{{ DriveLetter = {want} }} }}",
        label = ps_quote(label),
        want = ps_quote(&want),
    );
    winexec::powershell(agent, &s, POWERSHELL).await.map(drop)
}

/// Starts the RAM counter (`counter.ps1 -Action start` returns once it has a value).
pub async fn start_counter(agent: &GuestAgent) -> Result<(), WinExecError> {
    winexec::powershell(agent, &format!("& {} -Action start", script("counter.ps1")), POWERSHELL).await.map(drop)
}

/// What a PowerShell script printed as a number.
fn number(out: &str) -> Result<u64, WinExecError> {
    out.trim().parse().map_err(|_| WinExecError::Failed {
        program: "powershell".into(),
        exit: winexec::WinExit::Code(0),
        output: format!("expected a number, got {:?}", out.trim()),
    })
}

pub async fn read_counter(agent: &GuestAgent) -> Result<u64, WinExecError> {
    number(&winexec::powershell(agent, &format!("& {} -Action read", script("counter.ps1")), POWERSHELL).await?)
}

/// Waits in the guest, up to `timeout`, until the counter is above `value`; returns it.
pub async fn wait_counter_above(agent: &GuestAgent, value: u64, timeout: Duration) -> Result<u64, WinExecError> {
    let s = format!(
        "$above = {value}; $until = (Get-Date).AddSeconds({secs}); \
         while ($true) {{ $c = [long](& {counter} -Action read); if ($c -gt $above) {{ $c; break }}; \
         if ((Get-Date) -gt $until) {{ throw \"the counter stayed at $c\" }}; Start-Sleep -Milliseconds 50 }}",
        secs = timeout.as_secs().max(1),
        counter = script("counter.ps1"),
    );
    number(&winexec::powershell(agent, &s, timeout + POWERSHELL).await?)
}

/// The guest's boot id: a GUID kept in a volatile registry key, which lives in RAM only.
/// A restored saved state has the same one; any fresh boot makes a new one.
pub async fn boot_id(agent: &GuestAgent) -> Result<String, WinExecError> {
    let s = "$k = [Microsoft.Win32.Registry]::LocalMachine.CreateSubKey('SOFTWARE\\quiesce-boot', \
             [Microsoft.Win32.RegistryKeyPermissionCheck]::ReadWriteSubTree, [Microsoft.Win32.RegistryOptions]::Volatile); \
             try { $id = $k.GetValue('id'); if (-not $id) { $id = [guid]::NewGuid().ToString(); $k.SetValue('id', $id) }; $id } \
             finally { $k.Close() }";
    Ok(winexec::powershell(agent, s, POWERSHELL).await?.trim().to_owned())
}

/// Starts the journal appender on `path` (`journal.ps1 -Action start` returns once line 1
/// is flushed).
pub async fn start_journal(agent: &GuestAgent, path: &str) -> Result<(), WinExecError> {
    let s = format!("& {} -Action start -Path {}", script("journal.ps1"), ps_quote(path));
    winexec::powershell(agent, &s, POWERSHELL).await.map(drop)
}

/// Flushes the journal's whole volume to the disk (FlushFileBuffers on the volume handle),
/// before the host reads the disk.
pub async fn flush_journal(agent: &GuestAgent, path: &str) -> Result<(), WinExecError> {
    let s = format!("& {} -Action flush -Path {}", script("journal.ps1"), ps_quote(path));
    winexec::powershell(agent, &s, POWERSHELL).await.map(drop)
}

/// A file's bytes, read in the guest (base64 across the agent: no code page can change them).
pub async fn read_file(agent: &GuestAgent, path: &str) -> Result<Vec<u8>, WinExecError> {
    let s = format!("[Convert]::ToBase64String([IO.File]::ReadAllBytes({}))", ps_quote(path));
    let out = winexec::powershell(agent, &s, POWERSHELL).await?;
    base64::engine::general_purpose::STANDARD.decode(out.trim()).map_err(|e| WinExecError::Failed {
        program: "powershell".into(),
        exit: winexec::WinExit::Code(0),
        output: format!("not base64: {e}"),
    })
}

/// Stops the `QEMU-GA` service, as an administrator would: the agent goes silent. Returns
/// once a ping goes unanswered (as `crate::workload::stop_agent` does for Linux).
pub async fn stop_agent(agent: &GuestAgent, deadline: Duration) -> Result<(), AgentError> {
    let stop = guest_exec {
        path: "C:\\Windows\\System32\\sc.exe".into(),
        arg: Some(vec!["stop".into(), "QEMU-GA".into()]),
        capture_output: None,
        env: winexec::environment(Some(&[])),
        input_data: None,
    };
    // The agent stops itself: its reply may or may not get out first; the silence is what counts.
    let _ = agent.execute_within(stop, Duration::from_secs(2)).await;
    agent.wait_silent(deadline).await
}

/// Unregisters qemu-ga's VSS provider (`qemu-ga.exe -s vss-uninstall`) and restarts the
/// agent service so that it initialises VSS again, then waits, up to `deadline`, until the
/// agent answers and says VSS failed to initialise.
pub async fn unregister_vss_provider(agent: &GuestAgent, deadline: Duration) -> Result<(), UnregisterError> {
    let s = "$q = Get-ChildItem -Path \"$env:ProgramFiles\\Qemu-ga\", \"${env:ProgramFiles(x86)}\\Qemu-ga\" -Filter qemu-ga.exe \
             -ErrorAction SilentlyContinue | Select-Object -First 1; \
             if (-not $q) { throw 'qemu-ga.exe not found' }; \
             & $q.FullName -s vss-uninstall; if ($LASTEXITCODE -ne 0) { throw \"vss-uninstall exited with $LASTEXITCODE\" }; \
             Start-Process -WindowStyle Hidden powershell.exe -ArgumentList '-NoProfile -Command Restart-Service -Name QEMU-GA -Force'";
    winexec::powershell(agent, s, POWERSHELL).await?;
    let until = tokio::time::Instant::now() + deadline;
    loop {
        // While the service restarts the agent does not answer; that is not a failure yet.
        if let Ok(Vss::NotReady(_)) = ready::vss_status(agent, Duration::from_secs(5)).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(UnregisterError::StillReady { waited: deadline });
        }
        // A poll of the guest's state, not a synchronisation: VSS says so when it is done.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Why the VSS provider could not be taken away.
#[derive(Debug, thiserror::Error)]
pub enum UnregisterError {
    /// The uninstall could not run (the agent's or PowerShell's words follow).
    #[error(transparent)]
    Exec(#[from] WinExecError),
    /// The provider was uninstalled, but VSS still answered as ready after the agent's
    /// restart: the fault did not take.
    #[error("the VSS provider was unregistered, but VSS still said it was ready {waited:?} later")]
    StillReady { waited: Duration },
}

/// Judges a Windows journal read from the disk: `1\r\n2\r\n...`, every number once, in order.
/// What lies past the last flush may be torn (NTFS may have extended the file before its
/// data reached the disk): trailing zero bytes and a last line without its line end are
/// left out, and only what comes before them is judged.
pub fn journal_verdict(bytes: &[u8]) -> JournalCheck {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&bytes[..end]);
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut lines = 0u64;
    let mut first_break = None;
    for line in whole.lines() {
        lines += 1;
        let line = line.trim_end_matches('\r');
        if first_break.is_none() && line.parse::<u64>().ok() != Some(lines) {
            first_break = Some((lines, line.chars().take(40).collect()));
        }
    }
    JournalCheck { lines, first_break }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journals_are_judged_up_to_their_last_whole_line() {
        assert_eq!(journal_verdict(b"1\r\n2\r\n3\r\n"), JournalCheck { lines: 3, first_break: None });
        // Past the last flush: a torn line and zeros NTFS has not filled yet are left out.
        assert_eq!(journal_verdict(b"1\r\n2\r\n3\r\n4"), JournalCheck { lines: 3, first_break: None });
        assert_eq!(journal_verdict(b"1\r\n2\r\n\0\0\0\0"), JournalCheck { lines: 2, first_break: None });
        // A gap, a repeat or zeros inside the journal are breaks.
        assert_eq!(journal_verdict(b"1\r\n3\r\n4\r\n").first_break, Some((2, "3".into())));
        assert_eq!(journal_verdict(b"1\r\n1\r\n").first_break, Some((2, "1".into())));
        assert_eq!(journal_verdict(b"1\r\n\0\0\r\n3\r\n").first_break, Some((2, "\0\0".into())));
        assert!(!journal_verdict(b"").intact());
    }

    #[test]
    fn names_are_quoted_for_powershell_and_letters_fixed() {
        assert_eq!(ps_quote("it's"), "'it''s'");
        assert_eq!(drive_letter(0), Some('D'));
        assert_eq!(drive_letter(22), Some('Z'));
        assert_eq!(drive_letter(23), None);
        assert_eq!(journal_path('E'), "E:\\journal");
    }
}
