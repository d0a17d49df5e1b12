"""Key and certificate generation for the harness (cryptography only).

Two needs: an RSA key + self-signed certificate for the token server (whose
certificate distribution loads as ``rootcertbundle``), and a throwaway CA with a
server certificate for 127.0.0.1/localhost so the upstream can run over HTTPS.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdate a little so clock skew between processes never matters.
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)


def pem_private_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def libtrust_key_id(public_key) -> str:
    """The key id distribution (via docker/libtrust) derives from a public key.

    base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo), without
    padding, in 12 groups of 4 characters joined by ':'. Distribution looks the
    JWT header's ``kid`` up in a map built this way from ``rootcertbundle``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class SigningKey:
    """RSA key + self-signed certificate used to sign registry tokens."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def kid(self) -> str:
        return libtrust_key_id(self.key.public_key())

    @property
    def cert_pem(self) -> bytes:
        return pem_cert(self.cert)


def make_signing_key(common_name: str = "harness-token-signer") -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    not_before, not_after = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return SigningKey(key=key, cert=cert)


@dataclass
class TLSFiles:
    """Paths of a CA certificate and a server certificate/key it signed."""

    ca_cert_path: str
    cert_path: str
    key_path: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_cert_path)


def make_tls_files(directory: str, hostnames=("localhost",), ips=("127.0.0.1",)) -> TLSFiles:
    """Create a CA and a server certificate for loopback names in ``directory``.

    EC keys: generation is instant, unlike RSA, and every client we use
    (requests/OpenSSL, Go in skopeo/containerd) accepts them.
    """
    os.makedirs(directory, exist_ok=True)
    not_before, not_after = _validity()

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("harness test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else ips[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca_cert_path=os.path.join(directory, "ca.pem"),
        cert_path=os.path.join(directory, "server.pem"),
        key_path=os.path.join(directory, "server-key.pem"),
    )
    with open(files.ca_cert_path, "wb") as f:
        f.write(pem_cert(ca_cert))
    with open(files.cert_path, "wb") as f:
        f.write(pem_cert(cert))
    with open(files.key_path, "wb") as f:
        f.write(pem_private_key(key))
    os.chmod(files.key_path, 0o600)
    return files
