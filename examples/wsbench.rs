//! Websocket client for benches/proxy-vs-websockify.sh. Not part of vncd.
//!
//! - `wsbench latency URL COUNT`: COUNT times, open a websocket (subprotocol `binary`) and read
//!   the 12-byte RFB banner; prints the median and p90 in milliseconds.
//! - `wsbench down URL BYTES`: one websocket; read BYTES sent by the target; prints MiB/s.
//! - `wsbench up URL BYTES`: one websocket; send BYTES in 32 KiB binary frames to the target,
//!   then wait until the target closes; prints MiB/s.
//! - `wsbench hold URL COUNT`: open COUNT websockets at once, read each banner, print `holding`
//!   and keep them open until stdin closes.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Result<Ws, Error> {
    let mut req = url.into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("binary"));
    Ok(tokio_tungstenite::connect_async(req).await?.0)
}

/// Read binary data until `n` bytes arrived; returns how many did, and in how many messages.
async fn read_bytes(ws: &mut Ws, n: u64) -> Result<(u64, u64), Error> {
    let mut got = 0u64;
    let mut frames = 0u64;
    while got < n {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                got += b.len() as u64;
                frames += 1;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
        }
    }
    Ok((got, frames))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn usage() -> anyhow::Error {
    anyhow::anyhow!(
        "usage: wsbench latency URL COUNT | down URL BYTES | up URL BYTES | hold URL COUNT"
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, url, n] = args.as_slice() else {
        return Err(usage());
    };
    let n: u64 = n.parse()?;
    match mode.as_str() {
        "latency" => {
            let mut samples = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let mut ws = open(url).await?;
                anyhow::ensure!(read_bytes(&mut ws, 12).await?.0 >= 12, "no RFB banner");
                samples.push(t.elapsed());
                let _ = ws.close(None).await;
                // Let the close finish so the server is idle before the next sample.
                while let Some(Ok(_)) = ws.next().await {}
            }
            samples.sort();
            let pick = |q: f64| ms(samples[((samples.len() - 1) as f64 * q).round() as usize]);
            println!("median_ms={:.3} p90_ms={:.3}", pick(0.5), pick(0.9));
        }
        "down" => {
            let mut ws = open(url).await?;
            let t = Instant::now();
            let (got, frames) = read_bytes(&mut ws, n).await?;
            let secs = t.elapsed().as_secs_f64();
            anyhow::ensure!(got >= n, "only {got} of {n} bytes arrived");
            println!(
                "mib_per_s={:.1} avg_frame_kib={:.1}",
                got as f64 / secs / 1048576.0,
                got as f64 / frames.max(1) as f64 / 1024.0
            );
        }
        "up" => {
            let mut ws = open(url).await?;
            let chunk = vec![0x5au8; 32 * 1024];
            let t = Instant::now();
            let mut sent = 0u64;
            while sent < n {
                ws.feed(Message::Binary(chunk.clone().into())).await?;
                sent += chunk.len() as u64;
            }
            ws.flush().await?;
            // The sink target closes once it has read everything.
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(_) = m {
                    break;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!("mib_per_s={:.1}", sent as f64 / secs / 1048576.0);
        }
        "hold" => {
            let mut held = Vec::new();
            for _ in 0..n {
                let mut ws = open(url).await?;
                anyhow::ensure!(read_bytes(&mut ws, 12).await?.0 >= 12, "no RFB banner");
                held.push(ws);
            }
            println!("holding");
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await?;
            for mut ws in held {
                let _ = ws.close(None).await;
            }
        }
        _ => return Err(usage()),
    }
    Ok(())
}
