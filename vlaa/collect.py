"""The loop of `python -m vlaa.sources`: rows of a published dataset in, records and image files out.

    collect(convert, name, out, rows, ...)   convert each row (one function per source, in vlaa/sources.py),
                                             save its image beside OUT, append the record, count
    local_rows(path), hub_rows(hub_id, ...)  the rows of a local copy, or streamed from the hub

The contract of the data stages holds here too: re-running the same command resumes (a row whose id is
in OUT is skipped, a torn last line is redone); a bad row stops the run naming the source, the row and
the field, or with skip_bad is counted and reported, and a rerun retries it. Every record written has
passed the checks the stages run at load (vlaa.records.check_record): field types, a gold answer its
verifier can read, an image that decodes.
"""

import collections
import hashlib
import io
import json
import os

from vlaa.images import load_image
from vlaa.jsonl import InputError, append_jsonl, open_output, parse_json, read_jsonl
from vlaa.records import check_record, report_skipped, skipped_path


class BadRow(InputError):
    """A row that cannot become a record; the message names the field."""


def local_rows(path):
    """Rows of a local copy with the published fields: JSONL, a JSON array, or parquet (as on the hub)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()  # an Image column reads as {bytes, path}
        return
    with open(path, "rb") as f:
        is_array = f.read(1024).lstrip().startswith(b"[")
    if is_array:
        with open(path, "rb") as f:
            data = f.read()
        try:
            items, why = parse_json(data.decode("utf-8"), path)  # nested too deeply: named, not a crash
        except UnicodeDecodeError as e:
            items, why = None, f"{path}: not UTF-8 (byte {e.start})"
        if why:
            raise InputError(why)
        yield from items
    else:
        yield from (rec for _, rec in read_jsonl(path))


def hub_rows(hub_id, config=None, split="train", data_files=None):
    """Rows streamed from the hub (or from a local clone of a hub repo), images left encoded: collect() checks
    them, so a broken image is one bad row rather than a crash in the middle of the download."""
    from datasets import Image, load_dataset

    ds = load_dataset(hub_id, config, split=split, data_files=data_files, streaming=True)
    for name, feature in (ds.features or {}).items():
        if isinstance(feature, Image):
            ds = ds.cast_column(name, Image(decode=False))
    yield from ds


# ----------------------------------------------------------------------------------------------------
# Images: saved as they are (no re-encoding), named by their content, decoded once to check them


def image_bytes(value, image_root):
    """The encoded bytes of a row's image: a datasets Image ({bytes, path}), bytes, a PIL image or a path
    (resolved against image_root)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        if image_root is None and not os.path.isabs(value):
            raise BadRow(f"field 'image' is a path ({value!r}): pass --image-root, the folder the images are in")
        path = os.path.join(image_root or "", value)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"field 'image': no such file {path}")
        with open(path, "rb") as f:
            return f.read()
    if hasattr(value, "save"):  # a PIL image, from a copy that decoded it
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise BadRow(f"field 'image' is a {type(value).__name__}, not an image, its bytes or a path")


def image_name(data, source):
    """images/<source>/<sha1>.<ext>: named by content, so an image met twice is one file (and is seen twice)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only; write_image decodes it all
            ext = {"JPEG": "jpg", "MPO": "jpg"}.get(im.format, (im.format or "img").lower())
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRow(f"field 'image': not an image ({e})") from None
    return f"images/{source}/{hashlib.sha1(data).hexdigest()[:20]}.{ext}"


def write_image(data, path, where):
    """Write the bytes, then decode them fully: a truncated, too large or too thin image is removed again and
    reported, naming where."""
    created = not os.path.exists(path)
    if created:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)  # a kill never leaves half an image under the final name
    try:
        load_image(path, f"{where}: field 'image'")
    except (ValueError, FileNotFoundError):
        if created:
            os.remove(path)
        raise


# ----------------------------------------------------------------------------------------------------
# The loop


def records_in(path):
    """The records already in OUT; damaged lines are left to open_output, which reports them."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec


def to_record(convert, name, row, index, captions, where):
    """(record, the row's image as the row has it), or (None, None) for a row of another kind."""
    if not isinstance(row, dict):
        raise BadRow(f"expected an object, got {type(row).__name__}")
    try:
        got = convert(row)
    except (TypeError, KeyError, IndexError, AttributeError) as e:  # a field of another type or shape
        raise BadRow(f"a field does not have the published type ({type(e).__name__}: {e})") from None
    if got is None:
        return None, None
    image = got.pop("image")
    rec = {"id": f"{name}-{index:07d}", "image": "", **got}
    rec.setdefault("source", name)
    if row.get("id") is not None:
        rec["source_id"] = str(row["id"])
    if captions and isinstance(image, str) and image in captions and not rec.get("caption"):
        rec["caption"] = captions[image]
    # the checks every stage runs at load: field types, and a gold answer its verifier can read
    check_record(rec, where, need=("question", "answer", "verifier_type"), check_images=False)
    return rec, image


def collect(convert, name, out, rows, origin, image_root=None, limit=None, skip_bad=False, unique_images=False,
            captions=None):
    """Convert the first `limit` rows into OUT (appended, resumable); `origin` (a path or hub id) names them in
    messages. Returns {"written", "done_before", "bad": [message, ...], "duplicates", "other_kind",
    "counts": {source: {verifier_type: records in OUT}}}."""
    from tqdm import tqdm

    out_dir = os.path.dirname(os.path.abspath(out))
    seen = {rec.get("image") for rec in records_in(out)} if unique_images else set()
    done, f, _ = open_output(out)
    stats = {"written": 0, "done_before": 0, "bad": [], "duplicates": 0, "other_kind": 0}
    with f, tqdm(total=limit, desc=name, unit="row") as bar:
        for index, row in enumerate(rows):
            if limit is not None and index >= limit:
                break
            bar.update(1)
            if f"{name}-{index:07d}" in done:
                stats["done_before"] += 1
                continue
            where = f"{name} ({origin}) row {index}"
            try:
                rec, image = to_record(convert, name, row, index, captions, where)
                if rec is None:
                    stats["other_kind"] += 1
                    continue
                data = image_bytes(image, image_root)
                rec["image"] = image_name(data, name)
                if unique_images and rec["image"] in seen:
                    stats["duplicates"] += 1  # paper (§2 #1): each image once; its first row keeps it
                    continue
                write_image(data, os.path.join(out_dir, rec["image"]), where)
            except (ValueError, FileNotFoundError) as e:
                message = str(e) if str(e).startswith(where) else f"{where}: {e}"
                if not skip_bad:
                    raise BadRow(message) from None
                stats["bad"].append(message)
                continue
            seen.add(rec["image"])
            append_jsonl(f, rec)
            stats["written"] += 1
    counts = collections.defaultdict(collections.Counter)
    for rec in records_in(out):
        counts[rec.get("source")][rec.get("verifier_type")] += 1
    stats["counts"] = {source: dict(c) for source, c in sorted(counts.items())}
    return stats


def report(name, out, stats):
    """The run's counts, then every record in OUT by source and verifier type."""
    print(f"vlaa.sources {name}: {stats['written']} written, {stats['done_before']} already done, "
          f"{len(stats['bad'])} bad, {stats['duplicates']} duplicate images, {stats['other_kind']} of another kind "
          f"-> {out}")
    report_skipped(stats["bad"], f"vlaa.sources {name} (a rerun retries them)", skipped_path(out))
    print(f"  {'source':<16} {'verifier':<8} {'records':>8}")
    for source, by_type in stats["counts"].items():
        for vtype, n in sorted(by_type.items()):
            print(f"  {source:<16} {vtype:<8} {n:>8}")
