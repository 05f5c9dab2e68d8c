# quiesce's application-writer hook for the Windows test guest.
#
# NEVER RUN ON A LIVE WINDOWS GUEST.
#
# A PowerShell appender (journal.ps1) proves crash consistency only: it has no VSS writer,
# so VSS freezes the volume under it without its knowledge. Application consistency needs
# a real VSS writer, and none ships with Windows that a test can drive. This hook lets a
# user bring one. SQL Server Express is the usual choice: its SQL Writer takes part in
# every VSS snapshot, its error log shows event 3197 ("I/O is frozen on database ...") and
# 3198 ("I/O was resumed on database ...") around the freeze, and `DBCC CHECKDB` checks
# the restored database.
#
#   app-hook.ps1 -Action detect            prints "sqlserver <instance>" or "absent"
#   app-hook.ps1 -Action start -Dir D:\    creates the quiesce database there and a writer
#                                          inserting rows; prints the guest's UTC time then
#   app-hook.ps1 -Action count             prints the rows the writer committed
#   app-hook.ps1 -Action frozen            prints the newest 3197/3198 events, one a line:
#                                          "<id> <UTC time, o format> <message>"
#   app-hook.ps1 -Action check -Dir D:\    DBCC CHECKDB on the restored database; prints
#                                          "consistent", or fails with CHECKDB's words
#
# The harness side is harness/src/windows/app.rs; the scenario is
# scenarios/windows/win-app-sqlserver.toml.
#
# Without SQL Server every action but detect exits 3 ("absent"): the scenario's app checks
# are reported skipped, never passed.
param(
    [Parameter(Mandatory = $true)][ValidateSet('detect', 'start', 'count', 'frozen', 'check')][string]$Action,
    [string]$Dir
)

$ErrorActionPreference = 'Stop'
$svc = Get-Service -Name 'MSSQL$*' -ErrorAction SilentlyContinue | Select-Object -First 1
if (-not $svc) {
    if ($Action -eq 'detect') { 'absent'; exit 0 }
    Write-Output 'absent: no SQL Server instance (install SQL Server Express to test application consistency)'
    exit 3
}
$instance = $svc.Name.Substring('MSSQL$'.Length)
$server = ".\$instance"

function Sql([string]$Query) {
    $out = & sqlcmd.exe -S $server -E -b -h -1 -Q $Query
    if ($LASTEXITCODE -ne 0) { throw "sqlcmd failed ($LASTEXITCODE): $out" }
    $out
}

switch ($Action) {
    'detect' { "sqlserver $instance" }
    'start' {
        Sql "IF DB_ID('quiesce') IS NULL CREATE DATABASE quiesce ON (NAME=quiesce, FILENAME='$Dir\quiesce.mdf') LOG ON (NAME=quiesce_log, FILENAME='$Dir\quiesce.ldf')"
        Sql "USE quiesce; IF OBJECT_ID('t') IS NULL CREATE TABLE t (n BIGINT IDENTITY PRIMARY KEY, at DATETIME2 DEFAULT SYSUTCDATETIME())"
        Start-Process powershell.exe -WindowStyle Hidden -ArgumentList "-NoProfile -Command while (`$true) { sqlcmd.exe -S $server -E -Q 'INSERT INTO quiesce.dbo.t DEFAULT VALUES' | Out-Null; Start-Sleep -Milliseconds 20 }"
        (Get-Date).ToUniversalTime().ToString('o')
    }
    'count' {
        (Sql "SET NOCOUNT ON; SELECT COUNT_BIG(*) FROM quiesce.dbo.t" | Select-Object -First 1).Trim()
    }
    'frozen' {
        Get-WinEvent -FilterHashtable @{ LogName = 'Application'; Id = 3197, 3198 } -MaxEvents 10 |
            ForEach-Object { "$($_.Id) $($_.TimeCreated.ToUniversalTime().ToString('o')) $($_.Message)" }
    }
    'check' {
        Sql "IF DB_ID('quiesce') IS NULL CREATE DATABASE quiesce ON (FILENAME='$Dir\quiesce.mdf'), (FILENAME='$Dir\quiesce.ldf') FOR ATTACH"
        # A restored guest may have started SQL Server before its data disk had its letter.
        Sql "IF DATABASEPROPERTYEX('quiesce', 'Status') <> 'ONLINE' ALTER DATABASE quiesce SET ONLINE"
        Sql "DBCC CHECKDB('quiesce') WITH NO_INFOMSGS"
        'consistent'
    }
}
