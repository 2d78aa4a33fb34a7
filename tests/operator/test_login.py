"""kopf's credentials come from the operator's own client configuration (operator/kube.py `connection_info`), so
`--kubeconfig` reaches the watches. Every operator test starts the operator with `--kubeconfig` and no $KUBECONFIG
(lorafleet/local/harness.py); these cases pin the translation itself."""

from __future__ import annotations

from kubernetes import client
from lorafleet.operator.kube import connection_info


def _api(**fields: object) -> client.ApiClient:
    cfg = client.Configuration()
    for k, v in fields.items():
        setattr(cfg, k, v)
    return client.ApiClient(cfg)


def test_bearer_token_and_ca_are_carried() -> None:
    info = connection_info(
        _api(host="https://10.0.0.1:6443", ssl_ca_cert="/ca.crt", api_key={"authorization": "Bearer s3cr3t"})
    )
    assert (info.server, info.ca_path, info.insecure) == ("https://10.0.0.1:6443", "/ca.crt", False)
    assert (info.scheme, info.token) == ("Bearer", "s3cr3t")
    assert info.username is None and info.certificate_path is None


def test_client_certificate_without_token() -> None:
    info = connection_info(_api(host="https://h:1", cert_file="/c.pem", key_file="/k.pem", verify_ssl=False))
    assert (info.certificate_path, info.private_key_path, info.insecure) == ("/c.pem", "/k.pem", True)
    assert info.token is None and info.scheme is None


def test_newer_clients_bearer_token_key_wins() -> None:
    info = connection_info(
        _api(host="https://h:1", api_key={"BearerToken": "Bearer new", "authorization": "Bearer old"})
    )
    assert info.token == "new"
