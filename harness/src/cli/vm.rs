use std::time::Instant;

use clap::Subcommand;
use serde_json::Value;

use super::progress::Progress;
use super::{CliResult, EXIT_INTERRUPTED};
use quiesce::qemu::accel::AccelChoice;
use quiesce::sys::deadline;
use quiesce::testguest::{self, GuestOptions};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot the default test guest, show what its agent reports, and shut it down cleanly.
    Boot {
        #[arg(long, default_value_t = 512)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
    },
}

pub async fn run(cmd: VmCommand, accel: Option<AccelChoice>) -> CliResult {
    let VmCommand::Boot { memory, cpus } = cmd;
    let mut opts = GuestOptions::named("vm");
    opts.accel = accel;
    opts.memory_mib = memory;
    opts.cpus = cpus;
    // Ctrl-C drops whatever is in flight; the machine guard then stops QEMU and cleans up.
    tokio::select! {
        r = boot_and_report(opts) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("quiesce: interrupted; the VM was stopped and its files removed");
            Ok(EXIT_INTERRUPTED)
        }
    }
}

async fn boot_and_report(opts: GuestOptions) -> CliResult {
    let mut p = Progress::new();
    let mut guest = testguest::boot(opts, &mut |s| p.step(s)).await?;
    p.step("asking the guest agent");
    let agent = guest.machine.agent()?;
    let info = agent.execute(qapi::qga::guest_info {}).await?;
    let fsinfo = agent.execute_raw("guest-get-fsinfo", Value::Null, deadline::AGENT_COMMAND).await?;
    p.finish();
    let enabled = info.supported_commands.iter().filter(|c| c.enabled).count();
    let freeze = info.supported_commands.iter().any(|c| c.name == "guest-fsfreeze-freeze" && c.enabled);
    println!(
        "booted in {:.1}s under {} ({})",
        guest.boot_time.as_secs_f64(),
        guest.accel.accel.as_str().to_uppercase(),
        guest.accel.reason
    );
    println!(
        "guest-info       qemu-ga {}, {enabled} of {} commands enabled, guest-fsfreeze-freeze {}",
        info.version,
        info.supported_commands.len(),
        if freeze { "enabled" } else { "DISABLED" }
    );
    println!("guest-get-fsinfo");
    for fs in fsinfo.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let disks: Vec<String> = fs["disk"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|d| {
                        format!("{} (serial {})", d["dev"].as_str().unwrap_or("?"), d["serial"].as_str().unwrap_or("-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let used = fs["used-bytes"].as_u64().map(|b| format!(", {} MiB used", b >> 20)).unwrap_or_default();
        println!(
            "  {:<12} {:<6} {}{used}",
            fs["mountpoint"].as_str().unwrap_or("?"),
            fs["type"].as_str().unwrap_or("?"),
            disks.join(", ")
        );
    }
    let t = Instant::now();
    let status = guest.machine.shutdown(deadline::GUEST_SHUTDOWN).await?;
    println!("shut down cleanly in {:.1}s ({status})", t.elapsed().as_secs_f64());
    Ok(0)
}
