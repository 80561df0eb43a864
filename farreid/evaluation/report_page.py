"""The static page of the error-analysis report, assembled from ``assets/report.{html,css,js}`` (plain HTML, CSS and
JavaScript, no framework, nothing loaded from the network: the CSS, the script and the data are inlined).

The page reads its data from an embedded ``<script type="application/json" id="data">`` block and renders one page
of queries at a time (50; ``report.html#all`` renders every query, for scripts). Each query entry is a
``<div class="query" data-query=NAME data-case=CASE data-ap=AP>`` (AP of the plain ranking in [0, 1]; empty on an
anonymized release), listed per case worst AP first.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib.resources import files


@cache
def _asset(name: str) -> str:
    return files("farreid.evaluation").joinpath("assets", name).read_text(encoding="utf-8")


def render(title: str, notes: str, summary_html: str, figures_html: str, data: dict) -> str:
    """The page: ``title`` and ``notes`` as text, ``summary_html``/``figures_html`` as markup, ``data`` as JSON."""
    return _asset("report.html").format(
        title=html.escape(title),
        style=_asset("report.css"),
        notes=html.escape(notes),
        summary=summary_html,
        figures=figures_html,
        data=json.dumps(data, separators=(",", ":")).replace("</", "<\\/"),
        script=_asset("report.js"),
    )
