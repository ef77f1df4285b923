from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from training.convert import ConversionError, _parser, convert_amazon, main
from training.data import DataValidationError, load_dataset

REPO = Path(__file__).resolve().parents[2]  # `python -m training...` runs from the repo root

REVIEWS = [
    {
        "reviewerID": "A1",
        "asin": "B001",
        "overall": 5.0,
        "unixReviewTime": 1_400_000_000,
        "reviewText": "great",
    },
    {"reviewerID": "A2", "asin": "B001", "overall": 3.0, "unixReviewTime": 1_400_000_100},
    {"reviewerID": "A1", "asin": "B002", "overall": 4.0, "unixReviewTime": 1_300_000_000},
    {"reviewerID": "A3", "asin": "B999", "overall": 1.0, "unixReviewTime": 1_400_000_200},  # no metadata
]
META_2018 = [
    {
        "asin": "B001",
        "title": "Trail Running Shoe",
        "description": ["Grippy <b>outsole</b>.", "Light &amp; fast."],
        "category": ["Sports", "Running", "Shoes"],
        "brand": "Stridex",
        "price": "$1,299.50",
    },
    {
        "asin": "B002",
        "title": "",
        "brand": "Caffio",
        "category": ["Grocery", "Coffee"],
        "price": ".a-box{color:red}",
    },
    {"asin": "B001", "title": "duplicate record", "category": ["x"]},
]


def write_lines(path: Path, records: list, python_literals: bool = False) -> Path:
    lines = [repr(r) if python_literals else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def converted(tmp_path: Path):
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    meta = write_lines(tmp_path / "meta.json", META_2018)
    report = convert_amazon(reviews, meta, tmp_path / "out")
    return report, load_dataset(tmp_path / "out")


def test_reviews_become_rating_interactions(converted) -> None:
    _, ds = converted
    rows = ds.interactions.select("user_id", "item_id", "timestamp", "event", "value").rows()
    assert rows == [
        ("A1", "B002", 1_300_000_000, "rating", 4.0),
        ("A1", "B001", 1_400_000_000, "rating", 5.0),
        ("A2", "B001", 1_400_000_100, "rating", 3.0),
    ]


def test_rating_weight_scales_with_stars(converted) -> None:
    _, ds = converted
    assert ds.interactions["weight"].to_list() == [16.0, 20.0, 12.0]  # rating weight 4 x stars


def test_metadata_becomes_items_with_clean_text(converted) -> None:
    _, ds = converted
    first = ds.items.filter(pl.col("item_id") == "B001").row(0, named=True)
    assert first["title"] == "Trail Running Shoe"
    assert first["description"] == "Grippy outsole. Light & fast."
    assert (first["category"], first["category_path"]) == ("Shoes", "Sports > Running > Shoes")
    assert (first["brand"], first["price"]) == ("Stridex", 1299.5)


def test_missing_title_is_built_from_brand_and_category(converted) -> None:
    report, ds = converted
    second = ds.items.filter(pl.col("item_id") == "B002").row(0, named=True)
    assert second["title"] == "Caffio Coffee"
    assert second["price"] is None
    assert report.products_title_fallback == 1


def test_report_counts_duplicates_and_reviews_without_product(converted) -> None:
    report, ds = converted
    assert (report.reviews_read, report.reviews_kept, report.reviews_unknown_item) == (4, 3, 1)
    assert (report.products_read, report.products_duplicate, report.items_written) == (3, 1, 2)
    assert ds.items.height == 2
    assert "duplicates skipped 1" in report.summary()


def test_2014_python_literal_metadata_in_gzip_is_read(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json.gz"
    record = {
        "asin": "B001",
        "title": "Yoga Mat",
        "categories": [["Sports", "Yoga"], ["Other"]],
        "price": 19.99,
    }
    with gzip.open(meta, "wt") as handle:
        handle.write(repr(record) + "\n")
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS[:1])
    convert_amazon(reviews, meta, tmp_path / "out", fmt="csv")
    items = load_dataset(tmp_path / "out").items
    assert items.select("title", "category", "price").row(0) == ("Yoga Mat", "Yoga", 19.99)


def test_malformed_review_line_is_reported_with_its_number(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.json"
    reviews.write_text(json.dumps(REVIEWS[0]) + "\n\n" + '{"reviewerID": "A2", "asin": \n')
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match=r"reviews\.json: line 3: not valid JSON"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_review_without_required_field_names_it(tmp_path: Path) -> None:
    reviews = write_lines(tmp_path / "reviews.json", [REVIEWS[0], {"reviewerID": "A2", "asin": "B001"}])
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match=r"line 2: missing field\(s\) unixReviewTime, overall"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_non_numeric_rating_is_reported(tmp_path: Path) -> None:
    reviews = write_lines(tmp_path / "reviews.json", [{**REVIEWS[0], "overall": "five"}])
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match="line 1: field overall is not a number: 'five'"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_json_array_line_is_not_an_object(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text("[1, 2]\n")
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    with pytest.raises(ConversionError, match=r"meta\.json: line 1: expected a JSON object, got list"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_reviews_matching_no_product_are_an_error(tmp_path: Path) -> None:
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS[3:])
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match="none of the 1 reviews match a product"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_cli_converts_and_writes_the_folder(tmp_path: Path) -> None:
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    meta = write_lines(tmp_path / "meta.json", META_2018)
    out = tmp_path / "out"
    assert main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["interactions.parquet", "items.parquet"]


def test_cli_accepts_verbose_after_the_subcommand(tmp_path: Path) -> None:
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    meta = write_lines(tmp_path / "meta.json", META_2018)
    argv = ["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "out"), "-v"]
    assert main(argv) == 0


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["-v", "amazon"], True),
        (["amazon", "--verbose"], True),
        (["amazon"], False),
    ],
)
def test_verbose_flag_is_read_before_or_after_the_subcommand(argv: list[str], verbose: bool) -> None:
    files = ["--reviews", "r.json", "--meta", "m.json", "--out", "o"]
    assert _parser().parse_args([*argv, *files]).verbose is verbose


def test_cli_reports_bad_input_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.json"
    reviews.write_text("not json at all\n")
    meta = write_lines(tmp_path / "meta.json", META_2018)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.convert",
            "amazon",
            "--reviews",
            str(reviews),
            "--meta",
            str(meta),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "reviews.json: line 1: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_missing_file(tmp_path: Path, capsys) -> None:
    meta = write_lines(tmp_path / "meta.json", META_2018)
    code = main(
        [
            "amazon",
            "--reviews",
            str(tmp_path / "absent.json"),
            "--meta",
            str(meta),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "absent.json: file not found" in capsys.readouterr().err


def test_binary_reviews_file_is_reported_as_not_utf8_text(tmp_path: Path) -> None:
    reviews = tmp_path / "reviews.parquet"  # a common slip: the canonical output passed as input
    reviews.write_bytes(b"PAR1\x15\x04\x15\x80\xff\xfe" + bytes(range(256)))
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match=r"reviews\.parquet: not UTF-8 text at or after line 1"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_gz_file_that_is_not_gzip_names_the_file(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json.gz"
    meta.write_text("plain text, not gzip\n")
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    with pytest.raises(ConversionError, match=r"meta\.json\.gz: not a gzip file"):
        convert_amazon(reviews, meta, tmp_path / "out")


def test_directory_given_as_a_file_is_named_as_a_directory(tmp_path: Path) -> None:
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(ConversionError, match="is a directory, not a file"):
        convert_amazon(tmp_path, meta, tmp_path / "out")


def test_cli_exits_2_on_a_binary_file(tmp_path: Path, capsys) -> None:
    reviews = tmp_path / "reviews.json"
    reviews.write_bytes(bytes(range(128, 256)))
    meta = write_lines(tmp_path / "meta.json", META_2018)
    code = main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "reviews.json" in capsys.readouterr().err


def test_out_path_that_is_a_file_is_refused_before_reading_the_inputs(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    # The inputs do not even exist: the --out problem is found first, without reading anything.
    with pytest.raises(ConversionError, match=r"out\.txt exists and is not a folder"):
        convert_amazon(tmp_path / "r.json", tmp_path / "m.json", out)
    assert out.read_text() == "keep me"


def test_output_that_fails_validation_leaves_the_out_folder_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "interactions.csv").write_text("earlier data\n")
    (out / "items.parquet").write_bytes(b"earlier items")
    mixed_units = [*REVIEWS[:2], {**REVIEWS[2], "unixReviewTime": 1_300_000_000_000}]  # one in ms
    reviews = write_lines(tmp_path / "reviews.json", mixed_units)
    meta = write_lines(tmp_path / "meta.json", META_2018)
    with pytest.raises(DataValidationError, match="mixes units"):
        convert_amazon(reviews, meta, out)
    assert sorted(p.name for p in out.iterdir()) == ["interactions.csv", "items.parquet"]
    assert (out / "interactions.csv").read_text() == "earlier data\n"
    assert (out / "items.parquet").read_bytes() == b"earlier items"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta.json",
        "out",
        "reviews.json",
    ]  # no staging left


def test_a_new_conversion_replaces_the_other_format_only_once_it_validates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "interactions.csv").write_text("earlier data\n")
    reviews = write_lines(tmp_path / "reviews.json", REVIEWS)
    meta = write_lines(tmp_path / "meta.json", META_2018)
    convert_amazon(reviews, meta, out)
    assert sorted(p.name for p in out.iterdir()) == ["interactions.parquet", "items.parquet"]
    assert load_dataset(out).interactions.height == 3
