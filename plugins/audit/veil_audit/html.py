"""The HTML compliance report: one self-contained file (inline CSS and SVG
charts drawn by pygal without JavaScript), which a browser shows without any
network access, written for a reader who is not an engineer."""

from __future__ import annotations

import html
import re
import sys
from typing import Any

import pygal
from pygal.style import CleanStyle

# pygal appends an import hook for its optional map plugins (pygal.maps.*),
# written for the old import protocol: with it, every later failed import in
# the process warns (ImportWarning). This report uses no map: take it out.
sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, pygal.PluginImportFixer)]

__all__ = ["render_html"]

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:2rem auto;max-width:60rem;color:#222;
line-height:1.45;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;
border-bottom:1px solid #ddd;padding-bottom:.2rem}
.lead{color:#555}.cards{display:flex;flex-wrap:wrap;gap:1rem;margin:1.2rem 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.7rem 1rem;min-width:9rem}
.card b{display:block;font-size:1.4rem}.ok{color:#17693a}.bad{color:#a21c1c}
table{border-collapse:collapse;width:100%;margin:.6rem 0}th,td{text-align:left;
padding:.3rem .5rem;border-bottom:1px solid #eee}th:not(:first-child),td.n{text-align:right;
font-variant-numeric:tabular-nums}figure{margin:1rem 0}figure svg{width:100%;height:auto}
figcaption{color:#555;font-size:.9rem}
"""


def _chart(kind: type[Any], title: str, **config: Any) -> Any:
    return kind(
        js=[],  # no script tags: nothing is fetched, nothing runs
        disable_xml_declaration=True,
        style=CleanStyle,
        title=title,
        width=900,
        height=360,
        legend_at_bottom=True,
        print_values=False,
        **config,
    )


_SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL)


def _figure(chart: Any, caption: str, name: str) -> str:
    # pygal inlines its tooltip configuration as a script even without its
    # JavaScript; the page runs no script, so it goes
    svg = _SCRIPT.sub("", chart.render(is_unicode=True))
    return (
        f'<figure class="chart" data-chart="{name}">{svg}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.6f}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for v in row:
            numeric = isinstance(v, int | float)
            text = f"{v:,.6f}" if isinstance(v, float) else f"{v:,}" if numeric else str(v)
            cells.append(f"<td{' class=n' if numeric else ''}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not rows:
        body.append(f'<tr><td colspan="{len(headers)}">None in this period.</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(summary: dict[str, Any], integrity: str, intact: bool | None) -> str:
    """The report page for a :func:`veil_audit.report.summarize` summary.

    :param integrity: one sentence on the files' verification.
    :param intact: ``True`` verified, ``False`` tampering found, ``None`` not checked.
    """
    t = summary["totals"]
    scope = f" — team {summary['team']}" if summary["team"] else ""
    period = (
        f"{(summary['first_call'] or '')[:16].replace('T', ' ')} to "
        f"{(summary['last_call'] or '')[:16].replace('T', ' ')} UTC"
        if summary["first_call"]
        else "no calls in this period"
    )
    state = {True: "ok", False: "bad", None: ""}[intact]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<title>veil audit report{html.escape(scope)}</title><style>{_CSS}</style></head><body>",
        f"<h1>AI gateway audit report{html.escape(scope)}</h1>",
        f'<p class="lead">What was sent to AI models through the gateway, for whom, at what '
        f"cost and under which signed policy. Period: {html.escape(period)}.</p>",
        f'<p class="{state}"><strong>Integrity:</strong> {html.escape(integrity)}</p>',
        '<div class="cards">',
        f"<div class=card><b>{t['calls']:,}</b>calls</div>",
        f"<div class=card><b>{_usd(t['cost_usd'])}</b>spent</div>",
        f"<div class=card><b>{t['tokens_in'] + t['tokens_out']:,}</b>tokens</div>",
        f"<div class=card><b>{sum(sum(a.values()) for a in summary['pii'].values()):,}</b>"
        "personal data items found</div>",
        f"<div class=card><b>{t['errors']:,}</b>calls refused or failed</div>",
        "</div>",
        "<h2>Spend over time</h2>",
    ]
    days = [d["day"] for d in summary["daily"]]
    teams = sorted({team for d in summary["daily"] for team in d["by_team"]})
    chart = _chart(pygal.StackedBar, "Spend per day by team (USD)", x_label_rotation=30)
    chart.x_labels = days
    for team in teams:
        chart.add(team, [round(d["by_team"].get(team, 0.0), 6) or None for d in summary["daily"]])
    parts.append(_figure(chart, "Each bar is one day (UTC); colours are teams.", "spend-by-day"))
    chart = _chart(pygal.HorizontalBar, "Spend by model (USD)")
    for row in summary["by_model"][:15]:
        chart.add(str(row["model"]), round(row["cost_usd"], 6))
    parts.append(_figure(chart, "Total spend per model over the period.", "spend-by-model"))
    parts.append("<h2>Spend by team, key and model</h2>")
    for dim, label in (("team", "Team"), ("key", "API key"), ("model", "Model")):
        parts.append(
            _table(
                [label, "Calls", "Tokens in", "Tokens out", "Cost (USD)"],
                [
                    [r[dim], r["calls"], r["tokens_in"], r["tokens_out"], r["cost_usd"]]
                    for r in summary[f"by_{dim}"]
                ],
            )
        )
    parts.append("<h2>Personal data</h2>")
    parts.append(
        "<p>Personal data the gateway found in requests, by type, and what it did: "
        "<em>redacted</em> (replaced by a placeholder before the request left), "
        "<em>blocked</em> (the request was refused), <em>output_masked</em> (hidden in an "
        "answer). The values themselves are never recorded.</p>"
    )
    actions = sorted({a for per in summary["pii"].values() for a in per})
    chart = _chart(pygal.StackedBar, "Personal data found, by type", x_label_rotation=30)
    chart.x_labels = list(summary["pii"])
    for action in actions:
        chart.add(action, [summary["pii"][k].get(action) for k in summary["pii"]])
    parts.append(_figure(chart, "Counts of items found, by type and action.", "pii-by-type"))
    parts.append("<h2>Refused and failed calls</h2>")
    chart = _chart(pygal.HorizontalBar, "Refused or failed calls, by reason")
    for label, n in list(summary["errors"].items())[:15]:
        chart.add(label, n)
    parts.append(
        _figure(chart, "HTTP status and reason code of each refused or failed call.", "errors")
    )
    parts.append(_table(["Reason", "Calls"], [[k, v] for k, v in summary["errors"].items()]))
    if summary["cache"]:
        parts.append(
            "<p>Cache: "
            + html.escape(", ".join(f"{k} {v}" for k, v in sorted(summary["cache"].items())))
            + f". Failovers to a backup model: {summary['failovers']}.</p>"
        )
    parts.append("<h2>Policies in force</h2>")
    parts.append(
        "<p>Every call ran under a policy file signed by the compliance team; each row is one "
        "signed version.</p>"
    )
    parts.append(
        _table(
            ["Version", "Fingerprint (SHA-256)", "Signing key", "First call", "Last call", "Calls"],
            [
                [
                    str(p["version"]),
                    str(p["sha256"])[:16],
                    str(p["signed_by"]),
                    p["first_seen"][:19].replace("T", " "),
                    p["last_seen"][:19].replace("T", " "),
                    p["calls"],
                ]
                for p in summary["policies"]
            ],
        )
    )
    parts.append("</body></html>\n")
    return "".join(parts)
