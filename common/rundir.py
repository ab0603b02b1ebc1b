"""The files a run leaves: their layout and names, durable writes, and the records beside the weights.

Two directories hold everything fedrec writes about a run; this module is the only place their
file names are spelled:

    runs/<name>/                           RunDir (`fedrec simulate`, `train-central`, `flwr run`)
      config.toml                          resolved settings + provenance (versions, fingerprints)
      run.json                             the run id and the settings it started with (resume)
      rounds.jsonl                         one record per round (federated) or per epoch (<method>/)
      results.json, report.md, report.html tables and plots a person reads
      failed.json                          why a federated run stopped (no client trained)
      received.jsonl                       federated: what the server received, one line per reply
                                           (its records' names, tensor shapes, metrics, configs)
      ledgers/<party>.jsonl                each party's ledger lines (common/ledger.py)
      ledgers/<party>.key, .pub            a central party's ledger key, made on first use
      clients/<client>/                    a simulated client's own state directory (StateDir)
      checkpoints/round-<n>/               adapter, strategy and server state, prior (ArtifactDir)
      final/ or <method>/final/            adapter.safetensors (+ its AdapterRecord), metrics.json,
                                           prior.safetensors
      simulation.json                      `fedrec simulate`: each simulated institution's settings
      flower.log                           `fedrec simulate`: Flower's log of the run
      flower/                              `fedrec simulate`: Flower's runtime (FlowerDir): FLWR_HOME,
                                           the generated app, the SuperLink's log, the ServerApp's
                                           outcome, the lock
    <state dir>/                           StateDir: one institution's privacy state (client/state.py)
      state.json, ledger.jsonl, replies/<run>-<kind>-<round>.safetensors, .lock, ledger.key/.pub

Durable writes: every file is written to a temporary file in its directory, flushed and fsynced,
renamed over the old one and the directory fsynced (`atomic_write_bytes`), so a reader or a
crash sees the old file or the new one, never a mix; a directory of files (a checkpoint) is
assembled in a temporary directory and renamed in one step (`atomic_directory`); a JSON-lines
record is appended and fsynced (`append_jsonl`). No torch here: the audit reads run directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import tomli_w
from fedrec.common.config import Config, to_dict
from fedrec.common.errors import DataError

PACKAGES = ("fedrec", "torch", "transformers", "peft", "opacus", "flwr", "numpy", "safetensors")

# --- file names ------------------------------------------------------------------------------

CONFIG, RUN_RECORD, ROUNDS, FAILED, RESULTS = "config.toml", "run.json", "rounds.jsonl", "failed.json", \
    "results.json"
REPORT_MD, REPORT_HTML, RECEIVED = "report.md", "report.html", "received.jsonl"
LEDGERS, CLIENTS, CHECKPOINTS, FINAL = "ledgers", "clients", "checkpoints", "final"
ADAPTER, METRICS, PRIOR = "adapter.safetensors", "metrics.json", "prior.safetensors"
STRATEGY, SERVER_STATE = "strategy.safetensors", "server.json"
STATE, LEDGER, REPLIES, LOCK = "state.json", "ledger.jsonl", "replies", ".lock"
SIMULATION, FLOWER_LOG, FLOWER = "simulation.json", "flower.log", "flower"
FLOWER_HOME, FLOWER_APP, SUPERLINK_LOG = "home", "app", "superlink.log"
SERVERAPP_OUTCOME = "serverapp.json"
FLOWER_CONFIG, PYPROJECT = "config.toml", "pyproject.toml"  # Flower's own names (FLWR_HOME, an app)
LEDGER_SUFFIX = ".jsonl"
LEDGER_KEY_SUFFIX = ".key"  # chain.generate_key writes the public half beside it as .pub


# --- durable writes (the one implementation) ---------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace `path` with `data`: readers and crashes see the old file or the new one, never a mix.

    `mode` (e.g. 0o600 for a private key) is set on the temporary file before any byte is written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replace a JSON-lines file with `records` (sorted keys), atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one whole line and fsync it (a crash loses at most that line)."""
    path = Path(path)
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `final`; when the block ends without error, its
    files are fsynced and it replaces `final` in one rename (a crash leaves the old one whole)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (empty when it does not exist); a line that is not a JSON
    object stops with the file and line number."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not a JSON line ({exc.msg}); the file is damaged — restore it "
                            "from the client's own copy or a backup") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line")
        out.append(obj)
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a damaged file is a DataError naming it."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    return doc


# --- the directories ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactDir:
    """A folder of weights and what goes with them: final/, <method>/final/, checkpoints/round-<n>/."""

    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def prior(self) -> Path:
        return self.root / PRIOR

    @property
    def strategy(self) -> Path:
        return self.root / STRATEGY

    @property
    def server_state(self) -> Path:
        return self.root / SERVER_STATE


@dataclass(frozen=True)
class StateDir:
    """One institution's (or simulated client's) privacy state directory."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    @property
    def replies(self) -> Path:
        return self.root / REPLIES

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    def reply(self, run_id: str, kind: str, rnd: int) -> Path:
        """Where the tensors of one release are kept (the run id made safe for a file name)."""
        return self.replies / f"{reply_stem(run_id, kind, rnd)}.safetensors"

    def reply_files(self) -> list[Path]:
        return sorted(self.replies.glob("*.safetensors"))


@dataclass(frozen=True)
class FlowerDir:
    """`fedrec simulate`'s workspace for Flower's runtime: a private FLWR_HOME, the generated app,
    the SuperLink's own log, the ServerApp's outcome, and the lock held while any process of the
    run may be alive."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / FLOWER_HOME

    @property
    def flower_config(self) -> Path:
        return self.home / FLOWER_CONFIG

    @property
    def app(self) -> Path:
        return self.root / FLOWER_APP

    @property
    def app_pyproject(self) -> Path:
        return self.app / PYPROJECT

    @property
    def superlink_log(self) -> Path:
        return self.root / SUPERLINK_LOG

    @property
    def serverapp_outcome(self) -> Path:
        """Written when the ServerApp's main has returned or raised (before Flower tears down)."""
        return self.root / SERVERAPP_OUTCOME

    @property
    def lock(self) -> Path:
        return self.root / LOCK


def reply_stem(run_id: str, kind: str, rnd: int) -> str:
    return f"{safe_name(run_id)}-{kind}-{rnd}"


def safe_name(text: str) -> str:
    """`text` with anything but letters, digits, '-' and '_' replaced by '_' (for file names)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(text))


class RunDir:
    """The run directory: paths of everything in it, and its writes (atomic, or whole appended lines)."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    # -- paths --

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def run_record(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def rounds(self) -> Path:
        return self.root / ROUNDS

    @property
    def failed(self) -> Path:
        return self.root / FAILED

    @property
    def received(self) -> Path:
        return self.root / RECEIVED

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def ledgers_dir(self) -> Path:
        return self.root / LEDGERS

    def ledger(self, party: str) -> Path:
        return self.ledgers_dir / f"{party}{LEDGER_SUFFIX}"

    def ledger_key(self, party: str) -> Path:
        """The private ledger key of a party that signs in this run directory (a central method)."""
        return self.ledgers_dir / f"{party}{LEDGER_KEY_SUFFIX}"

    def ledgers(self) -> dict[str, Path]:
        """Party name -> its ledger file, for every ledger the run holds."""
        return {p.stem: p for p in sorted(self.ledgers_dir.glob(f"*{LEDGER_SUFFIX}"))}

    def client_state(self, client: str) -> StateDir:
        return StateDir(self.root / CLIENTS / client)

    def client_states(self) -> dict[str, StateDir]:
        """Client name -> its state directory, for every simulated client with a ledger of its own."""
        return {p.parent.name: StateDir(p.parent) for p in sorted((self.root / CLIENTS).glob(f"*/{LEDGER}"))}

    def checkpoint(self, rnd: int) -> ArtifactDir:
        return ArtifactDir(self.root / CHECKPOINTS / f"round-{rnd}")

    def checkpoint_rounds(self) -> list[int]:
        """Rounds with a complete checkpoint (its server state written), newest first."""
        rounds = [int(p.name.split("-", 1)[1]) for p in (self.root / CHECKPOINTS).glob("round-*")
                  if p.name.split("-", 1)[1].isdigit() and (p / SERVER_STATE).is_file()]
        return sorted(rounds, reverse=True)

    def final(self, method: str | None = None) -> ArtifactDir:
        """final/ of a federated run, <method>/final/ of a central method."""
        return ArtifactDir(self.root / FINAL if method is None else self.root / method / FINAL)

    def finals(self) -> list[str]:
        """The central methods that left a final adapter (sorted)."""
        return sorted(p.parent.parent.name for p in self.root.glob(f"*/{FINAL}/{ADAPTER}"))

    def method_rounds(self, method: str) -> Path:
        return self.root / method / ROUNDS

    @property
    def simulation(self) -> Path:
        return self.root / SIMULATION

    @property
    def flower_log(self) -> Path:
        return self.root / FLOWER_LOG

    @property
    def flower(self) -> FlowerDir:
        return FlowerDir(self.root / FLOWER)

    # -- writes --

    def write_config(self, config: Config, provenance: Mapping[str, Any]) -> None:
        doc = to_dict(config)
        doc["provenance"] = {**provenance, "versions": package_versions()}
        atomic_write_text(self.config, tomli_w.dumps(_toml_safe(doc)))

    def read_provenance(self) -> dict[str, Any]:
        import tomllib

        try:
            doc = tomllib.loads(self.config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise DataError(f"{self.config} cannot be read: {exc}") from None
        return dict(doc.get("provenance", {}))


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """The Python version and the installed version of each package in `names`."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _toml_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _toml_safe(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_toml_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --- the record beside every adapter -------------------------------------------------------------

RECORD_KEY = "fedrec.record"  # the adapter file's safetensors metadata entry that holds the record
RECORD_VERSION = 1


@dataclass(frozen=True)
class AdapterRecord:
    """What an adapter was trained with, kept inside its safetensors file (metadata), so weights and
    record are written in one atomic step: the resolved settings and the fingerprints of the base
    model and of the data set (as nanoGPT keeps the config in every checkpoint)."""

    config: dict[str, Any]  # common.config.to_dict of the run's settings
    model_fingerprint: str  # sha256 of the base model's config and weights (common/model.py)
    dataset_fingerprint: str  # sha256 of the catalogue and interactions (common/data.py)
    run: str = ""  # the federated run id, or the central method
    rounds: int | None = None
    variant: str = "lora"
    extra: dict[str, str] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        return {RECORD_KEY: json.dumps({"version": RECORD_VERSION, **asdict(self)}, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None, *, source: str) -> AdapterRecord | None:
        """The record in a file's metadata; None for a file written before records (older runs)."""
        if not meta or RECORD_KEY not in meta:
            return None
        try:
            doc = json.loads(meta[RECORD_KEY])
            if doc.pop("version") != RECORD_VERSION:
                raise ValueError("unknown record version")
            record = cls(**doc)
        except (ValueError, TypeError, KeyError) as exc:
            raise DataError(f"{source}: its adapter record is damaged ({exc})") from None
        if not (isinstance(record.model_fingerprint, str) and isinstance(record.config, dict)):
            raise DataError(f"{source}: its adapter record is damaged (fingerprint or config)")
        return record
