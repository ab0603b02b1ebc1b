"""Interaction data: parsers (GroupLens ml-100k, RecBole atomic, CSV), leave-one-out split, partitions.

Every interaction is a positive (implicit feedback); `rating_threshold` keeps ratings >= it.
A repeated (user, item) pair keeps its first occurrence in time. Histories are chronological,
equal timestamps in file order. Items without interactions stay in the catalogue.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fedrec.common.errors import ConfigError, DataError

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
PARTITION_SCHEMES = ("iid", "dirichlet", "attribute", "mapping")


@dataclass(frozen=True)
class Dataset:
    name: str
    item_ids: tuple[str, ...]  # catalogue order: row i is item index i
    item_titles: tuple[str, ...]  # e.g. "Toy Story (1995)"
    item_texts: tuple[str, ...]  # the public text a model encodes
    item_genres: tuple[tuple[str, ...], ...]
    user_ids: tuple[str, ...]
    user_attributes: Mapping[str, Mapping[str, str]]
    histories: Mapping[str, tuple[int, ...]]  # user -> item indices, chronological
    _index: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def item_index(self, item_id: str) -> int:
        index = self._index or {i: n for n, i in enumerate(self.item_ids)}
        try:
            return index[item_id]
        except KeyError:
            raise DataError(f"unknown item id {item_id!r} (not in the {self.name} catalogue)") from None


@dataclass(frozen=True)
class Split:
    train: Mapping[str, tuple[int, ...]]
    valid: Mapping[str, int]
    test: Mapping[str, int]


@dataclass(frozen=True)
class _Item:
    item_id: str
    title: str
    text: str
    genres: tuple[str, ...]


@dataclass(frozen=True)
class _Event:
    user: str
    item: str
    timestamp: int
    rating: float | None
    where: str  # "file:line" for error messages


# --- loading -------------------------------------------------------------------------------


def load_dataset(
    path: Path, *, fmt: str = "auto", rating_threshold: float | None = None, name: str | None = None
) -> Dataset:
    """Parse a data set directory in one of the documented formats (auto-detected by default)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data set {path} does not exist; pass --data DIR with your files")
    fmt = _detect(path) if fmt == "auto" else fmt
    loaders = {"ml-100k": load_ml100k, "recbole": load_recbole}
    if fmt == "csv":
        d = path if path.is_dir() else path.parent
        users = d / "users.csv"
        dataset = load_csv(d / "interactions.csv", d / "items.csv", users if users.exists() else None,
                           rating_threshold=rating_threshold)
    elif fmt in loaders:
        dataset = loaders[fmt](path, rating_threshold=rating_threshold)
    else:
        raise ConfigError(f"data.format={fmt!r} is not allowed; choose auto, ml-100k, recbole or csv")
    return dataset if name is None else _renamed(dataset, name)


def _detect(path: Path) -> str:
    if path.is_dir() and (path / "u.data").is_file():
        return "ml-100k"
    if path.is_dir() and any(path.glob("*.inter")):
        return "recbole"
    if path.is_dir() and (path / "interactions.csv").is_file() and (path / "items.csv").is_file():
        return "csv"
    raise DataError(
        f"{path}: no known data set format (looked for u.data [GroupLens], *.inter [RecBole], "
        "interactions.csv + items.csv [CSV])"
    )


def load_ml100k(directory: Path, *, rating_threshold: float | None = None) -> Dataset:
    """GroupLens ml-100k: u.data (tab), u.item (pipe, latin-1, genre flags), u.user (pipe)."""
    genres = _ml100k_genres(directory / "u.genre")
    items = [_ml100k_item(parts, genres, where) for parts, where in
             _rows(directory / "u.item", "|", encoding="latin-1")]
    events = [_event(parts, (0, 1, 3, 2), where) for parts, where in
              _rows(directory / "u.data", "\t", columns=4)]
    users: dict[str, dict[str, str]] = {}
    if (directory / "u.user").is_file():
        keys = ("age", "gender", "occupation", "zip_code")
        for parts, where in _rows(directory / "u.user", "|", columns=5):
            users[_nonempty(parts[0], "user id", where)] = dict(zip(keys, parts[1:], strict=True))
    return _assemble("ml-100k", items, events, users, rating_threshold)


def _ml100k_genres(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ML100K_GENRES
    names = [parts[0] for parts, _ in _rows(path, "|", encoding="latin-1") if parts and parts[0]]
    return tuple(names) or ML100K_GENRES


def _ml100k_item(parts: list[str], genres: tuple[str, ...], where: str) -> _Item:
    if len(parts) < 5 + len(genres):
        raise DataError(f"{where}: expected {5 + len(genres)} '|'-separated fields, got {len(parts)}")
    flags = parts[5 : 5 + len(genres)]
    if any(f not in ("0", "1") for f in flags):
        raise DataError(f"{where}: genre flags must be 0 or 1, got {flags}")
    item_genres = tuple(g for g, f in zip(genres, flags, strict=True) if f == "1")
    title = parts[1].strip()
    return _Item(_nonempty(parts[0], "item id", where), title, _text(title, item_genres), item_genres)


def load_recbole(directory: Path, *, rating_threshold: float | None = None) -> Dataset:
    """RecBole atomic files <name>.inter/.item/.user: tab-separated, typed headers field:type."""
    inter = sorted(directory.glob("*.inter"))
    if len(inter) != 1:
        raise DataError(f"{directory}: expected exactly one *.inter file, found {len(inter)}")
    stem = inter[0].with_suffix("")
    items = [_recbole_item(row, where) for row, where in _atomic(stem.with_suffix(".item"))]
    events = []
    for row, where in _atomic(inter[0]):
        parts = [row.get("user_id", ""), row.get("item_id", ""), row.get("timestamp", "0"),
                 row.get("rating", "")]
        events.append(_event(parts, (0, 1, 2, 3), where))
    users: dict[str, dict[str, str]] = {}
    if stem.with_suffix(".user").is_file():
        for row, where in _atomic(stem.with_suffix(".user")):
            uid = _nonempty(row.pop("user_id", ""), "user_id", where)
            users[uid] = row
    return _assemble(stem.name, items, events, users, rating_threshold)


def _recbole_item(row: dict[str, str], where: str) -> _Item:
    item_id = _nonempty(row.get("item_id", ""), "item_id", where)
    title = next((row[k] for k in ("movie_title", "title", "name") if row.get(k)), item_id)
    year = row.get("release_year", "").strip()
    title = f"{title} ({year})" if year and not title.endswith(f"({year})") else title
    genres = tuple(row.get("class", row.get("genre", "")).split())
    extra = [v for k, v in row.items() if k not in ("item_id", "movie_title", "title", "name",
                                                       "release_year", "class", "genre") and v]
    return _Item(item_id, title, _text(title, genres, extra), genres)


def _atomic(path: Path) -> Iterator[tuple[dict[str, str], str]]:
    rows = _rows(path, "\t")
    try:
        header, _ = next(rows)
    except StopIteration:
        raise DataError(f"{path}:1: empty file, expected a header such as user_id:token") from None
    names = [h.split(":", 1)[0] for h in header]
    for parts, where in rows:
        if len(parts) != len(names):
            raise DataError(f"{where}: expected {len(names)} tab-separated fields, got {len(parts)}")
        yield dict(zip(names, parts, strict=True)), where


def load_csv(
    interactions: Path, items: Path, users: Path | None = None, *, rating_threshold: float | None = None
) -> Dataset:
    """Generic CSV: interactions user_id,item_id,timestamp[,rating]; items item_id,title[,text...]."""
    item_list = []
    for row, where in _csv_rows(items, required=("item_id", "title")):
        extra = [v for k, v in row.items() if k not in ("item_id", "title", "genres") and v]
        genres = tuple(g.strip() for g in row.get("genres", "").replace("|", ",").split(",") if g.strip())
        title = row["title"].strip()
        item_list.append(_Item(_nonempty(row["item_id"], "item_id", where), title,
                               _text(title, genres, extra), genres))
    events = []
    for row, where in _csv_rows(interactions, required=("user_id", "item_id", "timestamp")):
        parts = [row["user_id"], row["item_id"], row["timestamp"], row.get("rating", "")]
        events.append(_event(parts, (0, 1, 2, 3), where))
    user_attrs: dict[str, dict[str, str]] = {}
    if users is not None:
        for row, where in _csv_rows(users, required=("user_id",)):
            uid = _nonempty(row.pop("user_id"), "user_id", where)
            user_attrs[uid] = row
    return _assemble(interactions.parent.name or "csv", item_list, events, user_attrs, rating_threshold)


def _csv_rows(path: Path, *, required: Sequence[str]) -> Iterator[tuple[dict[str, str], str]]:
    text = _read(path, "utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}:1: empty file, expected a header with {', '.join(required)}")
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} (has {', '.join(header)})")
    for parts in reader:
        where = f"{path}:{reader.line_num}"
        if not parts or all(not p.strip() for p in parts):
            continue
        if len(parts) != len(header):
            raise DataError(f"{where}: expected {len(header)} comma-separated fields, got {len(parts)}")
        yield dict(zip(header, (p.strip() for p in parts), strict=True)), where


# --- shared parsing helpers -----------------------------------------------------------------


def _read(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid {encoding} text") from None


def _rows(
    path: Path, sep: str, *, encoding: str = "utf-8", columns: int | None = None
) -> Iterator[tuple[list[str], str]]:
    for n, line in enumerate(_read(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        where = f"{path}:{n}"
        if columns is not None and len(parts) != columns:
            raise DataError(f"{where}: expected {columns} {sep!r}-separated fields, got {len(parts)}")
        yield parts, where


def _event(parts: Sequence[str], order: tuple[int, int, int, int], where: str) -> _Event:
    user, item, ts, rating = (parts[i] if i < len(parts) else "" for i in order)
    try:
        timestamp = int(float(ts)) if "." in ts else int(ts)
    except ValueError:
        raise DataError(f"{where}: timestamp {ts!r} is not an integer") from None
    value: float | None = None
    if rating.strip():
        try:
            value = float(rating)
        except ValueError:
            raise DataError(f"{where}: rating {rating!r} is not a number") from None
    return _Event(_nonempty(user, "user id", where), _nonempty(item, "item id", where), timestamp,
                  value, where)


def _nonempty(value: str, what: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise DataError(f"{where}: empty {what}")
    return value


def _text(title: str, genres: Sequence[str], extra: Sequence[str] = ()) -> str:
    parts = [title]
    if genres:
        parts.append(", ".join(genres))
    parts.extend(extra)
    return " | ".join(parts)


def _assemble(
    name: str,
    items: Sequence[_Item],
    events: Sequence[_Event],
    users: Mapping[str, Mapping[str, str]],
    rating_threshold: float | None,
) -> Dataset:
    index: dict[str, int] = {}
    for n, item in enumerate(items):
        if item.item_id in index:
            raise DataError(f"{name}: duplicate item id {item.item_id!r} in the item file")
        index[item.item_id] = n
    per_user: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for order, ev in enumerate(events):
        if ev.item not in index:
            raise DataError(f"{ev.where}: item id {ev.item!r} is not in the item file")
        if rating_threshold is not None:
            if ev.rating is None:
                raise DataError(f"{ev.where}: data.rating_threshold is set but there is no rating")
            if ev.rating < rating_threshold:
                continue
        per_user[ev.user].append((ev.timestamp, order, index[ev.item]))
    histories = {u: _dedupe(sorted(rows)) for u, rows in per_user.items()}
    user_ids = tuple(sorted(histories, key=_natural))
    return Dataset(
        name=name,
        item_ids=tuple(i.item_id for i in items),
        item_titles=tuple(i.title for i in items),
        item_texts=tuple(i.text for i in items),
        item_genres=tuple(i.genres for i in items),
        user_ids=user_ids,
        user_attributes={u: dict(users.get(u, {})) for u in user_ids},
        histories={u: histories[u] for u in user_ids},
        _index=index,
    )


def _dedupe(rows: Sequence[tuple[int, int, int]]) -> tuple[int, ...]:
    seen: set[int] = set()
    out = []
    for _, _, item in rows:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return tuple(out)


def _natural(key: str) -> tuple[int, int | str]:
    return (0, int(key)) if key.isdigit() else (1, key)


def _renamed(dataset: Dataset, name: str) -> Dataset:
    from dataclasses import replace

    return replace(dataset, name=name)


# --- split ---------------------------------------------------------------------------------


def leave_one_out(dataset: Dataset) -> Split:
    """Per user, chronological: last -> test, second to last -> valid, the rest -> train.

    Users with fewer than 3 interactions keep everything in train and have no valid/test item.
    """
    train, valid, test = {}, {}, {}
    for user, seq in dataset.histories.items():
        if len(seq) < 3:
            train[user] = tuple(seq)
            continue
        train[user], valid[user], test[user] = tuple(seq[:-2]), seq[-2], seq[-1]
    return Split(train, valid, test)


def client_splits(split: Split, assignment: Mapping[str, str]) -> dict[str, Split]:
    """The split restricted to each client's users."""
    by_client: dict[str, list[str]] = defaultdict(list)
    for user in split.train:
        by_client[assignment[user]].append(user)
    return {
        c: Split(
            train={u: split.train[u] for u in us},
            valid={u: split.valid[u] for u in us if u in split.valid},
            test={u: split.test[u] for u in us if u in split.test},
        )
        for c, us in sorted(by_client.items())
    }


# --- partitions ----------------------------------------------------------------------------


def partition_users(
    dataset: Dataset,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    attribute: str | None = None,
    mapping_file: Path | None = None,
    zip_prefix: int = 1,
) -> dict[str, str]:
    """Assign every user to exactly one client, deterministically by seed."""
    users = list(dataset.user_ids)
    if scheme == "mapping":
        if mapping_file is None:
            raise ConfigError("partition scheme 'mapping' needs a mapping file (user_id,client)")
        return _mapping(users, mapping_file)
    if scheme == "attribute":
        return _by_attribute(dataset, users, attribute, num_clients, zip_prefix)
    if scheme not in PARTITION_SCHEMES:
        allowed = ", ".join(PARTITION_SCHEMES)
        raise ConfigError(f"partition scheme {scheme!r} is not known; choose one of: {allowed}")
    if not 1 <= num_clients <= len(users):
        raise ConfigError(f"num_clients={num_clients} must be between 1 and the {len(users)} users")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(users))
        return {users[j]: f"client-{n % num_clients}" for n, j in enumerate(order)}
    if alpha <= 0:
        raise ConfigError(f"dirichlet alpha={alpha} must be > 0")
    labels = _labels(dataset, users, attribute)
    return _dirichlet(users, labels, num_clients, alpha, rng)


def _labels(dataset: Dataset, users: Sequence[str], attribute: str | None) -> list[str]:
    if attribute in (None, "genre"):
        out = []
        for u in users:
            counts = Counter(g for i in dataset.histories[u] for g in dataset.item_genres[i])
            out.append(min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else "none")
        return out
    missing = [u for u in users if attribute not in dataset.user_attributes.get(u, {})]
    if missing:
        raise ConfigError(
            f"user attribute {attribute!r} is missing for user {missing[0]} "
            f"(and {len(missing) - 1} more); the user file must have it for every user"
        )
    return [dataset.user_attributes[u][attribute] for u in users]


def _dirichlet(
    users: Sequence[str], labels: Sequence[str], k: int, alpha: float, rng: np.random.Generator
) -> dict[str, str]:
    out: dict[str, int] = {}
    for label in sorted(set(labels)):
        members = [u for u, lab in zip(users, labels, strict=True) if lab == label]
        members = [members[j] for j in rng.permutation(len(members))]
        cuts = (np.cumsum(rng.dirichlet([alpha] * k)) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(np.array(members, dtype=object), cuts)):
            out.update({u: client for u in part})
    sizes = Counter(out.values())
    for client in range(k):  # no empty client: take a user from the largest one
        if sizes[client] == 0:
            donor = max(range(k), key=lambda c: (sizes[c], -c))
            user = sorted((u for u, c in out.items() if c == donor), key=_natural)[0]
            out[user], sizes[donor], sizes[client] = client, sizes[donor] - 1, 1
    return {u: f"client-{c}" for u, c in out.items()}


def _by_attribute(
    dataset: Dataset, users: Sequence[str], attribute: str | None, num_clients: int, zip_prefix: int
) -> dict[str, str]:
    if not attribute:
        raise ConfigError("partition scheme 'attribute' needs partition.attribute, e.g. occupation")
    values = _labels(dataset, users, attribute)
    if attribute == "zip_code":
        values = [v[:zip_prefix] for v in values]
    groups: dict[str, list[str]] = defaultdict(list)
    for u, v in zip(users, values, strict=True):
        groups[v].append(u)
    names = {v: v for v in groups}
    while num_clients and len(groups) > num_clients:  # merge the two smallest groups
        a, b = sorted(groups, key=lambda g: (len(groups[g]), g))[:2]
        merged = "+".join(sorted([names.pop(a), names.pop(b)]))
        groups[merged] = groups.pop(a) + groups.pop(b)
        names[merged] = merged
    return {u: names[g] for g, us in groups.items() for u in us}


def _mapping(users: Sequence[str], path: Path) -> dict[str, str]:
    known = set(users)
    out: dict[str, str] = {}
    for row, where in _csv_rows(path, required=("user_id", "client")):
        user = _nonempty(row["user_id"], "user_id", where)
        if user not in known:
            raise DataError(f"{where}: user {user!r} is not in the data set")
        out[user] = _nonempty(row["client"], "client", where)
    missing = [u for u in users if u not in out]
    if missing:
        raise DataError(f"{path}: {len(missing)} users have no client, e.g. {', '.join(missing[:5])}")
    return out
