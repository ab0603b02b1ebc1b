"""Keys and certificates of a deployment: the CA, the SuperLink's TLS certificate, each institution's
SuperNode key (EC P-384, OpenSSH) and ledger key (Ed25519, common/chain.py); private keys 0600."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedrec.common import chain
from fedrec.common.errors import ConfigError
from fedrec.common.rundir import atomic_write_bytes
from fedrec.server.deployment.plan import NAME

CA_DAYS, CERT_DAYS = 5 * 365, 2 * 365


def read_institution_keys(
    keys_dir: Path | None, institutions: tuple[str, ...], insecure: bool,
) -> dict[str, tuple[bytes, bytes]]:
    """name -> (supernode.pub, ledger.pub) as each institution sent them, validated."""
    if keys_dir is None:
        if insecure:
            return {}
        raise ConfigError("--institution-keys DIR is required: each institution runs `fedrec deploy keygen "
                          "STATE_DIR --name NAME` and sends its supernode.pub and ledger.pub (put them in "
                          "DIR/NAME/); the coordinator never makes or holds an institution's private key")
    out: dict[str, tuple[bytes, bytes]] = {}
    for name in institutions:
        folder = Path(keys_dir) / name
        if (folder / "supernode.key").exists() or (folder / "ledger.key").exists():
            raise ConfigError(f"{folder} holds a private key; an institution sends only its .pub files — "
                              "delete the private key from this machine and ask for new keys")
        node = folder / "supernode.pub"
        if not node.is_file() and not insecure:
            raise ConfigError(f"{node} is missing: {name} sends it after `fedrec deploy keygen`")
        node_pub = node.read_bytes() if node.is_file() else b""
        if node_pub:
            try:
                key = serialization.load_ssh_public_key(node_pub)
            except ValueError:
                raise ConfigError(f"{node} is not an OpenSSH public key (fedrec deploy keygen writes one)") \
                    from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ConfigError(f"{node} is not an EC public key, which flower-supernode needs")
        ledger = folder / chain.PUB_FILE
        ledger_pub = b""
        if ledger.is_file():
            chain.load_public(ledger)  # validates
            ledger_pub = ledger.read_bytes()
        elif not insecure:
            raise ConfigError(f"{ledger} is missing: {name} sends it after `fedrec deploy keygen`")
        out[name] = (node_pub, ledger_pub)
    return out


def institution_keygen(out_dir: Path, *, name: str | None = None, supernode: bool = True) -> list[Path]:
    """An institution's own keys, made on its own machine: the ledger-signing key (ledger.key/.pub,
    Ed25519) and, with `supernode`, the SuperNode key (supernode.key/.pub, EC P-384, OpenSSH).
    Run it with the state directory as `out_dir` so the client signs with this very key."""
    if name is not None and not NAME.match(name):
        raise ConfigError(f"--name {name!r} is not a valid name; use letters, digits, '-' and '_'")
    out_dir = Path(out_dir)
    node_key = out_dir / "supernode.key"
    if supernode and node_key.exists():
        raise ConfigError(f"{node_key} already exists; the SuperLink has its public half registered — "
                          "keep it, or move it away deliberately")
    written = list(chain.generate_key(out_dir))
    if supernode:
        private, public = make_node_keys(name or "institution")
        atomic_write_bytes(node_key, private, mode=0o600)
        atomic_write_bytes(out_dir / "supernode.pub", public)
        written += [node_key, out_dir / "supernode.pub"]
    return written


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's certificate: SAN for `host` and for local access (127.0.0.1, ::1, localhost)."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(san_entries(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def san_entries(host: str) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.IPAddress(ipaddress.ip_address("::1"))]
    try:
        ip = x509.IPAddress(ipaddress.ip_address(host))
        if ip not in entries:
            entries.append(ip)
    except ValueError:
        if host != "localhost":
            entries.append(x509.DNSName(host))
    return entries


def make_node_keys(name: str) -> tuple[bytes, bytes]:
    """A SuperNode's EC P-384 key pair in OpenSSH format (private, public with a comment)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return private, public + f" fedrec-{name}\n".encode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
