//! `edgeroute demo`: a node with the simulator backend on loopback, answering sample requests.
//! Everything runs in this process; nothing outside the machine is contacted.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use edgeroute_proto::sse::{SseDecoder, SseEvent};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const PROMPTS: [&str; 3] = [
    "What's the weather like in Vancouver this afternoon?",
    "Book me a table for two in Toronto tomorrow at seven.",
    "Translate 'good morning' into French for my Montreal trip.",
];

pub async fn run(requests: u32) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgeroute-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let secret: [u8; 32] = rand::random();
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_file = dir.join("hs256.secret");
    std::fs::write(&secret_file, &secret_hex)?;

    let config = format!(
        r#"
[node]
id = "demo-1"
region = "local"
listen = "127.0.0.1:0"

[auth]
hs256_secret_file = "{}"

[backend]
kind = "sim"
[backend.sim]
seed = 7
"#,
        secret_file.display()
    );
    let cfg = edgeroute_node::NodeConfig::parse(&config, |_| None)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let node = edgeroute_node::Node::build(cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(node.serve(listener, async {
        let _ = stop_rx.await;
    }));

    let token = edgeroute_auth::mint(
        &edgeroute_auth::SigningKey::Hs256(secret_hex.into_bytes()),
        &edgeroute_auth::MintOptions {
            sub: "demo-tenant".into(),
            scopes: edgeroute_auth::Scope::Inference.into(),
            aud: None,
            iss: None,
            ttl_s: 600,
            now_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
            kid: None,
            nbf: None,
        },
    )?;
    println!("edgeroute demo: node `demo-1` (simulator backend) on http://{addr}\n");

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    for i in 0..requests {
        let prompt = PROMPTS[i as usize % PROMPTS.len()];
        println!("> {prompt}");
        let body = serde_json::json!({
            "model": "sim-llama",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 40,
            "messages": [{"role": "user", "content": prompt}],
        });
        let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
        let sent = Instant::now();
        let res = client.request(req).await.context("sending the sample request")?;
        let head =
            |n: &str| res.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
        let (node_id, load) = (head("x-edgeroute-node"), head("x-edgeroute-load"));
        if !res.status().is_success() {
            let status = res.status();
            let text = res.into_body().collect().await?.to_bytes();
            bail!("node answered {status}: {}", String::from_utf8_lossy(&text));
        }
        let mut body = res.into_body();
        let mut dec = SseDecoder::new(1 << 20);
        let mut ttft = None;
        let mut usage = String::new();
        print!("< ");
        'read: while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                dec.push(&data);
            }
            while let Some(ev) = dec.next_event()? {
                match ev {
                    SseEvent::Done => break 'read,
                    SseEvent::Data(d) => {
                        let v: serde_json::Value = serde_json::from_slice(&d)?;
                        if let Some(t) =
                            v.pointer("/choices/0/delta/content").and_then(|c| c.as_str())
                        {
                            if !t.is_empty() {
                                ttft.get_or_insert_with(|| sent.elapsed());
                            }
                            print!("{t}");
                            std::io::stdout().flush().ok();
                        }
                        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                            usage = format!(
                                "{} prompt + {} completion tokens",
                                u["prompt_tokens"], u["completion_tokens"]
                            );
                        }
                    }
                }
            }
        }
        println!(
            "\n  node={node_id} load[{load}] ttft={:.0} ms total={:.0} ms {usage}\n",
            ttft.unwrap_or_default().as_secs_f64() * 1000.0,
            sent.elapsed().as_secs_f64() * 1000.0
        );
    }

    let health = client
        .request(http::Request::get(format!("http://{addr}/health")).body(Full::new(Bytes::new()))?)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let h: serde_json::Value = serde_json::from_slice(&health)?;
    println!(
        "health: status={} ttft p50={} ms p99={} ms error_rate={} over {} requests",
        h["status"],
        h["ttft_ms"]["p50"],
        h["ttft_ms"]["p99"],
        h["error_rate"],
        h["requests_in_window"]
    );
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .context("node did not stop")???;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
