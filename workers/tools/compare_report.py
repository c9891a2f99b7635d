"""Write the compare results as Markdown and as one self-contained HTML page (no external assets)."""
from __future__ import annotations

import html
import statistics
import time
from pathlib import Path

from workers.config.files import write_atomic


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value, spec: str = ".2f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def summaries(results: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for m in models:
        rs = [r for r in results if r["model"] == m]
        checked = [r for r in rs if r.get("check")]
        rows.append({
            "model": m, "answers": len(rs),
            "ttft_s": _mean(r["ttft_s"] for r in rs), "tok_s": _mean(r["tok_s"] for r in rs),
            "chars": _mean(len(r["answer"]) for r in rs if not r["error"]),
            "errors": sum(1 for r in rs if r["error"]),
            "checks": f"{sum(1 for r in checked if r['check']['passed'])}/{len(checked)}",
        })
    return rows


def summary_markdown(results: list[dict], models: list[str]) -> str:
    lines = ["| model | answers | mean time to first token (s) | mean tok/s | mean answer length (chars) | errors | checks passed |",
             "|---|---|---|---|---|---|---|"]
    for s in summaries(results, models):
        lines.append(f"| {s['model']} | {s['answers']} | {_fmt(s['ttft_s'])} | {_fmt(s['tok_s'], '.1f')} | "
                     f"{_fmt(s['chars'], '.0f')} | {s['errors']} | {s['checks']} |")
    return "\n".join(lines)


def _cell_md(r: dict | None) -> str:
    if r is None:
        return "(not asked)"
    text = f"**error:** {r['error']}" if r["error"] else (r["answer"] or "(empty)")
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    meta = f"<br><sub>{_fmt(r['ttft_s'])} s to first token, {r['tokens'] if r['tokens'] is not None else '?'} tokens, " \
           f"{_fmt(r['tok_s'], '.1f')} tok/s, finish: {r['finish_reason']}</sub>"
    if r.get("check"):
        mark = "✅ pass" if r["check"]["passed"] else "❌ fail"
        meta += f"<br><sub>check {r['check']['kind']}: {mark}: {r['check']['detail'].replace('|', '/')}</sub>"
    return text + meta


def markdown(results: list[dict], models: list[str], sets) -> str:
    by_key = {(r["question_id"], r["model"]): r for r in results}
    out = [f"# Model comparison ({time.strftime('%Y-%m-%d %H:%M')})", "", "## Summary", "",
           summary_markdown(results, models), ""]
    for qset in sets:
        out += [f"## {qset.title}", ""]
        for q in qset.questions:
            out += [f"### {q.id}", "", f"> {q.text}", ""]
            if q.note:
                out += [f"*Note:* {q.note}", ""]
            out += ["| " + " | ".join(models) + " |", "|" + "---|" * len(models),
                    "| " + " | ".join(_cell_md(by_key.get((q.id, m))) for m in models) + " |", ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,"Noto Sans CJK SC",sans-serif;margin:2rem;color:#1f2937}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}
th,td{border:1px solid #d1d5db;padding:.5rem;vertical-align:top;text-align:left}
th{background:#f3f4f6} .answer{white-space:pre-wrap;font-size:.95rem}
.meta{color:#6b7280;font-size:.8rem;margin-top:.4rem} .pass{color:#047857} .fail{color:#b91c1c}
.q{background:#f9fafb;border-left:4px solid #6366f1;padding:.5rem 1rem} .error{color:#b91c1c}
"""


def _cell_html(r: dict | None) -> str:
    if r is None:
        return "<td>(not asked)</td>"
    body = (f'<div class="error">error: {html.escape(r["error"])}</div>' if r["error"]
            else f'<div class="answer">{html.escape(r["answer"] or "(empty)")}</div>')
    meta = (f'{_fmt(r["ttft_s"])} s to first token · {r["tokens"] if r["tokens"] is not None else "?"} tokens · '
            f'{_fmt(r["tok_s"], ".1f")} tok/s · finish: {html.escape(str(r["finish_reason"]))}')
    if r.get("check"):
        cls = "pass" if r["check"]["passed"] else "fail"
        meta += (f'<br><span class="{cls}">check {html.escape(r["check"]["kind"])}: '
                 f'{"pass" if r["check"]["passed"] else "fail"} — {html.escape(r["check"]["detail"])}</span>')
    return f'<td>{body}<div class="meta">{meta}</div></td>'


def html_page(results: list[dict], models: list[str], sets) -> str:
    by_key = {(r["question_id"], r["model"]): r for r in results}
    parts = [f"<!doctype html><html lang=\"zh\"><head><meta charset=\"utf-8\"><title>Model comparison</title>"
             f"<style>{_CSS}</style></head><body><h1>Model comparison</h1>"
             f"<p>{html.escape(time.strftime('%Y-%m-%d %H:%M'))} · models: {html.escape(', '.join(models))}</p>"
             "<h2>Summary</h2><table><tr><th>model</th><th>answers</th><th>mean time to first token (s)</th>"
             "<th>mean tok/s</th><th>mean answer length (chars)</th><th>errors</th><th>checks passed</th></tr>"]
    for s in summaries(results, models):
        parts.append(f"<tr><td>{html.escape(s['model'])}</td><td>{s['answers']}</td><td>{_fmt(s['ttft_s'])}</td>"
                     f"<td>{_fmt(s['tok_s'], '.1f')}</td><td>{_fmt(s['chars'], '.0f')}</td><td>{s['errors']}</td>"
                     f"<td>{s['checks']}</td></tr>")
    parts.append("</table>")
    for qset in sets:
        parts.append(f"<h2>{html.escape(qset.title)}</h2>")
        for q in qset.questions:
            parts.append(f'<h3 id="{html.escape(q.id)}">{html.escape(q.id)}</h3><div class="q">{html.escape(q.text)}</div>')
            if q.note:
                parts.append(f"<p><em>Note:</em> {html.escape(q.note)}</p>")
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(m)}</th>" for m in models) + "</tr><tr>"
                         + "".join(_cell_html(by_key.get((q.id, m))) for m in models) + "</tr></table>")
    parts.append("</body></html>")
    return "".join(parts)


def write(results: list[dict], models: list[str], sets, out_dir: Path) -> tuple[Path, Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    for path, text in ((md, markdown(results, models, sets)), (page, html_page(results, models, sets))):
        write_atomic(path, text, mode=0o644)
    return md, page
