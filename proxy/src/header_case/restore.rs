//! Spellings handed to hyper's HTTP/1 encoder.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{Extensions, HeaderName, HeaderValue};
use tokio::io::AsyncWriteExt;

use super::{ENABLED, MAX_SPELLINGS};

/// Sets of spellings kept per thread, at most this many in each of two generations
/// (when the newer fills, it becomes the older and the oldest is dropped): 128. An
/// entry holds hyper's read buffer for the made-up head (8 KiB, or the head's size for
/// values up to [`MAX_SPELLINGS`]), so a thread keeps at most about 3 MiB.
const MAX_CACHED: usize = 128;

#[derive(Default)]
struct Cache {
    new: HashMap<HeaderValue, Extensions>,
    old: HashMap<HeaderValue, Extensions>,
}

thread_local! {
    /// Per thread: no lock on the request path.
    static CACHE: RefCell<Cache> = RefCell::default();
}

/// Extensions that make hyper's HTTP/1 encoder write a message's names as `spellings`
/// ([`super::HEADER_CASE`]'s value) says; `None` when the value is malformed (a
/// spelling that is not a header name), longer than [`MAX_SPELLINGS`], or case keeping
/// is off (`--header-case lower`). Names the message lacks are ignored by hyper.
pub async fn restore(spellings: &HeaderValue) -> Option<Extensions> {
    if !ENABLED.load(Ordering::Relaxed) || spellings.len() > MAX_SPELLINGS {
        return None;
    }
    let cached = CACHE.with_borrow_mut(|cache| {
        if let Some(found) = cache.new.get(spellings) {
            return Some(found.clone());
        }
        let found = cache.old.remove(spellings)?;
        cache.new.insert(spellings.clone(), found.clone());
        Some(found)
    });
    if cached.is_some() {
        return cached;
    }
    let made = case_map(spellings).await?;
    CACHE.with_borrow_mut(|cache| {
        if cache.new.len() >= MAX_CACHED {
            cache.old = std::mem::take(&mut cache.new);
        }
        cache.new.insert(spellings.clone(), made.clone());
    });
    Some(made)
}

/// hyper's `HeaderCaseMap` for `spellings`, made by hyper's own HTTP/1 parser (with
/// `preserve_header_case`) reading a head of those names: hyper does not export the
/// type, and its encoder uses it from a message's extensions.
async fn case_map(spellings: &HeaderValue) -> Option<Extensions> {
    let names: Vec<&[u8]> = spellings.as_bytes().split(|b| *b == b',').collect();
    if names.iter().any(|n| HeaderName::from_bytes(n).is_err()) {
        return None;
    }
    // The proxies' own headers keep the one spelling apps look for, whatever a client
    // wrote in a header of that name (which the proxy removed).
    let names: Vec<&[u8]> = names
        .into_iter()
        .filter(|n| !(n.len() > 5 && n[..5].eq_ignore_ascii_case(b"wary-")))
        .collect();
    // A length first (hyper ignores one after a Transfer-Encoding), a
    // Transfer-Encoding last and chunked (hyper refuses others in a request).
    let rank = |n: &[u8]| {
        if n.eq_ignore_ascii_case(b"content-length") {
            0
        } else if n.eq_ignore_ascii_case(b"transfer-encoding") {
            2
        } else {
            1
        }
    };
    let mut ordered = names.clone();
    ordered.sort_by_key(|n| rank(n));
    let mut head = BytesMut::from(&b"POST / HTTP/1.1\r\n"[..]);
    let mut chunked = false;
    for name in ordered {
        head.put_slice(name);
        head.put_slice(match rank(name) {
            0 => b": 0\r\n",
            2 => {
                chunked = true;
                b": chunked\r\n"
            }
            _ => b": x\r\n",
        });
    }
    head.put_slice(if chunked { b"\r\n0\r\n\r\n" } else { b"\r\n" });
    let (mut client, server) = tokio::io::duplex(head.len() + 4096);
    let got = Arc::new(Mutex::new(None));
    let service = {
        let got = got.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            *got.lock().unwrap_or_else(|e| e.into_inner()) = Some(req.into_parts().0.extensions);
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            )))
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    // Everything is in memory: the write fits the pipe, and the connection (not kept
    // alive) ends once it has answered. A second bounds it all the same: case is never
    // worth a stalled request.
    let parsed = async {
        client.write_all(&head).await.ok()?;
        connection.await.ok()
    };
    tokio::time::timeout(Duration::from_secs(1), parsed).await.ok()??;
    let mut extensions = got.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    // Only the case map is wanted: not the parse's other findings.
    extensions.remove::<hyper::upgrade::OnUpgrade>();
    Some(extensions)
}
