"""Throwaway certificates for TLS tests: a CA and server certificates it signs (ECDSA P-256, valid for a
day), written as PEM files. Real TLS servers in the tests (HTTPS, redis-server's TLS port) use them."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def make_ca():
    """(certificate, private key) of a new self-signed CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "danmul test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    return cert, key


def write_ca(ca, folder: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path = folder / "ca.crt"
    path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return path


def issue(ca, ca_key, folder: Path, dns_name: str, ip: str | None = None) -> tuple[Path, Path]:
    """A server certificate for ``dns_name`` (and ``ip``), signed by the CA: (certificate file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list = [x509.DNSName(dns_name)]
    if ip:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert_file, key_file = folder / f"{dns_name}.crt", folder / f"{dns_name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
