//! The route stream client against a real SSE server on loopback, and the
//! on-disk cache it leaves behind.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use edge::feed::{FeedConfig, follow, load_cache};
use edge::member::Captains;
use edge::routes::{STREAM_PATH, sse_event};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// A captain stand-in: `GET /v1/routes/stream` with the right token gets the
/// events pushed into the returned sender.
async fn captain(
    token: &'static str,
) -> (
    String,
    Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>,
    Arc<AtomicUsize>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let sender: Arc<Mutex<Option<mpsc::UnboundedSender<String>>>> = Arc::new(Mutex::new(None));
    let rejected = Arc::new(AtomicUsize::new(0));
    let (s2, r2) = (sender.clone(), rejected.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = l.accept().await else {
                return;
            };
            let (sender, rejected) = (s2.clone(), r2.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (sender, rejected) = (sender.clone(), rejected.clone());
                        async move {
                            let authorized = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                == Some(&format!("Bearer {token}"));
                            if req.uri().path() != STREAM_PATH || !authorized {
                                rejected.fetch_add(1, Ordering::SeqCst);
                                let mut r = Response::new(BoxBody::new(
                                    http_body_util::Empty::new()
                                        .map_err(|n: Infallible| match n {}),
                                ));
                                *r.status_mut() = StatusCode::UNAUTHORIZED;
                                return Ok::<_, Infallible>(r);
                            }
                            let (tx, rx) = mpsc::unbounded_channel::<String>();
                            *sender.lock().await = Some(tx);
                            let stream = futures::stream::unfold(rx, |mut rx| async move {
                                rx.recv()
                                    .await
                                    .map(|s| (Ok::<_, Infallible>(Frame::data(Bytes::from(s))), rx))
                            });
                            let mut r = Response::new(BoxBody::new(StreamBody::new(stream)));
                            r.headers_mut()
                                .insert("content-type", "text/event-stream".parse().unwrap());
                            Ok(r)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, sender, rejected)
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

#[tokio::test]
async fn follows_the_stream_and_keeps_the_last_good_table() {
    let a = backend("app-a").await;
    let b = backend("app-b").await;
    let (url, sender, rejected) = captain("s3cret").await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("routes.json");
    let cfg = |token: &str| FeedConfig {
        captains: Arc::new(Captains::new(vec![url.clone()])),
        token: token.into(),
        cache_path: Some(cache.clone()),
        captain_ca_pem: None,
        idle_timeout: Duration::from_secs(30),
        max_backoff: Duration::from_millis(200),
    };

    // A wrong token gets nothing.
    let routes = Arc::new(edge::table::Routes::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn(follow(cfg("wrong"), routes.clone(), stop.clone()));
    wait_for(|| rejected.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(routes.load().version, 0);
    stop.cancel();
    task.await.unwrap().unwrap();

    let edge = start_edge(&table(0, vec![]), EdgeOptions::default()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(follow(cfg("s3cret"), edge.routes.clone(), stop.clone()));
    let tx = loop {
        if let Some(tx) = sender.lock().await.clone() {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let c = client();
    assert_eq!(
        get(&c, edge.http, "a.test", "/").await.unwrap().0,
        StatusCode::NOT_FOUND
    );

    tx.send(": keepalive\n\n".into()).unwrap();
    tx.send(sse_event(&table(
        1,
        vec![route("a.test", "a", vec![plain("a1", a)])],
    )))
    .unwrap();
    wait_for(|| edge.routes.load().version == 1).await;
    let (status, _, body) = get(&c, edge.http, "a.test", "/").await.unwrap();
    assert_eq!((status, body.starts_with("app-a")), (StatusCode::OK, true));

    // Split across writes, then an invalid table that must be ignored.
    let ev = sse_event(&table(2, vec![route("a.test", "a", vec![plain("b1", b)])]));
    let (x, y) = ev.split_at(ev.len() / 2);
    tx.send(x.into()).unwrap();
    tx.send(y.into()).unwrap();
    wait_for(|| edge.routes.load().version == 2).await;
    tx.send("data: {\"version\":3,\"routes\":[{\"domain\":\"bad domain\",\"env\":\"e\",\"app\":\"a\"}]}\n\n".into())
        .unwrap();
    tx.send(": still here\n\n".into()).unwrap();
    let (status, _, body) = get(&c, edge.http, "a.test", "/").await.unwrap();
    assert_eq!((status, body.starts_with("app-b")), (StatusCode::OK, true));
    assert_eq!(edge.routes.load().version, 2);

    // The captain goes away: the edge keeps serving the last table...
    drop(tx);
    *sender.lock().await = None;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, _, body) = get(&c, edge.http, "a.test", "/").await.unwrap();
    assert_eq!((status, body.starts_with("app-b")), (StatusCode::OK, true));
    stop.cancel();
    task.await.unwrap().unwrap();

    // ...and a restarted edge starts from the cache without any captain.
    let cached = load_cache(&cache).unwrap().expect("cache written");
    assert_eq!(cached.version, 2);
    let restarted = start_edge(&cached, EdgeOptions::default()).await;
    let (status, _, body) = get(&c, restarted.http, "a.test", "/").await.unwrap();
    assert_eq!((status, body.starts_with("app-b")), (StatusCode::OK, true));

    // A corrupt cache is reported, not silently used.
    std::fs::write(&cache, b"{not json").unwrap();
    assert!(load_cache(&cache).is_err());
    assert!(
        load_cache(&dir.path().join("absent.json"))
            .unwrap()
            .is_none()
    );
}

/// A captain that does not answer (its port is closed) is passed over for
/// the next one in the list, and the one that answered is asked first.
#[tokio::test]
async fn the_stream_fails_over_to_the_next_captain() {
    let a = backend("app-a").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let (url, sender, _) = captain("tok").await;
    let captains = Arc::new(Captains::new(vec![dead.clone(), url.clone()]));
    let cfg = FeedConfig {
        captains: captains.clone(),
        token: "tok".into(),
        cache_path: None,
        captain_ca_pem: None,
        idle_timeout: Duration::from_secs(30),
        max_backoff: Duration::from_millis(200),
    };
    let edge = start_edge(&table(0, vec![]), EdgeOptions::default()).await;
    let stop = CancellationToken::new();
    let task = tokio::spawn(follow(cfg, edge.routes.clone(), stop.clone()));
    let tx = loop {
        if let Some(tx) = sender.lock().await.clone() {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    tx.send(sse_event(&table(
        1,
        vec![route("a.test", "a", vec![plain("a1", a)])],
    )))
    .unwrap();
    wait_for(|| edge.routes.load().version == 1).await;
    assert_eq!(captains.current().1.as_deref(), Some(url.as_str()));
    stop.cancel();
    task.await.unwrap().unwrap();
}
