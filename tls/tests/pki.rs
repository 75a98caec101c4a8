//! The PKI life cycle as the controller and a node will run it, without
//! the network: init, seal, restart with the operator key file, join with
//! a token and a CSR.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use nephele_tls::ca::OpenCaError;
use nephele_tls::join::RedeemJoinTokenError;
use nephele_tls::seal::UnsealError;
use nephele_tls::{
    Ca, CertRequest, Identity, IssueOptions, JoinToken, OperatorKey, Revocations, SealedCa,
    TlsContext, TlsFiles, write_private,
};

#[test]
fn a_node_joins_once_with_a_token_and_its_own_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // init: CA, operator key file, sealed CA in the "replicated state".
    let key_file = dir.path().join("operator.key");
    OperatorKey::generate()?.save(&key_file)?;
    let sealed: SealedCa = serde_json::from_str(&serde_json::to_string(
        &Ca::create("prod")?.seal(&OperatorKey::load(&key_file)?)?,
    )?)?;
    // A restarted controller opens it with the operator's file.
    let ca = Ca::open(&sealed, &OperatorKey::load(&key_file)?)?;

    // neph node join-token create
    let (token, mut record) = JoinToken::issue(Duration::from_secs(600))?;
    let shown = token.to_string();

    // The node: its own key and CSR; the key stays in its directory.
    let node = Identity::node("n1")?;
    let req = CertRequest::generate(&node, "prod")?;
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir)?;
    let files = TlsFiles::in_dir(&node_dir);
    write_private(&files.key, req.key_pem.as_bytes(), false)?;

    // The controller redeems the token, then signs for that name only.
    let presented: JoinToken = shown.parse()?;
    record.redeem(&presented, node.name(), SystemTime::now())?;
    let cert = ca.sign_csr(
        &req.csr_pem,
        &node,
        &IssueOptions::for_addresses(["10.1.0.7"]),
    )?;
    write_private(&files.cert, cert.chain_pem.as_bytes(), false)?;
    std::fs::write(&files.ca, ca.cert_pem())?;
    let tls = TlsContext::load(&files, Revocations::new())?;
    assert_eq!(tls.identity().identity, node);
    assert_eq!(tls.cluster_id(), "prod");

    // The same token again: refused, whoever presents it.
    assert_eq!(
        record.redeem(&presented, "n2", SystemTime::now()),
        Err(RedeemJoinTokenError::AlreadyUsed("n1".into()))
    );
    // An expired one: refused.
    let (late, mut late_record) = JoinToken::issue_at(
        SystemTime::now() - Duration::from_secs(120),
        Duration::from_secs(60),
        None,
    )?;
    assert_eq!(
        late_record.redeem(&late, "n2", SystemTime::now()),
        Err(RedeemJoinTokenError::Expired)
    );
    Ok(())
}

#[test]
fn a_wrong_operator_key_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::create("prod")?;
    let sealed = ca.seal(&OperatorKey::generate()?)?;
    let wrong = dir.path().join("wrong.key");
    OperatorKey::generate()?.save(&wrong)?;
    let err = Ca::open(&sealed, &OperatorKey::load(&wrong)?).unwrap_err();
    let OpenCaError::Unseal(UnsealError::WrongKey { .. }) = &err else {
        panic!("expected a wrong-key error, got {err:?}");
    };
    let text = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        text.starts_with("cannot unseal the CA private key: wrong operator key: the value was sealed with key id "),
        "{text}"
    );
    Ok(())
}
