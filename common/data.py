"""Interaction data: parsers (GroupLens ml-100k, RecBole atomic, CSV), leave-one-out split, partitions.

Conventions shared by every format:
- implicit feedback: every interaction is a positive; `rating_threshold` keeps ratings >= it;
- a repeated (user, item) pair keeps its first occurrence in time, later repeats are dropped;
- histories are chronological, interactions with equal timestamps stay in file order;
- items without interactions stay in the catalogue (the model ranks the whole catalogue);
- a user exists if at least one interaction of theirs is kept; attributes missing from the user
  file are an empty mapping.

Generic CSV format (UTF-8, header row required, extra columns allowed):
- interactions.csv: user_id,item_id,timestamp[,rating]   (timestamp: an integer, e.g. Unix seconds)
- items.csv:        item_id,title[,genres][,more text columns]   (genres separated by "|" or ",")
- users.csv:        user_id[,attribute columns such as age,gender,occupation,zip_code]   (optional)
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from fedrec.common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "ml-100k", "recbole", "csv")
PARTITION_SCHEMES = ("iid", "dirichlet", "attribute", "mapping")
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
ML100K_USER_FIELDS = ("age", "gender", "occupation", "zip_code")
TITLE_FIELDS = ("movie_title", "title", "name")  # first non-empty one is an item's title
GENRE_FIELDS = ("class", "genre", "genres")  # RecBole ml-* call the genre list "class"
NO_GENRE = "(no genre)"  # the dominant genre of a user whose items have none


@dataclass(frozen=True)
class Dataset:
    """A parsed data set: the item catalogue, the users and their chronological histories."""

    name: str
    item_ids: tuple[str, ...]  # catalogue order: row i is item index i
    item_titles: tuple[str, ...]  # e.g. "Toy Story (1995)"
    item_texts: tuple[str, ...]  # the public text a model encodes: title | genres | other text
    user_ids: tuple[str, ...]
    user_attributes: Mapping[str, Mapping[str, str]]  # user -> {"occupation": ..., ...}, may be empty
    histories: Mapping[str, tuple[int, ...]]  # user -> item indices, chronological
    item_genres: tuple[tuple[str, ...], ...] = ()  # per item; () for all: genres unknown

    def __post_init__(self) -> None:
        if not self.item_genres:
            object.__setattr__(self, "item_genres", ((),) * len(self.item_ids))
        n = len(self.item_ids)
        if not len(self.item_titles) == len(self.item_texts) == len(self.item_genres) == n:
            raise ValueError("item_ids, item_titles, item_texts and item_genres must have equal length")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the catalogue (ids, texts) and every user's history: the data set's identity in
        run records (an adapter's AdapterRecord), whatever files or format it was read from."""
        h = hashlib.sha256()
        for item_id, text in zip(self.item_ids, self.item_texts, strict=True):
            h.update(f"{item_id}\t{text}\n".encode())
        for user in sorted(self.histories):
            h.update(f"{user}:{','.join(map(str, self.histories[user]))}\n".encode())
        return h.hexdigest()

    @cached_property
    def _index(self) -> dict[str, int]:
        return {item_id: n for n, item_id in enumerate(self.item_ids)}

    def item_index(self, item_id: str) -> int:
        """Catalogue row of `item_id`; DataError if it is not in the catalogue."""
        try:
            return self._index[item_id]
        except KeyError:
            raise DataError(
                f"unknown item id {item_id!r}: not in the {self.name} catalogue of {len(self.item_ids)} items"
            ) from None

    @property
    def num_interactions(self) -> int:
        return sum(len(h) for h in self.histories.values())


@dataclass(frozen=True)
class Split:
    """Leave-one-out split: chronological training prefix, one validation and one test item."""

    train: Mapping[str, tuple[int, ...]]  # chronological
    valid: Mapping[str, int]
    test: Mapping[str, int]


@dataclass(frozen=True)
class _Item:
    item_id: str
    title: str
    text: str
    genres: tuple[str, ...]
    where: str  # "file:line" for error messages


@dataclass(frozen=True)
class _Event:
    user: str
    item: str
    timestamp: int
    rating: float | None
    where: str


_Row = tuple[dict[str, str], str]  # a record by column name, and its "file:line"


# --- loading: dispatch ---------------------------------------------------------------------


def load_dataset(
    path: Path, *, fmt: str = "auto", rating_threshold: float | None = None, name: str | None = None
) -> Dataset:
    """Parse a data set directory in one of the documented formats (auto-detected by default)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data set {path} does not exist; point data.dataset (or --data) at your files")
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is not allowed; choose one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "ml-100k":
        dataset = load_ml100k(path, rating_threshold=rating_threshold)
    elif fmt == "recbole":
        dataset = load_recbole(path, rating_threshold=rating_threshold)
    else:
        folder = path if path.is_dir() else path.parent
        users = folder / "users.csv"
        dataset = load_csv(folder / "interactions.csv", folder / "items.csv",
                           users if users.is_file() else None, rating_threshold=rating_threshold)
    dataset = dataset if name is None else replace(dataset, name=name)
    log.info("loaded %s from %s (%s): %d users, %d items, %d interactions", dataset.name, path, fmt,
             len(dataset.user_ids), len(dataset.item_ids), dataset.num_interactions)
    return dataset


def detect_format(path: Path) -> str:
    """'ml-100k', 'recbole' or 'csv' from the files in directory `path`."""
    if path.is_dir() and (path / "u.data").is_file():
        return "ml-100k"
    if path.is_dir() and any(path.glob("*.inter")):
        return "recbole"
    if path.is_dir() and (path / "interactions.csv").is_file() and (path / "items.csv").is_file():
        return "csv"
    raise DataError(
        f"{path}: no known data set format; looked for a directory holding u.data (GroupLens "
        "ml-100k), <name>.inter (RecBole atomic files) or interactions.csv + items.csv (CSV)"
    )


# --- loading: GroupLens ml-100k ------------------------------------------------------------


def load_ml100k(directory: Path, *, rating_threshold: float | None = None) -> Dataset:
    """GroupLens ml-100k: u.data (tab), u.item (pipe, latin-1, genre flags), u.user (pipe, optional)."""
    genres = _ml100k_genres(directory / "u.genre")
    items = [_ml100k_item(parts, genres, where)
             for parts, where in _lines(directory / "u.item", "|", encoding="latin-1")]
    events = [_event(parts[0], parts[1], parts[3], parts[2], where)
              for parts, where in _lines(directory / "u.data", "\t", columns=4)]
    _require_events(directory / "u.data", events)
    users: dict[str, dict[str, str]] = {}
    if (directory / "u.user").is_file():
        for parts, where in _lines(directory / "u.user", "|", columns=1 + len(ML100K_USER_FIELDS)):
            attrs = dict(zip(ML100K_USER_FIELDS, parts[1:], strict=True))
            users[_nonempty(parts[0], "user id", where)] = attrs
    return _assemble("ml-100k", items, events, users, rating_threshold)


def _ml100k_genres(path: Path) -> tuple[str, ...]:
    """Genre names in flag order from u.genre ("name|index" lines), else the standard list."""
    if not path.is_file():
        return ML100K_GENRES
    return tuple(_nonempty(parts[0], "genre name", where) for parts, where in
                 _lines(path, "|", encoding="latin-1")) or ML100K_GENRES


def _ml100k_item(parts: list[str], genres: tuple[str, ...], where: str) -> _Item:
    """id|title|release date|video release date|IMDb URL|one 0/1 flag per genre."""
    if len(parts) != 5 + len(genres):
        raise DataError(f"{where}: expected {5 + len(genres)} '|'-separated fields "
                        f"(5 + {len(genres)} genre flags), got {len(parts)}")
    flags = parts[5:]
    if any(f not in ("0", "1") for f in flags):
        raise DataError(f"{where}: genre flags must be 0 or 1, got {'|'.join(flags)}")
    item_genres = tuple(g for g, f in zip(genres, flags, strict=True) if f == "1")
    title = parts[1].strip()
    return _Item(_nonempty(parts[0], "item id", where), title, _text(title, item_genres), item_genres, where)


# --- loading: RecBole atomic files ---------------------------------------------------------


def load_recbole(directory: Path, *, rating_threshold: float | None = None) -> Dataset:
    """RecBole atomic files <name>.inter/.item[/.user]: tab-separated, header "field:type"."""
    inter = sorted(directory.glob("*.inter"))
    if len(inter) != 1:
        found = ", ".join(p.name for p in inter) or "none"
        raise DataError(f"{directory}: expected exactly one <name>.inter file, found {found}")
    stem = inter[0].with_suffix("")
    item_types, item_rows = _atomic(stem.with_suffix(".item"), required=("item_id",))
    items = [_recbole_item(row, item_types, where) for row, where in item_rows]
    inter_types, inter_rows = _atomic(inter[0], required=("user_id", "item_id", "timestamp"))
    _check_rating_column(inter[0], inter_types, rating_threshold)
    events = [_event(r["user_id"], r["item_id"], r["timestamp"], r.get("rating", ""), where)
              for r, where in inter_rows]
    _require_events(inter[0], events)
    users = {}
    if stem.with_suffix(".user").is_file():
        users = _attributes(_atomic(stem.with_suffix(".user"), required=("user_id",))[1])
    return _assemble(stem.name, items, events, users, rating_threshold)


def _recbole_item(row: dict[str, str], types: Mapping[str, str], where: str) -> _Item:
    """Title from movie_title/title/name (+ " (release_year)"); text adds the other token_seq fields."""
    item_id = _nonempty(row["item_id"], "item_id", where)
    title = next((row[k].strip() for k in TITLE_FIELDS if row.get(k, "").strip()), item_id)
    year = row.get("release_year", "").strip()
    if year and not title.endswith(f"({year})"):
        title = f"{title} ({year})"
    genres = tuple(next((row[k].split() for k in GENRE_FIELDS if k in row), []))
    used = {"item_id", "release_year", *TITLE_FIELDS, *GENRE_FIELDS}
    extra = [v.strip() for k, v in row.items() if k not in used and types[k] == "token_seq" and v.strip()]
    return _Item(item_id, title, _text(title, genres, extra), genres, where)


def _atomic(path: Path, *, required: Sequence[str]) -> tuple[dict[str, str], list[_Row]]:
    """Column types by name ("token", "float", "token_seq", ...) and the records of an atomic file."""
    lines = _lines(path, "\t", skip_blank=False)
    if not lines:
        raise DataError(f"{path}:1: empty file; expected a header such as user_id:token")
    header, _ = lines[0]
    types = {}
    for column in header:
        field, _, kind = column.strip().partition(":")
        types[field] = kind
    _check_header(path, list(types), required)
    rows = []
    for parts, where in lines[1:]:
        if len(parts) != len(types):
            raise DataError(f"{where}: expected {len(types)} tab-separated fields, got {len(parts)}")
        rows.append((dict(zip(types, parts, strict=True)), where))
    return types, rows


# --- loading: generic CSV ------------------------------------------------------------------


def load_csv(
    interactions: Path, items: Path, users: Path | None = None, *, rating_threshold: float | None = None
) -> Dataset:
    """Generic CSV (see the module docstring): interactions, items and optional user attributes."""
    item_list = [_csv_item(row, where) for row, where in _csv_rows(items, required=("item_id", "title"))]
    header, rows = _csv_table(interactions, required=("user_id", "item_id", "timestamp"))
    _check_rating_column(interactions, header, rating_threshold)
    events = [_event(r["user_id"], r["item_id"], r["timestamp"], r.get("rating", ""), where)
              for r, where in rows]
    _require_events(interactions, events)
    attrs = {} if users is None else _attributes(_csv_rows(users, required=("user_id",)))
    return _assemble(interactions.parent.name or "csv", item_list, events, attrs, rating_threshold)


def _csv_item(row: dict[str, str], where: str) -> _Item:
    item_id, title = _nonempty(row["item_id"], "item_id", where), _nonempty(row["title"], "title", where)
    genres = tuple(g.strip() for g in row.get("genres", "").replace("|", ",").split(",") if g.strip())
    extra = [v for k, v in row.items() if k not in ("item_id", "title", "genres") and v]
    return _Item(item_id, title, _text(title, genres, extra), genres, where)


def _csv_rows(path: Path, *, required: Sequence[str]) -> list[_Row]:
    return _csv_table(path, required=required)[1]


def _csv_table(path: Path, *, required: Sequence[str]) -> tuple[list[str], list[_Row]]:
    """Header and records of a CSV file whose header must hold `required`."""
    reader = csv.reader(io.StringIO(_read(path, "utf-8")))
    header = [h.strip() for h in next(reader, [])]
    _check_header(path, header, required)
    rows = []
    for parts in reader:
        where = f"{path}:{reader.line_num}"
        if not any(p.strip() for p in parts):
            continue
        if len(parts) != len(header):
            raise DataError(f"{where}: expected {len(header)} comma-separated fields, got {len(parts)}")
        rows.append((dict(zip(header, (p.strip() for p in parts), strict=True)), where))
    return header, rows


# --- loading: shared helpers ---------------------------------------------------------------


def _require_events(path: Path, events: Sequence[_Event]) -> None:
    if not events:
        raise DataError(f"{path}: no interactions (the file is empty or holds only a header); "
                        "it needs one line per user–item interaction")


def _read(path: Path, encoding: str) -> str:
    """The file's text; a UTF-8 byte-order mark (as spreadsheet exports write) is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig" if encoding == "utf-8" else encoding)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; the data set needs this file") from None
    except UnicodeDecodeError:
        data = path.read_bytes()
        line = next(n for n, raw in enumerate(data.split(b"\n"), start=1) if not _decodes(raw, encoding))
        raise DataError(f"{path}:{line}: not valid {encoding} text; re-save the file as {encoding}") from None


def _decodes(raw: bytes, encoding: str) -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def _lines(
    path: Path, sep: str, *, encoding: str = "utf-8", columns: int | None = None, skip_blank: bool = True
) -> list[tuple[list[str], str]]:
    """Fields of every line of a delimited file (no quoting), each with its "file:line"."""
    out = []
    for n, line in enumerate(_read(path, encoding).splitlines(), start=1):
        if skip_blank and not line.strip():
            continue
        parts, where = line.split(sep), f"{path}:{n}"
        if columns is not None and len(parts) != columns:
            raise DataError(f"{where}: expected {columns} {sep!r}-separated fields, got {len(parts)}")
        out.append((parts, where))
    return out


def _check_header(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} "
                        f"(it has {', '.join(header) or 'nothing'}); add them to the first line")


def _check_rating_column(path: Path, header: Iterable[str], rating_threshold: float | None) -> None:
    if rating_threshold is not None and "rating" not in header:
        raise DataError(f"{path}:1: data.rating_threshold={rating_threshold} is set but the header has "
                        "no rating column; remove the threshold or add ratings")


def _attributes(rows: Iterable[_Row]) -> dict[str, dict[str, str]]:
    """User id -> the other columns of a user file."""
    out = {}
    for row, where in rows:
        uid = _nonempty(row["user_id"], "user_id", where)
        out[uid] = {k: v for k, v in row.items() if k != "user_id"}
    return out


def _event(user: str, item: str, ts: str, rating: str, where: str) -> _Event:
    return _Event(_nonempty(user, "user id", where), _nonempty(item, "item id", where),
                  _timestamp(ts, where), _rating(rating, where), where)


def _timestamp(text: str, where: str) -> int:
    """An integer; "881250949.0" (RecBole writes float columns) is accepted, "1.5" is not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise DataError(f"{where}: timestamp {text!r} is not an integer (e.g. Unix seconds)")
    return int(value)


def _rating(text: str, where: str) -> float | None:
    if not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: rating {text!r} is not a number")
    return value


def _nonempty(value: str, what: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise DataError(f"{where}: empty {what}")
    return value


def _text(title: str, genres: Sequence[str], extra: Sequence[str] = ()) -> str:
    """"Toy Story (1995) | Animation, Children's, Comedy | <other text>"."""
    parts = [title, ", ".join(genres), *extra]
    return " | ".join(p for p in parts if p)


def _assemble(
    name: str,
    items: Sequence[_Item],
    events: Sequence[_Event],
    users: Mapping[str, Mapping[str, str]],
    rating_threshold: float | None,
) -> Dataset:
    index = _catalogue_index(items)
    per_user: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for order, ev in enumerate(events):
        if ev.item not in index:
            raise DataError(f"{ev.where}: item id {ev.item!r} is not in the item file; add it there "
                            "or remove the interaction")
        if rating_threshold is not None and _below(ev, rating_threshold):
            continue
        per_user[ev.user].append((ev.timestamp, order, index[ev.item]))
    user_ids = tuple(sorted(per_user, key=_natural))
    return Dataset(
        name=name,
        item_ids=tuple(i.item_id for i in items),
        item_titles=tuple(i.title for i in items),
        item_texts=tuple(i.text for i in items),
        user_ids=user_ids,
        user_attributes={u: dict(users.get(u, {})) for u in user_ids},
        histories={u: _first_occurrences(sorted(per_user[u])) for u in user_ids},
        item_genres=tuple(i.genres for i in items),
    )


def _catalogue_index(items: Sequence[_Item]) -> dict[str, int]:
    index: dict[str, int] = {}
    for n, item in enumerate(items):
        if item.item_id in index:
            first = items[index[item.item_id]].where.rpartition(":")[2]
            raise DataError(f"{item.where}: duplicate item id {item.item_id!r} (first on line {first})")
        index[item.item_id] = n
    return index


def _below(event: _Event, threshold: float) -> bool:
    if event.rating is None:
        raise DataError(f"{event.where}: empty rating, but data.rating_threshold={threshold} is set")
    return event.rating < threshold


def _first_occurrences(rows: Sequence[tuple[int, int, int]]) -> tuple[int, ...]:
    """Item column of (timestamp, file order, item) rows, each item kept at its first occurrence."""
    return tuple(dict.fromkeys(item for _, _, item in rows))


def _natural(key: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others alphabetically."""
    return (0, int(key), key) if key.isdigit() else (1, 0, key)


# --- split ---------------------------------------------------------------------------------


def leave_one_out(dataset: Dataset) -> Split:
    """Per user, chronological: last item -> test, second to last -> valid, the rest -> train.

    Users with fewer than 3 interactions keep everything in train and have no valid/test item.
    """
    train, valid, test = {}, {}, {}
    for user, seq in dataset.histories.items():
        if len(seq) < 3:
            train[user] = tuple(seq)
            continue
        train[user], valid[user], test[user] = tuple(seq[:-2]), seq[-2], seq[-1]
    return Split(train, valid, test)


def restrict_split(split: Split, users: Iterable[str]) -> Split:
    """The split of `users` only (each must be in split.train)."""
    users = list(users)
    return Split(
        train={u: split.train[u] for u in users},
        valid={u: split.valid[u] for u in users if u in split.valid},
        test={u: split.test[u] for u in users if u in split.test},
    )


def sample_users(split: Split, max_users: int, seed: int) -> Split:
    """A reduced-scale split: `max_users` users drawn without replacement (0: everyone)."""
    users = sorted(split.train)
    if 0 < max_users < len(users):
        rng = np.random.default_rng(seed)
        users = sorted(rng.choice(users, size=max_users, replace=False).tolist())
    return restrict_split(split, users)


def client_datasets(split: Split, assignment: Mapping[str, str]) -> dict[str, Split]:
    """Client name -> the split restricted to that client's users (clients in name order)."""
    missing = [u for u in split.train if u not in assignment]
    if missing:
        raise DataError(f"{len(missing)} users have no client, e.g. {', '.join(missing[:5])}; "
                        "partition the same data set that was split")
    by_client: dict[str, list[str]] = defaultdict(list)
    for user in split.train:
        by_client[assignment[user]].append(user)
    return {client: restrict_split(split, users) for client, users in sorted(by_client.items())}


# --- partitions ----------------------------------------------------------------------------


def partition_users(
    dataset: Dataset,
    *,
    scheme: str,
    num_clients: int | None,
    seed: int,
    alpha: float = 0.5,
    attribute: str | None = None,
    mapping_file: Path | None = None,
    zip_prefix: int = 1,
) -> dict[str, str]:
    """User id -> client name; every user in exactly one client, the same for the same seed.

    iid: shuffled and dealt round-robin ("client-0", ...); dirichlet: label-Dirichlet(alpha) over
    a user attribute or, by default, the user's dominant genre; attribute: one client per value
    (smallest groups merged down to num_clients when that is > 0); mapping: a user_id,client CSV.
    """
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(f"partition scheme {scheme!r} is not known; choose one of "
                          f"{', '.join(PARTITION_SCHEMES)}")
    users = list(dataset.user_ids)
    if scheme == "mapping":
        if mapping_file is None:
            raise ConfigError("partition scheme 'mapping' needs a mapping file with columns user_id,client")
        return _from_mapping(users, Path(mapping_file))
    if scheme == "attribute":
        return _by_attribute(dataset, users, attribute, num_clients or 0, zip_prefix)
    if num_clients is None or not 1 <= num_clients <= len(users):
        raise ConfigError(f"fed.clients: num_clients={num_clients} must be between 1 and the {len(users)} "
                          f"users of {dataset.name}; lower fed.clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(users))
        return {users[j]: f"client-{n % num_clients}" for n, j in enumerate(order)}
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha={alpha} must be > 0 (small: skewed clients, large: near iid)")
    labels = _user_labels(dataset, users, attribute)
    return {u: f"client-{c}" for u, c in _dirichlet(users, labels, num_clients, alpha, rng).items()}


def dominant_genre(dataset: Dataset, user: str) -> str:
    """The most frequent genre among the user's items (ties: alphabetically first)."""
    counts = Counter(g for i in dataset.histories[user] for g in dataset.item_genres[i])
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else NO_GENRE


def _user_labels(dataset: Dataset, users: Sequence[str], attribute: str | None) -> list[str]:
    """Each user's category: the value of `attribute`, or the dominant genre for None / "genre"."""
    if attribute in (None, "genre"):
        return [dominant_genre(dataset, u) for u in users]
    missing = [u for u in users if attribute not in dataset.user_attributes.get(u, {})]
    if len(missing) == len(users):
        known = sorted({k for a in dataset.user_attributes.values() for k in a})
        raise ConfigError(f"user attribute {attribute!r} is not in {dataset.name}; available: "
                          f"{', '.join(known) or 'none (no user file)'}, or 'genre'")
    if missing:
        raise DataError(f"user attribute {attribute!r} is missing for {len(missing)} users, e.g. "
                        f"{', '.join(missing[:5])}; the user file must give it for every user")
    return [dataset.user_attributes[u][attribute] for u in users]


def _dirichlet(
    users: Sequence[str], labels: Sequence[str], k: int, alpha: float, rng: np.random.Generator
) -> dict[str, int]:
    """Label-Dirichlet: each category's users are cut among k clients in Dir(alpha) proportions."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for user, label in zip(users, labels, strict=True):
        by_label[label].append(user)
    out: dict[str, int] = {}
    for label in sorted(by_label):
        members = [by_label[label][j] for j in rng.permutation(len(by_label[label]))]
        cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(np.arange(len(members)), cuts)):
            out.update({members[j]: client for j in part})
    return _fill_empty_clients(out, k)


def _fill_empty_clients(assignment: dict[str, int], k: int) -> dict[str, int]:
    """Give each empty client one user, taken from the then largest client (its first user by id)."""
    sizes = Counter(assignment.values())
    for client in range(k):
        if sizes[client] == 0:
            donor = max(range(k), key=lambda c: (sizes[c], -c))
            user = min((u for u, c in assignment.items() if c == donor), key=_natural)
            assignment[user] = client
            sizes[donor], sizes[client] = sizes[donor] - 1, 1
    return assignment


def _by_attribute(
    dataset: Dataset, users: Sequence[str], attribute: str | None, num_clients: int, zip_prefix: int
) -> dict[str, str]:
    if not attribute:
        raise ConfigError("partition scheme 'attribute' needs an attribute, e.g. occupation or zip_code")
    if zip_prefix < 1:
        raise ConfigError(f"zip_prefix={zip_prefix} must be >= 1")
    if num_clients < 0:
        raise ConfigError(f"num_clients={num_clients} must be >= 0 (0: one client per value)")
    values = _user_labels(dataset, users, attribute)
    if attribute == "zip_code":
        values = [v[:zip_prefix] for v in values]
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for user, value in zip(users, values, strict=True):
        groups[(value,)].append(user)
    if num_clients > len(groups):
        raise ConfigError(f"num_clients={num_clients} but attribute {attribute!r} has only {len(groups)} "
                          f"values; use at most {len(groups)}, or 0 for one client per value")
    while num_clients and len(groups) > num_clients:
        a, b = sorted(groups, key=lambda g: (len(groups[g]), g))[:2]  # the two smallest
        groups[tuple(sorted(a + b))] = groups.pop(a) + groups.pop(b)
    return {u: "+".join(values) for values, members in groups.items() for u in members}


def _from_mapping(users: Sequence[str], path: Path) -> dict[str, str]:
    known = set(users)
    out: dict[str, str] = {}
    for row, where in _csv_rows(path, required=("user_id", "client")):
        user = _nonempty(row["user_id"], "user_id", where)
        if user not in known:
            raise DataError(f"{where}: user {user!r} is not in the data set (or has no interactions)")
        if user in out:
            raise DataError(f"{where}: user {user!r} is listed twice; give each user one client")
        out[user] = _nonempty(row["client"], "client", where)
    missing = [u for u in users if u not in out]
    if missing:
        raise DataError(f"{path}: {len(missing)} users have no client, e.g. {', '.join(missing[:5])}; "
                        "add a line user_id,client for each")
    return out
