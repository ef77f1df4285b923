"""Convert public review datasets into the canonical data folder.

Amazon review "5-core" files (one review per line) plus product metadata (one product per line)
become `interactions` (event "rating", value = stars) and `items` (title, description, category,
brand, price), so the whole pipeline runs on them unchanged. Both the 2014 metadata (Python dict
literals, `categories` as a list of paths) and the 2018 metadata (JSON, `category` as one path,
prices like "$12.99") are read; `.gz` files are read directly.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import html
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import polars as pl
from tqdm import tqdm

from training.data import DataValidationError, load_dataset

log = logging.getLogger(__name__)

REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime", "overall")
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_PRICE = re.compile(r"\d+(?:\.\d+)?")
FALLBACK_TITLE_CHARS = 80


class ConversionError(ValueError):
    """Malformed input file; the message names the file and line."""


@dataclass
class ConversionReport:
    """Counts of what was read, kept and why anything was left out."""

    reviews_read: int = 0
    reviews_kept: int = 0
    reviews_unknown_item: int = 0
    products_read: int = 0
    products_duplicate: int = 0
    products_title_fallback: int = 0
    products_without_text: int = 0
    items_written: int = 0

    def summary(self) -> str:
        return (
            f"reviews: read {self.reviews_read:,}, kept {self.reviews_kept:,}, "
            f"dropped {self.reviews_unknown_item:,} whose product has no metadata\n"
            f"products: read {self.products_read:,}, duplicates skipped {self.products_duplicate:,}, "
            f"title built from other fields {self.products_title_fallback:,}, "
            f"dropped for having no text {self.products_without_text:,}, written {self.items_written:,}"
        )


def convert_amazon(
    reviews: str | Path, meta: str | Path, out: str | Path, fmt: str = "parquet"
) -> ConversionReport:
    """Write `out/interactions.<fmt>` and `out/items.<fmt>` from Amazon review + metadata files.

    Raises ConversionError for malformed lines (with the line number) and DataValidationError if the
    written folder does not validate.
    """
    if fmt not in ("parquet", "csv"):
        raise ConversionError(f"format must be 'parquet' or 'csv', got {fmt!r}")
    reviews, meta, out = Path(reviews), Path(meta), Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} exists and is not a folder")
    report = ConversionReport()
    items = read_amazon_meta(meta, report)
    interactions = read_amazon_reviews(reviews, report)
    known = interactions["item_id"].is_in(items["item_id"].implode())
    report.reviews_unknown_item = interactions.height - int(known.sum())
    interactions = interactions.filter(known)
    report.reviews_kept = interactions.height
    if interactions.height == 0:
        raise ConversionError(
            f"{reviews.name}: none of the {report.reviews_read:,} reviews match a product in {meta.name}"
        )
    _write_validated(out, fmt, {"interactions": interactions, "items": items})
    log.info("wrote %s\n%s", out, report.summary())
    return report


def _write_validated(out: Path, fmt: str, frames: dict[str, pl.DataFrame]) -> None:
    """Write the frames into a staging folder beside `out`, validate it as any input is, and only
    then move them into `out` (dropping a same-named file of the other format, which would make the
    folder ambiguous). Output that fails validation is removed and `out` is left as it was, so a
    failed conversion never costs the data already there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        for name, frame in frames.items():
            path = stage / f"{name}.{fmt}"
            frame.write_parquet(path) if fmt == "parquet" else frame.write_csv(path)
        load_dataset(stage)  # the converter's output must pass the same validation as any input
        out.mkdir(exist_ok=True)
        other = "csv" if fmt == "parquet" else "parquet"
        for name in frames:
            os.replace(stage / f"{name}.{fmt}", out / f"{name}.{fmt}")
            (out / f"{name}.{other}").unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_amazon_reviews(path: Path, report: ConversionReport) -> pl.DataFrame:
    """Reviews as canonical interactions: reviewerID, asin, unixReviewTime, overall -> rating events."""
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    stars: list[float] = []
    for line_no, record in read_json_lines(path, "reviews"):
        missing = [f for f in REVIEW_FIELDS if record.get(f) in (None, "")]
        if missing:
            raise ConversionError(f"{path.name}: line {line_no}: missing field(s) {', '.join(missing)}")
        users.append(str(record["reviewerID"]))
        items.append(str(record["asin"]))
        stamps.append(_number(record["unixReviewTime"], int, path, line_no, "unixReviewTime"))
        stars.append(_number(record["overall"], float, path, line_no, "overall"))
    report.reviews_read = len(users)
    if not users:
        raise ConversionError(f"{path.name}: no reviews found (file is empty)")
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "timestamp": pl.Series(stamps, dtype=pl.Int64),
            "event": ["rating"] * len(users),
            "value": pl.Series(stars, dtype=pl.Float64),
        }
    )


def read_amazon_meta(path: Path, report: ConversionReport) -> pl.DataFrame:
    """Product metadata as the item catalogue; first record wins for repeated asins."""
    rows: dict[str, dict[str, Any]] = {}
    for line_no, record in read_json_lines(path, "products"):
        report.products_read += 1
        asin = record.get("asin")
        if asin in (None, ""):
            raise ConversionError(f"{path.name}: line {line_no}: missing field asin")
        asin = str(asin)
        if asin in rows:
            report.products_duplicate += 1
            continue
        category_path = _category_path(record)
        brand = _clean(record.get("brand"))
        description = _clean(record.get("description")) or _clean(record.get("feature"))
        title = _clean(record.get("title"))
        if not title:
            title = " ".join(p for p in (brand, category_path[-1] if category_path else "") if p)
            title = title or description[:FALLBACK_TITLE_CHARS].strip()
            if not title:
                report.products_without_text += 1
                continue
            report.products_title_fallback += 1
        rows[asin] = {
            "item_id": asin,
            "title": title,
            "description": description or None,
            "category": category_path[-1] if category_path else None,
            "category_path": " > ".join(category_path) if category_path else None,
            "brand": brand or None,
            "price": _price(record.get("price")),
        }
    if not rows:
        raise ConversionError(f"{path.name}: no products found (file is empty)")
    report.items_written = len(rows)
    schema = {
        "item_id": pl.String,
        "title": pl.String,
        "description": pl.String,
        "category": pl.String,
        "category_path": pl.String,
        "brand": pl.String,
        "price": pl.Float64,
    }
    return pl.DataFrame(list(rows.values()), schema=schema)


def read_json_lines(path: Path, unit: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line; JSON or Python dict literals (2014 metadata)."""
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    line_no = 0
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(
                tqdm(handle, desc=f"reading {path.name}", unit=" lines", disable=None), 1
            ):
                text = line.strip()
                if not text:
                    continue
                yield line_no, _parse_object(text, path, line_no)
    except UnicodeDecodeError as exc:
        # Text is decoded in blocks, so the bad byte is on the next line or a little further on.
        raise ConversionError(
            f"{path.name}: not UTF-8 text at or after line {line_no + 1} ({exc.reason}); "
            f"expected JSON lines{' (gzip-compressed)' if path.suffix == '.gz' else ''}"
        ) from None
    except gzip.BadGzipFile:
        raise ConversionError(f"{path.name}: not a gzip file (its name ends in .gz)") from None


def _parse_object(text: str, path: Path, line_no: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            value = ast.literal_eval(text) if text.startswith("{") else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if value is None:
            raise ConversionError(
                f"{path.name}: line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
    if not isinstance(value, dict):
        raise ConversionError(
            f"{path.name}: line {line_no}: expected a JSON object, got {type(value).__name__}"
        )
    return value


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _number(value: Any, kind: type, path: Path, line_no: int, name: str) -> Any:
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConversionError(
            f"{path.name}: line {line_no}: field {name} is not a number: {value!r}"
        ) from None


def _clean(value: Any) -> str:
    """Text from a string or list of strings, without HTML tags, entities or repeated whitespace."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    text = html.unescape(_TAG.sub(" ", str(value)))
    return _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACE.sub(" ", text)).strip()


def _category_path(record: dict[str, Any]) -> list[str]:
    """Most specific category path: 2014 `categories` (list of paths, first taken) or 2018 `category`."""
    raw = record.get("categories")
    if isinstance(raw, list) and raw and isinstance(raw[0], list):
        raw = raw[0]
    if not raw:
        raw = record.get("category")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    return [c for c in (_clean(v) for v in raw) if c]


def _price(value: Any) -> float | None:
    """ "$1,299.00" -> 1299.0; ranges take the lower bound; anything else (CSS junk, "") is missing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _PRICE.match(value.strip().lstrip("$").replace(",", ""))
        if match:
            return float(match.group())
    return None


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recsvc-convert", description="Convert public datasets to a canonical data folder."
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    amazon = sub.add_parser(
        "amazon",
        help="Amazon reviews 5-core + product metadata (JSON lines, optionally .gz)",
        description="Amazon reviews -> rating interactions; product metadata -> items with text.",
    )
    amazon.add_argument("--reviews", required=True, type=Path, help="reviews file: one JSON review per line")
    amazon.add_argument(
        "--meta", required=True, type=Path, help="metadata file: one product per line (JSON or dict literal)"
    )
    amazon.add_argument("--out", required=True, type=Path, help="output folder for interactions + items")
    amazon.add_argument(
        "--format", choices=("parquet", "csv"), default="parquet", help="file format (default parquet)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # Also after the subcommand (`recsvc-convert amazon ... -v`); SUPPRESS keeps an absent
    # sub-level flag from resetting a `-v` given before the subcommand.
    amazon.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `recsvc-convert`; bad input prints one message and exits 2."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        convert_amazon(args.reviews, args.meta, args.out, fmt=args.format)
    except (ConversionError, DataValidationError, OSError) as exc:
        print(f"recsvc-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
