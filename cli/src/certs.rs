//! `expertmesh certs`: a cluster's certificate authority and its nodes' certificates
//! (rcgen; ECDSA P-256). `init` makes the CA (`ca.pem`, `ca.key`); `issue` makes a node's
//! certificate and key signed by it, naming its role (`<role>.role.expertmesh`, what peers
//! check), its name and the hosts it is reached at, into a directory a role takes with
//! `--tls-dir` (`ca.pem`, `node.pem`, `node.key`). Keys are written readable by their
//! owner only.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use expertmesh_proto::tls::PeerRole;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a cluster CA: DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Years the CA is valid.
        #[arg(long, default_value_t = 10)]
        years: u32,
    },
    /// Issue a node's certificate, signed by the CA, into a directory for `--tls-dir`.
    Issue(IssueArgs),
    /// Print a new join token: 256 bits from the OS's random number generator, as hex.
    Token,
    /// Make a whole cluster's material once: a CA, a directory per role for `--tls-dir`
    /// (`OUT/coordinator`, …, `OUT/admin`; one certificate per role, naming every host given)
    /// and a join token in `OUT/join-token`. Does nothing when OUT already holds a cluster, so
    /// an init container may run it on every start.
    Cluster {
        #[arg(long)]
        out: PathBuf,
        /// Host names and addresses the nodes are reached at, comma-separated.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Args, Debug)]
pub struct IssueArgs {
    /// The CA's directory (`certs init --out`).
    #[arg(long)]
    ca: PathBuf,
    /// coordinator, expert-worker, attention-worker or admin.
    #[arg(long)]
    role: PeerRole,
    /// The node's name (its certificate's common name).
    #[arg(long)]
    name: String,
    /// Host names and IP addresses the node is reached at, comma-separated.
    #[arg(long, value_delimiter = ',')]
    hosts: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init { out, years } => {
            init(&out, years)?;
            println!("CA in {}", out.display());
        }
        CertsCommand::Token => println!("{}", expertmesh_proto::secret::random_token()),
        CertsCommand::Cluster { out, hosts, days } => {
            if out.join(JOIN_TOKEN_FILE).exists() {
                println!("a cluster's certificates are already in {}", out.display());
            } else {
                cluster(&out, &hosts, days)?;
                println!(
                    "a cluster's certificates and join token in {}",
                    out.display()
                );
            }
        }
        CertsCommand::Issue(a) => {
            issue(&a.ca, a.role, &a.name, &a.hosts, a.days, &a.out)?;
            println!(
                "{} certificate for {} in {}",
                a.role.name(),
                a.name,
                a.out.display()
            );
        }
    }
    Ok(())
}

/// The CA's parameters: the same every time, so `issue` names the issuer `init` made
/// without parsing its certificate.
fn ca_params(days: u32) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "expertmesh cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    valid_for(&mut params, days);
    params
}

fn valid_for(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Writes `text` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// Makes a CA in `out`.
pub fn init(out: &Path, years: u32) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(years * 366).self_signed(&key)?;
    write(&out.join("ca.pem"), &cert.pem(), false)?;
    write(&out.join("ca.key"), &key.serialize_pem(), true)
}

/// Issues a certificate for a node of `role` named `name`, reached at `hosts`, into `out`.
pub fn issue(
    ca: &Path,
    role: PeerRole,
    name: &str,
    hosts: &[String],
    days: u32,
    out: &Path,
) -> Result<()> {
    let ca_key_path = ca.join("ca.key");
    let ca_key = KeyPair::from_pem(
        &std::fs::read_to_string(&ca_key_path)
            .with_context(|| format!("reading {}", ca_key_path.display()))?,
    )
    .with_context(|| format!("{} is not a key", ca_key_path.display()))?;
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem"))
        .with_context(|| format!("reading {}", ca.join("ca.pem").display()))?;
    let issuer = Issuer::new(ca_params(1), ca_key);
    let mut names = vec![role.dns_name()];
    names.extend(hosts.iter().filter(|h| !h.is_empty()).cloned());
    if name.is_empty() || name.len() > 64 {
        bail!("a node's name is 1 to 64 characters");
    }
    let mut params = CertificateParams::new(names).context("a host is not a name or address")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.name());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    valid_for(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write(&out.join("node.pem"), &cert.pem(), false)?;
    write(&out.join("node.key"), &key.serialize_pem(), true)?;
    write(&out.join("ca.pem"), &ca_pem, false)
}

/// The file `certs cluster` writes the join token to (`--join-token-file`).
const JOIN_TOKEN_FILE: &str = "join-token";

/// A local cluster's certificates under `root`: the CA in `root/ca`, and a directory per
/// role (`root/coordinator`, …, `root/admin`) for `--tls-dir`.
pub fn local_cluster(root: &Path) -> Result<()> {
    roles(root, &["127.0.0.1".to_owned(), "localhost".to_owned()], 30)
}

/// `roles`, with a join token in `root/join-token`, written last: it marks the whole.
fn cluster(root: &Path, hosts: &[String], days: u32) -> Result<()> {
    roles(root, hosts, days)?;
    let token = expertmesh_proto::secret::random_token();
    write(&root.join(JOIN_TOKEN_FILE), &token, true)
}

/// A CA in `root/ca` and a certificate for every role naming `hosts`, each in `root/<role>`.
fn roles(root: &Path, hosts: &[String], days: u32) -> Result<()> {
    let ca = root.join("ca");
    init(&ca, days.div_ceil(366).max(1))?;
    for role in PeerRole::ALL {
        issue(&ca, role, role.name(), hosts, days, &root.join(role.name()))?;
    }
    Ok(())
}
