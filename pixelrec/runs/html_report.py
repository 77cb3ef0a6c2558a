"""`pixelrec retrieve --html FILE`: one standalone HTML page of recommendations, for sharing a result
without a server.

Each query shows its history's covers in order, then the top-k items with rank, score and whether
each is warm (had training interactions) or cold. Covers are small JPEG thumbnails embedded as
data: URIs, so the file stands alone; an item without a cover gets a placeholder. Every id and
text is HTML-escaped. The covers come from where `pixelrec serve` finds them (serving/covers.py).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..runtime import atomic_path
from .serving.covers import CoverStores, NoCover
from .trained import TrainedRun

HISTORY_SIDE, RESULT_SIDE = 72, 112  # thumbnail sides in pixels
MAX_HTML_QUERIES = 200  # queries one page may show


@dataclass
class ShownItem:
    item_id: str
    index_id: int
    score: float | None = None
    warm: bool | None = None


@dataclass
class ShownQuery:
    title: str  # "user u12" or "history"
    history: list[ShownItem]
    items: list[ShownItem]


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1rem auto;max-width:1200px;padding:0 1rem;color:#1d2125}
h1{font-size:1.3rem}h2{font-size:1.05rem;margin:1.4rem 0 .3rem}.muted{color:#667}
.row{display:flex;flex-wrap:wrap;gap:.6rem;margin:.3rem 0}figure{margin:0}
figure img,.ph{display:block;object-fit:cover;border:1px solid #dde}
.h img,.h .ph{width:72px;height:72px}.r img,.r .ph{width:112px;height:112px}
.ph{background:#eee;color:#667;font-size:11px;display:flex;align-items:center;justify-content:center}
figcaption{font-size:11px;max-width:112px;overflow-wrap:anywhere}
.b{border-radius:3px;padding:0 .3rem;color:#fff}.w{background:#2a7a3b}.c{background:#1f5fa8}
"""


def write_html(out: str, trained: TrainedRun, queries: list[ShownQuery], k: int, images: str | None = None) -> int:
    """Write the page atomically; returns how many covers it embeds."""
    covers = CoverStores(str(trained.run.path), images)
    cfg = trained.cfg
    thumbnails: dict[tuple[str, int], str | None] = {}
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>pixelrec: "
             f"{_e(trained.run.path.name)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Recommendations of {_e(str(trained.run.path))}</h1>",
             f"<p class=\"muted\">{_e(cfg.model.model)}, item tower {_e(cfg.items.kind)}, top {k}; "
             f"covers: {_e(covers.describe())}; pixelrec {_e(__version__)}</p>"]
    for query in queries:
        parts.append(f"<h2>{_e(query.title)} <span class=\"muted\">({len(query.history)} items of history, "
                     f"oldest first)</span></h2>")
        parts.append(_row("h", query.history, covers, thumbnails, HISTORY_SIDE, trained))
        parts.append(_row("r", query.items, covers, thumbnails, RESULT_SIDE, trained))
    parts.append("</body></html>\n")
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(parts), encoding="utf-8")
    return sum(1 for uri in thumbnails.values() if uri is not None)


def _row(kind: str, items: list[ShownItem], covers: CoverStores, thumbnails: dict, side: int,
         trained: TrainedRun) -> str:
    cells = []
    for rank, item in enumerate(items, 1):
        key = (item.item_id, side)
        if key not in thumbnails:
            thumbnails[key] = _data_uri(covers, item, side, trained)
        uri = thumbnails[key]
        picture = (f"<img src=\"{uri}\" alt=\"{_e(item.item_id)}\" title=\"{_e(item.item_id)}\">" if uri
                   else f"<div class=\"ph\" title=\"{_e(item.item_id)}\">no cover</div>")
        caption = f"#{rank} {_e(item.item_id)}"
        if item.score is not None:
            caption += f" <span class=\"muted\">{item.score:.4f}</span>"
        if item.warm is not None:
            caption += " <span class=\"b w\">warm</span>" if item.warm else " <span class=\"b c\">cold</span>"
        cells.append(f"<figure>{picture}<figcaption>{caption}</figcaption></figure>")
    return f"<div class=\"row {kind}\">{''.join(cells)}</div>"


def _data_uri(covers: CoverStores, item: ShownItem, side: int, trained: TrainedRun) -> str | None:
    try:
        rendered = covers.jpeg(item.item_id, item.index_id, item.index_id > trained.data.num_items, side)
    except NoCover:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(rendered.data).decode("ascii")


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
