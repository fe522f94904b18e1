//! The admin listener's probes as the chart uses them: readiness follows
//! the database (a pod whose database is gone leaves the Service), liveness
//! does not (restarting would not bring the database back). The database
//! goes away for real: the process reaches Postgres through a TCP relay
//! that the test cuts, dropping every open connection and refusing new
//! ones, then restores.

mod common;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventplane::server::Roles;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A loopback TCP relay to Postgres that can be cut and restored.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let up = up.clone();
            let connections = connections.clone();
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        // The database is "gone": the connection closes at once.
                        drop(client);
                        continue;
                    }
                    connections.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }));
                }
            }
        });
        Relay {
            addr,
            up,
            connections,
            accept,
        }
    }

    /// Drops every relayed connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `db.url` with its host and port replaced by the relay's.
fn through(url: &str, relay: SocketAddr) -> (String, SocketAddr) {
    let mut parsed = url::Url::parse(url).unwrap();
    let host = parsed.host_str().unwrap().to_string();
    let port = parsed.port().unwrap_or(5432);
    let upstream = (host.as_str(), port)
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    parsed.set_host(Some(&relay.ip().to_string())).unwrap();
    parsed.set_port(Some(relay.port())).unwrap();
    (parsed.to_string(), upstream)
}

async fn status(http: &reqwest::Client, admin: SocketAddr, path: &str) -> u16 {
    http.get(format!("http://{admin}{path}"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

async fn readiness_follows_the_database(roles: Roles) {
    let db = TestDb::new().await;
    let upstream = through(&db.url, "127.0.0.1:1".parse().unwrap()).1;
    let relay = Relay::start(upstream).await;
    let (url, _) = through(&db.url, relay.addr);
    let mut config = local(&url, Some(&redis_url()), orders());
    config.roles = roles;
    config.acquire_timeout = Duration::from_millis(500);
    let stack = stack_with(config).await;
    let http = client();
    let admin = stack.admin_addr;

    assert_eq!(status(&http, admin, "/readyz").await, 200, "ready at start");
    assert_eq!(status(&http, admin, "/healthz").await, 200);

    relay.cut();
    assert!(
        eventually(Duration::from_secs(30), || async {
            status(&http, admin, "/readyz").await == 503
        })
        .await,
        "readyz answers 503 while the database is unreachable"
    );
    // Liveness stays up through the outage, however often it is asked.
    for _ in 0..5 {
        assert_eq!(status(&http, admin, "/healthz").await, 200);
        assert_eq!(status(&http, admin, "/readyz").await, 503);
    }
    let metrics = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        metrics.status().as_u16(),
        200,
        "metrics are served in an outage"
    );

    relay.restore();
    assert!(
        eventually(Duration::from_secs(30), || async {
            status(&http, admin, "/readyz").await == 200
        })
        .await,
        "ready again once the database is back"
    );
    assert_eq!(status(&http, admin, "/healthz").await, 200);
}

#[tokio::test]
async fn query_role_readiness_follows_the_database_and_liveness_does_not() {
    readiness_follows_the_database(Roles {
        command: false,
        projector: false,
        query: true,
    })
    .await;
}

#[tokio::test]
async fn command_role_readiness_follows_the_database_and_liveness_does_not() {
    readiness_follows_the_database(Roles {
        command: true,
        projector: false,
        query: false,
    })
    .await;
}

#[tokio::test]
async fn projector_role_readiness_follows_the_database_and_liveness_does_not() {
    readiness_follows_the_database(Roles {
        command: false,
        projector: true,
        query: false,
    })
    .await;
}
