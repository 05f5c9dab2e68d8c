# quiesce's Windows test guest: first-logon provisioning, run once by the answer file's
# FirstLogonCommands as Administrator.
#
# NEVER RUN ON A LIVE WINDOWS GUEST. Written from qemu-ga's Windows installer and service
# code and from what avocado-vt's unattended installs do; untested until someone runs
# `quiesce image build windows` on a KVM host.
#
# It installs the virtio guest tools and the qemu-ga MSI (which registers the "QEMU Guest
# Agent VSS Provider"), checks that the QEMU-GA service runs and that VSS lists the
# provider, installs the workloads under C:\quiesce, writes its progress and then one
# ready line to COM1 (the host reads it from QEMU's -serial file), and shuts the guest down.
# Any failure writes a FAILED line instead, and shuts down too, so the host's build ends
# at once with the serial log as its evidence.
param([Parameter(Mandatory = $true)][string]$Media)

$ErrorActionPreference = 'Stop'
$Dest = 'C:\quiesce'
New-Item -ItemType Directory -Force -Path $Dest | Out-Null
Start-Transcript -Path "$Dest\firstlogon.log" -Append | Out-Null

# One line on COM1. The host's progress shows each line as it comes.
function Say([string]$Line) {
    $port = New-Object System.IO.Ports.SerialPort 'COM1', 115200, 'None', 8, 'One'
    try {
        $port.Open()
        $port.WriteLine("quiesce: $Line")
    } finally {
        $port.Close()
    }
    Write-Output $Line
}

# Runs an MSI quietly and fails on any exit code but 0 and 3010 (reboot wanted, done later).
function Install-Msi([string]$Path, [string]$Extra = '') {
    $log = Join-Path $Dest ((Split-Path $Path -Leaf) + '.log')
    $p = Start-Process msiexec.exe -Wait -PassThru -ArgumentList "/i `"$Path`" /qn /norestart /l*v `"$log`" $Extra"
    if ($p.ExitCode -ne 0 -and $p.ExitCode -ne 3010) {
        throw "msiexec $Path exited with $($p.ExitCode); see $log"
    }
}

# Waits up to $Seconds for $Test to hold, checking once a second.
function Wait-Until([scriptblock]$Test, [int]$Seconds, [string]$What) {
    $deadline = (Get-Date).AddSeconds($Seconds)
    while (-not (& $Test)) {
        if ((Get-Date) -gt $deadline) { throw "$What did not happen within $Seconds s" }
        Start-Sleep -Seconds 1
    }
}

try {
    Say 'phase: first logon, provisioning'
    $virtio = Get-PSDrive -PSProvider FileSystem |
        Where-Object { Test-Path (Join-Path $_.Root 'virtio-win-gt-x64.msi') } |
        Select-Object -First 1
    if (-not $virtio) { throw 'no drive holds virtio-win-gt-x64.msi (is the virtio-win CD attached?)' }
    $vroot = $virtio.Root

    Say 'phase: installing the virtio guest tools'
    Install-Msi (Join-Path $vroot 'virtio-win-gt-x64.msi') 'ADDLOCAL=ALL'

    Say 'phase: installing qemu-ga and its VSS provider'
    Install-Msi (Join-Path $vroot 'guest-agent\qemu-ga-x86_64.msi')
    Wait-Until { (Get-Service -Name 'QEMU-GA' -ErrorAction SilentlyContinue).Status -eq 'Running' } 120 'the QEMU-GA service running'
    Set-Service -Name 'QEMU-GA' -StartupType Automatic

    # VSS answers, and lists qemu-ga's provider. The MSI registers it; qemu-ga can do it by hand.
    $providers = (vssadmin list providers) -join "`n"
    if ($providers -notmatch 'QEMU Guest Agent VSS Provider') {
        Say 'phase: VSS provider not listed; registering it with qemu-ga -s vss-install'
        $qga = Get-ChildItem -Path "$env:ProgramFiles\Qemu-ga", "${env:ProgramFiles(x86)}\Qemu-ga" -Filter qemu-ga.exe -ErrorAction SilentlyContinue | Select-Object -First 1
        if (-not $qga) { throw 'qemu-ga.exe not found after the MSI install' }
        & $qga.FullName -s vss-install
        $providers = (vssadmin list providers) -join "`n"
        if ($providers -notmatch 'QEMU Guest Agent VSS Provider') {
            throw "VSS does not list the QEMU Guest Agent VSS Provider:`n$providers"
        }
    }
    $qgaVersion = (Get-Item (Get-Process -Name qemu-ga -ErrorAction SilentlyContinue | Select-Object -First 1).Path).VersionInfo.ProductVersion

    Say 'phase: configuring the guest for tests'
    # Data disks the host attaches come online by themselves (servers keep new disks offline).
    Set-StorageSetting -NewDiskPolicy OnlineAll
    # Nothing that sleeps, hibernates or updates in the background during a scenario.
    powercfg.exe /hibernate off
    powercfg.exe /change standby-timeout-ac 0
    powercfg.exe /change monitor-timeout-ac 0
    Set-Service -Name wuauserv -StartupType Disabled
    Stop-Service -Name wuauserv -Force -ErrorAction SilentlyContinue

    Say 'phase: installing the workloads'
    Copy-Item -Recurse -Force -Path (Join-Path $Media 'quiesce\workloads') -Destination $Dest
    # The application writer's hook: it runs only when the user installed a VSS writer.
    $app = & powershell.exe -NoProfile -ExecutionPolicy Bypass -File "$Dest\workloads\app-hook.ps1" -Action detect
    Say "app writer: $app"

    $build = [System.Environment]::OSVersion.Version.Build
    Say "QUIESCE-WINDOWS-READY build=$build qemu-ga=$qgaVersion vss=ok"
} catch {
    Say "QUIESCE-WINDOWS-FAILED $($_.Exception.Message)"
} finally {
    Stop-Transcript | Out-Null
    Stop-Computer -Force
}
