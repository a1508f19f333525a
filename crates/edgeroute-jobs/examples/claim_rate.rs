//! How fast the stores hand out and settle items: one batch of `--items` requests, `--workers`
//! concurrent workers each claiming `--claim` items at a time and completing each one (one
//! transaction per claim call, one per completion). Prints items/s for SQLite and, with
//! `--postgres URL`, for PostgreSQL (a schema of its own, dropped afterwards).
//!
//! cargo run --release -p edgeroute-jobs --example claim_rate -- \
//!     --items 20000 --workers 8 --claim 16 --postgres postgres://postgres@127.0.0.1:5432/test

use std::time::Instant;

use edgeroute_jobs::store::postgres::{PostgresConfig, PostgresStore};
use edgeroute_jobs::store::sqlite::{SqliteConfig, SqliteStore};
use edgeroute_jobs::{JobKind, JobStore, NewItem, NewJob, Outcome};

struct Args {
    items: usize,
    workers: usize,
    claim: usize,
    postgres: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args { items: 20_000, workers: 8, claim: 16, postgres: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--items" => a.items = num()?,
            "--workers" => a.workers = num()?,
            "--claim" => a.claim = num()?,
            "--postgres" => a.postgres = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

async fn measure<S: JobStore + Clone>(name: &str, store: S, a: &Args) -> Result<(), String> {
    let job = NewJob {
        tenant: "bench".into(),
        kind: JobKind::Batch,
        endpoint: "/v1/chat/completions".into(),
        completion_window_ms: 86_400_000,
        input_file_id: None,
        idempotency_key: None,
        metadata: None,
        items: (0..a.items)
            .map(|i| NewItem { custom_id: format!("r{i}"), body: r#"{"model":"m"}"#.into() })
            .collect(),
    };
    let t = Instant::now();
    let id = store.create_job(job, 0).await.map_err(|e| e.to_string())?.job.id;
    let created = t.elapsed();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.workers {
        let (store, claim) = (store.clone(), a.claim);
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            let mut done = 0usize;
            loop {
                let leases = store.claim(&worker, claim, 60_000, 1).await?;
                if leases.is_empty() {
                    return Ok::<_, edgeroute_jobs::StoreError>(done);
                }
                for lease in leases {
                    let ok = Outcome::Succeeded { status_code: 200, body: serde_json::json!({}) };
                    store.complete(&lease, ok, 2).await?;
                    done += 1;
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    let worked = t.elapsed();
    let t = Instant::now();
    let job = store.finalize(&id, 3).await.map_err(|e| e.to_string())?;
    let finalized = t.elapsed();
    assert_eq!(job.counts.completed as usize, a.items);
    assert_eq!(total, a.items);
    println!(
        "{name:>10}: create {} items {:>7.0} ms | claim+complete {:>7.0} items/s ({} workers, {} per claim) | finalize {:>6.0} ms",
        a.items,
        created.as_secs_f64() * 1e3,
        a.items as f64 / worked.as_secs_f64(),
        a.workers,
        a.claim,
        finalized.as_secs_f64() * 1e3,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let a = args()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sqlite = SqliteStore::open(SqliteConfig::new(dir.path().join("bench.db")))
        .await
        .map_err(|e| e.to_string())?;
    measure("sqlite", sqlite, &a).await?;
    if let Some(url) = &a.postgres {
        let schema = format!("edgeroute_jobs_bench_{}", std::process::id());
        let config = PostgresConfig { pool_size: a.workers, ..PostgresConfig::new(url, schema) };
        let pg = PostgresStore::connect(config).await.map_err(|e| e.to_string())?;
        let result = measure("postgres", pg.clone(), &a).await;
        pg.drop_schema().await.map_err(|e| e.to_string())?;
        result?;
    }
    Ok(())
}
