//! Test support (the `testing` feature): a real Garage cluster on loopback ports, started as
//! external `garage` processes and stopped when dropped. `cargo xtask ci` installs Garage
//! once per machine and names the binary in [`GARAGE_ENV`].

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming the `garage` binary.
pub const GARAGE_ENV: &str = "AGENTKV_GARAGE";
/// Set (as `cargo xtask ci` does) to make a missing Garage fail the tests that need it.
pub const REQUIRE_ENV: &str = "AGENTKV_REQUIRE_MODEL";
/// The bucket every cluster has.
pub const BUCKET: &str = "agentkv";

/// The `garage` binary: [`GARAGE_ENV`], else `garage` in `$CARGO_HOME/bin` (where `cargo
/// install garage` puts it). When there is none this panics under [`REQUIRE_ENV`] and
/// otherwise warns on the terminal that the calling test did not run and returns `None`.
pub fn garage_binary() -> Option<PathBuf> {
    let found = std::env::var_os(GARAGE_ENV).map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
        Some(home.join("bin/garage")).filter(|p| p.exists())
    });
    if found.is_some() {
        return found;
    }
    let fix = "run `cargo install garage --locked --version 2.5.0` (or `cargo xtask ci`, which \
               does), or set AGENTKV_GARAGE to the binary";
    assert!(
        std::env::var_os(REQUIRE_ENV).is_none(),
        "Garage is missing; {fix}"
    );
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "warning: {test} did not run: Garage is missing; {fix}"
    );
    None
}

struct Node {
    config: PathBuf,
    rpc_port: u16,
    s3_port: u16,
    child: Option<Child>,
    /// `<node id>@<rpc address>`, once known.
    id: Option<String>,
}

/// A Garage cluster of a few nodes on loopback ports, replication factor 3 (or the node
/// count when smaller), with bucket [`BUCKET`] and one key allowed to read and write it.
pub struct Garage {
    binary: PathBuf,
    nodes: Vec<Node>,
    /// The secret the nodes share for RPC.
    rpc_secret: String,
    /// The key's id.
    pub key_id: String,
    /// The key's secret.
    pub secret: String,
}

/// A loopback port nothing listens on, below Linux's ephemeral range (32768 and up), so
/// that the outgoing connections of the many nodes the tests run cannot take it between
/// here and the node's bind; each call of a process hands out a different one.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        u32::from_str_radix(&random_hex(4), 16).expect("hex") % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

fn random_hex(bytes: usize) -> String {
    use std::hash::{BuildHasher, RandomState};
    (0..bytes.div_ceil(8))
        .map(|i| format!("{:016x}", RandomState::new().hash_one(i)))
        .collect::<String>()[..bytes * 2]
        .to_owned()
}

impl Garage {
    /// Starts `n` nodes with their data under `dir`, connects them, applies a layout and
    /// creates the bucket and key. Panics (it is test support) with Garage's output when a
    /// step fails.
    pub fn start(binary: &Path, dir: &Path, n: usize) -> Garage {
        let nodes = (0..n)
            .map(|i| {
                let node_dir = dir.join(format!("node{i}"));
                std::fs::create_dir_all(&node_dir).expect("node dir");
                Node {
                    config: node_dir.join("garage.toml"),
                    rpc_port: free_port(),
                    s3_port: free_port(),
                    child: None,
                    id: None,
                }
            })
            .collect();
        let mut garage = Garage {
            binary: binary.to_owned(),
            nodes,
            rpc_secret: random_hex(32),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..n {
            garage.start_node(i);
        }
        let ids: Vec<String> = garage
            .nodes
            .iter()
            .map(|node| node.id.clone().expect("a started node's id"))
            .collect();
        // Both ways: a node dials the peers it needs for its own quorums.
        for i in 0..n {
            for (j, id) in ids.iter().enumerate() {
                if i != j {
                    garage.cli(i, &["node", "connect", id]);
                }
            }
        }
        for id in &ids {
            let short = &id[..16];
            garage.cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        garage.cli(0, &["layout", "apply", "--version", "1"]);
        garage.cli(0, &["bucket", "create", BUCKET]);
        let out = garage.cli(0, &["key", "create", "agentkv-test"]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create`: {out}"))
        };
        garage.key_id = field("Key ID:");
        garage.secret = field("Secret key:");
        garage.cli(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "agentkv-test",
            ],
        );
        for i in 0..n {
            garage.wait_until_serving(i);
        }
        garage
    }

    /// Waits (up to 60 s) until node `i` answers a write and a read of a probe object: right
    /// after the layout is applied, a node may not be connected to the others yet, and its
    /// requests fail to reach a quorum.
    pub fn wait_until_serving(&self, i: usize) {
        // Short requests: a request to a node that is not connected yet waits for Garage's
        // RPC timeout (30 s) before it fails.
        let mut options = self.options(i);
        options.push(("timeout", "2s".to_owned()));
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let remote =
            crate::Remote::open(&format!("s3://{BUCKET}/probe"), &options).expect("open remote");
        let started = Instant::now();
        loop {
            let probe = format!("node{i}");
            let ok = remote.put_raw(&probe, vec![i as u8; 16]).is_ok()
                && remote.get_raw(&probe).is_ok_and(|b| b == vec![i as u8; 16]);
            if ok {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "garage node {i} does not serve S3 requests"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes node `i`'s configuration with its current ports.
    fn write_config(&self, i: usize) {
        let node = &self.nodes[i];
        let dir = node.config.parent().expect("the node's directory");
        let text = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = {rf}\n\
             rpc_secret = \"{secret}\"\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             allow_world_readable_secrets = true\n\
             [s3_api]\n\
             s3_region = \"garage\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n",
            meta = dir.join("meta").display(),
            data = dir.join("data").display(),
            rf = self.nodes.len().min(3),
            secret = self.rpc_secret,
            rpc = node.rpc_port,
            s3 = node.s3_port,
        );
        std::fs::write(&node.config, text).expect("write the node's config");
    }

    /// Starts node `i` again (or for the first time) and waits until it answers RPC; a
    /// restarted node is connected to the running ones both ways, and waited for until it
    /// and they serve requests again. A node that exits before it answers (a port was
    /// taken after all) is started again on new ports the first time; a restarted node keeps
    /// its ports, which the others and the tests' clients know.
    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let first = self.nodes[i].id.is_none();
        let mut attempts = 0;
        let id = loop {
            if first {
                self.write_config(i);
            }
            let node = &mut self.nodes[i];
            let log_path = node.config.with_file_name("log");
            let log = std::fs::File::create(&log_path).expect("log file");
            let child = Command::new(&self.binary)
                .arg("-c")
                .arg(&node.config)
                .arg("server")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start garage");
            node.child = Some(child);
            match self.node_id(i) {
                Ok(id) => break id,
                Err(why) => {
                    self.stop_node(i);
                    attempts += 1;
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    assert!(
                        first && attempts < 3,
                        "garage node {i} did not start: {why}\nits log:\n{log}"
                    );
                    self.nodes[i].rpc_port = free_port();
                    self.nodes[i].s3_port = free_port();
                }
            }
        };
        self.nodes[i].id = Some(id.clone());
        let peers: Vec<(usize, String)> = (0..self.nodes.len())
            .filter(|&j| j != i && self.nodes[j].child.is_some())
            .filter_map(|j| Some((j, self.nodes[j].id.clone()?)))
            .collect();
        // A restarted node would find its peers again by itself, after up to half a minute:
        // connect it now, both ways. (A first start is connected by `start`; a node
        // restarted while the others are down has no one to connect to, and cannot serve
        // without a quorum until they are back.)
        if first || peers.is_empty() {
            return;
        }
        for (j, peer) in &peers {
            self.cli(i, &["node", "connect", peer]);
            self.cli(*j, &["node", "connect", &id]);
        }
        for (j, _) in &peers {
            self.wait_until_serving(*j);
        }
        self.wait_until_serving(i);
    }

    /// Kills node `i` (SIGKILL: as a crash or a pulled cable looks to the others).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Node `i`'s id with its RPC address, once the node answers RPC (`garage status`
    /// goes through it; `node id` alone may read the key from disk), waiting up to 30 s;
    /// an error when the node exits, cannot bind a port or does not answer in that time.
    fn node_id(&mut self, i: usize) -> Result<String, String> {
        let started = Instant::now();
        let (binary, config) = (self.binary.clone(), self.nodes[i].config.clone());
        let garage = |args: &[&str]| {
            Command::new(&binary)
                .arg("-c")
                .arg(&config)
                .args(args)
                .output()
                .expect("run garage")
        };
        loop {
            let status = garage(&["status"]);
            if status.status.success() {
                let out = garage(&["node", "id", "-q"]);
                assert!(out.status.success(), "garage node id failed");
                return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
            }
            let child = self.nodes[i].child.as_mut().expect("a started node");
            if let Ok(Some(exit)) = child.try_wait() {
                return Err(format!("it exited ({exit})"));
            }
            // A server that cannot bind its S3 port does not exit: it stays "shutting down"
            // and its RPC answers every request with "No handler".
            let log = std::fs::read_to_string(config.with_file_name("log")).unwrap_or_default();
            if log.contains("Address already in use") {
                return Err("a port of its was taken".to_owned());
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "no answer in 30 s: {}",
                    String::from_utf8_lossy(&status.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `garage` against node `i` with `args`; returns its standard output.
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .args(args)
            .output()
            .expect("run garage");
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The options that make [`crate::Remote::open`] talk to node `i` with the cluster's key.
    pub fn options(&self, i: usize) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint(i)),
            ("aws_access_key_id", self.key_id.clone()),
            ("aws_secret_access_key", self.secret.clone()),
            ("aws_region", "garage".to_owned()),
        ]
    }

    /// A [`crate::Remote`] on `s3://agentkv/<prefix>` through node `i`.
    pub fn remote(&self, i: usize, prefix: &str) -> crate::Remote {
        let options = self.options(i);
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::Remote::open(&format!("s3://{BUCKET}/{prefix}"), &options).expect("open remote")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }
}
