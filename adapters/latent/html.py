"""The interactive latent map: one self-contained HTML file (inline SVG and script, no network).

The page shows the 2D map as SVG circles coloured by a chosen colouring (a selector switches
between modality, dataset, label and group), with a legend and a tooltip on hover that names
the point's id, source file, input and colourings; each circle also carries an SVG ``<title>``
with the same text. The numbers measured beside the map are a static table.

Checks the page makes on itself, for headless tests: a first script installs handlers that
record uncaught errors, rejected promises and ``console.error`` calls in the ``data-errors``
attribute of ``<html>``; after drawing, the main script sets ``data-rendered`` to the number of
circles drawn. Point data is embedded as JSON in a ``<script type="application/json">`` block
with ``<`` escaped, and is only ever inserted as text, never as markup.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from omnienc.adapters.latent.metrics import LatentMetrics
from omnienc.adapters.latent.points import COLOURINGS, LatentSet, palette
from omnienc.atomic import write_bytes_atomic

_GUARD = """
(function () {
  var root = document.documentElement;
  function record(message) {
    var errors = JSON.parse(root.getAttribute("data-errors") || "[]");
    errors.push(String(message));
    root.setAttribute("data-errors", JSON.stringify(errors));
  }
  window.addEventListener("error", function (e) {
    record((e.message || "error") + " (line " + e.lineno + ")");
  });
  window.addEventListener("unhandledrejection", function (e) {
    record("unhandled rejection: " + e.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
})();
"""

_MAIN = """
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("points-data").textContent);
  var svg = document.getElementById("map");
  var tip = document.getElementById("tooltip");
  var legend = document.getElementById("legend");
  var select = document.getElementById("colouring");
  var W = 800, H = 640, PAD = 24;
  var xs = data.points.map(function (p) { return p.x; });
  var ys = data.points.map(function (p) { return p.y; });
  var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
  var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
  var sx = (W - 2 * PAD) / ((x1 - x0) || 1), sy = (H - 2 * PAD) / ((y1 - y0) || 1);
  function describe(p) {
    var lines = ["id: " + p.id, "source: " + p.source, "input: " + p.input];
    data.colourings.forEach(function (c) { lines.push(c + ": " + p[c]); });
    return lines.join("\\n");
  }
  data.colourings.forEach(function (c) {
    var option = document.createElement("option");
    option.value = c;
    option.textContent = c;
    select.appendChild(option);
  });
  var circles = data.points.map(function (p) {
    var circle = document.createElementNS(NS, "circle");
    circle.setAttribute("cx", (PAD + (p.x - x0) * sx).toFixed(2));
    circle.setAttribute("cy", (H - PAD - (p.y - y0) * sy).toFixed(2));
    circle.setAttribute("r", "4");
    var title = document.createElementNS(NS, "title");
    title.textContent = describe(p);
    circle.appendChild(title);
    circle.addEventListener("mouseover", function (e) {
      tip.textContent = describe(p);
      tip.style.left = (e.pageX + 12) + "px";
      tip.style.top = (e.pageY + 12) + "px";
      tip.hidden = false;
      circle.setAttribute("r", "7");
    });
    circle.addEventListener("mouseout", function () {
      tip.hidden = true;
      circle.setAttribute("r", "4");
    });
    svg.appendChild(circle);
    return circle;
  });
  function colour(by) {
    var colours = data.palettes[by], counts = {};
    data.points.forEach(function (p, i) {
      circles[i].setAttribute("fill", colours[p[by]]);
      counts[p[by]] = (counts[p[by]] || 0) + 1;
    });
    while (legend.firstChild) { legend.removeChild(legend.firstChild); }
    Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a] || (a < b ? -1 : 1); })
      .forEach(function (v) {
        var item = document.createElement("li");
        var swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = colours[v];
        item.appendChild(swatch);
        item.appendChild(document.createTextNode(v + " (" + counts[v] + ")"));
        legend.appendChild(item);
      });
    document.documentElement.setAttribute("data-colouring", by);
  }
  select.addEventListener("change", function () { colour(select.value); });
  colour(data.colourings[0]);
  document.documentElement.setAttribute("data-rendered", String(circles.length));
})();
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
#wrap { display: flex; gap: 1.5em; align-items: flex-start; }
svg { border: 1px solid #ccc; background: #fff; }
circle { stroke: #fff; stroke-width: 0.5; opacity: 0.9; }
#legend { list-style: none; padding: 0; margin: 0; font-size: 12px; max-height: 640px;
  overflow-y: auto; }
#legend li { margin: 2px 0; white-space: nowrap; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
#tooltip { position: absolute; background: #fffff0; border: 1px solid #999; padding: 4px 6px;
  font-size: 12px; white-space: pre; pointer-events: none; }
table { border-collapse: collapse; font-size: 13px; margin-top: 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
"""


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _metrics_table(metrics: LatentMetrics | None) -> str:
    if metrics is None:
        return ""
    head = (
        "<tr><th>colouring</th><th>points</th><th>classes</th><th>silhouette (features)</th>"
        "<th>silhouette (2D)</th><th>kNN accuracy</th><th>kNN balanced acc.</th>"
        "<th>majority class</th></tr>"
    )
    rows = []
    for m in metrics.colourings:
        cells = [
            m.colouring,
            str(m.n),
            str(len(m.classes)),
            _fmt(m.silhouette_features, True),
            _fmt(m.silhouette_2d, True),
            _fmt(m.knn_accuracy),
            _fmt(m.knn_balanced_accuracy),
            _fmt(m.majority),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    caption = (
        f"Trustworthiness of the map: {metrics.trustworthiness:.3f} "
        f"(k = {metrics.trustworthiness_k}). Silhouette: cosine distance on centred features, "
        "Euclidean in the map. kNN: cosine, stratified cross-validation; classes of one point "
        "and points without a value are left out."
    )
    return f"<p>{html.escape(caption)}</p><table>{head}{''.join(rows)}</table>"


def render_html(
    latent: LatentSet,
    coords: np.ndarray,
    title: str,
    metrics: LatentMetrics | None = None,
    colourings: Sequence[str] = COLOURINGS,
) -> str:
    """The interactive map as one self-contained HTML document.

    Args:
        latent: The points.
        coords: ``(N, 2)`` map coordinates.
        title: Page title (the encoder).
        metrics: Shown as a table under the map when given.
        colourings: Selectable colourings, the first shown first.

    Returns:
        The HTML text.
    """
    xy = np.asarray(coords, dtype=np.float64)
    if xy.shape != (len(latent), 2):
        raise ValueError(f"coords must be ({len(latent)}, 2), got {xy.shape}")
    points: list[dict[str, Any]] = []
    for i in range(len(latent)):
        p: dict[str, Any] = {
            "x": round(float(xy[i, 0]), 5),
            "y": round(float(xy[i, 1]), 5),
            "id": latent.ids[i],
            "source": latent.sources[i],
            "input": latent.inputs[i],
        }
        p.update({c: getattr(latent, c)[i] for c in colourings})
        points.append(p)
    payload = {
        "colourings": list(colourings),
        "palettes": {c: palette(latent.column(c)) for c in colourings},
        "points": points,
    }
    # "<" as \\u003c keeps "</script>" and "<!--" in any string from ending the block.
    blob = json.dumps(payload, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    t = html.escape(title)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{t}</title>\n<script>{_GUARD}</script>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<h1>{t}</h1>\n<p>{len(latent)} points. Hover a point for its source file; "
        'choose the colouring: <select id="colouring"></select></p>\n'
        '<div id="wrap"><svg id="map" viewBox="0 0 800 640" width="800" height="640" '
        'xmlns="http://www.w3.org/2000/svg"></svg><ul id="legend"></ul></div>\n'
        '<div id="tooltip" hidden></div>\n'
        f"{_metrics_table(metrics)}\n"
        f'<script type="application/json" id="points-data">{blob}</script>\n'
        f"<script>{_MAIN}</script>\n</body>\n</html>\n"
    )


def write_html(
    path: str | Path,
    latent: LatentSet,
    coords: np.ndarray,
    title: str,
    metrics: LatentMetrics | None = None,
) -> Path:
    """Write :func:`render_html` atomically and return ``path``."""
    return write_bytes_atomic(path, render_html(latent, coords, title, metrics).encode())
