//! Test certificates: a CA, and the server and client certificates it signs, made with
//! `openssl` for each test that needs TLS (the secured stores, a Docker engine over TLS).

use std::process::Command;

/// Test certificates made with `openssl`: a CA (`ca.pem`, `ca.key`), a server certificate for
/// 127.0.0.1 and `localhost` (`server.pem`, `server.key`; also usable as a client, as etcd's
/// own gateway needs) and a client certificate without a Common Name (`client.pem`,
/// `client.key`), all in a temp
/// directory that lives as long as any clone.
#[derive(Clone)]
pub struct Pki {
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl Pki {
    /// Generates a CA named `cn` and the server and client certificates it signs.
    pub fn generate(cn: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl runs (scripts/setup installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let subj = format!("/CN={cn}");
        let mut args = vec![
            "req", "-x509", "-days", "2", "-keyout", "ca.key", "-out", "ca.pem",
        ];
        args.extend(ec);
        args.extend(["-subj", &subj]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&args);
        for (name, san) in [
            ("server", "IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul"),
            ("client", "DNS:client"),
        ] {
            let ext = format!("{name}.ext");
            std::fs::write(
                d.join(&ext),
                format!(
                    "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                     keyUsage=critical,digitalSignature,keyEncipherment\n\
                     extendedKeyUsage=serverAuth,clientAuth\n"
                ),
            )
            .unwrap();
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            // No Common Name on the client certificate: with client-certificate auth and
            // auth enabled, etcd's JSON gateway refuses a certificate that has one (it
            // cannot carry the CN as the user), answering 400.
            let subj = if name == "client" {
                "/O=switchboard-test".to_string()
            } else {
                format!("/CN={name}")
            };
            let mut args = vec!["req", "-keyout", &key, "-out", &csr, "-subj", &subj];
            args.extend(ec);
            openssl(&args);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ]);
        }
        Pki {
            dir: std::sync::Arc::new(dir),
        }
    }

    /// The path of one of the files, as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A client trusting only this CA and presenting the client certificate.
    pub fn client(&self) -> reqwest::Client {
        let ca = std::fs::read(self.path("ca.pem")).unwrap();
        let mut id = std::fs::read(self.path("client.pem")).unwrap();
        id.extend(std::fs::read(self.path("client.key")).unwrap());
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .identity(reqwest::Identity::from_pem(&id).unwrap())
            .build()
            .unwrap()
    }
}
