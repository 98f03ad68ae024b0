//! Importing artifacts by digest (issue 17, items 5 and 6) on real agents: a real S3-compatible
//! server (`moto` in server mode, from examples/python/requirements.txt in `.dev/venv`) and a
//! plain HTTP server (Python's `http.server`), both started here on loopback and killed on drop.
//! Without the venv's moto the S3 part prints a SKIPPED line and is skipped.
//!
//! The test kills only the processes it started.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crux_tests::cluster::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_crux");
const PRESET: &str = "local";
const CONVERGE: Duration = Duration::from_secs(30);
/// The artifact: large enough that, at the import rate below, a kill lands mid-download.
const SIZE: usize = 12 << 20;
/// Node 1's import rate (`pastiche.import_rate`): the artifact takes about 3 s.
const RATE: &str = "4MiB";

/// Waits for `check` (polled, with a deadline); panics naming `what` with the last error.
fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    crux_tests::cluster::wait_for(timeout, check)
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A process started here, killed and reaped on drop.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn listening(addr: SocketAddr) -> Result<(), String> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        .map(drop)
        .map_err(|e| format!("{addr}: {e}"))
}

fn python() -> Option<PathBuf> {
    let p = repo().join(".dev/venv/bin/python");
    let ok = Command::new(&p)
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(p)
}

/// The artifact's bytes (not compressible, not all alike) and digest.
fn artifact() -> (Vec<u8>, String) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let digest = format!("sha256:{}", crux_pastiche::Digest::of(&bytes).hex());
    (bytes, digest)
}

const S3_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "crux-test"),
    ("AWS_SECRET_ACCESS_KEY", "crux-test-secret"),
    ("AWS_REGION", "us-east-1"),
];

fn cli_json(c: &Cluster, k: usize, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = c.cli(k, args);
    if !out.status.success() {
        return Err(format!(
            "crux {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("crux {args:?}: {e}"))
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn holds(c: &Cluster, k: usize, digest: &str) -> bool {
    let ls = cli_json(c, k, &["pastiche", "ls", "--json"]).expect("pastiche ls");
    ls["blobs"]
        .as_array()
        .expect("blobs")
        .iter()
        .any(|b| b["digest"] == digest)
}

fn imports_dir(c: &Cluster, k: usize) -> PathBuf {
    c.agent(k).dir.join("pastiche").join("imports")
}

fn import_files(c: &Cluster, k: usize) -> Vec<String> {
    std::fs::read_dir(imports_dir(c, k))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn artifacts_import_by_digest_from_s3_and_http() {
    let (bytes, digest) = artifact();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);

    // An HTTP server with the artifact.
    let www = tempfile::tempdir().expect("temp dir");
    std::fs::write(www.path().join("app.bin"), &bytes).expect("write artifact");
    let http_addr = SocketAddr::new(ip, free_port(ip));
    let _http = Owned(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(http_addr.port().to_string())
            .current_dir(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server"),
    );
    wait_for("the HTTP server", Duration::from_secs(20), || {
        listening(http_addr)
    });

    // The S3 server, with a bucket holding the artifact.
    let py = python();
    let s3_addr = SocketAddr::new(ip, free_port(ip));
    let _s3 = py.as_ref().map(|py| {
        let child = Owned(
            Command::new(py)
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
                .arg(s3_addr.port().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto server"),
        );
        wait_for("the S3 server", Duration::from_secs(30), || {
            listening(s3_addr)
        });
        let upload = format!(
            "import boto3, sys\n\
             s3 = boto3.client('s3', endpoint_url='http://{s3_addr}')\n\
             s3.create_bucket(Bucket='artifacts')\n\
             s3.put_object(Bucket='artifacts', Key='builds/app.bin', Body=open(sys.argv[1], 'rb').read())\n"
        );
        let ok = Command::new(py)
            .args(["-c", &upload])
            .arg(www.path().join("app.bin"))
            .envs(S3_ENV)
            .status()
            .expect("upload");
        assert!(ok.success(), "uploading to the S3 server failed");
        child
    });
    if py.is_none() {
        eprintln!(
            "import: SKIPPED the S3 part (no {} with moto: run dev/setup.sh)",
            repo().join(".dev/venv/bin/python").display()
        );
    }

    let mut c = Cluster::new(BIN, 1, 2, PRESET);
    for k in 1..=2 {
        c.append_config(
            k,
            &format!("[pastiche]\ns3_endpoint = \"http://{s3_addr}\"\nimport_rate = \"{RATE}\"\n"),
        );
    }
    let env: Vec<(&str, &std::ffi::OsStr)> = S3_ENV
        .iter()
        .map(|(k, v)| (*k, std::ffi::OsStr::new(*v)))
        .collect();
    c.start_with_env(1, &env);
    c.start_with_env(2, &env);
    c.stable_agreement(&[1, 2], Duration::from_secs(2), CONVERGE);

    let http_url = format!("http://{http_addr}/app.bin");
    // Bad input: a digest the source does not serve, an unknown file, a bad URL. Nothing is
    // left behind.
    let err = failed(&c.cli(1, &["pastiche", "fetch", &http_url, "--digest", &wrong]));
    assert!(
        err.contains("digest mismatch") && err.contains(&digest),
        "mismatch names the digest found: {err}"
    );
    let err = failed(&c.cli(
        1,
        &[
            "pastiche",
            "fetch",
            &format!("http://{http_addr}/nope.bin"),
            "--digest",
            &digest,
        ],
    ));
    assert!(err.contains("not found at the source"), "{err}");
    let err = failed(&c.cli(1, &["pastiche", "fetch", "ftp://x/y", "--digest", &digest]));
    assert!(err.contains("scheme `ftp`"), "{err}");
    assert!(!holds(&c, 1, &digest), "nothing imported");
    assert_eq!(import_files(&c, 1), Vec::<String>::new(), "nothing left");

    if py.is_some() {
        let s3_url = "s3://artifacts/builds/app.bin";
        let err = failed(&c.cli(
            1,
            &[
                "pastiche",
                "fetch",
                "s3://artifacts/builds/other.bin",
                "--digest",
                &digest,
            ],
        ));
        assert!(err.contains("not found at the source"), "{err}");

        // kill -9 mid-download, then a second fetch goes on from the bytes kept.
        let mut fetch = Owned(
            c.command()
                .args(["pastiche", "fetch", s3_url, "--digest", &digest, "--socket"])
                .arg(&c.agent(1).socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("crux pastiche fetch"),
        );
        let part = imports_dir(&c, 1).join(format!("{}.part", &digest[7..]));
        wait_for(
            "a partial import",
            Duration::from_secs(20),
            || match std::fs::metadata(&part).map(|m| m.len()) {
                Ok(n) if n >= (SIZE / 4) as u64 => Ok(()),
                other => Err(format!("{}: {other:?}", part.display())),
            },
        );
        c.kill9(1);
        let _ = fetch.0.wait();
        assert!(
            std::fs::metadata(&part).is_ok_and(|m| (m.len() as usize) < SIZE),
            "the partial import is kept, not complete"
        );
        c.start_with_env(1, &env);
        c.stable_agreement(&[1, 2], Duration::from_secs(2), CONVERGE);
        assert!(!holds(&c, 1, &digest), "a partial import is never visible");
        let r = cli_json(
            &c,
            1,
            &["pastiche", "fetch", s3_url, "--digest", &digest, "--json"],
        )
        .expect("the second fetch");
        assert_eq!(r["from"], "source", "{r}");
        let resumed = r["resumed"].as_u64().unwrap();
        assert!(resumed >= (SIZE / 4) as u64, "resumed {resumed}: {r}");
        assert_eq!(
            r["downloaded"].as_u64().unwrap() + resumed,
            SIZE as u64,
            "{r}"
        );
        assert!(holds(&c, 1, &digest));
        assert_eq!(
            import_files(&c, 1),
            Vec::<String>::new(),
            "import files gone"
        );
        let out = c.agent(1).dir.join("out.bin");
        let got = c.cli(
            1,
            &["pastiche", "get", &digest, "-o", out.to_str().unwrap()],
        );
        assert!(got.status.success(), "{got:?}");
        assert!(
            std::fs::read(&out).unwrap() == bytes,
            "the bytes are the artifact's"
        );

        // Node 2 names the same source: a peer holds it, so the source is not asked again.
        let r = cli_json(
            &c,
            2,
            &["pastiche", "fetch", s3_url, "--digest", &digest, "--json"],
        )
        .expect("fetch on node 2");
        assert_eq!(r["from"], "peers", "{r}");
        // Again on node 1: already there.
        let r = cli_json(
            &c,
            1,
            &["pastiche", "fetch", s3_url, "--digest", &digest, "--json"],
        )
        .expect("fetch again");
        assert_eq!(r["from"], "cache", "{r}");
        c.cli(1, &["pastiche", "rm", &digest]);
        c.cli(2, &["pastiche", "rm", &digest]);
    }

    // The same from the HTTP server, on a node that does not hold it.
    wait_for("no holder left", Duration::from_secs(10), || {
        if holds(&c, 1, &digest) || holds(&c, 2, &digest) {
            Err("still held".to_string())
        } else {
            Ok(())
        }
    });
    let r = cli_json(
        &c,
        2,
        &[
            "pastiche", "fetch", &http_url, "--digest", &digest, "--json",
        ],
    )
    .expect("fetch over http");
    assert_eq!(r["from"], "source", "{r}");
    assert_eq!(r["size"].as_u64(), Some(SIZE as u64), "{r}");
    assert!(holds(&c, 2, &digest));
}
