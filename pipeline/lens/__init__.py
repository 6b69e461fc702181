"""The lens: translators, logit and tuned lenses, and their file formats.

- ``kinds``        the registry of translator kinds (plugins may add kinds); no torch
- ``lstsq``        the streamed statistics of a least-squares fit: every kind's closed-form start
- ``translators``  the translator classes of the built-in kinds, ``make_translator``
- ``tuned``        ``LogitLens``, ``TunedLens`` and lenspipe's own lens format; ``logits_into``
- ``reference``    the tuned-lens 0.2.x format: ``export_reference``, ``import_reference``
- ``stopping``     how each lens position's training ended; the converged KL of the study
- ``optim``        the translators' optimiser: weight decay toward the identity, per-layer clipping and step scales

Each module imports only those above it in this list (``kinds`` none): import the one you
need, e.g. ``from pipeline.lens.tuned import TunedLens``.
"""
