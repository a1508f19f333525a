//! This crate's Standard Webhooks signing as a command, so an independent implementation can
//! check it (`tests/python/test_webhook_signing.py` against the PyPI `standardwebhooks`).
//!
//! webhook_sign sign --secret whsec_… [--secret whsec_…] --id msg_1 --timestamp 1700000000 < body
//!     prints the three headers as JSON
//! webhook_sign verify --secret whsec_… --id msg_1 --timestamp T --signature "v1,…" --now T < body
//!     exits 0 when the message verifies, 1 (with the reason) when it does not

use std::io::Read;

use edgeroute_jobs::webhook::signing::{self, Secret, SignedHeaders};

fn main() {
    if let Err(e) = run() {
        eprintln!("webhook_sign: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().ok_or("sign or verify")?;
    let (mut secrets, mut id, mut ts, mut sig, mut now) = (Vec::new(), None, None, None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--secret" => secrets.push(Secret::parse(&value).map_err(|e| e.to_string())?),
            "--id" => id = Some(value),
            "--timestamp" => ts = Some(value),
            "--signature" => sig = Some(value),
            "--now" => now = Some(value.parse::<u64>().map_err(|e| e.to_string())?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body).map_err(|e| e.to_string())?;
    let id = id.ok_or("--id")?;
    let ts = ts.ok_or("--timestamp")?;
    match mode.as_str() {
        "sign" => {
            let ts: u64 = ts.parse().map_err(|e| format!("--timestamp: {e}"))?;
            let h = signing::sign(&secrets, &id, ts, &body);
            let json = serde_json::json!({
                signing::HEADER_ID: h.id,
                signing::HEADER_TIMESTAMP: h.timestamp,
                signing::HEADER_SIGNATURE: h.signature,
            });
            println!("{json}");
            Ok(())
        }
        "verify" => {
            let headers = SignedHeaders { id, timestamp: ts, signature: sig.ok_or("--signature")? };
            let now = now.ok_or("--now")?;
            signing::verify(&secrets, &headers, &body, now, signing::DEFAULT_TOLERANCE_S)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("unknown mode {other}")),
    }
}
