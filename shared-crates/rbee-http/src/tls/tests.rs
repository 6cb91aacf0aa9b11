use super::test_ca::TestCa;
use super::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TLS server on loopback that answers each connection's first bytes
/// with `ok` and closes.
async fn serve(tls: Arc<ServerTls>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = tls.acceptor();
            tokio::spawn(async move {
                if let Ok(mut stream) = acceptor.accept(tcp).await {
                    let mut buf = [0u8; 4];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"ok").await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Connect with `config` and return the certificate the server showed.
async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Vec<u8>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").expect("an IP name");
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    stream.write_all(b"hi").await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    assert_eq!(answer, b"ok");
    let (_, session) = stream.get_ref();
    Ok(session.peer_certificates().expect("a certificate")[0].to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM")
        .to_vec()
}

#[tokio::test]
async fn a_peer_is_verified_against_the_bundle_and_one_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["localhost", "127.0.0.1"]);
    let tls = Arc::new(ServerTls::load(&files.cert, &files.key).expect("load"));
    let addr = serve(tls).await;

    let trusted = client_config_from(Some(&files.ca)).expect("the CA");
    let shown = connect(addr, trusted).await.expect("a verified handshake");
    assert_eq!(
        shown,
        der(&std::fs::read_to_string(&files.cert).expect("cert"))
    );

    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = TestCa::new("another CA");
    let other_files = other.write(other_dir.path(), &["127.0.0.1"]);
    let untrusted = client_config_from(Some(&other_files.ca)).expect("the other CA");
    let err = connect(addr, untrusted)
        .await
        .expect_err("another CA's peer");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The Mozilla roots do not know a private CA either.
    let public = client_config_from(None).expect("webpki roots");
    assert!(connect(addr, public).await.is_err());
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["hive.example"]);
    let addr = serve(Arc::new(
        ServerTls::load(&files.cert, &files.key).expect("load"),
    ))
    .await;
    let err = connect(addr, client_config_from(Some(&files.ca)).expect("CA"))
        .await
        .expect_err("the certificate does not name 127.0.0.1");
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_and_a_bad_file_keeps_the_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["127.0.0.1"]);
    let tls = Arc::new(ServerTls::load(&files.cert, &files.key).expect("load"));
    let addr = serve(Arc::clone(&tls)).await;
    // A fresh client each time: a resumed session would not show the
    // certificate again.
    let config = || client_config_from(Some(&files.ca)).expect("CA");
    let first = connect(addr, config()).await.expect("first");

    let (cert, key) = ca.leaf(&["127.0.0.1"]);
    std::fs::write(&files.cert, &cert).expect("new cert");
    std::fs::write(&files.key, key).expect("new key");
    tls.reload().expect("reload");
    let second = connect(addr, config()).await.expect("second");
    assert_ne!(first, second);
    assert_eq!(second, der(&cert));

    std::fs::write(&files.key, "not a key").expect("garbage");
    let err = tls.reload().expect_err("a broken key");
    assert!(err.0.contains("key.pem"), "{err}");
    assert_eq!(connect(addr, config()).await.expect("third"), second);
}

#[test]
fn files_that_are_missing_or_do_not_belong_together_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("rbee test CA");
    let files = ca.write(dir.path(), &["127.0.0.1"]);
    let missing = dir.path().join("nope.pem");
    let err = ServerTls::load(&missing, &files.key).expect_err("no file");
    assert!(err.0.contains("nope.pem"), "{err}");
    let (_, other_key) = ca.leaf(&["127.0.0.1"]);
    let other = dir.path().join("other-key.pem");
    std::fs::write(&other, other_key).expect("write");
    let err = ServerTls::load(&files.cert, &other).expect_err("a key of another certificate");
    assert!(err.0.contains("cert.pem"), "{err}");
    let err = client_config_from(Some(&files.key)).expect_err("a key is no CA bundle");
    assert!(err.0.contains("key.pem"), "{err}");
}

#[test]
fn loopback_urls_are_told_apart() {
    for url in [
        "http://127.0.0.1:9200",
        "http://localhost:8080",
        "http://[::1]:1",
        "https://127.0.0.5",
    ] {
        assert!(is_loopback_url(url), "{url}");
    }
    for url in ["http://10.0.0.2:9200", "http://hive-a:9200", "not a url"] {
        assert!(!is_loopback_url(url), "{url}");
    }
}
