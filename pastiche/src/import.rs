//! Importing artifacts from outside the flock by digest: `s3://BUCKET/KEY` (any S3-compatible
//! server) and `http(s)://…`, through the `object_store` crate.
//!
//! The caller names the digest it wants; the bytes are streamed from the source, hashed as they
//! come ([`crate::store::Import`]), and become visible in the cache only when the whole digest
//! matches. A mismatch deletes them and says which digest the source served. A transfer that
//! breaks is taken up again from where it stopped (a ranged read), a few times with back-off;
//! one that fails for good leaves nothing behind. Bytes kept by an agent killed mid-download
//! are reused by the next import of the same digest from the same source.
//!
//! S3 settings come from the usual AWS environment variables of the agent (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`,
//! `AWS_ENDPOINT_URL`, …) and may be set in the config ([`S3Settings`]): config wins.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::digest::Digest;
use crate::store::{Import, ImportWriteError, Store, StoreError};

/// How many times a broken transfer is taken up again before the import fails.
pub const RESUME_TRIES: u32 = 5;

/// Bytes written between two fsyncs of the partial file (what a crash can lose).
const FLUSH_EVERY: u64 = 8 << 20;

/// S3 settings from the config; unset ones come from the agent's environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// The S3 endpoint (`http://127.0.0.1:9000` for a local server); http endpoints are allowed.
    pub endpoint: Option<String>,
    /// The region.
    pub region: Option<String>,
}

/// Where an artifact comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// An object in an S3 bucket.
    S3 {
        /// The bucket.
        bucket: String,
        /// The object's key.
        key: String,
    },
    /// A file on an HTTP(S) server.
    Http {
        /// `scheme://host[:port]`.
        base: String,
        /// The path (percent-encoded as in the URL).
        path: String,
    },
}

impl Source {
    /// Parses `s3://BUCKET/KEY`, `http://…` or `https://…`.
    pub fn parse(url: &str) -> Result<Source, ImportError> {
        let bad = |why: &str| ImportError::BadUrl {
            url: url.to_string(),
            why: why.to_string(),
        };
        let u = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match u.scheme() {
            "s3" => {
                let bucket = u
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| bad("no bucket"))?;
                let key = u.path().trim_start_matches('/');
                if key.is_empty() {
                    return Err(bad("no object key"));
                }
                let key = percent_decode(key).ok_or_else(|| bad("bad percent-encoding"))?;
                Ok(Source::S3 {
                    bucket: bucket.to_string(),
                    key,
                })
            }
            "http" | "https" => {
                let host = u.host_str().ok_or_else(|| bad("no host"))?;
                if u.path().trim_start_matches('/').is_empty() {
                    return Err(bad("no file path"));
                }
                let base = match u.port() {
                    Some(p) => format!("{}://{host}:{p}", u.scheme()),
                    None => format!("{}://{host}", u.scheme()),
                };
                Ok(Source::Http {
                    base,
                    path: u.path().to_string(),
                })
            }
            other => Err(bad(&format!(
                "scheme `{other}` is not one of s3, http, https"
            ))),
        }
    }

    fn open(&self, s3: &S3Settings) -> Result<(Arc<dyn ObjectStore>, ObjectPath), String> {
        match self {
            Source::S3 { bucket, key } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                if let Some(e) = &s3.endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &s3.region {
                    b = b.with_region(r);
                }
                let endpoint = s3
                    .endpoint
                    .clone()
                    .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                    .or_else(|| std::env::var("AWS_ENDPOINT").ok());
                if endpoint.is_some_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                let store = b.build().map_err(|e| e.to_string())?;
                let path = ObjectPath::parse(key).map_err(|e| e.to_string())?;
                Ok((Arc::new(store), path))
            }
            Source::Http { base, path } => {
                let store = HttpBuilder::new()
                    .with_url(base.clone())
                    .with_client_options(ClientOptions::new().with_allow_http(true))
                    .build()
                    .map_err(|e| e.to_string())?;
                let path = ObjectPath::from_url_path(path).map_err(|e| e.to_string())?;
                Ok((Arc::new(store), path))
            }
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Why an import failed. Nothing is left in the cache after any of them.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The URL is not one this can import from.
    #[error("bad source URL {url:?}: {why}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
    /// The source has no such object.
    #[error("{url}: not found at the source")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// The source refused (403/401: credentials or permissions).
    #[error("{url}: the source refused access: {why}")]
    Denied {
        /// The URL.
        url: String,
        /// The source's answer.
        why: String,
    },
    /// The source failed (or could not be reached) after every retry.
    #[error("{url}: {why}")]
    Source {
        /// The URL.
        url: String,
        /// The last error.
        why: String,
    },
    /// The source served other bytes than the digest names (they were deleted).
    #[error("{url}: digest mismatch: wanted {want}, the source served {got}")]
    Mismatch {
        /// The URL.
        url: String,
        /// The digest asked for.
        want: Digest,
        /// The digest of what the source served.
        got: Digest,
    },
    /// The source served more, or fewer, bytes than it announced.
    #[error("{url}: the source announced {announced} bytes and served {served}")]
    Length {
        /// The URL.
        url: String,
        /// The size it announced.
        announced: u64,
        /// What it served (at least; more stops the transfer).
        served: u64,
    },
    /// The cache refused (too large, disk full, …).
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// The blob's size.
    pub size: u64,
    /// Bytes downloaded by this import.
    pub downloaded: u64,
    /// Bytes reused from an interrupted import.
    pub resumed: u64,
    /// The blob was already in the cache (nothing downloaded).
    pub present: bool,
}

/// Imports artifacts into one node's store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Importer {
    store: Store,
    s3: S3Settings,
    /// Bytes per second an import may take (0: no limit).
    rate: u64,
    /// One import per digest at a time: a second waits for the first.
    busy: Arc<tokio::sync::Mutex<std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Importer {
    /// An importer into `store`; `rate` bytes per second at most (0: no limit).
    pub fn new(store: Store, s3: S3Settings, rate: u64) -> Importer {
        Importer {
            store,
            s3,
            rate,
            busy: Arc::default(),
        }
    }

    /// Imports the blob `want` from `url` (see the module doc). Returns at once when the blob
    /// is already in the cache.
    pub async fn fetch(&self, url: &str, want: Digest) -> Result<ImportReport, ImportError> {
        let source = Source::parse(url)?;
        let gate = {
            let mut busy = self.busy.lock().await;
            busy.entry(want).or_default().clone()
        };
        let res = {
            let _one = gate.lock().await;
            self.fetch_one(url, &source, want).await
        };
        let mut busy = self.busy.lock().await;
        if Arc::strong_count(&gate) == 2 {
            busy.remove(&want);
        }
        res
    }

    async fn fetch_one(
        &self,
        url: &str,
        source: &Source,
        want: Digest,
    ) -> Result<ImportReport, ImportError> {
        if let Some(m) = self.store.manifest(&want).filter(|_| self.store.has(&want)) {
            return Ok(ImportReport {
                size: m.size,
                present: true,
                ..Default::default()
            });
        }
        let src_err = |e: object_store::Error| classify(url, e);
        let (os, path) = source.open(&self.s3).map_err(|why| ImportError::BadUrl {
            url: url.to_string(),
            why,
        })?;
        let meta = os.head(&path).await.map_err(src_err)?;
        let tag = format!(
            "{url}\n{}\n{}\n",
            meta.size,
            meta.e_tag.as_deref().unwrap_or("")
        );
        let store = self.store.clone();
        let size = meta.size;
        let mut imp = tokio::task::spawn_blocking(move || store.begin_import(want, size, &tag))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        if imp.is_present() {
            return Ok(ImportReport {
                size,
                present: true,
                ..Default::default()
            });
        }
        let resumed = imp.resumed();
        if resumed > 0 {
            info!(%url, digest = %want, resumed, size, "import: going on from an interrupted one");
        }
        let mut tries = 0;
        let mut last_err = String::new();
        while imp.offset() < size && tries <= RESUME_TRIES {
            if tries > 0 {
                let pause = Duration::from_millis(200 << tries.min(5));
                warn!(%url, offset = imp.offset(), error = %last_err, ?pause,
                    "import: transfer broke; taking it up again");
                tokio::time::sleep(pause).await;
            }
            tries += 1;
            let before = imp.offset();
            match self.transfer(&*os, &path, &mut imp).await {
                Ok(()) => {
                    last_err = format!("the transfer ended at byte {} of {size}", imp.offset());
                }
                Err(Broke::Source(e)) => {
                    let e = src_err(e);
                    if !matches!(e, ImportError::Source { .. }) {
                        imp.abandon();
                        return Err(e);
                    }
                    last_err = e.to_string();
                }
                Err(Broke::Oversize) => {
                    let served = imp.offset();
                    imp.abandon();
                    return Err(ImportError::Length {
                        url: url.to_string(),
                        announced: size,
                        served: served + 1,
                    });
                }
                Err(Broke::Store(e)) => {
                    imp.abandon();
                    return Err(e.into());
                }
            }
            if imp.offset() > before {
                // Progress: the retry budget is for transfers that get nowhere.
                tries = tries.min(1);
            }
        }
        if imp.offset() < size {
            let served = imp.offset();
            imp.abandon();
            return Err(if last_err.starts_with("the transfer ended") {
                ImportError::Length {
                    url: url.to_string(),
                    announced: size,
                    served,
                }
            } else {
                ImportError::Source {
                    url: url.to_string(),
                    why: last_err,
                }
            });
        }
        let downloaded = size - resumed;
        let m = tokio::task::spawn_blocking(move || imp.finish())
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        match m {
            Ok(m) => {
                info!(%url, digest = %want, size = m.size, downloaded, resumed, "import: done");
                Ok(ImportReport {
                    size: m.size,
                    downloaded,
                    resumed,
                    present: false,
                })
            }
            Err(StoreError::DigestMismatch { want, got }) => Err(ImportError::Mismatch {
                url: url.to_string(),
                want,
                got,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams the rest of the object into `imp`, from its offset.
    async fn transfer(
        &self,
        os: &dyn ObjectStore,
        path: &ObjectPath,
        imp: &mut Import,
    ) -> Result<(), Broke> {
        let from = imp.offset();
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            ..Default::default()
        };
        let got = os.get_opts(path, opts).await.map_err(Broke::Source)?;
        let mut stream = got.into_stream();
        let start = Instant::now();
        let mut taken = 0u64;
        let mut unflushed = 0u64;
        let res = loop {
            let Some(chunk) = stream.next().await else {
                break Ok(());
            };
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => break Err(Broke::Source(e)),
            };
            // Small writes to the page cache: no need for a blocking thread.
            match imp.write(&chunk) {
                Ok(()) => {}
                Err(ImportWriteError::Oversize { .. }) => break Err(Broke::Oversize),
                Err(ImportWriteError::Store(e)) => break Err(Broke::Store(e)),
            }
            taken += chunk.len() as u64;
            unflushed += chunk.len() as u64;
            if unflushed >= FLUSH_EVERY {
                unflushed = 0;
                if let Err(e) = imp.flush() {
                    break Err(Broke::Store(e));
                }
            }
            if self.rate > 0 {
                let due = start + Duration::from_secs_f64(taken as f64 / self.rate as f64);
                tokio::time::sleep_until(due).await;
            }
        };
        // Keep what arrived durable, whatever broke.
        let _ = imp.flush();
        res
    }
}

/// Where [`obtain`] found a blob.
#[derive(Clone, Debug)]
pub enum Obtained {
    /// Already in this node's cache.
    Cache {
        /// Its size.
        size: u64,
    },
    /// Pulled from peers.
    Peers(crate::pull::PullReport),
    /// Imported from the source.
    Source(ImportReport),
}

/// Why [`obtain`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ObtainError {
    /// No peer holds it and there is no source to import it from.
    #[error("{0}")]
    Pull(#[from] crate::pull::PullError),
    /// No peer holds it and the import failed.
    #[error("{0}")]
    Import(#[from] ImportError),
}

/// Brings the blob `want` into this node's cache: already here; else pulled from the peers that
/// hold it; else (when `url` is given) imported from the source — so that a flock fetches an
/// artifact from outside once and then shares it. An imported blob is announced as held.
pub async fn obtain(
    puller: &crate::pull::Puller,
    importer: &Importer,
    reeve: &crux_reeve::Reeve,
    want: Digest,
    url: Option<&str>,
) -> Result<Obtained, ObtainError> {
    if let Some(url) = url {
        // A bad URL is refused before anything else happens.
        Source::parse(url)?;
    }
    if let Some(m) = importer
        .store
        .manifest(&want)
        .filter(|_| importer.store.has(&want))
    {
        return Ok(Obtained::Cache { size: m.size });
    }
    let pulled = match puller.fetch(want).await {
        Ok(r) => return Ok(Obtained::Peers(r)),
        Err(e) => e,
    };
    let Some(url) = url else {
        return Err(pulled.into());
    };
    if let crate::pull::PullError::Store(e) = pulled {
        // This node cannot hold it: the source would not help.
        return Err(ObtainError::Pull(crate::pull::PullError::Store(e)));
    }
    info!(digest = %want, %url, why = %pulled, "import: no peer gave it; from the source");
    let r = importer.fetch(url, want).await?;
    reeve.hold(&want.to_string());
    Ok(Obtained::Source(r))
}

/// Why one transfer stopped early.
enum Broke {
    Source(object_store::Error),
    Oversize,
    Store(StoreError),
}

/// Sorts an object store error into what is worth a retry (`Source`) and what is not.
fn classify(url: &str, e: object_store::Error) -> ImportError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => ImportError::NotFound {
            url: url.to_string(),
        },
        E::PermissionDenied { source, .. } | E::Unauthenticated { source, .. } => {
            ImportError::Denied {
                url: url.to_string(),
                why: source.to_string(),
            }
        }
        other => ImportError::Source {
            url: url.to_string(),
            why: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_bad_ones_say_why() {
        assert_eq!(
            Source::parse("s3://art/builds/app%20v1.tar").unwrap(),
            Source::S3 {
                bucket: "art".into(),
                key: "builds/app v1.tar".into()
            }
        );
        assert_eq!(
            Source::parse("http://127.0.0.1:8080/a/b.bin").unwrap(),
            Source::Http {
                base: "http://127.0.0.1:8080".into(),
                path: "/a/b.bin".into()
            }
        );
        for (url, why) in [
            ("s3://bucket", "no object key"),
            ("s3://bucket/", "no object key"),
            ("ftp://h/x", "scheme `ftp`"),
            ("https://h/", "no file path"),
            ("not a url", "relative URL"),
        ] {
            let e = Source::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }
}
