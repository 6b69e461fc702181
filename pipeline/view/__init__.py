"""``lenspipe view``: an interactive explorer over what the workflow wrote under ``data_dir``.

- ``errors``   a bad request's status code and message
- ``catalog``  the runs, their lenses, layer_metrics tables and analyses' findings (no torch)
- ``tokens``   the cache browser's per-token table: filtered, sorted, paged
- ``live``     trajectories: every lens on a typed prompt, or on a stored token
- ``app``      the Starlette application, its routes and ``serve``

The page itself is in ``static/``: index.html, view.css, and its scripts (common.js: state,
requests, the heatmap; trajectory.js, cache.js, findings.js: the three views; view.js: the
navigation). plotly.js comes from the installed plotly package.

Its dependencies install with lenspipe: starlette and uvicorn (pure Python, ~2 MB with h11
and click) and plotly (~70 MB installed with narwhals, for the 4.6 MB plotly.js it ships;
torch alone is ~750 MB).
"""
