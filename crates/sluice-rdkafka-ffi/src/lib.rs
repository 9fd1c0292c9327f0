//! The one crate of sluice that calls librdkafka directly (issue 21): batch consume of one
//! partition's split-off queue; and a consumed message's leader epoch ([`leader_epoch`],
//! issue 19: how the worker tells new records at reused offsets after a log truncation
//! from redelivered ones).
//!
//! The rest of the workspace denies `unsafe_code`; this crate holds what rust-rdkafka 0.39
//! does not wrap, and nothing else. Its lints deny `unsafe_op_in_unsafe_fn`,
//! `clippy::undocumented_unsafe_blocks` and `clippy::multiple_unsafe_ops_per_block`: every
//! unsafe operation sits in its own block under a `// SAFETY:` comment saying why it holds.
//! No panic crosses the FFI boundary: the two `extern "C"` functions catch every unwind
//! (see [`PartitionFeed::drain`] for how a panic of the caller's closure is carried out).
//!
//! # Why
//!
//! rust-rdkafka hands over one message per `poll_queue` (an event, an `Arc` per message,
//! three clock reads and three lock pairs inside librdkafka, `cpu-per-record.md` §1.1).
//! [`PartitionFeed::drain`] takes every message ready on the partition's queue under **one**
//! queue lock through `rd_kafka_consume_callback_queue`, and calls a closure for each,
//! borrowing librdkafka's `rd_kafka_message_t` for the duration of that call ([`Msg`]).
//!
//! Measured on the plain consumer (BENCHMARKS.md, "taking records a batch at a time"):
//! taking a record costs 379 instructions beyond its op's destroy through a feed, 1,252
//! through `poll`; the whole plain consumer goes from 3,086 to 2,215 per record.
//!
//! # Which librdkafka call, and why not the other one (librdkafka 2.12.1)
//!
//! - `rd_kafka_consume_callback_queue` → `rd_kafka_q_serve` (`rdkafka_queue.c:558-660`)
//!   moves the queue's ops to a local queue under one lock, then for each op:
//!   `rd_kafka_op_handle_std` consumes transaction control records itself
//!   (`rdkafka_op.c:903-907`), `rd_kafka_consume_cb` drops outdated ops and barriers
//!   (`rdkafka.c:3284-3288`), advances the application position with
//!   `rd_kafka_fetch_op_app_prepare`, **which skips error ops** (`rdkafka_op.c:985-986`),
//!   calls our trampoline, and destroys the op.
//! - `rd_kafka_yield` sets a **thread-local** flag (`rdkafka_queue.c:35-39`); the serve loop
//!   checks it right after each callback and puts the ops not yet handed over back at the
//!   head of the queue (`rdkafka_queue.c:633-640`). So after [`Flow::Stop`] the closure is
//!   not called again in that drain, and nothing is lost: the rest stays in librdkafka.
//! - `rd_kafka_consume_batch_queue` is **not** used: on 2.12.1 it advances the application
//!   position to offset+1 of *every* returned message, error messages included
//!   (`rd_kafka_q_serve_rkmessages`, `rdkafka_queue.c:828-839`; librdkafka issue 4844,
//!   fixed in 2.13.2). A fetch error is enqueued at the fetch position
//!   (`rdkafka_fetcher.c:327-335`), and a pause makes the application position the next
//!   fetch position (`rdkafka_partition.c:1962-1975`): one record would be skipped, and
//!   committed past. The test `fetch_error_then_pause_skips_nothing` shows the trap with
//!   that call and its absence with ours.
//!
//! # What the worker keeps by using it
//!
//! The worker's dispatcher (`sluice-worker/src/kafka/dispatcher.rs`) drains a
//! [`PartitionFeed`] per owned partition, in place of rust-rdkafka's `StreamPartitionQueue`
//! (split in `consumer.rs`'s `pre_rebalance` and in the exactly-once rewind). What that
//! must keep, and the tests that hold it (the worker's suites name them):
//!
//! 1. **Rebalances stay on the main queue.** The "sluice-consumer" thread keeps serving the
//!    consumer's main queue (`consumer.rs` `spawn_main_queue_thread`), so REBALANCE and
//!    OFFSET_COMMIT events still reach `pre_rebalance`/`post_rebalance` through
//!    rust-rdkafka. Only FETCH, consumer-error and BARRIER ops reach a partition's fetch
//!    queue, so draining it never touches a rebalance. *Test:* a cooperative revoke/assign
//!    storm while draining (two group members joining and leaving), asserting that
//!    `spawn_main_queue_thread` reports no stray record and every offset arrives once.
//! 2. **Split before the assignment takes effect.** Call [`PartitionFeed::split`] inside
//!    `pre_rebalance` (in place of `split_partition_queue`, `consumer.rs` Assign arm) and in
//!    the exactly-once rewind. Never also call rust-rdkafka's `split_partition_queue` for
//!    the same partition: the wake-up callback belongs to librdkafka's `rd_kafka_q_t`, not
//!    to a handle, so the second registration replaces the first, and dropping either
//!    handle clears it. [`PartitionFeed::split`] refuses a second live feed of the same
//!    partition of the same client (test `a_second_feed_of_a_partition_is_refused`); it
//!    cannot see rust-rdkafka's handles. *Test:* the existing W1-W4 rebalance tests and
//!    the "no record on the main queue" check, run with the feed.
//! 3. **The revoke barrier holds.** The release → `Released` order (`consumer.rs` module
//!    doc, the coordinator's revoke) must drop every [`PartitionFeed`] of the revoked
//!    partitions (its `Drop` disables the wake-up callback, then destroys the handle)
//!    before `pre_rebalance` returns. No native message outlives a drain: a [`Msg`] cannot
//!    leave the closure (its lifetime is higher-ranked). *Test:* revoke-then-reassign of
//!    the same partition to the same process, asserting the new incarnation is woken
//!    (the old handle's drop must not clear the new callback; with the feed this is the
//!    order "drop, then split").
//! 4. **Every record the closure is given is dispatched, or the incarnation ends.** When
//!    the closure runs, librdkafka has already advanced the application position past the
//!    record, and a pause resumes after it: [`Flow::Stop`] still means "this one was
//!    taken". The dispatcher's existing `next` carry-over is the mechanism (the record that
//!    did not fit the budget goes to the next batch); a stop drops undispatched records,
//!    which are never registered and so never committed. *Test:* the pause/resume storm
//!    and fetch-error tests of this crate at the dispatcher level: a budget so small that
//!    every batch stops early, every offset processed exactly once, no commit past a
//!    record not processed (the chaos suite's 0-lost check; `kafka_pipeline.rs`
//!    `a_budget_smaller_than_a_batch_loses_and_repeats_nothing`, which fails with 113
//!    of 12,000 records missing when the record that did not fit is not carried over).
//! 5. **Commits are unchanged.** Explicit commits of the tracker's watermark,
//!    `enable.auto.offset.store=false`, `enable.auto.commit=false`: the application
//!    position `rd_kafka_fetch_op_app_prepare` moves is librdkafka's *fetch* bookkeeping
//!    (pause/resume), never the committed offset. *Test:* the existing commit and
//!    exactly-once suites, unchanged.
//! 6. **`max.poll.interval.ms`.** The main-queue thread polls; `rd_kafka_consume_callback0`
//!    also brackets each drain with `rd_kafka_app_poll_start`/`rd_kafka_app_polled`
//!    (`rdkafka.c:3304-3321`). *Test:* a pipeline whose partitions are paused (no drain)
//!    for longer than `max.poll.interval.ms` keeps its assignment.
//!
//! And, from this crate's own contract: a drain runs on the calling thread and never
//! blocks (timeout 0); [`PartitionFeed::ready`] may be awaited by one task at a time.

use std::any::Any;
use std::cell::OnceCell;
use std::collections::HashSet;
use std::ffi::{c_void, CStr, CString};
use std::future::poll_fn;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use rdkafka::bindings as rd;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, Timestamp};

/// What the closure given to [`PartitionFeed::drain`] asks for after a message.
///
/// Either way, the message it was just given is **taken**: librdkafka has advanced the
/// partition's application position past it, so a pause resumes after it. A caller that
/// cannot use it now must keep it (copy it) or end the partition's incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Give me the next message, if one is ready.
    Continue,
    /// Stop this drain after this message; the rest stay queued in librdkafka.
    Stop,
}

/// The partitions with a live [`PartitionFeed`], by client (`rd_kafka_t` address), topic
/// and partition: a second feed of the same partition would replace the first one's
/// wake-up callback, and dropping either would clear it.
static LIVE: Mutex<Option<HashSet<(usize, String, i32)>>> = Mutex::new(None);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<(usize, String, i32)>>> {
    // A poisoned lock only means a panic elsewhere while holding it; the set is still
    // consistent (every operation on it is a single insert or remove).
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// One partition's fetch queue, split off the consumer's queue, drained a batch at a time.
///
/// It holds the consumer (an `Arc`), so the `rd_kafka_t` outlives the queue handle.
pub struct PartitionFeed {
    queue: NonNull<rd::rd_kafka_queue_t>,
    rk: NonNull<rd::rd_kafka_t>,
    /// Registered with librdkafka as the wake-up callback's opaque: boxed so its address
    /// is stable; freed only after the callback is disabled (see `Drop`).
    waker: Box<AtomicWaker>,
    key: (usize, String, i32),
    /// Dropped last: keeps the `rd_kafka_t` alive until the queue handle is destroyed.
    _consumer: Arc<dyn Any + Send + Sync>,
}

// SAFETY: librdkafka's queue handles and `rd_kafka_t` may be used from any thread (every
// queue operation takes the queue's lock); the waker is an `AtomicWaker` (Send + Sync); the
// owner `Arc` is Send + Sync. Nothing in the feed is tied to the thread that created it.
unsafe impl Send for PartitionFeed {}
// SAFETY: the `&self` methods (`len`, `poll_ready`, `ready`) only call
// `rd_kafka_queue_length` (takes the queue lock) and register with the `AtomicWaker`
// (made for concurrent use); draining needs `&mut self`.
unsafe impl Sync for PartitionFeed {}

impl PartitionFeed {
    /// Split `topic`/`partition`'s fetch queue off `consumer`'s queue and own it.
    ///
    /// Call it before the partition's assignment takes effect (in `pre_rebalance`, or
    /// before `assign`), so no record of it lands on the consumer's main queue. `None` if
    /// the topic name holds a NUL, librdkafka returns no queue, or a feed of the same
    /// partition of the same client is alive.
    pub fn split<C, X>(consumer: &Arc<C>, topic: &str, partition: i32) -> Option<Self>
    where
        C: Consumer<X> + Send + Sync + 'static,
        X: ConsumerContext + 'static,
    {
        let ctopic = CString::new(topic).ok()?;
        let rk = NonNull::new(consumer.client().native_ptr())?;
        let key = (rk.as_ptr() as usize, topic.to_owned(), partition);
        if !live().get_or_insert_with(HashSet::new).insert(key.clone()) {
            return None;
        }
        // SAFETY: `rk` is the live client of `consumer` (we hold a reference to it), and
        // `ctopic` is a NUL-terminated string alive for the call. librdkafka returns a new
        // handle (holding a reference on the partition's fetch queue) or NULL.
        let raw =
            unsafe { rd::rd_kafka_queue_get_partition(rk.as_ptr(), ctopic.as_ptr(), partition) };
        let Some(queue) = NonNull::new(raw) else {
            if let Some(set) = live().as_mut() {
                set.remove(&key);
            }
            return None;
        };
        let waker = Box::new(AtomicWaker::new());
        let opaque = ptr::from_ref::<AtomicWaker>(&waker)
            .cast_mut()
            .cast::<c_void>();
        // SAFETY: `queue` is the valid handle just returned. Forwarding to NULL stops the
        // fetch queue from going to the consumer's queue, and sets RD_KAFKA_Q_F_FWD_APP so
        // the fetch start does not forward it again (`rdkafka_partition.c:2293`).
        unsafe { rd::rd_kafka_queue_forward(queue.as_ptr(), ptr::null_mut()) };
        // SAFETY: `queue` is valid; `on_nonempty` only reads `opaque` as an `AtomicWaker`,
        // which lives in `waker`, freed only after `Drop` disabled this callback.
        unsafe { rd::rd_kafka_queue_cb_event_enable(queue.as_ptr(), Some(on_nonempty), opaque) };
        let owner: Arc<dyn Any + Send + Sync> = consumer.clone();
        Some(PartitionFeed {
            queue,
            rk,
            waker,
            key,
            _consumer: owner,
        })
    }

    /// The topic and partition of this feed.
    pub fn partition(&self) -> (&str, i32) {
        (&self.key.1, self.key.2)
    }

    /// Ops queued on the partition's fetch queue: messages, errors, and outdated ops a
    /// drain will drop. 0 means a drain would deliver nothing.
    pub fn len(&self) -> usize {
        // SAFETY: `self.queue` is a valid handle until `Drop`.
        unsafe { rd::rd_kafka_queue_length(self.queue.as_ptr()) }
    }

    /// Nothing queued (see [`PartitionFeed::len`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ready when something is queued; otherwise registers `cx`'s waker, woken by
    /// librdkafka when the queue turns non-empty.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.is_empty() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Re-check after registering: an op enqueued between the first check and the
        // registration woke nobody.
        if self.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Wait until something is queued (a message, an error, or an outdated op: a drain
    /// may then deliver nothing). One task at a time.
    pub async fn ready(&self) {
        poll_fn(|cx| self.poll_ready(cx)).await
    }

    /// Hand every message ready on the queue to `f`, in order, without blocking, until `f`
    /// returns [`Flow::Stop`] or the queue is empty. Returns how many messages `f` was given
    /// (error messages included; outdated ops, barriers and transaction control records
    /// never reach `f`).
    ///
    /// A message `f` is given is taken (see [`Flow`]). Messages not yet given stay in
    /// librdkafka, at the head of the queue, for the next drain.
    ///
    /// # Panics
    ///
    /// If `f` panics, the panic is caught inside the callback (it never unwinds through
    /// librdkafka), the drain stops as for [`Flow::Stop`], and the panic is resumed here
    /// once librdkafka has returned. The message `f` panicked on counts as taken.
    pub fn drain<F>(&mut self, mut f: F) -> usize
    where
        F: FnMut(&Msg<'_>) -> Flow,
    {
        let mut ctx = DrainCtx {
            f: &mut f,
            rk: self.rk,
            given: 0,
            panic: None,
        };
        let opaque = ptr::from_mut::<DrainCtx<'_, F>>(&mut ctx).cast::<c_void>();
        // SAFETY: `self.queue` is valid; timeout 0 never blocks. `trampoline::<F>` reads
        // `opaque` as the `DrainCtx<F>` above, which outlives the call and is not touched
        // here until it returns. The callback runs on this thread, during this call.
        unsafe {
            rd::rd_kafka_consume_callback_queue(
                self.queue.as_ptr(),
                0,
                Some(trampoline::<F>),
                opaque,
            )
        };
        if let Some(p) = ctx.panic.take() {
            resume_unwind(p);
        }
        ctx.given
    }
}

impl Drop for PartitionFeed {
    fn drop(&mut self) {
        // First the wake-up callback: librdkafka calls it with the queue lock held
        // (`rdkafka_queue.h` `rd_kafka_q_io_event`) and replaces it under that lock
        // (`rd_kafka_q_cb_event_enable`), so once this returns no call with our waker's
        // address is running or will start.
        // SAFETY: `self.queue` is valid; NULL disables the callback.
        unsafe { rd::rd_kafka_queue_cb_event_enable(self.queue.as_ptr(), None, ptr::null_mut()) };
        // SAFETY: `self.queue` is valid and not used after this; the `rd_kafka_t` is alive
        // (the owner `Arc` is dropped after this function).
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
        if let Some(set) = live().as_mut() {
            set.remove(&self.key);
        }
        // Then the fields: the waker (no longer referenced by librdkafka), then the owner.
    }
}

struct DrainCtx<'f, F> {
    f: &'f mut F,
    rk: NonNull<rd::rd_kafka_t>,
    given: usize,
    panic: Option<Box<dyn Any + Send + 'static>>,
}

/// librdkafka's wake-up callback: runs on a librdkafka thread (or a draining thread
/// putting ops back) with the queue's lock held, so it only wakes.
unsafe extern "C" fn on_nonempty(_rk: *mut rd::rd_kafka_t, opaque: *mut c_void) {
    // SAFETY: `opaque` is the address of the feed's boxed `AtomicWaker`, registered in
    // `split` and unregistered (under the queue lock this call holds) before it is freed.
    let waker = unsafe { &*opaque.cast_const().cast::<AtomicWaker>() };
    // A waker's `wake` is foreign code: never unwind into C. Forgetting the payload keeps
    // even its drop from running here.
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| waker.wake())) {
        std::mem::forget(p);
    }
}

/// librdkafka's consume callback for [`PartitionFeed::drain`].
unsafe extern "C" fn trampoline<F>(message: *mut rd::rd_kafka_message_t, opaque: *mut c_void)
where
    F: FnMut(&Msg<'_>) -> Flow,
{
    // SAFETY: `opaque` is the `DrainCtx<F>` of the `drain` call running on this thread,
    // exclusively ours for the duration of this callback.
    let ctx = unsafe { &mut *opaque.cast::<DrainCtx<'_, F>>() };
    let Some(message) = NonNull::new(message) else {
        return;
    };
    // SAFETY: librdkafka passes a valid message that lives until the callback returns
    // (`rd_kafka_consume_cb` destroys its op after this call); `Msg` only lends it out for
    // a lifetime the closure cannot extend.
    let raw = unsafe { message.as_ref() };
    let msg = Msg {
        raw,
        headers: OnceCell::new(),
    };
    ctx.given += 1;
    let stop = match catch_unwind(AssertUnwindSafe(|| (ctx.f)(&msg))) {
        Ok(Flow::Continue) => false,
        Ok(Flow::Stop) => true,
        Err(p) => {
            ctx.panic = Some(p);
            true
        }
    };
    if stop {
        // SAFETY: sets librdkafka's thread-local yield flag; the serve loop on this thread
        // checks it right after this callback and puts the remaining ops back.
        unsafe { rd::rd_kafka_yield(ctx.rk.as_ptr()) };
    }
}

/// The leader epoch of the partition leader a consumed message was fetched from
/// (`rd_kafka_message_leader_epoch`, KIP-320), or `None` when librdkafka does not know it
/// (-1: a broker without leader epochs, or not a consumed message).
///
/// Two records at the same offset with different epochs are different records: the log
/// was truncated between them (an unclean leader election), and new records were written
/// at the offsets the old ones had.
pub fn leader_epoch(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<i32> {
    // SAFETY: `m.ptr()` is the `rd_kafka_message_t` that `m` borrows from librdkafka and
    // keeps alive for `m`'s lifetime; the call only reads it (and its topic handle's
    // client type) and returns an integer.
    let epoch = unsafe { rd::rd_kafka_message_leader_epoch(m.ptr()) };
    (epoch >= 0).then_some(epoch)
}

/// A message borrowed from librdkafka for one call of [`PartitionFeed::drain`]'s closure.
///
/// It implements [`rdkafka::message::Message`], so code written for rust-rdkafka's
/// `BorrowedMessage` (sluice's `RecordBatchBuilder::push`) takes it unchanged. Check
/// [`Msg::error`] first: an error message's payload is librdkafka's error text.
pub struct Msg<'a> {
    raw: &'a rd::rd_kafka_message_t,
    /// The headers, parsed by librdkafka on first use (`rd_kafka_message_headers`).
    headers: OnceCell<Option<MsgHeaders<'a>>>,
}

impl<'a> Msg<'a> {
    /// The error this message carries (a consumer error: a failed fetch, ...), or `None`
    /// for a record.
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        match self.raw.err {
            rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => None,
            e => Some(e.into()),
        }
    }

    /// The leader epoch this message was fetched at, as [`leader_epoch`] for rust-rdkafka's
    /// messages: `None` when librdkafka does not know it.
    pub fn leader_epoch(&self) -> Option<i32> {
        // SAFETY: `self.raw` is a live message for 'a; the call only reads it (and its
        // topic handle's client type) and returns an integer.
        let epoch = unsafe { rd::rd_kafka_message_leader_epoch(self.raw) };
        (epoch >= 0).then_some(epoch)
    }

    fn bytes(&self, p: *mut c_void, len: usize) -> Option<&'a [u8]> {
        if p.is_null() {
            return None;
        }
        // SAFETY: librdkafka's key and payload pointers of a live message point to `len`
        // initialised bytes owned by the message, alive as long as the message ('a).
        Some(unsafe { std::slice::from_raw_parts(p.cast_const().cast::<u8>(), len) })
    }
}

impl<'a> Message for Msg<'a> {
    type Headers = MsgHeaders<'a>;

    fn key(&self) -> Option<&[u8]> {
        self.bytes(self.raw.key, self.raw.key_len)
    }

    fn payload(&self) -> Option<&[u8]> {
        self.bytes(self.raw.payload, self.raw.len)
    }

    unsafe fn payload_mut(&mut self) -> Option<&mut [u8]> {
        if self.raw.payload.is_null() {
            return None;
        }
        // SAFETY: as for `payload`; the caller takes on the trait's stated risk that
        // librdkafka does not promise the payload may be written.
        Some(unsafe { std::slice::from_raw_parts_mut(self.raw.payload.cast::<u8>(), self.raw.len) })
    }

    /// The topic's name; empty if librdkafka gives none or it is not UTF-8 (never panics).
    fn topic(&self) -> &str {
        if self.raw.rkt.is_null() {
            return "";
        }
        // SAFETY: `rkt` is the message's topic handle, alive as long as the message.
        let name = unsafe { rd::rd_kafka_topic_name(self.raw.rkt) };
        if name.is_null() {
            return "";
        }
        // SAFETY: librdkafka returns the topic's NUL-terminated name, alive with the topic.
        let name = unsafe { CStr::from_ptr(name) };
        name.to_str().unwrap_or("")
    }

    fn partition(&self) -> i32 {
        self.raw.partition
    }

    fn offset(&self) -> i64 {
        self.raw.offset
    }

    fn timestamp(&self) -> Timestamp {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: a live message; `kind` is a valid place to write the type to.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.raw, &mut kind) };
        if ts == -1 {
            return Timestamp::NotAvailable;
        }
        match kind {
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE => {
                Timestamp::NotAvailable
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_CREATE_TIME => {
                Timestamp::CreateTime(ts)
            }
            rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME => {
                Timestamp::LogAppendTime(ts)
            }
        }
    }

    fn headers(&self) -> Option<&MsgHeaders<'a>> {
        self.headers
            .get_or_init(|| {
                let mut hdrs: *mut rd::rd_kafka_headers_t = ptr::null_mut();
                // SAFETY: a live message; librdkafka parses its headers on first call and
                // keeps them with the message (freed with it), returning NOENT if none.
                let err = unsafe { rd::rd_kafka_message_headers(self.raw, &mut hdrs) };
                match (err, NonNull::new(hdrs)) {
                    (rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR, Some(ptr)) => {
                        Some(MsgHeaders {
                            ptr,
                            _message: PhantomData,
                        })
                    }
                    _ => None,
                }
            })
            .as_ref()
    }
}

/// The headers of a [`Msg`], read in place.
pub struct MsgHeaders<'a> {
    ptr: NonNull<rd::rd_kafka_headers_t>,
    _message: PhantomData<&'a rd::rd_kafka_message_t>,
}

impl MsgHeaders<'_> {
    /// Header `idx` as raw bytes: its name and value (`None`: a null value).
    pub fn get_raw(&self, idx: usize) -> Option<(&[u8], Option<&[u8]>)> {
        let mut name: *const std::ffi::c_char = ptr::null();
        let mut value: *const c_void = ptr::null();
        let mut size = 0usize;
        // SAFETY: `self.ptr` is the message's header list, alive as long as the message;
        // the three out-pointers are valid places to write to.
        let err = unsafe {
            rd::rd_kafka_header_get_all(self.ptr.as_ptr(), idx, &mut name, &mut value, &mut size)
        };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            return None;
        }
        // SAFETY: librdkafka returns the header's NUL-terminated name, owned by the list.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes();
        let value = if value.is_null() {
            None
        } else {
            // SAFETY: `size` bytes of value owned by the header list.
            Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
        };
        Some((name, value))
    }
}

impl Headers for MsgHeaders<'_> {
    fn count(&self) -> usize {
        // SAFETY: `self.ptr` is the message's header list, alive as long as the message.
        unsafe { rd::rd_kafka_header_cnt(self.ptr.as_ptr()) }
    }

    /// Header `idx`; `None` past the end, and also for a name that is not UTF-8 (where
    /// rust-rdkafka's `BorrowedHeaders` panics): use [`MsgHeaders::get_raw`] for those.
    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        let (name, value) = self.get_raw(idx)?;
        Some(Header {
            key: std::str::from_utf8(name).ok()?,
            value,
        })
    }
}

#[cfg(test)]
mod tests;
