from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recsvc.config import DAY
from training.data import load_dataset
from training.synth import CATEGORIES, DEFAULT_START, generate, main, write_dataset

REPO = Path(__file__).resolve().parents[2]  # `python -m training...` runs from the repo root

SIZES = {"n_users": 400, "n_items": 300, "n_interactions": 12_000, "days": 21, "seed": 3}


@pytest.fixture(scope="module")
def shop() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate(**SIZES)


def test_same_seed_gives_identical_data(shop) -> None:
    again = generate(**SIZES)
    assert_frame_equal(shop[0], again[0])
    assert_frame_equal(shop[1], again[1])


def test_other_seed_gives_other_data(shop) -> None:
    other = generate(**{**SIZES, "seed": 4})
    assert not shop[0].equals(other[0])
    assert not shop[1].equals(other[1])


def test_sizes_are_exact_for_rows_and_items(shop) -> None:
    interactions, items = shop
    assert interactions.height == SIZES["n_interactions"]
    assert items.height == SIZES["n_items"]
    assert items["item_id"].n_unique() == SIZES["n_items"]
    assert 0.5 * SIZES["n_users"] < interactions["user_id"].n_unique() <= SIZES["n_users"]


def test_timestamps_are_sorted_inside_the_window(shop) -> None:
    ts = shop[0]["timestamp"]
    assert ts.is_sorted()
    assert ts.min() >= DEFAULT_START
    assert ts.max() < DEFAULT_START + SIZES["days"] * DAY


def test_all_funnel_events_occur_with_decreasing_frequency(shop) -> None:
    counts = dict(shop[0]["event"].value_counts().iter_rows())
    assert counts["view"] > counts["click"] > counts["cart"] > counts["purchase"] > 0


def test_items_have_text_and_attribute_columns(shop) -> None:
    items = shop[1]
    assert items.columns == ["item_id", "title", "description", "category", "brand", "price"]
    assert items["title"].str.len_chars().min() > 10
    assert items["description"].str.len_chars().min() > 30
    assert 10 <= items["category"].n_unique() <= 20
    assert (items["price"] > 0).all()


def test_item_text_names_its_category(shop) -> None:
    items = shop[1]
    for title, description, category in items.select("title", "description", "category").iter_rows():
        text = f"{title} {description}".lower()
        assert any(word.rstrip("s") in text for word in category.split()), (title, category)


def test_titles_have_varied_vocabulary(shop) -> None:
    words = {w for title in shop[1]["title"] for w in title.lower().split()}
    assert len(words) > 150
    assert shop[1]["title"].n_unique() > 0.8 * SIZES["n_items"]


def test_users_concentrate_on_a_few_categories(shop) -> None:
    """Interest signal: a text model can only learn it if users stick to related items."""
    interactions, items = shop
    joined = interactions.join(items.select("item_id", "category"), on="item_id")
    per_user = (
        joined.group_by("user_id", "category")
        .len()
        .group_by("user_id")
        .agg(top_share=pl.col("len").max() / pl.col("len").sum(), total=pl.col("len").sum())
    )
    assert per_user.filter(pl.col("total") >= 10)["top_share"].mean() > 0.4  # uniform would be ~0.05


def test_popularity_is_skewed(shop) -> None:
    counts = shop[0]["item_id"].value_counts()["count"].sort(descending=True)
    top_tenth = counts.head(SIZES["n_items"] // 10).sum()
    assert top_tenth / counts.sum() > 0.35


def test_only_consumables_are_repurchased(shop) -> None:
    interactions, items = shop
    consumable = [c.name for c in CATEGORIES if c.consumable]
    purchases = interactions.filter(pl.col("event") == "purchase").join(items, on="item_id")
    repeats = purchases.group_by("user_id", "item_id", "category").len().filter(pl.col("len") > 1)
    assert repeats.height > 20
    assert repeats["category"].is_in(consumable).all()


def test_complementary_items_are_bought_in_the_same_session(shop) -> None:
    interactions, items = shop
    goes_with = {(c.name, g) for c in CATEGORIES for g in c.goes_with}
    purchases = (
        interactions.filter(pl.col("event") == "purchase")
        .join(items.select("item_id", "category"), on="item_id")
        .select("user_id", "timestamp", "category")
    )
    pairs = purchases.join(purchases, on="user_id", suffix="_b").filter(
        (pl.col("timestamp_b") - pl.col("timestamp")).is_between(1, 600)
    )
    complementary = sum((a, b) in goes_with for a, b in pairs.select("category", "category_b").iter_rows())
    assert complementary > 0.3 * pairs.height > 0


def test_new_items_appear_only_late_and_some_never(shop) -> None:
    interactions, items = shop
    first_seen = interactions.group_by("item_id").agg(pl.col("timestamp").min())
    late = first_seen.filter(pl.col("timestamp") >= DEFAULT_START + int(0.8 * SIZES["days"] * DAY))
    assert late.height > 0
    never = items.join(first_seen, on="item_id", how="anti")
    assert never.height > 0


def test_tiny_catalogue_smaller_than_category_list_works() -> None:
    interactions, items = generate(n_users=5, n_items=4, n_interactions=50, days=3, seed=1)
    assert interactions.height == 50
    assert set(interactions["item_id"]) <= set(items["item_id"])


def test_seed_cannot_be_passed_positionally() -> None:
    with pytest.raises(TypeError):
        generate(10, 10, 100, 42)  # type: ignore[misc]


def test_non_positive_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_items must be a positive integer"):
        generate(n_users=5, n_items=0, n_interactions=50, days=3)


def test_written_csv_and_parquet_load_to_the_same_tables(tmp_path: Path) -> None:
    small = {"n_users": 50, "n_items": 40, "n_interactions": 800, "days": 7, "seed": 2}
    a = load_dataset(write_dataset(tmp_path / "p", **small))
    b = load_dataset(write_dataset(tmp_path / "c", **small, fmt="csv"))
    assert_frame_equal(a.interactions, b.interactions)
    assert_frame_equal(a.items, b.items)
    assert a.report.dropped == {}


def test_writing_one_format_removes_the_other(tmp_path: Path) -> None:
    small = {"n_users": 20, "n_items": 20, "n_interactions": 100, "days": 3}
    write_dataset(tmp_path, **small, fmt="csv")
    write_dataset(tmp_path, **small, fmt="parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["interactions.parquet", "items.parquet"]


def test_cli_writes_a_loadable_folder(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), "--users", "30", "--items", "25", "--interactions", "300", "--days", "5"]
    assert main([*args, "--format", "csv"]) == 0
    assert load_dataset(tmp_path).interactions.height == 300


def test_cli_rejects_bad_sizes_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.synth", "--out", str(tmp_path), "--items", "0"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "argument --items: must be a positive integer, got '0'" in proc.stderr  # the flag, not n_items
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--users", "--items", "--interactions", "--days"])
def test_cli_size_errors_name_the_flag(flag: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), flag, "-3"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be a positive integer, got '-3'" in capsys.readouterr().err


def test_cli_rejects_output_path_that_is_a_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["--out", str(target), "--interactions", "10"]) == 2
    assert "not a directory" in capsys.readouterr().err
