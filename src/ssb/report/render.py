"""Rendering report blocks as one self-contained HTML page (figures embedded as base64 PNG) or as markdown."""

from __future__ import annotations

import base64
import html
import re

# ---------------------------------------------------------------------------------------------- rendering

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.ex{display:grid;grid-template-columns:1fr 1.4fr;gap:1em;border:1px solid #ddd;padding:0.8em;margin:1em 0}
pre{white-space:pre-wrap;background:#f8f8f8;padding:0.6em;margin:0.3em 0;font-size:13px}.muted{color:#666}"""


def _html_example(ex: dict) -> str:
    e = html.escape
    hint = (
        (
            f"<p><b>Wrong answer shown in the hint:</b> {e(str(ex['wrong_answer']))}"
            + (f" <span class='muted'>({ex['wrong_count']} rollouts gave it)</span>" if ex.get("wrong_count") else "")
            + "</p>"
            + (
                f"<details><summary>wrong rollout</summary><pre>{e(ex['wrong'])}</pre></details>"
                if ex.get("wrong")
                else ""
            )
        )
        if ex.get("wrong_answer")
        else "<p class='muted'>No wrong answer in the hint.</p>"
    )
    run = f" <span class='muted'>({e(ex['run'])})</span>" if ex.get("run") else ""
    return (
        f"<div class='ex'><div><p><b>Question</b> <code>{e(str(ex['id']))}</code>{run}</p>"
        f"<pre>{e(ex['question'])}</pre><p><b>Gold answer:</b> {e(str(ex['gold']))}</p>{hint}</div>"
        f"<div><p><b>Teacher solution</b> <span class='muted'>(answer {e(str(ex['extracted']))})</span></p>"
        f"<pre>{e(ex['solution'])}</pre></div></div>"
    )


def render_html(blocks: list, title: str, subtitle: str) -> str:
    e = html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{e(title)}</h1><p class='muted'>{e(subtitle)}</p>"
    ]
    for b in blocks:
        if b[0] in ("h2", "p"):
            out.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode("ascii")
            out.append(f"<img alt='{e(b[3])}' src='data:image/png;base64,{data}'>")
        elif b[0] == "example":
            out.append(_html_example(b[1]))
    return "\n".join(out + ["</body></html>\n"])


def _md_text(s) -> str:
    """Inline markdown text: no raw HTML from model output (renderers would interpret it)."""
    return html.escape(str(s), quote=False)


def _md_cell(s: str) -> str:
    return _md_text(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text}\n{f}"


def _md_example(ex: dict) -> str:
    run = f" ({ex['run']})" if ex.get("run") else ""
    t = _md_text
    lines = [f"**Question** `{ex['id']}`{t(run)}", "", _fence(ex["question"]), "", f"Gold answer: {t(ex['gold'])}", ""]
    if ex.get("wrong_answer"):
        seen = f" ({ex['wrong_count']} rollouts gave it)" if ex.get("wrong_count") else ""
        lines += [f"Wrong answer shown in the hint: {t(ex['wrong_answer'])}{seen}", ""]
    lines += [f"**Teacher solution** (answer {t(ex['extracted'])})", "", _fence(ex["solution"]), ""]
    return "\n".join(lines)


def render_markdown(blocks: list, title: str, subtitle: str) -> str:
    out = [f"# {title}", "", f"_{subtitle}_", ""]
    for b in blocks:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] == "p":
            out += [_md_text(b[1]), ""]
        elif b[0] == "table":
            out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
        elif b[0] == "img":
            out += [f"![{b[3]}]({b[1]})", ""]
        elif b[0] == "example":
            out += [_md_example(b[1])]
    return "\n".join(out)
