"""A throw-away certificate authority for the local control plane, made with the openssl CLI.

The venv has no `cryptography` wheel and every machine we target has openssl, so the CLI is the dependency-free way
to get real TLS: the API server only accepts client certificates signed by a CA it trusts, and RBAC reads the
group (O=) from them. EC P-256 keys keep generation to milliseconds.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
API_SERVER_SANS = (
    "IP:127.0.0.1",
    f"IP:{KUBERNETES_SERVICE_IP}",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _new_key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)
    path.chmod(0o600)
    return path


class CertificateAuthority:
    """Issues the serving and client certificates one control plane needs; everything lives in `directory`."""

    def __init__(self, directory: Path, name: str = "lorafleet-local-ca") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = KeyPair(directory / "ca.crt", directory / "ca.key")
        if not (self.ca.cert.exists() and self.ca.key.exists()):
            _new_key(self.ca.key)
            _openssl(
                "req", "-x509", "-new", "-key", str(self.ca.key), "-subj", f"/CN={name}", "-days", "3650",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                "-out", str(self.ca.cert),
                cwd=directory,
            )  # fmt: skip

    def issue(
        self, name: str, common_name: str, organizations: tuple[str, ...] = (), sans: tuple[str, ...] = ()
    ) -> KeyPair:
        """Signs a leaf certificate usable for both server and client auth; reuses it if already issued."""
        pair = KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        if pair.cert.exists() and pair.key.exists():
            return pair
        _new_key(pair.key)
        subject = f"/CN={common_name}" + "".join(f"/O={org}" for org in organizations)
        csr = self.directory / f"{name}.csr"
        ext = self.directory / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            "extendedKeyUsage=serverAuth,clientAuth",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", "-new", "-key", str(pair.key), "-subj", subject, "-out", str(csr), cwd=self.directory)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca.cert), "-CAkey", str(self.ca.key),
            "-set_serial", "0x" + secrets.token_hex(16), "-days", "3650", "-sha256",
            "-extfile", str(ext), "-out", str(pair.cert),
            cwd=self.directory,
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
        return pair

    def service_account_keys(self) -> KeyPair:
        """The key pair that signs service-account tokens (`cert` holds the public key, not a certificate)."""
        pair = KeyPair(self.directory / "sa.pub", self.directory / "sa.key")
        if not (pair.cert.exists() and pair.key.exists()):
            _new_key(pair.key)
            _openssl("pkey", "-in", str(pair.key), "-pubout", "-out", str(pair.cert), cwd=self.directory)
        return pair
