"""Parsers, validation errors that name file and line, leave-one-out, client partitions."""

from collections import Counter
from pathlib import Path

import pytest
from fedrec.common.assets import default_cache_dir, resolve_dataset
from fedrec.common.data import (
    Dataset,
    Split,
    client_datasets,
    dominant_genre,
    leave_one_out,
    load_csv,
    load_dataset,
    partition_users,
    sample_users,
)
from fedrec.common.errors import ConfigError, DataError

FLAGS = {"none": ["0"] * 19, "action": ["0", "1"] + ["0"] * 17, "comedy": ["0"] * 5 + ["1"] + ["0"] * 13}
U_DATA = [  # user item rating timestamp
    "1\t1\t5\t300",
    "1\t2\t3\t100",
    "1\t3\t4\t200",
    "2\t3\t1\t50",
    "1\t4\t4\t300",  # same second as item 1: stays after it (file order)
]


def write_ml100k(root: Path, data_lines: list[str] | None = None) -> Path:
    """Four movies (one never rated), a latin-1 title, two users with attributes."""
    root.mkdir(parents=True, exist_ok=True)
    movies = [("1", "Toy Story (1995)", "none"), ("2", "Caf\xe9 Society (1995)", "action"),
              ("3", "Heat (1995)", "action"), ("4", "Babe (1995)", "comedy"), ("5", "Nixon (1995)", "none")]
    item_lines = [f"{i}|{t}|01-Jan-1995||http://x|{'|'.join(FLAGS[g])}\n" for i, t, g in movies]
    (root / "u.item").write_bytes("".join(item_lines).encode("latin-1"))
    (root / "u.data").write_text("\n".join(data_lines if data_lines is not None else U_DATA) + "\n")
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def write_recbole(root: Path, inter: str, item: str | None = None, user: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "toy.inter").write_text(inter)
    (root / "toy.item").write_text(item if item is not None else (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tstudio:token\tplot:token_seq\n"
        "a\tAlien\t1979\tHorror Sci-Fi\tFox\tIn space no one hears\n"
        "b\tBabe\t1995\tComedy\tUniversal\t\n"
        "c\tunknown\t\t\t\t\n"
    ))
    if user is not None:
        (root / "toy.user").write_text(user)
    return root


RECBOLE_INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\ta\t4\t10.0\n7\tb\t5\t5\n8\ta\t1\t3\n"


def write_csv(root: Path, interactions: str, items: str = "item_id,title\ni1,Up\ni2,Heat\ni3,Fargo\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "items.csv").write_text(items)
    (root / "interactions.csv").write_text(interactions)
    return root


def make_dataset(n_users: int, *, genres: tuple[str, ...] = ("Action", "Comedy", "Drama")) -> Dataset:
    """n users, user u watches only items of genre u % len(genres); occupation follows the genre."""
    items = [f"m{g}{j}" for g in range(len(genres)) for j in range(3)]
    histories = {str(u): tuple(3 * (u % len(genres)) + j for j in range(3)) for u in range(n_users)}
    return Dataset(
        name="toy",
        item_ids=tuple(items),
        item_titles=tuple(items),
        item_texts=tuple(items),
        user_ids=tuple(histories),
        user_attributes={str(u): {"occupation": f"job{u % len(genres)}", "zip_code": f"{u % 4}{u % 7}123"}
                         for u in range(n_users)},
        histories=histories,
        item_genres=tuple((genres[int(i[1])],) for i in items),
    )


def sizes(assignment: dict[str, str]) -> Counter[str]:
    return Counter(assignment.values())


# --- GroupLens ml-100k ---------------------------------------------------------------------


def test_ml100k_titles_latin1_genres_and_chronological_ties(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml")

    ds = load_dataset(root)

    assert ds.name == "ml-100k" and ds.item_ids == ("1", "2", "3", "4", "5")
    assert ds.item_titles[1] == "Café Society (1995)"
    assert ds.item_texts[0] == "Toy Story (1995)" and ds.item_texts[3] == "Babe (1995) | Comedy"
    assert ds.item_genres[2] == ("Action",) and ds.item_genres[4] == ()
    assert ds.histories == {"1": (1, 2, 0, 3), "2": (2,)}  # t=100, 200, 300, 300 (file order)
    assert ds.user_ids == ("1", "2") and ds.num_interactions == 5
    assert ds.user_attributes["2"] == {"age": "53", "gender": "F", "occupation": "other", "zip_code": "94043"}
    assert ds.item_index("5") == 4  # never rated, still in the catalogue
    with pytest.raises(DataError, match="unknown item id '99'"):
        ds.item_index("99")


def test_ml100k_genre_names_from_u_genre_and_missing_u_user(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml")
    names = [f"G{n}" for n in range(19)]
    (root / "u.genre").write_text("".join(f"{g}|{n}\n" for n, g in enumerate(names)) + "\n")
    (root / "u.user").unlink()

    ds = load_dataset(root)

    assert ds.item_genres[1] == ("G1",) and ds.item_texts[3] == "Babe (1995) | G5"
    assert ds.user_attributes == {"1": {}, "2": {}}


def test_rating_threshold_keeps_high_ratings_only(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml")

    ds = load_dataset(root, rating_threshold=4)

    assert ds.histories == {"1": (2, 0, 3)}  # rating 3 (item 2) and user 2's rating 1 dropped
    assert ds.user_ids == ("1",) and len(ds.item_ids) == 5


@pytest.mark.parametrize(
    ("lines", "line_no", "problem"),
    [
        (["1\t1\t5\t300", "1\t2\t3"], 2, "expected 4 '\\\\t'-separated fields, got 3"),
        (["1\t1\t5\t300", "", "1\t2\t3\t1\t9"], 3, "expected 4 .* got 5"),  # blank lines still count
        (["1\t1\t5\tyesterday"], 1, "timestamp 'yesterday' is not an integer"),
        (["1\t1\t5\t3", "1\t1\t5\t1.5"], 2, "timestamp '1.5' is not an integer"),
        (["1\t1\t5\t3", "1\t1\tgood\t3"], 2, "rating 'good' is not a number"),
        (["1\t1\t5\t3", "1\t2\t5\t4", "1\t77\t5\t3"], 3, "item id '77' is not in the item file"),
        (["\t1\t5\t3"], 1, "empty user id"),
        (["1\t \t5\t3"], 1, "empty item id"),
    ],
)
def test_malformed_u_data_names_file_line_and_problem(
    tmp_path: Path, lines: list[str], line_no: int, problem: str
) -> None:
    root = write_ml100k(tmp_path / "ml", lines)

    with pytest.raises(DataError, match=rf"u\.data:{line_no}: {problem}"):
        load_dataset(root)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("2|Again (1995)|x||u|" + "|".join(["0"] * 19), "duplicate item id '2' \\(first on line 2\\)"),
        ("6|Short (1995)|x||u|0|1", "expected 24 '\\|'-separated fields"),
        ("6|Flag (1995)|x||u|" + "|".join(["2"] * 19), "genre flags must be 0 or 1"),
    ],
)
def test_malformed_u_item_names_line(tmp_path: Path, line: str, problem: str) -> None:
    root = write_ml100k(tmp_path / "ml")
    with (root / "u.item").open("a", encoding="latin-1") as f:
        f.write(line + "\n")

    with pytest.raises(DataError, match=rf"u\.item:6: {problem}"):
        load_dataset(root)


# --- RecBole atomic files ------------------------------------------------------------------


def test_recbole_titles_years_text_and_attributes(tmp_path: Path) -> None:
    root = write_recbole(tmp_path / "rb", RECBOLE_INTER, user="user_id:token\tage:token\tgender:token\n7\t30\tF\n")

    ds = load_dataset(root)

    assert ds.name == "toy"
    assert ds.item_titles == ("Alien (1979)", "Babe (1995)", "unknown")
    # token_seq fields join the text, the plain token field (studio) does not
    assert ds.item_texts == ("Alien (1979) | Horror, Sci-Fi | In space no one hears", "Babe (1995) | Comedy",
                             "unknown")
    assert ds.item_genres == (("Horror", "Sci-Fi"), ("Comedy",), ())
    assert ds.histories == {"7": (1, 0), "8": (0,)}
    assert ds.user_attributes == {"7": {"age": "30", "gender": "F"}, "8": {}}


@pytest.mark.parametrize(
    ("inter", "threshold", "pattern"),
    [
        ("user_id:token\titem_id:token\ttimestamp:float\n1\ta\t1\n1\ta\n", None, r"toy\.inter:3: expected 3"),
        ("user_id:token\titem_id:token\n1\ta\n", None, r"toy\.inter:1: header lacks column\(s\) timestamp"),
        ("user_id:token\titem_id:token\ttimestamp:float\n1\ta\t1\n", 4.0, r"toy\.inter:1: .*no rating column"),
        ("", None, r"toy\.inter:1: empty file"),
    ],
)
def test_recbole_errors(tmp_path: Path, inter: str, threshold: float | None, pattern: str) -> None:
    root = write_recbole(tmp_path / "rb", inter)

    with pytest.raises(DataError, match=pattern):
        load_dataset(root, rating_threshold=threshold)


def test_recbole_needs_exactly_one_inter_file(tmp_path: Path) -> None:
    root = write_recbole(tmp_path / "rb", RECBOLE_INTER)
    (root / "other.inter").write_text(RECBOLE_INTER)

    with pytest.raises(DataError, match="exactly one <name>.inter file, found other.inter, toy.inter"):
        load_dataset(root)


# --- generic CSV ---------------------------------------------------------------------------


def test_csv_text_ties_first_occurrence_and_users(tmp_path: Path) -> None:
    items = 'item_id,title,genres,plot\ni1,Up,Animation|Family,"A house, flying"\ni2,Heat,Crime,\ni3,Fargo,,\n'
    inter = "user_id,item_id,timestamp,rating\nu,i2,5,4\nu,i1,5,2\nu,i3,9,5\nu,i1,1,5\nv,i3,2,5\n"
    root = write_csv(tmp_path / "shop", inter, items)
    (root / "users.csv").write_text("user_id,region\nu,north\n")

    ds = load_dataset(root)
    high = load_dataset(root, rating_threshold=4.5)

    assert ds.name == "shop"
    assert ds.item_texts == ("Up | Animation, Family | A house, flying", "Heat | Crime", "Fargo")
    # i1 first seen at t=1 (line 5), i2 and the repeat of i1 share t=5: file order, repeat dropped
    assert ds.histories == {"u": (0, 1, 2), "v": (2,)}
    assert ds.user_attributes == {"u": {"region": "north"}, "v": {}}
    assert high.histories == {"u": (0, 2), "v": (2,)}  # i2 (4) and the t=5 i1 (2) dropped


@pytest.mark.parametrize(
    ("file", "content", "pattern"),
    [
        ("interactions.csv", "user_id,item\nu,i1\n", r"interactions\.csv:1: header lacks column\(s\) item_id, timestamp"),
        ("interactions.csv", "user_id,item_id,timestamp\nu,i1,1\nu,i1\n", r"interactions\.csv:3: expected 3 comma"),
        ("interactions.csv", "user_id,item_id,timestamp\nu,i1,1\n\nu,i9,2\n", r"interactions\.csv:4: item id 'i9'"),
        ("items.csv", "item_id,title\ni1,Up\ni2,Heat\ni1,Again\n", r"items\.csv:4: duplicate item id 'i1' \(first on line 2\)"),
        ("items.csv", "item_id,title\ni1,Up\ni2, \n", r"items\.csv:3: empty title"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, file: str, content: str, pattern: str) -> None:
    root = write_csv(tmp_path / "d", "user_id,item_id,timestamp\nu,i1,1\n")
    (root / file).write_text(content)

    with pytest.raises(DataError, match=pattern):
        load_dataset(root)


def test_csv_threshold_needs_ratings_and_invalid_utf8_is_located(tmp_path: Path) -> None:
    root = write_csv(tmp_path / "d", "user_id,item_id,timestamp\nu,i1,1\n")
    with pytest.raises(DataError, match=r"interactions\.csv:1: data\.rating_threshold=3 .*no rating column"):
        load_dataset(root, rating_threshold=3)
    (root / "items.csv").write_bytes(b"item_id,title\ni1,Up\ni2,Caf\xe9\n")
    with pytest.raises(DataError, match=r"items\.csv:3: not valid utf-8"):
        load_csv(root / "interactions.csv", root / "items.csv")


def test_format_detection_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"looked for .*u\.data.*\.inter.*interactions\.csv \+ items\.csv"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="choose one of auto, ml-100k, recbole, csv"):
        load_dataset(tmp_path, fmt="parquet")
    root = write_csv(tmp_path / "d", "user_id,item_id,timestamp\nu,i1,1\n")
    assert load_dataset(root, fmt="csv", name="mine").name == "mine"
    with pytest.raises(DataError, match=r"u\.item does not exist"):
        load_dataset(root, fmt="ml-100k")


# --- leave-one-out -------------------------------------------------------------------------


def test_leave_one_out_golden_and_short_users(tmp_path: Path) -> None:
    lines = ["1\t1\t5\t40", "1\t2\t5\t10", "1\t3\t5\t30", "1\t4\t5\t20", "1\t5\t5\t50",
             "2\t3\t5\t1", "2\t1\t5\t2", "3\t2\t5\t7", "3\t4\t5\t8", "3\t5\t5\t9"]
    ds = load_dataset(write_ml100k(tmp_path / "ml", lines))

    split = leave_one_out(ds)

    # user 1 chronological: items 2, 4, 3, 1, 5 -> indices 1, 3, 2, 0, 4
    assert split.train == {"1": (1, 3, 2), "2": (2, 0), "3": (1,)}
    assert split.valid == {"1": 0, "3": 3} and split.test == {"1": 4, "3": 4}
    assert leave_one_out(ds) == split


# --- partitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "attribute"), [("iid", None), ("dirichlet", None), ("dirichlet", "occupation"), ("attribute", "occupation")]
)
def test_partition_covers_every_user_once_and_is_deterministic(scheme: str, attribute: str | None) -> None:
    ds = make_dataset(30)

    a = partition_users(ds, scheme=scheme, num_clients=3, seed=4, alpha=0.3, attribute=attribute)
    b = partition_users(ds, scheme=scheme, num_clients=3, seed=4, alpha=0.3, attribute=attribute)

    assert a == b
    assert sorted(a) == sorted(ds.user_ids) and len(sizes(a)) == 3
    per_client = client_datasets(leave_one_out(ds), a)
    assert sorted(u for s in per_client.values() for u in s.train) == sorted(ds.user_ids)
    assert all(a[u] == c for c, s in per_client.items() for u in s.test)


def test_iid_round_robin_sizes_and_seed() -> None:
    ds = make_dataset(61)

    a = partition_users(ds, scheme="iid", num_clients=4, seed=0)

    assert sorted(sizes(a).values()) == [15, 15, 15, 16]
    assert set(a.values()) == {"client-0", "client-1", "client-2", "client-3"}
    assert a != partition_users(ds, scheme="iid", num_clients=4, seed=1)


def purity(ds: Dataset, assignment: dict[str, str]) -> float:
    """Mean share of each client's most common dominant genre (1.0: every client is one genre)."""
    genres: dict[str, list[str]] = {}
    for user, client in assignment.items():
        genres.setdefault(client, []).append(dominant_genre(ds, user))
    return sum(Counter(g).most_common(1)[0][1] / len(g) for g in genres.values()) / len(genres)


def test_dirichlet_small_alpha_skews_clients_large_alpha_does_not() -> None:
    ds = make_dataset(300)

    def mean_purity(alpha: float) -> float:
        runs = [partition_users(ds, scheme="dirichlet", num_clients=3, seed=s, alpha=alpha) for s in range(5)]
        return sum(purity(ds, r) for r in runs) / len(runs)

    assert mean_purity(0.05) > 0.8
    assert mean_purity(1000.0) < 0.45  # near the 1/3 of an iid split
    assert partition_users(ds, scheme="dirichlet", num_clients=3, seed=0, alpha=0.05) != partition_users(
        ds, scheme="dirichlet", num_clients=3, seed=1, alpha=0.05)


def test_dirichlet_never_leaves_a_client_empty_and_checks_num_clients() -> None:
    ds = make_dataset(12)

    for seed in range(10):
        a = partition_users(ds, scheme="dirichlet", num_clients=12, seed=seed, alpha=0.01)
        assert len(sizes(a)) == 12 and set(sizes(a).values()) == {1}
    with pytest.raises(ConfigError, match="num_clients=13 must be between 1 and the 12 users"):
        partition_users(ds, scheme="dirichlet", num_clients=13, seed=0)
    with pytest.raises(ConfigError, match="alpha=0"):
        partition_users(ds, scheme="dirichlet", num_clients=2, seed=0, alpha=0)


def test_attribute_groups_zip_prefix_and_merging() -> None:
    ds = make_dataset(28)  # zip codes start with u % 4; occupations job0..job2 (10, 9, 9 users)

    by_job = partition_users(ds, scheme="attribute", num_clients=0, seed=0, attribute="occupation")
    by_zip = partition_users(ds, scheme="attribute", num_clients=None, seed=0, attribute="zip_code")
    by_zip2 = partition_users(ds, scheme="attribute", num_clients=0, seed=0, attribute="zip_code", zip_prefix=2)
    merged = partition_users(ds, scheme="attribute", num_clients=2, seed=0, attribute="occupation")

    assert by_job["4"] == "job1" and sizes(by_job) == {"job0": 10, "job1": 9, "job2": 9}
    assert sizes(by_zip) == {"0": 7, "1": 7, "2": 7, "3": 7}
    assert by_zip2["9"] == "12" and len(sizes(by_zip2)) == 28
    assert sizes(merged) == {"job0": 10, "job1+job2": 18}  # the two smallest groups merged
    with pytest.raises(ConfigError, match="has only 3 values"):
        partition_users(ds, scheme="attribute", num_clients=4, seed=0, attribute="occupation")


def test_attribute_errors_name_the_attribute() -> None:
    ds = make_dataset(6)
    with pytest.raises(ConfigError, match="'income' is not in toy; available: occupation, zip_code"):
        partition_users(ds, scheme="attribute", num_clients=0, seed=0, attribute="income")
    attrs = dict(ds.user_attributes) | {"3": {}}
    patchy = Dataset(ds.name, ds.item_ids, ds.item_titles, ds.item_texts, ds.user_ids, attrs, ds.histories)
    with pytest.raises(DataError, match="missing for 1 users, e.g. 3"):
        partition_users(patchy, scheme="attribute", num_clients=0, seed=0, attribute="occupation")
    with pytest.raises(ConfigError, match="choose one of iid, dirichlet, attribute, mapping"):
        partition_users(ds, scheme="random", num_clients=2, seed=0)


def test_mapping_file_and_its_errors(tmp_path: Path) -> None:
    ds = make_dataset(3)
    mapping = tmp_path / "map.csv"
    mapping.write_text("user_id,client\n0,hospital-a\n1,hospital-b\n2,hospital-a\n")

    assert partition_users(ds, scheme="mapping", num_clients=0, seed=0, mapping_file=mapping) == {
        "0": "hospital-a", "1": "hospital-b", "2": "hospital-a"}
    for content, pattern in [
        ("user_id,client\n0,a\n99,b\n", r"map\.csv:3: user '99' is not in the data set"),
        ("user_id,client\n0,a\n1,b\n0,c\n", r"map\.csv:4: user '0' is listed twice"),
        ("user_id,client\n0,a\n", r"map\.csv: 2 users have no client, e.g. 1, 2"),
        ("0,a\n1,b\n2,a\n", r"map\.csv:1: header lacks column\(s\) user_id, client"),
    ]:
        mapping.write_text(content)
        with pytest.raises(DataError, match=pattern):
            partition_users(ds, scheme="mapping", num_clients=0, seed=0, mapping_file=mapping)


def test_client_datasets_restricts_split_and_needs_every_user() -> None:
    split = Split(train={"a": (0, 1), "b": (2,), "c": (1,)}, valid={"a": 3}, test={"a": 4})

    per_client = client_datasets(split, {"a": "x", "b": "y", "c": "x"})

    assert per_client == {"x": Split({"a": (0, 1), "c": (1,)}, {"a": 3}, {"a": 4}), "y": Split({"b": (2,)}, {}, {})}
    with pytest.raises(DataError, match="1 users have no client, e.g. c"):
        client_datasets(split, {"a": "x", "b": "y"})


# --- the real RecBole ml-100k --------------------------------------------------------------


@pytest.mark.slow
def test_real_ml100k_counts() -> None:
    """The default data set through common.assets (original source or the RecBole mirror)."""
    ds = load_dataset(resolve_dataset("ml-100k", cache_dir=default_cache_dir()))

    assert (len(ds.user_ids), len(ds.item_ids), ds.num_interactions) == (943, 1682, 100_000)
    assert ds.item_texts[0] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert ds.user_attributes["1"]["occupation"] == "technician"


def test_a_utf8_bom_in_a_csv_header_parses(tmp_path: Path) -> None:
    root = write_csv(tmp_path / "d", "user_id,item_id,timestamp\nu1,i1,1\nu1,i2,2\n")
    for name in ("interactions.csv", "items.csv"):
        (root / name).write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())

    dataset = load_dataset(root)

    assert dataset.user_ids == ("u1",) and dataset.item_ids == ("i1", "i2", "i3")


def test_an_empty_interactions_file_names_the_file(tmp_path: Path) -> None:
    root = write_ml100k(tmp_path / "ml", data_lines=[])
    with pytest.raises(DataError, match=r"u\.data: no interactions"):
        load_dataset(root)
    csv_root = write_csv(tmp_path / "csv", "user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match=r"interactions\.csv: no interactions"):
        load_dataset(csv_root)


def test_more_clients_than_users_names_the_setting(tmp_path: Path) -> None:
    from fedrec.client.local import simulated_clients
    from fedrec.common.config import load_config

    from tests.conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "tiny", users=24)
    dataset = load_dataset(data)
    split = sample_users(leave_one_out(dataset), 10, 0)
    cfg = load_config(None, ["fed.clients=20", "data.max_users=10"])

    with pytest.raises(ConfigError, match=r"fed\.clients=20 but only \d+ clients get any of the 10 users"):
        simulated_clients(cfg, dataset, split)
