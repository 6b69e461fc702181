#!/usr/bin/env bash
# Compare lenspipe's affine tuned lens against the reference library, tuned-lens==0.2.0
# (AlignmentResearch/tuned-lens), trained on the same model and the same training tokens.
# See benchmarks/compare_reference.py for what is compared and benchmarks/RESULTS.md for
# the numbers.
#
#   benchmarks/compare_reference.sh            # set up (idempotent), train the reference, compare
#   SETUP_ONLY=1 benchmarks/compare_reference.sh
#   SKIP_REF_TRAIN=1 benchmarks/compare_reference.sh   # reuse benchmarks/.ref-work/ref-lens
#   RETIME_ONLY=1 benchmarks/compare_reference.sh      # only the back-to-back wall-time re-run
#
# Wall times on a shared machine are only comparable when measured under the same load, so
# after the comparison the script re-runs, back to back, our whole path (extract the train
# and validation stores + train, into scratch) and the reference training (RETIME=0 skips).
#
# Needs: the project's .venv (make run), the smollm2-135m/shakespeare stores and the affine
# lens data/lenses/smollm2-135m/shakespeare/affine. Everything it makes lives under the
# git-ignored benchmarks/.ref-venv and benchmarks/.ref-work. On an idle 2-core machine the
# reference training takes ~11 min (34 min when it shared the cores with another job), the
# evaluation ~9 min, the re-timing ~14 min; run it under `nice -n 10` on a shared machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-data/models/smollm2-135m}"
STORES="${STORES:-data/stores/smollm2-135m/shakespeare}"
OURS="${OURS:-data/lenses/smollm2-135m/shakespeare/affine}"
VENV=benchmarks/.ref-venv
WORK=benchmarks/.ref-work
MAIN_PY="$ROOT/.venv/bin/python"
REF_PY="$ROOT/$VENV/bin/python"
TL_WHEEL="${TL_WHEEL:-/tmp/tl/tuned_lens-0.2.0-py3-none-any.whl}"

# ---------------------------------------------------------------- the reference's venv
if [ ! -f "$VENV/.complete" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$REF_PY" -m pip install -q --upgrade pip
    # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    "$REF_PY" -m pip install -q torch==2.13.0
    # tuned-lens 0.2.0 predates transformers 5 (it passes load_in_8bit=, torch_dtype=).
    "$REF_PY" -m pip install -q "transformers>=4.44,<5" accelerate datasets \
        "simple-parsing>=0.1.1" "flatten-dict>=0.4.1" numpy
    # torchdata: 0.9.0 is the last release with dataloader2/datapipes (which tuned-lens
    # imports); --no-deps so it cannot replace the pinned torch.
    "$REF_PY" -m pip install -q --no-deps torchdata==0.9.0
    # The reference itself, --no-deps: its wandb (logging only, imported lazily and only
    # with --wandb) and plotly (plotting only, never imported by training) are not installed.
    if ! "$REF_PY" -m pip install -q --no-deps tuned-lens==0.2.0; then
        "$REF_PY" -m pip install -q --no-deps "$TL_WHEEL"
    fi
    "$REF_PY" -c "import torch, transformers, tuned_lens.scripts.train_loop as t; print('ref venv:', torch.__version__, transformers.__version__)"
    touch "$VENV/.complete"
fi

# ---------------------------------------------------------------- the model, patched copy
# transformers 4.x cannot read the transformers-5 model dir as is: the tokenizer class
# `TokenizersBackend` does not exist there (-> PreTrainedTokenizerFast) and the RoPE base
# moved into `rope_parameters` (-> top-level rope_theta, which 4.x reads; without it 4.x
# silently uses 10000 instead of 100000 and computes a different model). The weights are
# symlinked, not copied.
mkdir -p "$WORK/model"
"$MAIN_PY" - "$MODEL" "$WORK/model" <<'PY'
import json, os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
for f in src.iterdir():
    target = dst / f.name
    if target.is_symlink() or target.exists():
        target.unlink()
    if f.suffix == ".safetensors":
        os.symlink(f, target)
    elif f.name not in ("config.json", "tokenizer_config.json"):
        shutil.copy2(f, target)
cfg = json.loads((src / "config.json").read_text())
rope = cfg.get("rope_parameters") or {}
cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta"))
if rope.get("rope_type", "default") != "default":
    cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
cfg["torch_dtype"] = cfg.get("dtype", "float32")  # transformers 4.x's name for it
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
tok = json.loads((src / "tokenizer_config.json").read_text())
tok["tokenizer_class"] = "PreTrainedTokenizerFast"
(dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
print(f"patched model copy in {dst}")
PY
[ -n "${SETUP_ONLY:-}" ] && exit 0

# ---------------------------------------------------------------- export, train, compare
# The ref venv has no zarr: the training tokens travel as a .npy (int64, (96, 256)).
"$MAIN_PY" benchmarks/compare_reference.py export --store "$STORES/train.zarr" --out "$WORK/train_tokens.npy"
if [ -z "${SKIP_REF_TRAIN:-}" ] && [ -z "${RETIME_ONLY:-}" ]; then
    rm -rf "$WORK/ref-lens"
    "$REF_PY" benchmarks/compare_reference.py train-reference --model "$WORK/model" \
        --tokens "$WORK/train_tokens.npy" --out "$WORK/ref-lens" 2>&1 | tee "$WORK/ref-train.log"
fi
if [ -z "${RETIME_ONLY:-}" ]; then
    "$MAIN_PY" benchmarks/compare_reference.py evaluate --model "$MODEL" --store "$STORES/test.zarr" \
        --ours "$OURS" --reference "$WORK/ref-lens" --extract-json "$STORES/train.extract.json" \
        --out "$WORK/comparison.json"
fi

# ---------------------------------------------------------------- wall times, back to back
if [ "${RETIME:-1}" != 0 ]; then
    CORPUS="${CORPUS:-data/corpora/shakespeare/smollm2-135m}"
    rm -rf "$WORK/ours-retime" "$WORK/ref-lens-retime"
    "$MAIN_PY" benchmarks/compare_reference.py time-ours --model "$MODEL" --stores "$STORES" \
        --corpus "$CORPUS" --ours "$OURS" --out "$WORK/ours-retime" 2>&1 | tee "$WORK/ours-retime.log"
    "$REF_PY" benchmarks/compare_reference.py train-reference --model "$WORK/model" \
        --tokens "$WORK/train_tokens.npy" --out "$WORK/ref-lens-retime" 2>&1 | tee "$WORK/ref-retime.log"
    RETIME_ARGS=(--retime-reference "$WORK/ref-lens-retime/lenspipe_benchmark.json"
                 --retime-ours "$WORK/ours-retime/retime.json")
else
    RETIME_ARGS=()
fi
"$MAIN_PY" benchmarks/compare_reference.py report --result "$WORK/comparison.json" \
    --extract-json "$STORES/train.extract.json" "${RETIME_ARGS[@]}" | tee "$WORK/comparison.txt"
