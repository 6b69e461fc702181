"""``lenspipe view``: an interactive explorer over what the workflow wrote under ``data_dir``.

- ``errors``   a bad request's status code and message
- ``catalog``  the runs, their lenses, layer_metrics tables and analyses' findings (no torch)
- ``tokens``   the cache browser's per-token table: filtered, sorted, paged
- ``live``     trajectories: every lens on a typed prompt, or on a stored token
- ``app``      the Starlette application, its routes and ``serve``

The page itself (HTML, CSS, JS) is in ``static/``; plotly.js comes from the installed plotly package.

Its dependencies (starlette, uvicorn, plotly: pure Python, ~12 MB with plotly.js) install with lenspipe.
"""
