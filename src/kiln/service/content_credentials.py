"""C2PA Content Credentials on stored images, signed by a local certificate (c2pa-python).

Kiln makes its own small CA and an ES256 signing certificate under `<data_dir>/c2pa/` on first use;
verifiers therefore report the manifest as valid but its signer as untrusted until an operator puts a
certificate chain from a trusted CA there. When c2pa-python is not installed, images are left unsigned.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import threading
from pathlib import Path
from typing import Any

from kiln import __version__

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ASSERTION = "org.kiln.provenance"
_AI = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def available() -> bool:
    try:
        import c2pa  # noqa: F401
    except ImportError:
        return False
    return True


def _make_chain(folder: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kiln")])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment",
                               "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign",
                               "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **on})

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("Kiln local CA")).issuer_name(name("Kiln local CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder().subject_name(name("Kiln image signer")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    key_path = folder / "signer-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (folder / "signer-chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))


class ContentCredentials:
    """Signs image bytes with a C2PA manifest carrying Kiln's provenance record."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._pems: tuple[bytes, bytes] | None = None
        self._context: Any = None

    def _credentials(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._pems is None:
                chain, key = self.folder / "signer-chain.pem", self.folder / "signer-key.pem"
                if not (chain.is_file() and key.is_file()):
                    _make_chain(self.folder)
                self._pems = (chain.read_bytes(), key.read_bytes())
            return self._pems

    def _builder_context(self) -> Any:
        """No embedded thumbnail: it cost ~50 ms an image (more than drawing a 64×64 one) and 10× the
        manifest's size, and the signed image is its own preview."""
        import c2pa

        with self._lock:
            if self._context is None:
                self._context = c2pa.Context(
                    c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}})
                )
            return self._context

    def sign(self, content: bytes, fmt: str, record: dict[str, Any]) -> bytes:
        import c2pa

        chain, key = self._credentials()
        manifest = {
            "claim_generator_info": [{"name": "kiln", "version": __version__}],
            "title": f"{record.get('image_id', 'image')}.{fmt}",
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created", "digitalSourceType": _AI,
                    "softwareAgent": {"name": "kiln", "version": __version__}}]}},
                {"label": ASSERTION, "data": record},
            ],
        }
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, key, None))
        out = io.BytesIO()
        try:
            with c2pa.Builder(json.dumps(manifest), self._builder_context()) as builder:
                builder.sign(signer, MIME[fmt], io.BytesIO(content), out)
        finally:
            signer.close()
        return out.getvalue()


def read(content: bytes, fmt: str) -> dict[str, Any] | None:
    """A summary of the image's C2PA manifest: validity, assertions and Kiln's record; None if unsigned."""
    if not available():
        return None
    import c2pa

    try:
        with c2pa.Reader(MIME[fmt], io.BytesIO(content)) as reader:
            store = json.loads(reader.json())
    except Exception:  # noqa: BLE001 - no manifest, or one we cannot read: report none
        return None
    manifest = store.get("manifests", {}).get(store.get("active_manifest"), {})
    assertions = {a.get("label"): a.get("data") for a in manifest.get("assertions", [])}
    return {
        "validation_state": store.get("validation_state"),
        "validation_status": [s.get("code") for s in store.get("validation_status") or []],
        "claim_generator": (manifest.get("claim_generator_info") or [{}])[0].get("name"),
        "assertions": sorted(k for k in assertions if k),
        "kiln": assertions.get(ASSERTION),
    }
