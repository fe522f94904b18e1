//! The open-loop load generator: requests fall due at a fixed rate and
//! each one's latency runs from the moment it fell due, so a server that
//! falls behind is charged for the queue it causes (no coordinated
//! omission). It runs in a child process of its own (the bench binary
//! again, told so by [`SPEC_ENV`]) on one thread, so it takes neither the
//! server's runtime nor much of the machine's CPU, and its CPU shows as the
//! client's in the report.
//!
//! A pacing thread wakes when the next request falls due (the tokio timer
//! ticks in whole milliseconds, too coarse at 20,000 requests a second)
//! and hands every due request to the connections, each a keep-alive
//! HTTP/1.1 connection with one request in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{CONTENT_TYPE, HOST};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc};

use super::load::{self, Phase};
use super::yardstick::cpu::{CpuUse, Sampler};

/// The environment variable that makes the bench binary an open-loop
/// worker, which reads its [`Spec`] as JSON from stdin.
pub const SPEC_ENV: &str = "EVENTPLANE_BENCH_OPEN_LOOP";

/// What the worker sends. In `paths` (taken in turn) and `body`, `{n}`
/// stands for the request's number, so each request can name a stream of
/// its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// `host:port` of the server.
    pub addr: String,
    pub method: String,
    pub paths: Vec<String>,
    pub body: Option<String>,
    pub rate: f64,
    pub duration_ms: u64,
    pub connections: usize,
    /// The status a request must get to count as answered.
    pub expect: u16,
}

/// What the worker reports.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    /// Requests that got the expected status.
    ok: u64,
    /// Other statuses by code, and failures by kind.
    others: BTreeMap<String, u64>,
    first_error: Option<String>,
    elapsed_us: u64,
    /// Answers per `eventplane-cache` header value.
    layers: BTreeMap<String, u64>,
    /// The latency histogram of the expected answers (µs), HDR V2, base64.
    latency: String,
    /// How late the pacing thread handed out requests, P99 (µs): the
    /// part of the latencies the generator itself may have added.
    pacing_p99_us: u64,
    /// Latency percentiles (µs) for a reader of the report itself.
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

/// Runs `spec` in a worker process and returns its figures, with the CPU
/// every party used meanwhile.
pub async fn run(spec: &Spec) -> anyhow::Result<(Phase, CpuUse)> {
    let exe = std::env::current_exe().context("the bench binary's path")?;
    let name = exe
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.chars().take(15).collect::<String>())
        .unwrap_or_default();
    // The worker is this binary, so /proc names it as it names this one;
    // the sampler tells them apart by pid.
    let sampler = Sampler::start(&name);
    let mut child = tokio::process::Command::new(&exe)
        .env(SPEC_ENV, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the open-loop worker")?;
    // The spec goes through stdin: its paths can be far more than an
    // environment variable holds.
    let mut stdin = child.stdin.take().context("the worker's stdin")?;
    stdin.write_all(&serde_json::to_vec(spec)?).await?;
    drop(stdin);
    let output = child
        .wait_with_output()
        .await
        .context("running the open-loop worker")?;
    let cpu = sampler.finish();
    if !output.status.success() {
        bail!(
            "the open-loop worker failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let outcome: Outcome = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "the open-loop worker's report: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    Ok((outcome.into_phase(spec.rate)?, cpu))
}

impl Outcome {
    fn into_phase(self, rate: f64) -> anyhow::Result<Phase> {
        let raw = base64::engine::general_purpose::STANDARD.decode(&self.latency)?;
        let latency: Histogram<u64> = Deserializer::new()
            .deserialize(&mut raw.as_slice())
            .context("the worker's latency histogram")?;
        let mut phase = Phase::empty(Some(rate));
        phase.ok = self.ok;
        phase.errors = self.others.values().sum();
        phase.first_error = self.first_error;
        phase.elapsed = Duration::from_micros(self.elapsed_us);
        phase.pacing_p99_ms = Some(self.pacing_p99_us as f64 / 1000.0);
        phase
            .latency
            .add(&latency)
            .context("histograms with equal bounds")?;
        for (layer, n) in self.layers {
            let tag = match layer.as_str() {
                "l1" => "l1",
                "l2" => "l2",
                "l3" => "l3",
                _ => "other",
            };
            *phase.tags.entry(tag).or_default() += n;
        }
        Ok(phase)
    }
}

/// The worker process: runs the spec it reads from stdin and prints its
/// [`Outcome`] as JSON.
pub fn worker() -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_reader(std::io::stdin()).context("the open-loop spec")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(drive(spec))?;
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// A request that fell due: its number and when.
type Due = (u64, Instant);

/// One connection's tally.
struct Tally {
    ok: u64,
    others: BTreeMap<String, u64>,
    first_error: Option<String>,
    layers: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            ok: 0,
            others: BTreeMap::new(),
            first_error: None,
            layers: BTreeMap::new(),
            latency: load::histogram(),
        }
    }

    fn failed(&mut self, kind: &str, error: String) {
        *self.others.entry(kind.to_string()).or_default() += 1;
        self.first_error.get_or_insert(error);
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (k, n) in other.others {
            *self.others.entry(k).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        for (k, n) in other.layers {
            *self.layers.entry(k).or_default() += n;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with equal bounds");
    }
}

async fn drive(spec: Spec) -> anyhow::Result<Outcome> {
    let spec = Arc::new(spec);
    let (due, queue) = mpsc::unbounded_channel::<Due>();
    let queue = Arc::new(Mutex::new(queue));
    // Connections first, so the first requests do not wait for handshakes.
    let mut connections = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections.max(1) {
        let stream = tokio::net::TcpStream::connect(&spec.addr)
            .await
            .with_context(|| format!("connecting to {}", spec.addr))?;
        connections.push(stream);
    }
    let started = Instant::now();
    let pacer = {
        let (rate, total) = (
            spec.rate.max(1.0),
            (spec.rate.max(1.0) * spec.duration_ms as f64 / 1000.0).ceil() as u64,
        );
        std::thread::spawn(move || pace(started, rate, total, due))
    };
    let workers: Vec<_> = connections
        .into_iter()
        .map(|stream| tokio::spawn(connection(stream, spec.clone(), queue.clone())))
        .collect();
    let mut tally = Tally::new();
    for worker in workers {
        tally.merge(worker.await?);
    }
    let late = pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    let mut latency = Vec::new();
    V2Serializer::new()
        .serialize(&tally.latency, &mut latency)
        .map_err(|e| anyhow::anyhow!("serializing the latency histogram: {e:?}"))?;
    Ok(Outcome {
        ok: tally.ok,
        others: tally.others,
        first_error: tally.first_error,
        elapsed_us: started.elapsed().as_micros() as u64,
        layers: tally.layers,
        latency: base64::engine::general_purpose::STANDARD.encode(latency),
        pacing_p99_us: late.value_at_quantile(0.99),
        p50_us: tally.latency.value_at_quantile(0.5),
        p99_us: tally.latency.value_at_quantile(0.99),
        p999_us: tally.latency.value_at_quantile(0.999),
    })
}

/// Hands out request `i` at `started + i / rate`, never before; returns
/// after the last (dropping the sender ends the connections' queue), with
/// how late it handed each out: the generator's own share of the
/// latencies, when the machine did not run it in time.
fn pace(
    started: Instant,
    rate: f64,
    total: u64,
    due: mpsc::UnboundedSender<Due>,
) -> Histogram<u64> {
    let mut late = load::histogram();
    for i in 0..total {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        load::record(&mut late, at.elapsed());
        if due.send((i, at)).is_err() {
            break;
        }
    }
    late
}

async fn connection(
    stream: tokio::net::TcpStream,
    spec: Arc<Spec>,
    queue: Arc<Mutex<mpsc::UnboundedReceiver<Due>>>,
) -> Tally {
    let mut tally = Tally::new();
    let mut sender = match open(stream).await {
        Ok(sender) => Some(sender),
        Err(err) => {
            tally.failed("connect", format!("{err:#}"));
            None
        }
    };
    loop {
        let Some((n, at)) = queue.lock().await.recv().await else {
            return tally;
        };
        if sender.is_none() {
            sender = match reconnect(&spec.addr).await {
                Ok(s) => Some(s),
                Err(err) => {
                    tally.failed("connect", err);
                    continue;
                }
            };
        }
        let Some(live) = sender.as_mut() else {
            continue;
        };
        match send(live, &spec, n).await {
            Ok((status, layer)) => {
                if status == spec.expect {
                    tally.ok += 1;
                    load::record(&mut tally.latency, at.elapsed());
                    if let Some(layer) = layer {
                        *tally.layers.entry(layer).or_default() += 1;
                    }
                } else {
                    tally.failed(&status.to_string(), format!("status {status}"));
                }
            }
            Err(err) => {
                tally.failed("io", err);
                // The connection may be broken; the next request opens another.
                sender = None;
            }
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn open(stream: tokio::net::TcpStream) -> anyhow::Result<Sender> {
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn reconnect(addr: &str) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    open(stream).await.map_err(|e| format!("{e:#}"))
}

/// Sends request `n` and reads its whole answer; returns its status and
/// cache layer.
async fn send(sender: &mut Sender, spec: &Spec, n: u64) -> Result<(u16, Option<String>), String> {
    let number = n.to_string();
    let path = spec.paths[(n % spec.paths.len().max(1) as u64) as usize].replace("{n}", &number);
    let body = spec
        .body
        .as_deref()
        .map_or_else(Bytes::new, |b| Bytes::from(b.replace("{n}", &number)));
    let mut request = Request::builder()
        .method(spec.method.as_str())
        .uri(path)
        .header(HOST, &spec.addr);
    if !body.is_empty() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let layer = response
        .headers()
        .get("eventplane-cache")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, layer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::post;

    /// A server that answers `POST /s/{n}` 201 when the body names the same
    /// number, else 409.
    async fn server() -> String {
        let app = Router::new().route(
            "/s/{n}",
            post(
                |axum::extract::Path(n): axum::extract::Path<String>, body: String| async move {
                    if body == format!("{{\"n\":{n}}}") {
                        axum::http::StatusCode::CREATED
                    } else {
                        axum::http::StatusCode::CONFLICT
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn every_request_due_is_sent_numbered_and_counted_by_status() {
        let addr = server().await;
        let spec = Spec {
            addr,
            method: "POST".into(),
            paths: vec!["/s/{n}".into()],
            body: Some("{\"n\":{n}}".into()),
            rate: 400.0,
            duration_ms: 250,
            connections: 4,
            expect: 201,
        };
        let outcome = drive(spec.clone()).await.unwrap();
        assert_eq!(outcome.ok, 100, "{outcome:?}");
        assert!(outcome.others.is_empty(), "{outcome:?}");
        let phase = outcome.into_phase(spec.rate).unwrap();
        assert_eq!(phase.latency.len(), 100);
        assert_eq!(phase.target_rate, Some(400.0));

        // Another expected status: every answer counts as the other one.
        let outcome = drive(Spec {
            expect: 200,
            ..spec
        })
        .await
        .unwrap();
        assert_eq!(outcome.ok, 0);
        assert_eq!(outcome.others.get("201"), Some(&100), "{outcome:?}");
    }
}
