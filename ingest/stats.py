"""The statistics table of a Dan:mul dataset, in the shape of the paper's Table 2, plus the filters."""

from __future__ import annotations

import numpy as np

from ingest.schema import SPLITS, DatasetInfo


def long_tail(info: DatasetInfo) -> dict[str, float]:
    """How uneven the classes are: largest/smallest class, median, and the Gini coefficient."""
    counts = np.sort(np.asarray(info.character_counts, dtype=np.float64))
    if counts.size == 0:
        return {"max": 0, "min": 0, "median": 0, "gini": 0.0}
    n = counts.size
    gini = float((2 * np.arange(1, n + 1) - n - 1) @ counts / (n * counts.sum()))
    return {"max": int(counts[-1]), "min": int(counts[0]), "median": float(np.median(counts)), "gini": gini}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_stats(info: DatasetInfo, name: str = "Dan:mul") -> str:
    title = f"{name} ({info.source})"
    main = _table(
        ["dataset", "images", "classes", "avg tags/image", "tag vocabulary"],
        [[title, f"{info.num_images:,}", f"{info.num_characters:,}", f"{info.avg_tags_per_image:.2f}",
          f"{info.tag_vocab_size:,}"]],
    )
    splits = _table(["split", *SPLITS], [["images", *(f"{info.splits.get(s, 0):,}" for s in SPLITS)]])
    tail = long_tail(info)
    tail_line = (f"images per class: max {tail['max']:,}, median {tail['median']:g}, min {tail['min']:,}; "
                 f"Gini {tail['gini']:.2f}")
    parts = [main, "", splits, "", tail_line]
    if info.filters:
        rows = []
        for f in info.filters:
            detail = ", ".join(f"{k} {v:,}" for k, v in f.detail.items())
            rows.append([f.name, f"{f.removed_posts:,}", f"{f.removed_classes:,}", detail or "-"])
        parts += ["", _table(["filter", "posts removed", "classes removed", "detail"], rows)]
        for f in info.filters:
            if f.examples:
                parts += ["", f"first {len(f.examples)} lines rejected by {f.name}:"]
                parts += [f"  {e}" for e in f.examples]
    return "\n".join(parts)
