//! An OpenAI-compatible upstream that misbehaves on demand, for testing how the gateway maps
//! upstream failures. (For a well-behaved upstream, use the simulator's own server.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{StatusCode, header};

/// What the fake does with every chat request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answer with this status and body.
    Status(u16, &'static str, Option<&'static str>),
    /// Stream `n` content chunks, then close without `[DONE]`.
    CutAfter(usize),
    /// Stream `n` content chunks, then go silent (connection open).
    StallAfter(usize),
    /// Send headers, then nothing at all.
    HeadersThenSilence,
    /// Never answer (not even headers).
    NoResponse,
    /// Stream `n` chunks then an error event.
    ErrorEventAfter(usize),
    /// Stream `n` chunks and `[DONE]` properly.
    Good(usize),
    /// Answer 200 with the request body, byte for byte.
    Echo,
}

#[derive(Debug, Clone)]
pub struct FakeUpstream {
    pub behaviour: Behaviour,
    /// Requests received.
    pub hits: Arc<AtomicUsize>,
    /// Streams whose body was dropped by the receiver before finishing.
    pub cancelled: Arc<AtomicUsize>,
}

impl FakeUpstream {
    pub fn new(behaviour: Behaviour) -> Self {
        FakeUpstream { behaviour, hits: Arc::default(), cancelled: Arc::default() }
    }

    pub fn router(&self) -> Router {
        let me = self.clone();
        Router::new().route(
            "/v1/chat/completions",
            post(move |body: Bytes| {
                let me = me.clone();
                async move { me.answer(body).await }
            }),
        )
    }

    async fn answer(&self, request: Bytes) -> Response {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let chunk = |i: usize| {
            Bytes::from(format!(
                "data: {{\"id\":\"f\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}},\"finish_reason\":null}}]}}\n\n"
            ))
        };
        let sse = |frames: Vec<Bytes>, then: Tail, cancelled: Arc<AtomicUsize>| {
            let s = futures_util::stream::unfold(
                (frames.into_iter(), then, Some(CancelFlag(cancelled))),
                |(mut it, then, flag)| async move {
                    if let Some(f) = it.next() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        return Some((Ok::<_, std::io::Error>(f), (it, then, flag)));
                    }
                    match then {
                        Tail::Close => {
                            if let Some(mut f) = flag {
                                f.0 = Arc::default();
                            }
                            None
                        }
                        Tail::Hang => {
                            std::future::pending::<()>().await;
                            None
                        }
                    }
                },
            );
            ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(s)).into_response()
        };
        let c = self.cancelled.clone();
        match &self.behaviour {
            Behaviour::Status(code, body, retry_after) => {
                let mut r = (
                    StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    [(header::CONTENT_TYPE, "application/json")],
                    *body,
                )
                    .into_response();
                if let Some(ra) = retry_after {
                    r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static(ra));
                }
                r
            }
            Behaviour::CutAfter(n) => sse((0..*n).map(chunk).collect(), Tail::Close, c),
            Behaviour::StallAfter(n) => sse((0..*n).map(chunk).collect(), Tail::Hang, c),
            Behaviour::HeadersThenSilence => sse(vec![], Tail::Hang, c),
            Behaviour::NoResponse => {
                std::future::pending::<()>().await;
                StatusCode::OK.into_response()
            }
            Behaviour::ErrorEventAfter(n) => {
                let mut frames: Vec<Bytes> = (0..*n).map(chunk).collect();
                frames.push(Bytes::from_static(
                    b"data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n",
                ));
                sse(frames, Tail::Close, c)
            }
            Behaviour::Echo => {
                ([(header::CONTENT_TYPE, "application/json")], request).into_response()
            }
            Behaviour::Good(n) => {
                let mut frames: Vec<Bytes> = (0..*n).map(chunk).collect();
                frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                sse(frames, Tail::Close, c)
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Tail {
    Close,
    Hang,
}

/// Counts a cancellation when a stream is dropped before it chose to end.
struct CancelFlag(Arc<AtomicUsize>);

impl Drop for CancelFlag {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
