"""Human-readable rendering of evaluation reports (the JSON form is the report dict itself)."""

from __future__ import annotations

from typing import Any


def format_report(report: dict[str, Any]) -> str:
    ks = sorted({int(k.split("@")[1]) for k in report["overall"] if "@" in k})
    run = report.get("run", {})
    lines = []
    if run:
        lines.append(f"run {run['dir']}: items={run['items']} model={run['model']} loss={run['loss']} preset={run['preset']}"
                     + ("; random-init encoder (--pretrained none: the image tower had no pretrained weights)"
                        if run.get("encoder_random_init") else ""))
    lines.append(f"split {report['split']}: {report['protocol']}")
    idx = report.get("index")
    if idx and not idx.get("exact", True):
        rec = "  ".join(f"{k}={v:.4f}" for k, v in idx.items() if k.startswith("recall_vs_exact"))
        lines.append(f"index {idx['spec']} (approximate): {rec}")
    header = f"{'group':<22}{'users':>8}" + "".join(f"{f'R@{k}':>9}{f'N@{k}':>9}" for k in ks)
    lines += [header, "-" * len(header)]
    rows = [("all", report["overall"]), (f"cold (<{report['cold_threshold']} train)", report["cold"]),
            ("warm", report["warm"])]
    rows += [(f"  popularity {lab}", m) for lab, m in report.get("buckets", {}).items()]
    for name, m in rows:
        vals = "".join(f"{_num(m.get(f'recall@{k}'))}{_num(m.get(f'ndcg@{k}'))}" for k in ks)
        lines.append(f"{name:<22}{m.get('users', 0):>8}{vals}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return f"{'-':>9}" if value is None else f"{value:>9.4f}"
