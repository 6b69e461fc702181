"""Where each artifact lives under ``data_dir``; shared by the Snakefile and the CLI.

``{model}`` and ``{corpus}`` are the names from the config; ``{split}`` is one of
train / validation / test.
"""

MODEL_DIR = "{data_dir}/models/{model}"
MODEL_MARKER = MODEL_DIR + "/lenspipe_model.json"
CORPUS_DIR = "{data_dir}/corpora/{corpus}/{model}"
CORPUS_SPLIT = CORPUS_DIR + "/{split}.npz"
CORPUS_MANIFEST = CORPUS_DIR + "/manifest.json"
CACHE_DIR = "{data_dir}/cache"
LOG = "{data_dir}/logs/{rule}/{name}.log"


def fill(pattern: str, **kw) -> str:
    """Fill a path pattern; keeps unknown ``{wildcards}`` for Snakemake."""
    import string

    names = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return pattern.format(**{n: kw.get(n, "{" + n + "}") for n in names})
STORE = "{data_dir}/stores/{model}/{corpus}/{split}.zarr"
STORE_DONE = "{data_dir}/stores/{model}/{corpus}/{split}.extract.json"
STORE_PART = "{data_dir}/stores/{model}/{corpus}/{split}.parts/{part}.zarr"
STORE_PART_DONE = "{data_dir}/stores/{model}/{corpus}/{split}.parts/{part}.extract.json"
LENS_DIR = "{data_dir}/lenses/{model}/{corpus}/{kind}"
LENS_META = LENS_DIR + "/lens.json"
LENS_LOG = LENS_DIR + "/train_log.parquet"
LENS_GROUP_DIR = "{data_dir}/lenses/{model}/{corpus}/groups/{kind}/{group}"
LENS_GROUP_META = LENS_GROUP_DIR + "/lens.json"
TABLES_DIR = "{data_dir}/tables/{model}/{corpus}"
LAYER_METRICS = TABLES_DIR + "/layer_metrics.parquet"
CALIBRATION = TABLES_DIR + "/calibration.parquet"
TOKEN_METRICS = TABLES_DIR + "/token_metrics"
REPORT_DIR = "{data_dir}/report"
REPORT = REPORT_DIR + "/report.md"
REPORT_HTML = REPORT_DIR + "/report.html"
ANALYSES_DIR = "{data_dir}/analyses/{model}/{corpus}"
ANALYSIS = ANALYSES_DIR + "/{analysis}.parquet"
ANALYSIS_PNG = ANALYSES_DIR + "/{analysis}.png"
COMPARE = "{data_dir}/analyses/compare_models.parquet"

#: analysis rule -> the tables it writes (each rule also writes <rule>.png)
ANALYSIS_TABLES = {
    "prediction_depth": ["prediction_depth", "early_exit"],
    "layer_contributions": ["layer_contributions"],
    "translator_anatomy": ["translator_anatomy", "translator_spectra"],
    "token_categories": ["token_categories"],
    "layer_transfer": ["layer_transfer"],
}
