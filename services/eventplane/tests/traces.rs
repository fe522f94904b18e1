//! OpenTelemetry traces end to end: the real binary exports over OTLP/gRPC
//! (configured only by the standard `OTEL_*` variables) to a receiver in
//! this test. One command's trace runs from its `command.handle` span
//! through the append, the projector batch that applies its event, and
//! that batch's cache invalidation; the event keeps the command's
//! `traceparent`; a batch that applies events of several commands joins
//! the first one's trace and links to the others; log lines inside a
//! request's span carry its trace id.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            if let Some(resource_attrs) = &resource.resource {
                for kv in &resource_attrs.attributes {
                    if kv.key == "service.name"
                        && let Some(Any::StringValue(name)) =
                            kv.value.as_ref().and_then(|v| v.value.clone())
                    {
                        self.services.lock().unwrap().push(name);
                    }
                }
            }
            for scope in resource.scope_spans {
                self.spans.lock().unwrap().extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    fn named(&self, name: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.clone())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace and span id of the `traceparent` stored with a stream's
/// first event.
async fn stored_trace(http: &reqwest::Client, base: &str, stream: &str) -> (String, String) {
    let page: Value = http
        .get(format!("{base}/v1/streams/{stream}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored = page["events"][0]["metadata"]["traceparent"]
        .as_str()
        .expect("the event's metadata holds a traceparent");
    let parts: Vec<&str> = stored.split('-').collect();
    (parts[1].to_string(), parts[2].to_string())
}

/// A `traceparent` of a made-up caller: trace `trace`, span `span`.
fn caller(trace: u128, span: u64) -> (String, String, String) {
    let trace = format!("{trace:032x}");
    let span = format!("{span:016x}");
    (format!("00-{trace}-{span}-01"), trace, span)
}

#[tokio::test]
async fn one_command_is_one_trace_from_http_to_invalidation() {
    let db = TestDb::new().await;
    let receiver = Receiver::default();
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let otlp = incoming.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(incoming),
    );

    let (api, admin) = (free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_eventplane"))
        .args(["dev", "--demo-orders", "0"])
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", redis_url())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env("OTEL_SERVICE_NAME", "eventplane-trace-test")
        // Every Postgres read counts as slow: its plan is logged inside
        // the request's span, which is the log line checked below.
        .env("EVENTPLANE_SLOW_QUERY_MS", "0")
        .env("EVENTPLANE_LOG_JSON", "true")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("eventplane dev starts");
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut sink) = sink.lock() {
                sink.push(line);
            }
        }
    });
    let http = client();
    let base = format!("http://127.0.0.1:{api}");
    let ready = eventually(Duration::from_secs(60), || async {
        http.get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "the dev stack became ready");

    // One command, in the caller's trace.
    let (sent, trace, caller_span) = caller(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7);
    let body = json!({"expectedVersion": "no_stream", "events": [
        {"type": "OrderPlaced", "data": {"orderId": "t1", "customerId": "c-1", "total": "10"}}]});
    let response = http
        .post(format!("{base}/v1/streams/order-t1/events"))
        .header("traceparent", &sent)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let token = response.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();

    // A read in a trace of its own, through Postgres (read your write).
    let (read_parent, read_trace, _) =
        caller(0x11112222333344445555666677778888, 0x0102030405060708);
    let row = http
        .get(format!(
            "{base}/v1/projections/orders/rows/t1?token={token}"
        ))
        .header("traceparent", &read_parent)
        .send()
        .await
        .unwrap();
    assert_eq!(row.status().as_u16(), 200);

    // The stored event carries the command span's context: the caller's
    // trace, the span Eventplane made for the command.
    let (stored_trace_id, command_span) = stored_trace(&http, &base, "order-t1").await;
    assert_eq!(stored_trace_id, trace, "the event is in the caller's trace");
    assert_ne!(
        command_span, caller_span,
        "the event names the command's own span"
    );

    let complete = eventually(Duration::from_secs(20), || async {
        !receiver.named("projector.invalidate").is_empty()
            && !receiver.named("query.handle").is_empty()
    })
    .await;
    assert!(
        complete,
        "the command's, batch's, invalidation's and query's spans arrived"
    );
    assert!(
        receiver
            .services
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "eventplane-trace-test"),
        "spans name the service OTEL_SERVICE_NAME gives"
    );

    let handle = receiver
        .named("command.handle")
        .into_iter()
        .find(|s| hex(&s.trace_id) == trace)
        .expect("a command.handle span in the caller's trace");
    assert_eq!(hex(&handle.span_id), command_span);
    assert_eq!(
        hex(&handle.parent_span_id),
        caller_span,
        "the caller is its parent"
    );
    assert_eq!(
        attr(&handle, "command.type"),
        Some(Any::StringValue("OrderPlaced".into()))
    );
    match attr(&handle, "command.size") {
        Some(Any::IntValue(size)) => assert_eq!(size as usize, body.to_string().len()),
        other => panic!("command.size is the body's size, got {other:?}"),
    }
    let append = receiver
        .named("command.append")
        .into_iter()
        .find(|s| hex(&s.trace_id) == trace)
        .expect("the append's span");
    assert_eq!(hex(&append.parent_span_id), command_span);

    let batch = receiver
        .named("projector.batch")
        .into_iter()
        .find(|s| {
            hex(&s.trace_id) == trace
                && attr(s, "projection") == Some(Any::StringValue("orders".into()))
        })
        .expect("the orders batch that applied the event is in the command's trace");
    assert_eq!(
        hex(&batch.parent_span_id),
        command_span,
        "the batch continues from the command's span"
    );
    let invalidate = receiver
        .named("projector.invalidate")
        .into_iter()
        .find(|s| s.parent_span_id == batch.span_id)
        .expect("the batch's invalidation is its child");
    assert_eq!(hex(&invalidate.trace_id), trace, "in the command's trace");

    let query = receiver
        .named("query.handle")
        .into_iter()
        .find(|s| hex(&s.trace_id) == read_trace)
        .expect("the read's span in its caller's trace");
    assert_eq!(
        attr(&query, "query.type"),
        Some(Any::StringValue("row".into()))
    );
    assert_eq!(
        attr(&query, "cache.layer"),
        Some(Any::StringValue("l3".into()))
    );

    // Many commands at once: every one's span is the parent of, or linked
    // from, the batch that applied its event.
    let mut commands = Vec::new();
    let sends = (0..20u64).map(|i| {
        let (parent, _, _) = caller(0xabc0_0000_0000_0000_0000_0000_0000_0000 + u128::from(i), 1 + i);
        let http = http.clone();
        let url = format!("{base}/v1/streams/order-m{i}/events");
        async move {
            let body = json!({"expectedVersion": "no_stream", "events": [
                {"type": "OrderPlaced", "data": {"orderId": format!("m{i}"), "customerId": "c-2", "total": "1"}}]});
            let r = http.post(url).header("traceparent", parent).json(&body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 201);
        }
    });
    futures::future::join_all(sends).await;
    for i in 0..20u64 {
        commands.push(stored_trace(&http, &base, &format!("order-m{i}")).await);
    }
    let all_followed = eventually(Duration::from_secs(20), || async {
        let batches = receiver.named("projector.batch");
        let mut followed: HashMap<(String, String), ()> = HashMap::new();
        for batch in &batches {
            followed.insert((hex(&batch.trace_id), hex(&batch.parent_span_id)), ());
            for link in &batch.links {
                followed.insert((hex(&link.trace_id), hex(&link.span_id)), ());
            }
        }
        commands.iter().all(|c| followed.contains_key(c))
    })
    .await;
    assert!(
        all_followed,
        "every command is the parent of or linked from a batch"
    );

    // An idle projector's empty batches are not exported.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for batch in receiver.named("projector.batch") {
        assert_ne!(
            attr(&batch, "events"),
            Some(Any::IntValue(0)),
            "an empty batch was exported"
        );
    }

    // The slow-query log line of the read carries the read's trace id.
    let carried = logs
        .lock()
        .unwrap()
        .iter()
        .any(|line| line.contains("slow query") && line.contains(&read_trace));
    assert!(
        carried,
        "a log line inside the read's span carries its trace id: {:?}",
        logs.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("slow"))
            .collect::<Vec<_>>()
    );

    child.kill().unwrap();
    let _ = child.wait();
    server.abort();
}
