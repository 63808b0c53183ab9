"""A TLS certificate made for one cluster, and the client context that pins it.

The head node's address is not known before launch, so the certificate cannot name it; the
client instead trusts exactly this certificate (its only CA) and skips the host name check.
Nobody else holds the key, which reaches the head node only as a SkyPilot secret.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass

__all__ = ["ClusterCert", "pinned_context"]


@dataclass(frozen=True)
class ClusterCert:
    cert_pem: str
    key_pem: str

    @classmethod
    def generate(cls, cluster: str, days: int = 365) -> ClusterCert:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"monarch-{cluster}"[:64])])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(f"monarch-{cluster}"[:63])]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        )


def pinned_context(cert_pem: str) -> ssl.SSLContext:
    """A client context that accepts this one certificate and nothing else."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=cert_pem)
    context.check_hostname = False  # the address is the cloud's; the pinned cert is the check
    context.verify_mode = ssl.CERT_REQUIRED
    return context
