"""`harness report`: one self-contained index.html (tables, inline SVG plots, provenance) plus
leaderboard.csv / .md / .tex exports, all from the DuckDB run store and the `published` table.

Numbers are aggregated in one place (`aggregate`), so the HTML, the exports and `harness check`
agree. A cell that lacks seeds or datasets is flagged, never silently averaged: its value is the
mean over what exists, and the flag says what is missing. Runs with shots=0 (zero-shot) are a
flat reference across shot counts, not a competitor, and are not ranked.

One module per kind of content: `aggregate` (runs -> cells and leaderboard, shared with `harness
check`), `tables` (the wide tables and the published gap), `significance` (intervals, emphasis,
pair matrix, ranks), `plots` (inline SVG), `exports` (Markdown, LaTeX), `provenance`, and `render`,
which assembles the page.
"""

from harness.report.aggregate import aggregate, load_runs, ok_runs, per_dataset
from harness.report.exports import latex_escape
from harness.report.render import render
from harness.report.tables import gap_table

__all__ = ["render", "aggregate", "load_runs", "per_dataset", "ok_runs", "latex_escape", "gap_table"]
