//! TLS between daemons (rustls): serving HTTPS with a certificate and key
//! read from PEM files and read again on SIGHUP, and calling peers over
//! `https://` verified against a configured CA bundle.
//!
//! A daemon given `--tls-cert` and `--tls-key` serves only HTTPS on its
//! address. One given `--tls-ca` verifies every peer it calls over
//! `https://` against that bundle alone; without it, against the Mozilla
//! roots (webpki-roots), which a private CA is not among. The bundle is set
//! once per process at startup ([`set_client_ca`]) and every client the
//! daemon builds ([`client_config`], [`crate::client::http_client`]) uses
//! it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file; an error names the file and what is
/// wrong with it.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{} is not a PEM certificate file: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError(format!(
            "cannot read a PEM private key from {}: {e}",
            key.display()
        ))
    })?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| TlsError(format!("{} and its key: {e}", cert.display())))?;
    Ok(Arc::new(certified))
}

/// The certificate a server presents, swapped in place on reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read()))
    }
}

/// A server's TLS: its configuration, and the files it reads again on
/// [`reload`](Self::reload).
#[derive(Debug)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// Read the certificate chain and the key (PEM) and check that they
    /// belong together.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let current = Arc::new(Current(RwLock::new(certified_key(cert, key)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current,
            config: Arc::new(config),
        })
    }

    /// Read the files again; new connections get the new certificate. On
    /// an error the running one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert, &self.key)?;
        *self.current.0.write() = fresh;
        Ok(())
    }

    /// The acceptor for incoming connections.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

/// A client configuration that trusts the CA certificates in `ca` (PEM)
/// and nothing else; without `ca`, the Mozilla roots.
pub fn client_config_from(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| {
                    TlsError(format!(
                        "{}: not a usable CA certificate: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

static CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Set the CA bundle this process verifies its peers with (`--tls-ca`).
/// The first call wins: a daemon sets it once at startup.
pub fn set_client_ca(ca: Option<&Path>) -> Result<(), TlsError> {
    let config = client_config_from(ca)?;
    if CLIENT.set(config).is_err() {
        if let Some(ca) = ca {
            // Only a process running several daemons (an in-process test)
            // gets here.
            tracing::warn!(ca = %ca.display(), "the process's CA bundle was already set; this one is not used");
        }
    }
    Ok(())
}

/// The client configuration of this process: [`set_client_ca`]'s, or the
/// Mozilla roots when none was set.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    Arc::clone(CLIENT.get_or_init(|| {
        // Only a provider without the default protocol versions can fail
        // here, and ring's has them.
        client_config_from(None).expect("ring supports TLS 1.2 and 1.3")
    }))
}

/// A connection to a peer: plain TCP (`Left`), or TLS over it (`Right`).
pub type Stream = tokio_util::either::Either<
    tokio::net::TcpStream,
    Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
>;

/// Open a connection to `authority` (`host:port`), with TLS when `https`:
/// the peer's certificate must chain to the process's CA bundle and name
/// `host`.
pub async fn connect(authority: &str, https: bool) -> std::io::Result<Stream> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    // Small SSE writes must not wait for delayed ACKs.
    tcp.set_nodelay(true)?;
    if !https {
        return Ok(Stream::Left(tcp));
    }
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{host}` is not a TLS server name: {e}"),
        )
    })?;
    let tls = tokio_rustls::TlsConnector::from(client_config())
        .connect(name, tcp)
        .await?;
    Ok(Stream::Right(Box::new(tls)))
}

/// True for a URL whose host is a loopback address or `localhost`.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = parsed.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Warn once at startup about a peer URL that would carry the token and
/// prompts in clear across hosts: `http://` to a host other than loopback.
pub fn warn_if_plain(what: &str, url: &str) {
    if url.starts_with("http://") && !is_loopback_url(url) {
        tracing::warn!(
            peer = %url,
            "{what} is plain HTTP to another host: the API token and every prompt cross the network unencrypted; serve HTTPS there (--tls-cert/--tls-key) and use an https:// URL"
        );
    }
}

#[cfg(test)]
mod tests;

/// A certificate authority made on the spot, for tests of TLS between
/// daemons (feature `test-ca`): its certificate, and leaf certificates
/// it signs for the names given.
#[cfg(any(test, feature = "test-ca"))]
pub mod test_ca {
    use std::path::{Path, PathBuf};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA: its key and certificate.
    #[derive(Debug)]
    pub struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    /// Files written by [`TestCa::write`].
    #[derive(Debug, Clone)]
    pub struct TlsFiles {
        /// The CA's certificate (the bundle peers verify against).
        pub ca: PathBuf,
        /// A leaf certificate.
        pub cert: PathBuf,
        /// Its private key (mode 0600).
        pub key: PathBuf,
    }

    impl TestCa {
        /// A new CA named `name`.
        pub fn new(name: &str) -> Self {
            let key = KeyPair::generate().expect("a P-256 key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let pem = params.self_signed(&key).expect("self-signed").pem();
            Self {
                issuer: Issuer::new(params, key),
                pem,
            }
        }

        /// The CA's certificate, PEM.
        pub fn pem(&self) -> &str {
            &self.pem
        }

        /// A certificate for `names` (DNS names or IP addresses) signed by
        /// this CA, and its key: both PEM.
        pub fn leaf(&self, names: &[&str]) -> (String, String) {
            let key = KeyPair::generate().expect("a P-256 key");
            let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
            let params = CertificateParams::new(names).expect("valid names");
            let cert = params.signed_by(&key, &self.issuer).expect("signed");
            (cert.pem(), key.serialize_pem())
        }

        /// Write `ca.pem`, and `cert.pem` and `key.pem` for `names`, into
        /// `dir`.
        pub fn write(&self, dir: &Path, names: &[&str]) -> TlsFiles {
            use std::os::unix::fs::PermissionsExt;
            let (cert, key) = self.leaf(names);
            let files = TlsFiles {
                ca: dir.join("ca.pem"),
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            };
            std::fs::write(&files.ca, &self.pem).expect("write the CA");
            std::fs::write(&files.cert, cert).expect("write the certificate");
            std::fs::write(&files.key, key).expect("write the key");
            std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the key");
            files
        }
    }
}
