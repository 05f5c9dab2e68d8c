# quiesce's journal writer for the Windows test guest: appends 1, 2, 3, ... (one per
# line, CRLF) to a file on a data disk, and flushes it to the disk with FlushFileBuffers
# every 20 lines, as the Linux guest's writer syncs. After a backup every number must be
# there exactly once.
#
# NEVER RUN ON A LIVE WINDOWS GUEST.
#
#   journal.ps1 -Action start -Path D:\journal   start the writer; returns after line 1 is flushed
#   journal.ps1 -Action stop                     stop it; the file ends with a whole line
#   journal.ps1 -Action flush -Path D:\journal   flush the file's volume (FlushFileBuffers on
#                                                the volume handle), before the host reads it
#
# Reading the journal back is done on the host, not here: after `flush`, the host reads
# the data disk's image through QEMU's drivers and its own NTFS reader, so the guest's
# cache cannot answer for the disk. (That path is quiesce's own and is tested on the
# host; its use with a live Windows guest is not.)
param(
    [Parameter(Mandatory = $true)][ValidateSet('start', 'run', 'stop', 'flush')][string]$Action,
    [string]$Path
)

$ErrorActionPreference = 'Stop'
$PidFile = 'C:\quiesce\journal.pid'

Add-Type -Namespace Quiesce -Name Native -MemberDefinition @'
[DllImport("kernel32.dll", SetLastError = true)]
public static extern bool FlushFileBuffers(Microsoft.Win32.SafeHandles.SafeFileHandle handle);
'@

function Flush-Handle($Handle, [string]$What) {
    if (-not [Quiesce.Native]::FlushFileBuffers($Handle)) {
        throw "FlushFileBuffers($What) failed: $([System.Runtime.InteropServices.Marshal]::GetLastWin32Error())"
    }
}

switch ($Action) {
    'run' {
        $fs = New-Object System.IO.FileStream $Path, 'Append', 'Write', 'Read'
        $w = New-Object System.IO.StreamWriter $fs
        $i = [long]1
        $w.Write("1`r`n"); $w.Flush(); Flush-Handle $fs.SafeFileHandle $Path
        while ($true) {
            $i++
            $w.Write("$i`r`n")
            if ($i % 20 -eq 0) { $w.Flush(); Flush-Handle $fs.SafeFileHandle $Path }
            Start-Sleep -Milliseconds 5
        }
    }
    'start' {
        $self = $MyInvocation.MyCommand.Path
        $p = Start-Process powershell.exe -PassThru -WindowStyle Hidden -ArgumentList "-NoProfile -ExecutionPolicy Bypass -File `"$self`" -Action run -Path `"$Path`""
        Set-Content -Path $PidFile -Value $p.Id
        $deadline = (Get-Date).AddSeconds(30)
        while (-not ((Test-Path $Path) -and (Get-Item $Path).Length -gt 0)) {
            if ((Get-Date) -gt $deadline) { throw 'the journal did not start within 30 s' }
            Start-Sleep -Milliseconds 50
        }
    }
    'stop' {
        $id = [int](Get-Content $PidFile)
        Stop-Process -Id $id -Force
        Wait-Process -Id $id -Timeout 30 -ErrorAction SilentlyContinue
    }
    'flush' {
        # The volume's own handle flushes every file of it (needs administrator rights,
        # which LocalSystem has).
        $letter = (Split-Path -Qualifier $Path).TrimEnd(':')
        $h = [System.IO.File]::Open("\\.\$($letter):", 'Open', 'ReadWrite', 'ReadWrite')
        try { Flush-Handle $h.SafeFileHandle "\\.\$($letter):" } finally { $h.Dispose() }
    }
}
