"""The activation store: every layer's residual stream of a packed split, in zarr v3.

- ``dtypes``    the storage dtypes (bfloat16, ..., fp8, int8 with per-row scales): one table
- ``layout``    names, parameters, the shards' files and checksums every module shares
- ``location``  a store on disk, in a .zip, or at a URL; read failures and timeouts as one message
- ``engine``    which zarr codec pipeline (zarrs or zarr-python's) encodes and decodes the chunks
- ``encoding``  values into stored chunks: the range check, the cast or quantisation, the codecs
- ``manifest``  the SHA256SUMS manifest, and the digests taken as shard files are written
- ``decode``    stored values back to float32, every storage dtype
- ``reader``    ``open_store`` -> ``ActivationStore`` (float32 tensors); ``check_store_model``
- ``arrays``    the store's group and arrays as created, and the checks before a resume
- ``shards``    the writer's shard pipeline: whole shards written, made durable, recorded
- ``writer``    ``StoreWriter``: whole shards, one writer, resumable
- ``verify``    every checksum and value of a store, or of an HDF5 export in place
- ``export``    one-file exports (.zip, .h5) and their import
- ``info``      the summary of ``lenspipe info``; compression on disk
- ``parts``     ``assemble_store``: extraction parts linked into one store
- ``batches``   shuffled token batches for training, bounded memory

Each module imports only those above it in this list (``dtypes`` none): import the one you
need, e.g. ``from pipeline.store.reader import open_store``.
"""
