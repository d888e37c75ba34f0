//! ACME against a real pebble (Let's Encrypt's test CA) with its DNS helper
//! pointing every name at 127.0.0.1, where the edge answers the challenges.
//! Needs `apt-get install pebble` (pebble and pebble-challtestsrv).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use edge::acme::{AcmeConfig, AcmeManager, Challenge};
use edge::pki::Ca;
use edge::tls::{CertResolver, provider, server_config};
use rustls_pki_types::ServerName;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(cmd: &mut Command, name: &str) -> Proc {
    match cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() {
        Ok(c) => Proc(c),
        Err(e) => panic!("cannot run {name} ({e}); install it with: apt-get install pebble"),
    }
}

async fn wait_tcp(addr: SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr} never opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obtains_certificates_from_pebble_with_http01_and_tls_alpn01() {
    let dir = tempfile::tempdir().unwrap();
    let app = echo_backend("shop").await;
    let t = table(
        1,
        vec![
            route("shop.zeitwork.test", "shop", vec![plain("s1", app)]),
            route("alpn.zeitwork.test", "shop", vec![plain("s1", app)]),
        ],
    );
    let routes = Arc::new(edge::table::Routes::new());
    let resolver = CertResolver::new(routes.clone(), None, vec![]);
    let edge = start_edge(
        &t,
        EdgeOptions {
            tls: Some(server_config(resolver.clone()).unwrap()),
            routes: Some(routes.clone()),
            ..EdgeOptions::default()
        },
    )
    .await;
    let https = edge.https.unwrap();

    // Pebble's own HTTPS listener certificate, from a CA we trust below.
    let pebble_ca = Ca::generate("pebble listener CA").unwrap();
    let listener_cert = pebble_ca
        .issue_server(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    std::fs::write(dir.path().join("pebble.crt"), &listener_cert.chain_pem).unwrap();
    std::fs::write(dir.path().join("pebble.key"), &listener_cert.key_pem).unwrap();
    std::fs::write(dir.path().join("pebble-ca.crt"), pebble_ca.cert_pem()).unwrap();
    let (acme_port, mgmt_port, dns_port, dns_mgmt) =
        (free_tcp(), free_tcp(), free_udp(), free_tcp());
    let config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme_port}"),
        "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
        "certificate": dir.path().join("pebble.crt"),
        "privateKey": dir.path().join("pebble.key"),
        "httpPort": edge.http.port(),
        "tlsPort": https.port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false
    }});
    std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
    let _dns = spawn(
        Command::new("pebble-challtestsrv").args([
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{dns_mgmt}"),
        ]),
        "pebble-challtestsrv",
    );
    let _pebble = spawn(
        Command::new("pebble")
            .arg("-config")
            .arg(dir.path().join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0"),
        "pebble",
    );
    wait_tcp(format!("127.0.0.1:{acme_port}").parse().unwrap()).await;
    wait_tcp(format!("127.0.0.1:{dns_mgmt}").parse().unwrap()).await;

    let state = dir.path().join("acme");
    let cfg = |challenge| AcmeConfig {
        directory_url: format!("https://127.0.0.1:{acme_port}/dir"),
        contact: vec![],
        server_root: Some(dir.path().join("pebble-ca.crt")),
        state_dir: state.clone(),
        renew_before: Duration::from_secs(7 * 24 * 3600),
        challenge,
        scan_interval: Duration::from_secs(3600),
        retry_after_failure: Duration::from_secs(3600),
    };
    let http01 = AcmeManager::new(
        cfg(Challenge::Http01),
        resolver.clone(),
        edge.server_http01(),
    );
    http01.issue("shop.zeitwork.test").await.unwrap();
    assert!(http01.is_fresh("shop.zeitwork.test"));
    let alpn = AcmeManager::new(
        cfg(Challenge::TlsAlpn01),
        resolver.clone(),
        edge.server_http01(),
    );
    alpn.issue("alpn.zeitwork.test").await.unwrap();

    // Clients that trust pebble's issuing root get the ACME certificates.
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(pebble_ca.cert_pem().as_bytes()).unwrap(),
        )
        .build()
        .unwrap();
    let root_pem = client
        .get(format!("https://127.0.0.1:{mgmt_port}/roots/0"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    let mut ccfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ccfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let ccfg = Arc::new(ccfg);
    for name in ["shop.zeitwork.test", "alpn.zeitwork.test"] {
        let tcp = tokio::net::TcpStream::connect(https).await.unwrap();
        tokio_rustls::TlsConnector::from(ccfg.clone())
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("{name}: pebble-issued certificate served: {e}"));
    }

    // Stored material survives a restart: a new manager installs it at once.
    let resolver2 = CertResolver::new(routes.clone(), None, vec![]);
    let again = AcmeManager::new(
        cfg(Challenge::Http01),
        resolver2.clone(),
        edge.server_http01(),
    );
    assert!(again.is_fresh("shop.zeitwork.test") && again.is_fresh("alpn.zeitwork.test"));
    assert!(resolver2.installed("shop.zeitwork.test").is_some());
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("certs/shop.zeitwork.test.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
}
