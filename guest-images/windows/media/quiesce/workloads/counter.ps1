# quiesce's RAM counter for the Windows test guest: the same vocabulary as the Linux
# guest's counter. The value lives only in memory (a named shared memory section, never
# backed by a file), so a restored saved state continues it and a disk-only restore has
# none.
#
# NEVER RUN ON A LIVE WINDOWS GUEST.
#
#   counter.ps1 -Action start   start the ticking process (about every 20 ms); returns
#                               once the first value is there
#   counter.ps1 -Action read    print the current value
# Both run through guest-exec as LocalSystem in session 0, so they share one namespace.
param([Parameter(Mandatory = $true)][ValidateSet('start', 'read', 'run')][string]$Action)

$ErrorActionPreference = 'Stop'
$Name = 'Global\quiesce-counter'

function Read-Counter {
    $map = [System.IO.MemoryMappedFiles.MemoryMappedFile]::OpenExisting($Name)
    try {
        $view = $map.CreateViewAccessor(0, 8)
        try { return $view.ReadInt64(0) } finally { $view.Dispose() }
    } finally { $map.Dispose() }
}

switch ($Action) {
    'run' {
        $map = [System.IO.MemoryMappedFiles.MemoryMappedFile]::CreateNew($Name, 8)
        $view = $map.CreateViewAccessor(0, 8)
        $i = [long]0
        while ($true) {
            $i++
            $view.Write(0, $i)
            Start-Sleep -Milliseconds 20
        }
    }
    'start' {
        $self = $MyInvocation.MyCommand.Path
        Start-Process powershell.exe -WindowStyle Hidden -ArgumentList "-NoProfile -ExecutionPolicy Bypass -File `"$self`" -Action run"
        $deadline = (Get-Date).AddSeconds(30)
        while ($true) {
            try { if ((Read-Counter) -gt 0) { break } } catch { }
            if ((Get-Date) -gt $deadline) { throw 'the counter did not start within 30 s' }
            Start-Sleep -Milliseconds 50
        }
    }
    'read' { Read-Counter }
}
