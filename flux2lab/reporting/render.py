"""Write a report: one self-contained `index.html` and an `index.md` with its pictures in `images/`.

The HTML embeds every image as a base64 data URI and has no script and no external link, so it opens anywhere,
offline, as one file. The markdown has the same content, its images as files beside it.
"""

from __future__ import annotations

import base64
import html
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from flux2lab.reporting.document import Block, Bullets, Code, Figure, Report, Table, Text

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { border-bottom: 3px solid #76b900; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2.2em; }
h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 13px; padding-top: 4px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 13px; }
code, pre { background: #f6f6f6; font-size: 13px; }
pre { padding: .6em; overflow-x: auto; white-space: pre-wrap; }
nav li { display: inline; margin-right: 1.2em; }
"""


def _inline_html(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_block(b: Block) -> str:
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode()
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>")
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
        cap = f"<caption>{_inline_html(b.caption)}</caption>" if b.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Text):
        return f"<p>{_inline_html(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Code):
        return f"<pre><code>{html.escape(b.text)}</code></pre>"
    return f"<h3>{html.escape(b.text)}</h3>"


def to_html(report: Report) -> str:
    nav = "".join(f'<li><a href="#{s.id}">{html.escape(s.title)}</a></li>' for s in report.sections)
    body = "\n".join(f'<section id="{s.id}">\n<h2>{html.escape(s.title)}</h2>\n'
                     + "\n".join(_html_block(b) for b in s.blocks) + "\n</section>" for s in report.sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(report.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(report.title)}</h1>\n"
            f"<p>From <code>{html.escape(report.source)}</code>, made {html.escape(report.created)}.</p>\n"
            f"<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n")


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_block(b: Block, image_names: dict[int, str]) -> str:
    if isinstance(b, Figure):
        return f"![{_md_cell(b.caption)}](images/{image_names[id(b)]})\n\n*{b.caption}*"
    if isinstance(b, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |", "|" + "---|" * len(b.header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        return "\n".join(lines) + (f"\n\n*{b.caption}*" if b.caption else "")
    if isinstance(b, Text):
        return b.text
    if isinstance(b, Bullets):
        return "\n".join(f"- {i}" for i in b.items)
    if isinstance(b, Code):
        return f"```\n{b.text}\n```"
    return f"### {b.text}"


def _figures(report: Report) -> Iterable[Figure]:
    for s in report.sections:
        yield from (b for b in s.blocks if isinstance(b, Figure))


def to_markdown(report: Report, image_names: dict[int, str]) -> str:
    parts = [f"# {report.title}", f"From `{report.source}`, made {report.created}.",
             "\n".join(f"- [{s.title}](#{s.id})" for s in report.sections)]
    for s in report.sections:
        parts.append(f'<a id="{s.id}"></a>\n\n## {s.title}')
        parts += [_md_block(b, image_names) for b in s.blocks]
    return "\n\n".join(parts) + "\n"


def write(report: Report, out: str | Path) -> dict[str, Path]:
    """index.html (self-contained), index.md and images/ (the markdown's pictures) under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    if images.is_dir():
        shutil.rmtree(images)  # only pictures of an earlier report, which this one replaces
    images.mkdir()
    names: dict[int, str] = {}
    for fig in _figures(report):
        name = f"{fig.name}.png"
        k = 2
        while name in names.values():
            name, k = f"{fig.name}-{k}.png", k + 1
        names[id(fig)] = name
        (images / name).write_bytes(fig.png)
    (out / "index.html").write_text(to_html(report), encoding="utf-8")
    (out / "index.md").write_text(to_markdown(report, names), encoding="utf-8")
    return {"html": out / "index.html", "markdown": out / "index.md", "images": images}
