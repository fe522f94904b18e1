//! `eventplane partitions plan|apply`: runs partition policies from a
//! manifest file against a database URL, for machines without Kubernetes.

use std::fmt::Write as _;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use eventplane_api::{Interval, PartitionPolicyManifest, load_partition_policies};
use serde::Serialize;

use eventplane_store::partitions::{ApplyOptions, ApplyReport, apply};

use crate::cli::{PartitionsArgs, PartitionsCommand};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyReport<'a> {
    policy: &'a str,
    table: &'a str,
    dry_run: bool,
    #[serde(flatten)]
    report: &'a ApplyReport,
}

pub async fn run(args: PartitionsArgs) -> anyhow::Result<()> {
    let (run, dry_run) = match args.command {
        PartitionsCommand::Plan(run) => (run, true),
        PartitionsCommand::Apply(run) => (run, false),
    };
    let yaml = std::fs::read_to_string(&run.policy)
        .with_context(|| format!("reading {}", run.policy.display()))?;
    let policies = load_partition_policies(&yaml)
        .with_context(|| format!("loading {}", run.policy.display()))?;
    let now = run.now.unwrap_or_else(Utc::now);
    // One connection held by the run (advisory lock and DDL), one spare.
    let pool = eventplane_store::db::connect(&run.db.database_url, 2, "partitions").await?;
    let options = ApplyOptions {
        lock_timeout: std::time::Duration::from_millis(run.lock_timeout_ms),
        dry_run,
        ..ApplyOptions::default()
    };
    let mut reports = Vec::new();
    for policy in &policies {
        let report = apply(&pool, &policy.spec, now, &options)
            .await
            .with_context(|| format!("partition policy {}", policy.metadata.name))?;
        reports.push(report);
    }
    pool.close().await;

    if run.json {
        let out: Vec<PolicyReport> = policies
            .iter()
            .zip(&reports)
            .map(|(policy, report)| PolicyReport {
                policy: &policy.metadata.name,
                table: &policy.spec.table,
                dry_run: dry_run || policy.spec.dry_run,
                report,
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (policy, report) in policies.iter().zip(&reports) {
            print!("{}", human(policy, report, dry_run || policy.spec.dry_run));
        }
    }
    Ok(())
}

fn human(policy: &PartitionPolicyManifest, report: &ApplyReport, dry_run: bool) -> String {
    let spec = &policy.spec;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {}: table {} by {}, {} in {}",
        policy.metadata.name,
        spec.table,
        spec.column,
        match spec.interval {
            Interval::Monthly => "monthly",
            Interval::Weekly => "weekly",
            Interval::Daily => "daily",
        },
        spec.time_zone
    );
    if report.plan.steps.is_empty() {
        let _ = writeln!(out, "  nothing to do");
    } else if dry_run {
        let _ = writeln!(
            out,
            "  plan ({} steps, not applied):",
            report.plan.steps.len()
        );
        for step in &report.plan.steps {
            let _ = writeln!(out, "    {step}");
        }
    }
    if !dry_run && !report.executed.is_empty() {
        let _ = writeln!(out, "  executed ({} steps):", report.executed.len());
        for step in &report.executed {
            let _ = writeln!(out, "    {step}");
        }
    }
    for note in &report.plan.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    let show = |t: Option<DateTime<Utc>>| {
        t.map_or("-".to_string(), |t| {
            t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        })
    };
    let _ = writeln!(
        out,
        "  oldest kept {}, premade until {}, next boundary {}, {} partitions",
        show(report.plan.oldest_kept),
        show(report.plan.premade_until),
        show(Some(report.plan.next_boundary)),
        report.partitions_after.len()
    );
    if !report.archived.is_empty() {
        let names: Vec<&str> = report.archived.iter().map(|p| p.name.as_str()).collect();
        let _ = writeln!(out, "  archived ({}): {}", names.len(), names.join(", "));
    }
    out
}
