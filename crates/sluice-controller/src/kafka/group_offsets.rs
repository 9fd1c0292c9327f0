//! Committed offsets of many consumer groups through one client.
//!
//! rust-rdkafka 0.39's safe API reads committed offsets only through a consumer whose
//! `group.id` is that group (`Consumer::committed_offsets`), so reading N groups took N
//! clients, each with its threads and connections. librdkafka (2.12) has an admin request
//! for any group on any client, `rd_kafka_ListConsumerGroupOffsets`, which rust-rdkafka
//! does not wrap: this module calls it through `rdkafka::bindings`, the only `unsafe` code
//! of the controller. librdkafka sends one OffsetFetch per group (it implements KIP-709's
//! many-groups OffsetFetch for one group only: "Currently, only supporting 1 group",
//! rdkafka_request.c), so the groups are read with a bounded number of requests in flight
//! over the client's one connection to each coordinator.
#![allow(unsafe_code)]

use std::ffi::{c_void, CStr, CString};
use std::time::{Duration, Instant};

use rdkafka::bindings as rd;
use rdkafka::client::{Client, ClientContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::TopicPartitionList;

/// One group's committed offset per partition asked for: `None` where it has none.
pub type Committed = Vec<(String, i32, Option<i64>)>;

/// Frees a librdkafka object when dropped.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the matching librdkafka constructor and is
            // freed once, here.
            unsafe { (self.1)(self.0) }
        }
    }
}

fn code(err: rd::rd_kafka_resp_err_t) -> KafkaError {
    KafkaError::OffsetFetch(RDKafkaErrorCode::from(err))
}

/// The committed offsets of each `(group, partitions)` in `reads` (distinct groups), with
/// at most `in_flight` requests outstanding, all answered within `timeout`. A group whose
/// request, or any of whose partitions, failed is an error: never "no commit".
pub fn committed<C: ClientContext>(
    client: &Client<C>,
    reads: &[(String, TopicPartitionList)],
    in_flight: usize,
    timeout: Duration,
) -> Vec<Result<Committed, KafkaError>> {
    let mut out: Vec<Option<Result<Committed, KafkaError>>> = vec![None; reads.len()];
    if reads.is_empty() {
        return Vec::new();
    }
    let rk = client.native_ptr();
    // SAFETY: `rk` is a live client for the whole call (borrowed from `client`).
    let queue = Owned(
        unsafe { rd::rd_kafka_queue_new(rk) },
        rd::rd_kafka_queue_destroy,
    );
    let options = Owned(
        // SAFETY: as above; the options are freed by `Owned`.
        unsafe {
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
            )
        },
        rd::rd_kafka_AdminOptions_destroy,
    );
    let deadline = Instant::now() + timeout;
    let mut errstr = [0 as std::ffi::c_char; 256];
    // SAFETY: valid options and a buffer of the size given.
    unsafe {
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout.as_millis().min(i32::MAX as u128) as i32,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
    }
    let (mut next, mut pending) = (0usize, 0usize);
    while out.iter().any(Option::is_none) {
        while pending < in_flight.max(1) && next < reads.len() {
            let (group, partitions) = &reads[next];
            let Ok(group_c) = CString::new(group.as_str()) else {
                out[next] = Some(Err(code(
                    rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__INVALID_ARG,
                )));
                next += 1;
                continue;
            };
            // SAFETY: the request copies the group id and the partition list (librdkafka's
            // rd_kafka_ListConsumerGroupOffsets_new and the admin request both copy), so
            // both may be freed after the call. The opaque is the read's index + 1, never
            // dereferenced.
            unsafe {
                let request = Owned(
                    rd::rd_kafka_ListConsumerGroupOffsets_new(group_c.as_ptr(), partitions.ptr()),
                    rd::rd_kafka_ListConsumerGroupOffsets_destroy,
                );
                let mut array = [request.0];
                rd::rd_kafka_AdminOptions_set_opaque(options.0, (next + 1) as *mut c_void);
                rd::rd_kafka_ListConsumerGroupOffsets(
                    rk,
                    array.as_mut_ptr(),
                    1,
                    options.0,
                    queue.0,
                );
            }
            next += 1;
            pending += 1;
        }
        if pending == 0 {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // SAFETY: a live queue; the event is freed by `Owned`.
        let event = Owned(
            unsafe { rd::rd_kafka_queue_poll(queue.0, left.as_millis().max(1) as i32) },
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            continue;
        }
        // SAFETY: a live event of the queue: its opaque is what was set above, and its
        // result (owned by the event) is read before the event is freed.
        let (index, answer) = unsafe {
            let index = rd::rd_kafka_event_opaque(event.0) as usize;
            if index == 0 || index > reads.len() {
                continue;
            }
            (index - 1, read_event(event.0))
        };
        if out[index].is_none() {
            pending -= 1;
            out[index] = Some(answer);
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or(Err(code(
                rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT,
            )))
        })
        .collect()
}

/// The one group's answer in a ListConsumerGroupOffsets result event.
///
/// # Safety
/// `event` is a live result event of `rd_kafka_ListConsumerGroupOffsets`.
unsafe fn read_event(event: *mut rd::rd_kafka_event_t) -> Result<Committed, KafkaError> {
    let err = rd::rd_kafka_event_error(event);
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(code(err));
    }
    let result = rd::rd_kafka_event_ListConsumerGroupOffsets_result(event);
    if result.is_null() {
        return Err(code(rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__BAD_MSG));
    }
    let mut n = 0usize;
    let groups = rd::rd_kafka_ListConsumerGroupOffsets_result_groups(result, &mut n);
    if groups.is_null() || n != 1 {
        return Err(code(rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__BAD_MSG));
    }
    let group = *groups;
    let gerr = rd::rd_kafka_group_result_error(group);
    if !gerr.is_null() {
        return Err(code(rd::rd_kafka_error_code(gerr)));
    }
    let list = rd::rd_kafka_group_result_partitions(group);
    if list.is_null() {
        return Ok(Vec::new());
    }
    let list = &*list;
    let elems = std::slice::from_raw_parts(list.elems, list.cnt.max(0) as usize);
    let mut out = Vec::with_capacity(elems.len());
    for e in elems {
        if e.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            // A partition the broker could not answer for: the group's lag is unknown
            // (reading it as "no commit" would count the whole log as lag, or none).
            return Err(code(e.err));
        }
        let topic = CStr::from_ptr(e.topic).to_string_lossy().into_owned();
        out.push((topic, e.partition, (e.offset >= 0).then_some(e.offset)));
    }
    Ok(out)
}
