//! The simulator engine: GPU slots, FIFO queues, timing and faults, with no sockets.
//!
//! A request's life: it checks the crash/refuse faults, finds its model, checks that its
//! prompt and completion budget fit the model's context window (`ContextLengthExceeded` at
//! once if not: no slot, no prefill time), then waits in its GPU's FIFO queue for a slot (a
//! fair semaphore; a full queue is `Overloaded`). Holding the slot it waits out the time to
//! first token (`ttft_base + prefill × prompt tokens`), and [`Simulator::generate`] returns
//! at that **commit point** with the first token in hand, or with the error that ended the
//! request before it. The returned [`Generation`] streams the
//! rest on schedule: token `i` is due `i × (1/tokens_per_s + slow_token_ms)` after the first,
//! then a `Finish` event. The slot is released when the finish or an error is yielded, or the
//! moment the `Generation` is dropped.
//!
//! Time is `tokio::time` only, so tests on a paused clock are exact. Randomness (the
//! `error_rate` roll) is a hash of the seed and the request number, never OS randomness.
//!
//! Transcription, speech and embeddings (submodule `voice`) share the arrival checks, the
//! request numbers, the slots and the queues with chat.
//!
//! Generation is lazy: it advances only while the consumer polls. A consumer that stops
//! reading keeps its slot, as a GPU batch lane does behind a full output buffer.

use std::future::pending;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use edgeroute_proto::health::GpuHealth;
use edgeroute_proto::{ChatCompletionRequest, FinishReason, Usage};
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Duration, Instant, sleep_until};

use crate::config::{ConfigError, Faults, GpuConfig, SimConfig, SimModel};
use crate::error::SimError;
use crate::text::{Answer, Plan, prompt_tokens, splitmix64};

/// One item of a [`Generation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    /// The next piece of the answer; every token after the first starts with a space.
    Token(&'static str),
    /// The answer is complete. Always the last item of a successful stream.
    Finish { reason: FinishReason, usage: Usage },
}

/// How a model paces itself, resolved from the global config and the model's overrides.
#[derive(Debug, Clone, Copy)]
struct Timing {
    ttft_base: Duration,
    prefill_per_token: Duration,
    /// Gap between tokens before `slow_token_ms`; zero for "as fast as possible".
    token_gap: Duration,
}

impl Timing {
    fn resolve(cfg: &SimConfig, m: &SimModel) -> Self {
        let tps = m.tokens_per_s.unwrap_or(cfg.tokens_per_s);
        let token_gap = if tps > 0.0 {
            // Validation bounds tps to finite and positive; a tiny rate is capped at an hour.
            Duration::try_from_secs_f64(1.0 / tps)
                .unwrap_or(Duration::MAX)
                .min(Duration::from_secs(3600))
        } else {
            Duration::ZERO
        };
        Timing {
            ttft_base: Duration::from_millis(m.ttft_base_ms.unwrap_or(cfg.ttft_base_ms)),
            prefill_per_token: Duration::from_micros(
                m.prefill_us_per_token.unwrap_or(cfg.prefill_us_per_token),
            ),
            token_gap,
        }
    }

    fn ttft(&self, prompt_tokens: u32) -> Duration {
        self.prefill_per_token.saturating_mul(prompt_tokens).saturating_add(self.ttft_base)
    }
}

#[derive(Debug)]
struct LoadedModel {
    config: SimModel,
    /// Index into `Simulator::gpus`.
    gpu: usize,
    timing: Timing,
    /// The model's own window, else the global one.
    context_window: u32,
}

impl LoadedModel {
    /// Fails when the prompt plus the requested completion budget exceeds the window.
    fn check_context(&self, prompt: u32, requested: Option<u32>) -> Result<(), SimError> {
        let needed = u64::from(prompt) + u64::from(requested.unwrap_or(0));
        if needed <= u64::from(self.context_window) {
            return Ok(());
        }
        Err(SimError::ContextLengthExceeded {
            model: self.config.id.clone(),
            window: self.context_window,
            prompt_tokens: prompt,
            requested,
        })
    }
}

#[derive(Debug)]
struct Gpu {
    config: GpuConfig,
    /// Tokio's semaphore is fair: waiters are served first come, first served.
    slots: Arc<Semaphore>,
    /// Shared with the queue tickets, which may outlive a borrow of the simulator (a speech
    /// stream waits for its slot inside the stream).
    queued: Arc<AtomicU32>,
}

impl Gpu {
    fn busy(&self) -> u32 {
        let free = u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX);
        self.config.slots.saturating_sub(free)
    }

    /// Takes a place in the queue, or refuses when it is full. The place is given back when
    /// the ticket drops, including when the waiting request is cancelled.
    fn enqueue(&self, max_queue: u32) -> Result<QueueTicket, SimError> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < max_queue).then_some(q + 1))
            .map(|_| QueueTicket(Arc::clone(&self.queued)))
            .map_err(|queued| SimError::Overloaded { gpu: self.config.id.clone(), queued })
    }

    /// A slot at once if one is free, else a place in the queue to wait for one in
    /// ([`Slot::wait`]); `Overloaded` if the queue is full.
    fn slot(&self, max_queue: u32) -> Result<Slot, SimError> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => Ok(Slot::Held(p)),
            Err(_) => Ok(Slot::Queued(Arc::clone(&self.slots), self.enqueue(max_queue)?)),
        }
    }
}

/// A request's claim on its GPU: a slot, or a queue place to wait for one.
enum Slot {
    Held(OwnedSemaphorePermit),
    Queued(Arc<Semaphore>, QueueTicket),
}

impl Slot {
    /// The slot, waiting in FIFO order if queued (the queue place is given back when the
    /// slot comes or the wait is cancelled); `Crashed` if a crash happens since `epoch`.
    async fn wait(
        self,
        faults_rx: &mut watch::Receiver<FaultState>,
        epoch: u64,
    ) -> Result<OwnedSemaphorePermit, SimError> {
        match self {
            Slot::Held(p) => Ok(p),
            Slot::Queued(slots, _ticket) => tokio::select! {
                biased;
                () = crash_signal(faults_rx, epoch) => Err(SimError::Crashed),
                // The semaphore is never closed; treat the impossible as a crash.
                p = slots.acquire_owned() => p.map_err(|_| SimError::Crashed),
            },
        }
    }
}

struct QueueTicket(Arc<AtomicU32>);

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Faults plus a counter bumped each time `crash` turns on, so a stream can tell that a crash
/// happened since it started even if it was cleared again before the stream looked.
#[derive(Debug, Clone)]
struct FaultState {
    faults: Faults,
    crash_epoch: u64,
}

/// A GPU as the gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuStatus {
    pub id: String,
    /// Models pinned to this GPU, in load order.
    pub models: Vec<String>,
    pub slots: u32,
    /// Slots held by admitted requests (in time to first token or streaming).
    pub busy: u32,
    /// Requests waiting for a slot.
    pub queued: u32,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
}

impl GpuStatus {
    /// `busy / slots`, in [0, 1].
    pub fn utilization(&self) -> f64 {
        if self.slots == 0 { 0.0 } else { f64::from(self.busy) / f64::from(self.slots) }
    }
}

impl From<GpuStatus> for GpuHealth {
    fn from(s: GpuStatus) -> Self {
        let taken = u64::from(s.busy) + u64::from(s.queued);
        let availability = if s.slots == 0 {
            0.0
        } else {
            u64::from(s.slots).saturating_sub(taken) as f64 / f64::from(s.slots)
        };
        GpuHealth {
            availability,
            utilization: s.utilization(),
            id: s.id,
            models: s.models,
            slots: s.slots,
            busy: s.busy,
            queued: s.queued,
            memory_used_mb: s.memory_used_mb,
            memory_total_mb: s.memory_total_mb,
        }
    }
}

/// The simulated backend. Share it behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Simulator {
    config: SimConfig,
    gpus: Vec<Gpu>,
    /// Read on every request, written only by load/unload: a lock-free snapshot.
    models: ArcSwap<Vec<Arc<LoadedModel>>>,
    faults: watch::Sender<FaultState>,
    requests: AtomicU64,
}

const FAULT_SALT: u64 = 0x6661_756C_7473_2121;
/// Salts the garbage roll apart from the error roll.
const GARBAGE_SALT: u64 = 0x6761_7262_6167_6521;

/// A uniform draw in [0, 1) for request number `n`: the same seed and arrival order give the
/// same faults on every run.
fn fault_roll(seed: u64, n: u64) -> f64 {
    let x = splitmix64(seed ^ FAULT_SALT ^ splitmix64(n));
    // The top 53 bits fit an f64 mantissa exactly.
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Resolves when a crash has happened since `epoch`; never if the simulator is gone.
async fn crash_signal(rx: &mut watch::Receiver<FaultState>, epoch: u64) {
    let crashed = rx.wait_for(|s| s.crash_epoch != epoch).await.is_ok();
    if !crashed {
        pending::<()>().await;
    }
}

/// Waits until `due` (forever if `None`), failing with `Crashed` if a crash happens since
/// `epoch` first.
async fn wait_or_crash(
    rx: &mut watch::Receiver<FaultState>,
    epoch: u64,
    due: Option<Instant>,
) -> Result<(), SimError> {
    match due {
        Some(due) if due <= Instant::now() => {
            // Cheap path for zero-latency runs: no timer, one atomic load.
            let changed = rx.has_changed().unwrap_or(false);
            if changed && rx.borrow_and_update().crash_epoch != epoch {
                return Err(SimError::Crashed);
            }
            Ok(())
        }
        Some(due) => {
            tokio::select! {
                biased;
                () = crash_signal(rx, epoch) => Err(SimError::Crashed),
                () = sleep_until(due) => Ok(()),
            }
        }
        None => {
            crash_signal(rx, epoch).await;
            Err(SimError::Crashed)
        }
    }
}

/// A request that got past the checks every kind of request makes on arrival.
struct Arrival {
    faults_rx: watch::Receiver<FaultState>,
    epoch: u64,
    faults: Faults,
    model: Arc<LoadedModel>,
}

/// A request's number and its fault rolls.
struct Rolls {
    request_id: u64,
    injected: bool,
    garbage: bool,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let gpus = config
            .gpus
            .iter()
            .map(|g| Gpu {
                config: g.clone(),
                slots: Arc::new(Semaphore::new(g.slots as usize)),
                queued: Arc::new(AtomicU32::new(0)),
            })
            .collect();
        let models = config
            .models
            .iter()
            .map(|m| Self::resolve_model(&config, m))
            .collect::<Result<Vec<_>, _>>()?;
        let (faults, _) =
            watch::channel(FaultState { faults: config.faults.clone(), crash_epoch: 0 });
        Ok(Simulator {
            gpus,
            models: ArcSwap::from_pointee(models),
            faults,
            requests: AtomicU64::new(0),
            config,
        })
    }

    fn resolve_model(config: &SimConfig, m: &SimModel) -> Result<Arc<LoadedModel>, ConfigError> {
        m.validate(&config.gpus)?;
        let gpu =
            config.gpus.iter().position(|g| g.id == m.gpu).ok_or_else(|| {
                ConfigError::UnknownGpu { model: m.id.clone(), gpu: m.gpu.clone() }
            })?;
        Ok(Arc::new(LoadedModel {
            config: m.clone(),
            gpu,
            timing: Timing::resolve(config, m),
            context_window: m.context_window.unwrap_or(config.context_window),
        }))
    }

    /// The configuration the simulator started with (models may have changed since; see
    /// [`Simulator::models`]). Pass it to [`crate::expected_answer`] to predict answers.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Runs one request up to its commit point: the first token (or the finish, for a
    /// continuation with nothing left to say) is ready, or the request failed before it.
    ///
    /// Fails with `Refused` or `Crashed` at once under those faults, `UnknownModel` at once,
    /// `ContextLengthExceeded` at once when the prompt (plus `max_completion_tokens` or
    /// `max_tokens`, if set) exceeds the model's context window, `Overloaded` at once when
    /// the GPU's queue is full, `Crashed` if a crash hits while queued or in prefill,
    /// `Injected` after the time to first token (as a backend failing during prefill would),
    /// and `Cut { after: 0 }` with `cut_after_tokens = 0`. With `stall_after_tokens = 0` it
    /// never resolves (until crashed or dropped).
    /// Cancel-safe: dropping the future gives back its queue place or slot at once.
    pub async fn generate(&self, req: &ChatCompletionRequest) -> Result<Generation, SimError> {
        let arrived = Instant::now();
        let Arrival { mut faults_rx, epoch, faults, model } = self.arrive(&req.model)?;
        // One linear pass over the prompt; a refused request takes no request number, so it
        // does not shift the fault rolls of the requests that follow.
        let prompt = prompt_tokens(&req.messages);
        model.check_context(prompt, req.token_limit())?;
        let Rolls { request_id, injected, garbage } = self.roll(&faults);
        let mut plan = Plan::counted(
            self.config.seed,
            self.config.min_answer_tokens,
            self.config.max_answer_tokens,
            req,
            prompt,
        );
        if garbage {
            plan.answer = plan.answer.garbled(request_id);
        }

        let permit =
            self.gpus[model.gpu].slot(self.config.max_queue)?.wait(&mut faults_rx, epoch).await?;
        let admitted = Instant::now();

        let timing = model.timing;
        let gap = timing.token_gap.saturating_add(Duration::from_millis(faults.slow_token_ms));
        let first_at = admitted.checked_add(timing.ttft(plan.prompt_tokens));
        let mut run = Run {
            faults_rx,
            epoch,
            permit: Some(permit),
            answer: plan.answer,
            start: plan.start,
            next: plan.start,
            end: plan.end,
            finish: plan.finish,
            prompt_tokens: plan.prompt_tokens,
            first_at,
            gap,
            stall_after: faults.stall_after_tokens,
            cut_after: faults.cut_after_tokens,
            done: false,
        };
        if injected {
            // Prefill runs, then fails: the request costs its queue wait and its TTFT.
            run.wait_until(first_at).await?;
            return Err(SimError::Injected);
        }
        let first = match run.next_event().await {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return Err(e),
            // A run yields at least its finish before ending; treat anything else as a crash.
            None => return Err(SimError::Crashed),
        };
        let rest = futures_util::stream::unfold(run, |mut run| async move {
            let ev = run.next_event().await?;
            Some((ev, run))
        });
        Ok(Generation {
            model: model.config.id.clone(),
            prompt_tokens: plan.prompt_tokens,
            request_id,
            queue_wait: admitted - arrived,
            ttft: Instant::now() - arrived,
            first: Some(first),
            rest: Box::pin(rest),
        })
    }

    fn model(&self, id: &str) -> Option<Arc<LoadedModel>> {
        self.models.load().iter().find(|m| m.config.id == id).cloned()
    }

    /// What every request checks first, at once: `Crashed`, `Refused`, `UnknownModel`.
    fn arrive(&self, model: &str) -> Result<Arrival, SimError> {
        let mut faults_rx = self.faults.subscribe();
        let (faults, epoch) = {
            let s = faults_rx.borrow_and_update();
            (s.faults.clone(), s.crash_epoch)
        };
        if faults.crash {
            return Err(SimError::Crashed);
        }
        if faults.refuse_connections {
            return Err(SimError::Refused);
        }
        let model = self.model(model).ok_or_else(|| SimError::UnknownModel(model.to_owned()))?;
        Ok(Arrival { faults_rx, epoch, faults, model })
    }

    /// Takes the next request number and rolls its faults: the same seed and arrival order
    /// give the same faults on every run.
    fn roll(&self, faults: &Faults) -> Rolls {
        let request_id = self.requests.fetch_add(1, Ordering::Relaxed);
        let injected = fault_roll(self.config.seed, request_id) < faults.error_rate;
        let garbage = faults.garbage_rate > 0.0
            && fault_roll(self.config.seed ^ GARBAGE_SALT, request_id) < faults.garbage_rate;
        Rolls { request_id, injected, garbage }
    }

    /// Replaces the faults. Turning `crash` on fails every queued and in-flight request at
    /// once; the other knobs apply to requests that arrive afterwards.
    pub fn set_faults(&self, faults: Faults) -> Result<(), ConfigError> {
        faults.validate()?;
        self.faults.send_modify(|s| {
            if faults.crash && !s.faults.crash {
                s.crash_epoch += 1;
            }
            s.faults = faults;
        });
        Ok(())
    }

    pub fn faults(&self) -> Faults {
        self.faults.borrow().faults.clone()
    }

    /// Models currently loaded, in load order.
    pub fn models(&self) -> Vec<SimModel> {
        self.models.load().iter().map(|m| m.config.clone()).collect()
    }

    /// Loads a model onto its GPU, as a model manager would after a download. Fails if the
    /// id is taken, the GPU is unknown or its memory is short.
    pub fn load_model(&self, model: SimModel) -> Result<(), ConfigError> {
        let loaded = Self::resolve_model(&self.config, &model)?;
        loop {
            let current = self.models.load_full();
            if current.iter().any(|m| m.config.id == model.id) {
                return Err(ConfigError::DuplicateModel(model.id));
            }
            let gpu = &self.gpus[loaded.gpu].config;
            let used: u64 = current
                .iter()
                .filter(|m| m.gpu == loaded.gpu)
                .map(|m| m.config.memory_mb)
                .sum::<u64>()
                .saturating_add(model.memory_mb);
            if used > gpu.memory_total_mb {
                return Err(ConfigError::OutOfMemory {
                    gpu: gpu.id.clone(),
                    needed_mb: used,
                    total_mb: gpu.memory_total_mb,
                });
            }
            let mut next = Vec::clone(&current);
            next.push(Arc::clone(&loaded));
            // Retry if another load or unload raced us, so neither change is lost.
            let prev = self.models.compare_and_swap(&current, Arc::new(next));
            if Arc::ptr_eq(&prev, &current) {
                return Ok(());
            }
        }
    }

    /// Unloads a model; requests already admitted finish normally. False if it was not loaded.
    pub fn unload_model(&self, id: &str) -> bool {
        loop {
            let current = self.models.load_full();
            if !current.iter().any(|m| m.config.id == id) {
                return false;
            }
            let next: Vec<_> = current.iter().filter(|m| m.config.id != id).cloned().collect();
            let prev = self.models.compare_and_swap(&current, Arc::new(next));
            if Arc::ptr_eq(&prev, &current) {
                return true;
            }
        }
    }

    /// Every GPU's slots, queue and memory, in config order.
    pub fn gpu_status(&self) -> Vec<GpuStatus> {
        let models = self.models.load();
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let here = models.iter().filter(|m| m.gpu == i);
                GpuStatus {
                    id: g.config.id.clone(),
                    models: here.clone().map(|m| m.config.id.clone()).collect(),
                    slots: g.config.slots,
                    busy: g.busy(),
                    queued: g.queued.load(Ordering::Acquire),
                    memory_used_mb: here.map(|m| m.config.memory_mb).sum(),
                    memory_total_mb: g.config.memory_total_mb,
                }
            })
            .collect()
    }

    /// Requests holding a slot, on every GPU.
    pub fn in_flight(&self) -> u32 {
        self.gpus.iter().map(Gpu::busy).sum()
    }

    /// Requests waiting for a slot, on every GPU.
    pub fn queue_depth(&self) -> u32 {
        self.gpus.iter().map(|g| g.queued.load(Ordering::Acquire)).sum()
    }

    /// Slots on every GPU: how many requests can be served at once.
    pub fn capacity(&self) -> u32 {
        self.gpus.iter().map(|g| g.config.slots).sum()
    }
}

/// One admitted request's remaining work. Owns its slot.
struct Run {
    faults_rx: watch::Receiver<FaultState>,
    epoch: u64,
    permit: Option<OwnedSemaphorePermit>,
    answer: Answer,
    start: u32,
    next: u32,
    end: u32,
    finish: FinishReason,
    prompt_tokens: u32,
    /// When the first token is due; `None` if beyond the clock's range (never).
    first_at: Option<Instant>,
    gap: Duration,
    stall_after: Option<u32>,
    cut_after: Option<u32>,
    done: bool,
}

impl Run {
    /// Ends the run with `e`, releasing the slot.
    fn fail(&mut self, e: SimError) -> SimError {
        self.done = true;
        self.permit = None;
        e
    }

    /// Waits until `due` (forever if `None`), failing if a crash happens first.
    async fn wait_until(&mut self, due: Option<Instant>) -> Result<(), SimError> {
        match wait_or_crash(&mut self.faults_rx, self.epoch, due).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn next_event(&mut self) -> Option<Result<SimEvent, SimError>> {
        if self.done {
            return None;
        }
        if self.next == self.end {
            self.done = true;
            self.permit = None;
            let usage = Usage::new(self.prompt_tokens, self.end - self.start);
            return Some(Ok(SimEvent::Finish { reason: self.finish, usage }));
        }
        let produced = self.next - self.start;
        let due = if self.stall_after == Some(produced) {
            // A stall: nothing more, ever. Only a crash (or dropping the stream) ends it.
            None
        } else {
            self.gap.checked_mul(produced).and_then(|d| self.first_at?.checked_add(d))
        };
        if let Err(e) = self.wait_until(due).await {
            return Some(Err(e));
        }
        if self.cut_after == Some(produced) {
            return Some(Err(self.fail(SimError::Cut { after: produced })));
        }
        let token = self.answer.token(self.next);
        self.next += 1;
        Some(Ok(SimEvent::Token(token)))
    }
}

/// A request past its commit point: a stream of the remaining events, starting with the
/// first token (available at once). Ends after `Finish`, after an `Err` (cut or crash), or
/// never (a stall). Dropping it frees its GPU slot immediately.
pub struct Generation {
    model: String,
    prompt_tokens: u32,
    request_id: u64,
    queue_wait: Duration,
    ttft: Duration,
    first: Option<SimEvent>,
    rest: Pin<Box<dyn Stream<Item = Result<SimEvent, SimError>> + Send>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("model", &self.model)
            .field("prompt_tokens", &self.prompt_tokens)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// A whole answer, gathered from a [`Generation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
}

impl Generation {
    pub fn model(&self) -> &str {
        &self.model
    }

    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// The simulator's sequence number for this request (also the one its fault roll used).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Time spent waiting for a GPU slot.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }

    /// Time from `generate` being called to the commit point.
    pub fn ttft(&self) -> Duration {
        self.ttft
    }

    /// Reads the stream to its end. Never returns on a stall; drop it (or time out) instead.
    pub async fn into_completion(mut self) -> Result<Completion, SimError> {
        let mut text = String::new();
        while let Some(ev) = self.next().await {
            match ev? {
                SimEvent::Token(t) => text.push_str(t),
                SimEvent::Finish { reason, usage } => {
                    return Ok(Completion { text, finish_reason: reason, usage });
                }
            }
        }
        // Streams end only after a finish or an error, both handled above.
        Err(SimError::Crashed)
    }
}

impl Stream for Generation {
    type Item = Result<SimEvent, SimError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        self.rest.as_mut().poll_next(cx)
    }
}

mod voice;
pub use voice::{SpeechStream, TranscriptEvent, TranscriptStream, transcript_sse};

#[cfg(test)]
mod tests;
