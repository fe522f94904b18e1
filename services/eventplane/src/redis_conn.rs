//! The Redis that holds L2 and carries invalidations: one server, or a
//! Redis Cluster. `REDIS_URL` names either:
//!
//! - `redis://host:port` (or `rediss://`): one server;
//! - `redis+cluster://host:port,host:port,...` (or `rediss+cluster://`):
//!   the seed nodes of a cluster; the client learns the rest and follows
//!   failovers and resharding (MOVED / ASK).
//!
//! Every key of one projection carries the same hash tag (see
//! `invalidation::Scope`), so each script stays in one slot. Pub/sub is
//! cluster-wide in Redis Cluster: a message published on any node reaches
//! subscribers on every node, so a query process subscribes on one node at
//! a time and moves to the next when that one goes away.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Connection and response timeouts: a Redis that does not answer within
/// this is treated as down and reads go to Postgres.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Where Redis is, parsed from `REDIS_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    /// Seed node URLs (`redis://host:port`).
    Cluster(Vec<String>),
}

impl RedisTarget {
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("REDIS_URL {url:?} is not a URL"))?;
        let node_scheme = match scheme {
            "redis" | "rediss" | "redis+unix" | "unix" => {
                return Ok(RedisTarget::Single(url.to_string()));
            }
            "redis+cluster" => "redis",
            "rediss+cluster" => "rediss",
            other => {
                return Err(format!(
                    "REDIS_URL scheme {other:?} is not redis, rediss, redis+cluster or rediss+cluster"
                ));
            }
        };
        // Credentials, if any, go with every node.
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        let nodes: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{node_scheme}://{auth}{h}"))
            .collect();
        if nodes.is_empty() {
            return Err(format!("REDIS_URL {url:?} names no cluster node"));
        }
        Ok(RedisTarget::Cluster(nodes))
    }

    /// The servers a subscription may be made on, in the order to try them.
    pub fn subscription_urls(&self) -> Vec<String> {
        match self {
            RedisTarget::Single(url) => vec![url.clone()],
            RedisTarget::Cluster(nodes) => nodes.clone(),
        }
    }
}

/// A connection commands go through; cheap to clone, reconnects by itself.
#[derive(Clone)]
pub enum Redis {
    Single(ConnectionManager),
    /// The connection, and the seed nodes for what must reach every node.
    Cluster(ClusterConnection, Arc<[String]>),
}

pub async fn connect(target: &RedisTarget) -> redis::RedisResult<Redis> {
    match target {
        RedisTarget::Single(url) => {
            let client = redis::Client::open(url.as_str())?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(1);
            Ok(Redis::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
        RedisTarget::Cluster(nodes) => {
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .connection_timeout(TIMEOUT)
                .response_timeout(TIMEOUT)
                .retries(1)
                .build()?;
            Ok(Redis::Cluster(
                client.get_async_connection().await?,
                nodes.clone().into(),
            ))
        }
    }
}

impl Redis {
    /// PUBLISH that reaches subscribers even while part of a cluster is
    /// down: sent through every node that answers (a cluster forwards it
    /// to the others, so subscribers may get it more than once). Fails only
    /// if no node took it.
    pub async fn publish_everywhere(&self, channel: &str, payload: &str) -> redis::RedisResult<()> {
        match self {
            Redis::Single(c) => publish(&mut c.clone(), channel, payload).await,
            Redis::Cluster(_, nodes) => {
                let mut last = None;
                let mut sent = false;
                for node in nodes.iter() {
                    let result = async {
                        let client = redis::Client::open(node.as_str())?;
                        let config = redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(TIMEOUT))
                            .set_response_timeout(Some(TIMEOUT));
                        let mut conn = client
                            .get_multiplexed_async_connection_with_config(&config)
                            .await?;
                        publish(&mut conn, channel, payload).await
                    }
                    .await;
                    match result {
                        Ok(_) => sent = true,
                        Err(err) => last = Some(err),
                    }
                }
                match (sent, last) {
                    (false, Some(err)) => Err(err),
                    _ => Ok(()),
                }
            }
        }
    }
}

async fn publish(
    conn: &mut impl ConnectionLike,
    channel: &str,
    payload: &str,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async::<i64>(conn)
        .await
        .map(drop)
}

/// `connect` on a `REDIS_URL`.
pub async fn open(url: &str) -> redis::RedisResult<Redis> {
    let target = RedisTarget::parse(url).map_err(|why| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "invalid REDIS_URL",
            why,
        ))
    })?;
    connect(&target).await
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Redis::Single(c) => c.req_packed_command(cmd),
            Redis::Cluster(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Redis::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Redis::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Redis::Single(c) => c.get_db(),
            Redis::Cluster(c, _) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_name_one_server() {
        assert_eq!(
            RedisTarget::parse("redis://127.0.0.1:6379"),
            Ok(RedisTarget::Single("redis://127.0.0.1:6379".into()))
        );
    }

    #[test]
    fn cluster_urls_name_every_seed_with_its_credentials() {
        assert_eq!(
            RedisTarget::parse("redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/"),
            Ok(RedisTarget::Cluster(vec![
                "redis://u:p@10.0.0.1:7000".into(),
                "redis://u:p@10.0.0.2:7001".into()
            ]))
        );
        assert_eq!(
            RedisTarget::parse("rediss+cluster://a:1").unwrap(),
            RedisTarget::Cluster(vec!["rediss://a:1".into()])
        );
    }

    #[test]
    fn other_schemes_and_empty_clusters_are_refused() {
        assert!(RedisTarget::parse("http://x").is_err());
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("127.0.0.1:6379").is_err());
    }
}
