"""Parsers, validation errors that name file and line, leave-one-out, partitions."""

from pathlib import Path

import pytest
from fedrec.common.data import client_splits, leave_one_out, load_dataset, partition_users
from fedrec.common.errors import ConfigError, DataError

REAL_ML100K = Path.home() / ".cache" / "fedrec" / "datasets" / "ml-100k" / "pypi-recbole-1.2.1"


def write_ml100k(root: Path, data_lines: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    flags = "|".join(["0"] * 19)
    action = "|".join(["0", "1"] + ["0"] * 17)
    (root / "u.item").write_bytes(
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
        f"2|Caf\xe9 Society (1995)|01-Jan-1995||http://x|{action}\n"
        f"3|Heat (1995)|01-Jan-1995||http://x|{action}\n".encode("latin-1")
    )
    lines = data_lines or ["1\t1\t5\t300", "1\t2\t3\t100", "1\t3\t4\t200", "2\t3\t1\t50"]
    (root / "u.data").write_text("\n".join(lines) + "\n")
    (root / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return root


def test_ml100k_parse_chronological_and_latin1(tmp_path: Path) -> None:
    ds = load_dataset(write_ml100k(tmp_path / "ml"))

    assert ds.name == "ml-100k"
    assert ds.item_titles[1] == "Café Society (1995)"
    assert ds.item_texts[2] == "Heat (1995) | Action"
    assert ds.histories["1"] == (1, 2, 0)  # by timestamp 100, 200, 300
    assert ds.user_attributes["2"]["occupation"] == "other"
    assert ds.item_index("3") == 2


def test_rating_threshold_and_unknown_item_id(tmp_path: Path) -> None:
    ds = load_dataset(write_ml100k(tmp_path / "ml"), rating_threshold=4)
    assert ds.histories["1"] == (2, 0) and "2" not in ds.histories
    with pytest.raises(DataError, match="unknown item id '99'"):
        ds.item_index("99")


@pytest.mark.parametrize(
    ("lines", "line_no", "needle"),
    [
        (["1\t1\t5\t300", "1\t2\t3"], 2, "expected 4"),
        (["1\t1\t5\t300", "1\t2\t3\t1\t9", "x"], 2, "expected 4"),
        (["1\t1\t5\tyesterday"], 1, "timestamp"),
        (["1\t1\t5\t3", "1\t1\tgood\t3"], 2, "rating"),
        (["1\t1\t5\t3", "1\t1\t5\t4", "1\t77\t5\t3"], 3, "'77' is not in the item file"),
        (["\t1\t5\t3"], 1, "empty user id"),
    ],
)
def test_malformed_lines_are_named(tmp_path: Path, lines: list[str], line_no: int, needle: str) -> None:
    root = write_ml100k(tmp_path / "ml", lines)
    with pytest.raises(DataError, match=rf"u\.data:{line_no}: .*{needle}"):
        load_dataset(root)


def test_recbole_atomic(tmp_path: Path) -> None:
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                                      "7\ta\t4\t10\n7\tb\t5\t5\n8\ta\t1\t3\n")
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                     "a\tAlien\t1979\tHorror Sci-Fi\nb\tBabe\t1995\tComedy\n")
    (tmp_path / "x.user").write_text("user_id:token\tage:token\n7\t30\n")

    ds = load_dataset(tmp_path)

    assert ds.item_titles == ("Alien (1979)", "Babe (1995)")
    assert ds.item_genres[0] == ("Horror", "Sci-Fi")
    assert ds.histories["7"] == (1, 0)
    assert ds.user_attributes["7"] == {"age": "30"} and ds.user_attributes["8"] == {}


def test_recbole_bad_line(tmp_path: Path) -> None:
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\ta\n")
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\na\tAlien\n")
    with pytest.raises(DataError, match=r"x\.inter:2: expected 3"):
        load_dataset(tmp_path)


def test_csv_format_errors_and_ties(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,title,genres,plot\ni1,Up,Animation,A house flies\ni2,Heat,Crime,\ni2b,Fargo,,\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu,i2,5\nu,i1,5\nu,i2,9\n")

    ds = load_dataset(tmp_path)

    assert ds.item_texts[0] == "Up | Animation | A house flies"
    assert ds.histories["u"] == (1, 0)  # equal timestamps keep file order; repeat dropped
    (tmp_path / "interactions.csv").write_text("user_id,item\nu,i1\n")
    with pytest.raises(DataError, match=r"interactions\.csv:1: header lacks column\(s\) item_id, timestamp"):
        load_dataset(tmp_path)
    (tmp_path / "items.csv").write_text("item_id,title\ni1,Up\ni1,Again\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu,i1,1\n")
    with pytest.raises(DataError, match="duplicate item id 'i1'"):
        load_dataset(tmp_path)


def test_unknown_directory_and_threshold_without_ratings(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no known data set format"):
        load_dataset(tmp_path)
    (tmp_path / "items.csv").write_text("item_id,title\ni1,Up\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp\nu,i1,1\n")
    with pytest.raises(DataError, match="interactions.csv:2: .*no rating"):
        load_dataset(tmp_path, rating_threshold=3)


def test_leave_one_out_golden(tmp_path: Path) -> None:
    ds = load_dataset(write_ml100k(tmp_path / "ml"))

    split = leave_one_out(ds)

    assert split.train["1"] == (1,) and split.valid["1"] == 2 and split.test["1"] == 0
    assert split.train["2"] == (2,) and "2" not in split.valid and "2" not in split.test


def _many_users(tmp_path: Path, n: int = 60) -> Path:
    lines = [f"{u}\t{1 + (u % 3)}\t5\t{u}" for u in range(1, n + 1)]
    lines += [f"{u}\t{1 + ((u + 1) % 3)}\t5\t{u + 1000}" for u in range(1, n + 1)]
    root = write_ml100k(tmp_path / "ml", lines)
    (root / "u.user").write_text("".join(f"{u}|{20 + u % 5}|M|{['a', 'b', 'c'][u % 3]}|{u % 9}0000\n" for u in range(1, n + 1)))
    return root


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "attribute"])
def test_partitions_cover_every_user_once_and_are_deterministic(tmp_path: Path, scheme: str) -> None:
    ds = load_dataset(_many_users(tmp_path))
    kwargs = {"scheme": scheme, "num_clients": 3, "seed": 4, "attribute": "occupation" if scheme == "attribute" else None}

    a = partition_users(ds, **kwargs)
    b = partition_users(ds, **kwargs)

    assert a == b and set(a) == set(ds.user_ids)
    assert len(set(a.values())) == 3
    split = leave_one_out(ds)
    assert sum(len(s.train) for s in client_splits(split, a).values()) == len(ds.user_ids)


def test_iid_sizes_and_seed(tmp_path: Path) -> None:
    ds = load_dataset(_many_users(tmp_path, 61))
    a = partition_users(ds, scheme="iid", num_clients=4, seed=0)
    sizes = sorted(list(a.values()).count(c) for c in set(a.values()))
    assert sizes[-1] - sizes[0] <= 1
    assert a != partition_users(ds, scheme="iid", num_clients=4, seed=1)


def test_dirichlet_alpha_controls_skew(tmp_path: Path) -> None:
    ds = load_dataset(_many_users(tmp_path, 60))

    def skew(alpha: float) -> float:
        part = partition_users(ds, scheme="dirichlet", num_clients=3, seed=0, alpha=alpha, attribute="occupation")
        per_client = {}
        for u, c in part.items():
            per_client.setdefault(c, []).append(ds.user_attributes[u]["occupation"])
        return sum(max(map(v.count, set(v))) / len(v) for v in per_client.values()) / len(per_client)

    assert skew(0.05) > skew(100.0)


def test_attribute_zip_prefix_and_merging(tmp_path: Path) -> None:
    ds = load_dataset(_many_users(tmp_path, 30))
    by_zip = partition_users(ds, scheme="attribute", num_clients=0, seed=0, attribute="zip_code")
    merged = partition_users(ds, scheme="attribute", num_clients=2, seed=0, attribute="zip_code")
    assert len(set(by_zip.values())) == 9
    assert len(set(merged.values())) == 2 and set(merged) == set(ds.user_ids)


def test_mapping_file_errors(tmp_path: Path) -> None:
    ds = load_dataset(_many_users(tmp_path, 3))
    mapping = tmp_path / "map.csv"
    mapping.write_text("user_id,client\n1,hospital-a\n2,hospital-b\n3,hospital-a\n")
    assert partition_users(ds, scheme="mapping", num_clients=0, seed=0, mapping_file=mapping)["2"] == "hospital-b"
    mapping.write_text("user_id,client\n1,a\n99,b\n")
    with pytest.raises(DataError, match=r"map\.csv:3: user '99'"):
        partition_users(ds, scheme="mapping", num_clients=0, seed=0, mapping_file=mapping)
    mapping.write_text("user_id,client\n1,a\n")
    with pytest.raises(DataError, match="2 users have no client"):
        partition_users(ds, scheme="mapping", num_clients=0, seed=0, mapping_file=mapping)
    with pytest.raises(ConfigError, match="choose one of"):
        partition_users(ds, scheme="random", num_clients=2, seed=0)


@pytest.mark.skipif(not REAL_ML100K.is_dir(), reason="the real ml-100k is not in the cache")
def test_real_movielens_counts() -> None:
    ds = load_dataset(REAL_ML100K)
    assert (len(ds.user_ids), len(ds.item_ids)) == (943, 1682)
    assert sum(len(h) for h in ds.histories.values()) == 100_000
    assert ds.item_titles[0] == "Toy Story (1995)"
