//! The delayed byte copy under both emulated networks (`wan` on real sockets, `memnet` in
//! memory): each chunk is delivered a given delay after it was read, in order.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Copies `from` into `to` until `from` ends (then shuts `to` down) or `to` fails. A chunk read
/// at `t` is written at `t + delay()`, never before the chunk read before it (so jitter
/// stretches gaps but never reorders); `delay()` returning `None` drops the chunk. The timer
/// is aimed `early` before the due time (to centre a coarse timer's rounding), and a chunk due
/// within `early` is written at once.
pub(crate) async fn delayed_copy<R, W>(
    mut from: R,
    to: &mut W,
    mut delay: impl FnMut() -> Option<Duration>,
    early: Duration,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + ?Sized,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes)>();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            if due > Instant::now() + early {
                tokio::time::sleep_until(due - early).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut last = Instant::now();
        while let Ok(n) = from.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let Some(d) = delay() else { continue };
            let due = (Instant::now() + d).max(last);
            last = due;
            if tx.send((due, Bytes::copy_from_slice(&buf[..n]))).is_err() {
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}
