"""Choices of the HTML reports, importable without plotly and jinja2 (the CLI builds its
options from them at start-up)."""

PLOTLYJS_MODES = ("inline", "cdn")
"""inline: plotly.js embedded once in the page (opens offline); cdn: linked from its CDN."""
