"""The model: any Hugging Face causal LM prepared, taken apart, and run for its residual stream.

- ``parts``     ``find_parts``: embeddings, blocks, final norm, projection and unembedding of any causal LM
- ``head``      ``UnembedHead``: the final norm to the logits, from a model or from a checkpoint alone
- ``sublayers`` inside a block: the residual after its attention sublayer (``MidBlockCapture``), checked
- ``residual``  ``residual_stream`` by ``LAYER_CONVENTION``, ``residual_states`` at every position; ``check_unembed``
- ``resume``    ``Resumable``: the rest of a forward pass from any residual index (interventions)
- ``prepare``   ``prepare_model``: any source (hub id, local dir, GGUF) -> local HF dir; ``export_head``

Each module imports only those above it in this list (``parts`` none): import the one you
need, e.g. ``from pipeline.model.head import load_unembed_head``.
"""
