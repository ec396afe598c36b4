//! The host side of the proxy-wasm ABI 0.2.1, as Envoy implements it: the functions a
//! plugin imports from `env`, and the part of WASI (`wasi_snapshot_preview1`) that
//! plugins built for `wasm32-wasip1` import for their standard library.
//!
//! Every value handed to the plugin is written into memory the plugin allocated with its
//! own `proxy_on_memory_allocate` (or `malloc`), so that it can free it; empty values are
//! handed as a null pointer and a zero size, as Envoy does. A pointer outside the plugin's
//! memory is a misuse of the ABI: the call traps, and the plugin fails.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use wasmi::{Caller, Error, FuncType, Linker, Val, ValType};

use super::vm::{Host, LocalReply, MapKind};

/// The ABI's status codes (`WasmResult` in Envoy).
pub(super) mod status {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 1;
    pub const BAD_ARGUMENT: u32 = 2;
    pub const EMPTY: u32 = 7;
    pub const CAS_MISMATCH: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
}
use status::*;

/// WASI's error numbers used here.
const ERRNO_SUCCESS: u32 = 0;
const ERRNO_BADF: u32 = 8;

/// The buffers a plugin reads and writes (`BufferType`).
pub(super) mod buffer {
    pub const REQUEST_BODY: u32 = 0;
    pub const RESPONSE_BODY: u32 = 1;
    pub const CALL_RESPONSE_BODY: u32 = 4;
    pub const VM_CONFIGURATION: u32 = 6;
    pub const PLUGIN_CONFIGURATION: u32 = 7;
}

/// The stream a plugin resumes or closes (`StreamType`).
const STREAM_REQUEST: u32 = 0;
const STREAM_RESPONSE: u32 = 1;

type C<'a> = Caller<'a, Host>;

/// The bytes `[ptr, ptr + len)` of the plugin's memory, copied out.
fn read(caller: &C, ptr: u32, len: u32) -> Result<Vec<u8>, Error> {
    let memory = caller.data().memory.expect("set at instantiation");
    let data = memory.data(caller);
    slice(data, ptr, len).map(<[u8]>::to_vec)
}

fn slice(data: &[u8], ptr: u32, len: u32) -> Result<&[u8], Error> {
    let (start, len) = (ptr as usize, len as usize);
    start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .ok_or_else(|| {
            Error::new(format!(
                "the plugin passed memory outside its own ({len} bytes at {start})"
            ))
        })
}

fn write(caller: &mut C, ptr: u32, bytes: &[u8]) -> Result<(), Error> {
    let memory = caller.data().memory.expect("set at instantiation");
    let data = memory.data_mut(caller);
    let (start, len) = (ptr as usize, bytes.len());
    let target = start
        .checked_add(len)
        .and_then(|end| data.get_mut(start..end))
        .ok_or_else(|| {
            Error::new(format!(
                "the plugin asked for a value at memory outside its own ({len} bytes at {start})"
            ))
        })?;
    target.copy_from_slice(bytes);
    Ok(())
}

fn write_u32(caller: &mut C, ptr: u32, value: u32) -> Result<(), Error> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `bytes` to the plugin: allocated by the plugin, filled, and its address and size
/// written at `ptr_ptr` and `size_ptr`.
fn give(caller: &mut C, bytes: &[u8], ptr_ptr: u32, size_ptr: u32) -> Result<(), Error> {
    let addr = if bytes.is_empty() {
        0
    } else {
        let alloc = caller.data().alloc.expect("set at instantiation");
        let addr = alloc.call(&mut *caller, bytes.len() as u32)?;
        if addr == 0 {
            return Err(Error::new(
                "the plugin's allocator returned null for a value handed to it",
            ));
        }
        write(caller, addr, bytes)?;
        addr
    };
    write_u32(caller, ptr_ptr, addr)?;
    write_u32(caller, size_ptr, bytes.len() as u32)
}

/// A header map in the ABI's form: the pair count, each pair's two sizes, then each name
/// and value followed by a NUL.
pub fn serialize_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let data: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + pairs.len() * 8 + data);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The pairs of a serialized header map; `None` if it is malformed (a count or a size past
/// the end, a NUL missing after a name or value). Bytes after the last pair are ignored.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let word = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = word(0)?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    // Each name and value is followed by a NUL, which is checked, not assumed.
    let mut field = |len: usize| -> Option<&[u8]> {
        let end = data.checked_add(len)?;
        let text = bytes.get(data..end)?;
        (bytes.get(end) == Some(&0)).then_some(())?;
        data = end + 1;
        Some(text)
    };
    for i in 0..count {
        let (k, v) = (word(4 + i * 8)?, word(8 + i * 8)?);
        pairs.push((field(k)?, field(v)?));
    }
    Some(pairs)
}

fn header(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    Some((
        HeaderName::from_bytes(name).ok()?,
        HeaderValue::from_bytes(value).ok()?,
    ))
}

/// The header map `kind` names, as the current callback may read it.
fn map(host: &Host, kind: u32) -> Option<&HeaderMap> {
    let stream = &host.stream;
    match MapKind::from_abi(kind)? {
        MapKind::RequestHeaders => Some(&stream.request),
        MapKind::RequestTrailers => Some(&stream.request_trailers),
        MapKind::ResponseHeaders => Some(&stream.response),
        MapKind::ResponseTrailers => Some(&stream.response_trailers),
        MapKind::CallHeaders => stream.call.as_ref().map(|c| &c.headers),
        MapKind::CallTrailers => Some(&stream.call_trailers),
    }
}

/// The header map `kind` names, as the current callback may change it: only the maps of
/// the phase that runs (changing request headers once they went upstream changes nothing).
fn map_mut(host: &mut Host, kind: u32) -> Option<&mut HeaderMap> {
    let kind = MapKind::from_abi(kind)?;
    if !host.stream.writable.contains(&kind) {
        return None;
    }
    let stream = &mut host.stream;
    match kind {
        MapKind::RequestHeaders => Some(&mut stream.request),
        MapKind::RequestTrailers => Some(&mut stream.request_trailers),
        MapKind::ResponseHeaders => Some(&mut stream.response),
        MapKind::ResponseTrailers => Some(&mut stream.response_trailers),
        MapKind::CallHeaders | MapKind::CallTrailers => None,
    }
}

/// Pseudo-headers the plugin sees in request and response header maps, as in Envoy.
fn pseudo(host: &Host, kind: u32, name: &[u8]) -> Option<Vec<u8>> {
    let props = host.stream.props.as_ref()?;
    match (MapKind::from_abi(kind)?, name) {
        (MapKind::RequestHeaders, b":method") => Some(props.method.as_str().into()),
        (MapKind::RequestHeaders, b":path") => Some(
            props
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .into(),
        ),
        (MapKind::RequestHeaders, b":authority") => props.authority(),
        (MapKind::RequestHeaders, b":scheme") => Some(props.scheme().into()),
        (MapKind::ResponseHeaders, b":status") => {
            props.status.map(|s| s.as_str().as_bytes().to_vec())
        }
        (MapKind::CallHeaders, b":status") => host
            .stream
            .call
            .as_ref()
            .and_then(|c| c.status)
            .map(|s| s.as_str().as_bytes().to_vec()),
        _ => None,
    }
}

fn pairs_of(host: &Host, kind: u32) -> Option<Vec<u8>> {
    let headers = map(host, kind)?;
    let mut pseudos: Vec<(&'static [u8], Vec<u8>)> = Vec::new();
    let names: &[&'static [u8]] = match MapKind::from_abi(kind)? {
        MapKind::RequestHeaders => &[b":authority", b":path", b":method", b":scheme"],
        MapKind::ResponseHeaders | MapKind::CallHeaders => &[b":status"],
        _ => &[],
    };
    for name in names {
        if let Some(v) = pseudo(host, kind, name) {
            pseudos.push((name, v));
        }
    }
    let pairs: Vec<(&[u8], &[u8])> = pseudos
        .iter()
        .map(|(k, v)| (*k, v.as_slice()))
        .chain(
            headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes())),
        )
        .collect();
    Some(serialize_pairs(&pairs))
}

/// Registers every host function on `linker`.
pub(super) fn define(linker: &mut Linker<Host>) -> Result<(), Error> {
    // Logging and time.
    linker.func_wrap(
        "env",
        "proxy_log",
        |caller: C, level: u32, ptr: u32, len: u32| -> Result<u32, Error> {
            let message = read(&caller, ptr, len)?;
            caller
                .data()
                .shared
                .log(level, &String::from_utf8_lossy(&message));
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: C, ptr: u32| -> Result<u32, Error> {
            write_u32(&mut caller, ptr, super::vm::log_level())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: C, ptr: u32| -> Result<u32, Error> {
            write(&mut caller, ptr, &now_nanos().to_le_bytes())?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut caller: C, period: u32| -> u32 {
            caller.data_mut().tick = (period > 0).then(|| Duration::from_millis(u64::from(period)));
            OK
        },
    )?;

    // Buffers.
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: C,
         kind: u32,
         start: u32,
         max: u32,
         ptr_ptr: u32,
         size_ptr: u32|
         -> Result<u32, Error> {
            let host = caller.data();
            let whole: &[u8] = match kind {
                buffer::REQUEST_BODY | buffer::RESPONSE_BODY => match &host.stream.body {
                    Some((k, body)) if *k == kind => body,
                    _ => return Ok(NOT_FOUND),
                },
                buffer::CALL_RESPONSE_BODY => match &host.stream.call {
                    Some(call) => &call.body,
                    None => return Ok(NOT_FOUND),
                },
                buffer::VM_CONFIGURATION => host.shared.vm_configuration.as_bytes(),
                buffer::PLUGIN_CONFIGURATION => host.shared.configuration.as_bytes(),
                _ => return Ok(NOT_FOUND),
            };
            let start = (start as usize).min(whole.len());
            let end = start.saturating_add(max as usize).min(whole.len());
            let part = Bytes::copy_from_slice(&whole[start..end]);
            give(&mut caller, &part, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: C,
         kind: u32,
         start: u32,
         size: u32,
         ptr: u32,
         len: u32|
         -> Result<u32, Error> {
            let data = read(&caller, ptr, len)?;
            let host = caller.data_mut();
            // The request body streams to the app as it arrives: the plugin reads a copy.
            if kind == buffer::REQUEST_BODY {
                return Ok(UNIMPLEMENTED);
            }
            let Some((_, body)) = host.stream.body.as_mut().filter(|(k, _)| *k == kind) else {
                return Ok(NOT_FOUND);
            };
            let start = (start as usize).min(body.len());
            let end = start.saturating_add(size as usize).min(body.len());
            body.splice(start..end, data);
            host.stream.body_changed = true;
            Ok(OK)
        },
    )?;

    // Header maps.
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: C, kind: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32, Error> {
            let Some(pairs) = pairs_of(caller.data(), kind) else {
                return Ok(NOT_FOUND);
            };
            give(&mut caller, &pairs, ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: C, kind: u32, ptr: u32, len: u32| -> Result<u32, Error> {
            let bytes = read(&caller, ptr, len)?;
            let Some(pairs) = deserialize_pairs(&bytes) else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(headers) = map_mut(caller.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            headers.clear();
            for (k, v) in pairs {
                if k.starts_with(b":") {
                    continue;
                }
                if let Some((name, value)) = header(k, v) {
                    headers.append(name, value);
                }
            }
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: C,
         kind: u32,
         kp: u32,
         kl: u32,
         ptr_ptr: u32,
         size_ptr: u32|
         -> Result<u32, Error> {
            let key = read(&caller, kp, kl)?;
            let host = caller.data();
            let value = if key.starts_with(b":") {
                pseudo(host, kind, &key)
            } else {
                let Some(headers) = map(host, kind) else {
                    return Ok(NOT_FOUND);
                };
                // Repeated fields read as one, joined by commas, as Envoy joins them.
                let mut values = HeaderName::from_bytes(&key)
                    .ok()
                    .map(|name| headers.get_all(name).iter().map(|v| v.as_bytes().to_vec()))
                    .into_iter()
                    .flatten()
                    .peekable();
                values
                    .peek()
                    .is_some()
                    .then(|| values.collect::<Vec<_>>().join(&b","[..]))
            };
            match value {
                Some(value) => {
                    give(&mut caller, &value, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    for (name, replace) in [
        ("proxy_replace_header_map_value", true),
        ("proxy_add_header_map_value", false),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |caller: C, kind: u32, kp: u32, kl: u32, vp: u32, vl: u32| -> Result<u32, Error> {
                let (key, value) = (read(&caller, kp, kl)?, read(&caller, vp, vl)?);
                set_header(caller, kind, &key, &value, replace)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: C, kind: u32, kp: u32, kl: u32| -> Result<u32, Error> {
            let key = read(&caller, kp, kl)?;
            let Some(headers) = map_mut(caller.data_mut(), kind) else {
                return Ok(BAD_ARGUMENT);
            };
            if let Ok(name) = HeaderName::from_bytes(&key) {
                headers.remove(name);
            }
            Ok(OK)
        },
    )?;

    // Properties.
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: C, pp: u32, pl: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32, Error> {
            let path = read(&caller, pp, pl)?;
            match caller.data().property(&path) {
                Some(value) => {
                    give(&mut caller, &value, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: C, pp: u32, pl: u32, vp: u32, vl: u32| -> Result<u32, Error> {
            let (path, value) = (read(&caller, pp, pl)?, read(&caller, vp, vl)?);
            Ok(match caller.data_mut().set_property(path, value) {
                true => OK,
                false => NOT_FOUND,
            })
        },
    )?;

    // Shared data and queues.
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: C,
         kp: u32,
         kl: u32,
         ptr_ptr: u32,
         size_ptr: u32,
         cas_ptr: u32|
         -> Result<u32, Error> {
            let key = read(&caller, kp, kl)?;
            let Some((value, cas)) = caller.data().shared.data.get(&key) else {
                return Ok(NOT_FOUND);
            };
            give(&mut caller, &value, ptr_ptr, size_ptr)?;
            write_u32(&mut caller, cas_ptr, cas)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |caller: C, kp: u32, kl: u32, vp: u32, vl: u32, cas: u32| -> Result<u32, Error> {
            let (key, value) = (read(&caller, kp, kl)?, read(&caller, vp, vl)?);
            Ok(match caller.data().shared.data.set(key, value, cas) {
                true => OK,
                false => CAS_MISMATCH,
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: C, np: u32, nl: u32, id_ptr: u32| -> Result<u32, Error> {
            let name = read(&caller, np, nl)?;
            let host = caller.data();
            let id = host
                .shared
                .queues
                .register(name, host.worker, host.effective);
            write_u32(&mut caller, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: C, _vp: u32, _vl: u32, np: u32, nl: u32, id_ptr: u32| -> Result<u32, Error> {
            // One plugin entry is one VM: its queues are its own whatever the VM id asked.
            let name = read(&caller, np, nl)?;
            let Some(id) = caller.data().shared.queues.resolve(&name) else {
                return Ok(NOT_FOUND);
            };
            write_u32(&mut caller, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |caller: C, id: u32, vp: u32, vl: u32| -> Result<u32, Error> {
            let value = read(&caller, vp, vl)?;
            Ok(match caller.data().shared.queues.enqueue(id, value) {
                true => OK,
                false => NOT_FOUND,
            })
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: C, id: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32, Error> {
            match caller.data().shared.queues.dequeue(id) {
                None => Ok(NOT_FOUND),
                Some(None) => Ok(EMPTY),
                Some(Some(value)) => {
                    give(&mut caller, &value, ptr_ptr, size_ptr)?;
                    Ok(OK)
                }
            }
        },
    )?;

    // The stream.
    for (name, stream) in [
        ("proxy_continue_stream", None),
        ("proxy_continue_request", Some(STREAM_REQUEST)),
        ("proxy_continue_response", Some(STREAM_RESPONSE)),
    ] {
        let f = move |mut caller: C, kind: u32| -> u32 {
            let host = caller.data_mut();
            match kind {
                STREAM_REQUEST => host.effects.resumed = true,
                STREAM_RESPONSE => {}
                _ => return BAD_ARGUMENT,
            }
            OK
        };
        match stream {
            None => linker.func_wrap("env", name, f)?,
            Some(kind) => linker.func_wrap("env", name, move |caller: C| f(caller, kind))?,
        };
    }
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut caller: C, _kind: u32| -> u32 {
            // Closing is answering with nothing more to say: the client's connection resets.
            caller.data_mut().effects.closed = true;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: C,
         status: u32,
         _dp: u32,
         _dl: u32,
         bp: u32,
         bl: u32,
         hp: u32,
         hl: u32,
         _grpc: i32|
         -> Result<u32, Error> {
            let body = read(&caller, bp, bl)?;
            let headers = read(&caller, hp, hl)?;
            let Ok(status) = u16::try_from(status)
                .map_err(drop)
                .and_then(|s| StatusCode::from_u16(s).map_err(drop))
            else {
                return Ok(BAD_ARGUMENT);
            };
            let Some(pairs) = deserialize_pairs(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            let headers = pairs
                .into_iter()
                .filter_map(|(k, v)| header(k, v))
                .collect();
            caller.data_mut().effects.reply = Some(LocalReply {
                status,
                headers,
                body: Bytes::from(body),
            });
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: C,
         up: u32,
         ul: u32,
         hp: u32,
         hl: u32,
         bp: u32,
         bl: u32,
         _tp: u32,
         _tl: u32,
         timeout_ms: u32,
         token_ptr: u32|
         -> Result<u32, Error> {
            let cluster = read(&caller, up, ul)?;
            let headers = read(&caller, hp, hl)?;
            let body = read(&caller, bp, bl)?;
            let Some(pairs) = deserialize_pairs(&headers) else {
                return Ok(BAD_ARGUMENT);
            };
            let timeout = Duration::from_millis(u64::from(timeout_ms.max(1)));
            let host = caller.data_mut();
            let Some(token) = host.dispatch(&cluster, &pairs, Bytes::from(body), timeout) else {
                return Ok(BAD_ARGUMENT);
            };
            write_u32(&mut caller, token_ptr, token)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: C, id: u32| -> u32 {
            let host = caller.data_mut();
            if host.knows(id) {
                host.effective = id;
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    linker.func_wrap("env", "proxy_done", |_: C| -> u32 { OK })?;
    linker.func_wrap(
        "env",
        "proxy_get_status",
        |mut caller: C, code_ptr: u32, ptr_ptr: u32, size_ptr: u32| -> Result<u32, Error> {
            // The status of the last HTTP call's answer (gRPC is not offered).
            let code = caller
                .data()
                .stream
                .call
                .as_ref()
                .and_then(|c| c.status)
                .map_or(0, |s| u32::from(s.as_u16()));
            write_u32(&mut caller, code_ptr, code)?;
            give(&mut caller, &[], ptr_ptr, size_ptr)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> u32 { NOT_FOUND },
    )?;
    // gRPC calls: not offered; a plugin that tries learns so from the status.
    linker.func_wrap(
        "env",
        "proxy_grpc_call",
        |_: C,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> u32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_stream",
        |_: C, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32, _: u32| -> u32 {
            UNIMPLEMENTED
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_grpc_send",
        |_: C, _: u32, _: u32, _: u32, _: u32| -> u32 { UNIMPLEMENTED },
    )?;
    linker.func_wrap("env", "proxy_grpc_cancel", |_: C, _: u32| -> u32 {
        UNIMPLEMENTED
    })?;
    linker.func_wrap("env", "proxy_grpc_close", |_: C, _: u32| -> u32 {
        UNIMPLEMENTED
    })?;

    // Metrics.
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: C, kind: u32, np: u32, nl: u32, id_ptr: u32| -> Result<u32, Error> {
            let name = read(&caller, np, nl)?;
            let Some(id) = caller
                .data()
                .shared
                .metrics
                .define(kind, &String::from_utf8_lossy(&name))
            else {
                return Ok(UNIMPLEMENTED);
            };
            write_u32(&mut caller, id_ptr, id)?;
            Ok(OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: C, id: u32, offset: i64| -> u32 {
            match caller.data().shared.metrics.increment(id, offset) {
                true => OK,
                false => BAD_ARGUMENT,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: C, id: u32, value: u64| -> u32 {
            match caller.data().shared.metrics.record(id, value) {
                true => OK,
                false => BAD_ARGUMENT,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: C, id: u32, ptr: u32| -> Result<u32, Error> {
            let Some(value) = caller.data().shared.metrics.get(id) else {
                return Ok(NOT_FOUND);
            };
            write(&mut caller, ptr, &value.to_le_bytes())?;
            Ok(OK)
        },
    )?;

    // The WASI of older SDKs (AssemblyScript's) under its first name.
    for module in ["wasi_snapshot_preview1", "wasi_unstable"] {
        define_wasi(linker, module)?;
    }
    Ok(())
}

fn set_header(
    mut caller: C,
    kind: u32,
    key: &[u8],
    value: &[u8],
    replace: bool,
) -> Result<u32, Error> {
    let Some(headers) = map_mut(caller.data_mut(), kind) else {
        return Ok(BAD_ARGUMENT);
    };
    let Some((name, value)) = header(key, value) else {
        return Ok(BAD_ARGUMENT);
    };
    if replace {
        headers.insert(name, value);
    } else {
        headers.append(name, value);
    }
    Ok(OK)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A WASI function gatehouse does not offer (files, sockets, polling), answered with
/// `ENOSYS` as a host without it would, so that a plugin whose standard library links it
/// but never calls it still starts. Anything else missing stays missing: the plugin does
/// not start, and the error names the import.
pub(super) fn stub_wasi(linker: &mut Linker<Host>, module: &str, name: &str, ty: &FuncType) {
    const ENOSYS: i32 = 52;
    if !matches!(module, "wasi_snapshot_preview1" | "wasi_unstable")
        || ty.results() != [ValType::I32]
    {
        return;
    }
    // Refused (and so left as it is) when gatehouse defines the function.
    let _ = linker.func_new(module, name, ty.clone(), |_, _, out| {
        out[0] = Val::I32(ENOSYS);
        Ok(())
    });
}

/// The WASI functions a plugin's standard library imports. A plugin has no files, no
/// environment and no arguments; what it writes to stdout or stderr goes to gatehouse's log.
fn define_wasi(linker: &mut Linker<Host>, wasi: &str) -> Result<(), Error> {
    linker.func_wrap(
        wasi,
        "fd_write",
        |mut caller: C, fd: u32, iovs: u32, count: u32, written_ptr: u32| -> Result<u32, Error> {
            if fd != 1 && fd != 2 {
                return Ok(ERRNO_BADF);
            }
            let list = read(&caller, iovs, count.saturating_mul(8))?;
            let mut text = Vec::new();
            for iov in list.chunks_exact(8) {
                let ptr = u32::from_le_bytes(iov[..4].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(iov[4..].try_into().expect("4 bytes"));
                text.extend(read(&caller, ptr, len)?);
            }
            let level = if fd == 2 { 3 } else { 2 };
            let line = String::from_utf8_lossy(&text);
            caller.data().shared.log(level, line.trim());
            write_u32(&mut caller, written_ptr, text.len() as u32)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        wasi,
        "random_get",
        |mut caller: C, ptr: u32, len: u32| -> Result<u32, Error> {
            let mut buf = vec![0u8; len as usize];
            getrandom::fill(&mut buf).map_err(|e| Error::new(format!("no randomness: {e}")))?;
            write(&mut caller, ptr, &buf)?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    linker.func_wrap(
        wasi,
        "clock_time_get",
        |mut caller: C, clock: u32, _precision: u64, ptr: u32| -> Result<u32, Error> {
            let nanos = match clock {
                0 => now_nanos(),
                _ => caller.data().started.elapsed().as_nanos() as u64,
            };
            write(&mut caller, ptr, &nanos.to_le_bytes())?;
            Ok(ERRNO_SUCCESS)
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        linker.func_wrap(
            wasi,
            name,
            |mut caller: C, count: u32, size: u32| -> Result<u32, Error> {
                write_u32(&mut caller, count, 0)?;
                write_u32(&mut caller, size, 0)?;
                Ok(ERRNO_SUCCESS)
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(wasi, name, |_: C, _: u32, _: u32| -> u32 { ERRNO_SUCCESS })?;
    }
    linker.func_wrap(wasi, "proc_exit", |_: C, code: u32| -> Result<(), Error> {
        Err(Error::i32_exit(code as i32))
    })?;
    linker.func_wrap(wasi, "sched_yield", |_: C| -> u32 { ERRNO_SUCCESS })?;
    for name in ["fd_close", "fd_fdstat_get", "fd_prestat_get"] {
        linker.func_wrap(wasi, name, |_: C, _: u32, _: u32| -> u32 { ERRNO_BADF })?;
    }
    linker.func_wrap(
        wasi,
        "fd_prestat_dir_name",
        |_: C, _: u32, _: u32, _: u32| -> u32 { ERRNO_BADF },
    )?;
    linker.func_wrap(
        wasi,
        "fd_seek",
        |_: C, _: u32, _: i64, _: u32, _: u32| -> u32 { ERRNO_BADF },
    )?;
    linker.func_wrap(
        wasi,
        "fd_read",
        |_: C, _: u32, _: u32, _: u32, _: u32| -> u32 { ERRNO_BADF },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever a plugin hands over reads as pairs or as malformed, never past the end,
        /// and what it reads is what the bytes began with.
        #[test]
        fn any_bytes_read_as_pairs_or_none(bytes in vec(any::<u8>(), 0..256)) {
            if let Some(pairs) = deserialize_pairs(&bytes) {
                let again = serialize_pairs(&pairs);
                prop_assert!(pairs.is_empty() || bytes.starts_with(&again));
            }
        }

        #[test]
        fn pairs_read_back_as_written(
            pairs in vec((vec(any::<u8>(), 0..20), vec(any::<u8>(), 0..20)), 0..12)
        ) {
            let pairs: Vec<(&[u8], &[u8])> =
                pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())).collect();
            let bytes = serialize_pairs(&pairs);
            prop_assert_eq!(deserialize_pairs(&bytes), Some(pairs));
        }
    }

    #[test]
    fn header_pairs_round_trip_in_the_abi_form() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b":path", b"/a"), (b"x-b", b""), (b"k", b"v v")];
        let bytes = serialize_pairs(&pairs);
        assert_eq!(&bytes[..4], &3u32.to_le_bytes());
        assert_eq!(deserialize_pairs(&bytes).unwrap(), pairs);
        assert_eq!(
            deserialize_pairs(&[]).unwrap(),
            Vec::<(&[u8], &[u8])>::new()
        );
    }

    #[test]
    fn a_name_or_value_without_its_nul_is_refused() {
        // Found by the fuzz target: sizes that add up, but a 2 where a NUL must be.
        let bytes = [
            2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
            81, 79,
        ];
        assert_eq!(deserialize_pairs(&bytes), None);
    }

    #[test]
    fn malformed_header_pairs_are_refused_not_read_past() {
        let good = serialize_pairs(&[(&b"name"[..], &b"value"[..])]);
        for cut in 1..good.len() - 1 {
            assert!(deserialize_pairs(&good[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(deserialize_pairs(&huge).is_none());
        let mut long = good;
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(deserialize_pairs(&long).is_none());
    }
}
