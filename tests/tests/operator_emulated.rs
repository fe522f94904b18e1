//! End-to-end: the real `eventplane-operator` binary against the Kubernetes
//! API emulator (`tests/k8s/emulator.py`: no real API server can run on
//! the build machines), a fresh Postgres database and the real `eventplane
//! rebuild`, which the emulator's Job runner starts for the rebuild Job.
//!
//! It applies `crds/examples/projection-orders.yaml` and waits for the first
//! version to be Ready with its tables; then raises `spec.version` and
//! waits for the operator's rebuild Job, the swap to version 2 and Ready
//! again. What the emulator does not check is listed at the top of the
//! script: a real cluster still has the last word on RBAC, the CRD's schema
//! and CEL rules, and server-side apply's list merging.
//!
//! Needs python3 with aiohttp and PyYAML (`tests/ensure-services.sh`
//! installs them); without them the test fails and says so.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use eventplane_api::Projection;
use eventplane_testkit::TestDb;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use sqlx::PgPool;

const NAMESPACE: &str = "default";
/// The image the operator writes into rebuild Jobs; the emulator maps it to
/// the local `eventplane` binary.
const IMAGE: &str = "eventplane";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lies in the workspace")
        .to_path_buf()
}

/// A child process killed when the test ends, with its output in a file.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// The emulator stops by itself when this closes, even if the test
    /// process is killed before it can kill the emulator.
    _stdin: Option<ChildStdin>,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> anyhow::Result<Process> {
        let out = std::fs::File::create(&log)?;
        command
            .stdin(Stdio::piped())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let stdin = child.stdin.take();
        Ok(Process {
            name,
            child,
            log,
            _stdin: stdin,
        })
    }

    /// The last `lines` lines of its output.
    fn tail(&self, lines: usize) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
            let _ = file.read_to_string(&mut text);
        }
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/<profile>` of this test binary (`target/<profile>/deps/...`).
fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("test binary not under target/<profile>/deps")
}

/// Builds (when stale) and finds the operator and service binaries of this
/// test's profile. `cargo test -p eventplane-tests` alone does not build
/// other packages' binaries, so the test asks cargo itself.
fn binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = profile_dir()?;
    let target = dir.parent().context("no target dir")?;
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile dir name")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // What cargo sets for a running test must not reach this build: build
    // scripts that watch these variables (ring's watches
    // CARGO_MANIFEST_DIR) would rerun, and every dependent crate rebuild,
    // once here and again in the next plain `cargo build`.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key)
        {
            build.env_remove(key);
        }
    }
    build
        .current_dir(workspace())
        .args(["build", "--quiet", "--locked"])
        .args(["-p", "eventplane-operator", "--bin", "eventplane-operator"])
        .args(["-p", "eventplane", "--bin", "eventplane"])
        .arg("--target-dir")
        .arg(target);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let started = Instant::now();
    let status = build
        .status()
        .context("running cargo build for the binaries")?;
    if !status.success() {
        bail!("cargo build of eventplane-operator and eventplane failed: {status}");
    }
    eprintln!("binaries ready in {:.1?}", started.elapsed());
    let operator = dir.join("eventplane-operator");
    let eventplane = dir.join("eventplane");
    for bin in [&operator, &eventplane] {
        if !bin.is_file() {
            bail!("{} missing after cargo build", bin.display());
        }
    }
    Ok((operator, eventplane))
}

/// Starts the emulator and returns it with its URL.
async fn start_emulator(dir: &Path, eventplane: &Path) -> anyhow::Result<(Process, String)> {
    let ready = dir.join("emulator.url");
    let script = workspace().join("tests/k8s/emulator.py");
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .arg("--crd")
        .arg(workspace().join("crds"))
        .arg("--image")
        .arg(format!("{IMAGE}={}", eventplane.display()))
        .arg("--ready-file")
        .arg(&ready)
        .arg("--exit-on-stdin-eof")
        .arg("--job-retry-delay")
        .arg("0.5")
        .args(["--pass-env", "NO_COLOR", "--pass-env", "RUST_LOG"])
        // Plain log files, for the rebuild's output too.
        .env("NO_COLOR", "1");
    let mut emulator =
        Process::spawn("emulator", command, dir.join("emulator.log")).map_err(|err| {
            err.context(
                "python3 is needed for the Kubernetes API emulator: install Python 3, then \
                 `pip install aiohttp pyyaml` (tests/ensure-services.sh does both)",
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(url) = std::fs::read_to_string(&ready) {
            return Ok((emulator, url.trim().to_string()));
        }
        if let Some(status) = emulator.exited() {
            bail!(
                "the Kubernetes API emulator exited ({status}) before listening; it needs python3 \
                 with aiohttp and PyYAML (`pip install aiohttp pyyaml`, as tests/ensure-services.sh does). \
                 Its output:\n{}",
                emulator.tail(40)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the emulator did not listen within 20 s:\n{}",
                emulator.tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Polls `probe` every 100 ms until it yields a value or `timeout` passes.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let started = Instant::now();
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => {
                eprintln!("{what}: after {:.1?}", started.elapsed());
                return Ok(value);
            }
            Ok(None) => {}
            Err(err) => last_error = Some(format!("{err:#}")),
        }
        if started.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last_error.map_or_else(String::new, |e| format!(" (last error: {e})"))
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Projection once its status describes its current generation, is
/// Ready and serves `version`.
fn ready_on(projection: &Projection, version: u32) -> bool {
    let Some(status) = &projection.status else {
        return false;
    };
    status.observed_generation.is_some()
        && status.observed_generation == projection.metadata.generation
        && status.active_version == Some(version)
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn relation_exists(pool: &PgPool, name: &str, kind: char) -> anyhow::Result<bool> {
    let found: Option<(String,)> = sqlx::query_as(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relname = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some_and(|(k,)| k.starts_with(kind)))
}

async fn versions(pool: &PgPool) -> anyhow::Result<Vec<(i32, String)>> {
    Ok(sqlx::query_as(
        "SELECT version, state FROM projection_versions WHERE projection = 'orders' ORDER BY version",
    )
    .fetch_all(pool)
    .await?)
}

/// Appends OrderPlaced events straight to the store, so the rebuild has a
/// log to replay (no command service runs here).
async fn place_orders(pool: &PgPool, count: usize) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for i in 0..count {
        let request: eventplane_store::events::AppendRequest = serde_json::from_value(json!({
            "streamId": format!("order-{i}"),
            "expectedVersion": "no_stream",
            "events": [{"type": "OrderPlaced",
                        "data": {"orderId": format!("{i}"), "customerId": "c-1", "total": "9.50"}}],
        }))?;
        let outcomes = eventplane_store::events::append(&mut *tx, &[&request]).await?;
        for outcome in outcomes {
            outcome.map_err(|err| anyhow::anyhow!("append refused: {err:?}"))?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn scenario(client: &Client, db: &TestDb, pool: &PgPool) -> anyhow::Result<()> {
    let projections: Api<Projection> = Api::namespaced(client.clone(), NAMESPACE);
    let jobs: Api<Job> = Api::namespaced(client.clone(), NAMESPACE);
    let apply = PatchParams::apply("eventplane-e2e");

    let manifest_text =
        std::fs::read_to_string(workspace().join("crds/examples/projection-orders.yaml"))?;
    let mut manifest: Value = serde_saphyr::from_str(&manifest_text)?;
    projections
        .patch("orders", &apply, &Patch::Apply(&manifest))
        .await
        .context("applying projection-orders.yaml")?;

    // Version 1: the finalizer, the tables and a Ready status.
    let first = wait_for(
        "orders Ready on version 1",
        Duration::from_secs(30),
        async || {
            Ok(projections
                .get_opt("orders")
                .await?
                .filter(|p| ready_on(p, 1)))
        },
    )
    .await?;
    assert_eq!(first.metadata.generation, Some(1));
    assert!(
        first
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == "eventplane.io/cleanup"),
        "the operator's finalizer: {:?}",
        first.metadata.finalizers
    );
    assert!(
        relation_exists(pool, "orders_v1", 'r').await?,
        "table orders_v1"
    );
    assert!(relation_exists(pool, "orders", 'v').await?, "view orders");
    assert_eq!(versions(pool).await?, vec![(1, "active".to_string())]);
    assert_eq!(
        catalog(pool).await?,
        vec![(
            "orders".to_string(),
            1,
            "operator:default/orders".to_string()
        )],
        "the Projection is declared in its database's catalog"
    );

    place_orders(pool, 3).await?;

    // Version 2: a rebuild Job, run for real, ending in the swap.
    manifest["spec"]["version"] = json!(2);
    let bumped = projections
        .patch("orders", &apply, &Patch::Apply(&manifest))
        .await?;
    assert_eq!(bumped.metadata.generation, Some(2), "a spec change");
    let uid = bumped.metadata.uid.clone();

    let job = wait_for(
        "rebuild Job orders-rebuild-v2",
        Duration::from_secs(20),
        async || Ok(jobs.get_opt("orders-rebuild-v2").await?),
    )
    .await?;
    let owner = job
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .context("the Job has a controller")?;
    assert_eq!(
        (owner.kind.as_str(), Some(owner.uid.clone())),
        ("Projection", uid)
    );
    let container = &job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("a pod template")?
        .containers[0];
    assert_eq!(container.image.as_deref(), Some(IMAGE));

    let done = wait_for(
        "rebuild Job Complete",
        Duration::from_secs(30),
        async || {
            let job = jobs.get("orders-rebuild-v2").await?;
            let conditions = job
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if let Some(failed) = conditions
                .iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
            {
                bail!("the rebuild Job failed: {failed:?}");
            }
            Ok(conditions
                .iter()
                .any(|c| c.type_ == "Complete" && c.status == "True")
                .then_some(job))
        },
    )
    .await?;
    assert_eq!(done.status.and_then(|s| s.succeeded), Some(1));

    assert_eq!(
        versions(pool).await?,
        vec![(1, "retained".to_string()), (2, "active".to_string())]
    );
    let second = wait_for(
        "orders Ready on version 2",
        Duration::from_secs(30),
        async || {
            Ok(projections
                .get_opt("orders")
                .await?
                .filter(|p| ready_on(p, 2)))
        },
    )
    .await?;
    assert_eq!(second.metadata.generation, Some(2));
    let status = second.status.unwrap_or_default();
    assert_eq!(status.active_table.as_deref(), Some("orders_v2"));
    assert_eq!(
        catalog(pool).await?,
        vec![(
            "orders".to_string(),
            2,
            "operator:default/orders".to_string()
        )],
        "the catalog holds the declared version"
    );
    assert!(status.catalog_generation.is_some(), "{status:?}");
    assert_eq!(
        status.served.as_deref(),
        Some("query 0/0, projector 0/0"),
        "no service process runs in this test"
    );
    assert!(
        relation_exists(pool, "orders_v2", 'r').await?,
        "table orders_v2"
    );
    // The view reads the rebuilt version, loaded from the whole log.
    let rows: (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
        .fetch_one(pool)
        .await?;
    assert_eq!(rows.0, 3, "the rebuild replayed the log into {}", db.name);

    // The phase changes were reported as Events on the Projection.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), NAMESPACE);
    let about_orders = events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("Projection") && r.name.as_deref() == Some("orders")
            })
        })
        .count();
    assert!(about_orders > 0, "no Event about the Projection");

    // Deletion: the finalizer is released (reclaimPolicy Retain keeps the
    // tables) and the rebuild Job goes with its owner.
    projections.delete("orders", &Default::default()).await?;
    wait_for("orders deleted", Duration::from_secs(20), async || {
        Ok(projections.get_opt("orders").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        jobs.get_opt("orders-rebuild-v2").await?.is_none(),
        "the rebuild Job is collected with its owner"
    );
    assert!(
        relation_exists(pool, "orders", 'v').await?,
        "reclaimPolicy Retain keeps the view"
    );
    assert!(
        catalog(pool).await?.is_empty(),
        "and no service serves it any more"
    );
    Ok(())
}

/// The catalog entries: name, declared version, who declared it.
async fn catalog(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i32, String)>> {
    Ok(
        sqlx::query_as("SELECT name, version, source FROM projection_catalog ORDER BY name")
            .fetch_all(pool)
            .await?,
    )
}

#[tokio::test]
async fn the_operator_binary_reconciles_a_projection_through_a_rebuild_job() -> anyhow::Result<()> {
    let started = Instant::now();
    let (operator_bin, eventplane_bin) = binaries()?;
    let dir = std::env::temp_dir().join(format!(
        "eventplane-operator-emulated-{}-{}",
        std::process::id(),
        started.elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;

    let (emulator, url) = start_emulator(&dir, &eventplane_bin).await?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: emulator\n  cluster:\n    server: {url}\n\
             users:\n- name: emulator\n  user:\n    token: emulator\n\
             contexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: {NAMESPACE}\n\
             current-context: emulator\n"
        ),
    )?;
    let client = client_for(&kubeconfig).await?;

    let db = TestDb::new().await;
    let pool = db.pool().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("eventplane-db".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "url".to_string(),
                    ByteString(db.url.clone().into_bytes()),
                )])),
                ..Secret::default()
            },
        )
        .await?;

    let mut command = Command::new(&operator_bin);
    command
        .args(["--no-leader-election", "--image", IMAGE])
        .args(["--listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("NO_COLOR", "1");
    let mut operator = Process::spawn("operator", command, dir.join("operator.log"))?;

    let outcome = scenario(&client, &db, &pool).await;
    if let Some(status) = operator.exited() {
        eprintln!("the operator exited early: {status}");
    }
    if let Err(err) = &outcome {
        eprintln!("FAILED: {err:#}");
        for process in [&operator, &emulator] {
            eprintln!(
                "---- last lines of the {} ({}) ----\n{}",
                process.name,
                process.log.display(),
                process.tail(80)
            );
        }
        if let Ok(Some(projection)) = Api::<Projection>::namespaced(client.clone(), NAMESPACE)
            .get_opt("orders")
            .await
        {
            eprintln!(
                "---- the Projection ----\n{}",
                serde_json::to_string_pretty(&projection).unwrap_or_default()
            );
        }
    }
    drop(operator);
    drop(emulator);
    pool.close().await;
    if outcome.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!("operator end-to-end took {:.1?}", started.elapsed());
    outcome
}
