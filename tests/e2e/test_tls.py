"""Locked down: `moefleet serve` with mutual TLS and a token file, reached by the Python
client, the CLI and an unchanged tritonclient; plaintext and certificate-less clients are
refused; a non-loopback listener without a token does not start.

The certificates are made here, at test time: a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from moefleet.client import Client
from moefleet.testing import Reference
from tests.e2e.conftest import read_address, stop
from tests.specs import family_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLI = Path(sys.executable).with_name("moefleet")
TOKEN = "tls-admin-token"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: x509.Name | None = None, issuer_key=None, ca: bool = False,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """PEM files: ca, server.crt/key (127.0.0.1, localhost), client.crt/key."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("moefleet test CA", ca_key, ca=True)
    files = {"ca": _pem(ca)}
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for who, names in (("server", sans), ("client", None)):
        key = _key()
        files[f"{who}.crt"] = _pem(_cert(f"moefleet {who}", key, ca.subject, ca_key, sans=names))
        files[f"{who}.key"] = _pem(key)
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    (d / "token").write_text(TOKEN + "\n")
    out["token"] = d / "token"
    return out


@pytest.fixture(scope="module")
def tls_served(pki, tmp_path_factory):
    spec = family_spec("mixtral")
    path = tmp_path_factory.mktemp("tls") / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    log = open(path.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(CLI), "serve", str(path), "--port", "0", "--num-cpus", "2",
         "--tls-cert", str(pki["server.crt"]), "--tls-key", str(pki["server.key"]),
         "--tls-client-ca", str(pki["ca"]), "--token-file", str(pki["token"])],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "RAY_ADDRESS": "", "MOEFLEET_TOKEN": ""},
    )
    address = read_address(proc, path.with_suffix(".log"))
    yield spec, address
    try:
        stop(proc)
    finally:
        log.close()


def _client(address: str, pki: dict[str, Path], cert: bool = True, **kw) -> Client:
    extra = {"tls_cert": pki["client.crt"].read_bytes(), "tls_key": pki["client.key"].read_bytes()}
    return Client(address, retries=0, tls_ca=pki["ca"].read_bytes(), **(extra if cert else {}), **kw)


def test_serve_listens_on_loopback_by_default_and_answers_over_mutual_tls(tls_served, pki):
    spec, address = tls_served
    assert address.startswith("127.0.0.1:")
    x = torch.randn(6, spec.moe.hidden_size, generator=torch.Generator().manual_seed(1))
    with _client(address, pki, token=TOKEN) as c:
        y = c.infer(spec.name, 1, x)
        assert c.status(spec.name).models[0].name == spec.name  # the token file's token
    torch.testing.assert_close(y, Reference(spec)(1, x))


@pytest.mark.parametrize("how", ["plaintext", "no client certificate"])
def test_clients_without_tls_or_a_client_certificate_are_refused(tls_served, pki, how):
    spec, address = tls_served
    x = torch.randn(2, spec.moe.hidden_size)
    c = Client(address, retries=0) if how == "plaintext" else _client(address, pki, cert=False)
    with c, pytest.raises(grpc.RpcError) as err:
        c.infer(spec.name, 1, x, timeout_s=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_status_over_tls_with_the_token_from_a_file(tls_served, pki):
    spec, address = tls_served
    out = subprocess.run(
        [str(CLI), "status", "-o", "json", "--server", address, "--tls-ca", str(pki["ca"]),
         "--tls-cert", str(pki["client.crt"]), "--tls-key", str(pki["client.key"]),
         "--token-file", str(pki["token"])],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MOEFLEET_TOKEN": ""})
    assert out.returncode == 0, out.stderr
    assert [m["name"] for m in json.loads(out.stdout)["models"]] == [spec.name]


def test_tritonclient_over_tls_works_unchanged(tls_served, pki, tmp_path):
    spec, address = tls_served
    x = torch.randn(4, spec.moe.hidden_size, generator=torch.Generator().manual_seed(2))
    np.save(tmp_path / "in.npy", x.numpy())
    script = Path(__file__).with_name("_triton_client.py")
    env = {**os.environ, "TLS_CA": str(pki["ca"]), "TLS_CERT": str(pki["client.crt"]),
           "TLS_KEY": str(pki["client.key"])}
    out = subprocess.run([sys.executable, str(script), address, spec.name, "1", "FP32",
                          str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_ready"] is True
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), Reference(spec)(1, x))


def test_serve_beyond_loopback_without_a_token_refuses_to_start(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(family_spec("mixtral").to_dict()))
    out = subprocess.run([str(CLI), "serve", str(path), "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MOEFLEET_TOKEN": "", "MOEFLEET_TOKEN_FILE": ""})
    assert out.returncode == 2
    assert "give an admin token" in out.stderr and "--insecure" in out.stderr
